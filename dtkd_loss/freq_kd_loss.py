"""Alternative frequency-domain distillation losses compared in the DTKD paper (Table 5).

The paper names a Fourier-based and a DTCWT-based KD loss without defining them; the definitions
here are chosen to be like-for-like with :class:`dtkd_loss.dwt_kd_loss.DWTKDLoss` (output-level,
L1 on transform coefficients, mean over coefficients).

* :class:`FourierKDLoss`: L1 between the real and imaginary parts of the orthonormal 2-D real FFT
  (``torch.fft.rfft2(norm='ortho')``) of student and teacher outputs, as the FFT loss of MIMO-UNet
  (Cho et al., "Rethinking Coarse-to-Fine Approach in Single Image Deblurring", ICCV 2021).
  Real/imaginary parts rather than amplitude/phase: the phase is undefined at zero amplitude, wraps
  at +-pi and its gradient grows like 1/amplitude, whereas the real/imaginary L1 is a norm of the
  complex spectrum difference with bounded gradients. 'ortho' keeps Parseval's identity, so the
  coefficient scale matches the pixel scale.
* :class:`DTCWTKDLoss`: the dual-tree complex wavelet transform (Kingsbury 2001;
  ``pytorch_wavelets.DTCWTForward``) grouped like the DWT loss: LF = the final lowpass, HF = the
  six complex orientations of level 1, MF = those of levels 2..J, each group's term the mean
  absolute difference over its real numbers (a complex coefficient counts as its real and imaginary
  parts), weighted by group_weights. Default J = 2 and weights (1, 2, 1), as for the DWT loss.
"""
import warnings

import torch
from basicsr.utils.registry import LOSS_REGISTRY
from torch import nn

from dtkd_loss.dwt_kd_loss import (
    GROUPS,
    check_group_weights,
    check_level,
    check_loss_weight,
    check_pair,
    check_reduction,
    difference,
    grouped_abs_sums,
    no_autocast,
    reduce_groups,
)

with warnings.catch_warnings():
    warnings.filterwarnings('ignore', message='pkg_resources is deprecated', category=UserWarning)
    from pytorch_wavelets import DTCWTForward

# The filter sets pytorch_wavelets documents for DTCWTForward.
DTCWT_BIORT = ('near_sym_a', 'near_sym_b', 'antonini', 'legall')
DTCWT_QSHIFT = ('qshift_a', 'qshift_b', 'qshift_c', 'qshift_d', 'qshift_06')
# A 2**6 = 64x coarser lowpass is already below a pixel for typical SR training patches.
DTCWT_MAX_LEVEL = 6


@LOSS_REGISTRY.register()
class FourierKDLoss(nn.Module):
    """L1 distance between orthonormal 2-D spectra of student and teacher outputs.

    ``F = rfft2(pred - target, norm='ortho')`` over (H, W) per image and channel (the FFT is linear,
    so this equals rfft2(pred) - rfft2(target)); ``loss = loss_weight * reduce(|Re F|, |Im F|)``
    where 'mean' averages over all B*C*H*(W//2+1)*2 real numbers and 'sum' adds them. The real FFT
    keeps the non-redundant half of the Hermitian-symmetric spectrum of a real image.

    Args:
        loss_weight (float): >= 0.
        reduction (str): 'mean' or 'sum'.

    Shapes: pred, target (B, C, H, W), RGB in [0, 1], any size. Returns a scalar tensor.
    """

    def __init__(self, loss_weight=1.0, reduction='mean'):
        super().__init__()
        owner = type(self).__name__
        self.loss_weight = check_loss_weight(loss_weight, owner)
        self.reduction = check_reduction(reduction, owner)

    def extra_repr(self):
        return f'loss_weight={self.loss_weight}, reduction={self.reduction!r}'

    def forward(self, pred, target):
        check_pair(pred, target, type(self).__name__)
        with no_autocast(pred.device):
            spectrum = torch.fft.rfft2(difference(pred, target), norm='ortho')
        parts = torch.view_as_real(spectrum).abs()
        value = parts.mean() if self.reduction == 'mean' else parts.sum()
        return self.loss_weight * value


