"""Real-ESRGAN's second-order degradation (Wang et al., ICCVW 2021) with ResShift's parameters.

The LQ image of a real-world training pair is made on the fly from the GT patch, as ResShift trains
its real-SR models (``trainer.py: TrainerDifIR.prepare_data``, parameters from the ``degradation`` and
``data.train.params`` blocks of ``configs/realsr_swinunet_realesrgan256.yaml``; its journal and SinSR
configs use the same values):

1. blur with kernel 1 (BasicSR's mixed Gaussian / generalised / plateau kernels, or a sinc filter);
   random resize (up / down / keep, area / bilinear / bicubic); Gaussian or Poisson noise (colour or
   gray); JPEG;
2. with probability ``second_order_prob``: blur with kernel 2 (probability ``second_blur_prob``),
   resize, noise;
3. resize to GT / ``sf`` with the final sinc filter and JPEG, in random order; round to 8 bits;
4. a ``gt_size`` crop of the pair.

Every operation is BasicSR 1.4.2's (``filter2D``, ``random_add_gaussian_noise_pt``,
``random_add_poisson_noise_pt``, ``DiffJPEG``, ``USMSharp``, ``paired_random_crop``,
``random_mixed_kernels``, ``circular_lowpass_kernel``). Only their order is written here, because
BasicSR's own order lives inside ``RealESRGANModel.feed_data`` and differs from ResShift's (it always
runs the second stage and degrades the USM-sharpened GT); the kernel draws of
``RealESRGANDataset.__getitem__`` are factored into :func:`draw_kernels` (same calls, same order; a
test checks them against that method) so they can run with the batch instead of in a loader worker.

Reproducibility: :func:`scoped_rng` seeds Python's, NumPy's and torch's generators (CPU and the
batch's CUDA device) from a key such as (seed, iteration, rank) and restores them afterwards, so
the LQ batch of an iteration depends only on the GT batch and that key, whatever the loader workers,
the resume point or other code drawing random numbers in between. Tensors are RGB, BCHW, [0, 1].
"""
import contextlib
import math
import random

import numpy as np
import torch
import torch.nn.functional as F

from dtkd_compat import OptionError
from dtkd_utils.options import check_keys

# ResShift's configs/realsr_swinunet_realesrgan256.yaml: `degradation` block and the kernel options of
# data.train.params (identical in realsr_swinunet_realesrgan256_journal.yaml and SinSR's configs/SinSR.yaml)
DEGRADATION_DEFAULTS = {
    'sf': 4,
    # the first degradation process
    'resize_prob': [0.2, 0.7, 0.1],  # up, down, keep
    'resize_range': [0.15, 1.5],
    'gaussian_noise_prob': 0.5,
    'noise_range': [1, 30],
    'poisson_scale_range': [0.05, 3.0],
    'gray_noise_prob': 0.4,
    'jpeg_range': [30, 95],
    # the second degradation process
    'second_order_prob': 0.5,
    'second_blur_prob': 0.8,
    'resize_prob2': [0.3, 0.4, 0.3],
    'resize_range2': [0.3, 1.2],
    'gaussian_noise_prob2': 0.5,
    'noise_range2': [1, 25],
    'poisson_scale_range2': [0.05, 2.5],
    'gray_noise_prob2': 0.4,
    'jpeg_range2': [30, 95],
    'gt_size': 256,
    'resize_back': False,
    'use_sharp': False,
    # blur kernels (BasicSR's RealESRGANDataset options)
    'blur_kernel_size': 21,
    'kernel_list': ['iso', 'aniso', 'generalized_iso', 'generalized_aniso', 'plateau_iso', 'plateau_aniso'],
    'kernel_prob': [0.45, 0.25, 0.12, 0.03, 0.12, 0.03],
    'sinc_prob': 0.1,
    'blur_sigma': [0.2, 3.0],
    'betag_range': [0.5, 4.0],
    'betap_range': [1, 2.0],
    'blur_kernel_size2': 15,
    'kernel_list2': ['iso', 'aniso', 'generalized_iso', 'generalized_aniso', 'plateau_iso', 'plateau_aniso'],
    'kernel_prob2': [0.45, 0.25, 0.12, 0.03, 0.12, 0.03],
    'sinc_prob2': 0.1,
    'blur_sigma2': [0.2, 1.5],
    'betag_range2': [0.5, 4.0],
    'betap_range2': [1, 2.0],
    'final_sinc_prob': 0.8,
}
_KERNELS = ('iso', 'aniso', 'generalized_iso', 'generalized_aniso', 'plateau_iso', 'plateau_aniso')
_PROBS = ('gaussian_noise_prob', 'gray_noise_prob', 'second_order_prob', 'second_blur_prob', 'gaussian_noise_prob2',
          'gray_noise_prob2', 'sinc_prob', 'sinc_prob2', 'final_sinc_prob')
