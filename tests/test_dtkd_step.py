"""One training step of DTKDModel / AugKDModel against the paper's loss written out in this file.

DTKD (Section 3.4-3.5): L(t) = L1(S(lq), gt) + lambda(t) * L_DWT(S(lq), T), with

    L_DWT = sum_g w_g * (1 / N_g) * sum |W_g(S) - W_g(T)|,   g in (LF, MF, HF), w = (1, 2, 1),

W a two-level orthonormal Haar DWT applied to every colour channel on its own, LF = LL2,
MF = (LH2, HL2, HH2), HF = (LH1, HL1, HH1), and N_g the number of coefficients of group g in the
batch (images x channels x sub-bands x positions pooled), as ``dtkd_loss/dwt_kd_loss.py`` documents.
The Haar transform below is written out on 2 x 2 blocks (neither the project's DWT nor
pytorch_wavelets). Training patches are even-sized (32 x 32 and 64 x 64 here), and for even sizes
the Haar transform needs no boundary extension, so every boundary mode of DWTKDLoss ('symmetric'
by default) gives these coefficients.

The model is switched to float64 (network weights and the batch), so its gradients and the
reference gradients agree to ~1e-15 relative; the comparison tolerance (1e-9) is orders of
magnitude below what a dropped or re-weighted term changes, which each test also checks against
mis-specified references (KD term dropped, equal group weights, the wrong lambda). The gradients
are read inside ``optimizer_g.step`` (wrapped), i.e. exactly what the optimizer receives.

The student is the paper's ``SwinIRStudent`` at a tiny size (the tests' ``TINY_STUDENT`` sizes) with
stochastic depth off (``drop_path_rate: 0``), so it is a deterministic function of its weights and
the reference forward pass equals the model's.
"""
import copy

import pytest
import torch

import dtkd_compat  # noqa: F401  (before basicsr)
import dtkd_data  # noqa: F401,I001  (registers PairedTeacherDataset)
import dtkd_model  # noqa: F401
from conftest import TINY_STUDENT, train_options
from dtkd_data.paired_teacher_dataset import PairedTeacherDataset
from dtkd_model.augkd_model import AugKDModel
from dtkd_model.dtkd_model import DTKDModel

FINAL_LAMBDA = 2.0
START, END = 10, 30  # kd_schedule window: lambda = 0 before START, linear ramp to FINAL_LAMBDA at END
# (iteration, lambda(t) of the paper's linear schedule, written out)
ITERATIONS = [(5, 0.0), (20, 1.0), (30, 2.0), (37, 2.0)]
GROUP_WEIGHTS = {'LF': 1.0, 'MF': 2.0, 'HF': 1.0}
DWT = {'type': 'DWTKDLoss', 'loss_weight': FINAL_LAMBDA, 'level': 2, 'wavelet': 'haar', 'group_weights': [1, 2, 1]}
RTOL = 1e-9


# ---------------------------------------------------------------------------------- the reference loss
def haar_level(x):
    """One orthonormal 2-D Haar level on 2 x 2 blocks: (LL, [LH, HL, HH]), each (B, C, H/2, W/2).

    Signs of the detail bands differ between conventions; the loss uses absolute values only.
    """
    assert x.shape[-2] % 2 == 0 and x.shape[-1] % 2 == 0, 'even sizes: no boundary extension'
    a, b = x[..., 0::2, 0::2], x[..., 0::2, 1::2]
    c, d = x[..., 1::2, 0::2], x[..., 1::2, 1::2]
    return (a + b + c + d) / 2, [(a + b - c - d) / 2, (a - b + c - d) / 2, (a - b - c + d) / 2]


def haar_groups(x):
    """{'LF': [LL2], 'MF': [LH2, HL2, HH2], 'HF': [LH1, HL1, HH1]} of a (B, C, H, W) batch."""
    ll1, details1 = haar_level(x)
    ll2, details2 = haar_level(ll1)
    return {'LF': [ll2], 'MF': details2, 'HF': details1}


def dwt_kd(student, teacher, weights=None):
    """sum_g w_g * mean over group g's coefficients of |W_g(student) - W_g(teacher)|."""
    weights = GROUP_WEIGHTS if weights is None else weights
    ws, wt = haar_groups(student), haar_groups(teacher)
    total = 0.0
    for group, weight in weights.items():
        abs_sum = sum((s - t).abs().sum() for s, t in zip(ws[group], wt[group]))
        count = sum(s.numel() for s in ws[group])
        total = total + weight * abs_sum / count
    return total


