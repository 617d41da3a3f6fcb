"""The DTKD student: BasicSR's SwinIR, for images of any size and with optional autocast.

SwinIR (Liang et al., ICCVW 2021) as packaged by BasicSR (``basicsr.archs.swinir_arch.SwinIR``):
``SwinIRStudent`` is a subclass with the same constructor arguments, modules and state-dict keys,
so checkpoints load both ways with ``strict=True``, and the same computation. Two additions:

- any input size: the input is reflect-padded at the bottom/right to a multiple of the window size
  and the output cropped back, as the official SwinIR test code does (BasicSR's SwinIR fails on
  sizes that are not multiples of the window);
- ``precision``: 'fp32' (default), 'bf16' or 'fp16' runs the forward under ``torch.autocast`` (fp16:
  CUDA only); the output has the input's dtype.

The paper's SwinIR-small: ``embed_dim=60, depths=[6, 6, 6, 6], num_heads=[6, 6, 6, 6],
window_size=8, mlp_ratio=2, upsampler='pixelshuffledirect'``, 929,628 parameters.
"""
import inspect

from basicsr.archs.swinir_arch import SwinIR
from basicsr.utils.registry import ARCH_REGISTRY

from dtkd_arch.tiling import pad_to_multiple
from dtkd_utils.device import PRECISIONS, autocast, check_precision


@ARCH_REGISTRY.register()
class SwinIRStudent(SwinIR):
    """BasicSR's SwinIR with any input size and a ``precision`` (see the module docstring).

    Input (B, C, H, W) in [0, img_range-scaled] as SwinIR; output (B, C, upscale*H, upscale*W).
    """

    def __init__(self, precision='fp32', **kwargs):
        # BasicSR's SwinIR swallows unknown keyword arguments; a misspelt option must not pass silently.
        signature = inspect.signature(SwinIR.__init__).parameters
        known = [n for n in signature if n not in ('self', 'kwargs')]
        unknown = sorted(set(kwargs) - set(known))
        if unknown:
            raise ValueError(f'network_g.{unknown[0]}: not an option of SwinIR (known: precision, {", ".join(known)})')
        if precision not in PRECISIONS:
            raise ValueError(f'network_g.precision: expected one of {", ".join(PRECISIONS)}, got {precision!r}')
        super().__init__(**kwargs)
        self.window_size = kwargs.get('window_size', signature['window_size'].default)
        self.precision = precision

    def forward(self, x):
        if self.precision != 'fp32':  # fp16 needs CUDA; bf16 on a CPU without bf16 instructions is warned about
            check_precision(self.precision, x.device, 'network_g.precision')
        h, w = x.shape[-2:]
        padded, _ = pad_to_multiple(x, self.window_size)
        with autocast(self.precision, x.device):
            out = super().forward(padded)
        return out[..., :h * self.upscale, :w * self.upscale].to(x.dtype)
