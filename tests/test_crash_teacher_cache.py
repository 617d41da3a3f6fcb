"""The teacher cache survives SIGKILL at any moment: killed at random points several times, then
completed, its LMDB holds byte for byte what an uninterrupted run writes.

A tiny ResShift teacher with seeded random weights (real checkpoint files) over eight LQ photographs.
The uninterrupted reference runs in the test process; the interrupted runs are forks of it, each
SIGKILLed at a random moment after a random number of committed entries, the last one run to the
end. Both use one CPU thread, so float reductions (and hence bytes) are comparable.
"""
import os
import random
import time

import forking
import lmdb
import pytest
import torch

from conftest import bicubic_down, photo, tiny_teacher_options, write_rgb
from dtkd_data.lmdb_tools import lmdb_is_complete
from dtkd_teacher.cache import RECORD_NAME, generate_teacher_outputs

CROPS = [('astronaut', 100, 180), ('coffee', 150, 200), ('chelsea', 80, 200), ('rocket', 100, 300),
         ('astronaut', 300, 300), ('coffee', 50, 400), ('chelsea', 100, 150), ('rocket', 200, 200)]


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp('cache_kill')
    opt = tiny_teacher_options(root, seed=123, steps=2)
    for i, (name, y, x) in enumerate(CROPS):
        gt = photo(name)[y:y + 64, x:x + 64]
        write_rgb(str(root / 'gt' / f'k{i}.png'), gt)
        write_rgb(str(root / 'lq' / f'k{i}.png'), bicubic_down(gt, 4))
    return root, opt


def contents(path):
    """Every LMDB entry and the two side files, as bytes."""
    env = lmdb.open(path, readonly=True, lock=False)
    with env.begin() as txn:
        entries = {k.decode(): bytes(v) for k, v in txn.cursor()}
    env.close()
    side = {name: open(os.path.join(path, name), 'rb').read() for name in ('meta_info.txt', RECORD_NAME)}
    return entries, side


def committed(path):
    if not os.path.isfile(os.path.join(path, 'data.mdb')):
        return 0
    env = lmdb.open(path, readonly=True, lock=False)
    try:
        return env.stat()['entries']
    finally:
        env.close()


def test_random_sigkills_then_completion_equal_an_uninterrupted_run(setup, tmp_path):
    root, opt = setup

    def run(out):
        return generate_teacher_outputs(opt, str(root / 'lq'), out, gt_path=str(root / 'gt'), seed=3,
                                        progress=False)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the children
    try:
        reference = str(tmp_path / 'reference.lmdb')
        start = time.time()
        assert run(reference)['written'] == len(CROPS)
        per_image = (time.time() - start) / len(CROPS)
    finally:
        torch.set_num_threads(threads)

    out = str(tmp_path / 'killed.lmdb')
    rng = random.Random()
    partial_kills = 0
    for kill in range(3):
        done = committed(out)
        if done >= len(CROPS) - 1:
            break
        target = rng.randint(done + 1, max(done + 1, len(CROPS) - 5 + 2 * kill))  # room for the next kills
        pid = forking.start(lambda: run(out), str(tmp_path / 'child.log'))
        deadline = time.time() + 120
        while committed(out) < target and time.time() < deadline:
            time.sleep(0.002)
        time.sleep(rng.uniform(0, per_image))  # anywhere inside the next image's sampling or commit
        code = forking.kill(pid)
        if code == 0:  # finished before the kill landed
            break
        assert code == -9, open(tmp_path / 'child.log').read()[-3000:]
        if committed(out) < len(CROPS):
            partial_kills += 1
            assert not lmdb_is_complete(out)  # an interrupted cache never looks usable to BasicSR
    assert partial_kills >= 2
    code, log = forking.run(lambda: run(out), str(tmp_path / 'child.log'))
    assert code == 0, log[-3000:]
    assert lmdb_is_complete(out)
    assert contents(out) == contents(reference)
