"""AugKDModel: auxiliary samples, invertible augmentations and teacher labels against direct computations."""
import glob
import itertools
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dtkd_compat  # noqa: F401  (before basicsr)
import dtkd_model  # noqa: F401,I001
from conftest import run_cli, train_options, write_yaml
from dtkd_model.augkd_model import (
    INVERTIBLE_OPS,
    AugKDModel,
    OptionError,
    aligned_crop,
    apply_invertible,
    invert_invertible,
    zoom_in_tiles,
    zoom_out_inputs,
)

L1 = {'type': 'L1Loss', 'loss_weight': 0.2, 'reduction': 'mean'}


def numpy_g(x, ops):
    """Direct NumPy composition in AugKD's order: invert, left-right, up-down, transpose. x: (C, H, W)."""
    y = x.copy()
    if 'invert' in ops:
        y = 1.0 - y
    if 'flip_lr' in ops:
        y = y[:, :, ::-1]
    if 'flip_ud' in ops:
        y = y[:, ::-1, :]
    if 'transpose' in ops:
        y = np.swapaxes(y, 1, 2)
    return np.ascontiguousarray(y)


ALL_COMBOS = [c for r in range(len(INVERTIBLE_OPS) + 1) for c in itertools.combinations(INVERTIBLE_OPS, r)]


def test_invertible_augmentations_match_numpy_and_invert_exactly():
    rng = np.random.default_rng(0)
    # multiples of 1/256, so that 1 - (1 - x) == x exactly in float32
    x = torch.from_numpy(rng.integers(0, 257, (len(ALL_COMBOS), 3, 6, 6)).astype(np.float32) / 256)
    flags = {op: torch.tensor([op in combo for combo in ALL_COMBOS]) for op in INVERTIBLE_OPS}
    x_copy = x.clone()
    gx = apply_invertible(x, flags)
    for b, combo in enumerate(ALL_COMBOS):
        np.testing.assert_array_equal(gx[b].numpy(), numpy_g(x[b].numpy(), combo))
    assert torch.equal(invert_invertible(gx, flags), x)
    # The official code maps back by applying the same ops in the same order again: g(g(x)) is x
    # except where the transposition meets exactly one flip (a quarter turn, applied twice: a half turn).
    twice = apply_invertible(gx, flags)
    for b, combo in enumerate(ALL_COMBOS):
        quarter_turn = 'transpose' in combo and ('flip_lr' in combo) != ('flip_ud' in combo)
        assert torch.equal(twice[b], x[b]) != quarter_turn, combo
    assert torch.equal(x, x_copy)  # the input is not modified in place


def test_zoom_in_tiles_and_zoom_out_inputs():
    from basicsr.utils.matlab_functions import imresize

    gt = torch.arange(2 * 3 * 16 * 12, dtype=torch.float32).view(2, 3, 16, 12)
    tiles = zoom_in_tiles(gt, (4, 3), 4, [(1, 2), (3, 0)])
    assert tiles.shape == (4, 3, 4, 3)
    g = gt.numpy()
    np.testing.assert_array_equal(tiles[0:2].numpy(), g[:, :, 4:8, 6:9])   # tile (1, 2) of both images
    np.testing.assert_array_equal(tiles[2:4].numpy(), g[:, :, 12:16, 0:3])  # then tile (3, 0)
    with pytest.raises(ValueError, match='zoom-in'):
        zoom_in_tiles(gt, (5, 3), 4, [(0, 0)])

    lq = torch.rand(2, 3, 16, 12)
    small = zoom_out_inputs(lq, 4)
    assert small.shape == (2, 3, 4, 3)
    for b in range(2):  # per image, BasicSR's MATLAB-style bicubic, as the official code
        torch.testing.assert_close(small[b], imresize(lq[b], 0.25))
    flat = zoom_out_inputs(torch.full((1, 3, 8, 8), 0.25), 4)
    torch.testing.assert_close(flat, torch.full((1, 3, 2, 2), 0.25))


def nearest_sr(x):
    """An exactly translation- and flip-equivariant x4 'teacher' (nearest-neighbour up-sampling)."""
    return x.repeat_interleave(4, dim=-2).repeat_interleave(4, dim=-1)