def l1(a, b):
    return (a - b).abs().mean()


def lambda_of(it):
    """The linear kd_schedule with start_iter START, end_iter END, final weight FINAL_LAMBDA."""
    if it < START:
        return 0.0
    return FINAL_LAMBDA * min(1.0, (it - START) / (END - START))


def test_reference_haar_is_orthonormal_and_lambda_table_is_the_schedule():
    """Self-checks of the reference: energy is preserved (orthonormal), a constant image has only LF,
    and the iteration table matches the schedule formula."""
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    groups = haar_groups(x)
    energy = sum(band.pow(2).sum() for bands in groups.values() for band in bands)
    torch.testing.assert_close(energy, x.pow(2).sum(), rtol=1e-12, atol=0)
    const = haar_groups(torch.full((1, 1, 8, 8), 0.5, dtype=torch.float64))
    torch.testing.assert_close(const['LF'][0], torch.full((1, 1, 2, 2), 2.0, dtype=torch.float64))  # 2**J * mean
    assert all(bool((band == 0).all()) for g in ('MF', 'HF') for band in const[g])
    for it, lam in ITERATIONS:
        assert lambda_of(it) == lam


# ---------------------------------------------------------------------------------- model and batch
def student_options():
    return dict(TINY_STUDENT, type='SwinIRStudent', drop_path_rate=0.0)


def model_options(tiny_pairs, model_type='DTKDModel', gt_size=32, augkd=None):
    opt = train_options(tiny_pairs, 'step', total_iter=40, kd_opt=dict(DWT),
                        kd_schedule={'type': 'linear', 'start_iter': START, 'end_iter': END})
    opt.update(model_type=model_type, is_train=True, dist=False, rank=0, world_size=1)
    opt['network_g'] = student_options()
    opt['datasets']['train']['gt_size'] = gt_size
    if augkd is not None:
        opt['train']['augkd_opt'] = augkd
    return opt


