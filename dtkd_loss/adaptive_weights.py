"""Adaptive band-group weights for the DWT distillation loss (``group_weights: {type: adaptive, ...}``).

The paper fixes the LF:MF:HF weights at 1:2:1 and names this as a limit (Section 5): which bands carry
the most useful teacher signal depends on the data and the degradation. Here the weights start at the
paper's and follow how fast each group's teacher-student discrepancy falls, as in loss-balancing for
multi-task learning: Dynamic Weight Average (Liu et al., "End-to-End Multi-Task Learning with
Attention", CVPR 2019) weights a task by its recent loss ratio, and GradNorm (Chen et al., ICML 2018)
by its inverse training rate. A group the student has already matched well (its term fell the most
relative to where it started) gets less weight, one that lags gets more:

    m_g    <- momentum * m_g + (1 - momentum) * term_g          (running mean of the group's term)
    r_g     = (m_g / m_g(0)) / mean_h (m_h / m_h(0))            (relative progress; 1 = average)
    w_g     = base_g * r_g ** alpha
    w      <- w * sum(base) / sum(w)                            (the total weight stays the paper's...)
    w_g    <- clip(w_g, base_g * low, base_g * high)            (...unless a bound is reached: bounds win)

``base`` is the starting point (default the paper's [1, 2, 1]); ``alpha`` (default 1) sets how strongly
the weights react, 0 keeps them fixed. The terms are read without gradients: the weights are never a
path for gradients. The state (``m``, ``m(0)``, ``w``, the update count) lives in buffers, so it is
saved with the training state and restored on resume.
"""
import numbers

import torch
from torch import nn

ADAPTIVE_KEYS = ('type', 'base', 'alpha', 'momentum', 'low', 'high')
DEFAULTS = {'base': (1.0, 2.0, 1.0), 'alpha': 1.0, 'momentum': 0.99, 'low': 0.25, 'high': 4.0}


def _number(value, owner, key, low=None, high=None, low_open=False):
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        bound = (f' > {low}' if low_open else f' >= {low}') if low is not None else ''
        bound += f' and <= {high}' if high is not None else ''
        raise ValueError(f'{owner}: group_weights.{key} must be a number{bound}, got {value!r}')
    return float(value)


class AdaptiveGroupWeights(nn.Module):
    """The adaptive weights of the groups ``names`` (e.g. ('LF', 'MF', 'HF')); see the module docstring.

    Call :meth:`update` with the detached per-group terms of each training step, then read :meth:`weights`.
    """

    def __init__(self, names, options, owner='DWTKDLoss'):
        super().__init__()
        unknown = sorted(set(options) - set(ADAPTIVE_KEYS))
        if unknown:
            raise ValueError(f'{owner}: group_weights.{unknown[0]}: unknown option (known: {", ".join(ADAPTIVE_KEYS)})')
        opt = {**DEFAULTS, **{k: v for k, v in options.items() if k != 'type'}}
        base = list(opt['base'])
        if len(base) != 3:
            raise ValueError(f'{owner}: group_weights.base must be [LF, MF, HF], got {opt["base"]!r}')
        base = dict(zip(('LF', 'MF', 'HF'), (_number(b, owner, 'base', low=0) for b in base)))
        self.names = tuple(names)
        self.alpha = _number(opt['alpha'], owner, 'alpha', low=0)
        self.momentum = _number(opt['momentum'], owner, 'momentum', low=0, high=1)
        self.low = _number(opt['low'], owner, 'low', low=0, low_open=True)
        self.high = _number(opt['high'], owner, 'high', low=1)
        if self.low > 1:
            raise ValueError(f'{owner}: group_weights.low must be <= 1, got {self.low!r}')
        self.register_buffer('base', torch.tensor([base[n] for n in self.names], dtype=torch.float64))
        self.register_buffer('current', self.base.clone())
        self.register_buffer('running', torch.zeros(len(self.names), dtype=torch.float64))
        self.register_buffer('initial', torch.zeros(len(self.names), dtype=torch.float64))
        self.register_buffer('count', torch.zeros((), dtype=torch.long))

    def extra_repr(self):
        return (f'base={self.base.tolist()}, alpha={self.alpha}, momentum={self.momentum}, low={self.low}, '
                f'high={self.high}')

    def weights(self):
        """{group: current weight (float)}."""
        return dict(zip(self.names, self.current.tolist()))

    @torch.no_grad()
    def update(self, terms):
        """One training step's per-group terms ({group: scalar tensor}); returns the new weights."""
        values = torch.stack([terms[n].detach().double().reshape(()) for n in self.names]).to(self.running.device)
        if not torch.isfinite(values).all():
            return self.weights()  # a non-finite step is skipped by the model; do not learn from it
        if self.count == 0:
            self.running.copy_(values)
            self.initial.copy_(values.clamp(min=1e-12))
        else:
            self.running.mul_(self.momentum).add_(values, alpha=1 - self.momentum)
        self.count += 1
        progress = self.running / self.initial
        progress = progress / progress.mean().clamp(min=1e-12)
        weights = self.base * progress.clamp(min=1e-12) ** self.alpha
        total = weights.sum()
        if total > 0:
            weights = weights * (self.base.sum() / total)
        weights = torch.minimum(torch.maximum(weights, self.base * self.low), self.base * self.high)
        self.current.copy_(weights)
        return self.weights()
