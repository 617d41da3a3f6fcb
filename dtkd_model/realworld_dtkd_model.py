"""RealWorldDTKDModel: DTKD on real-world degradations, the teacher online on the student's own LQ.

The training batch holds GT squares only (``RealWorldGTDataset``). At each iteration the LQ is made
from them by Real-ESRGAN's second-order degradation with ResShift's parameters (top-level
``degradation`` block, :mod:`dtkd_data.realworld_degradation`), and the online teacher (``teacher``
block, e.g. SinSR one step or ResShift v3 four steps) super-resolves exactly that LQ batch, in one
batched call without gradients, for the distillation loss of :class:`DTKDModel`. Validation and test
batches come with their LQ and are used as they are.

Reproducibility: the degradation of iteration t draws from generators seeded by (``manual_seed``,
t, rank), and the teacher's noise for image i from a CPU generator seeded by (``manual_seed``, t,
rank, i): the LQ and the teacher targets of an iteration depend only on its GT batch, whatever the
loader workers or the point a run was resumed from.

``teacher.precision``: ``auto`` (default here) runs the teacher in bf16 autocast on CUDA and in fp32 on
the CPU; ``fp32`` / ``bf16`` / ``fp16`` force one.
"""
import torch
from basicsr.utils.registry import MODEL_REGISTRY

from dtkd_data.realworld_degradation import RealESRGANDegradation, key_seed
from dtkd_model.dtkd_model import DTKDModel

_TEACHER_STREAM = 1  # key component that separates the teacher's noise from the degradation's draws


@MODEL_REGISTRY.register()
class RealWorldDTKDModel(DTKDModel):
    """DTKD with on-the-fly Real-ESRGAN degradations and an online teacher (see the module docstring)."""

    def __init__(self, opt):
        self.degradation = RealESRGANDegradation(opt.get('degradation'), opt.get('scale'))
        self._pending_gt = None
        self._iter = None
        super().__init__(opt)

    def _build_online_teacher(self, teacher_opt):
        precision = teacher_opt.get('precision', 'auto')
        if precision == 'auto':
            precision = 'bf16' if self.device.type == 'cuda' else 'fp32'
        return super()._build_online_teacher(dict(teacher_opt, precision=precision))

    def _key(self, *rest):
        return key_seed(int(self.opt.get('manual_seed') or 0), *rest, int(self.opt.get('rank', 0)))

    # ------------------------------------------------------------------ data
    def feed_data(self, data):
        """Batches with an ``lq`` (validation, test) as in DTKDModel; GT-only training batches are kept
        for :meth:`optimize_parameters`, which knows the iteration that seeds their degradation."""
        if 'lq' in data:
            self._pending_gt = None
            super().feed_data(data)
            return
        self._pending_gt = data['gt']
        self.teacher = None
        self.teacher_samples = None

    def degrade(self, current_iter):
        """Make ``self.gt`` / ``self.lq`` for iteration ``current_iter`` from the pending GT batch."""
        gt = self._pending_gt.to(self.device, non_blocking=True)
        self._pending_gt = None
        self.gt, self.lq = self.degradation(gt, self._key(current_iter))
        if self._channels_last():
            self.lq = self.lq.contiguous(memory_format=torch.channels_last)

    # ------------------------------------------------------------------ training
    def optimize_parameters(self, current_iter):
        self._iter = current_iter
        if self._pending_gt is not None:
            self.degrade(current_iter)
        super().optimize_parameters(current_iter)

    def get_teacher_output(self):
        """The online teacher's SR of this iteration's LQ batch, image i with its own seeded noise."""
        if self.teacher is not None or self.online_teacher is None or self._iter is None:
            return super().get_teacher_output()
        generators = [torch.Generator().manual_seed(self._key(self._iter, _TEACHER_STREAM, i))
                      for i in range(self.lq.shape[0])]
        with torch.no_grad():
            self.teacher = self.online_teacher.sample(self.lq, generator=generators).to(self.output.dtype)
        return self.teacher
