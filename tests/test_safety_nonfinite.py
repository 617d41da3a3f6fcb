"""NaN/Inf in a loss or a teacher output: the step is skipped with a warning naming the batch, training
stops with a clear error after ``train.max_nonfinite_steps`` consecutive bad steps, and no NaN is
ever saved.

The fault is real: the online teacher's autoencoder checkpoint (a real file) holds a NaN weight, so
every teacher output is NaN. With ``kd_schedule.start_iter: 2`` the teacher is first used at
iteration 3; iterations 1-2 are normal.
"""
import glob
import os
import re

import forking
import pytest
import torch

from conftest import tiny_teacher_options, train_options, write_yaml

DWT = {'type': 'DWTKDLoss', 'loss_weight': 2.0, 'level': 2, 'wavelet': 'haar', 'group_weights': [1, 2, 1]}


@pytest.fixture(scope='module')
def nan_teacher(tmp_path_factory):
    """Tiny teacher option file whose autoencoder decoder has one NaN weight."""
    def one_nan_weight(block, state):
        if block == 'autoencoder':
            state['decoder.conv_out.weight'][0, 0, 0, 0] = float('nan')

    root = tmp_path_factory.mktemp('nan_teacher')
    opt = tiny_teacher_options(root, seed=0, steps=1, edit_state=one_nan_weight)
    return write_yaml(root / 'nan_teacher.yml', opt)


def run_training(tiny_pairs, tmp_path, nan_teacher, total_iter, limit):
    from basicsr import train as _basicsr_train  # noqa: F401  (imported once here, not in the child)

    from dtkd import train

    opt = train_options(tiny_pairs, 'nan', total_iter=total_iter, kd_opt=dict(DWT),
                        kd_schedule={'type': 'linear', 'start_iter': 2}, teacher=False, save_freq=1)
    opt['teacher'] = {'opt': nan_teacher}
    opt['train']['max_nonfinite_steps'] = limit
    opt['logger']['print_freq'] = 100  # the teacher runs only where lambda > 0 (from iteration 3)
    opt['logger']['use_tb_logger'] = False
    opt['val'] = None
    yml = write_yaml(tmp_path / 'nan.yml', opt)
    code, out = forking.run_entry_point(train, ['dtkd-train', '-opt', yml], str(tmp_path / 'out.log'), str(tmp_path))
    exp = tmp_path / 'experiments' / 'nan'
    log = ''.join(open(p).read() for p in glob.glob(str(exp / 'train_*.log')))
    return code, out, log, exp


def weights(path):
    return torch.load(path, weights_only=True)['params']


def assert_same(a, b):
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_steps_are_skipped_and_training_goes_on(tiny_pairs, tmp_path, nan_teacher):
    code, out, log, exp = run_training(tiny_pairs, tmp_path, nan_teacher, total_iter=4, limit=3)
    assert code == 0, out[-3000:]
    warnings = re.findall(r'iter (\d+): non-finite (.*); step skipped \(batch: ([^)]*)\); (\d) consecutive', log)
    assert [(int(w[0]), int(w[3])) for w in warnings] == [(3, 1), (4, 2)], log[-3000:]
    for _, what, keys, _ in warnings:
        assert 'l_kd' in what and 'teacher output' in what and 'l_task' not in what
        assert re.fullmatch(r'\d{4}, \d{4}', keys)  # the two images of the batch, by name
    # iterations 3 and 4 did not change the weights; every saved file is finite
    w2 = weights(exp / 'models' / 'net_g_2.pth')
    assert not torch.equal(w2['conv_first.weight'], weights(exp / 'models' / 'net_g_1.pth')['conv_first.weight'])
    for name in ('net_g_3.pth', 'net_g_4.pth', 'net_g_latest.pth'):
        assert_same(weights(exp / 'models' / name), w2)
    for path in glob.glob(str(exp / 'training_states' / '*.state')):
        state = torch.load(path, weights_only=True)
        for opt_state in state['optimizers']:
            assert all(torch.isfinite(t).all() for s in opt_state['state'].values() for t in s.values()
                       if torch.is_tensor(t))


def test_consecutive_bad_steps_stop_training_with_a_clear_error(tiny_pairs, tmp_path, nan_teacher):
    code, out, log, exp = run_training(tiny_pairs, tmp_path, nan_teacher, total_iter=6, limit=2)
    assert code == 1, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith('error:')]
    assert len(errors) == 1 and 'Traceback' not in out, out[-3000:]
    assert errors[0].startswith('error: training stopped at iter 4: 2 consecutive iterations had a NaN/Inf loss')
    assert 'teacher output' in errors[0] and 'train.max_nonfinite_steps' in errors[0]
    models = sorted(os.listdir(exp / 'models'))
    assert models == ['net_g_1.pth', 'net_g_2.pth', 'net_g_3.pth']  # nothing saved at or after the stop
    assert_same(weights(exp / 'models' / 'net_g_3.pth'), weights(exp / 'models' / 'net_g_2.pth'))


def test_a_nan_network_is_never_saved(tmp_path):
    """The last guard: a network that holds NaN (however it got there) is not written, the old file stays."""
    from dtkd_model.safe_training import NonFiniteError, SafeTrainingMixin

    class Saver(SafeTrainingMixin):
        opt = {'path': {'models': str(tmp_path)}}

        @staticmethod
        def get_bare_model(net):
            return net

    net = torch.nn.Linear(3, 3)
    Saver().save_network(net, 'net_g', 5)
    before = open(tmp_path / 'net_g_5.pth', 'rb').read()
    with torch.no_grad():
        net.bias[1] = float('inf')
    with pytest.raises(NonFiniteError, match=r'net_g_5\.pth not saved: 1 tensor\(s\) hold NaN/Inf \(params\.bias\)'):
        Saver().save_network(net, 'net_g', 5)
    assert open(tmp_path / 'net_g_5.pth', 'rb').read() == before
    assert os.listdir(tmp_path) == ['net_g_5.pth']


def test_bad_iterations_are_counted_once_and_reset_by_a_good_one():
    """The counting every model shares (SafeTrainingMixin.finite_step): two steps of one iteration (AugKD's
    main and auxiliary steps) count once, a good iteration resets the count, gradients are cleared."""
    from dtkd_model.safe_training import NonFiniteError, SafeTrainingMixin

    class Model(SafeTrainingMixin):
        def __init__(self):
            self.opt = {'train': {'max_nonfinite_steps': 2}}
            self.net_g = torch.nn.Linear(2, 1)

    model = Model()

    def step(it, x):
        model.net_g.zero_grad()
        loss = model.net_g(torch.tensor([[x, 1.0]])).sum()
        loss.backward()
        return model.finite_step(loss, {'l_task': loss}, it)

    nan = float('nan')
    assert step(1, 0.5)
    assert not step(2, nan) and model.net_g.weight.grad is None  # skipped, gradients cleared
    assert not step(2, nan)  # the auxiliary step of the same iteration: still one bad iteration
    assert step(3, 0.5)  # resets
    assert not step(4, nan)
    with pytest.raises(NonFiniteError, match='training stopped at iter 5: 2 consecutive'):
        step(5, float('inf'))
