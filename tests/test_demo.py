"""``make demo`` end to end at the smallest scale: every stage runs through the real CLIs, every
artefact of the report exists, every number in its table comes from this run's result files, and a
rerun reuses what is valid."""
import json
import os
import re
import shutil

import cv2
import numpy as np

from conftest import REPO, run_cli

DEMO = os.path.join(REPO, 'scripts', 'run_demo.py')
ARGS = ['--preset', 'tiny', '--student-iters', '2', '--batch-size', '2', '--teacher-precision', 'fp32']
RUNS = {  # report row label -> result folder
    'Teacher: ResShift (demo, 15 steps)': 'demo_eval_teacher',
    'SwinIR-small | -': 'demo_eval_swinir_small',
    'SwinIR-small | L1-KD': 'demo_eval_kd_l1',
    'SwinIR-small | DWT-KD': 'demo_eval_kd_dwt',
}


def table_rows(report):
    """{'<model> | <kd>': {metric: text}} from the report's results table."""
    lines = [ln for ln in report.splitlines() if ln.startswith('| ')]
    head = [c.strip() for c in lines[0].strip('|').split('|')]
    assert head[:2] == ['Model', 'KD loss'], head
    metrics = [re.sub(r'[↑↓]', '', h).strip().lower() for h in head[2:]]
    rows = {}
    for ln in lines[1:]:
        if ln.startswith('|---'):
            continue
        cells = [c.strip() for c in ln.strip('|').split('|')]
        if len(cells) != len(head) or cells[0] in ('stage', 'total'):
            break
        key = cells[0] if cells[0].startswith('Teacher') else f'{cells[0]} | {cells[1]}'
        rows[key] = dict(zip(metrics, cells[2:]))
    return rows


def check_report(work):
    demo = os.path.join(work, 'results', 'demo')
    report = open(os.path.join(demo, 'report.md'), encoding='utf-8').read()
    rows = table_rows(report)
    assert set(rows) == set(RUNS), rows
    for label, run in RUNS.items():
        res = os.path.join(work, 'results', run)
        summary = json.load(open(os.path.join(res, 'summary.json')))['results']['demo_test']
        assert {'psnr', 'ssim'} <= set(summary)  # NIQE needs larger images than the tiny preset's
        per_image = open(os.path.join(res, 'demo_test_metrics.csv')).read().splitlines()
        assert per_image[0].startswith('image,') and per_image[1].startswith('coffee,')
        for metric, text in rows[label].items():
            decimals = 4 if metric == 'ssim' else (3 if metric == 'niqe' else 2)
            assert text == f'{summary[metric]:.{decimals}f}', (label, metric, text, summary[metric])
        # the evaluated images are there and are x4 of the LR test photograph
        sr = cv2.imread(os.path.join(res, 'visualization', 'demo_test', 'coffee_sr.png'))
        lq = cv2.imread(os.path.join(work, 'datasets', 'demo', 'test', 'lq', 'coffee.png'))
        assert sr.shape == (lq.shape[0] * 4, lq.shape[1] * 4, 3)
    # the PSNR column is the PSNR of the saved images (an independent recomputation, Y channel)
    from skimage.metrics import peak_signal_noise_ratio

    gt = cv2.imread(os.path.join(work, 'datasets', 'demo', 'test', 'gt', 'coffee.png'))

    def y(img):
        img = img.astype(np.float64) / 255
        return 16 / 255 + (65.481 * img[..., 2] + 128.553 * img[..., 1] + 24.966 * img[..., 0]) / 255

    for label, run in RUNS.items():
        sr = cv2.imread(os.path.join(work, 'results', run, 'visualization', 'demo_test', 'coffee_sr.png'))
        assert abs(peak_signal_noise_ratio(y(gt), y(sr), data_range=1.0) - float(rows[label]['psnr'])) < 0.011
    for name in ('band_discrepancy.png', 'qualitative_grid.png'):
        img = cv2.imread(os.path.join(demo, name))
        assert img is not None and img.shape[0] > 100 and img.shape[1] > 300, name
        assert f']({name})' in report
    bands = json.load(open(os.path.join(demo, 'band_discrepancy.json')))
    assert set(bands['mean']) == {'no KD', 'L1-KD', 'DWT-KD'}
    assert all(set(v) == {'LF', 'MF', 'HF'} for v in bands['mean'].values())
    for stage in ('data', 'teacher_cache', 'train_demo_swinir_small', 'train_demo_kd_l1', 'train_demo_kd_dwt',
                  'eval_demo_eval_teacher', 'figures'):
        assert re.search(rf'^\| {stage} \| \d+\.\d \|', report, re.M), stage
    assert 'Machine: ' in report
    return report, rows


