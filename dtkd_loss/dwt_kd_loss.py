"""Frequency-group DWT distillation loss (DTKD paper, Section 3.4).

A J-level 2-D discrete wavelet transform splits an image into the approximation ``LL_J`` and, for
every level ``j``, three detail sub-bands (LH_j, HL_j, HH_j). The paper groups them into

* LF (coarse structure):      ``LL_J``
* MF (intermediate detail):   the details of levels 2..J   (for J = 2: LH2, HL2, HH2)
* HF (fine texture):          the details of level 1       (LH1, HL1, HH1)

and distils with ``L_DWT = sum_g gamma_g * (1 / N_g) * || W_g(I_T) - W_g(I_S) ||_1``, where ``N_g`` is
the number of coefficients of group ``g`` (all images, channels and sub-bands of the group pooled).
The paper uses J = 2 and gamma = (LF, MF, HF) = (1, 2, 1) (Tables 4 and 6).

Implementation notes
--------------------
* The wavelet filters and the padding/convolution code are those of ``pytorch_wavelets``
  (``DWTForward`` and its ``lowlevel.afb1d``), whose coefficients equal ``pywt.wavedec2`` for the
  same wavelet and mode (checked in ``tests/test_dwt_kd_loss.py``). ``DWTForward`` itself runs each
  level through a custom autograd function whose hand-written backward applies the synthesis filter
  bank; that is the adjoint of the analysis only for zero padding (or periodization of even sizes),
  so with 'symmetric' or 'reflect' padding, or odd sizes, its gradients are wrong
  (``torch.autograd.gradcheck`` fails, e.g. for db2/'symmetric' on 8x8). :class:`_AutogradDWT`
  therefore computes the same coefficients with plain differentiable torch operations.
* The DWT is linear for every padding mode, so ``W(T) - W(S) = W(T - S)``: one transform of the
  difference replaces two transforms (one of a batch twice as large) and costs half as much.
* Boundary mode: 'symmetric' by default (half-sample symmetric extension, PyWavelets' default).
  Symmetric extension continues the image smoothly across the border, so a difference image with a
  non-zero mean (a colour shift) or a gradient does not create artificial edges at the borders that
  'zero' padding would put into the MF/HF groups, and unlike 'periodization' it does not wrap the
  left border onto the right. For even sizes and the Haar wavelet (the training setting: 128x128
  patches, J = 2) all modes give identical coefficients.
"""
import math
import numbers
import warnings

import numpy as np
import pywt
import torch
from basicsr.utils.registry import LOSS_REGISTRY
from torch import nn
from torch.nn import functional as F

with warnings.catch_warnings():
    # pytorch_wavelets' DTCWT module still imports pkg_resources; the deprecation notice is noise here.
    warnings.filterwarnings('ignore', message='pkg_resources is deprecated', category=UserWarning)
    from pytorch_wavelets import DWTForward
    from pytorch_wavelets.dwt import lowlevel

GROUPS = ('LF', 'MF', 'HF')
DWT_MODES = ('symmetric', 'zero', 'reflect', 'periodization')
REDUCTIONS = ('mean', 'sum')
# 2**8 = 256: a deeper pyramid leaves a 1x1 LL for every patch size used in SR training.
MAX_LEVEL = 8


# ---------------------------------------------------------------------------------------------
# Option checks shared by the frequency-domain KD losses (also used by freq_kd_loss.py).
# ---------------------------------------------------------------------------------------------
def _is_real_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))


def check_loss_weight(loss_weight, owner):
    if not _is_real_number(loss_weight) or loss_weight < 0:
        raise ValueError(f'{owner}: loss_weight must be a finite number >= 0, got {loss_weight!r}')
    return float(loss_weight)


def check_reduction(reduction, owner):
    if reduction not in REDUCTIONS:
        raise ValueError(f'{owner}: reduction must be one of {", ".join(REDUCTIONS)}, got {reduction!r}')
    return reduction


def check_level(level, owner, max_level=MAX_LEVEL):
    if not isinstance(level, numbers.Integral) or isinstance(level, bool) or not 1 <= level <= max_level:
        raise ValueError(f'{owner}: level must be an integer in 1..{max_level}, got {level!r}')
    return int(level)


def check_group_weights(group_weights, level, owner):
    """Validate (LF, MF, HF) weights; level 1 has no MF group, so its weight must be 0 there."""
    if isinstance(group_weights, (str, bytes)) or not hasattr(group_weights, '__len__') or len(group_weights) != 3:
        raise ValueError(f'{owner}: group_weights must be a list of 3 numbers [LF, MF, HF], got {group_weights!r}')
    for name, weight in zip(GROUPS, group_weights):
        if not _is_real_number(weight) or weight < 0:
            raise ValueError(f'{owner}: group_weights must be finite numbers >= 0, got {weight!r} for the '
                             f'{name} group in {list(group_weights)!r}')
    weights = dict(zip(GROUPS, (float(w) for w in group_weights)))
    if level == 1 and weights['MF'] != 0:
        raise ValueError(f'{owner}: group_weights {list(group_weights)!r} give the MF group weight '
                         f'{weights["MF"]:g}, but level 1 has no MF group (LF = LL1, HF = level-1 details); '
                         f'set the MF weight to 0 (e.g. [1, 0, 1]) or use level >= 2')
    if level == 1:
        del weights['MF']
    return weights


