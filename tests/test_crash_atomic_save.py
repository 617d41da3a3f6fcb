"""A SIGKILL during a save leaves the previous checkpoint / training state loadable; without the
temporary-file-and-rename protocol the same kill destroys the checkpoint (control).

A child process (fork of the test process) runs a real DTKDModel's ``save_network`` and
``save_training_state`` for a few rounds on a 4 MB network (8 MB of Adam state), rewriting
``net_g_latest.pth`` and a training state each round. It kills itself at an exact place
(``dtkd_compat.fault_point`` through ``DTKD_FAULT_INJECT``, or a writer that dies after a set number
of bytes): after a temporary file is completely written and before its rename, in the middle of
writing a temporary file, or right after a complete save. No sleeps, no polling: what is on disk
afterwards is known exactly, and every visible checkpoint and state must load with
``weights_only=True`` and hold the values of the last complete round, and BasicSR's auto-resume
look-up must only see complete states.
"""
import io
import os
import signal

import forking
import pytest
import torch

from conftest import train_options
from dtkd_compat import FAULT_ENV

ROUNDS = 4
STATES = {1: 2, 2: 3, 3: 1, 4: 2}  # round -> training state it writes ('<round % 3 + 1>.state'; round 4 overwrites 2)


def build_model(tiny_pairs, root):
    from basicsr.models import build_model

    import dtkd_model  # noqa: F401

    opt = train_options(tiny_pairs, 'atomic')
    opt.update(is_train=True, dist=False, rank=0, world_size=1)
    opt['path'].update(models=str(root / 'models'), training_states=str(root / 'training_states'))
    os.makedirs(opt['path']['models'])
    os.makedirs(opt['path']['training_states'])
    return build_model(opt)


@pytest.fixture
def saver(tiny_pairs, tmp_path):
    """(model, big network) with an Adam state; ``save_rounds(model, big)`` is what the children run."""
    model = build_model(tiny_pairs, tmp_path)
    big = torch.nn.Linear(1024, 1024)  # 4 MB of weights, 8 MB of Adam state per training state
    optimizer = torch.optim.Adam(big.parameters())
    big(torch.zeros(1, big.in_features)).sum().backward()
    optimizer.step()
    model.optimizers, model.schedulers = [optimizer], []
    return model, big


def save_rounds(model, big, rounds=ROUNDS):
    """Round i: every parameter of ``big`` and its Adam state filled with i, then saved as
    ``net_g_latest.pth`` and as training state ``STATES[i]``."""
    optimizer = model.optimizers[0]
    for i in range(1, rounds + 1):
        with torch.no_grad():
            for p in big.parameters():
                p.fill_(i)
            for state in optimizer.state.values():
                state['exp_avg'].fill_(i)
        model.save_network(big, 'net_g', -1)
        model.save_training_state(0, STATES[i])


class DyingWriter:
    """A binary file wrapper that writes the first ``limit`` bytes it is given, then SIGKILLs the process
    (in the middle of a ``write`` call, as a kill during a large write does)."""

    def __init__(self, f, limit):
        self.f, self.left = f, limit

    def write(self, data):
        data = bytes(data)
        if len(data) >= self.left:
            self.f.write(data[:self.left])
            self.f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        self.left -= len(data)
        return self.f.write(data)

    def flush(self):
        self.f.flush()


def die_in_the_nth_torch_save(nth, limit=1 << 20):
    """Patch ``torch.save`` (in a child) so that its ``nth`` call is killed after ``limit`` bytes."""
    real_save, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) < nth:
            return real_save(obj, f, *args, **kwargs)
        if isinstance(f, (str, os.PathLike)):
            with open(f, 'wb') as opened:
                return real_save(obj, DyingWriter(opened, limit), *args, **kwargs)
        return real_save(obj, DyingWriter(f, limit), *args, **kwargs)

    torch.save = save


def load_round(path):
    """The round whose values a checkpoint or training state holds (all values must agree)."""
    data = torch.load(path, weights_only=True)
    if 'params' in data:
        values = list(data['params'].values())
    else:
        assert data['iter'] == int(os.path.basename(path).split('.')[0])
        values = [data['optimizers'][0]['state'][0]['exp_avg']]
    first = float(values[0].flatten()[0])
    assert all(bool((v == first).all()) for v in values), path
    return int(first)


def visible(root):
    """{name: round} of every file a user or BasicSR's auto-resume would pick up, each loaded."""
    from basicsr.utils import scandir

    out = {'net_g_latest.pth': load_round(root / 'models' / 'net_g_latest.pth')}
    for name in scandir(str(root / 'training_states'), suffix='state'):  # BasicSR's auto-resume listing
        out[name] = load_round(root / 'training_states' / name)
    return out


def temporaries(root):
    return sorted(n for d in ('models', 'training_states') for n in os.listdir(root / d) if n.endswith('.tmp'))


