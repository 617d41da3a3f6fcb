"""SIGKILL at a random moment of training, then ``dtkd-train --auto_resume``: training continues at the
saved iteration with the same lambda schedule position and the same learning-rate schedule.

Both runs are forks of the test process running ``dtkd-train``'s entry point (``main``): the first
is SIGKILLed, the second runs with ``--auto_resume`` (tests/test_train_e2e.py resumes through a
fresh ``python -m dtkd.train`` process). Expected values come from the
schedules' definitions: lambda(t) = 2 t / T (linear, final weight 2) and MultiStepLR,
lr(t) = 2e-4 * 0.5^(number of milestones <= t - 1) (BasicSR steps the scheduler from iteration 2 on).
"""
import glob
import os
import random
import re
import time

import forking
import torch

from conftest import train_options, write_yaml

TOTAL, SAVE_FREQ, MILESTONES = 40, 4, (10, 25)
DWT = {'type': 'DWTKDLoss', 'loss_weight': 2.0, 'level': 2, 'wavelet': 'haar', 'group_weights': [1, 2, 1]}
LINE = re.compile(r'iter:\s*(\d+), lr:\(([\d.e+-]+),\)\].*?lambda_kd: (\S+)')


def logged(path):
    """{iter: (lr, lambda)} of one training log."""
    out = {}
    with open(path) as f:
        for line in f:
            m = LINE.search(line)
            if m:
                out[int(m.group(1))] = (float(m.group(2)), float(m.group(3)))
    return out


def expected_lr(it):
    """BasicSR steps the scheduler before every iteration but the first: t - 1 steps at iteration t."""
    return 2e-4 * 0.5 ** sum(m <= it - 1 for m in MILESTONES)


def test_auto_resume_after_a_random_sigkill(tiny_pairs, tmp_path):
    from basicsr import train as _basicsr_train  # noqa: F401  (imported once here, not in the child)

    from dtkd import train

    opt = train_options(tiny_pairs, 'killed', total_iter=TOTAL, kd_opt=dict(DWT), save_freq=SAVE_FREQ)
    opt['train']['scheduler'] = {'type': 'MultiStepLR', 'milestones': list(MILESTONES), 'gamma': 0.5}
    opt['logger']['use_tb_logger'] = False
    opt['val'] = None
    yml = write_yaml(tmp_path / 'train.yml', opt)
    exp = tmp_path / 'experiments' / 'killed'
    states = exp / 'training_states'

    pid = forking.start(train.main, str(tmp_path / 'killed.log'), cwd=str(tmp_path), argv=['dtkd-train', '-opt', yml])
    # a random moment: after the k-th save (k = 1..5 of 10), a little later (inside an iteration or a save)
    first_state = states / f'{SAVE_FREQ * random.randint(1, 5)}.state'
    deadline = time.time() + 120
    while not first_state.exists() and time.time() < deadline:
        time.sleep(0.002)
    time.sleep(random.uniform(0, 0.05))
    assert forking.kill(pid) == -9, open(tmp_path / 'killed.log').read()[-3000:]

    saved = sorted(int(n.split('.')[0]) for n in os.listdir(states) if n.endswith('.state'))
    assert saved and saved[-1] < TOTAL, saved
    last = saved[-1]
    for it in saved:  # everything the killed run left is loadable
        assert torch.load(states / f'{it}.state', weights_only=True)['iter'] == it
        torch.load(exp / 'models' / f'net_g_{it}.pth', weights_only=True)
    killed_log = glob.glob(str(exp / 'train_*.log'))
    assert len(killed_log) == 1
    time.sleep(1.1)  # BasicSR names logs by the second

    code, out = forking.run_entry_point(train, ['dtkd-train', '-opt', yml, '--auto_resume'],
                                        str(tmp_path / 'resumed.log'), str(tmp_path))
    assert code == 0, out[-3000:]
    resumed_log = [p for p in glob.glob(str(exp / 'train_*.log')) if p not in killed_log]
    assert len(resumed_log) == 1
    text = open(resumed_log[0]).read()
    assert 'Resuming training from epoch: ' in text and f'iter: {last}.' in text
    assert re.search(rf'Loading \w+ model from .*net_g_{last}\.pth', text)
    before, after = logged(killed_log[0]), logged(resumed_log[0])
    assert sorted(after) == list(range(last + 1, TOTAL + 1))  # continues right after the saved iteration
    assert max(before) >= last
    for values in (before, after):
        for it, (lr, lam) in values.items():
            assert lam == pytest_approx(2.0 * it / TOTAL), (it, lam)
            assert lr == pytest_approx(expected_lr(it)), (it, lr)
    final = torch.load(exp / 'models' / 'net_g_latest.pth', weights_only=True)['params']
    assert all(torch.isfinite(v).all() for v in final.values())


def pytest_approx(value):
    import pytest

    return pytest.approx(value, rel=1e-3, abs=1e-9)
