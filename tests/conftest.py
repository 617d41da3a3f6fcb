"""Shared fixtures: tiny paired data sets cut from real photographs that scikit-image ships."""
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import yaml

import dtkd_compat  # noqa: F401  (loaded before any test module, so basicsr imports anywhere in tests work)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Slow tests (see pyproject.toml's markers) in modules that do not import pytest, so that a
# ``@pytest.mark.slow`` line there would need an import too: (module file, test function).
SLOW_ELSEWHERE = {('test_demo.py', 'test_demo_pipeline_tiny')}  # the demo end to end (minutes)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if (os.path.basename(str(item.fspath)), getattr(item, 'originalname', item.name)) in SLOW_ELSEWHERE:
            item.add_marker(pytest.mark.slow)


def photo(name):
    """An RGB uint8 photograph from ``skimage.data`` (no download needed)."""
    import skimage.data

    img = getattr(skimage.data, name)()
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return img[..., :3]


def bicubic_down(img_rgb, scale):
    """MATLAB-style bicubic down-sampling of an RGB uint8 image (BasicSR's ``imresize``)."""
    from basicsr.utils.matlab_functions import imresize

    out = imresize(img_rgb.astype(np.float32) / 255.0, 1 / scale)
    return np.clip(np.round(out * 255.0), 0, 255).astype(np.uint8)


def write_rgb(path, img_rgb):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    cv2.imwrite(path, cv2.cvtColor(img_rgb, cv2.COLOR_RGB2BGR))


@pytest.fixture(scope='session')
def tiny_pairs(tmp_path_factory):
    """Folders of GT / x4 LQ / teacher images.

    train: six 64x64 GT crops (16x16 LQ); the teacher is a slightly sharpened GT, standing in for
    a diffusion teacher's output. val: one image whose LQ (13x10) is not a multiple of 8.
    """
    root = tmp_path_factory.mktemp('tiny_pairs')
    crops = [('astronaut', 100, 180), ('coffee', 150, 200), ('chelsea', 80, 200), ('rocket', 100, 300),
             ('astronaut', 300, 300), ('coffee', 50, 400)]
    for i, (name, y, x) in enumerate(crops):
        gt = photo(name)[y:y + 64, x:x + 64]
        blur = cv2.GaussianBlur(gt, (0, 0), 1.0)
        teacher = np.clip(gt.astype(np.float32) * 1.5 - blur * 0.5, 0, 255).astype(np.uint8)
        write_rgb(str(root / 'train_gt' / f'{i:04d}.png'), gt)
        write_rgb(str(root / 'train_lq' / f'{i:04d}.png'), bicubic_down(gt, 4))
        write_rgb(str(root / 'train_teacher' / f'{i:04d}.png'), teacher)
    gt = photo('chelsea')[100:152, 150:190]  # 52x40 -> LQ 13x10
    write_rgb(str(root / 'val_gt' / 'chelsea.png'), gt)
    write_rgb(str(root / 'val_lq' / 'chelsea.png'), bicubic_down(gt, 4))
    return root


TINY_STUDENT = {
    'type': 'SwinIR', 'upscale': 4, 'in_chans': 3, 'img_size': 16, 'window_size': 8, 'img_range': 1.0,
    'depths': [2], 'embed_dim': 12, 'num_heads': [2], 'mlp_ratio': 2, 'upsampler': 'pixelshuffledirect',
    'resi_connection': '1conv',
}