# (fault, what is visible after the kill) -- rounds complete before the kill, the killed round's
# files renamed before the kill point, nothing else
CASES = {
    'before rename of net_g_latest.pth in round 2': (
        {FAULT_ENV: 'atomic_write.before_replace:net_g_latest.pth@2'},
        {'net_g_latest.pth': 1, '2.state': 1}, ['.net_g_latest.pth.tmp']),
    'before rename of a new state in round 2': (
        {FAULT_ENV: 'atomic_write.before_replace:*.state@2'},
        {'net_g_latest.pth': 2, '2.state': 1}, ['.3.state.tmp']),
    'before rename over an existing state in round 4': (
        {FAULT_ENV: 'atomic_write.before_replace:2.state@2'},
        {'net_g_latest.pth': 4, '2.state': 1, '3.state': 2, '1.state': 3}, ['.2.state.tmp']),
    'right after the complete save of round 3': (
        {FAULT_ENV: 'save_training_state.saved:1'},
        {'net_g_latest.pth': 3, '2.state': 1, '3.state': 2, '1.state': 3}, []),
    'mid-write of net_g_latest.pth in round 2': (
        'torch.save 3',  # the 3rd torch.save call is round 2's network
        {'net_g_latest.pth': 1, '2.state': 1}, ['.net_g_latest.pth.tmp']),
    'mid-write of a training state in round 3': (
        'torch.save 6',
        {'net_g_latest.pth': 3, '2.state': 1, '3.state': 2}, ['.1.state.tmp']),
}


@pytest.mark.parametrize('case', list(CASES))
def test_sigkill_at_a_save_point_leaves_the_last_complete_files(saver, tmp_path, case):
    model, big = saver
    fault, expected, leftovers = CASES[case]
    if isinstance(fault, str):  # killed in the middle of writing the temporary file
        def child():
            die_in_the_nth_torch_save(int(fault.split()[1]))
            save_rounds(model, big)
        env = None
    else:
        def child():
            save_rounds(model, big)
        env = fault
    code, log = forking.run(child, str(tmp_path / 'child.log'), env=env)
    assert code == -signal.SIGKILL, log[-3000:]
    assert visible(tmp_path) == expected
    assert temporaries(tmp_path) == leftovers  # proof that the kill hit the save it was meant to
    for name in leftovers:
        folder = 'models' if 'net_g' in name else 'training_states'
        if case.startswith('mid-write'):  # the temporary file is truncated: the kill was mid-save
            with pytest.raises(Exception):  # noqa: B017  (any load error: torch's zip reader raises several types)
                torch.load(tmp_path / folder / name, weights_only=True)

    # a later run (here: the next rounds in a new child) replaces the leftovers and saves normally
    code, log = forking.run(lambda: save_rounds(model, big), str(tmp_path / 'child.log'))
    assert code == 0, log[-3000:]
    assert visible(tmp_path) == {'net_g_latest.pth': ROUNDS, '2.state': 4, '3.state': 2, '1.state': 3}
    assert temporaries(tmp_path) == []


def test_control_unprotected_torch_save_killed_mid_write_loses_the_checkpoint(saver, tmp_path):
    """Control: ``torch.save`` straight to the final path (BasicSR's own ``save_network``), killed at
    the same point of the same write, leaves a truncated file: the previous checkpoint is gone and
    the new one is not there."""
    _, big = saver
    path = tmp_path / 'models' / 'net_g_latest.pth'

    def unprotected(i):
        with torch.no_grad():
            for p in big.parameters():
                p.fill_(i)
        torch.save({'params': big.state_dict()}, path)

    code, log = forking.run(lambda: unprotected(1), str(tmp_path / 'child.log'))
    assert code == 0, log[-3000:]
    assert load_round(path) == 1
    complete = path.stat().st_size

    def killed_in_round_2():
        die_in_the_nth_torch_save(1)
        unprotected(2)

    code, log = forking.run(killed_in_round_2, str(tmp_path / 'child.log'))
    assert code == -signal.SIGKILL, log[-3000:]
    assert 0 < path.stat().st_size < complete
    with pytest.raises(Exception):  # noqa: B017  (truncated zip archive: torch raises RuntimeError or others)
        torch.load(path, weights_only=True)


def test_dying_writer_stops_inside_a_write(tmp_path):
    """The mid-write kill of the tests above: exactly ``limit`` bytes reach the file."""
    data = io.BytesIO()
    torch.save({'w': torch.zeros(256, 256)}, data)
    target = tmp_path / 'partial.bin'

    def child():
        with open(target, 'wb') as f:
            DyingWriter(f, 1000).write(data.getvalue())

    code, _ = forking.run(child, str(tmp_path / 'child.log'))
    assert code == -signal.SIGKILL
    assert target.read_bytes() == data.getvalue()[:1000]


def test_result_images_are_written_atomically(tmp_path):
    """Validation/test images: the same bytes as OpenCV's imwrite, through a temporary file; killed
    before the rename, the previous image stays."""
    import cv2

    from conftest import photo
    from dtkd_model.safe_training import atomic_imwrite

    img = photo('chelsea')[:40, :52, ::-1].copy()
    atomic_imwrite(img, tmp_path / 'a' / 'sr.png')
    cv2.imwrite(str(tmp_path / 'ref.png'), img)
    assert (tmp_path / 'a' / 'sr.png').read_bytes() == (tmp_path / 'ref.png').read_bytes()
    assert os.listdir(tmp_path / 'a') == ['sr.png']

    code, log = forking.run(lambda: atomic_imwrite(255 - img, tmp_path / 'a' / 'sr.png'), str(tmp_path / 'child.log'),
                            env={FAULT_ENV: 'atomic_write.before_replace:sr.png'})
    assert code == -signal.SIGKILL, log[-3000:]
    assert (tmp_path / 'a' / 'sr.png').read_bytes() == (tmp_path / 'ref.png').read_bytes()
    assert sorted(os.listdir(tmp_path / 'a')) == ['.sr.png.tmp', 'sr.png']
