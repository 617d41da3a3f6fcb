"""ResShiftModel: the official ResShift training objective, fitting, checkpoints and the BasicSR runner.

The loss is checked against a direct NumPy/torch computation of the official formulas
(github.com/zsyOAOA/ResShift: ``models/script_util.py`` / ``gaussian_diffusion.py``): the
exponential sqrt(eta) schedule, ``x_t = x_0 + eta_t (y - x_0) + kappa sqrt(eta_t) eps``, the
``_scale_input`` normalisation and the per-sample MSE to x_0, with and without ``weighted_mse``.
"""
import glob
import math
import re

import numpy as np
import pytest
import torch

import dtkd_arch  # noqa: F401,I001
import dtkd_compat  # noqa: F401  (before basicsr)
import dtkd_model  # noqa: F401
from conftest import run_cli, write_yaml
from dtkd_arch.resshift_unet_arch import ResShiftUNet
from dtkd_arch.vq_autoencoder_arch import VQAutoencoder
from dtkd_model.resshift_model import OptionError, ResShiftModel

# pixel space: the network works at HR size (16x16 here) and sees the up-sampled LR (lq_size == image_size)
TINY_UNET_PIXEL = dict(type='ResShiftUNet', image_size=16, in_channels=3, model_channels=32, out_channels=3,
                       attention_resolutions=[8], dropout=0, channel_mult=[1, 2], num_res_blocks=1,
                       conv_resample=True, dims=2, use_fp16=False, num_head_channels=16, use_scale_shift_norm=True,
                       resblock_updown=False, swin_depth=1, swin_embed_dim=32, window_size=4, mlp_ratio=2,
                       cond_lq=True, lq_size=16)
# latent space: a 4x VQ autoencoder, so the latent of a 32x32 GT is 8x8, the LR size
TINY_UNET_LATENT = dict(TINY_UNET_PIXEL, image_size=8, lq_size=8, attention_resolutions=[4])
TINY_VQ = dict(embed_dim=3, n_embed=32,
               ddconfig=dict(double_z=False, z_channels=3, resolution=32, in_channels=3, out_ch=3, ch=32,
                             ch_mult=[1, 1, 1], num_res_blocks=1, attn_resolutions=[], dropout=0.0))
DIFFUSION = dict(sf=4, schedule_name='exponential', schedule_kwargs={'power': 0.3}, etas_end=0.99, steps=4,
                 min_noise_level=0.04, kappa=2.0, weighted_mse=False, predict_type='xstart', timestep_respacing=None,
                 scale_factor=1.0, normalize_input=True, latent_flag=True)


def photo_batch(n=2, size=16):
    """(n, 3, size, size) GT crops of real photographs in [0, 1] and their x4 bicubic LR (torch)."""
    from conftest import photo

    imgs = [photo('astronaut')[100:100 + size, 180:180 + size], photo('coffee')[150:150 + size, 200:200 + size],
            photo('chelsea')[80:80 + size, 200:200 + size]][:n]
    gt = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255
    lq = torch.nn.functional.interpolate(gt, scale_factor=0.25, mode='bicubic', antialias=True).clamp(0, 1)
    return lq, gt


@pytest.fixture(scope='module')
def vq_ckpt(tmp_path_factory):
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp('vq') / 'tiny_vq.pth'
    torch.save(VQAutoencoder(**TINY_VQ).state_dict(), path)  # a bare state dict, as the released file
    return str(path)


def model_options(latent, vq_ckpt=None, lr=1e-3, ema=0.0, weighted=False, optim='AdamW', pretrain=None):
    diffusion = dict(DIFFUSION, weighted_mse=weighted, latent_flag=latent)
    return {
        'name': 'resshift_unit', 'model_type': 'ResShiftModel', 'scale': 4, 'num_gpu': 0, 'is_train': True,
        'dist': False, 'rank': 0, 'world_size': 1,
        'network_g': dict(TINY_UNET_LATENT if latent else TINY_UNET_PIXEL),
        'autoencoder': dict(type='VQAutoencoder', ckpt=vq_ckpt, **TINY_VQ) if latent else None,
        'diffusion': diffusion,
        'path': {'pretrain_network_g': pretrain, 'strict_load_g': True, 'resume_state': None},
        'train': {'ema_decay': ema, 'optim_g': {'type': optim, 'lr': lr, 'weight_decay': 0},
                  'scheduler': {'type': 'MultiStepLR', 'milestones': [10000], 'gamma': 0.5}, 'total_iter': 100},
        'val': {'steps': None, 'seed': 0},
    }


