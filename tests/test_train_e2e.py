"""End to end through the YAML files, BasicSR's registries and runners, on tiny real photographs."""
import glob
import json
import os
import re

import pytest
import torch

from conftest import run_cli, train_options, write_yaml

DWT = {'type': 'DWTKDLoss', 'loss_weight': 2.0, 'level': 2, 'wavelet': 'haar', 'group_weights': [1, 2, 1]}
LOG_LINE = re.compile(r'iter:\s*(\d+),.*?l_task: (\S+).*?lambda_kd: (\S+)')


def logged(exp_dir):
    """{iter: (l_task, lambda_kd)} from every train log in an experiment folder."""
    values = {}
    for log in sorted(glob.glob(os.path.join(exp_dir, 'train_*.log'))):
        with open(log) as f:
            for line in f:
                m = LOG_LINE.search(line)
                if m:
                    values[int(m.group(1))] = (float(m.group(2)), float(m.group(3)))
    return values


def assert_ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


@pytest.fixture(scope='module')
def trained(tiny_pairs, tmp_path_factory):
    """Six iterations of DWT distillation with checkpoints every 3; the 6th is then removed."""
    work = tmp_path_factory.mktemp('train')
    opt = train_options(tiny_pairs, 'tiny_dwt', total_iter=6, kd_opt=DWT, save_freq=3)
    yml = write_yaml(work / 'train.yml', opt)
    proc = run_cli(['-m', 'dtkd.train', '-opt', yml], cwd=work)
    assert_ok(proc)
    return work, yml


@pytest.mark.slow
def test_training_writes_checkpoints_and_logs_the_schedule(trained):
    work, _ = trained
    exp = work / 'experiments' / 'tiny_dwt'
    for it in (3, 6):
        assert (exp / 'models' / f'net_g_{it}.pth').is_file()
        assert (exp / 'training_states' / f'{it}.state').is_file()
    assert (exp / 'models' / 'net_g_latest.pth').is_file()
    values = logged(exp)
    assert sorted(values) == [1, 2, 3, 4, 5, 6]
    for it, (_, lam) in values.items():
        assert lam == pytest.approx(2.0 * it / 6, rel=1e-3)  # linear schedule, final weight 2
    text = open(glob.glob(str(exp / 'train_*.log'))[0]).read()
    for key in ('l_kd:', 'kd_LF:', 'kd_MF:', 'kd_HF:'):
        assert key in text
    # validation ran on the 13x10 LQ image (not a multiple of the window) and saved a 52x40 result
    saved = glob.glob(str(exp / 'visualization' / 'chelsea' / '*.png'))
    assert saved
    import cv2

    assert cv2.imread(saved[0]).shape == (52, 40, 3)
    assert glob.glob(str(work / 'tb_logger' / 'tiny_dwt' / 'events.*'))


@pytest.mark.slow
def test_auto_resume_continues_at_the_right_iteration_and_lambda(trained):
    work, yml = trained
    exp = work / 'experiments' / 'tiny_dwt'
    (exp / 'training_states' / '6.state').unlink()
    first = logged(exp)
    proc = run_cli(['-m', 'dtkd.train', '-opt', yml, '--auto_resume'], cwd=work)
    assert_ok(proc)
    logs = sorted(glob.glob(str(exp / 'train_*.log')))
    assert len(logs) == 2
    resumed_text = open(logs[-1]).read()
    assert 'Resuming training from epoch' in resumed_text and 'iter: 3.' in resumed_text
    resumed = {}
    for line in resumed_text.splitlines():
        m = LOG_LINE.search(line)
        if m:
            resumed[int(m.group(1))] = float(m.group(3))
    assert sorted(resumed) == [4, 5, 6]
    for it, lam in resumed.items():
        assert lam == pytest.approx(first[it][1], rel=1e-6)
    # The resumed network started from the iteration-3 weights, not from scratch.
    assert re.search(r'Loading \w+ model from .*net_g_3\.pth', resumed_text)
    w6 = torch.load(exp / 'models' / 'net_g_6.pth', weights_only=True)['params']
    assert all(torch.isfinite(v).all() for v in w6.values())


@pytest.mark.slow
def test_dtkd_test_runner_on_the_trained_student(trained, tiny_pairs):
    work, _ = trained
    opt = {
        'name': 'tiny_eval', 'model_type': 'DTKDModel', 'scale': 4, 'num_gpu': 0,
        'datasets': {'test_1': {'name': 'tinyval', 'type': 'PairedTeacherDataset',
                                'dataroot_gt': str(tiny_pairs / 'val_gt'), 'dataroot_lq': str(tiny_pairs / 'val_lq'),
                                'io_backend': {'type': 'disk'}}},
        'network_g': train_options(tiny_pairs, 'x')['network_g'],
        'path': {'pretrain_network_g': str(work / 'experiments' / 'tiny_dwt' / 'models' / 'net_g_latest.pth'),
                 'strict_load_g': True},
        'val': {'save_img': True, 'suffix': None, 'tile': {'tile_size': 8, 'tile_pad': 2},
                'metrics': {'psnr': {'type': 'calculate_psnr', 'crop_border': 4, 'test_y_channel': True}}},
    }
    yml = write_yaml(work / 'test.yml', opt)
    proc = run_cli(['-m', 'dtkd.test', '-opt', yml], cwd=work)
    assert_ok(proc)
    res = work / 'results' / 'tiny_eval'
    assert (res / 'visualization' / 'tinyval' / 'chelsea_tiny_eval.png').is_file()
    summary = json.loads((res / 'summary.json').read_text())
    assert 0 < summary['results']['tinyval']['psnr'] < 100


