"""ResShiftTeacher (dtkd_model/resshift_teacher.py) end to end against the official sampler.

The reference outputs in ``tests/data/resshift_sampler_reference.pt`` come from the official
ResShift code (github.com/zsyOAOA/ResShift: ``ResShiftSampler.sample_func`` and the chopping of
``ResShiftSampler.inference`` with ``utils/util_image.py: ImageSpliterTh``), run on the CPU in
fp32 with tiny networks of the official classes (UNetModelSwin, VQModelTorch) filled with the
deterministic random weights that :func:`tiny_weights` regenerates here, the official real-SR
diffusion settings, and ``torch.manual_seed(seed)`` right before each call. The project's own
networks (ResShiftUNet, VQAutoencoder) are loaded with the same weights through checkpoint files.
"""
import copy
import math
import os

import pytest
import torch
import yaml

from dtkd_arch.resshift_unet_arch import ResShiftUNet
from dtkd_arch.vq_autoencoder_arch import VQAutoencoder
from dtkd_compat import OptionError
from dtkd_teacher.teacher import ResShiftTeacher

HERE = os.path.dirname(os.path.abspath(__file__))
REF_PATH = os.path.join(HERE, 'data', 'resshift_sampler_reference.pt')
OPT_PATH = os.path.join(os.path.dirname(HERE), 'options', 'teacher', 'resshift_realsr_x4.yml')
TOL = 1e-4


pytestmark = pytest.mark.usefixtures('one_thread_module')


@pytest.fixture(scope='module')
def ref():
    return torch.load(REF_PATH, weights_only=True)