def cached_batch(opt, seed):
    """Two training samples (GT patch, LQ patch, cached teacher patch) from PairedTeacherDataset, float64."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    dataset = PairedTeacherDataset(dict(opt['datasets']['train'], phase='train', scale=4))
    items = [dataset[i] for i in (seed % len(dataset), (seed + 1) % len(dataset))]
    batch = {key: torch.stack([item[key] for item in items]).double() for key in ('lq', 'gt', 'teacher')}
    batch['gt_path'] = [item['gt_path'] for item in items]
    assert not batch['teacher'].requires_grad
    assert not torch.equal(batch['teacher'], batch['gt'])  # the teacher is its own image, not the GT
    return batch


def build(model_cls, opt, seed=0):
    torch.manual_seed(seed)
    model = model_cls(opt)
    model.net_g.double()  # in place: the optimizer keeps the same Parameter objects
    return model


class StepRecorder:
    """Wraps ``optimizer_g.step``: per call, the gradients it sees and the weights it starts from."""

    def __init__(self, model):
        self.calls = []
        self.params = list(model.net_g.parameters())
        original = model.optimizer_g.step

        def step(*args, **kwargs):
            self.calls.append({
                'grads': [None if p.grad is None else p.grad.detach().clone() for p in self.params],
                'weights': [p.detach().clone() for p in self.params],
            })
            return original(*args, **kwargs)

        model.optimizer_g.step = step


def network_at(model, weights):
    """A float64 copy of the student with the given weights (the model's own network is not touched)."""
    net = copy.deepcopy(model.net_g)
    with torch.no_grad():
        for p, w in zip(net.parameters(), weights):
            p.copy_(w)
    net.zero_grad(set_to_none=True)
    return net


def reference_grads(net, loss):
    grads = torch.autograd.grad(loss, list(net.parameters()), allow_unused=True, retain_graph=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(net.parameters(), grads)]


def assert_grads_equal(got, want, what):
    scale = max(float(g.abs().max()) for g in want)
    assert scale > 0, what
    for i, (g, w) in enumerate(zip(got, want)):
        assert g is not None, f'{what}: parameter {i} got no gradient'
        diff = float((g - w).abs().max())
        assert diff <= RTOL * scale, f'{what}: parameter {i} differs by {diff:.3e} (gradient scale {scale:.3e})'


def max_rel_diff(got, want):
    scale = max(float(g.abs().max()) for g in want)
    return max(float((g - w).abs().max()) for g, w in zip(got, want)) / scale


def assert_sharp(got, wrong_refs, what):
    """The model's gradients are far (>= 1e-3 relative, i.e. 10^6 x the tolerance) from each mis-specified loss."""
    for name, wrong in wrong_refs.items():
        assert max_rel_diff(got, wrong) > 1e-3, f'{what}: indistinguishable from the reference with {name}'


def main_loss_refs(net, batch, lam):
    """(the paper's loss, {name: a mis-specified loss}) for one batch, all differentiable in ``net``."""
    out = net(batch['lq'])
    l_task = l1(out, batch['gt'])
    kd = dwt_kd(out, batch['teacher'])
    right = l_task + lam * kd
    wrong = {
        'the KD term dropped': l_task,
        'equal group weights': l_task + lam * dwt_kd(out, batch['teacher'], {'LF': 1.0, 'MF': 1.0, 'HF': 1.0}),
        'lambda = final weight': l_task + FINAL_LAMBDA * kd,
        'lambda = half of it': l_task + 0.5 * lam * kd,
    }
    return right, kd, wrong


# ---------------------------------------------------------------------------------- DTKDModel
@pytest.mark.parametrize('it, lam', ITERATIONS, ids=[f'iter{it}-lambda{lam:g}' for it, lam in ITERATIONS])
def test_dtkd_step_gradient_is_l1_plus_scheduled_dwt_kd(tiny_pairs, it, lam):
    opt = model_options(tiny_pairs)
    model = build(DTKDModel, opt)
    batch = cached_batch(opt, seed=it)
    teacher_before = batch['teacher'].clone()
    recorder = StepRecorder(model)
    model.feed_data(batch)
    model.optimize_parameters(it)

    assert len(recorder.calls) == 1 and model.step_taken
    call = recorder.calls[0]
    net = network_at(model, call['weights'])
    right, kd, wrong = main_loss_refs(net, batch, lam)
    want = reference_grads(net, right)
    assert_grads_equal(call['grads'], want, f'iter {it}')
    if lam == 0:  # the teacher must not enter the gradient (the KD term is computed, for the log, but not added)
        wrong = {'lambda = final weight': wrong['lambda = final weight']}
    elif lam == FINAL_LAMBDA:
        del wrong['lambda = final weight']
    assert_sharp(call['grads'], {name: reference_grads(net, loss) for name, loss in wrong.items()}, f'iter {it}')

    log = model.get_current_log()
    assert log['lambda_kd'] == pytest.approx(lam, abs=1e-12)
    assert log['l_kd'] == pytest.approx(kd.item(), rel=1e-9)  # logged unweighted (print_freq 1)
    # the teacher is data: no gradient, not modified
    assert model.teacher is not None and not model.teacher.requires_grad and model.teacher.grad is None
    assert torch.equal(model.teacher, teacher_before)
    assert not batch['teacher'].requires_grad and batch['teacher'].grad is None


# ---------------------------------------------------------------------------------- AugKDModel
ZOOM_IN, ZOOM_OUT_PIX, CROP = 0.7, 0.3, 8
ALL_OPS = ['invert', 'flip_lr', 'flip_ud', 'transpose']


def g(x):
    """AugKD's invertible augmentation with every op on (prob 1): invert, flip LR, flip UD, transpose."""
    return (1.0 - x).flip(-1).flip(-2).transpose(-2, -1)


def g_inverse(y):
    return 1.0 - y.transpose(-2, -1).flip(-2).flip(-1)


@pytest.mark.parametrize('it, lam', ITERATIONS[:3], ids=[f'iter{it}-lambda{lam:g}' for it, lam in ITERATIONS[:3]])
def test_augkd_steps_are_the_main_loss_then_the_auxiliary_loss(tiny_pairs, it, lam):
    """AugKD (cached labels): step 1 = the DTKD loss above; step 2, from the weights step 1 left,
    = zoom_in_weight * L_DWT(g^-1(S(g(crop))), T[aligned crop]) + zoom_out_pix_weight * L1(S(down(lq)), lq)
    at unit KD weight (no lambda), g every invertible op (consistency prob 1), down = MATLAB bicubic x1/4."""
    from basicsr.utils.matlab_functions import imresize

    opt = model_options(tiny_pairs, 'AugKDModel', gt_size=64, augkd={
        'label_source': 'cached', 'zoom_in_weight': ZOOM_IN, 'zoom_out_pix_weight': ZOOM_OUT_PIX,
        'crop_size': CROP, 'consistency': {'prob': 1.0, 'ops': ALL_OPS}})
    model = build(AugKDModel, opt)
    assert model.label_source == 'cached'
    batch = cached_batch(opt, seed=it)
    assert batch['lq'].shape[-2:] == (16, 16)
    teacher_before = batch['teacher'].clone()
    recorder = StepRecorder(model)
    inputs = []  # what the student network is run on, in order
    hook = model.net_g.register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach().clone()))
    model.feed_data(batch)
    model.optimize_parameters(it)
    hook.remove()  # (network_at copies the network, hooks included)
    assert len(recorder.calls) == 2, 'AugKD takes two optimizer steps per iteration (official)'

    # step 1: the DTKD loss at lambda(t)
    net = network_at(model, recorder.calls[0]['weights'])
    right, _, wrong = main_loss_refs(net, batch, lam)
    assert_grads_equal(recorder.calls[0]['grads'], reference_grads(net, right), f'AugKD main step, iter {it}')
    if lam > 0:
        dropped = reference_grads(net, wrong['the KD term dropped'])
        assert_sharp(recorder.calls[0]['grads'], {'the KD term dropped': dropped}, 'AugKD main step')

    # step 2: weights after step 1; the zoom-in crop's position is read from the student's input
    weights = recorder.calls[1]['weights']
    assert any(not torch.equal(a, b) for a, b in zip(weights, recorder.calls[0]['weights']))
    assert len(inputs) == 3  # main, zoom-in (consistency), zoom-out
    crop = g_inverse(inputs[1])
    lq = batch['lq']
    found = [(top, left) for top in range(16 - CROP + 1) for left in range(16 - CROP + 1)
             if torch.equal(lq[..., top:top + CROP, left:left + CROP], crop)]
    assert len(found) == 1, 'the zoom-in input is g(an aligned LR crop of the batch)'
    top, left = found[0]
    label = batch['teacher'][..., 4 * top:4 * (top + CROP), 4 * left:4 * (left + CROP)]
    down = torch.stack([imresize(img, 0.25) for img in lq]).double()  # BasicSR's MATLAB bicubic (float32 inside)
    # the 4x4 zoom-out input reaches the network reflect-padded to the window (8x8); its output is cropped back
    padded_down = inputs[2]
    assert padded_down.shape[-2:] == (8, 8)
    torch.testing.assert_close(padded_down[..., :4, :4], down, rtol=0, atol=0)

    net = network_at(model, weights)
    zoom_in_pred = g_inverse(net(g(crop)))
    zoom_in_kd = dwt_kd(zoom_in_pred, label)
    zoom_out_pix = l1(net(padded_down)[..., :16, :16], lq)
    aux = ZOOM_IN * zoom_in_kd + ZOOM_OUT_PIX * zoom_out_pix
    assert_grads_equal(recorder.calls[1]['grads'], reference_grads(net, aux), f'AugKD auxiliary step, iter {it}')
    equal_weights = dict.fromkeys(GROUP_WEIGHTS, 1.0)
    wrong = {
        'the zoom-in term dropped': ZOOM_OUT_PIX * zoom_out_pix,
        'the zoom-out term dropped': ZOOM_IN * zoom_in_kd,
        'no consistency mapping': ZOOM_IN * dwt_kd(net(crop), label) + ZOOM_OUT_PIX * zoom_out_pix,
        'equal group weights': ZOOM_IN * dwt_kd(zoom_in_pred, label, equal_weights) + ZOOM_OUT_PIX * zoom_out_pix,
        'the scheduled lambda on the zoom-in term': ZOOM_IN * FINAL_LAMBDA * zoom_in_kd + ZOOM_OUT_PIX * zoom_out_pix,
    }
    assert_sharp(recorder.calls[1]['grads'], {name: reference_grads(net, loss) for name, loss in wrong.items()},
                 'AugKD auxiliary step')

    log = model.get_current_log()
    assert log['l_zoom_in'] == pytest.approx(ZOOM_IN * zoom_in_kd.item(), rel=1e-9)
    assert log['l_zoom_out_pix'] == pytest.approx(ZOOM_OUT_PIX * zoom_out_pix.item(), rel=1e-9)
    assert not model.teacher.requires_grad and model.teacher.grad is None
    assert torch.equal(model.teacher, teacher_before)
