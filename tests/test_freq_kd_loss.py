"""FourierKDLoss against numpy.fft; DTCWTKDLoss against a plain re-computation from DTCWTForward."""
import warnings

import numpy as np
import pytest
import torch

import dtkd_loss  # noqa: F401  (registers the losses)
from dtkd_loss.freq_kd_loss import DTCWTKDLoss, FourierKDLoss

with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    from pytorch_wavelets import DTCWTForward


def _images(shape, seed):
    rng = np.random.default_rng(seed)
    return rng.random(shape), rng.random(shape)


# ------------------------------------------------------------------------------------------ Fourier
@pytest.mark.parametrize('shape', [(2, 3, 16, 16), (1, 3, 37, 53), (2, 1, 20, 9)])
@pytest.mark.parametrize('reduction', ['mean', 'sum'])
def test_fourier_matches_numpy(shape, reduction):
    pred, target = _images(shape, seed=shape[-1])
    diff = np.fft.rfft2(pred, norm='ortho') - np.fft.rfft2(target, norm='ortho')
    parts = np.abs(np.stack([diff.real, diff.imag]))
    expected = 0.5 * (parts.mean() if reduction == 'mean' else parts.sum())
    value = FourierKDLoss(loss_weight=0.5, reduction=reduction)(torch.from_numpy(pred), torch.from_numpy(target))
    assert value.dtype == torch.float64 and value.dim() == 0
    assert value.item() == pytest.approx(expected, rel=1e-12)


def test_fourier_single_cosine_is_one_spectral_line():
    # a * cos(2 pi (ky i / H + kx j / W)) has orthonormal spectrum a * sqrt(H W) / 2 at (ky, kx) and at
    # (-ky, -kx); rfft2 keeps only kx in 0..W/2, so for 0 < kx < W/2 a single real line remains.
    height, width, amplitude = 24, 32, 0.3
    i, j = np.meshgrid(np.arange(height), np.arange(width), indexing='ij')
    wave = amplitude * np.cos(2 * np.pi * (5 * i / height + 3 * j / width))
    target = torch.rand(1, 2, height, width, dtype=torch.float64)
    value = FourierKDLoss(reduction='sum')(target + torch.from_numpy(wave), target)
    assert value.item() == pytest.approx(2 * amplitude * np.sqrt(height * width) / 2, rel=1e-9)


def test_fourier_zero_gradcheck_and_grad_flow():
    x = torch.rand(2, 3, 12, 10)
    assert FourierKDLoss()(x, x.clone()).item() == 0.0
    pred = torch.rand(1, 1, 7, 9, dtype=torch.float64, requires_grad=True)
    target = torch.rand(1, 1, 7, 9, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda p: FourierKDLoss()(p, target), (pred,), fast_mode=True)
    pred32 = torch.rand(2, 3, 16, 16, requires_grad=True)
    FourierKDLoss()(pred32, torch.rand(2, 3, 16, 16)).backward()
    assert pred32.grad is not None and pred32.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------ DTCWT
def _dtcwt_reference(pred, target, level, reduction):
    """The definition written out: transform both images separately, group, mean/sum of |Re|, |Im| diffs."""
    transform = DTCWTForward(J=level, biort='near_sym_a', qshift='qshift_a', mode='symmetric').double()
    low_p, highs_p = transform(torch.from_numpy(pred))
    low_t, highs_t = transform(torch.from_numpy(target))
    groups = {'LF': [(low_p, low_t)], 'HF': [(highs_p[0], highs_t[0])]}
    if level > 1:
        groups['MF'] = list(zip(highs_p[1:], highs_t[1:]))
    terms = {}
    for name, pairs in groups.items():
        total = sum((a - b).abs().sum().item() for a, b in pairs)
        count = sum(a.numel() for a, _ in pairs)
        terms[name] = total if reduction == 'sum' else total / count
    return terms


@pytest.mark.parametrize('level,weights', [(1, (1, 0, 1)), (2, (1, 2, 1)), (2, (2, 5, 2)), (3, (2, 3, 2))])
@pytest.mark.parametrize('reduction', ['mean', 'sum'])
def test_dtcwt_matches_definition(level, weights, reduction):
    pred, target = _images((2, 2, 27, 35), seed=level)
    loss = DTCWTKDLoss(loss_weight=0.5, level=level, group_weights=list(weights), reduction=reduction)
    terms = loss.group_losses(torch.from_numpy(pred), torch.from_numpy(target))
    expected = _dtcwt_reference(pred, target, level, reduction)
    assert sorted(terms) == sorted(expected)
    for name in expected:
        assert terms[name].item() == pytest.approx(expected[name], rel=1e-10)
    value = loss(torch.from_numpy(pred), torch.from_numpy(target)).item()
    weighted = 0.5 * sum(w * expected[g] for g, w in zip(('LF', 'MF', 'HF'), weights) if g in expected)
    assert value == pytest.approx(weighted, rel=1e-10)


