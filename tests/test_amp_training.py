"""The GPU training path of DTKDModel, checked on the CPU: the fp16 gradient scaler, channels-last,
torch.compile, and the GT passed to KD losses that take it (docs/gpu_training.md).

fp16 autocast needs CUDA (tests/test_cuda.py trains with it there). The scaler's logic does not: here
the student stays fp32 and the scaler, a real ``torch.amp.GradScaler('cpu')``, is switched on by
monkeypatching ``DTKDModel._wants_grad_scaler``. An overflow is made real by a loss scale of 2**127:
the scaled gradients overflow float32 (checked before they are unscaled), as fp16 gradients overflow
at 65504 under the default scale.
"""
import copy
import logging
import shutil

import pytest
import torch
from basicsr.utils import get_root_logger
from basicsr.utils.registry import LOSS_REGISTRY

import dtkd_compat  # noqa: F401  (before basicsr)
import dtkd_data  # noqa: F401,I001
import dtkd_model  # noqa: F401
from conftest import TINY_STUDENT, train_options
from dtkd_arch.checkpoint import safe_torch_load
from dtkd_compat import OptionError
from dtkd_model.augkd_model import AugKDModel
from dtkd_model.dtkd_model import DTKDModel
from dtkd_model.options import TRAIN_KEYS, check_project_blocks
from dtkd_model.safe_training import NonFiniteError

DWT = {'type': 'DWTKDLoss', 'loss_weight': 2.0, 'level': 2, 'wavelet': 'haar', 'group_weights': [1, 2, 1]}


# ---------------------------------------------------------------------------------- helpers
def options(tmp_path, model_type='DTKDModel', kd_opt=DWT, **train):
    opt = train_options(tmp_path, 'amp', total_iter=40, kd_opt=dict(kd_opt), kd_schedule={'type': 'constant'})
    opt.update(model_type=model_type, is_train=True, dist=False, rank=0, world_size=1)
    opt['network_g'] = dict(TINY_STUDENT, type='SwinIRStudent', drop_path_rate=0.0)
    opt['path'].update(models=str(tmp_path / 'models'), training_states=str(tmp_path / 'training_states'))
    opt['train'].update(train)
    return opt


def build(opt, seed=0, cls=DTKDModel):
    torch.manual_seed(seed)
    return cls(copy.deepcopy(opt))  # BasicSR pops keys of the option blocks it reads


def batch(seed=0, size=16):
    g = torch.Generator().manual_seed(seed)
    return {'lq': torch.rand(2, 3, size, size, generator=g), 'gt': torch.rand(2, 3, 4 * size, 4 * size, generator=g),
            'teacher': torch.rand(2, 3, 4 * size, 4 * size, generator=g), 'gt_path': ['a/0001.png', 'a/0002.png']}


