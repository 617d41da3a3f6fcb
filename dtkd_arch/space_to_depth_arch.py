"""A parameter-free, lossless first stage for ResShift: space-to-depth (pixel unshuffle).

ResShift runs its residual-shifting process in the latent space of a first-stage autoencoder (the
released models use the VQ-f4 autoencoder, 3 latent channels at 1/4 of the HR size). Any pair of
``encode``/``decode`` maps with that interface works with the sampler and with ``ResShiftModel``.
``SpaceToDepthAutoencoder`` is the simplest one: ``encode`` folds each ``factor x factor`` block of
pixels into channels (``F.pixel_unshuffle``), ``decode`` unfolds them (``F.pixel_shuffle``). It is
exactly invertible and has no weights, so a small teacher can be trained from scratch without first
training an autoencoder; the denoiser then works at LR size (16x fewer positions than pixel space
at x4) on ``3 * factor**2`` channels. The project's demo teacher (``options/demo/``) uses it.
"""
import torch.nn.functional as F
from basicsr.utils.registry import ARCH_REGISTRY
from torch import nn


@ARCH_REGISTRY.register()
class SpaceToDepthAutoencoder(nn.Module):
    """``encode``: (B, C, H, W) -> (B, C * factor**2, H / factor, W / factor); ``decode``: the inverse.

    Args:
        factor (int): spatial down-scaling of the latent (4 matches ResShift's VQ-f4 at x4).
        in_channels (int): image channels (3).
    """

    needs_checkpoint = False  # no weights: option blocks may leave ``ckpt`` out

    def __init__(self, factor=4, in_channels=3):
        super().__init__()
        if not isinstance(factor, int) or isinstance(factor, bool) or factor < 1:
            raise ValueError(f'SpaceToDepthAutoencoder: factor must be a positive integer, got {factor!r}')
        self.factor = factor
        self.in_channels = in_channels
        self.latent_channels = in_channels * factor * factor

    def encode(self, x):
        if x.shape[1] != self.in_channels or x.shape[-2] % self.factor or x.shape[-1] % self.factor:
            raise ValueError(f'SpaceToDepthAutoencoder.encode: expected (B, {self.in_channels}, H, W) with H and W '
                             f'multiples of {self.factor}, got {tuple(x.shape)}')
        return F.pixel_unshuffle(x, self.factor)

    def decode(self, z):
        if z.shape[1] != self.latent_channels:
            raise ValueError(f'SpaceToDepthAutoencoder.decode: expected {self.latent_channels} latent channels, '
                             f'got {tuple(z.shape)}')
        return F.pixel_shuffle(z, self.factor)

    def forward(self, x):
        return self.decode(self.encode(x))
