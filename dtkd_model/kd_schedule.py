"""Schedule of the distillation weight lambda_KD(t) (DTKD paper, Section 3.5 and Table 7).

The paper starts the KD weight at zero and raises it linearly to its final value over training:
``lambda_KD(t) = t / T * lambda_KD`` for 1 <= t <= T (0 at t = 0). The option block
``train.kd_schedule`` selects the shape and the window:

.. code-block:: yaml

    train:
      kd_schedule:
        type: linear      # linear (paper) | constant | cosine
        start_iter: 0     # weight is 0 before this iteration
        end_iter: ~       # final weight from this iteration on; default: train.total_iter

Pure Python on purpose (no torch, no basicsr): ``dtkd_model`` auto-imports only ``*_model.py``, so
users import this module explicitly.
"""
import math
import numbers
from collections.abc import Mapping

TYPES = ('linear', 'constant', 'cosine')
KEYS = ('type', 'start_iter', 'end_iter')
_PREFIX = 'train.kd_schedule'


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


class KDWeightSchedule:
    """lambda_KD(t) as a function of the training iteration t (basicsr counts iterations from 1).

    With progress ``p = (t - start_iter) / (end_iter - start_iter)``:

    * linear:   0 for t < start_iter, ``final * p`` in between, ``final`` for t >= end_iter
      (the paper's schedule with start_iter = 0, end_iter = T),
    * cosine:   0 for t < start_iter, ``final * (1 - cos(pi * p)) / 2`` in between, ``final`` after,
    * constant: 0 for t < start_iter, ``final`` from start_iter on (the paper's fixed-weight row of
      Table 7 with start_iter = 0; end_iter is not used).

    Args:
        kind (str): 'linear', 'constant' or 'cosine'.
        final_weight (float): lambda_KD reached at end_iter (>= 0).
        start_iter (int): >= 0.
        end_iter (int): > start_iter.
    """

    def __init__(self, kind, final_weight, start_iter, end_iter):
        if kind not in TYPES:
            raise ValueError(f'{_PREFIX}.type: expected one of {", ".join(TYPES)}, got {kind!r}')
        if not isinstance(final_weight, numbers.Real) or isinstance(final_weight, bool) \
                or not math.isfinite(final_weight) or final_weight < 0:
            raise ValueError(f'final_weight (the KD loss weight lambda_KD): expected a finite number >= 0, '
                             f'got {final_weight!r}')
        for key, value in (('start_iter', start_iter), ('end_iter', end_iter)):
            if not _is_int(value) or value < 0:
                raise ValueError(f'{_PREFIX}.{key}: expected an integer >= 0, got {value!r}')
        if end_iter <= start_iter:
            raise ValueError(f'{_PREFIX}.end_iter: expected an iteration after start_iter ({start_iter}), '
                             f'got {end_iter}')
        self.kind = kind
        self.final_weight = float(final_weight)
        self.start_iter = int(start_iter)
        self.end_iter = int(end_iter)

    @classmethod
    def from_options(cls, schedule_opt, final_weight, total_iter):
        """Build from the ``train.kd_schedule`` block.

        Args:
            schedule_opt (dict | None): keys type (default 'linear'), start_iter (default 0),
                end_iter (default total_iter); None gives the paper's linear ramp over [0, total_iter].
            final_weight (float): the final KD weight lambda_KD.
            total_iter (int): ``train.total_iter`` (> 0).
        """
        if not _is_int(total_iter) or total_iter <= 0:
            raise ValueError(f'train.total_iter: expected an integer > 0, got {total_iter!r}')
        if schedule_opt is None:
            schedule_opt = {}
        if not isinstance(schedule_opt, Mapping):
            raise ValueError(f'{_PREFIX}: expected a mapping with keys {", ".join(KEYS)} (or null), '
                             f'got {type(schedule_opt).__name__} {schedule_opt!r}')
        unknown = sorted(str(key) for key in schedule_opt if key not in KEYS)
        if unknown:
            raise ValueError(f'{_PREFIX}: unknown key(s) {", ".join(unknown)}; expected {", ".join(KEYS)}')
        end_iter = schedule_opt.get('end_iter')
        return cls(kind=schedule_opt.get('type', 'linear'), final_weight=final_weight,
                   start_iter=schedule_opt.get('start_iter', 0),
                   end_iter=total_iter if end_iter is None else end_iter)

    def __call__(self, current_iter):
        """lambda_KD at ``current_iter`` (integer >= 0) as a float."""
        if not isinstance(current_iter, numbers.Real) or isinstance(current_iter, bool) or current_iter < 0:
            raise ValueError(f'KDWeightSchedule: current_iter must be a number >= 0, got {current_iter!r}')
        if current_iter < self.start_iter:
            return 0.0
        if self.kind == 'constant' or current_iter >= self.end_iter:
            return self.final_weight
        progress = (current_iter - self.start_iter) / (self.end_iter - self.start_iter)
        if self.kind == 'linear':
            return self.final_weight * progress
        return self.final_weight * (1.0 - math.cos(math.pi * progress)) / 2.0

    def __repr__(self):
        return (f'KDWeightSchedule(type={self.kind!r}, final_weight={self.final_weight}, '
                f'start_iter={self.start_iter}, end_iter={self.end_iter})')