def weights(model):
    return {k: v.detach().clone() for k, v in model.net_g.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def set_scale(scaler, scale):
    scaler.load_state_dict({**scaler.state_dict(), 'scale': float(scale)})


class StepCalls:
    """Wraps ``optimizer_g.step`` (GradScaler.step calls it only for a step it does not skip)."""

    def __init__(self, model):
        self.grads = []
        original = model.optimizer_g.step
        params = list(model.net_g.parameters())

        def step(*args, **kwargs):
            self.grads.append([p.grad.detach().clone() for p in params])
            return original(*args, **kwargs)

        model.optimizer_g.step = step


@pytest.fixture
def log_lines():
    """Messages of BasicSR's root logger during the test."""
    logger = get_root_logger()
    lines = []

    class Handler(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    handler = Handler(logging.INFO)
    level = logger.level
    logger.setLevel(logging.INFO)  # BasicSR sets INFO only where it opens a log file
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture
def scaler_on(monkeypatch):
    """The fp16 gradient scaler on for an fp32 student (the test-only switch; fp16 autocast needs CUDA)."""
    monkeypatch.setattr(DTKDModel, '_wants_grad_scaler', lambda self: True)


# ---------------------------------------------------------------------------------- the gradient scaler
def test_only_fp16_gets_a_scaler_and_fp32_training_states_are_unchanged(tmp_path):
    assert build(options(tmp_path)).grad_scaler is None
    opt = options(tmp_path)
    opt['network_g']['precision'] = 'bf16'  # bf16 has fp32's range: no loss scaling
    model = build(opt)
    assert model.grad_scaler is None
    opt['network_g']['precision'] = 'fp16'
    fp16 = build(opt)  # built on the CPU with its scaler; its forward refuses fp16 autocast off CUDA
    assert isinstance(fp16.grad_scaler, torch.amp.GradScaler) and fp16.grad_scaler.get_scale() == 2.0 ** 16
    fp16.feed_data(batch())
    with pytest.raises(OptionError, match="network_g.precision: 'fp16' autocast needs a CUDA device"):
        fp16.optimize_parameters(1)

    model = build(options(tmp_path))
    model.save_training_state(0, 3)
    state = safe_torch_load(str(tmp_path / 'training_states' / '3.state'))
    assert sorted(state) == ['epoch', 'iter', 'optimizers', 'schedulers']  # as before: no scaler entry


def test_fp32_step_is_the_plain_backward_check_and_step(tmp_path):
    """Bit for bit: DTKDModel's fp32 step equals backward, finite_step, optimizer.step written out."""
    opt = options(tmp_path)
    model, ref = build(opt), build(opt)
    assert same(weights(model), weights(ref))
    for it in (1, 2, 3):
        data = batch(it)
        model.feed_data(data)
        model.optimize_parameters(it)

        ref.feed_data(data)
        ref.optimizer_g.zero_grad(set_to_none=True)
        out = ref.net_g(ref.lq)
        lam = ref.kd_schedule(it)
        total = ref.cri_pix(out, ref.gt) + lam * ref.cri_kd(out, ref.teacher)
        total.backward()
        assert ref.finite_step(total, {'l_total': total}, it)
        ref.optimizer_g.step()
        assert model.step_taken and 'grad_scale' not in model.log_dict
        assert same(weights(model), weights(ref)), it


def test_overflow_is_skipped_by_the_scaler_halves_the_scale_and_is_not_counted(tmp_path, scaler_on, log_lines):
    model = build(options(tmp_path))
    scaler = model.grad_scaler
    assert isinstance(scaler, torch.amp.GradScaler)
    calls = StepCalls(model)
    seen = {}
    unscale = scaler.unscale_

    def recording_unscale(optimizer):
        seen['finite'] = all(bool(torch.isfinite(p.grad).all()) for p in model.net_g.parameters()
                             if p.grad is not None)
        return unscale(optimizer)

    scaler.unscale_ = recording_unscale
    set_scale(scaler, 2.0 ** 127)
    before = weights(model)
    model.feed_data(batch(1))
    model.optimize_parameters(1)

    assert seen['finite'] is False  # the scaled gradients did overflow
    assert not model.step_taken and calls.grads == []  # no optimizer step
    assert same(weights(model), before)
    assert scaler.get_scale() == 2.0 ** 126  # halved
    state = model._nonfinite_state()
    assert (state['run'], state['skipped'], state['scaler_skipped']) == (0, 0, 1)  # not a non-finite step
    assert all(p.grad is None for p in model.net_g.parameters())
    assert model.log_dict['grad_scale'] == 2.0 ** 127
    assert any('iter 1: fp16 gradient overflow at loss scale 1.70141e+38' in line and 'not counted' in line
               for line in log_lines)
    assert not any('non-finite' in line and 'step skipped' in line for line in log_lines)


def test_a_taken_step_sees_the_unscaled_gradients(tmp_path, scaler_on):
    """With a power-of-two scale, scaling and unscaling are exact: the optimizer gets the fp32 gradients."""
    opt = options(tmp_path)
    model = build(opt)
    calls = StepCalls(model)
    set_scale(model.grad_scaler, 2.0 ** 10)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(DTKDModel, '_wants_grad_scaler', lambda self: False)
        ref = build(opt)
    ref_calls = StepCalls(ref)
    for m in (model, ref):
        m.feed_data(batch(2))
        m.optimize_parameters(2)
    assert model.step_taken and len(calls.grads) == 1 and len(ref_calls.grads) == 1
    for g, g_ref in zip(calls.grads[0], ref_calls.grads[0]):
        torch.testing.assert_close(g, g_ref, rtol=1e-6, atol=0)
    assert model.grad_scaler.get_scale() == 2.0 ** 10  # no overflow; growth only after 2000 good steps
    assert model._nonfinite_state()['scaler_skipped'] == 0


def test_a_nonfinite_loss_is_counted_and_leaves_the_scaler_alone(tmp_path, scaler_on):
    model = build(options(tmp_path))
    calls = StepCalls(model)
    data = batch(3)
    data['teacher'][0, 0, 0, 0] = float('nan')
    model.feed_data(data)
    model.optimize_parameters(1)
    state = model._nonfinite_state()
    assert not model.step_taken and calls.grads == []
    assert (state['run'], state['skipped'], state['scaler_skipped']) == (1, 1, 0)
    assert model.grad_scaler.get_scale() == 2.0 ** 16  # no unscale, no update
    model.feed_data(batch(4))
    model.optimize_parameters(2)  # the scaler was not left half-way (unscaled but not updated)
    assert model.step_taken and len(calls.grads) == 1 and state['run'] == 0


def test_persistent_nan_gradients_stop_training_once_the_scale_is_below_one(tmp_path, scaler_on):
    """A finite loss with NaN gradients is an 'overflow' at every scale: the scaler halves its scale each time;
    below scale 1 (not an fp16 range problem any more) each one counts, and the limit stops training."""
    model = build(options(tmp_path, max_nonfinite_steps=2))
    model.net_g.conv_first.weight.register_hook(lambda g: g * float('nan'))
    set_scale(model.grad_scaler, 4.0)
    state = model._nonfinite_state()
    for it, scale in zip((1, 2, 3), (4.0, 2.0, 1.0)):
        model.feed_data(batch(it))
        model.optimize_parameters(it)
        assert not model.step_taken and state['run'] == 0 and model.grad_scaler.get_scale() == scale / 2
    model.feed_data(batch(4))
    model.optimize_parameters(4)  # at scale 0.5: counted
    assert (state['run'], state['skipped'], state['scaler_skipped']) == (1, 1, 4)
    model.feed_data(batch(5))
    with pytest.raises(NonFiniteError, match=r'iter 5: 2 consecutive.*overflow at gradient scale 0.25'):
        model.optimize_parameters(5)


def test_the_scaler_state_is_saved_and_restored_on_resume(tmp_path, scaler_on, log_lines):
    opt = options(tmp_path)
    model = build(opt)
    set_scale(model.grad_scaler, 2.0 ** 127)
    model.feed_data(batch(1))
    model.optimize_parameters(1)  # overflow: 2**126
    model.feed_data(batch(2))
    set_scale(model.grad_scaler, 2.0 ** 12)
    model.optimize_parameters(2)  # a good step: growth tracker 1
    saved = model.grad_scaler.state_dict()
    assert saved['scale'] == 2.0 ** 12 and saved['_growth_tracker'] == 1
    model.save_training_state(0, 2)

    state = safe_torch_load(str(tmp_path / 'training_states' / '2.state'), what='training state')  # as the runner
    assert state['grad_scaler'] == saved
    resumed = build(opt, seed=1)
    assert resumed.grad_scaler.get_scale() == 2.0 ** 16
    resumed.resume_training(state)
    assert resumed.grad_scaler.state_dict() == saved
    assert any('Resumed the fp16 gradient scaler at loss scale 4096' in line for line in log_lines)

    # an fp32 run's state resumed with fp16: a fresh scaler; an fp16 state resumed in fp32: ignored
    del state['grad_scaler']
    fresh = build(opt)
    fresh.resume_training(state)
    assert fresh.grad_scaler.get_scale() == 2.0 ** 16
    state['grad_scaler'] = saved
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(DTKDModel, '_wants_grad_scaler', lambda self: False)
        plain = build(opt)
    plain.resume_training(state)
    assert plain.grad_scaler is None


def test_augkd_both_steps_go_through_the_scaler(tmp_path, scaler_on):
    opt = options(tmp_path, model_type='AugKDModel', kd_opt={'type': 'L1Loss', 'loss_weight': 1.0})
    opt['train']['augkd_opt'] = {'label_source': 'cached', 'crop_size': 8}
    model = build(opt, cls=AugKDModel)
    calls = StepCalls(model)
    model.feed_data(batch(1))
    model.optimize_parameters(1)
    assert len(calls.grads) == 2  # main and auxiliary steps taken
    hook = model.net_g.conv_first.weight.register_hook(lambda g: g * float('nan'))  # NaN gradients, finite loss
    model.feed_data(batch(2))
    model.optimize_parameters(2)
    hook.remove()
    assert len(calls.grads) == 2  # both steps skipped by the scaler, each halving the scale
    assert model.grad_scaler.get_scale() == 2.0 ** 14
    state = model._nonfinite_state()
    assert (state['run'], state['skipped'], state['scaler_skipped']) == (0, 0, 2)


# ---------------------------------------------------------------------------------- channels-last
def test_channels_last_is_ignored_on_the_cpu(tmp_path, log_lines):
    model = build(options(tmp_path, channels_last=True))
    assert model.net_g.conv_first.weight.is_contiguous()
    model.feed_data(batch())
    assert model.lq.is_contiguous()
    assert any('train.channels_last: ignored on cpu' in line for line in log_lines)


def test_channels_last_converts_the_student_and_its_inputs(tmp_path, monkeypatch):
    """The CUDA-only conversion forced on the CPU: same computation, channels_last layout, plain checkpoints."""
    opt = options(tmp_path, channels_last=True)
    ref = build(opt)
    monkeypatch.setattr(DTKDModel, '_channels_last', lambda self: True)
    model = build(opt)
    conv = model.net_g.conv_first.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    model.feed_data(batch(1))
    assert model.lq.is_contiguous(memory_format=torch.channels_last) and not model.lq.is_contiguous()
    model.optimize_parameters(1)
    ref.feed_data(batch(1))
    ref.optimize_parameters(1)
    torch.testing.assert_close(model.output, ref.output, rtol=1e-5, atol=1e-6)
    model.save_network(model.net_g, 'net_g', 1)
    saved = safe_torch_load(str(tmp_path / 'models' / 'net_g_1.pth'))['params']
    assert list(saved) == list(ref.net_g.state_dict())
    assert all(v.is_contiguous() for v in saved.values())


# ---------------------------------------------------------------------------------- the GT for KD losses
class GTKDLoss(torch.nn.Module):
    """A KD loss that takes the GT (as confidence-aware losses do); it records what it is given."""

    calls = []

    def __init__(self, loss_weight=1.0):
        super().__init__()
        self.loss_weight = loss_weight

    def forward(self, pred, target, gt=None):
        type(self).calls.append(gt)
        return self.loss_weight * (pred - target).abs().mean()


class KwargsKDLoss(GTKDLoss):
    calls = []

    def forward(self, pred, target, **kwargs):
        type(self).calls.append(kwargs.get('gt'))
        return self.loss_weight * (pred - target).abs().mean()


class PlainKDLoss(GTKDLoss):
    calls = []

    def forward(self, pred, target):  # a gt keyword would be a TypeError
        type(self).calls.append(None)
        return self.loss_weight * (pred - target).abs().mean()


for _cls in (GTKDLoss, KwargsKDLoss, PlainKDLoss):
    if _cls.__name__ not in LOSS_REGISTRY:
        LOSS_REGISTRY.register(_cls)


@pytest.mark.parametrize('cls, gets_gt', [(GTKDLoss, True), (KwargsKDLoss, True), (PlainKDLoss, False)])
def test_the_gt_is_passed_to_kd_losses_that_take_it(tmp_path, cls, gets_gt):
    cls.calls.clear()
    model = build(options(tmp_path, kd_opt={'type': cls.__name__, 'loss_weight': 1.0}))
    assert model.kd_takes_gt is gets_gt
    model.feed_data(batch(1))
    model.optimize_parameters(1)
    assert len(cls.calls) == 1
    if gets_gt:
        assert cls.calls[0] is model.gt
    else:
        assert cls.calls[0] is None


# ---------------------------------------------------------------------------------- options
def test_the_new_train_switches_are_known_and_must_be_booleans(tmp_path):
    def file_options(**train):  # as read from an option file (the runner adds is_train, dist, ...)
        opt = options(tmp_path, **train)
        for key in ('is_train', 'dist', 'rank', 'world_size'):
            del opt[key]
        return opt

    assert {'channels_last', 'compile'} <= set(TRAIN_KEYS)
    for key in ('channels_last', 'compile'):
        for good in (True, False):
            check_project_blocks(file_options(**{key: good}), True)
        for bad in ('yes', 1, None):
            with pytest.raises(OptionError, match=rf'train\.{key}: expected true or false, got'):
                check_project_blocks(file_options(**{key: bad}), True)
    with pytest.raises(OptionError, match="train.compiled: unknown option; did you mean 'compile'"):
        check_project_blocks(file_options(compiled=True), True)


# ---------------------------------------------------------------------------------- torch.compile
@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which('g++') or shutil.which('c++')),
                    reason="torch.compile's inductor backend needs a C++ compiler (g++ or c++) on PATH for CPU code")
