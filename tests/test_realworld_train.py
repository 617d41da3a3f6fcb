"""Real-world DTKD end to end on the CPU: RealWorldGTDataset -> on-the-fly degradation -> online teacher.

A tiny latent-space teacher with random weights (tests/test_online_teacher.py) distils into a tiny
SwinIR on one 400x400 GT image (batches of two copies of it, so every iteration's GT batch is the same
and only the degradation and the teacher's noise can differ between iterations, seeds and runs).
"""
import copy
import glob
import re

import cv2
import pytest
import torch
import torch.nn.functional as F
from basicsr.models import build_model
from test_online_teacher import DWT, tiny_teacher_file

from conftest import photo, run_cli, train_options, write_rgb, write_yaml
from dtkd_compat import OptionError


@pytest.fixture(scope='module')
def gt_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('realworld_gt')
    write_rgb(str(root / 'gt' / 'astronaut.png'), cv2.resize(photo('astronaut'), (400, 400),
                                                              interpolation=cv2.INTER_AREA))
    (root / 'meta_info.txt').write_text('astronaut.png\n')
    return root


@pytest.fixture(scope='module')
def teacher_yml(tmp_path_factory):
    return tiny_teacher_file(tmp_path_factory.mktemp('realworld_teacher'))


def realworld_options(tiny_pairs, gt_root, teacher_yml, name, total_iter=4, seed=0):
    opt = train_options(tiny_pairs, name, total_iter=total_iter, kd_opt=dict(DWT), teacher=False, save_freq=2,
                        kd_schedule={'type': 'linear', 'start_iter': 0, 'end_iter': 4})
    opt['model_type'] = 'RealWorldDTKDModel'
    opt['manual_seed'] = seed
    opt['datasets']['train'] = {
        'name': 'gt', 'type': 'RealWorldGTDataset', 'dataroot_gt': str(gt_root / 'gt'),
        'meta_info': str(gt_root / 'meta_info.txt'), 'io_backend': {'type': 'disk'}, 'use_hflip': False,
        'use_rot': False, 'num_worker_per_gpu': 0, 'batch_size_per_gpu': 2, 'dataset_enlarge_ratio': 2,
        'prefetch_mode': None}
    opt['degradation'] = {'gt_size': 32}
    opt['teacher'] = {'opt': teacher_yml}
    opt['val'] = None
    return opt


def built_model(opt):
    opt = dict(opt, is_train=True, dist=False, rank=0, world_size=1)
    return build_model(opt)


def gt_batch(gt_root):
    img = cv2.cvtColor(cv2.imread(str(gt_root / 'gt' / 'astronaut.png')), cv2.COLOR_BGR2RGB)
    gt = torch.from_numpy(img).permute(2, 0, 1).float() / 255
    return torch.stack([gt, gt])


def test_teacher_sees_the_students_lq(tiny_pairs, gt_root, teacher_yml, one_thread):
    model = built_model(realworld_options(tiny_pairs, gt_root, teacher_yml, 'rw_unit'))
    assert model.online_teacher.precision == 'fp32'  # teacher.precision auto on the CPU
    seen = []
    sample = model.online_teacher.sample
    model.online_teacher.sample = lambda lq, generator=None: seen.append(lq.clone()) or sample(lq, generator)
    model.feed_data({'gt': gt_batch(gt_root), 'gt_path': ['a', 'a']})
    model.optimize_parameters(1)
    assert model.lq.shape == (2, 3, 8, 8) and model.gt.shape == (2, 3, 32, 32)
    assert len(seen) == 1 and torch.equal(seen[0], model.lq)  # exactly the student's input, one batched call
    assert model.teacher.shape == (2, 3, 32, 32)
    # not a bicubic down-sampling of the GT patch
    bicubic = F.interpolate(model.gt, scale_factor=0.25, mode='bicubic', antialias=True).clamp(0, 1)
    assert float((model.lq - bicubic).abs().mean()) > 0.01
    lq1, teacher1 = model.lq.clone(), model.teacher.clone()

    def lq_of(seed, it):
        m = built_model(realworld_options(tiny_pairs, gt_root, teacher_yml, 'rw_unit', seed=seed))
        m.feed_data({'gt': gt_batch(gt_root)})
        m.optimize_parameters(it)
        return m.lq, m.teacher

    again_lq, again_teacher = lq_of(0, 1)
    assert torch.equal(again_lq, lq1) and torch.equal(again_teacher, teacher1)
    assert not torch.equal(lq_of(1, 1)[0], lq1)  # another seed, another degradation
    assert not torch.equal(lq_of(0, 2)[0], lq1)  # another iteration, another degradation
    assert not torch.equal(lq1[0], lq1[1])  # the two copies of the image are degraded differently


def test_options_are_checked_up_front(tiny_pairs, gt_root, teacher_yml):
    opt = realworld_options(tiny_pairs, gt_root, teacher_yml, 'rw_bad')
    opt['degradation'] = {'noise_range': [5, 1]}
    with pytest.raises(OptionError, match=r'degradation\.noise_range'):
        built_model(opt)
    opt = realworld_options(tiny_pairs, gt_root, teacher_yml, 'rw_bad')
    del opt['teacher']
    with pytest.raises(OptionError, match='teacher'):
        built_model(opt)


