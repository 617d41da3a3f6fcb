"""The demo teacher's pieces: the space-to-depth first stage, pixel-space sampling, and the committed
checkpoint with its option files."""
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

import dtkd_arch  # noqa: F401,I001
import dtkd_compat  # noqa: F401  (before basicsr)
import dtkd_model  # noqa: F401
from conftest import REPO, photo
from dtkd_arch.resshift_unet_arch import ResShiftUNet
from dtkd_arch.space_to_depth_arch import SpaceToDepthAutoencoder
from dtkd_model.resshift_model import ResShiftModel
from dtkd_teacher.teacher import OptionError, ResShiftTeacher

DEMO_TEACHER = os.path.join(REPO, 'options', 'demo', 'resshift_demo_x4.yml')
DEMO_TRAIN = os.path.join(REPO, 'options', 'demo', 'train_resshift_demo.yml')
PIXEL_UNET = dict(image_size=16, in_channels=3, model_channels=32, out_channels=3, attention_resolutions=[8],
                  dropout=0, channel_mult=[1, 2], num_res_blocks=1, conv_resample=True, dims=2, use_fp16=False,
                  num_head_channels=16, use_scale_shift_norm=True, resblock_updown=False, swin_depth=1,
                  swin_embed_dim=32, window_size=4, mlp_ratio=2, cond_lq=True, lq_size=16)
DIFFUSION = dict(sf=4, schedule_name='exponential', schedule_kwargs={'power': 0.3}, etas_end=0.99, steps=4,
                 min_noise_level=0.04, kappa=2.0, weighted_mse=False, predict_type='xstart', timestep_respacing=None,
                 scale_factor=1.0, normalize_input=True, latent_flag=False)


def test_space_to_depth_is_the_block_fold_and_exactly_invertible():
    ae = SpaceToDepthAutoencoder(factor=4)
    x = torch.rand(2, 3, 8, 12)
    z = ae.encode(x)
    assert z.shape == (2, 48, 2, 3)
    # channel c * 16 + dy * 4 + dx of latent pixel (i, j) is image pixel (c, 4 i + dy, 4 j + dx)
    for c, dy, dx, i, j in [(0, 0, 0, 0, 0), (2, 3, 1, 1, 2), (1, 2, 3, 0, 1)]:
        assert z[1, c * 16 + dy * 4 + dx, i, j] == x[1, c, 4 * i + dy, 4 * j + dx]
    assert torch.equal(ae.decode(z), x)
    assert not list(ae.parameters()) and not ae.state_dict()
    with pytest.raises(ValueError, match='multiples of 4'):
        ae.encode(torch.rand(1, 3, 6, 8))


def test_pixel_space_teacher_conditions_on_the_upsampled_lr():
    """One step from the prior (the 1-step variant), written out with ResShift's formulas: the UNet,
    which works at HR size, sees the bicubic x4 LR image (as ResShiftModel trains it)."""
    torch.manual_seed(0)
    unet = ResShiftUNet(**PIXEL_UNET).eval()
    teacher = ResShiftTeacher(unet, None, DIFFUSION, steps=1, pad_multiple=4, device='cpu')
    lq = torch.rand(1, 3, 4, 4)
    out = teacher.sample(lq, generator=torch.Generator().manual_seed(7))

    y = lq * 2 - 1
    up = F.interpolate(y, scale_factor=4, mode='bicubic')
    noise = torch.randn(up.shape, generator=torch.Generator().manual_seed(7))
    kappa, sqrt_eta_T = 2.0, 0.99
    x_T = up + kappa * sqrt_eta_T * noise
    inputs = x_T / (sqrt_eta_T * kappa * 3 + 1)  # pixel-space input scaling (official _scale_input)
    with torch.no_grad():
        x0 = unet(inputs, torch.tensor([3]), lq=up).clamp(-1, 1)
    torch.testing.assert_close(out, x0 * 0.5 + 0.5, atol=1e-5, rtol=0)


def test_first_stage_without_weights_needs_no_checkpoint(tmp_path):
    opt = yaml.safe_load(open(DEMO_TEACHER))
    assert 'ckpt' not in opt['autoencoder']
    torch.manual_seed(0)
    unet = dict(opt['unet'], ckpt=str(tmp_path / 'unet.pth'))
    params = {k: v for k, v in unet.items() if k not in ('type', 'ckpt')}
    torch.save(ResShiftUNet(**params).state_dict(), unet['ckpt'])
    teacher = ResShiftTeacher.from_options(dict(opt, unet=unet, sampler={'steps': 2, 'device': 'cpu'}))
    assert isinstance(teacher.autoencoder, SpaceToDepthAutoencoder)
    assert teacher.sample(torch.rand(1, 3, 16, 16)).shape == (1, 3, 64, 64)
    # networks with weights still need theirs
    with pytest.raises(OptionError, match=r'unet\.ckpt'):
        ResShiftTeacher.from_options(dict(opt, unet={k: v for k, v in unet.items() if k != 'ckpt'}))