def official_loss(net, lq, gt, t, noise, opt, autoencoder=None):
    """Direct computation of the official per-sample loss for fixed t (indices) and noise."""
    d = opt['diffusion']
    steps, kappa = d['steps'], d['kappa']
    # models/gaussian_diffusion.py: get_named_eta_schedule('exponential')
    etas_start = min(d['min_noise_level'] / kappa, d['min_noise_level'])
    increaser = math.exp(1 / (steps - 1) * math.log(d['etas_end'] / etas_start))
    power_timestep = np.linspace(0, 1, steps, endpoint=True) ** d['schedule_kwargs']['power'] * (steps - 1)
    sqrt_etas = np.power(np.ones(steps) * increaser, power_timestep) * etas_start
    etas = sqrt_etas ** 2
    x0, y = gt * 2 - 1, torch.nn.functional.interpolate(lq * 2 - 1, scale_factor=4, mode='bicubic')
    cond = lq * 2 - 1
    if autoencoder is not None:
        with torch.no_grad():
            x0, y = autoencoder.encode(x0), autoencoder.encode(y)
    else:
        cond = y
    e = torch.tensor(etas[t.numpy()], dtype=torch.float32).view(-1, 1, 1, 1)
    se = torch.tensor(sqrt_etas[t.numpy()], dtype=torch.float32).view(-1, 1, 1, 1)
    x_t = x0 + e * (y - x0) + kappa * se * noise
    if d['latent_flag']:
        net_in = x_t / torch.sqrt(e * kappa ** 2 + 1)
    else:
        net_in = x_t / (se * kappa * 3 + 1)
    mse = ((net(net_in, t, lq=cond) - x0) ** 2).mean(dim=(1, 2, 3))
    if d['weighted_mse']:
        etas_prev = np.append(0.0, etas[:-1])
        alpha = etas - etas_prev
        post_var = kappa ** 2 * etas_prev / etas * alpha
        post_var_clipped = np.append(post_var[1], post_var[1:])
        weights = 0.5 / post_var_clipped * (alpha / etas) ** 2
        mse = mse * torch.tensor(weights[t.numpy()], dtype=torch.float32)
    return mse


@pytest.mark.parametrize('latent,weighted', [(False, False), (False, True), (True, False)])
def test_loss_equals_the_official_formula(latent, weighted, vq_ckpt):
    torch.manual_seed(0)
    opt = model_options(latent, vq_ckpt, weighted=weighted)
    model = ResShiftModel(opt)
    lq, gt = photo_batch(3, 32 if latent else 16)
    t = torch.tensor([0, 2, 3])
    shape = (3, 3, 8, 8) if latent else (3, 3, 16, 16)
    noise = torch.randn(shape)
    inputs = model.diffusion_inputs(lq, gt, t=t, noise=noise)
    with torch.no_grad():
        ours = model.diffusion_loss(model.net_g, inputs)
        ref = official_loss(model.net_g, lq, gt, t, noise, opt, model.autoencoder)
    assert ours.shape == (3,)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('latent', [False, True])
def test_fits_a_fixed_batch(latent, vq_ckpt):
    torch.manual_seed(0)
    model = ResShiftModel(model_options(latent, vq_ckpt, lr=2e-3))
    lq, gt = photo_batch(2, 32 if latent else 16)
    model.feed_data({'lq': lq, 'gt': gt})
    losses = []
    for it in range(1, 16):
        model.optimize_parameters(it)
        losses.append(model.get_current_log()['l_mse'])
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert all(np.isfinite(losses))
    assert last < 0.5 * first, (first, last)


def test_official_layout_checkpoint_loads_and_adamw(tmp_path):
    """A bare state dict (the released ResShift layout, with DDP's 'module.' prefix) is accepted as
    path.pretrain_network_g, for net_g and for its EMA copy; AdamW is the optimizer."""
    torch.manual_seed(1)
    src = ResShiftUNet(**{k: v for k, v in TINY_UNET_PIXEL.items() if k != 'type'})
    path = tmp_path / 'official_like.pth'
    torch.save({f'module.{k}': v for k, v in src.state_dict().items()}, path)
    model = ResShiftModel(model_options(False, pretrain=str(path), ema=0.999))
    for net in (model.net_g, model.net_g_ema):
        for k, v in src.state_dict().items():
            assert torch.equal(net.state_dict()[k], v), k
    assert isinstance(model.optimizer_g, torch.optim.AdamW)

    bad = dict(TINY_UNET_PIXEL, model_channels=64)
    opt = model_options(False, pretrain=str(path))
    opt['network_g'] = bad
    with pytest.raises(OptionError, match='shape differences'):
        ResShiftModel(opt)


def test_option_errors_name_the_key(vq_ckpt):
    opt = model_options(False)
    del opt['autoencoder']
    with pytest.raises(OptionError, match='autoencoder'):
        ResShiftModel(opt)
    opt = model_options(False, optim='SGD')
    with pytest.raises(OptionError, match='train.optim_g.type'):
        ResShiftModel(opt)
    opt = model_options(True, None)
    with pytest.raises(OptionError, match='autoencoder.ckpt'):
        ResShiftModel(opt)
    opt = model_options(False)
    opt['network_g'] = dict(TINY_UNET_PIXEL, lq_size=8)
    with pytest.raises(OptionError, match='network_g.lq_size'):
        ResShiftModel(opt)
    opt = model_options(False)
    opt['diffusion'] = dict(DIFFUSION, kappa=-1)
    with pytest.raises(OptionError, match='diffusion.kappa'):
        ResShiftModel(opt)