def _iteration_lines(log):
    return {int(m.group(1)): m.group(0).split(']', 1)[1] for m in re.finditer(r'iter:\s*(\d+),.*', log)}


def test_runner_trains_and_a_resumed_run_sees_the_same_batches(tiny_pairs, gt_root, teacher_yml, tmp_path):
    def run(name, total_iter, *flags):
        opt = realworld_options(tiny_pairs, gt_root, teacher_yml, name, total_iter=total_iter)
        path = write_yaml(tmp_path / f'{name}_{total_iter}.yml', opt)
        proc = run_cli(['-m', 'dtkd.train', '-opt', path, *flags], cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        logs = sorted(glob.glob(str(tmp_path / 'experiments' / name / 'train_*.log')))
        return open(logs[-1]).read()

    full = run('rw_full', 4)
    assert 'Online teacher from' in full and 'l_kd:' in full
    run('rw_resumed', 2)
    resumed = run('rw_resumed', 4, '--auto_resume')
    assert 'Resuming training from' in resumed
    a, b = _iteration_lines(full), _iteration_lines(resumed)
    assert sorted(b) == [3, 4]
    for it in (3, 4):  # same losses (task and KD, so same LQ and teacher batches) after the resume
        strip = lambda s: re.sub(r'time \(data\): [^)]*\)|eta: [^,]*,|\[eta: [^\]]*\]', '', s)  # noqa: E731
        losses = re.findall(r'l_\w+: \S+', strip(a[it]))
        assert len(losses) == 2 and losses == re.findall(r'l_\w+: \S+', strip(b[it]))
    wa = torch.load(str(tmp_path / 'experiments' / 'rw_full' / 'models' / 'net_g_4.pth'), weights_only=True)
    wb = torch.load(str(tmp_path / 'experiments' / 'rw_resumed' / 'models' / 'net_g_4.pth'), weights_only=True)
    for k, v in wa['params'].items():
        torch.testing.assert_close(wb['params'][k], v, rtol=0, atol=1e-6)


def test_shipped_option_file():
    import os

    from conftest import REPO
    from dtkd_compat import MissingFileError
    from dtkd_data.realworld_degradation import DEGRADATION_DEFAULTS
    from dtkd_model.options import validate_options
    from dtkd_utils.options import load_yaml

    opt = load_yaml(os.path.join(REPO, 'options', 'train_dtkd_realworld.yml'))
    assert opt['model_type'] == 'RealWorldDTKDModel'
    assert opt['teacher'] == {'opt': 'options/teacher/sinsr_realsr_x4.yml', 'precision': 'auto'}
    with pytest.raises(MissingFileError, match=r'SinSR_v1\.pth.*https://github\.com/wyf0912/SinSR/releases'):
        validate_options(copy.deepcopy(opt), is_train=True)  # the weights are not shipped
    opt['teacher']['opt'] = 'options/demo/resshift_demo_x4.yml'  # committed weights
    validate_options(opt, is_train=True)
    # ResShift's degradation, written out in full
    assert {k: (list(v) if isinstance(v, tuple) else v) for k, v in opt['degradation'].items()} == DEGRADATION_DEFAULTS
    assert opt['datasets']['train']['type'] == 'RealWorldGTDataset'
    assert opt['network_g']['embed_dim'] == 60 and opt['network_g']['depths'] == [6, 6, 6, 6]
    kd = opt['train']['kd_opt']
    assert (kd['type'], kd['level'], kd['group_weights'], kd['loss_weight']) == ('DWTKDLoss', 2, [1, 2, 1], 2.0)
    assert opt['train']['kd_schedule']['type'] == 'linear' and opt['train']['kd_schedule']['start_iter'] == 0
    opt['degradation']['jpeg_range2'] = [30, 101]
    with pytest.raises(OptionError, match=r'degradation\.jpeg_range2'):
        validate_options(opt, is_train=True)


@pytest.mark.slow
def test_benchmark_reports_the_online_teachers():
    import os
    import subprocess
    import sys

    from conftest import REPO

    cmd = [sys.executable, os.path.join(REPO, 'scripts', 'benchmark_train_step.py'), '--device', 'cpu', '--iters', '1',
           '--warmup', '1', '--lr-size', '8', '--batch', '1', '--loss-repeats', '2', '--online']
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True).stdout
    rows = {line.split('|')[1].strip(): float(line.split('|')[2]) for line in out.splitlines()
            if line.startswith('| ') and not line.startswith('| model')}
    assert set(rows) == {'SRModel', 'DTKDModel', 'DTKD, SinSR 1 step online', 'DTKD, ResShift v3 4 steps online',
                         'DTKD, ResShift 15 steps online',
                         'real-world DTKD, SinSR 1 step online (degradation included)'}
    assert all(v > 0 for v in rows.values())
    assert 'Online teachers: demo size' in out