def test_demo_recipe_and_teacher_options_agree():
    train = yaml.safe_load(open(DEMO_TRAIN))
    teacher = yaml.safe_load(open(DEMO_TEACHER))
    assert train['model_type'] == 'ResShiftModel'
    assert {k: v for k, v in teacher['unet'].items() if k != 'ckpt'} == train['network_g']
    assert teacher['autoencoder'] == train['autoencoder']
    assert teacher['diffusion'] == train['diffusion']
    # the released model's process: 15 steps, kappa 2, exponential schedule (power 0.3), x_0 prediction
    released = yaml.safe_load(open(os.path.join(REPO, 'options', 'teacher', 'resshift_realsr_x4.yml')))
    assert teacher['diffusion'] == released['diffusion']
    # options a ResShiftModel accepts (gt_size fits the latent and the UNet's window multiple)
    ResShiftModel._check_options(dict(train, is_train=True))


def psnr(a, b):
    return float(-10 * torch.log10(((a - b) ** 2).mean()))


def detail(img):
    """Mean squared Laplacian: the high-frequency energy of an image."""
    lap = torch.tensor([[0., 1, 0], [1, -4, 1], [0, 1, 0]]).view(1, 1, 3, 3).repeat(3, 1, 1, 1)
    return float(F.conv2d(img, lap, groups=3).pow(2).mean())


def test_committed_demo_teacher_is_a_trained_generative_model(one_thread):
    """The committed checkpoint loads strictly into the option file's network and is trained: on
    held-out photographs (not in the demo's training set; x4 MATLAB bicubic LR, as the demo's data) its
    15-step output is near bicubic interpolation in PSNR and far from the untrained network's, and it
    synthesises high-frequency detail that bicubic interpolation lacks (what the students distil)."""
    from basicsr.utils.matlab_functions import imresize

    ckpt = os.path.join(REPO, 'weights', 'demo_resshift_x4.pth')
    assert os.path.getsize(ckpt) < 20 * 2**20
    teacher = ResShiftTeacher.from_options(DEMO_TEACHER, device='cpu')
    assert 2.8e6 < sum(p.numel() for p in teacher.unet.parameters()) < 2.9e6
    opt = yaml.safe_load(open(DEMO_TEACHER))
    torch.manual_seed(0)
    untrained = ResShiftTeacher(ResShiftUNet(**{k: v for k, v in opt['unet'].items() if k not in ('type', 'ckpt')}),
                                teacher.autoencoder, opt['diffusion'], pad_multiple=16, device='cpu')
    for name, (y, x) in (('coffee', (150, 300)), ('chelsea', (60, 180)), ('camera', (100, 100))):
        gt_np = photo(name)[y:y + 96, x:x + 96].astype(np.float64) / 255
        lq_np = np.clip(np.round(imresize(gt_np, 0.25) * 255), 0, 255) / 255
        gt = torch.from_numpy(gt_np).permute(2, 0, 1)[None].float()
        lq = torch.from_numpy(lq_np).permute(2, 0, 1)[None].float()
        sr = teacher.sample(lq, generator=torch.Generator().manual_seed(0))
        bic = F.interpolate(lq, scale_factor=4, mode='bicubic').clamp(0, 1)
        raw = untrained.sample(lq, generator=torch.Generator().manual_seed(0))
        # measured: PSNR 22.5 / 24.9 / 26.1 dB (bicubic 24.5 / 28.0 / 25.4, untrained 8.2 / 11.1 / 7.4);
        # detail 5-25x bicubic's, 0.2-0.3x the ground truth's
        assert psnr(sr, gt) > psnr(raw, gt) + 10, name
        assert psnr(sr, gt) > psnr(bic, gt) - 4, name
        assert 3 * detail(bic) < detail(sr) < detail(gt), name


def test_export_weights_keeps_the_ema_entry(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location('export_weights', os.path.join(REPO, 'scripts', 'export_weights.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    params = {'a': torch.rand(3, 4), 'b': torch.rand(5)}
    ema = {'a': torch.rand(3, 4), 'b': torch.rand(5)}
    src = tmp_path / 'net_g_latest.pth'
    torch.save({'params': params, 'params_ema': ema}, src)
    out = tmp_path / 'w' / 'bare.pth'
    assert module.main([str(src), str(out)]) == 0
    got = torch.load(out, weights_only=True)
    assert set(got) == {'a', 'b'} and all(torch.equal(got[k], ema[k]) for k in ema)
    assert module.main([str(src), str(out), '--key', 'params']) == 0
    assert torch.equal(torch.load(out, weights_only=True)['a'], params['a'])
    torch.save({'params': params}, src)
    assert module.main([str(src), str(tmp_path / 'x.pth')]) == 2
    assert "no 'params_ema' entry" in capsys.readouterr().err and not (tmp_path / 'x.pth').exists()
