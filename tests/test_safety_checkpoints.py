"""Checkpoints cannot run code: every loader reads weights only and refuses pickled code by name.

The malicious file is a real ``torch.save`` of a state dict plus an object whose unpickling calls
``os.system("touch <marker>")``; the control test shows that ``torch.load(weights_only=False)``
(what pyiqa, torchvision's hub loader and older BasicSR code do) runs it.
"""
import os

import forking
import numpy as np
import pytest
import torch

from conftest import REPO, TINY_STUDENT, train_options, write_yaml
from dtkd_arch.checkpoint import (
    CheckpointFormatError,
    UnsafeCheckpointError,
    load_state_dict_file,
    safe_torch_load,
)


class _RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


@pytest.fixture
def evil(tmp_path):
    """(path of a checkpoint whose unpickling runs `touch marker`, marker path)."""
    from basicsr.archs import build_network

    import dtkd_arch  # noqa: F401

    marker = tmp_path / 'code.ran'
    net = build_network(dict(TINY_STUDENT))
    path = tmp_path / 'evil.pth'
    torch.save({'params': net.state_dict(), 'extra': _RunsCode(marker)}, path)
    return str(path), marker


def one_error_line(output):
    lines = [line for line in output.strip().splitlines() if line.startswith('error:')]
    assert len(lines) == 1 and 'Traceback' not in output, output[-3000:]
    return lines[0]