def test_demo_pipeline_tiny(tmp_path):
    work = tmp_path / 'work'
    proc = run_cli([DEMO, *ARGS, '--work', str(work)], cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in ('1/5 Data', '2/5 Teacher', '3/5 Student 1/3', '3/5 Student 3/3', '4/5 Evaluation 4/4', '5/5'):
        assert f'=== {stage}' in proc.stdout
    report, rows = check_report(str(work))
    assert 'reused' not in report

    # the students were trained from the paper's option files: the generated options keep their
    # losses and schedule (only data paths and lengths change), and the KD runs read the cached teacher
    import yaml

    dwt = yaml.safe_load(open(work / 'options_demo' / 'demo_kd_dwt.yml'))
    assert dwt['train']['kd_opt'] == {'type': 'DWTKDLoss', 'loss_weight': 2.0, 'level': 2, 'wavelet': 'haar',
                                      'group_weights': [1, 2, 1], 'reduction': 'mean'}
    assert dwt['train']['kd_schedule']['type'] == 'linear'
    assert dwt['datasets']['train']['dataroot_teacher'].endswith('teacher_resshift_demo_x4.lmdb')
    l1 = yaml.safe_load(open(work / 'options_demo' / 'demo_kd_l1.yml'))
    assert l1['train']['kd_opt']['type'] == 'L1Loss'
    plain = yaml.safe_load(open(work / 'options_demo' / 'demo_swinir_small.yml'))
    assert 'kd_opt' not in plain['train'] and 'dataroot_teacher' not in plain['datasets']['train']
    log = open(next((work / 'experiments' / 'demo_kd_dwt').glob('train_*.log'))).read()
    assert re.search(r'iter:\s+2,.*l_kd', log), log[-1500:]
    cache = work / 'datasets' / 'demo' / 'train' / 'teacher_resshift_demo_x4.lmdb'
    gt_keys = open(work / 'datasets' / 'demo' / 'train' / 'gt.lmdb' / 'meta_info.txt').read().split('\n')
    cache_keys = open(cache / 'meta_info.txt').read().split('\n')
    assert [k.split(' ')[0] for k in cache_keys if k] == [k.split(' ')[0] for k in gt_keys if k]

    # a rerun reuses every valid stage and reports the same numbers; a lost result is rebuilt, and
    # only what depends on it
    shutil.rmtree(work / 'results' / 'demo_eval_kd_l1')
    proc = run_cli([DEMO, *ARGS, '--work', str(work)], cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report2, rows2 = check_report(str(work))
    assert rows2 == rows
    for stage in ('data', 'teacher_cache', 'train_demo_swinir_small', 'train_demo_kd_l1', 'train_demo_kd_dwt',
                  'eval_demo_eval_teacher', 'eval_demo_eval_kd_dwt'):
        assert re.search(rf'^\| {stage} \| [\d.]+ \| reused from an earlier run \|', report2, re.M), stage
    assert not re.search(r'^\| eval_demo_eval_kd_l1 \| [\d.]+ \| reused', report2, re.M)
    assert 'dtkd.train' not in proc.stdout


def test_demo_without_the_teacher_weights_stops_before_any_work(tmp_path):
    # the official teacher's option file, with its weights at a path where they are not
    import yaml

    opt = yaml.safe_load(open(os.path.join(REPO, 'options', 'teacher', 'resshift_realsr_x4.yml')))
    missing = tmp_path / 'weights' / 'resshift_realsrx4_s15_v1.pth'
    opt['unet']['ckpt'] = str(missing)
    teacher = tmp_path / 'official.yml'
    teacher.write_text(yaml.safe_dump(opt))
    work = tmp_path / 'work'
    proc = run_cli([DEMO, *ARGS, '--work', str(work), '--teacher', str(teacher)], cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert str(missing) in proc.stderr and 'unet.ckpt' in proc.stderr
    assert 'Traceback' not in proc.stderr
    assert not (work / 'datasets').exists() and not (work / 'experiments').exists()