def check_pair(pred, target, owner):
    """pred/target: same-shaped float tensors (B, C, H, W)."""
    for name, tensor in (('pred', pred), ('target', target)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f'{owner}: {name} must be a torch.Tensor, got {type(tensor).__name__}')
        if tensor.dim() != 4:
            raise ValueError(f'{owner}: {name} must be a 4-D (B, C, H, W) tensor, got shape {tuple(tensor.shape)}')
        if not tensor.is_floating_point():
            raise TypeError(f'{owner}: {name} must be a floating-point tensor, got {tensor.dtype}')
    if pred.shape != target.shape:
        raise ValueError(f'{owner}: pred and target must have the same shape, got {tuple(pred.shape)} and '
                         f'{tuple(target.shape)}')


def difference(pred, target):
    """pred - target in at least float32 (the transforms are linear, so one transform of this suffices)."""
    diff = pred - target
    if diff.dtype in (torch.float16, torch.bfloat16):
        # Small coefficient differences vanish in 8-bit mantissas; the loss is cheap in float32.
        diff = diff.float()
    return diff


def no_autocast(device):
    """Keep the transform convolutions in the input precision even inside an autocast region."""
    return torch.autocast(device_type=device.type, enabled=False)


def reduce_groups(sums, counts, reduction):
    """Per-group terms from per-image absolute sums (B,) and per-image coefficient counts."""
    if reduction == 'sum':
        return {name: s.sum() for name, s in sums.items()}
    return {name: s.sum() / (counts[name] * s.shape[0]) for name, s in sums.items()}


def grouped_abs_sums(bands_by_group):
    """{group: [tensors (B, ...)]} -> ({group: per-image sum of |coefficients| (B,)}, {group: count per image})."""
    sums, counts = {}, {}
    for name, bands in bands_by_group.items():
        sums[name] = sum(band.abs().flatten(1).sum(dim=1) for band in bands)
        counts[name] = sum(band[0].numel() for band in bands)
    return sums, counts


# ---------------------------------------------------------------------------------------------
# DWT
# ---------------------------------------------------------------------------------------------
def check_wavelet(wavelet, owner):
    if not isinstance(wavelet, str) or wavelet not in pywt.wavelist(kind='discrete'):
        raise ValueError(f"{owner}: wavelet must be a discrete wavelet name known to PyWavelets "
                         f"(pywt.wavelist(kind='discrete'), e.g. 'haar', 'db2', 'sym4'), got {wavelet!r}")
    return wavelet


def check_mode(mode, owner):
    if mode not in DWT_MODES:
        raise ValueError(f'{owner}: mode must be one of {", ".join(DWT_MODES)}, got {mode!r}')
    return mode


def _extend(x, before, after, mode, dim):
    """Extend ``x`` along ``dim`` (2 or 3) by ``before``/``after`` samples with PyWavelets' ``mode``."""
    if before == 0 and after == 0:
        return x
    if mode == 'symmetric':
        # Half-sample symmetric: x[before-1], ..., x[0] | x | x[n-1], ..., x[n-after].
        size = x.shape[dim]
        return torch.cat([x.narrow(dim, 0, before).flip(dim), x, x.narrow(dim, size - after, after).flip(dim)], dim)
    pad = (0, 0, before, after) if dim == 2 else (before, after, 0, 0)
    return F.pad(x, pad, mode='reflect') if mode == 'reflect' else F.pad(x, pad)


