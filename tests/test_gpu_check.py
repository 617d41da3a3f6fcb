"""scripts/gpu_check.py as far as a machine without a GPU allows: the one-line refusal, and that every step
it runs names a script and flags that exist."""
import os
import sys

import pytest
import torch

from conftest import REPO, run_cli

sys.path.insert(0, os.path.join(REPO, 'scripts'))
import gpu_check  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason='this machine has a GPU: make gpu-check runs for real')
def test_without_a_gpu_it_says_so_in_one_line():
    result = run_cli([os.path.join(REPO, 'scripts', 'gpu_check.py')], cwd=REPO)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        'gpu-check: no CUDA device was found (torch.cuda.is_available() is False); run it on a machine with a GPU']
    assert 'Traceback' not in result.stdout + result.stderr


@pytest.mark.parametrize('name,cmd', gpu_check.STEPS[1:], ids=[name for name, _ in gpu_check.STEPS[1:]])
def test_every_benchmark_step_accepts_its_flags(name, cmd):
    """--help parses; every flag the check passes is one the script declares."""
    result = run_cli([os.path.join(REPO, cmd[1]), '--help'], cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    for flag in (a for a in cmd[2:] if a.startswith('--')):
        assert flag in result.stdout, f'{cmd[1]} has no {flag}'
