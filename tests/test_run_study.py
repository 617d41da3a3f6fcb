"""``make study`` at the smallest scale (scripts/run_study.py): two methods, two seeds, two iterations, the
tiny demo data. Every number of the report is checked against a recomputation from the files the runs
wrote: per-image metrics from dtkd-test's CSVs, the paired statistics by hand (exact Wilcoxon null
distribution by enumerating the signs), the HF band discrepancy by a hand-written Haar level."""
import csv
import itertools
import json
import math
import os
import re

import cv2
import numpy as np
import pytest

from conftest import REPO, run_cli

STUDY = os.path.join(REPO, 'scripts', 'run_study.py')
METHODS = ['kd_dwt', 'dwt_teacher_spread']
SEEDS = [0, 1]
ARGS = ['--preset', 'tiny', '--iters', '2', '--batch-size', '2', '--seeds', *map(str, SEEDS), '--methods', *METHODS]
T975_DOF1 = 12.706204736174703  # Student t, 97.5 % quantile, 1 degree of freedom (tables)


def per_image(work, method, seed):
    path = os.path.join(work, 'results', f'study_eval_{method}_s{seed}', 'demo_test_metrics.csv')
    with open(path, newline='') as f:
        return {row['image']: {k: float(v) for k, v in row.items() if k != 'image'} for row in csv.DictReader(f)}


def exact_wilcoxon(diffs):
    """(min(W+, W-), two-sided p) by enumerating every sign pattern (no ties, no zeros)."""
    ranks = {d: r for r, d in enumerate(sorted(abs(x) for x in diffs), 1)}
    w_plus = sum(ranks[abs(d)] for d in diffs if d > 0)
    n = len(diffs)
    null = [sum(r for r, s in zip(range(1, n + 1), signs) if s) for signs in itertools.product((0, 1), repeat=n)]
    low = sum(w <= w_plus for w in null) / len(null)
    high = sum(w >= w_plus for w in null) / len(null)
    total = n * (n + 1) / 2
    return min(w_plus, total - w_plus), min(1.0, 2 * min(low, high))


def haar_hf(img):
    """Mean |level-1 Haar details| of an (H, W, 3) float image in [0, 1] (orthonormal, even sizes)."""
    a, b, c, d = img[0::2, 0::2], img[0::2, 1::2], img[1::2, 0::2], img[1::2, 1::2]
    details = [(a + b - c - d) / 2, (a - b + c - d) / 2, (a - b - c + d) / 2]
    return float(np.mean([np.abs(x).mean() for x in details]))


def read01(path):
    return cv2.imread(path, cv2.IMREAD_COLOR)[..., ::-1].astype(np.float64) / 255.0


@pytest.mark.slow
def test_study_report_matches_a_recomputation(tmp_path):
    work = str(tmp_path)
    result = run_cli([STUDY, *ARGS, '--work', work], cwd=work, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = os.path.join(work, 'results', 'study')
    study = json.load(open(os.path.join(out, 'study.json')))
    report = open(os.path.join(out, 'report.md'), encoding='utf-8').read()
    assert os.path.getsize(os.path.join(out, 'study.png')) > 1000
    assert study['teacher_samples'] == 4  # from options/ablation/train_dwt_spread.yml
    for k in (1, 2, 3):
        assert os.path.isfile(os.path.join(work, 'datasets', 'demo', 'train', 'teacher_resshift_demo_x4.lmdb',
                                           f'sample{k}.lmdb', 'meta_info.txt'))

    values = {(m, s): per_image(work, m, s) for m in METHODS for s in SEEDS}
    images = sorted(values['kd_dwt', 0])
    # mean ± std over seeds of the per-seed mean over images, as printed in the table
    for m in METHODS:
        per_seed = [np.mean([values[m, s][i]['psnr'] for i in images]) for s in SEEDS]
        mean, std = float(np.mean(per_seed)), float(np.std(per_seed, ddof=1))
        assert study['summary'][m]['psnr']['mean'] == pytest.approx(mean, abs=1e-9)
        assert study['summary'][m]['psnr']['std'] == pytest.approx(std, abs=1e-9)
        label = 'DWT-KD' if m == 'kd_dwt' else 'DWT-KD + teacher_spread'
        assert re.search(rf'^\| {re.escape(label)} \| {mean:.2f} ± {std:.2f} \|', report, re.M), label

    # the paired comparison with DWT-KD over the (image, seed) pairs
    diffs = [values['dwt_teacher_spread', s][i]['psnr'] - values['kd_dwt', s][i]['psnr'] for s in SEEDS for i in images]
    test = study['tests']['dwt_teacher_spread']['psnr']
    mean = sum(diffs) / len(diffs)
    half = T975_DOF1 * math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)) / math.sqrt(len(diffs))
    assert test['n'] == len(diffs) == len(images) * len(SEEDS)
    assert test['mean_diff'] == pytest.approx(mean, abs=1e-12)
    assert test['ci95'] == pytest.approx([mean - half, mean + half], abs=1e-9)
    if test['method'] == 'exact':
        statistic, p = exact_wilcoxon(diffs)
        assert test['statistic'] == statistic and test['p'] == pytest.approx(p, abs=1e-12)
    assert f'| DWT-KD + teacher_spread | psnr | {mean:+.4f} |' in report

    # HF discrepancy to the teacher of one run, by hand
    teacher_dir = os.path.join(work, 'results', 'study_eval_teacher', 'visualization', 'demo_test')
    student_dir = os.path.join(work, 'results', 'study_eval_kd_dwt_s1', 'visualization', 'demo_test')
    by_hand = np.mean([haar_hf(read01(os.path.join(student_dir, f'{i}_sr.png'))
                               - read01(os.path.join(teacher_dir, f'{i}_sr.png'))) for i in images])
    assert study['summary']['kd_dwt']['HF_to_teacher']['per_seed'][1] == pytest.approx(by_hand, rel=1e-5)

    # a rerun reuses every stage
    again = run_cli([STUDY, *ARGS, '--work', work], cwd=work, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert 'reusing' in again.stdout and 'dtkd.train' not in again.stdout