def runner_options(data_root, name, latent, vq_ckpt, total_iter, save_freq):
    opt = model_options(latent, vq_ckpt, ema=0.9)
    for key in ('is_train', 'dist', 'rank', 'world_size'):
        del opt[key]
    opt['name'] = name
    opt['manual_seed'] = 0
    opt['train']['total_iter'] = total_iter
    opt['train']['warmup_iter'] = -1
    opt['datasets'] = {
        'train': {'name': 'tiny', 'type': 'PairedTeacherDataset', 'dataroot_gt': str(data_root / 'train_gt'),
                  'dataroot_lq': str(data_root / 'train_lq'), 'io_backend': {'type': 'disk'}, 'gt_size': 32,
                  'use_hflip': True, 'use_rot': False, 'num_worker_per_gpu': 0, 'batch_size_per_gpu': 2,
                  'dataset_enlarge_ratio': 4, 'prefetch_mode': None},
        'val': {'name': 'tinyval', 'type': 'PairedTeacherDataset', 'dataroot_gt': str(data_root / 'val_gt'),
                'dataroot_lq': str(data_root / 'val_lq'), 'io_backend': {'type': 'disk'}},
    }
    opt['val'] = {'val_freq': total_iter, 'save_img': True, 'steps': 2, 'seed': 0,
                  'metrics': {'psnr': {'type': 'calculate_psnr', 'crop_border': 4, 'test_y_channel': True}}}
    opt['logger'] = {'print_freq': 1, 'save_checkpoint_freq': save_freq, 'use_tb_logger': False,
                     'wandb': {'project': None, 'resume_id': None}}
    return opt


LOG = re.compile(r'iter:\s*(\d+),.*?l_mse: (\S+)')


@pytest.mark.slow
@pytest.mark.parametrize('latent', [False, True], ids=['pixel', 'latent'])
def test_runner_trains_saves_validates_and_resumes(latent, tiny_pairs, vq_ckpt, tmp_path):
    name = f"resshift_{'latent' if latent else 'pixel'}"
    opt = runner_options(tiny_pairs, name, latent, vq_ckpt, total_iter=4, save_freq=2)
    yml = write_yaml(tmp_path / 'train.yml', opt)
    proc = run_cli(['-m', 'dtkd.train', '-opt', yml], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    exp = tmp_path / 'experiments' / name
    ckpt = torch.load(exp / 'models' / 'net_g_4.pth', weights_only=True)
    assert set(ckpt) == {'params', 'params_ema'}
    ref = ResShiftUNet(**{k: v for k, v in opt['network_g'].items() if k != 'type'}).state_dict()
    assert set(ckpt['params']) == set(ref)
    log = open(glob.glob(str(exp / 'train_*.log'))[0]).read()
    assert sorted(int(m.group(1)) for m in LOG.finditer(log)) == [1, 2, 3, 4]
    assert re.search(r'# psnr: (\d+\.\d+)', log), log[-1500:]
    saved = glob.glob(str(exp / 'visualization' / 'chelsea' / '*.png'))
    import cv2

    assert saved and cv2.imread(saved[0]).shape == (52, 40, 3)  # 13x10 LR, padded for the network, cropped back
    if latent:
        # the saved checkpoint is a teacher: ResShiftTeacher takes its EMA weights and, with the
        # validation's sampler settings and seed, reproduces the saved validation image
        from dtkd_teacher.teacher import ResShiftTeacher

        teacher = ResShiftTeacher.from_options({
            'unet': {**opt['network_g'], 'ckpt': str(exp / 'models' / 'net_g_latest.pth')},
            'autoencoder': opt['autoencoder'], 'diffusion': opt['diffusion'],
            'sampler': {'steps': 2, 'pad_multiple': 8, 'device': 'cpu'}})
        lq = cv2.imread(str(tiny_pairs / 'val_lq' / 'chelsea.png'))[:, :, ::-1] / 255.0
        lq = torch.from_numpy(np.ascontiguousarray(lq)).permute(2, 0, 1)[None].float()
        out = teacher.sample(lq, generator=torch.Generator().manual_seed(0))[0].permute(1, 2, 0).numpy()
        val_img = cv2.imread(saved[0])[:, :, ::-1] / 255.0
        assert np.abs(out - val_img).max() <= 1 / 255 + 1e-6

    if not latent:
        return  # resuming does not depend on the space; checked once, below
    # resume from iteration 2: same optimizer state file, continues at iteration 3
    (exp / 'training_states' / '4.state').unlink()
    proc = run_cli(['-m', 'dtkd.train', '-opt', yml, '--auto_resume'], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    logs = sorted(glob.glob(str(exp / 'train_*.log')))
    resumed = open(logs[-1]).read()
    assert 'iter: 2.' in resumed and re.search(r'Loading \w+ model from .*net_g_2\.pth', resumed)
    assert sorted(int(m.group(1)) for m in LOG.finditer(resumed)) == [3, 4]
