"""SinSR (Wang et al., CVPR 2024) as a one-step ResShiftTeacher, against the official SinSR code.

``tests/data/sinsr_one_step_reference.pt`` was recorded once from the official SinSR code
(github.com/wyf0912/SinSR at f173549: ``models/unet.py: UNetModelSwin``, ``ldm/models/autoencoder.py:
VQModelTorch``, ``models/script_util.py: create_gaussian_diffusion``), run on the CPU in fp32 in a
scratch copy outside this project: tiny networks of the official classes in SinSR's own UNet layout
(``in_channels: 6``, no ``lq_size``, as its ``configs/SinSR.yaml``) filled with the deterministic
random weights :func:`test_resshift_teacher.tiny_weights` regenerates (named parameters in the
official order, seeds ``unet_weight_seed`` / ``ae_weight_seed``), the diffusion of ``configs/SinSR.yaml``
(ResShift's 15 steps), and SinSR's one-step inference: ``Sampler.sample_func`` (reflect padding to
a multiple of 16 here, crop back, clamp) around ``p_sample_loop(..., one_step=True)``, which draws the
prior at the last of the 15 steps and returns the first ``pred_xstart``, with
``torch.manual_seed(seed)`` right before. The file keeps the parameter names and shapes, the
configurations, inputs, seeds, outputs and the official schedule arrays.
"""
import copy
import os

import numpy as np
import pytest
import torch
import yaml
from test_resshift_teacher import tiny_weights

from dtkd_arch.resshift_unet_arch import ResShiftUNet
from dtkd_arch.vq_autoencoder_arch import VQAutoencoder
from dtkd_teacher.teacher import ResShiftTeacher

HERE = os.path.dirname(os.path.abspath(__file__))
REF_PATH = os.path.join(HERE, 'data', 'sinsr_one_step_reference.pt')
OPT_PATH = os.path.join(os.path.dirname(HERE), 'options', 'teacher', 'sinsr_realsr_x4.yml')
TOL = 1e-4


pytestmark = pytest.mark.usefixtures('one_thread_module')


@pytest.fixture(scope='module')
def ref():
    return torch.load(REF_PATH, weights_only=True)


def reference_checkpoints(ref, folder):
    """Save the reference's weights (official parameter names) as checkpoint files for the project's
    networks; buffers (shift masks, position indices) come from the project's own network."""
    files = {}
    for tag, net in (('unet', ResShiftUNet(**ref['unet_config'])), ('ae', VQAutoencoder(**ref['ae_config']))):
        sd = tiny_weights(ref[f'{tag}_param_names'], ref[f'{tag}_param_shapes'], ref[f'{tag}_weight_seed'],
                          ref['scale_overrides'])
        params = dict(net.named_parameters())
        assert sorted(params) == sorted(sd)  # the official layout, key for key
        assert all(tuple(params[k].shape) == tuple(v.shape) for k, v in sd.items())
        sd.update({k: v for k, v in net.state_dict().items() if k not in sd})
        files[tag] = str(folder / f'{tag}.pth')
        torch.save(sd, files[tag])
    return files


def reference_options(ref, folder):
    files = reference_checkpoints(ref, folder)
    return {
        'unet': {'type': 'ResShiftUNet', 'ckpt': files['unet'], **ref['unet_config']},
        'autoencoder': {'type': 'VQAutoencoder', 'ckpt': files['ae'], **ref['ae_config']},
        'diffusion': dict(ref['diffusion_config']),
        'sampler': {'steps': 1, 'pad_multiple': 16, 'device': 'cpu', 'precision': 'fp32'},
    }


@pytest.fixture(scope='module')
def tiny_opt(ref, tmp_path_factory):
    return reference_options(ref, tmp_path_factory.mktemp('sinsr_tiny'))


def test_reference_file_is_small():
    assert os.path.getsize(REF_PATH) < 300_000


def test_sinsr_unet_layout_is_the_same_network(ref):
    # SinSR's spelling (in_channels 6, no lq_size) builds the network of ResShift's spelling
    # (in_channels 3, lq_size = image_size): same keys, same shapes
    cfg = ref['unet_config']
    assert cfg['in_channels'] == 6 and 'lq_size' not in cfg
    old = ResShiftUNet(**cfg)
    new = ResShiftUNet(**dict(cfg, in_channels=3, lq_size=cfg['image_size']))
    assert old.in_channels == 3 and old.lq_size == cfg['image_size']
    assert {k: v.shape for k, v in old.state_dict().items()} == {k: v.shape for k, v in new.state_dict().items()}
    assert old.state_dict()['input_blocks.0.0.weight'].shape[1] == 6
    with pytest.raises(ValueError, match='in_channels'):
        ResShiftUNet(**dict(cfg, in_channels=3))  # no lq_size: in_channels must count the LQ channels