_RANGES = ('resize_range', 'noise_range', 'poisson_scale_range', 'jpeg_range', 'resize_range2', 'noise_range2',
           'poisson_scale_range2', 'jpeg_range2', 'blur_sigma', 'betag_range', 'betap_range', 'blur_sigma2',
           'betag_range2', 'betap_range2')
_KERNEL_RANGE = [2 * v + 1 for v in range(3, 11)]  # RealESRGANDataset: kernel sides 7 .. 21


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_degradation_options(block, scale=None, prefix='degradation'):
    """The ``degradation`` block completed with :data:`DEGRADATION_DEFAULTS`; an unknown key or a bad
    value raises an OptionError naming ``<prefix>.<key>``. ``scale``: the run's ``scale``, which ``sf``
    must equal."""
    if block is None:
        block = {}
    check_keys(block, DEGRADATION_DEFAULTS, prefix)
    o = {**DEGRADATION_DEFAULTS, **block}
    for key in _PROBS:
        if not _number(o[key]) or not 0 <= o[key] <= 1:
            raise OptionError(f'{prefix}.{key}: expected a probability in [0, 1], got {o[key]!r}')
    for key in _RANGES:
        v = o[key]
        if not (isinstance(v, (list, tuple)) and len(v) == 2 and all(_number(x) for x in v) and 0 <= v[0] <= v[1]):
            raise OptionError(f'{prefix}.{key}: expected [low, high] with 0 <= low <= high, got {v!r}')
    for key in ('resize_range', 'resize_range2'):
        if not o[key][0] > 0:
            raise OptionError(f'{prefix}.{key}: the scales must be > 0, got {o[key]!r}')
    for key in ('jpeg_range', 'jpeg_range2'):
        if not (1 <= o[key][0] and o[key][1] <= 100):
            raise OptionError(f'{prefix}.{key}: JPEG qualities must lie in [1, 100], got {o[key]!r}')
    for key in ('resize_prob', 'resize_prob2'):
        v = o[key]
        if not (isinstance(v, (list, tuple)) and len(v) == 3 and all(_number(x) and x >= 0 for x in v) and sum(v) > 0):
            raise OptionError(f'{prefix}.{key}: expected three weights [up, down, keep] >= 0, got {v!r}')
    for suffix in ('', '2'):
        names, probs = o[f'kernel_list{suffix}'], o[f'kernel_prob{suffix}']
        if not isinstance(names, (list, tuple)) or not names or any(n not in _KERNELS for n in names):
            raise OptionError(f'{prefix}.kernel_list{suffix}: expected kernel names from {_KERNELS}, got {names!r}')
        if (not isinstance(probs, (list, tuple)) or len(probs) != len(names)
                or not all(_number(p) and p >= 0 for p in probs) or sum(probs) <= 0):
            raise OptionError(f'{prefix}.kernel_prob{suffix}: expected one weight >= 0 per kernel_list{suffix} '
                              f'entry, got {probs!r}')
        size = o[f'blur_kernel_size{suffix}']
        if not isinstance(size, int) or isinstance(size, bool) or size < 1 or size % 2 == 0 or size > 21:
            raise OptionError(f'{prefix}.blur_kernel_size{suffix}: expected an odd integer <= 21, got {size!r}')
    sf = o['sf']
    if not isinstance(sf, int) or isinstance(sf, bool) or sf < 1:
        raise OptionError(f'{prefix}.sf: expected a positive integer, got {sf!r}')
    if scale is not None and sf != scale:
        raise OptionError(f'{prefix}.sf: {sf} differs from the run\'s scale ({scale})')
    gt = o['gt_size']
    if not isinstance(gt, int) or isinstance(gt, bool) or gt < sf or gt % sf:
        raise OptionError(f'{prefix}.gt_size: expected a positive multiple of sf ({sf}), got {gt!r}')
    if o['resize_back'] is not False:
        raise OptionError(f'{prefix}.resize_back: only false is supported (the student takes the LR image)')
    if not isinstance(o['use_sharp'], bool):
        raise OptionError(f"{prefix}.use_sharp: expected true or false, got {o['use_sharp']!r}")
    return o