def test_cached_labels_valid_for_aligned_crops_and_flips_not_for_inversion():
    x = torch.rand(2, 3, 8, 8)
    teacher = nearest_sr(x)
    crop, label = aligned_crop(x, teacher, 4, 2, 3, 4)
    torch.testing.assert_close(crop, x[..., 2:6, 3:7])
    torch.testing.assert_close(label, nearest_sr(crop))  # T(crop(x)) == crop(T(x))
    for op in ('flip_lr', 'flip_ud', 'transpose'):
        flags = {op: torch.tensor([True, False])}
        torch.testing.assert_close(nearest_sr(apply_invertible(x, flags)), apply_invertible(teacher, flags))

    def squared_sr(z):  # a nonlinear teacher: no commutation with colour inversion
        return nearest_sr(z) ** 2

    flags = {'invert': torch.tensor([True, True])}
    assert not torch.allclose(squared_sr(apply_invertible(x, flags)), apply_invertible(squared_sr(x), flags))


def model_options(data_root, **augkd):
    opt = train_options(data_root, 'augkd_unit', total_iter=10, kd_opt=dict(L1), kd_schedule={'type': 'constant'})
    opt.update(model_type='AugKDModel', is_train=True, dist=False, rank=0, world_size=1)
    opt['train']['augkd_opt'] = augkd
    return opt


class BicubicTeacher:
    """Stands in for the online diffusion teacher: deterministic x4 bicubic SR."""

    calls = 0

    def sample(self, lq):
        BicubicTeacher.calls += 1
        return F.interpolate(lq, scale_factor=4, mode='bicubic', align_corners=False)


def test_online_zoom_in_labels_are_the_teacher_on_hr_tiles(tiny_pairs):
    torch.manual_seed(0)
    model = AugKDModel(model_options(tiny_pairs, label_source='cached', n_zoom_in=3))
    model.online_teacher, model.label_source = BicubicTeacher(), 'online'
    gt = torch.rand(2, 3, 32, 32)
    model.feed_data({'lq': torch.rand(2, 3, 8, 8), 'gt': gt})
    x, label = model.auxiliary_samples()
    assert x.shape == (6, 3, 8, 8) and label.shape == (6, 3, 32, 32)
    all_tiles = {(i, j): gt[..., 8 * i:8 * i + 8, 8 * j:8 * j + 8] for i in range(4) for j in range(4)}
    found = []
    for k in range(3):
        pair = x[2 * k:2 * k + 2]
        match = [pos for pos, t in all_tiles.items() if torch.equal(t, pair)]
        assert len(match) == 1
        found.append(match[0])
    assert len(set(found)) == 3  # distinct tiles
    torch.testing.assert_close(label, F.interpolate(x, scale_factor=4, mode='bicubic', align_corners=False))


def test_cached_zoom_in_substitute_and_consistency_term(tiny_pairs):
    torch.manual_seed(0)
    model = AugKDModel(model_options(tiny_pairs, crop_size=8, consistency={'prob': 1.0, 'ops': list(INVERTIBLE_OPS)}))
    assert model.label_source == 'cached'
    lq, teacher = torch.rand(1, 3, 16, 16), torch.rand(1, 3, 64, 64)
    model.feed_data({'lq': lq, 'gt': torch.rand(1, 3, 64, 64), 'teacher': teacher})
    x, label = model.auxiliary_samples()
    top, left = [(i, j) for i in range(9) for j in range(9) if torch.equal(lq[..., i:i + 8, j:j + 8], x)][0]
    torch.testing.assert_close(label, teacher[..., 4 * top:4 * top + 32, 4 * left:4 * left + 32])

    # g^-1(S(g(x))) with every op on: computed directly with NumPy around the student
    net = model.net_g
    with torch.no_grad():
        ours = model.consistent_student(x)
        gx = torch.from_numpy(numpy_g(x[0].numpy(), INVERTIBLE_OPS))[None]
        sgx = net(gx)[0].numpy()
        # undo in reverse order: transpose, up-down, left-right, invert
        ref = 1.0 - np.swapaxes(sgx, 1, 2)[:, ::-1, ::-1]
    np.testing.assert_allclose(ours[0].numpy(), ref, rtol=1e-5, atol=1e-5)


def test_option_errors_name_the_key(tiny_pairs):
    with pytest.raises(OptionError, match='train.augkd_opt.zoom_out_weight'):
        AugKDModel(model_options(tiny_pairs, zoom_out_weight=1.0))
    with pytest.raises(OptionError, match='train.augkd_opt.consistency.ops'):
        AugKDModel(model_options(tiny_pairs, consistency={'prob': 0.3, 'ops': ['rot45']}))
    with pytest.raises(OptionError, match="'online' needs a teacher block"):
        AugKDModel(model_options(tiny_pairs, label_source='online'))
    with pytest.raises(OptionError, match='train.augkd_opt.bogus'):
        AugKDModel(model_options(tiny_pairs, bogus=1))


