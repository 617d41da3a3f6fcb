"""SIGKILL during training, then ``dtkd-train --auto_resume``: training continues right after the
newest complete training state, with the same lambda schedule position and the same learning-rate
schedule.

Both runs are forks of the test process running ``dtkd-train``'s entry point (``main``): the first
kills itself at a named point of the save at iteration 12 (``DTKD_FAULT_INJECT``, see
``dtkd_compat.fault_point``), either after the temporary file of ``12.state`` is written but before
its rename (the newest complete state is then 8), or right after ``12.state`` is complete (it is
then 12); the second runs with ``--auto_resume`` (tests/test_train_e2e.py resumes through a fresh
``python -m dtkd.train`` process). Each run names its log file itself (BasicSR names logs by the
second), so nothing waits. Expected values come from the schedules' definitions:
lambda(t) = 2 t / T (linear, final weight 2) and MultiStepLR,
lr(t) = 2e-4 * 0.5^(number of milestones <= t - 1) (BasicSR steps the scheduler from iteration 2 on).
"""
import os
import re
import signal

import forking
import pytest
import torch

from conftest import train_options, write_yaml
from dtkd_compat import FAULT_ENV

TOTAL, SAVE_FREQ, MILESTONES, KILLED_AT = 24, 4, (10, 18), 12
DWT = {'type': 'DWTKDLoss', 'loss_weight': 2.0, 'level': 2, 'wavelet': 'haar', 'group_weights': [1, 2, 1]}
LINE = re.compile(r'iter:\s*(\d+), lr:\(([\d.e+-]+),\)\].*?lambda_kd: (\S+)')
# fault -> iteration of the newest complete training state when the run dies
CASES = {
    'before the rename of 12.state': (f'atomic_write.before_replace:{KILLED_AT}.state', KILLED_AT - SAVE_FREQ),
    'after 12.state is complete': (f'save_training_state.saved:{KILLED_AT}', KILLED_AT),
}


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


def train_with_log_name(tag):
    """``dtkd-train``'s main with the log file ``train_<name>_<tag>.log`` (instead of a time stamp)."""
    def main():
        from basicsr import train as basicsr_train

        from dtkd import train

        basicsr_train.get_time_str = lambda: tag
        return train.main()
    return main


@pytest.mark.parametrize('case', list(CASES))
def test_auto_resume_after_a_sigkill_during_a_save(tiny_pairs, tmp_path, case):
    from basicsr import train as _basicsr_train  # noqa: F401  (imported once here, not in every child)

    fault, last = CASES[case]
    opt = train_options(tiny_pairs, 'killed', total_iter=TOTAL, kd_opt=dict(DWT), save_freq=SAVE_FREQ)
    opt['train']['scheduler'] = {'type': 'MultiStepLR', 'milestones': list(MILESTONES), 'gamma': 0.5}
    opt['logger']['use_tb_logger'] = False
    opt['val'] = None
    yml = write_yaml(tmp_path / 'train.yml', opt)
    exp = tmp_path / 'experiments' / 'killed'
    states = exp / 'training_states'

    code, out = forking.run(train_with_log_name('killed'), str(tmp_path / 'killed.out'), cwd=str(tmp_path),
                            argv=['dtkd-train', '-opt', yml], env={FAULT_ENV: fault})
    assert code == -signal.SIGKILL, out[-3000:]
    saved = sorted(int(n.split('.')[0]) for n in os.listdir(states) if n.endswith('.state'))
    assert saved == list(range(SAVE_FREQ, last + 1, SAVE_FREQ))
    for it in saved:  # everything the killed run left is loadable
        assert torch.load(states / f'{it}.state', weights_only=True)['iter'] == it
    for it in range(SAVE_FREQ, KILLED_AT + 1, SAVE_FREQ):  # the network of the killed save was complete
        torch.load(exp / 'models' / f'net_g_{it}.pth', weights_only=True)
    killed_log = exp / 'train_killed_killed.log'
    before = logged(killed_log)
    assert sorted(before) == list(range(1, KILLED_AT + 1))  # logged up to the save it died in

    code, out = forking.run(train_with_log_name('resumed'), str(tmp_path / 'resumed.out'), cwd=str(tmp_path),
                            argv=['dtkd-train', '-opt', yml, '--auto_resume'])
    assert code == 0, out[-3000:]
    text = open(exp / 'train_killed_resumed.log').read()
    assert 'Resuming training from epoch: ' in text and f'iter: {last}.' in text
    assert re.search(rf'Loading \w+ model from .*net_g_{last}\.pth', text)
    after = logged(exp / 'train_killed_resumed.log')
    assert sorted(after) == list(range(last + 1, TOTAL + 1))  # continues right after the complete state
    for values in (before, after):
        for it, (lr, lam) in values.items():
            assert lam == pytest.approx(2.0 * it / TOTAL, rel=1e-3, abs=1e-9), (it, lam)
            assert lr == pytest.approx(expected_lr(it), rel=1e-3, abs=1e-9), (it, lr)
    assert not [n for n in os.listdir(states) if n.endswith('.tmp')]  # the resumed run replaced the leftover
    final = torch.load(exp / 'models' / 'net_g_latest.pth', weights_only=True)['params']
    assert all(torch.isfinite(v).all() for v in final.values())
