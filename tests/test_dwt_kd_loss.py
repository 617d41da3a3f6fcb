"""DWTKDLoss and band_group_discrepancy against PyWavelets (pywt.wavedec2) computed in numpy."""
import numpy as np
import pytest
import pywt
import torch

import dtkd_loss  # noqa: F401  (registers the losses)
from dtkd_loss.dwt_kd_loss import DWTKDLoss, band_group_discrepancy

WEIGHTS = [(1, 1, 1), (1, 2, 1), (2, 3, 2), (2, 5, 2)]
# Odd sizes; db2 gets a larger image so that level 4 stays within pywt.dwt_max_level (3 * 2**4 = 48).
SIZES = {'haar': (37, 53), 'db2': (49, 67)}


def _images(shape, seed):
    rng = np.random.default_rng(seed)
    return rng.random(shape), rng.random(shape)


def _pywt_groups(pred, target, level, wavelet, mode):
    """Per-image (sum of |coefficient differences|, coefficient count) of LF, MF, HF, from pywt per channel.

    pywt.wavedec2 returns [cA_J, (cH_J, cV_J, cD_J), ..., (cH_1, cV_1, cD_1)]: the last tuple is the
    finest level (HF), the tuples before it levels J..2 (MF).
    """
    batch, channels = pred.shape[:2]
    sums = {'LF': np.zeros(batch), 'MF': np.zeros(batch), 'HF': np.zeros(batch)}
    counts = {'LF': 0, 'MF': 0, 'HF': 0}
    for b in range(batch):
        for c in range(channels):
            cp = pywt.wavedec2(pred[b, c], wavelet, mode=mode, level=level)
            ct = pywt.wavedec2(target[b, c], wavelet, mode=mode, level=level)
            groups = {'LF': [(cp[0], ct[0])], 'HF': list(zip(cp[-1], ct[-1])),
                      'MF': [pair for k in range(1, level) for pair in zip(cp[k], ct[k])]}
            for name, pairs in groups.items():
                sums[name][b] += sum(np.abs(a - t).sum() for a, t in pairs)
                if b == 0:
                    counts[name] += sum(a.size for a, _ in pairs)
    if level == 1:
        del sums['MF'], counts['MF']
    return sums, counts


