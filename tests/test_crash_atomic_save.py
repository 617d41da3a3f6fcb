"""A SIGKILL during a save leaves the previous checkpoint / training state loadable.

A child process (fork of the test process) runs a real DTKDModel's ``save_network`` and
``save_training_state`` in a loop on a 16 MB network, rewriting ``net_g_latest.pth`` and a
training state each round; it is SIGKILLed several times, twice exactly while a temporary file is
being written (mid-save) and otherwise at random moments. After every kill each visible checkpoint
and state loads with ``weights_only=True`` and is complete (all values of one round), and BasicSR's
auto-resume look-up only sees complete states.
"""
import os
import random
import time

import forking
import torch

from conftest import train_options


def build_model(tiny_pairs, root):
    from basicsr.models import build_model

    import dtkd_model  # noqa: F401

    opt = train_options(tiny_pairs, 'atomic')
    opt.update(is_train=True, dist=False, rank=0, world_size=1)
    opt['path'].update(models=str(root / 'models'), training_states=str(root / 'training_states'))
    os.makedirs(opt['path']['models'])
    os.makedirs(opt['path']['training_states'])
    return build_model(opt)


def save_forever(model, big):
    """Round i: every parameter of ``big`` and its Adam state filled with i, then saved as
    ``net_g_latest.pth`` and as training state ``<i % 3 + 1>.state`` (so states are also overwritten)."""
    optimizer = torch.optim.Adam(big.parameters())
    big(torch.zeros(1, big.in_features)).sum().backward()
    optimizer.step()
    model.optimizers, model.schedulers = [optimizer], []
    for i in range(1, 10 ** 6):
        with torch.no_grad():
            for p in big.parameters():
                p.fill_(i)
            for state in optimizer.state.values():
                state['exp_avg'].fill_(i)
        model.save_network(big, 'net_g', -1)
        model.save_training_state(0, i % 3 + 1)


def assert_complete(root):
    """Every visible file loads and holds one round's values."""
    latest = torch.load(root / 'models' / 'net_g_latest.pth', weights_only=True)['params']
    first = latest['weight'].flatten()[0]
    assert all(bool((v == first).all()) for v in latest.values())
    for name in os.listdir(root / 'training_states'):
        if name.endswith('.state'):
            state = torch.load(root / 'training_states' / name, weights_only=True)
            exp_avg = state['optimizers'][0]['state'][0]['exp_avg']
            assert state['iter'] == int(name.split('.')[0]) and bool((exp_avg == exp_avg.flatten()[0]).all())


def mtime(path):
    try:
        return os.stat(path).st_mtime_ns
    except FileNotFoundError:
        return None


def test_sigkill_during_saves_leaves_loadable_files(tiny_pairs, tmp_path):
    from basicsr.utils import scandir

    model = build_model(tiny_pairs, tmp_path)
    big = torch.nn.Linear(1024, 1024)  # 4 MB of weights, 8 MB of Adam state per training state
    latest = tmp_path / 'models' / 'net_g_latest.pth'
    temp = tmp_path / 'models' / '.net_g_latest.pth.tmp'
    rng = random.Random()
    mid_save_kills = 0
    for attempt in range(5):
        before = mtime(latest)
        pid = forking.start(lambda: save_forever(model, big), str(tmp_path / 'child.log'))
        deadline = time.time() + 60
        while mtime(latest) == before and time.time() < deadline:
            time.sleep(0.001)  # this child has replaced net_g_latest.pth at least once
        if attempt < 2:  # kill while the temporary file of net_g_latest.pth is being written
            while not temp.exists() and time.time() < deadline:
                time.sleep(0.0002)
        else:  # at a random moment of the save loop
            time.sleep(rng.uniform(0, 0.3))
        in_save = temp.exists()
        assert forking.kill(pid) == -9, open(tmp_path / 'child.log').read()[-2000:]
        mid_save_kills += in_save
        assert_complete(tmp_path)
        # BasicSR's auto-resume picks the newest '<iter>.state'; temporary files are not candidates
        states = [int(v.split('.state')[0]) for v in scandir(str(tmp_path / 'training_states'), suffix='state')]
        assert states and all((tmp_path / 'training_states' / f'{s}.state').is_file() for s in states)
    assert mid_save_kills >= 2


def test_result_images_are_written_atomically(tmp_path):
    """Validation/test images: the same bytes as OpenCV's imwrite, through a temporary file."""
    import cv2

    from conftest import photo
    from dtkd_model.safe_training import atomic_imwrite

    img = photo('chelsea')[:40, :52, ::-1].copy()
    atomic_imwrite(img, tmp_path / 'a' / 'sr.png')
    cv2.imwrite(str(tmp_path / 'ref.png'), img)
    assert (tmp_path / 'a' / 'sr.png').read_bytes() == (tmp_path / 'ref.png').read_bytes()
    assert os.listdir(tmp_path / 'a') == ['sr.png']