@pytest.mark.parametrize('name, key', [('one_step', 'lq_a'), ('odd_one_step', 'lq_odd')])
def test_matches_official_one_step_inference(ref, tiny_opt, name, key):
    teacher = ResShiftTeacher.from_options(tiny_opt)
    assert teacher.steps == 1 and teacher.diffusion.timestep_map.tolist() == [14]
    lq = ref[key]
    torch.manual_seed(int(ref[f'seed_{name}']))
    out = teacher.sample(lq)
    expected = ref[f'out_{name}']
    assert out.shape == expected.shape == (lq.shape[0], 3, 4 * lq.shape[2], 4 * lq.shape[3])
    assert float((out - expected).abs().max()) < TOL
    # the result is the prior's one x_0 prediction: another seed gives another result
    torch.manual_seed(int(ref[f'seed_{name}']) + 1)
    assert float((teacher.sample(lq) - expected).abs().max()) > 1e-2


def test_one_step_is_one_network_call_from_the_last_step(ref, tiny_opt):
    teacher = ResShiftTeacher.from_options(tiny_opt)
    seen = []
    hook = teacher.unet.register_forward_pre_hook(lambda m, args: seen.append(args[1].tolist()))
    try:
        teacher.sample(ref['lq_a'], generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    assert seen == [[14, 14]]


def test_schedule_matches_official(ref, tiny_opt):
    full = ResShiftTeacher.from_options(tiny_opt, steps=15).diffusion
    for k in ('sqrt_etas', 'etas', 'etas_prev', 'alpha', 'posterior_variance', 'posterior_mean_coef1',
              'posterior_mean_coef2'):
        np.testing.assert_allclose(getattr(full, k), ref[f'sched_{k}'].numpy(), rtol=0, atol=1e-12, err_msg=k)
    np.testing.assert_allclose(full.posterior_log_variance_clipped[1:],
                               ref['sched_posterior_log_variance_clipped'].numpy()[1:], rtol=0, atol=1e-12)
    one = ResShiftTeacher.from_options(tiny_opt).diffusion
    # one step: the prior at the last trained step, x_0 = the network's prediction (mean = pred_xstart)
    assert one.sqrt_etas.tolist() == [ref['sched_sqrt_etas'][-1].item()]
    assert one.posterior_mean_coef1.tolist() == [0.0] and one.posterior_mean_coef2.tolist() == [1.0]


def test_shipped_options_are_the_official_sinsr_config():
    with open(OPT_PATH, encoding='utf-8') as f:
        opt = yaml.safe_load(f)
    # official configs/SinSR.yaml
    assert opt['diffusion'] == dict(sf=4, schedule_name='exponential', schedule_kwargs={'power': 0.3}, etas_end=0.99,
                                    steps=15, min_noise_level=0.04, kappa=2.0, weighted_mse=False,
                                    predict_type='xstart', timestep_respacing=None, scale_factor=1.0,
                                    normalize_input=True, latent_flag=True)
    unet = dict(opt['unet'])
    assert unet.pop('type') == 'ResShiftUNet' and unet.pop('ckpt') == 'weights/SinSR_v1.pth'
    assert unet == dict(image_size=64, in_channels=6, model_channels=160, out_channels=3, cond_lq=True,
                        attention_resolutions=[64, 32, 16, 8], dropout=0, channel_mult=[1, 2, 2, 4],
                        num_res_blocks=[2, 2, 2, 2], conv_resample=True, dims=2, use_fp16=False, num_head_channels=32,
                        use_scale_shift_norm=True, resblock_updown=False, swin_depth=2, swin_embed_dim=192,
                        window_size=8, mlp_ratio=4)
    ae = dict(opt['autoencoder'])
    assert ae.pop('type') == 'VQAutoencoder' and ae.pop('ckpt') == 'weights/autoencoder_vq_f4.pth'
    assert ae['embed_dim'] == 3 and ae['n_embed'] == 8192 and ae['ddconfig']['ch_mult'] == [1, 2, 4]
    # SinSR inference.py --one_step with its defaults (chop 512 / 448, desired_min_size 64)
    assert opt['sampler'] == dict(steps=1, chop_size=512, chop_stride=448, pad_multiple=64, precision='fp32',
                                  device='auto')


def test_full_size_network_has_the_released_layout():
    # SinSR's full-size spelling builds exactly ResShift's released UNet layout (SinSR_v1.pth has it)
    from test_resshift_arch import _state_layout, read_keys

    with open(OPT_PATH, encoding='utf-8') as f:
        opt = yaml.safe_load(f)
    block = {k: v for k, v in opt['unet'].items() if k not in ('type', 'ckpt')}
    with torch.device('meta'):
        net = ResShiftUNet(**block)
    assert _state_layout(net) == read_keys('resshift_unet_keys.txt')


def test_missing_weights_name_the_file_and_the_release(tmp_path):
    with open(OPT_PATH, encoding='utf-8') as f:
        opt = yaml.safe_load(f)
    opt['unet']['ckpt'] = str(tmp_path / 'SinSR_v1.pth')
    opt['sampler']['device'] = 'cpu'
    with pytest.raises(FileNotFoundError) as info:
        ResShiftTeacher.from_options(copy.deepcopy(opt))
    msg = str(info.value)
    assert 'SinSR_v1.pth' in msg and 'unet.ckpt' in msg
    assert 'https://github.com/wyf0912/SinSR/releases/download/v1.0/SinSR_v1.pth' in msg