@pytest.mark.parametrize('wavelet', ['haar', 'db2'])
@pytest.mark.parametrize('level', [1, 2, 3, 4])
@pytest.mark.parametrize('weights', WEIGHTS)
def test_loss_matches_pywt(wavelet, level, weights):
    weights = (weights[0], 0, weights[2]) if level == 1 else weights
    pred, target = _images((2, 3) + SIZES[wavelet], seed=level)
    loss = DWTKDLoss(loss_weight=0.7, level=level, wavelet=wavelet, group_weights=list(weights))
    value = loss(torch.from_numpy(pred), torch.from_numpy(target))

    sums, counts = _pywt_groups(pred, target, level, wavelet, 'symmetric')
    expected = 0.7 * sum(w * sums[g].sum() / (counts[g] * 2) for g, w in zip(('LF', 'MF', 'HF'), weights)
                         if g in sums)
    assert value.dtype == torch.float64 and value.dim() == 0
    assert value.item() == pytest.approx(expected, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize('mode', ['symmetric', 'zero', 'reflect', 'periodization'])
@pytest.mark.parametrize('wavelet', ['haar', 'db2'])
def test_modes_and_sum_reduction_match_pywt(mode, wavelet):
    pred, target = _images((2, 2, 27, 31), seed=5)
    sums, counts = _pywt_groups(pred, target, 2, wavelet, mode)
    for reduction in ('mean', 'sum'):
        loss = DWTKDLoss(level=2, wavelet=wavelet, group_weights=[2, 3, 2], reduction=reduction, mode=mode)
        terms = loss.group_losses(torch.from_numpy(pred), torch.from_numpy(target))
        assert set(terms) == {'LF', 'MF', 'HF'}
        for name in terms:
            expected = sums[name].sum() if reduction == 'sum' else sums[name].sum() / (counts[name] * 2)
            assert terms[name].item() == pytest.approx(expected, rel=1e-12)
        expected_loss = sum(w * terms[g].item() for g, w in zip(('LF', 'MF', 'HF'), (2, 3, 2)))
        value = loss(torch.from_numpy(pred), torch.from_numpy(target)).item()
        assert value == pytest.approx(expected_loss, rel=1e-12)


@pytest.mark.parametrize('level', [1, 2, 3])
def test_group_losses_and_band_group_discrepancy_match_pywt(level):
    pred, target = _images((3, 3, 37, 53), seed=11)
    sums, counts = _pywt_groups(pred, target, level, 'haar', 'symmetric')
    names = ['LF', 'HF'] if level == 1 else ['LF', 'MF', 'HF']

    weights = [1, 0, 1] if level == 1 else [1, 2, 1]
    terms = DWTKDLoss(level=level, group_weights=weights).group_losses(torch.from_numpy(pred),
                                                                       torch.from_numpy(target))
    assert sorted(terms) == sorted(names)
    for name in names:
        assert terms[name].item() == pytest.approx(sums[name].sum() / (counts[name] * 3), rel=1e-12)

    per_image = band_group_discrepancy(torch.from_numpy(pred), torch.from_numpy(target), level=level)
    assert sorted(per_image) == sorted(names)
    for name in names:
        assert per_image[name].shape == (3,)
        np.testing.assert_allclose(per_image[name].numpy(), sums[name] / counts[name], rtol=1e-12)


def test_haar_constant_offset_lands_in_lf_only():
    # Orthonormal Haar: a constant offset c gives LL_J = 2**J * c and zero details (even sizes).
    target = torch.rand(1, 3, 32, 48, dtype=torch.float64)
    terms = DWTKDLoss(level=2).group_losses(target + 0.25, target)
    assert terms['LF'].item() == pytest.approx(4 * 0.25, rel=1e-12)
    assert terms['MF'].item() == pytest.approx(0, abs=1e-12)
    assert terms['HF'].item() == pytest.approx(0, abs=1e-12)


def test_haar_checkerboard_lands_in_hf_only():
    # A pixel-scale checkerboard is the HH_1 atom of the Haar basis: no LL, no level-2 detail.
    i, j = torch.meshgrid(torch.arange(32), torch.arange(32), indexing='ij')
    board = (((i + j) % 2) * 2 - 1).to(torch.float64)[None, None] * 0.1
    target = torch.rand(2, 1, 32, 32, dtype=torch.float64)
    terms = DWTKDLoss(level=2).group_losses(target + board, target)
    assert terms['LF'].item() == pytest.approx(0, abs=1e-12)
    assert terms['MF'].item() == pytest.approx(0, abs=1e-12)
    # HH_1 = 2 * 0.1 on every coefficient, LH_1 = HL_1 = 0: mean over the 3 sub-bands = 0.2 / 3.
    assert terms['HF'].item() == pytest.approx(0.2 / 3, rel=1e-12)


def test_identical_inputs_give_zero():
    x = torch.rand(2, 3, 24, 40)
    assert DWTKDLoss()(x, x.clone()).item() == 0.0
    assert DWTKDLoss(level=3, wavelet='db2', mode='zero')(x, x.clone()).item() == 0.0


def test_float32_matches_float64():
    pred, target = _images((2, 3, 64, 64), seed=3)
    loss = DWTKDLoss(level=2, wavelet='db2')
    v64 = loss(torch.from_numpy(pred), torch.from_numpy(target))
    v32 = loss(torch.from_numpy(pred).float(), torch.from_numpy(target).float())
    assert v32.dtype == torch.float32
    assert v32.item() == pytest.approx(v64.item(), rel=1e-5)


@pytest.mark.parametrize('wavelet,mode,shape', [('haar', 'symmetric', (7, 9)), ('db2', 'symmetric', (13, 15)),
                                                ('db2', 'reflect', (12, 14)), ('db2', 'zero', (13, 12)),
                                                ('haar', 'periodization', (9, 8))])
def test_gradcheck(wavelet, mode, shape):
    # DWTForward's own backward is wrong for symmetric/reflect padding and odd sizes; this must not be.
    loss = DWTKDLoss(level=2, wavelet=wavelet, mode=mode, group_weights=[1, 2, 1])
    gen = torch.Generator().manual_seed(0)
    pred = torch.rand((1, 1) + shape, dtype=torch.float64, generator=gen, requires_grad=True)
    target = torch.rand((1, 1) + shape, dtype=torch.float64, generator=gen)
    assert torch.autograd.gradcheck(lambda p: loss(p, target), (pred,), fast_mode=True)


def test_gradient_flows_to_pred_only():
    pred = torch.rand(2, 3, 32, 32, requires_grad=True)
    target = torch.rand(2, 3, 32, 32)
    DWTKDLoss()(pred, target).backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    assert torch.isfinite(pred.grad).all()
    assert target.grad is None


def test_registered_and_built_by_basicsr():
    from basicsr.losses import build_loss
    from basicsr.utils.registry import LOSS_REGISTRY

    assert LOSS_REGISTRY.get('DWTKDLoss') is DWTKDLoss
    loss = build_loss({'type': 'DWTKDLoss', 'loss_weight': 2.0, 'level': 2, 'group_weights': [1, 2, 1]})
    assert isinstance(loss, DWTKDLoss) and loss.loss_weight == 2.0
    # The filters are buffers, so .to(device) moves them with the loss.
    assert {'dwt.kernel2d', 'dwt.h0_col', 'dwt.h1_col'} <= set(dict(loss.named_buffers()))


@pytest.mark.parametrize('kwargs,key', [
    ({'level': 0}, 'level'), ({'level': 9}, 'level'), ({'level': 2.0}, 'level'), ({'level': True}, 'level'),
    ({'wavelet': 'nope'}, 'wavelet'), ({'wavelet': 'cmor1.5-1.0'}, 'wavelet'),
    ({'group_weights': [1, 2]}, 'group_weights'), ({'group_weights': [1, -2, 1]}, 'group_weights'),
    ({'group_weights': 'abc'}, 'group_weights'), ({'group_weights': [1, float('nan'), 1]}, 'group_weights'),
    ({'level': 1, 'group_weights': [1, 2, 1]}, 'group_weights'),
    ({'reduction': 'none'}, 'reduction'), ({'loss_weight': -1}, 'loss_weight'),
    ({'loss_weight': 'x'}, 'loss_weight'), ({'mode': 'periodic'}, 'mode'),
])
def test_option_errors(kwargs, key):
    with pytest.raises(ValueError, match=key):
        DWTKDLoss(**kwargs)


def test_level_one_mf_error_names_level():
    with pytest.raises(ValueError, match='level 1 has no MF group'):
        DWTKDLoss(level=1, group_weights=[1, 1, 1])
    assert 'MF' not in DWTKDLoss(level=1, group_weights=[1, 0, 1]).group_losses(torch.rand(1, 1, 8, 8),
                                                                                torch.rand(1, 1, 8, 8))


def test_input_errors():
    loss = DWTKDLoss()
    with pytest.raises(ValueError, match='same shape'):
        loss(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 17))
    with pytest.raises(ValueError, match='4-D'):
        loss(torch.rand(3, 16, 16), torch.rand(3, 16, 16))
    with pytest.raises(TypeError, match='floating-point'):
        loss(torch.zeros(1, 3, 16, 16, dtype=torch.uint8), torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match='shorter side'):
        DWTKDLoss(level=4, wavelet='db2')(torch.rand(1, 3, 40, 64), torch.rand(1, 3, 40, 64))
    with pytest.raises(ValueError, match='level'):
        band_group_discrepancy(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16), level=0)