def test_option_errors_name_the_key(tiny_pairs, tmp_path):
    opt = train_options(tiny_pairs, 'bad', kd_opt=DWT, kd_schedule={'type': 'exponential'})
    proc = run_cli(['-m', 'dtkd.train', '-opt', write_yaml(tmp_path / 'bad.yml', opt)], cwd=tmp_path)
    assert proc.returncode != 0
    assert 'train.kd_schedule.type' in proc.stderr

    opt = train_options(tiny_pairs, 'bad2', kd_opt=DWT)
    del opt['train']['total_iter']
    proc = run_cli(['-m', 'dtkd.train', '-opt', write_yaml(tmp_path / 'bad2.yml', opt)], cwd=tmp_path)
    assert proc.returncode == 2
    assert 'train.total_iter' in proc.stderr and 'Traceback' not in proc.stderr
    assert not (tmp_path / 'experiments' / 'bad2').exists()


def test_unsafe_yaml_is_refused(tmp_path):
    marker = tmp_path / 'pwned'
    (tmp_path / 'evil.yml').write_text(f'name: !!python/object/apply:os.system ["touch {marker}"]\n')
    proc = run_cli(['-m', 'dtkd.train', '-opt', str(tmp_path / 'evil.yml')], cwd=tmp_path)
    assert proc.returncode == 2
    assert not marker.exists()
    assert 'not valid YAML' in proc.stderr


@pytest.mark.slow
def test_two_process_cpu_training_under_torchrun(tiny_pairs, tmp_path):
    opt = train_options(tiny_pairs, 'tiny_ddp', total_iter=2, kd_opt=DWT, save_freq=2)
    opt['val'] = None
    yml = write_yaml(tmp_path / 'ddp.yml', opt)
    # --standalone: the launcher's rendezvous store takes a port the OS picks (no fixed port, no race with
    # another run on the machine)
    proc = run_cli(['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                    '-m', 'dtkd.train', '-opt', yml, '--launcher', 'pytorch'], cwd=tmp_path, timeout=400)
    assert_ok(proc)
    exp = tmp_path / 'experiments' / 'tiny_ddp'
    assert (exp / 'models' / 'net_g_2.pth').is_file()
    log = open(glob.glob(str(exp / 'train_*.log'))[0]).read()
    assert 'World size (gpu number): 2' in log


def _eval_options(tiny_pairs, ckpt, name, metrics):
    return {
        'name': name, 'model_type': 'DTKDModel', 'scale': 4, 'num_gpu': 0,
        'datasets': {'test_1': {'name': 'tinyval', 'type': 'PairedTeacherDataset',
                                'dataroot_gt': str(tiny_pairs / 'val_gt'), 'dataroot_lq': str(tiny_pairs / 'val_lq'),
                                'io_backend': {'type': 'disk'}}},
        'network_g': train_options(tiny_pairs, 'x')['network_g'],
        'path': {'pretrain_network_g': ckpt, 'strict_load_g': True},
        'val': {'save_img': False, 'metrics': metrics},
    }


@pytest.mark.slow
def test_missing_metric_weights_stop_before_evaluating(trained, tiny_pairs, tmp_path):
    work, _ = trained
    ckpt = str(work / 'experiments' / 'tiny_dwt' / 'models' / 'net_g_latest.pth')
    empty_hub = {'TORCH_HOME': str(tmp_path / 'torch_home')}
    metrics = {'psnr': {'type': 'calculate_psnr', 'crop_border': 4}, 'lpips': {'type': 'calculate_lpips'}}
    yml = write_yaml(tmp_path / 'lpips.yml', _eval_options(tiny_pairs, ckpt, 'needs_lpips', metrics))
    proc = run_cli(['-m', 'dtkd.test', '-opt', yml], cwd=tmp_path, env_extra=empty_hub)
    assert proc.returncode == 2
    assert 'LPIPS_v0.1_alex' in proc.stderr and 'fetch_metric_weights.py' in proc.stderr
    assert 'Traceback' not in proc.stderr
    assert not (tmp_path / 'results' / 'needs_lpips').exists()

    metrics['lpips']['optional'] = True
    yml = write_yaml(tmp_path / 'lpips_opt.yml', _eval_options(tiny_pairs, ckpt, 'optional_lpips', metrics))
    proc = run_cli(['-m', 'dtkd.test', '-opt', yml], cwd=tmp_path, env_extra=empty_hub)
    assert_ok(proc)
    assert 'Skipping optional metric "lpips"' in proc.stderr
    summary = json.loads((tmp_path / 'results' / 'optional_lpips' / 'summary.json').read_text())
    assert set(summary['results']['tinyval']) == {'psnr'}
