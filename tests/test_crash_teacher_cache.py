"""The teacher cache survives SIGKILL: killed at several exact points, then completed, its LMDB holds
byte for byte what an uninterrupted run writes.

A tiny ResShift teacher with seeded random weights (real checkpoint files) over eight LQ photographs.
The uninterrupted reference runs in the test process; the interrupted runs are forks of it, each
killing itself at a named point (``DTKD_FAULT_INJECT``, see ``dtkd_compat.fault_point``):

1. right after the 2nd entry's transaction is committed        -> 2 entries stored;
2. (resumed) inside the 2nd transaction, after its ``put``, before its commit
   -> the 1st new entry is stored, the uncommitted one is not: 3 entries;
3. (resumed) after every entry, before ``meta_info.txt`` is renamed into place
   -> 8 entries, but no ``meta_info.txt``;

then a last run completes it. After each kill the LMDB opens, holds exactly the committed entries,
and never looks complete to BasicSR (``lmdb_is_complete``) until the end. Both sides use one CPU
thread, so float reductions (and hence bytes) are comparable.
"""
import os
import signal

import forking
import lmdb
import pytest

from conftest import bicubic_down, photo, tiny_teacher_options, write_rgb
from dtkd_compat import FAULT_ENV
from dtkd_data.lmdb_tools import lmdb_is_complete
from dtkd_teacher.cache import RECORD_NAME, generate_teacher_outputs

CROPS = [('astronaut', 100, 180), ('coffee', 150, 200), ('chelsea', 80, 200), ('rocket', 100, 300),
         ('astronaut', 300, 300), ('coffee', 50, 400), ('chelsea', 100, 150), ('rocket', 200, 200)]
KEYS = [f'k{i}' for i in range(len(CROPS))]
# (fault, entries stored after the kill)
KILLS = [('teacher_cache.committed@2', 2),
         ('teacher_cache.before_commit@2', 3),
         ('atomic_write.before_replace:meta_info.txt', len(CROPS))]


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp('cache_kill')
    opt = tiny_teacher_options(root, seed=123, steps=2)
    for key, (name, y, x) in zip(KEYS, CROPS):
        gt = photo(name)[y:y + 64, x:x + 64]
        write_rgb(str(root / 'gt' / f'{key}.png'), gt)
        write_rgb(str(root / 'lq' / f'{key}.png'), bicubic_down(gt, 4))
    return root, opt


def contents(path):
    """Every LMDB entry and the two side files, as bytes."""
    env = lmdb.open(path, readonly=True, lock=False)
    with env.begin() as txn:
        entries = {k.decode(): bytes(v) for k, v in txn.cursor()}
    env.close()
    side = {name: open(os.path.join(path, name), 'rb').read() for name in ('meta_info.txt', RECORD_NAME)}
    return entries, side


def stored(path):
    """{key: bytes} of the committed entries."""
    env = lmdb.open(path, readonly=True, lock=False)
    try:
        with env.begin() as txn:
            return {k.decode(): bytes(v) for k, v in txn.cursor()}
    finally:
        env.close()


def test_sigkills_at_named_points_then_completion_equal_an_uninterrupted_run(setup, tmp_path, one_thread):
    root, opt = setup

    def run(out):
        return generate_teacher_outputs(opt, str(root / 'lq'), out, gt_path=str(root / 'gt'), seed=3,
                                        progress=False)

    reference = str(tmp_path / 'reference.lmdb')
    assert run(reference)['written'] == len(CROPS)  # one thread, as in the children (one_thread fixture)
    expected, _ = contents(reference)

    out = str(tmp_path / 'killed.lmdb')
    for fault, count in KILLS:
        code, log = forking.run(lambda: run(out), str(tmp_path / 'child.log'), env={FAULT_ENV: fault})
        assert code == -signal.SIGKILL, f'{fault}: {log[-3000:]}'
        entries = stored(out)
        assert entries == {key: expected[key] for key in KEYS[:count]}, fault  # keys are processed in order
        assert not os.path.exists(os.path.join(out, 'meta_info.txt'))
        assert not lmdb_is_complete(out)  # an interrupted cache never looks usable to BasicSR
    code, log = forking.run(lambda: run(out), str(tmp_path / 'child.log'))
    assert code == 0, log[-3000:]
    assert lmdb_is_complete(out)
    assert contents(out) == contents(reference)
    assert not [n for n in os.listdir(out) if n.startswith('.')]  # the temporary meta_info.txt was cleaned up
