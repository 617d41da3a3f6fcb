"""ResShift v3 (the 4-step journal model, Yue et al., TPAMI 2024) against the official ResShift code.

``tests/data/resshift_v3_reference.pt`` was recorded once from the official ResShift code
(github.com/zsyOAOA/ResShift at 3ce1d81: ``models/unet.py: UNetModelSwin``,
``ldm/models/autoencoder.py: VQModelTorch``, ``models/script_util.py: create_gaussian_diffusion``),
run on the CPU in fp32 in a scratch copy outside this project: tiny networks of the official classes
filled with the deterministic random weights :func:`test_resshift_teacher.tiny_weights` regenerates
(named parameters in the official order, seeds ``unet_weight_seed`` / ``ae_weight_seed``), the
diffusion parameters of ``configs/realsr_swinunet_realesrgan256_journal.yaml`` (4 steps,
``min_noise_level`` 0.2), and ``ResShiftSampler.sample_func`` (reflect padding to a multiple of 16
here, crop back, clamp) around ``p_sample_loop`` with ``torch.manual_seed(seed)`` right before. The
file keeps the parameter names and shapes, the configurations, inputs, seeds, outputs and the
official schedule arrays.
"""
import os

import numpy as np
import pytest
import torch
import yaml
from test_sinsr_teacher import reference_options

from dtkd_teacher.teacher import ResShiftTeacher

HERE = os.path.dirname(os.path.abspath(__file__))
REF_PATH = os.path.join(HERE, 'data', 'resshift_v3_reference.pt')
OPT_PATH = os.path.join(os.path.dirname(HERE), 'options', 'teacher', 'resshift_v3_realsr_x4.yml')
V1_PATH = os.path.join(os.path.dirname(HERE), 'options', 'teacher', 'resshift_realsr_x4.yml')
TOL = 1e-4


pytestmark = pytest.mark.usefixtures('one_thread_module')


@pytest.fixture(scope='module')
def ref():
    return torch.load(REF_PATH, weights_only=True)


@pytest.fixture(scope='module')
def tiny_opt(ref, tmp_path_factory):
    opt = reference_options(ref, tmp_path_factory.mktemp('v3_tiny'))
    opt['sampler']['steps'] = None
    return opt


def test_reference_file_is_small():
    assert os.path.getsize(REF_PATH) < 300_000


@pytest.mark.parametrize('name, key', [('s4', 'lq_a'), ('odd_s4', 'lq_odd')])
def test_matches_official_sampler(ref, tiny_opt, name, key):
    teacher = ResShiftTeacher.from_options(tiny_opt)
    assert teacher.steps == 4 and teacher.diffusion.timestep_map.tolist() == [0, 1, 2, 3]
    lq = ref[key]
    torch.manual_seed(int(ref[f'seed_{name}']))
    out = teacher.sample(lq)
    expected = ref[f'out_{name}']
    assert out.shape == expected.shape == (lq.shape[0], 3, 4 * lq.shape[2], 4 * lq.shape[3])
    assert float((out - expected).abs().max()) < TOL
    out_g = teacher.sample(lq, generator=torch.Generator().manual_seed(int(ref[f'seed_{name}'])))
    assert float((out_g - expected).abs().max()) < TOL


def test_schedule_matches_official(ref, tiny_opt):
    d = ResShiftTeacher.from_options(tiny_opt).diffusion
    for k in ('sqrt_etas', 'etas', 'etas_prev', 'alpha', 'posterior_variance', 'posterior_log_variance_clipped',
              'posterior_mean_coef1', 'posterior_mean_coef2'):
        np.testing.assert_allclose(getattr(d, k), ref[f'sched_{k}'].numpy(), rtol=0, atol=1e-12, err_msg=k)
    # closed form (ResShift Eq. 10): sqrt(eta_1) = 0.2 / kappa = 0.1, sqrt(eta_4) = 0.99
    t = np.arange(4)
    b = (0.99 / 0.1) ** (1 / 3)
    expected = 0.1 * b ** ((t / 3) ** 0.3 * 3)
    np.testing.assert_allclose(d.sqrt_etas, expected, rtol=0, atol=1e-12)


def test_shipped_options_are_the_official_journal_config():
    with open(OPT_PATH, encoding='utf-8') as f:
        opt = yaml.safe_load(f)
    with open(V1_PATH, encoding='utf-8') as f:
        v1 = yaml.safe_load(f)
    # official configs/realsr_swinunet_realesrgan256_journal.yaml: the v1 network and first stage,
    # a 4-step schedule starting at min_noise_level 0.2
    assert opt['diffusion'] == dict(sf=4, schedule_name='exponential', schedule_kwargs={'power': 0.3}, etas_end=0.99,
                                    steps=4, min_noise_level=0.2, kappa=2.0, weighted_mse=False,
                                    predict_type='xstart', timestep_respacing=None, scale_factor=1.0,
                                    normalize_input=True, latent_flag=True)
    assert opt['unet'].pop('ckpt') == 'weights/resshift_realsrx4_s4_v3.pth'
    v1['unet'].pop('ckpt')
    assert opt['unet'] == v1['unet'] and opt['autoencoder'] == v1['autoencoder']
    assert opt['sampler'] == dict(v1['sampler'], steps=None)


def test_missing_weights_name_the_file_and_the_release(tmp_path):
    with open(OPT_PATH, encoding='utf-8') as f:
        opt = yaml.safe_load(f)
    opt['unet']['ckpt'] = str(tmp_path / 'resshift_realsrx4_s4_v3.pth')
    opt['sampler']['device'] = 'cpu'
    with pytest.raises(FileNotFoundError) as info:
        ResShiftTeacher.from_options(opt)
    msg = str(info.value)
    assert 'resshift_realsrx4_s4_v3.pth' in msg and 'unet.ckpt' in msg
    assert 'https://github.com/zsyOAOA/ResShift/releases/download/v2.0/resshift_realsrx4_s4_v3.pth' in msg
