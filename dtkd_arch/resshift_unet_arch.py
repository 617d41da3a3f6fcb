"""The ResShift denoising network (``UNetModelSwin``) as a BasicSR architecture.

ResShift (Yue et al., NeurIPS 2023; code github.com/zsyOAOA/ResShift, ``models/unet.py``) denoises
in the latent space of a VQ-f4 autoencoder with an ADM-style UNet (Dhariwal & Nichol, 2021): residual
blocks with FiLM timestep conditioning (``use_scale_shift_norm``) and, instead of global attention,
Swin transformer stages (:mod:`dtkd_arch.resshift_swin`). The low-quality image is concatenated to
the noisy latent along the channel axis.

:class:`ResShiftUNet` takes the constructor arguments of the official ``model.params`` block
(e.g. ``configs/realsr_swinunet_realesrgan256.yaml``) and has the same state-dict keys and
shapes, so the released checkpoints load with strict key matching. With that config it has
118,593,583 parameters.
"""
import math

import torch
import torch.nn.functional as F
from basicsr.utils.registry import ARCH_REGISTRY
from torch import nn

from dtkd_arch.resshift_swin import SwinStage


def timestep_embedding(timesteps, dim, max_period=10000):
    """Sinusoidal timestep embedding, [cos | sin] halves as in ADM / ResShift.

    Args:
        timesteps: (B,) integer or fractional diffusion step indices.
        dim (int): embedding width.
        max_period (float): lowest frequency is 1 / max_period.

    Returns:
        (B, dim) float32.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def _norm(channels):
    return nn.GroupNorm(32, channels)


class Upsample(nn.Module):
    """Nearest x2 upsampling, optionally followed by a 3x3 conv (key ``conv``)."""

    def __init__(self, channels, use_conv, out_channels=None):
        super().__init__()
        self.channels = channels
        if use_conv:
            self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)
        elif out_channels not in (None, channels):
            raise ValueError('Upsample without convolution cannot change the channel count')
        self.use_conv = use_conv

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2, mode='nearest')
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """Stride-2 3x3 conv or 2x2 average pooling (key ``op``)."""

    def __init__(self, channels, use_conv, out_channels=None):
        super().__init__()
        out_channels = out_channels or channels
        if use_conv:
            self.op = nn.Conv2d(channels, out_channels, 3, stride=2, padding=1)
        elif out_channels != channels:
            raise ValueError('Downsample without convolution cannot change the channel count')
        else:
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x):
        return self.op(x)


class ResBlock(nn.Module):
    """ADM residual block conditioned on the timestep embedding.

    Keys: ``in_layers.{0,2}`` (GroupNorm, conv), ``emb_layers.1`` (Linear), ``out_layers.{0,3}``
    (GroupNorm, zero-initialised conv), ``skip_connection`` (1x1 conv when the width changes).
    With ``use_scale_shift_norm`` the embedding gives a per-channel scale and shift applied after
    the second normalisation (FiLM); otherwise it is added before it.
    """

    takes_emb = True

    def __init__(self, channels, emb_channels, dropout, out_channels=None, use_scale_shift_norm=False, up=False,
                 down=False):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(_norm(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels))
        self.out_layers = nn.Sequential(
            _norm(out_channels), nn.SiLU(), nn.Dropout(p=dropout), nn.Conv2d(out_channels, out_channels, 3, padding=1))
        nn.init.zeros_(self.out_layers[3].weight)
        nn.init.zeros_(self.out_layers[3].bias)
        if out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x, emb):
        """x: (B, C, H, W); emb: (B, E) -> (B, C_out, H', W')."""
        if self.updown:
            h = self.in_layers[1](self.in_layers[0](x))
            h = self.in_layers[2](self.h_upd(h))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[3](self.out_layers[2](self.out_layers[1](h)))
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class TimestepSequential(nn.Sequential):
    """Sequential container that hands the timestep embedding to the layers that take it."""

    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if getattr(layer, 'takes_emb', False) else layer(x)
        return x


def _check_supported(name, value, allowed):
    if value not in allowed:
        raise ValueError(f'ResShiftUNet option {name}={value!r} is not supported (supported: {allowed})')


@ARCH_REGISTRY.register()
class ResShiftUNet(nn.Module):
    """ResShift's ``UNetModelSwin``: predicts the clean latent from (noisy latent, step, LQ image).

    Args (names of the official ``model.params``):
        image_size (int): latent side the network is built for (64 for the x4 real-SR model); decides
            which levels get Swin stages (``attention_resolutions``) and the stored shift masks.
        in_channels (int): latent channels (3); with ``lq_size`` None, latent plus LQ channels (6).
        model_channels (int): base width (160).
        out_channels (int): output channels (3).
        num_res_blocks (int | list[int]): residual blocks per level.
        attention_resolutions (list[int]): feature sides (image_size / 2^level) that get a Swin stage
            after their first residual block (decoder: after the first block of each level).
        dropout (float): dropout rate.
        channel_mult (list[int]): width multiplier per level.
        conv_resample (bool): learned (conv) resampling instead of pooling / plain nearest.
        dims (int): only 2 is supported.
        use_fp16 (bool): only False is supported (use autocast for reduced precision).
        num_heads (int): Swin heads when ``num_head_channels == -1``.
        num_head_channels (int): channels per Swin head (heads = swin_embed_dim // num_head_channels).
        use_scale_shift_norm (bool): FiLM timestep conditioning.
        resblock_updown (bool): residual blocks for resampling instead of Up/Downsample layers.
        swin_depth (int): Swin blocks per stage.
        swin_embed_dim (int): token width of the Swin stages.
        window_size (int): Swin window side.
        mlp_ratio (float): Swin MLP expansion.
        patch_norm (bool): GroupNorm around the Swin patch (un)embedding.
        cond_lq (bool): concatenate the LQ image (or its features) to the input.
        cond_mask (bool): also concatenate an inpainting mask channel (official inpainting models).
        lq_size (int | None): LQ side; if larger than ``image_size`` a strided conv stack brings it down.
            None is the older layout of the same weights (the UNet of SinSR's ``configs/SinSR.yaml``,
            Wang et al., CVPR 2024): no ``lq_size`` key, ``in_channels`` counts the LQ channels too
            and the LQ image, of the latent's size, is concatenated as it is.

    Forward: ``unet(x, timesteps, lq=None, mask=None)`` with x (B, in_channels, H, W) the scaled noisy
    latent, timesteps (B,) step indices, lq (B, 3, H * lq_size / image_size, ...) the LQ image in
    [-1, 1] (ResShift's convention) and mask (B, 1, ...) if ``cond_mask``; returns (B, out_channels, H, W).
    H and W must be multiples of ``window_size * 2^(len(channel_mult) - 1)`` (64 for the x4 model).

    The network also runs channels-last (``unet.to(memory_format=torch.channels_last)`` with
    channels-last inputs): same results, the Swin stages then need no layout copies.
    """

    def __init__(self, image_size, in_channels, model_channels, out_channels, num_res_blocks, attention_resolutions,
                 dropout=0, channel_mult=(1, 2, 4, 8), conv_resample=True, dims=2, use_fp16=False, num_heads=1,
                 num_head_channels=-1, use_scale_shift_norm=False, resblock_updown=False, swin_depth=2,
                 swin_embed_dim=96, window_size=8, mlp_ratio=2.0, patch_norm=False, cond_lq=True, cond_mask=False,
                 lq_size=None):
        super().__init__()
        _check_supported('dims', dims, (2,))
        _check_supported('use_fp16', bool(use_fp16), (False,))
        # The reference cannot run without LQ conditioning either (its first conv still expects the
        # extra channels), and every released ResShift model uses it.
        _check_supported('cond_lq', bool(cond_lq), (True,))
        if isinstance(num_res_blocks, int):
            num_res_blocks = [num_res_blocks] * len(channel_mult)
        elif len(num_res_blocks) != len(channel_mult):
            raise ValueError(f'ResShiftUNet: num_res_blocks {num_res_blocks} needs one entry per channel_mult '
                             f'level {channel_mult}')
        if num_head_channels == -1:
            heads = num_heads
        elif num_head_channels > 0 and swin_embed_dim % num_head_channels == 0:
            heads = swin_embed_dim // num_head_channels
        else:
            raise ValueError(f'ResShiftUNet: swin_embed_dim {swin_embed_dim} must be a multiple of '
                             f'num_head_channels {num_head_channels}')
        cond_chn = 4 if cond_mask else 3
        if lq_size is None:
            # older layout: the first conv's input count includes the LQ channels
            if not isinstance(in_channels, int) or in_channels <= cond_chn:
                raise ValueError(f'ResShiftUNet: without lq_size (older layout), in_channels counts the latent and '
                                 f'the {cond_chn} LQ channels and must exceed {cond_chn}, got {in_channels!r}')
            in_channels -= cond_chn
            lq_size = image_size
        self.image_size = image_size
        self.in_channels = in_channels
        self.lq_size = lq_size
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.cond_lq = cond_lq
        self.cond_mask = cond_mask
        self.window_size = window_size
        self.num_levels = len(channel_mult)

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim))

        # Reference behaviour: the LQ image is concatenated directly when it has the latent's size;
        # otherwise a (conv, SiLU, strided conv) stack per factor of 2 brings it down, doubling width.
        if cond_lq and lq_size == image_size:
            self.feature_extractor = nn.Identity()
        else:
            ratio = lq_size / image_size
            n_down = int(math.log(ratio) / math.log(2))
            if ratio < 1 or 2 ** n_down != ratio:
                raise ValueError(f'ResShiftUNet: lq_size ({lq_size}) must be image_size ({image_size}) times a power '
                                 'of two')
            layers, base = [], 16
            for _ in range(n_down):
                layers += [nn.Conv2d(cond_chn, base, 3, 1, 1), nn.SiLU(), Downsample(base, True, base * 2)]
                base *= 2
                cond_chn = base
            self.feature_extractor = nn.Sequential(*layers)

        def res_block(ch_in, ch_out=None, **kw):
            return ResBlock(ch_in, time_embed_dim, dropout, out_channels=ch_out,
                            use_scale_shift_norm=use_scale_shift_norm, **kw)

        def swin(ch, side):
            return SwinStage(ch, swin_embed_dim, heads, window_size, swin_depth, side, mlp_ratio, drop=dropout,
                             patch_norm=patch_norm)

        ch = input_ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([TimestepSequential(nn.Conv2d(in_channels + cond_chn, ch, 3, padding=1))])
        skip_chans = [ch]
        side = image_size
        for level, mult in enumerate(channel_mult):
            for j in range(num_res_blocks[level]):
                layers = [res_block(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if side in attention_resolutions and j == 0:
                    layers.append(swin(ch, side))
                self.input_blocks.append(TimestepSequential(*layers))
                skip_chans.append(ch)
            if level != len(channel_mult) - 1:
                down = res_block(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample, ch)
                self.input_blocks.append(TimestepSequential(down))
                skip_chans.append(ch)
                side //= 2

        self.middle_block = TimestepSequential(res_block(ch), swin(ch, side), res_block(ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks[level] + 1):
                layers = [res_block(ch + skip_chans.pop(), int(model_channels * mult))]
                ch = int(model_channels * mult)
                if side in attention_resolutions and i == 0:
                    layers.append(swin(ch, side))
                if level and i == num_res_blocks[level]:
                    layers.append(res_block(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample, ch))
                    side *= 2
                self.output_blocks.append(TimestepSequential(*layers))

        self.out = nn.Sequential(_norm(ch), nn.SiLU(), nn.Conv2d(input_ch, out_channels, 3, padding=1))

    def forward(self, x, timesteps, lq=None, mask=None):
        """Predict the output latent.

        Args:
            x: (B, in_channels, H, W) network input (the sampler's normalised noisy latent).
            timesteps: (B,) diffusion step indices (0 .. T-1 for the 15-step model).
            lq: (B, 3, H * lq_size / image_size, W * ...) LQ image in [-1, 1]; required when cond_lq.
            mask: (B, 1, ...) inpainting mask; only with cond_mask.

        Returns:
            (B, out_channels, H, W).
        """
        if timesteps.dim() != 1 or timesteps.shape[0] != x.shape[0]:
            raise ValueError(f'ResShiftUNet: timesteps must have shape ({x.shape[0]},), got {tuple(timesteps.shape)}')
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        if lq is not None:
            if not self.cond_lq:
                raise ValueError('ResShiftUNet: lq given but the network was built with cond_lq=False')
            if mask is not None:
                if not self.cond_mask:
                    raise ValueError('ResShiftUNet: mask given but the network was built with cond_mask=False')
                lq = torch.cat([lq, mask], dim=1)
            x = torch.cat([x, self.feature_extractor(lq)], dim=1)
        elif self.cond_lq:
            raise ValueError('ResShiftUNet: this network is conditioned on the LQ image; pass lq=...')
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)