@LOSS_REGISTRY.register()
class DTCWTKDLoss(nn.Module):
    """Frequency-group distillation loss on dual-tree complex wavelet coefficients.

    ``loss = loss_weight * sum_g group_weights[g] * term_g`` with, for a J-level DTCWT
    (``pytorch_wavelets.DTCWTForward``, symmetric extension) of pred - target (linear transform):

    * LF: the lowpass after J levels (the DTCWT's level-1 lowpass is not decimated, so it has
      H/2**(J-1) x W/2**(J-1) samples),
    * HF: the level-1 highpasses (6 orientations, +-15, +-45, +-75 degrees; complex),
    * MF: the highpasses of levels 2..J (absent for J = 1),

    ``term_g`` = mean (reduction 'mean') or sum ('sum') of the absolute values of the real and
    imaginary parts of the group's coefficient differences.

    Args:
        loss_weight (float): >= 0.
        level (int): J, 1..6 (default 2, the DWT loss's level).
        group_weights (list[float]): [LF, MF, HF] >= 0; the MF weight must be 0 for level 1.
        reduction (str): 'mean' or 'sum'.
        biort (str): level-1 biorthogonal filters, one of near_sym_a (default), near_sym_b, antonini, legall.
        qshift (str): level >= 2 Q-shift filters, one of qshift_a (default), qshift_b, qshift_c,
            qshift_d, qshift_06.

    Shapes: pred, target (B, C, H, W), RGB in [0, 1]; odd sizes are extended by one sample as
    DTCWTForward does. Returns a scalar tensor.
    """

    def __init__(self, loss_weight=1.0, level=2, group_weights=(1, 2, 1), reduction='mean', biort='near_sym_a',
                 qshift='qshift_a'):
        super().__init__()
        owner = type(self).__name__
        self.loss_weight = check_loss_weight(loss_weight, owner)
        self.level = check_level(level, owner, max_level=DTCWT_MAX_LEVEL)
        self.group_weights = check_group_weights(group_weights, self.level, owner)
        self.reduction = check_reduction(reduction, owner)
        if biort not in DTCWT_BIORT:
            raise ValueError(f'{owner}: biort must be one of {", ".join(DTCWT_BIORT)}, got {biort!r}')
        if qshift not in DTCWT_QSHIFT:
            raise ValueError(f'{owner}: qshift must be one of {", ".join(DTCWT_QSHIFT)}, got {qshift!r}')
        self.biort, self.qshift = biort, qshift
        self.dtcwt = DTCWTForward(biort=biort, qshift=qshift, J=self.level, mode='symmetric')

    def extra_repr(self):
        return (f'loss_weight={self.loss_weight}, level={self.level}, group_weights={self.group_weights}, '
                f'reduction={self.reduction!r}, biort={self.biort!r}, qshift={self.qshift!r}')

    def _check_size(self, pred, owner):
        # Every level >= 2 halves a lowpass that must keep at least 2 samples per side.
        min_side = 2 ** self.level
        height, width = pred.shape[-2:]
        if min(height, width) < min_side:
            raise ValueError(f'{owner}: a level-{self.level} DTCWT needs images of at least {min_side}x{min_side} '
                             f'px, got {height}x{width}; lower level or use larger patches')

    def group_losses(self, pred, target):
        """Unweighted per-group terms {'LF', 'MF' (absent for level 1), 'HF'} -> scalar tensors."""
        owner = type(self).__name__
        check_pair(pred, target, owner)
        self._check_size(pred, owner)
        diff = difference(pred, target)
        with no_autocast(pred.device):
            if self.dtcwt.h0o.dtype != diff.dtype:
                # DTCWTForward's autograd functions need filters of the input dtype (float32 buffers by
                # default); converting in place happens only when the input dtype changes.
                self.dtcwt.to(diff.dtype)
            low, highs = self.dtcwt(diff)
        bands = {'LF': [low], 'HF': [highs[0]]}
        if self.level > 1:
            bands['MF'] = highs[1:]
        sums, counts = grouped_abs_sums(bands)
        return reduce_groups(sums, counts, self.reduction)

    def forward(self, pred, target):
        terms = self.group_losses(pred, target)
        return self.loss_weight * sum(self.group_weights[name] * terms[name] for name in GROUPS if name in terms)