def test_two_steps_and_logged_terms(tiny_pairs):
    torch.manual_seed(0)
    model = AugKDModel(model_options(tiny_pairs, zoom_out_pix_weight=1.0, crop_size=8))
    lq = torch.rand(2, 3, 16, 16)
    model.feed_data({'lq': lq, 'gt': torch.rand(2, 3, 64, 64), 'teacher': torch.rand(2, 3, 64, 64)})
    before = [p.detach().clone() for p in model.net_g.parameters()]
    steps = []
    orig = model.optimizer_g.step
    model.optimizer_g.step = lambda *a, **k: (steps.append(1), orig(*a, **k))[1]
    model.optimize_parameters(1)
    assert len(steps) == 2  # the main step, then the auxiliary step (official)
    log = model.get_current_log()
    for key in ('l_task', 'l_kd', 'l_zoom_in', 'l_zoom_out_pix'):
        assert key in log and np.isfinite(log[key])
    assert any(not torch.equal(a, b) for a, b in zip(before, model.net_g.parameters()))


LOG = re.compile(r'iter:\s*(\d+),.*l_zoom_in: (\S+)')


@pytest.mark.slow
def test_runner_trains_with_cached_labels(tiny_pairs, tmp_path):
    opt = train_options(tiny_pairs, 'tiny_augkd', total_iter=3, kd_opt=dict(L1), kd_schedule={'type': 'constant'},
                        save_freq=3)
    opt['model_type'] = 'AugKDModel'
    opt['train']['augkd_opt'] = {'zoom_in_weight': 0.2, 'zoom_out_pix_weight': 0.2, 'crop_size': 8}
    yml = write_yaml(tmp_path / 'augkd.yml', opt)
    proc = run_cli(['-m', 'dtkd.train', '-opt', yml], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    exp = tmp_path / 'experiments' / 'tiny_augkd'
    assert (exp / 'models' / 'net_g_3.pth').is_file()
    text = open(glob.glob(str(exp / 'train_*.log'))[0]).read()
    assert sorted(int(m.group(1)) for m in LOG.finditer(text)) == [1, 2, 3]
    assert 'l_zoom_out_pix' in text and '# psnr' in text


@pytest.mark.slow
def test_runner_with_an_online_resshift_teacher(tiny_pairs, tmp_path):
    """AugKD as published: the zoom-in tiles are labelled by an online ResShift teacher (a tiny
    latent-space one with random weights, 2 sampling steps)."""
    from test_resshift_model import DIFFUSION, TINY_UNET_LATENT, TINY_VQ

    from dtkd_arch.resshift_unet_arch import ResShiftUNet
    from dtkd_arch.vq_autoencoder_arch import VQAutoencoder

    torch.manual_seed(0)
    unet_opt = {k: v for k, v in TINY_UNET_LATENT.items() if k != 'type'}
    torch.save(ResShiftUNet(**unet_opt).state_dict(), tmp_path / 'unet.pth')
    torch.save(VQAutoencoder(**TINY_VQ).state_dict(), tmp_path / 'vq.pth')
    teacher_yml = write_yaml(tmp_path / 'teacher.yml', {
        'unet': {'type': 'ResShiftUNet', 'ckpt': str(tmp_path / 'unet.pth'), **unet_opt},
        'autoencoder': {'type': 'VQAutoencoder', 'ckpt': str(tmp_path / 'vq.pth'), **TINY_VQ},
        'diffusion': DIFFUSION,
        'sampler': {'steps': 2, 'pad_multiple': 8, 'device': 'cpu'},
    })
    opt = train_options(tiny_pairs, 'tiny_augkd_online', total_iter=2, kd_opt=dict(L1),
                        kd_schedule={'type': 'constant'}, save_freq=2)
    opt['model_type'] = 'AugKDModel'
    opt['val'] = None
    opt['teacher'] = {'opt': teacher_yml}
    opt['train']['augkd_opt'] = {'label_source': 'online', 'zoom_in_weight': 0.2, 'zoom_out_weight': 0.2}
    yml = write_yaml(tmp_path / 'augkd_online.yml', opt)
    proc = run_cli(['-m', 'dtkd.train', '-opt', yml], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    exp = tmp_path / 'experiments' / 'tiny_augkd_online'
    text = open(glob.glob(str(exp / 'train_*.log'))[0]).read()
    assert 'Online teacher from' in text
    assert sorted(int(m.group(1)) for m in LOG.finditer(text)) == [1, 2]
    assert 'l_zoom_out_kd' in text