def tiny_weights(names, shapes, seed, overrides):
    """The reference's random weights: N(0, 1/fan_in) for matrices/kernels, 1 + 0.1 N for norm
    weights, 0.05 N otherwise, drawn in the listed order from one generator, then rescaled."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in zip(names, shapes):
        shape = tuple(shape)
        w = torch.randn(shape, generator=g)
        if len(shape) > 1:
            w = w / math.sqrt(math.prod(shape[1:]))
        elif 'norm' in name and name.endswith('weight'):
            w = 1 + 0.1 * w
        else:
            w = 0.05 * w
        out[name] = w * overrides.get(name, 1.0)
    return out


def _state(ref, tag):
    sd = tiny_weights(ref[f'{tag}_param_names'], ref[f'{tag}_param_shapes'], ref[f'{tag}_weight_seed'],
                      ref['scale_overrides'])
    sd.update(ref[f'{tag}_buffers'])
    return sd


@pytest.fixture(scope='module')
def tiny_opt(ref, tmp_path_factory):
    """Teacher options for the tiny networks, with their weights saved as checkpoint files."""
    root = tmp_path_factory.mktemp('resshift_tiny')
    unet = ResShiftUNet(**ref['unet_config'])
    ae = VQAutoencoder(**ref['ae_config'])
    for net, tag in ((unet, 'unet'), (ae, 'ae')):
        sd = _state(ref, tag)
        assert sorted(net.state_dict()) == sorted(sd)
        torch.save(sd, str(root / f'{tag}.pth'))
    return {
        'unet': {'type': 'ResShiftUNet', 'ckpt': str(root / 'unet.pth'), **ref['unet_config']},
        'autoencoder': {'type': 'VQAutoencoder', 'ckpt': str(root / 'ae.pth'), **ref['ae_config']},
        'diffusion': dict(ref['diffusion_config']),
        'sampler': {'pad_multiple': 16, 'device': 'cpu', 'precision': 'fp32'},
    }


@pytest.fixture(scope='module')
def teacher(tiny_opt):
    return ResShiftTeacher.from_options(tiny_opt)


CASES = [  # name, input, steps, chop_size, chop_stride
    ('s15', 'lq_a', None, 512, 448),
    ('s1', 'lq_a', 1, 512, 448),
    ('s4', 'lq_a', 4, 512, 448),
    ('odd_s15', 'lq_odd', None, 512, 448),  # 13x18 LR: reflect-pad to 16x32, crop back
    ('chop_s4', 'lq_big', 4, 16, 8),  # 24x20 LR in 16x16 patches at stride 8 (4 patches)
]


@pytest.mark.parametrize('name, key, steps, chop_size, chop_stride', CASES)
def test_matches_official_sampler(ref, tiny_opt, name, key, steps, chop_size, chop_stride):
    t = ResShiftTeacher.from_options(tiny_opt, steps=steps, chop_size=chop_size, chop_stride=chop_stride)
    lq = ref[key]
    torch.manual_seed(int(ref[f'seed_{name}']))
    out = t.sample(lq)
    expected = ref[f'out_{name}']
    assert out.shape == expected.shape == (lq.shape[0], 3, 4 * lq.shape[2], 4 * lq.shape[3])
    assert out.dtype == torch.float32
    assert float((out - expected).abs().max()) < TOL
    if name in ('s4', 'chop_s4'):
        # the same stream from an explicit CPU generator gives the same result
        out_g = t.sample(lq, generator=torch.Generator().manual_seed(int(ref[f'seed_{name}'])))
        assert float((out_g - expected).abs().max()) < TOL


@pytest.mark.parametrize('name, steps', [('s15', None), ('s1', 1)])
def test_final_latent_matches_official(ref, teacher, name, steps):
    teacher.set_steps(steps)
    try:
        y = (ref['lq_a'] - 0.5) / 0.5
        z_y = teacher.diffusion.encode_first_stage(y, teacher.autoencoder, up_sample=True)
        torch.manual_seed(int(ref[f'seed_{name}']))
        z = teacher.diffusion.sample_latent(teacher.unet, z_y, model_kwargs={'lq': y})
        assert float((z - ref[f'latent_{name}']).abs().max()) < 1e-5
    finally:
        teacher.set_steps(None)


def test_generator_determinism(ref, teacher):
    lq = ref['lq_odd']
    a = teacher.sample(lq, generator=torch.Generator().manual_seed(1))
    b = teacher.sample(lq, generator=torch.Generator().manual_seed(1))
    c = teacher.sample(lq, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert float((a - c).abs().mean()) > 1e-3
    assert 0 <= float(a.min()) and float(a.max()) <= 1


BATCH_TOL = 1e-4  # batched vs one-image network calls: float32 summation order only (measured ~5e-6)


@pytest.mark.parametrize('steps, chop', [(None, False), (1, False), (4, True)])
def test_generator_list_equals_per_image_calls(ref, tiny_opt, steps, chop):
    # one generator per image: the batch gives every image what sample() gives it alone, also when the
    # images are chopped (24x20 LR in 16x16 patches at stride 8: each generator draws patch by patch)
    if chop:
        t = ResShiftTeacher.from_options(tiny_opt, steps=steps, chop_size=16, chop_stride=8)
        lq = torch.cat([ref['lq_big'], ref['lq_big'].flip(-1), ref['lq_big'].flip(-2)])
    else:
        t = ResShiftTeacher.from_options(tiny_opt, steps=steps)
        lq = torch.cat([ref['lq_a'], ref['lq_a'][:1].flip(-1)])
    seeds = (7, 8, 9)
    batched = t.sample(lq, generator=[torch.Generator().manual_seed(s) for s in seeds])
    alone = torch.cat([t.sample(lq[i:i + 1], generator=torch.Generator().manual_seed(s))
                       for i, s in enumerate(seeds)])
    assert batched.shape == alone.shape == (3, 3, 4 * lq.shape[2], 4 * lq.shape[3])
    assert float((batched - alone).abs().max()) < BATCH_TOL
    # a list of one generator is the single generator, bit for bit
    one = t.sample(lq[1:2], generator=[torch.Generator().manual_seed(seeds[1])])
    assert torch.equal(one, alone[1:2])
    # unlike one shared generator, whose noise for image 0 depends on the batch
    shared = t.sample(lq, generator=torch.Generator().manual_seed(seeds[0]))
    assert float((shared[1] - alone[1]).abs().max()) > 1e-2


def test_generator_list_must_match_the_batch(teacher):
    lq = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match='1 generators for a batch of 2'):
        teacher.sample(lq, generator=[torch.Generator()])
    with pytest.raises(TypeError, match='torch.Generator'):
        teacher.sample(lq, generator=[torch.Generator(), None])


def test_chop_covers_every_pixel_once_per_patch(ref, tiny_opt):
    # chop_size/stride larger than the image side but smaller on the other: patches span the whole side
    t = ResShiftTeacher.from_options(tiny_opt, steps=1, chop_size=16, chop_stride=16)
    assert t._starts(24) == [0, 8] and t._starts(20) == [0, 4] and t._starts(16) == [0]
    assert t._starts(40) == [0, 16, 24]
    lq = torch.rand(1, 3, 12, 40, generator=torch.Generator().manual_seed(0))
    out = t.sample(lq, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 3, 48, 160) and torch.isfinite(out).all()


def test_padding_is_reflection(teacher):
    import numpy as np

    from dtkd_arch.tiling import pad_to_multiple

    x = torch.rand(1, 3, 5, 7)
    padded, _ = pad_to_multiple(x, teacher.pad_multiple)  # pad_multiple 16: needs repeated reflection
    assert padded.shape == (1, 3, 16, 16)
    expected = np.pad(x.numpy(), ((0, 0), (0, 0), (0, 11), (0, 9)), mode='reflect')
    np.testing.assert_array_equal(padded.numpy(), expected)
    out = teacher.sample(x, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 3, 20, 28)


def test_bf16_close_to_fp32(ref, tiny_opt):
    t32 = ResShiftTeacher.from_options(tiny_opt, steps=4)
    t16 = ResShiftTeacher.from_options(tiny_opt, steps=4, precision='bf16')
    lq = ref['lq_a'][:1]
    a = t32.sample(lq, generator=torch.Generator().manual_seed(0))
    b = t16.sample(lq, generator=torch.Generator().manual_seed(0))
    assert b.dtype == torch.float32 and b.shape == a.shape
    # random tiny networks amplify bf16 rounding; this only guards against a broken autocast path
    assert torch.isfinite(b).all() and float((a - b).abs().mean()) < 0.15


def test_frozen_eval(teacher):
    assert all(not p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training and not teacher.unet.training and not teacher.autoencoder.training


def test_bad_inputs(teacher):
    with pytest.raises(ValueError, match=r'\(B, 3, H, W\)'):
        teacher.sample(torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match=r'\[0, 1\]'):
        teacher.sample(torch.rand(1, 3, 8, 8) * 255)
    with pytest.raises(ValueError, match='float'):
        teacher.sample(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))


def _with(opt, block, key, value):
    opt = copy.deepcopy(opt)
    if value is None:
        opt[block].pop(key)
    else:
        opt[block][key] = value
    return opt


@pytest.mark.parametrize('block, key, value, match, exc', [
    ('sampler', 'precision', 'fp64', r'sampler\.precision', OptionError),
    ('sampler', 'precision', 'fp16', r'sampler\.precision.*CUDA', OptionError),
    ('sampler', 'chop_stride', 600, r'sampler\.chop_stride', OptionError),
    ('sampler', 'chop_size', 0, r'sampler\.chop_size', OptionError),
    ('sampler', 'pad_multiple', 'x', r'sampler\.pad_multiple', OptionError),
    ('sampler', 'steps', 16, r'sampler\.steps', OptionError),
    ('sampler', 'steps', 0, r'sampler\.steps', OptionError),
    ('sampler', 'device', 'tpu', r'sampler\.device', OptionError),
    ('sampler', 'foo', 1, r'sampler\.foo', OptionError),
    ('diffusion', 'kappa', 'big', r'diffusion\.kappa', OptionError),
    ('diffusion', 'foo', 1, r'diffusion\.foo', OptionError),
    ('unet', 'type', 'NoSuchNet', r'unet\.type', OptionError),
    ('unet', 'type', None, r'unet\.type', OptionError),
    ('unet', 'ckpt', None, r'unet\.ckpt', OptionError),
    ('autoencoder', 'ckpt', '', r'autoencoder\.ckpt', OptionError),
    ('unet', 'model_channelz', 3, r'unet', OptionError),
])
def test_bad_options_name_the_key(tiny_opt, block, key, value, match, exc):
    with pytest.raises(exc, match=match):
        ResShiftTeacher.from_options(_with(tiny_opt, block, key, value))


def test_bad_blocks(tiny_opt):
    opt = copy.deepcopy(tiny_opt)
    opt['teacher'] = {}
    with pytest.raises(OptionError, match='teacher'):
        ResShiftTeacher.from_options(opt)
    opt = copy.deepcopy(tiny_opt)
    del opt['diffusion']
    with pytest.raises(OptionError, match='diffusion'):
        ResShiftTeacher.from_options(opt)
    with pytest.raises(FileNotFoundError, match='no_such.yml'):
        ResShiftTeacher.from_options('no_such.yml')


def test_shipped_options_are_the_official_realsr_config():
    with open(OPT_PATH, encoding='utf-8') as f:
        opt = yaml.safe_load(f)
    # official configs/realsr_swinunet_realesrgan256.yaml
    assert opt['diffusion'] == dict(sf=4, schedule_name='exponential', schedule_kwargs={'power': 0.3}, etas_end=0.99,
                                    steps=15, min_noise_level=0.04, kappa=2.0, weighted_mse=False,
                                    predict_type='xstart', timestep_respacing=None, scale_factor=1.0,
                                    normalize_input=True, latent_flag=True)
    unet = dict(opt['unet'])
    assert unet.pop('type') == 'ResShiftUNet' and unet.pop('ckpt') == 'weights/resshift_realsrx4_s15_v1.pth'
    assert unet == dict(image_size=64, in_channels=3, model_channels=160, out_channels=3,
                        attention_resolutions=[64, 32, 16, 8], dropout=0, channel_mult=[1, 2, 2, 4],
                        num_res_blocks=[2, 2, 2, 2], conv_resample=True, dims=2, use_fp16=False, num_head_channels=32,
                        use_scale_shift_norm=True, resblock_updown=False, swin_depth=2, swin_embed_dim=192,
                        window_size=8, mlp_ratio=4, cond_lq=True, lq_size=64)
    ae = dict(opt['autoencoder'])
    assert ae.pop('type') == 'VQAutoencoder' and ae.pop('ckpt') == 'weights/autoencoder_vq_f4.pth'
    assert ae == dict(embed_dim=3, n_embed=8192, ddconfig=dict(
        double_z=False, z_channels=3, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4],
        num_res_blocks=2, attn_resolutions=[], dropout=0.0, padding_mode='zeros'))
    # official inference_resshift.py defaults for real-SR
    assert opt['sampler']['chop_size'] == 512 and opt['sampler']['chop_stride'] == 448
    assert opt['sampler']['pad_multiple'] == 64


def test_missing_checkpoint_message(tmp_path):
    with open(OPT_PATH, encoding='utf-8') as f:
        opt = yaml.safe_load(f)
    opt['unet']['ckpt'] = str(tmp_path / 'resshift_realsrx4_s15_v1.pth')
    opt['sampler']['device'] = 'cpu'
    with pytest.raises(FileNotFoundError) as info:
        ResShiftTeacher.from_options(opt)
    msg = str(info.value)
    assert 'resshift_realsrx4_s15_v1.pth' in msg and 'unet.ckpt' in msg
    assert 'https://github.com/zsyOAOA/ResShift/releases/download/v2.0/resshift_realsrx4_s15_v1.pth' in msg


def test_checkpoint_keys(ref, tiny_opt, tmp_path):
    # extra keys in a file are ignored (as the official loader); missing or reshaped keys are errors
    from dtkd_arch.checkpoint import CheckpointMismatchError

    sd = torch.load(tiny_opt['unet']['ckpt'], weights_only=True)
    extra = dict(sd, **{'loss.discriminator.weight': torch.zeros(2)})
    torch.save({'state_dict': extra}, str(tmp_path / 'extra.pth'))
    t = ResShiftTeacher.from_options(_with(tiny_opt, 'unet', 'ckpt', str(tmp_path / 'extra.pth')))
    assert torch.equal(t.unet.state_dict()['out.2.weight'], sd['out.2.weight'])
    missing = {k: v for k, v in sd.items() if k != 'out.2.weight'}
    torch.save(missing, str(tmp_path / 'missing.pth'))
    with pytest.raises(CheckpointMismatchError, match=r'out\.2\.weight'):
        ResShiftTeacher.from_options(_with(tiny_opt, 'unet', 'ckpt', str(tmp_path / 'missing.pth')))


def test_unsafe_yaml_is_not_executed(tmp_path):
    path = tmp_path / 'evil.yml'
    marker = tmp_path / 'ran'
    path.write_text(f"unet: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(OptionError, match='no python tags'):
        ResShiftTeacher.from_options(str(path))
    assert not marker.exists()
