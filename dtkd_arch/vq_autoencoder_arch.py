"""ResShift's first-stage VQ autoencoder (``VQModelTorch``) as a BasicSR architecture.

ResShift (Yue et al., NeurIPS 2023; github.com/zsyOAOA/ResShift, ``ldm/models/autoencoder.py``) runs
its diffusion in the latent space of the VQ-f4 autoencoder of latent diffusion (Rombach et al.,
CVPR 2022): a 256x256 image becomes a 3 x 64 x 64 latent. :class:`VQAutoencoder` takes the official
``autoencoder.params`` (``embed_dim``, ``n_embed``, ``ddconfig``) and has the same state-dict keys,
so ``autoencoder_vq_f4.pth`` loads with strict matching (55,322,782 parameters for that config).
"""
from basicsr.utils.registry import ARCH_REGISTRY
from torch import nn

from dtkd_arch.vq_modules import Decoder, Encoder, VectorQuantizer

_DDCONFIG_REQUIRED = ('ch', 'out_ch', 'ch_mult', 'num_res_blocks', 'attn_resolutions', 'in_channels', 'resolution',
                      'z_channels')
# Accepted by the reference constructors but without effect there (padding_mode is swallowed by
# their **kwargs), so accepting them here changes nothing either.
_DDCONFIG_IGNORED = ('padding_mode',)


@ARCH_REGISTRY.register()
class VQAutoencoder(nn.Module):
    """VQ-regularised autoencoder: ``encode`` gives the pre-quantisation latent, ``decode`` quantises.

    Args (names of the official ``autoencoder.params``):
        ddconfig (dict): encoder/decoder config: ch, out_ch, ch_mult, num_res_blocks, attn_resolutions,
            in_channels, resolution, z_channels, double_z (must be False for VQ), dropout,
            resamp_with_conv, give_pre_end, tanh_out, attn_type ('vanilla' only), padding_mode (ignored,
            as in the reference).
        n_embed (int): codebook size (8192).
        embed_dim (int): latent channels (3).
        remap: must be None (index remapping is not supported).
        sane_index_shape (bool): accepted for compatibility; codes are always returned as (B, H, W).

    Images here are in ResShift's range [-1, 1]; conversion from the project's [0, 1] belongs to the
    caller (the teacher wrapper).
    """

    def __init__(self, ddconfig, n_embed, embed_dim, remap=None, sane_index_shape=False):
        super().__init__()
        ddconfig = dict(ddconfig)
        missing = [k for k in _DDCONFIG_REQUIRED if k not in ddconfig]
        if missing:
            raise KeyError(f'VQAutoencoder: ddconfig lacks {missing}')
        if remap is not None:
            raise ValueError('VQAutoencoder: remap is not supported (the released ResShift autoencoders use None)')
        if ddconfig.get('double_z', True):
            raise ValueError('VQAutoencoder: ddconfig.double_z must be False for a VQ autoencoder')
        if ddconfig.get('use_linear_attn', False) or ddconfig.get('attn_type', 'vanilla') not in ('vanilla',
                                                                                                     'vanilla-xformers'):
            raise ValueError('VQAutoencoder: only ddconfig.attn_type=vanilla attention is supported')
        known = set(_DDCONFIG_REQUIRED) | set(_DDCONFIG_IGNORED) | {
            'double_z', 'dropout', 'resamp_with_conv', 'give_pre_end', 'tanh_out', 'use_linear_attn', 'attn_type'}
        unknown = sorted(set(ddconfig) - known)
        if unknown:
            raise KeyError(f'VQAutoencoder: unknown ddconfig keys {unknown}')
        common = dict(ch=ddconfig['ch'], ch_mult=list(ddconfig['ch_mult']), num_res_blocks=ddconfig['num_res_blocks'],
                      attn_resolutions=list(ddconfig['attn_resolutions']), resolution=ddconfig['resolution'],
                      z_channels=ddconfig['z_channels'], dropout=ddconfig.get('dropout', 0.0),
                      resamp_with_conv=ddconfig.get('resamp_with_conv', True))
        self.encoder = Encoder(in_channels=ddconfig['in_channels'], double_z=False, **common)
        self.decoder = Decoder(out_ch=ddconfig['out_ch'], give_pre_end=ddconfig.get('give_pre_end', False),
                               tanh_out=ddconfig.get('tanh_out', False), **common)
        self.quantize = VectorQuantizer(n_embed, embed_dim)
        self.quant_conv = nn.Conv2d(ddconfig['z_channels'], embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig['z_channels'], 1)
        self.downscale = 2 ** (len(ddconfig['ch_mult']) - 1)

    def encode(self, x):
        """Image (B, in_channels, H, W) in [-1, 1] -> latent (B, embed_dim, H/f, W/f), not quantised."""
        if x.shape[-2] % self.downscale or x.shape[-1] % self.downscale:
            raise ValueError(f'VQAutoencoder.encode: image size {tuple(x.shape[-2:])} must be a multiple of '
                             f'{self.downscale}')
        return self.quant_conv(self.encoder(x))

    def decode(self, z, force_not_quantize=False):
        """Latent (B, embed_dim, h, w) -> image (B, out_ch, h*f, w*f), about [-1, 1] (not clamped).

        The latent is snapped to the nearest codebook entries first unless ``force_not_quantize``.
        """
        if not force_not_quantize:
            z, _ = self.quantize(z)
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x, force_not_quantize=False):
        """Reconstruct: decode(encode(x))."""
        return self.decode(self.encode(x), force_not_quantize)