def test_compile_trains_like_eager_logs_its_time_and_keeps_checkpoint_keys(tmp_path, log_lines):
    opt = options(tmp_path / 'eager')
    eager = build(opt)
    eager_calls = StepCalls(eager)
    copt = options(tmp_path / 'compiled', compile=True)
    compiled = build(copt)
    calls = StepCalls(compiled)
    assert compiled.net_g_compiled is not None and compiled.net_g_compiled is not compiled.net_g
    for it in (1, 2):
        for m in (eager, compiled):
            m.feed_data(batch(it))
            m.optimize_parameters(it)
        torch.testing.assert_close(compiled.output, eager.output, rtol=1e-4, atol=1e-5)
    for grads, ref in zip(calls.grads, eager_calls.grads):
        for g, g_ref in zip(grads, ref):
            assert (g - g_ref).abs().max() <= 1e-3 * g_ref.abs().max() + 1e-7
    timed = [line for line in log_lines if 'compiled the student in' in line]
    assert len(timed) == 1 and timed[0].startswith('train.compile: compiled the student in ')

    eager.save_network(eager.net_g, 'net_g', 2)
    compiled.save_network(compiled.net_g, 'net_g', 2)
    keys = list(safe_torch_load(str(tmp_path / 'eager' / 'models' / 'net_g_2.pth'))['params'])
    ckpt = safe_torch_load(str(tmp_path / 'compiled' / 'models' / 'net_g_2.pth'))['params']
    assert list(ckpt) == keys and not any('_orig_mod' in k for k in ckpt)
    compiled.test()  # validation runs the uncompiled module (any image size, no recompilation)
    assert compiled.output.shape == (2, 3, 64, 64)