def train_options(data_root, name, total_iter=4, kd_opt=None, kd_schedule=None, teacher=True, save_freq=2):
    """A tiny training option dict in the layout of options/train_dtkd.yml."""
    train_set = {
        'name': 'tiny', 'type': 'PairedTeacherDataset', 'dataroot_gt': str(data_root / 'train_gt'),
        'dataroot_lq': str(data_root / 'train_lq'), 'io_backend': {'type': 'disk'}, 'gt_size': 32,
        'use_hflip': True, 'use_rot': True, 'num_worker_per_gpu': 0, 'batch_size_per_gpu': 2,
        'dataset_enlarge_ratio': 4, 'prefetch_mode': None,
    }
    if teacher:
        train_set['dataroot_teacher'] = str(data_root / 'train_teacher')
    train = {
        'ema_decay': 0, 'optim_g': {'type': 'Adam', 'lr': 2e-4, 'betas': [0.9, 0.99]},
        'scheduler': {'type': 'MultiStepLR', 'milestones': [1000], 'gamma': 0.5}, 'total_iter': total_iter,
        'warmup_iter': -1, 'pixel_opt': {'type': 'L1Loss', 'loss_weight': 1.0, 'reduction': 'mean'},
    }
    if kd_opt is not None:
        train['kd_opt'] = kd_opt
    if kd_schedule is not None:
        train['kd_schedule'] = kd_schedule
    return {
        'name': name, 'model_type': 'DTKDModel', 'scale': 4, 'num_gpu': 0, 'manual_seed': 0,
        'datasets': {
            'train': train_set,
            'val': {'name': 'tinyval', 'type': 'PairedTeacherDataset', 'dataroot_gt': str(data_root / 'val_gt'),
                    'dataroot_lq': str(data_root / 'val_lq'), 'io_backend': {'type': 'disk'}},
        },
        'network_g': dict(TINY_STUDENT),
        'path': {'pretrain_network_g': None, 'strict_load_g': True, 'resume_state': None},
        'train': train,
        'val': {'val_freq': total_iter, 'save_img': True,
                'metrics': {'psnr': {'type': 'calculate_psnr', 'crop_border': 4, 'test_y_channel': True}}},
        'logger': {'print_freq': 1, 'save_checkpoint_freq': save_freq, 'use_tb_logger': True,
                   'wandb': {'project': None, 'resume_id': None}},
    }


def write_yaml(path, opt):
    with open(path, 'w') as f:
        yaml.safe_dump(opt, f, sort_keys=False)
    return str(path)


def tiny_teacher_options(root, seed=123, steps=2, edit_state=None):
    """``tests/data/options/tiny_teacher.yml`` as a dict whose ``ckpt`` keys point at seeded random weights
    saved under ``root`` (``unet.pth``, ``autoencoder.pth``), with ``sampler.steps = steps``.

    edit_state(block, state_dict), if given, may change a state dict in place before it is saved.
    """
    import torch
    from basicsr.utils.registry import ARCH_REGISTRY

    import dtkd_arch  # noqa: F401  (registers the architectures)

    with open(os.path.join(REPO, 'tests', 'data', 'options', 'tiny_teacher.yml')) as f:
        opt = yaml.safe_load(f)
    torch.manual_seed(seed)
    for block in ('unet', 'autoencoder'):
        params = {k: v for k, v in opt[block].items() if k not in ('type', 'ckpt')}
        state = ARCH_REGISTRY.get(opt[block]['type'])(**params).state_dict()
        if edit_state is not None:
            edit_state(block, state)
        path = os.path.join(str(root), f'{block}.pth')
        torch.save(state, path)
        opt[block]['ckpt'] = path
    opt['sampler']['steps'] = steps
    return opt


def read_keys(name):
    """[(key, shape)] from a ``tests/data`` key list (one ``key<TAB>(d0, d1, ...)`` per line)."""
    rows = []
    with open(os.path.join(REPO, 'tests', 'data', name)) as f:
        for line in f:
            key, shape = line.rstrip('\n').split('\t')
            rows.append((key, tuple(int(s) for s in shape.strip('()').split(',') if s.strip())))
    return rows


def _on_one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """torch on one CPU thread during the test (e.g. to compare bytes with forked children, which use one);
    the previous thread count is restored afterwards, so later tests are not slowed down."""
    yield from _on_one_thread()


@pytest.fixture(scope='module')
def one_thread_module():
    """``one_thread`` for a whole module (``pytestmark = pytest.mark.usefixtures('one_thread_module')``):
    tiny networks gain nothing from threads, spinning threads slow down a shared machine, and equal thread
    counts keep float reductions equal to those of subprocess runs with OMP_NUM_THREADS=1."""
    yield from _on_one_thread()


def run_cli(args, cwd, env_extra=None, timeout=300):
    """Run a command with the repository importable; returns the CompletedProcess (text)."""
    env = dict(os.environ)
    env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
    env.setdefault('OMP_NUM_THREADS', '1')
    env.update(env_extra or {})
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
