"""On-the-fly Real-ESRGAN degradation (dtkd_data/realworld_degradation.py) and the GT data set."""
import random

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import photo, write_rgb
from dtkd_compat import OptionError
from dtkd_data.realworld_dataset import RealWorldGTDataset
from dtkd_data.realworld_degradation import (
    DEGRADATION_DEFAULTS,
    RealESRGANDegradation,
    check_degradation_options,
    draw_kernels,
    key_seed,
    scoped_rng,
)

pytestmark = pytest.mark.usefixtures('one_thread_module')


def gt_batch(size=128):
    imgs = [photo('astronaut')[100:100 + size, 150:150 + size], photo('coffee')[50:50 + size, 200:200 + size]]
    return torch.stack([torch.from_numpy(i.astype(np.float32) / 255).permute(2, 0, 1) for i in imgs])


SMALL = {'gt_size': 64}


def test_kernels_are_those_of_basicsr_realesrgan_dataset(tmp_path):
    # the factored kernel draws equal RealESRGANDataset.__getitem__'s under the same generator states
    from basicsr.data.realesrgan_dataset import RealESRGANDataset

    write_rgb(str(tmp_path / 'gt' / 'a.png'), cv2.resize(photo('astronaut'), (400, 400)))  # 400x400: no crop draw
    (tmp_path / 'meta.txt').write_text('a.png\n')
    opt = check_degradation_options({})
    ds = RealESRGANDataset({**opt, 'dataroot_gt': str(tmp_path / 'gt'), 'meta_info': str(tmp_path / 'meta.txt'),
                            'io_backend': {'type': 'disk'}, 'use_hflip': False, 'use_rot': False})
    sinc = 0
    for seed in range(40):
        random.seed(seed)
        np.random.seed(seed)
        item = ds[0]
        random.seed(seed)
        np.random.seed(seed)
        k1, k2, ks = draw_kernels(opt)
        assert torch.equal(k1, item['kernel1']) and torch.equal(k2, item['kernel2'])
        assert torch.equal(ks, item['sinc_kernel'])
        sinc += int(ks[10, 10] != 1)
    assert 0 < sinc < 40  # both branches of the final sinc draw were compared


def test_same_seed_same_batch_other_seed_other_batch():
    deg = RealESRGANDegradation(SMALL, scale=4)
    gt = gt_batch()
    g1, l1 = deg(gt, key_seed(0, 5, 0))
    torch.manual_seed(123)  # global draws in between change nothing
    random.random()
    np.random.rand()
    g2, l2 = deg(gt, key_seed(0, 5, 0))
    assert torch.equal(g1, g2) and torch.equal(l1, l2)
    _, l3 = deg(gt, key_seed(1, 5, 0))
    _, l4 = deg(gt, key_seed(0, 6, 0))
    assert not torch.equal(l1, l3) and not torch.equal(l1, l4)


def test_global_generators_are_left_alone():
    deg = RealESRGANDegradation(SMALL, scale=4)
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    deg(gt_batch(), 42)
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
    assert np.random.rand() == expected[2]


def test_lq_is_a_degraded_image_of_the_gt_patch():
    deg = RealESRGANDegradation(SMALL, scale=4)
    gt = gt_batch()
    diffs = []
    for it in range(6):
        gt_p, lq = deg(gt, key_seed(0, it, 0))
        assert gt_p.shape == (2, 3, 64, 64) and lq.shape == (2, 3, 16, 16)
        assert lq.dtype == torch.float32 and 0 <= float(lq.min()) and float(lq.max()) <= 1
        assert torch.equal(lq, (lq * 255).round() / 255)  # 8-bit values
        # the GT patch is a crop of the GT, and the LQ is not its bicubic down-sampling
        assert any(torch.equal(gt_p[0], gt[0, :, y:y + 64, x:x + 64]) for y in range(65) for x in range(65))
        bicubic = F.interpolate(gt_p, scale_factor=0.25, mode='bicubic', antialias=True).clamp(0, 1)
        diffs.append(float((lq - bicubic).abs().mean()))
        # but it is the same picture: closer to its own patch than to the other image's
        own = float((lq[0] - bicubic[0]).abs().mean())
        other = float((lq[0] - bicubic[1]).abs().mean())
        assert own < other
    assert max(diffs) > 0.02


def test_scoped_rng_restores_states():
    state = torch.get_rng_state()
    with scoped_rng(7):
        a = torch.rand(2)
    with scoped_rng(7):
        b = torch.rand(2)
    assert torch.equal(a, b) and torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize('change, key', [
    ({'second_order_prob': 1.5}, 'degradation.second_order_prob'),
    ({'noise_range': [30, 1]}, 'degradation.noise_range'),
    ({'jpeg_range': [0, 95]}, 'degradation.jpeg_range'),
    ({'resize_prob': [1, 1]}, 'degradation.resize_prob'),
    ({'kernel_list': ['box']}, 'degradation.kernel_list'),
    ({'kernel_prob': [1]}, 'degradation.kernel_prob'),
    ({'gt_size': 250}, 'degradation.gt_size'),
    ({'sf': 2}, 'degradation.sf'),
    ({'resize_back': True}, 'degradation.resize_back'),
    ({'second_orderprob': 0.5}, "degradation.second_orderprob: unknown option; did you mean 'second_order_prob'"),
])
def test_bad_options_name_the_key(change, key):
    with pytest.raises(OptionError, match=key.replace('.', r'\.').replace('(', r'\(')):
        check_degradation_options(change, scale=4)


def test_defaults_are_resshifts():
    assert DEGRADATION_DEFAULTS['second_order_prob'] == 0.5 and DEGRADATION_DEFAULTS['gt_size'] == 256
    assert check_degradation_options(None, 4) == DEGRADATION_DEFAULTS


def test_gt_dataset(tmp_path):
    for name, size in (('a', (120, 100)), ('b', (500, 450))):
        write_rgb(str(tmp_path / 'gt' / f'{name}.png'), cv2.resize(photo('astronaut'), size))
    (tmp_path / 'meta.txt').write_text('a.png\nb.png\n')
    base = {'name': 'gt', 'type': 'RealWorldGTDataset', 'phase': 'train', 'dataroot_gt': str(tmp_path / 'gt'),
            'meta_info': str(tmp_path / 'meta.txt'), 'io_backend': {'type': 'disk'}, 'crop_pad_size': 96}
    ds = RealWorldGTDataset(dict(base))
    assert len(ds) == 2
    for i in range(2):
        item = ds[i]
        assert set(item) == {'gt', 'gt_path'} and item['gt'].shape == (3, 96, 96)
    with pytest.raises(OptionError, match=r'datasets\.train\.sinc_prob.*degradation block'):
        RealWorldGTDataset(dict(base, sinc_prob=0.1))
    with pytest.raises(OptionError, match=r'datasets\.train\.crop_pad_size'):
        RealWorldGTDataset(dict(base, crop_pad_size=500))
    with pytest.raises(OptionError, match=r'datasets\.train\.meta_info'):
        RealWorldGTDataset({k: v for k, v in base.items() if k != 'meta_info'})