def key_seed(*key):
    """A 32-bit seed from a key of non-negative integers, e.g. (seed, iteration, rank)."""
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, dtype=np.uint32)[0])


@contextlib.contextmanager
def scoped_rng(seed, device=None):
    """Seed Python's ``random``, NumPy's global and torch's CPU generator (and ``device``'s, if CUDA)
    with ``seed`` for the block, then restore every one of them."""
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [torch.device(device).index or 0] if device is not None and torch.device(device).type == 'cuda' else []
    with torch.random.fork_rng(devices=devices, device_type='cuda'):
        random.seed(seed)
        np.random.seed(seed)
        torch.default_generator.manual_seed(seed)
        for index in devices:
            torch.cuda.default_generators[index].manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def draw_kernels(opt):
    """Kernel 1, kernel 2 and the final sinc kernel of one image, each a (21, 21) float32 tensor.

    The draws of BasicSR 1.4.2's ``RealESRGANDataset.__getitem__`` (after its GT crop), in its order,
    from the global ``random`` / ``np.random`` generators; ``opt`` holds its option names.
    """
    from basicsr.data.degradations import circular_lowpass_kernel, random_mixed_kernels

    kernels = []
    for suffix in ('', '2'):
        kernel_size = random.choice(_KERNEL_RANGE)
        if np.random.uniform() < opt[f'sinc_prob{suffix}']:
            omega_c = np.random.uniform(np.pi / 3, np.pi) if kernel_size < 13 else np.random.uniform(np.pi / 5, np.pi)
            kernel = circular_lowpass_kernel(omega_c, kernel_size, pad_to=False)
        else:
            kernel = random_mixed_kernels(opt[f'kernel_list{suffix}'], opt[f'kernel_prob{suffix}'], kernel_size,
                                          opt[f'blur_sigma{suffix}'], opt[f'blur_sigma{suffix}'], [-math.pi, math.pi],
                                          opt[f'betag_range{suffix}'], opt[f'betap_range{suffix}'], noise_range=None)
        pad_size = (21 - kernel_size) // 2
        kernels.append(torch.FloatTensor(np.pad(kernel, ((pad_size, pad_size), (pad_size, pad_size)))))
    if np.random.uniform() < opt['final_sinc_prob']:
        kernel_size = random.choice(_KERNEL_RANGE)
        omega_c = np.random.uniform(np.pi / 3, np.pi)
        kernels.append(torch.FloatTensor(circular_lowpass_kernel(omega_c, kernel_size, pad_to=21)))
    else:
        pulse = torch.zeros(21, 21)
        pulse[10, 10] = 1  # convolving with a pulse changes nothing
        kernels.append(pulse)
    return kernels