def test_control_full_unpickling_runs_the_file(evil):
    path, marker = evil
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_loaders_refuse_pickled_code_and_name_the_file(evil, tmp_path):
    from dtkd_metric import perceptual_metric as pm
    from dtkd_model.resshift_model import load_network_state

    path, marker = evil
    for load in (lambda: safe_torch_load(path, option_key='path.x'),
                 lambda: load_state_dict_file(path, what='student', option_key='--model'),
                 lambda: load_network_state(path)):
        with pytest.raises(UnsafeCheckpointError) as info:
            load()
        message = str(info.value)
        assert path in message and 'posix.system' in message and 'refused' in message
    # pyiqa's own loader would unpickle in full; the metrics refuse instead, also for the AlexNet
    # backbone that torchvision would read with weights_only=False
    with pytest.raises(pm.OptionError, match='refused'):
        pm._load_state_dict(path, 'LPIPS weights')
    with pytest.raises(pm.OptionError, match='evil.pth.*refused'):
        pm.LPIPSMetric(device='cpu', weights_path=path, backbone_path=path)
    with pytest.raises(pm.OptionError, match='refused'):
        pm.MUSIQMetric(device='cpu', weights_path=path)
    assert not marker.exists()

    # data-only content still loads: tensors, containers, numbers and plain numpy arrays
    ok = tmp_path / 'numpy.pth'
    torch.save({'params': {'w': torch.ones(2)}, 'mean': np.arange(3, dtype=np.float32), 'step': np.int64(5)}, ok)
    state = safe_torch_load(ok)
    assert state['mean'].tolist() == [0.0, 1.0, 2.0] and int(state['step']) == 5
    assert pm._load_state_dict(str(ok), 'x')['w'].tolist() == [1.0, 1.0]
    # truncated and non-PyTorch files are named as such
    data = open(ok, 'rb').read()
    (tmp_path / 'cut.pth').write_bytes(data[:len(data) // 2])
    (tmp_path / 'text.pth').write_text('not a checkpoint')
    for name in ('cut.pth', 'text.pth'):
        with pytest.raises(CheckpointFormatError, match=f'{name}.*cannot be read'):
            safe_torch_load(tmp_path / name)


def test_entry_points_refuse_pickled_code_before_work(evil, tiny_pairs, tmp_path):
    from basicsr import test as _basicsr_test  # noqa: F401  (imported once here, not in every child)
    from basicsr import train as _basicsr_train  # noqa: F401

    from dtkd import infer, test, train

    path, marker = evil
    opt = train_options(tiny_pairs, 'evil_pretrain', total_iter=2)
    opt['path']['pretrain_network_g'] = path
    train_yml = write_yaml(tmp_path / 'train.yml', opt)
    test_opt = {'name': 'evil_test', 'model_type': 'DTKDModel', 'scale': 4, 'num_gpu': 0,
                'datasets': {'test_1': opt['datasets']['val']}, 'network_g': dict(TINY_STUDENT),
                'path': {'pretrain_network_g': path}, 'val': {'save_img': False}}
    test_yml = write_yaml(tmp_path / 'test.yml', test_opt)
    img = tiny_pairs / 'val_lq' / 'chelsea.png'
    runs = [('dtkd-train', train, ['dtkd-train', '-opt', train_yml], 'path.pretrain_network_g'),
            ('dtkd-test', test, ['dtkd-test', '-opt', test_yml], 'path.pretrain_network_g'),
            ('dtkd-infer', infer, ['dtkd-infer', '-i', str(img), '-o', str(tmp_path / 'sr'), '--model', path],
             '--model')]
    for label, module, argv, key in runs:
        code, out = forking.run_entry_point(module, argv, str(tmp_path / 'log'), str(tmp_path))
        assert code == 2, f'{label}: exit {code}\n{out[-3000:]}'
        line = one_error_line(out)
        assert key in line and path in line and 'posix.system' in line, f'{label}: {line}'
        assert not marker.exists(), label
    assert not (tmp_path / 'experiments').exists() and not (tmp_path / 'results').exists()
    assert not (tmp_path / 'sr').exists() or not os.listdir(tmp_path / 'sr')


def test_auto_resume_refuses_a_state_or_checkpoint_carrying_code(evil, tiny_pairs, tmp_path):
    from basicsr import train as _basicsr_train  # noqa: F401

    from dtkd import train

    path, marker = evil
    opt = train_options(tiny_pairs, 'resumed', total_iter=6)
    yml = write_yaml(tmp_path / 'train.yml', opt)
    exp = tmp_path / 'experiments' / 'resumed'
    (exp / 'training_states').mkdir(parents=True)
    (exp / 'models').mkdir()
    # 1) the newest training state carries code
    state = exp / 'training_states' / '4.state'
    torch.save({'epoch': 0, 'iter': 4, 'optimizers': [], 'schedulers': [], 'x': _RunsCode(marker)}, state)
    code, out = forking.run_entry_point(train, ['dtkd-train', '-opt', yml, '--auto_resume'], str(tmp_path / 'log'),
                                        str(tmp_path))
    assert code == 2, out[-3000:]
    line = one_error_line(out)
    assert 'path.resume_state' in line and str(state) in line and 'posix.system' in line
    assert not marker.exists()
    # 2) a clean state whose network checkpoint carries code
    torch.save({'epoch': 0, 'iter': 4, 'optimizers': [], 'schedulers': []}, state)
    os.replace(path, exp / 'models' / 'net_g_4.pth')
    code, out = forking.run_entry_point(train, ['dtkd-train', '-opt', yml, '--auto_resume'], str(tmp_path / 'log'),
                                        str(tmp_path))
    assert code == 2, out[-3000:]
    line = one_error_line(out)
    assert 'net_g_4.pth' in line and 'posix.system' in line
    assert not marker.exists()


def test_teacher_checkpoints_are_read_weights_only(evil, tmp_path):
    import yaml

    from dtkd_teacher.teacher import ResShiftTeacher

    path, marker = evil
    with open(os.path.join(REPO, 'tests', 'data', 'options', 'tiny_teacher.yml')) as f:
        opt = yaml.safe_load(f)
    opt['unet']['ckpt'] = opt['autoencoder']['ckpt'] = path
    with pytest.raises(UnsafeCheckpointError, match='evil.pth.*posix.system'):
        ResShiftTeacher.from_options(opt)
    assert not marker.exists()
