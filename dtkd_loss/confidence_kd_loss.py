"""Confidence-aware frequency-group DWT distillation: the DWT loss that knows when the teacher is wrong.

The DTKD paper (Section 5) names two limits of its loss: the student copies the diffusion teacher's
artifacts (noise, hallucinated texture), and it proposes "confidence-aware distillation mechanisms that
selectively suppress unreliable teacher signals". :class:`ConfidenceDWTKDLoss` does this per wavelet
coefficient, using the ground truth that every training batch carries:

    L = sum_g gamma_g * (1 / N_g) * sum_{i in g} c_i * |W_i(I_S) - W_i(I_T)|

    c_i = 1                                   where d_i = |W_i(I_T) - W_i(I_GT)| <= tau_g
    c_i = exp(-((d_i - tau_g) / tau_g) ** 2)  beyond: 0.37 at 2 tau, 0.018 at 3 tau, 1e-4 at 4 tau

``confidence: {type: gt_agreement, tau: ...}``. The weights are computed without gradients (they are
never a path for gradients, to the teacher, the GT or the student), and ``N_g`` is the group's
coefficient count as in :class:`~dtkd_loss.dwt_kd_loss.DWTKDLoss`, so where the teacher agrees with the
GT everywhere the loss *is* DWTKDLoss, and a coefficient the teacher gets far wrong simply stops
contributing. ``tau`` is in units of the DWT coefficients of [0, 1] images (a number for every group, or
``[LF, MF, HF]``). For the orthonormal Haar transform a detail coefficient of level j is 2**j times a
local difference of pixel means, and LL_J is 2**J times the local mean: a uniform colour shift of delta
moves LL_2 by 4 delta.

This is response distillation gated by agreement with the target, in the spirit of the
uncertainty-weighted blends between teacher and GT in diffusion-distillation work (e.g. SinSR's
per-pixel uncertainty weighting, Wang et al., CVPR 2024), but per frequency band: a teacher whose
coarse structure is right while its fine texture is hallucinated keeps teaching LF and loses its say
in HF only where the texture disagrees with the GT.

``confidence: {type: teacher_spread, tau: ...}`` needs no GT but K >= 2 samples of the stochastic
teacher for the same LQ (``teacher_samples``, (B, K, C, H, W), cached by
``scripts/generate_teacher_outputs.py --samples K``). Where the diffusion teacher is sure, its samples
agree; where it invents texture, each sample invents a different one. The weight is the same map applied
to the spread of each coefficient over the samples:

    s_i = std_k W_i(T_k)          (over the K samples, divisor K - 1)
    c_i = 1                                   where s_i <= tau_g
    c_i = exp(-((s_i - tau_g) / tau_g) ** 2)  beyond

The student still distills towards ``target`` (the cached teacher output, sample 0), as with every
other KD loss, so a run differs from plain DWT-KD only by the weights. (Distilling towards the sample
mean would also change the target, to a smoother one, and mix two effects in one comparison.) The
variance over samples as an estimate of predictive uncertainty follows Kendall & Gal ("What
Uncertainties Do We Need in Bayesian Deep Learning for Computer Vision?", NeurIPS 2017); for diffusion
models, pixel-wise uncertainty from the spread of generated samples is studied e.g. by BayesDiff (Kou
et al., ICLR 2024).

After each call, ``last_confidence`` holds the mean weight of each group (detached scalars), which
DTKDModel logs beside ``kd_LF``/``kd_MF``/``kd_HF``.
"""
import numbers

import torch
from basicsr.utils.registry import LOSS_REGISTRY

from dtkd_loss.dwt_kd_loss import GROUPS, DWTKDLoss, check_pair, difference, no_autocast, reduce_groups

CONFIDENCE_TYPES = ('gt_agreement', 'teacher_spread')


def check_confidence(confidence, level, owner):
    """``{type: gt_agreement | teacher_spread, tau: float | [LF, MF, HF]}`` -> (type, {group: tau > 0})."""
    if not isinstance(confidence, dict):
        raise ValueError(f'{owner}: confidence must be a mapping such as {{type: gt_agreement, tau: 0.1}}, '
                         f'got {confidence!r}')
    unknown = sorted(set(confidence) - {'type', 'tau'})
    if unknown:
        raise ValueError(f'{owner}: confidence.{unknown[0]}: unknown option (known: type, tau)')
    kind = confidence.get('type')
    if kind not in CONFIDENCE_TYPES:
        raise ValueError(f'{owner}: confidence.type must be one of {", ".join(CONFIDENCE_TYPES)}, got {kind!r}')
    tau = confidence.get('tau')
    values = list(tau) if isinstance(tau, (list, tuple)) else [tau] * 3
    if len(values) != 3 or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and v > 0
                                   for v in values):
        raise ValueError(f'{owner}: confidence.tau must be a number > 0 or a list [LF, MF, HF] of them, got {tau!r}')
    taus = dict(zip(GROUPS, (float(v) for v in values)))
    if level == 1:
        del taus['MF']
    return kind, taus


