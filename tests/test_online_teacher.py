"""DTKDModel with an online teacher: batches without cached teacher outputs are labelled by ResShift."""
import glob

import pytest
import torch
from basicsr.models import build_model
from test_resshift_model import DIFFUSION, TINY_UNET_LATENT, TINY_VQ

from conftest import run_cli, train_options, write_yaml
from dtkd_arch.resshift_unet_arch import ResShiftUNet
from dtkd_arch.vq_autoencoder_arch import VQAutoencoder
from dtkd_teacher.teacher import ResShiftTeacher

DWT = {'type': 'DWTKDLoss', 'loss_weight': 2.0, 'level': 2, 'group_weights': [1, 2, 1]}


def tiny_teacher_file(folder):
    """A tiny latent-space ResShift teacher with random weights, saved as real checkpoint files."""
    torch.manual_seed(0)
    unet_opt = {k: v for k, v in TINY_UNET_LATENT.items() if k != 'type'}
    torch.save(ResShiftUNet(**unet_opt).state_dict(), folder / 'unet.pth')
    torch.save(VQAutoencoder(**TINY_VQ).state_dict(), folder / 'vq.pth')
    return write_yaml(folder / 'teacher.yml', {
        'unet': {'type': 'ResShiftUNet', 'ckpt': str(folder / 'unet.pth'), **unet_opt},
        'autoencoder': {'type': 'VQAutoencoder', 'ckpt': str(folder / 'vq.pth'), **TINY_VQ},
        'diffusion': DIFFUSION,
        'sampler': {'steps': 2, 'pad_multiple': 8, 'device': 'cpu'},
    })


def test_teacher_output_is_the_teacher_sample_of_the_batch(tiny_pairs, tmp_path):
    teacher_yml = tiny_teacher_file(tmp_path)
    opt = train_options(tiny_pairs, 'online', total_iter=10, kd_opt=dict(DWT), teacher=False)
    opt.update(is_train=True, dist=False, rank=0, world_size=1, teacher={'opt': teacher_yml})
    model = build_model(opt)
    lq = torch.rand(2, 3, 8, 8)
    model.feed_data({'lq': lq, 'gt': torch.rand(2, 3, 32, 32)})
    assert model.teacher is None
    model.output = model.net_g(lq)
    reference = ResShiftTeacher.from_options(teacher_yml)
    torch.manual_seed(7)
    got = model.get_teacher_output()
    torch.manual_seed(7)
    expected = reference.sample(lq)
    assert got.shape == (2, 3, 32, 32)
    torch.testing.assert_close(got, expected)
    # A cached teacher in the batch takes precedence over the online one.
    cached = torch.rand(2, 3, 32, 32)
    model.feed_data({'lq': lq, 'gt': torch.rand(2, 3, 32, 32), 'teacher': cached})
    assert torch.equal(model.get_teacher_output(), cached)


@pytest.mark.slow
def test_runner_trains_with_an_online_teacher(tiny_pairs, tmp_path):
    opt = train_options(tiny_pairs, 'tiny_online', total_iter=2, kd_opt=dict(DWT), teacher=False, save_freq=2)
    opt['val'] = None
    opt['teacher'] = {'opt': tiny_teacher_file(tmp_path), 'precision': 'fp32'}
    proc = run_cli(['-m', 'dtkd.train', '-opt', write_yaml(tmp_path / 'train.yml', opt)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    exp = tmp_path / 'experiments' / 'tiny_online'
    text = open(glob.glob(str(exp / 'train_*.log'))[0]).read()
    assert 'Online teacher from' in text and 'l_kd:' in text
    assert (exp / 'models' / 'net_g_2.pth').is_file()


def test_missing_teacher_names_both_options(tiny_pairs):
    opt = train_options(tiny_pairs, 'no_teacher', total_iter=10, kd_opt=dict(DWT), teacher=False)
    opt.update(is_train=True, dist=False, rank=0, world_size=1)
    model = build_model(opt)
    lq = torch.rand(1, 3, 8, 8)
    model.feed_data({'lq': lq, 'gt': torch.rand(1, 3, 32, 32)})
    model.output = model.net_g(lq)
    with pytest.raises(ValueError, match=r'datasets\.train\.dataroot_teacher.*teacher block'):
        model.get_teacher_output()