class RealESRGANDegradation:
    """GT batch -> (GT patches, LQ patches) by ResShift's Real-ESRGAN pipeline (see the module doc).

    Args:
        opt (dict | None): the ``degradation`` options (:data:`DEGRADATION_DEFAULTS` fill the rest).
        scale (int | None): the run's scale, checked against ``sf``.
    """

    def __init__(self, opt=None, scale=None):
        self.opt = check_degradation_options(opt, scale)
        self._jpeger = {}
        self._usm = {}

    def min_gt_side(self):
        """The smallest GT side the pipeline takes (a multiple of ``sf``): ``gt_size``, and more than 10
        pixels (the reflect padding of BasicSR's 21x21 ``filter2D``) after the smallest first resize and
        at LR size."""
        o = self.opt
        side = max(o['gt_size'], math.ceil(11 / min(o['resize_range'][0], 1)), 11 * o['sf'])
        return -(-side // o['sf']) * o['sf']  # a multiple of sf

    def _jpeg(self, device):
        from basicsr.utils import DiffJPEG

        if device not in self._jpeger:
            self._jpeger[device] = DiffJPEG(differentiable=False).to(device)
        return self._jpeger[device]

    def _stage(self, out, kernel, size, suffix):
        """Blur (if ``kernel`` is given), random resize to ``size`` (a scale factor or a callable of it),
        Gaussian or Poisson noise: one order of the degradation."""
        from basicsr.data.degradations import random_add_gaussian_noise_pt, random_add_poisson_noise_pt
        from basicsr.utils.img_process_util import filter2D

        o = self.opt
        if kernel is not None:
            out = filter2D(out.contiguous(), kernel)  # filter2D reshapes with view
        updown = random.choices(['up', 'down', 'keep'], o[f'resize_prob{suffix}'])[0]
        if updown == 'up':
            scale = random.uniform(1, o[f'resize_range{suffix}'][1])
        elif updown == 'down':
            scale = random.uniform(o[f'resize_range{suffix}'][0], 1)
        else:
            scale = 1
        mode = random.choice(['area', 'bilinear', 'bicubic'])
        if callable(size):
            out = F.interpolate(out, size=size(scale), mode=mode)
        else:
            out = F.interpolate(out, scale_factor=scale, mode=mode)
        gray = o[f'gray_noise_prob{suffix}']
        if random.random() < o[f'gaussian_noise_prob{suffix}']:
            return random_add_gaussian_noise_pt(out, sigma_range=o[f'noise_range{suffix}'], clip=True, rounds=False,
                                                gray_prob=gray)
        return random_add_poisson_noise_pt(out, scale_range=o[f'poisson_scale_range{suffix}'], gray_prob=gray,
                                           clip=True, rounds=False)

    def _jpeg_stage(self, out, suffix):
        quality = out.new_zeros(out.size(0)).uniform_(*self.opt[f'jpeg_range{suffix}'])
        return self._jpeg(out.device)(torch.clamp(out, 0, 1), quality=quality)

    @torch.no_grad()
    def __call__(self, gt, seed):
        """Degrade a GT batch.

        Args:
            gt (Tensor): (B, 3, H, W) float in [0, 1], H and W >= ``gt_size``.
            seed (int): every random draw (kernels, resizes, noise, JPEG qualities, crop) comes from
                generators seeded with it (:func:`scoped_rng`); use :func:`key_seed` of
                (seed, iteration, rank).

        Returns:
            tuple: GT patches (B, 3, gt_size, gt_size) and LQ patches (B, 3, gt_size / sf, gt_size / sf),
            both float32 in [0, 1] on ``gt``'s device; the LQ holds 8-bit values (k / 255).
        """
        from basicsr.data.transforms import paired_random_crop
        from basicsr.utils import USMSharp
        from basicsr.utils.img_process_util import filter2D

        if not torch.is_tensor(gt) or gt.dim() != 4 or gt.shape[1] != 3:
            raise ValueError(f'RealESRGANDegradation: expected a GT batch (B, 3, H, W), got {getattr(gt, "shape", gt)}')
        o, sf = self.opt, self.opt['sf']
        if min(gt.shape[-2:]) < self.min_gt_side():
            raise ValueError(f'RealESRGANDegradation: GT {tuple(gt.shape[-2:])} is smaller than '
                             f'{self.min_gt_side()} pixels (degradation.gt_size, and the 21x21 blur after the '
                             'smallest resize needs images of more than 10 pixels)')
        ori_h, ori_w = gt.shape[-2:]
        if ori_h % sf or ori_w % sf:
            raise ValueError(f'RealESRGANDegradation: GT sides {(ori_h, ori_w)} must be multiples of sf ({sf})')
        gt = gt.float().contiguous()  # filter2D reshapes with view
        with scoped_rng(seed, gt.device):
            kernels = [torch.stack(k).to(gt.device) for k in zip(*[draw_kernels(o) for _ in range(gt.shape[0])])]
            kernel1, kernel2, sinc_kernel = kernels
            if o['use_sharp']:
                if gt.device not in self._usm:
                    self._usm[gt.device] = USMSharp().to(gt.device)
                gt = self._usm[gt.device](gt)
            # first order
            out = self._stage(gt, kernel1, None, '')
            out = self._jpeg_stage(out, '')
            # second order
            if random.random() < o['second_order_prob']:
                blur = kernel2 if random.random() < o['second_blur_prob'] else None
                out = self._stage(out, blur, lambda s: (int(ori_h / sf * s), int(ori_w / sf * s)), '2')
            # [resize back + sinc filter] and JPEG, in random order
            if random.random() < 0.5:
                mode = random.choice(['area', 'bilinear', 'bicubic'])
                out = filter2D(F.interpolate(out, size=(ori_h // sf, ori_w // sf), mode=mode).contiguous(), sinc_kernel)
                out = self._jpeg_stage(out, '2')
            else:
                out = self._jpeg_stage(out, '2')
                mode = random.choice(['area', 'bilinear', 'bicubic'])
                out = filter2D(F.interpolate(out, size=(ori_h // sf, ori_w // sf), mode=mode).contiguous(), sinc_kernel)
            lq = torch.clamp((out * 255.0).round(), 0, 255) / 255.
            gt, lq = paired_random_crop(gt, lq, o['gt_size'], sf)
        return gt.contiguous(), lq.contiguous()