def test_dtcwt_groups_follow_frequency():
    target = torch.rand(2, 3, 32, 48, dtype=torch.float64)
    loss = DTCWTKDLoss(level=2)
    assert loss(target, target.clone()).item() == 0.0
    # A constant offset has no bandpass energy.
    offset = loss.group_losses(target + 0.25, target)
    assert offset['LF'].item() > 0.1
    assert offset['MF'].item() < 1e-6 and offset['HF'].item() < 1e-6
    # A pixel-scale checkerboard is high frequency: the level-1 bandpasses take it.
    i, j = torch.meshgrid(torch.arange(32), torch.arange(48), indexing='ij')
    board = (((i + j) % 2) * 2 - 1).to(torch.float64)[None, None] * 0.1
    fine = loss.group_losses(target + board, target)
    assert fine['HF'].item() > 20 * max(fine['LF'].item(), fine['MF'].item())
    # Horizontal stripes with an 8-pixel period sit at a quarter of the sampling rate: level 2 (MF)
    # takes more than level 1 (HF).
    stripes = torch.cos(2 * torch.pi * i / 8).to(torch.float64)[None, None] * 0.1
    mid = loss.group_losses(target + stripes, target)
    assert mid['MF'].item() > 3 * mid['HF'].item()


def test_dtcwt_gradcheck_and_float32():
    loss = DTCWTKDLoss(level=2)
    pred = torch.rand(1, 1, 15, 17, dtype=torch.float64, requires_grad=True)
    target = torch.rand(1, 1, 15, 17, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda p: loss(p, target), (pred,), fast_mode=True)
    v64 = loss(pred.detach(), target).item()
    pred32 = pred.detach().float().requires_grad_()
    v32 = loss(pred32, target.float())
    assert v32.dtype == torch.float32 and v32.item() == pytest.approx(v64, rel=1e-5)
    v32.backward()
    assert pred32.grad is not None and pred32.grad.abs().sum() > 0


def test_registered():
    from basicsr.losses import build_loss
    from basicsr.utils.registry import LOSS_REGISTRY

    assert LOSS_REGISTRY.get('FourierKDLoss') is FourierKDLoss
    assert LOSS_REGISTRY.get('DTCWTKDLoss') is DTCWTKDLoss
    assert isinstance(build_loss({'type': 'DTCWTKDLoss', 'level': 2}), DTCWTKDLoss)
    assert isinstance(build_loss({'type': 'FourierKDLoss', 'loss_weight': 0.1}), FourierKDLoss)


@pytest.mark.parametrize('cls,kwargs,key', [
    (FourierKDLoss, {'loss_weight': -0.1}, 'loss_weight'), (FourierKDLoss, {'reduction': 'max'}, 'reduction'),
    (DTCWTKDLoss, {'level': 0}, 'level'), (DTCWTKDLoss, {'level': 7}, 'level'),
    (DTCWTKDLoss, {'group_weights': [1, 2]}, 'group_weights'),
    (DTCWTKDLoss, {'level': 1, 'group_weights': [1, 2, 1]}, 'group_weights'),
    (DTCWTKDLoss, {'biort': 'db2'}, 'biort'), (DTCWTKDLoss, {'qshift': 'haar'}, 'qshift'),
    (DTCWTKDLoss, {'reduction': 'none'}, 'reduction'), (DTCWTKDLoss, {'loss_weight': float('inf')}, 'loss_weight'),
])
def test_option_errors(cls, kwargs, key):
    with pytest.raises(ValueError, match=key):
        cls(**kwargs)


def test_input_errors():
    for loss in (FourierKDLoss(), DTCWTKDLoss()):
        with pytest.raises(ValueError, match='same shape'):
            loss(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 17, 16))
    with pytest.raises(ValueError, match='at least'):
        DTCWTKDLoss(level=3)(torch.rand(1, 3, 6, 16), torch.rand(1, 3, 6, 16))