class _AutogradDWT(DWTForward):
    """2-D DWT with PyWavelets' coefficients and exact autograd gradients in every mode.

    Built on ``pytorch_wavelets.DWTForward`` (its filter buffers move with ``.to(device)``), but not
    run through its autograd function, whose backward is wrong for 'symmetric'/'reflect' padding and
    odd sizes. For 'symmetric', 'zero' and 'reflect' each level is one stride-2 ``conv2d`` of the
    extended image with the four separable L x L kernels (LL, LH, HL, HH): the extension is done once
    in 2-D, which is equivalent to pytorch_wavelets' row-then-column ``afb1d`` and about 3x faster on
    a CPU. 'periodization' (wrap-around with odd-length handling) uses ``lowlevel.afb1d`` directly.
    Filters are kept in float64 and cast to the input dtype at call time, so float64 inputs get
    float64-exact coefficients.

    Output layout as ``DWTForward``: ``(ll, [high_1, ..., high_J])``, ``high_j`` of shape
    (B, C, 3, H_j, W_j) holding (LH, HL, HH) = PyWavelets' (cH, cV, cD); level 1 is the finest.
    """

    def __init__(self, level, wavelet, mode):
        super().__init__(J=level, wave=wavelet, mode=mode)
        wave = pywt.Wavelet(wavelet)
        self.filter_length = wave.dec_len
        # conv2d correlates, so the decomposition filters are stored reversed (as DWTForward does).
        lo = torch.tensor(np.array(wave.dec_lo[::-1]), dtype=torch.float64)
        hi = torch.tensor(np.array(wave.dec_hi[::-1]), dtype=torch.float64)
        self.h0_col, self.h1_col = lo.reshape(1, 1, -1, 1), hi.reshape(1, 1, -1, 1)
        self.h0_row, self.h1_row = lo.reshape(1, 1, 1, -1), hi.reshape(1, 1, 1, -1)
        # (height filter, width filter) per output channel: LL, LH (height high), HL (width high), HH.
        pairs = ((lo, lo), (hi, lo), (lo, hi), (hi, hi))
        self.register_buffer('kernel2d', torch.stack([torch.outer(fh, fw) for fh, fw in pairs])[:, None])

    def check_size(self, height, width, owner):
        """pywt.dwt_max_level: beyond it every coefficient of the coarsest level is a boundary effect."""
        max_level = pywt.dwt_max_level(min(height, width), self.filter_length)
        if self.J > max_level:
            raise ValueError(f'{owner}: a level-{self.J} {self.mode!r} DWT needs images with a shorter side of at '
                             f'least {(self.filter_length - 1) * 2 ** self.J} px for this wavelet '
                             f'(pywt.dwt_max_level), got {height}x{width}; lower level or use larger patches')

    def _level_conv(self, ll, kernel):
        """One level for symmetric/zero/reflect: ll (N, 1, H, W) -> (N, 4, H', W').

        The extension is never longer than the signal: check_size keeps every level's input at
        >= 2 (L - 1) samples, and the extension is at most L - 1 samples per side.
        """
        length = self.filter_length
        pads = []
        for size in ll.shape[-2:]:
            # Same output length and split of the extension as pytorch_wavelets' afb1d (pywt's layout).
            total = 2 * (pywt.dwt_coeff_len(size, length, mode=self.mode) - 1) - size + length
            pads.append((total // 2, (total + 1) // 2))
        ll = _extend(ll, *pads[0], self.mode, dim=2)
        ll = _extend(ll, *pads[1], self.mode, dim=3)
        return F.conv2d(ll, kernel, stride=2)

    def _level_afb1d(self, ll):
        """One level through pytorch_wavelets' separable code: ll (N, 1, H, W) -> (N, 4, H', W')."""
        dtype = ll.dtype
        lohi = lowlevel.afb1d(ll, self.h0_row.to(dtype), self.h1_row.to(dtype), mode=self.mode, dim=3)
        return lowlevel.afb1d(lohi, self.h0_col.to(dtype), self.h1_col.to(dtype), mode=self.mode, dim=2)

    def forward(self, x):
        batch, channels = x.shape[:2]
        kernel = self.kernel2d.to(x.dtype)
        ll, highs = x.reshape(batch * channels, 1, *x.shape[-2:]), []
        for _ in range(self.J):
            y = self._level_afb1d(ll) if self.mode == 'periodization' else self._level_conv(ll, kernel)
            ll = y[:, :1]
            highs.append(y[:, 1:].reshape(batch, channels, 3, *y.shape[-2:]))
        return ll.reshape(batch, channels, *ll.shape[-2:]), highs


def _dwt_group_sums(dwt, pred, target, owner):
    check_pair(pred, target, owner)
    dwt.check_size(pred.shape[-2], pred.shape[-1], owner)
    with no_autocast(pred.device):
        ll, highs = dwt(difference(pred, target))
    bands = {'LF': [ll], 'HF': [highs[0]]}
    if dwt.J > 1:
        bands['MF'] = highs[1:]
    return grouped_abs_sums(bands)


def band_group_discrepancy(pred, target, level=2, wavelet='haar', mode='symmetric'):
    """Per-image mean absolute DWT-coefficient difference of each frequency group (paper Figs. 3-4).

    Args:
        pred, target (Tensor): (B, C, H, W) images, RGB in [0, 1], same shape.
        level, wavelet, mode: as for :class:`DWTKDLoss`.

    Returns:
        dict: 'LF', 'MF' (absent for level 1), 'HF' -> (B,) tensors, unweighted mean over the
        channels and coefficients of the group of |W_g(pred) - W_g(target)| (units: DWT coefficients
        of [0, 1] images; the orthonormal Haar LL_J coefficient is 2**J times the local mean).
    """
    owner = 'band_group_discrepancy'
    dwt = _AutogradDWT(check_level(level, owner), check_wavelet(wavelet, owner), check_mode(mode, owner))
    if isinstance(pred, torch.Tensor):
        dwt = dwt.to(pred.device)
    sums, counts = _dwt_group_sums(dwt, pred, target, owner)
    return {name: sums[name] / counts[name] for name in GROUPS if name in sums}


@LOSS_REGISTRY.register()
class DWTKDLoss(nn.Module):
    """Frequency-group DWT distillation loss of the DTKD paper (Section 3.4).

    ``loss = loss_weight * sum_g group_weights[g] * term_g`` over g in (LF, MF, HF), with
    ``term_g = mean |W_g(pred) - W_g(target)|`` over every coefficient of the group in the batch
    (reduction 'mean', the paper's (1/N_g) ||.||_1) or the plain sum of those absolute
    differences (reduction 'sum'). LF = LL_J, MF = details of levels 2..J, HF = details of level 1.

    Args:
        loss_weight (float): overall weight (>= 0); with a KD schedule the model multiplies the
            scheduled lambda_KD(t) on top of it.
        level (int): DWT levels J, 1..8 (paper: 2). Level 1 has no MF group.
        wavelet (str): PyWavelets discrete wavelet name (paper: Haar).
        group_weights (list[float] | dict): [LF, MF, HF] weights >= 0 (paper: [1, 2, 1]); the MF weight
            must be 0 for level 1. Or ``{type: adaptive, base: [1, 2, 1], alpha, momentum, low, high}``:
            weights that start at ``base`` and follow each group's progress during training
            (:mod:`dtkd_loss.adaptive_weights`); ``group_weights_now()`` gives the current ones.
        reduction (str): 'mean' or 'sum'.
        mode (str): boundary extension, one of 'symmetric' (default, PyWavelets' default), 'zero',
            'reflect', 'periodization'; see the module docstring.

    Shapes: pred (student output) and target (teacher output) are (B, C, H, W), RGB in [0, 1], any
    H, W with min(H, W) large enough for the level (pywt.dwt_max_level). Returns a scalar tensor.
    """

    def __init__(self, loss_weight=1.0, level=2, wavelet='haar', group_weights=(1, 2, 1), reduction='mean',
                 mode='symmetric'):
        super().__init__()
        owner = type(self).__name__
        self.loss_weight = check_loss_weight(loss_weight, owner)
        self.level = check_level(level, owner)
        self.wavelet = check_wavelet(wavelet, owner)
        self.mode = check_mode(mode, owner)
        self.adaptive = None
        if isinstance(group_weights, dict):
            from dtkd_loss.adaptive_weights import AdaptiveGroupWeights

            if group_weights.get('type') != 'adaptive':
                raise ValueError(f"{owner}: group_weights.type must be 'adaptive' (or give a list [LF, MF, HF]), "
                                 f"got {group_weights.get('type')!r}")
            base = group_weights.get('base', (1, 2, 1))
            self.group_weights = check_group_weights(base, self.level, owner)
            self.adaptive = AdaptiveGroupWeights(tuple(self.group_weights), group_weights, owner)
        else:
            self.group_weights = check_group_weights(group_weights, self.level, owner)
        self.reduction = check_reduction(reduction, owner)
        self.dwt = _AutogradDWT(self.level, self.wavelet, self.mode)

    def extra_repr(self):
        return (f'loss_weight={self.loss_weight}, level={self.level}, wavelet={self.wavelet!r}, '
                f'group_weights={self.group_weights}, reduction={self.reduction!r}, mode={self.mode!r}')

    def group_losses(self, pred, target):
        """Unweighted per-group terms {'LF', 'MF' (absent for level 1), 'HF'} -> scalar tensors.

        With reduction 'mean' each term is the mean absolute coefficient difference of the group;
        with 'sum', the sum. ``forward`` is ``loss_weight * sum_g group_weights[g] * term_g``.
        """
        sums, counts = _dwt_group_sums(self.dwt, pred, target, type(self).__name__)
        return reduce_groups(sums, counts, self.reduction)

    def group_weights_now(self, terms=None):
        """The group weights to apply: the fixed ones, or the adaptive ones (updated with ``terms`` while
        training with gradients)."""
        if self.adaptive is None:
            return self.group_weights
        if terms is not None and self.training and torch.is_grad_enabled():
            return self.adaptive.update(terms)
        return self.adaptive.weights()

    def forward(self, pred, target):
        terms = self.group_losses(pred, target)
        weights = self.group_weights_now(terms)
        return self.loss_weight * sum(weights[name] * terms[name] for name in terms)