def agreement_weight(distance, tau):
    """1 where ``distance <= tau``, then exp(-((distance - tau) / tau)^2): the confidence in a coefficient."""
    excess = (distance - tau).clamp(min=0) / tau
    return torch.exp(-excess.square())


@LOSS_REGISTRY.register()
class ConfidenceDWTKDLoss(DWTKDLoss):
    """DWTKDLoss with per-coefficient confidence in the teacher (see the module docstring).

    Args: as :class:`DWTKDLoss`, plus
        confidence (dict): ``{type: gt_agreement | teacher_spread, tau: <float or [LF, MF, HF]>}``.

    Called as ``loss(pred, target, gt=gt)`` (``gt_agreement``) or ``loss(pred, target,
    teacher_samples=samples)`` (``teacher_spread``): pred (student), target (teacher) and gt are
    (B, C, H, W), samples (B, K, C, H, W) with K >= 2, all RGB in [0, 1]. Without the input its
    confidence needs it raises. Returns a scalar tensor.
    """

    def __init__(self, confidence=None, **kwargs):
        super().__init__(**kwargs)
        owner = type(self).__name__
        if confidence is None:
            raise ValueError(f'{owner}: confidence is required, e.g. {{type: gt_agreement, tau: 0.1}}')
        self.confidence_type, self.tau = check_confidence(confidence, self.level, owner)
        self.last_confidence = {}

    def extra_repr(self):
        return f'{super().extra_repr()}, confidence={self.confidence_type!r}, tau={self.tau}'

    def _bands(self, diff):
        ll, highs = self.dwt(diff)
        bands = {'LF': [ll], 'HF': [highs[0]]}
        if self.level > 1:
            bands['MF'] = highs[1:]
        return bands

    def _distances(self, pred, target, gt, teacher_samples):
        """{group: [per-band distance (B, C, h, w) fed to :func:`agreement_weight`]}, without gradients."""
        owner = type(self).__name__
        if self.confidence_type == 'gt_agreement':
            if gt is None:
                raise ValueError(f'{owner}: needs the ground truth: call loss(student, teacher, gt=gt)')
            check_pair(target, gt, owner)
            bands = self._bands(difference(target.detach(), gt.detach()))
            return {name: [b.abs() for b in group] for name, group in bands.items()}
        if teacher_samples is None:
            raise ValueError(f'{owner}: confidence type teacher_spread needs K >= 2 teacher samples: call '
                             'loss(student, teacher, teacher_samples=samples) (datasets.train.teacher_samples)')
        if not isinstance(teacher_samples, torch.Tensor) or teacher_samples.dim() != 5 \
                or teacher_samples.shape[0] != target.shape[0] or teacher_samples.shape[2:] != target.shape[1:]:
            shape = tuple(teacher_samples.shape) if isinstance(teacher_samples, torch.Tensor) else teacher_samples
            raise ValueError(f'{owner}: teacher_samples must be (B, K, C, H, W) matching the teacher '
                             f'{tuple(target.shape)}, got {shape}')
        b, k = teacher_samples.shape[:2]
        if k < 2:
            raise ValueError(f'{owner}: teacher_spread needs K >= 2 teacher samples per image, got {k} '
                             '(datasets.train.teacher_samples)')
        samples = teacher_samples.detach()
        if samples.dtype in (torch.float16, torch.bfloat16):
            samples = samples.float()
        # the DWT is linear: the coefficients' deviation from their sample mean is the DWT of the
        # images' deviation from theirs
        centred = (samples - samples.mean(dim=1, keepdim=True)).flatten(0, 1)
        bands = self._bands(centred)
        return {name: [c.unflatten(0, (b, k)).square().sum(dim=1).div(k - 1).sqrt() for c in group]
                for name, group in bands.items()}

    def group_losses(self, pred, target, gt=None, teacher_samples=None):
        owner = type(self).__name__
        check_pair(pred, target, owner)
        self.dwt.check_size(pred.shape[-2], pred.shape[-1], owner)
        with no_autocast(pred.device):
            with torch.no_grad():
                distances = self._distances(pred, target, gt, teacher_samples)
            student_bands = self._bands(difference(pred, target))
        sums, counts, confidence = {}, {}, {}
        for name, bands in student_bands.items():
            weights = [agreement_weight(d, self.tau[name]) for d in distances[name]]
            sums[name] = sum((w * s.abs()).flatten(1).sum(dim=1) for w, s in zip(weights, bands))
            counts[name] = sum(s[0].numel() for s in bands)
            confidence[name] = sum(w.sum() for w in weights) / (counts[name] * pred.shape[0])
        self.last_confidence = confidence
        return reduce_groups(sums, counts, self.reduction)

    def forward(self, pred, target, gt=None, teacher_samples=None):
        terms = self.group_losses(pred, target, gt=gt, teacher_samples=teacher_samples)
        weights = self.group_weights_now(terms)
        return self.loss_weight * sum(weights[name] * terms[name] for name in terms)
