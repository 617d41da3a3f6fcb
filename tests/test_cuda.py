"""The CUDA path (run by `make gpu-check` on a machine with a GPU; skipped elsewhere).

References are computed on the CPU in float64, and errors are bounded absolutely against them.
"""
import copy
import glob
import os
import re
import subprocess
import sys

import pytest
import torch
from basicsr.archs.swinir_arch import SwinIR

from conftest import REPO, TINY_STUDENT, run_cli, tiny_teacher_options, train_options, write_yaml
from dtkd_arch.swinir_student_arch import SwinIRStudent

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA device on this machine')]
PAPER = dict(upscale=4, img_size=64, window_size=8, img_range=1., depths=[6, 6, 6, 6], embed_dim=60,
             num_heads=[6, 6, 6, 6], mlp_ratio=2, upsampler='pixelshuffledirect', resi_connection='1conv')
# bound on |output - float64 reference| for images in [0, 1]: fp32 (TF32 off) and bf16 autocast
BOUNDS = {'fp32': 1e-4, 'bf16': 6e-2}


@pytest.fixture(autouse=True)
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize('cls', [SwinIR, SwinIRStudent])
@pytest.mark.parametrize('precision', ['fp32', 'bf16'])
def test_student_forward_and_gradients_against_float64_cpu(cls, precision):
    torch.manual_seed(0)
    ref = SwinIR(**PAPER).double().eval()
    net = (SwinIRStudent(**PAPER, precision=precision) if cls is SwinIRStudent else cls(**PAPER)).eval()
    net.load_state_dict(ref.state_dict())
    net = net.cuda()
    x = torch.rand(2, 3, 32, 40, generator=torch.Generator().manual_seed(1))
    out_ref = ref(x.double())
    out_ref.square().mean().backward()
    with torch.autocast('cuda', dtype=torch.bfloat16, enabled=precision == 'bf16' and cls is SwinIR):
        out = net(x.cuda())
    out.float().square().mean().backward()
    err = (out.double().cpu() - out_ref.detach()).abs().max().item()
    assert err < BOUNDS[precision], err
    for (name, p_ref), (_, p) in zip(ref.named_parameters(), net.named_parameters()):
        scale = p_ref.grad.abs().max().item() + 1e-12
        g_err = (p.grad.double().cpu() - p_ref.grad).abs().max().item() / scale
        assert g_err < (1e-3 if precision == 'fp32' else 0.25), (name, g_err)


def test_teacher_sample_on_cuda_equals_cpu_with_the_same_seed(tmp_path):
    from dtkd_teacher.teacher import ResShiftTeacher

    opt = tiny_teacher_options(tmp_path, steps=3)
    lq = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    outs = {}
    for device in ('cpu', 'cuda'):
        teacher = ResShiftTeacher.from_options(copy.deepcopy(opt), device=device)
        outs[device] = teacher.sample(lq, generator=torch.Generator().manual_seed(5)).cpu()
    assert (outs['cuda'] - outs['cpu']).abs().max().item() < 1e-3


@pytest.mark.parametrize('precision', ['fp32', 'bf16'])
def test_paper_option_file_trains_20_iterations(tiny_pairs, tmp_path, precision):
    opt = train_options(tiny_pairs, f'gpu_{precision}', total_iter=20, save_freq=10,
                        kd_opt={'type': 'DWTKDLoss', 'loss_weight': 2.0, 'level': 2, 'group_weights': [1, 2, 1]},
                        kd_schedule={'type': 'linear'})
    opt['num_gpu'] = 1
    opt['network_g'] = dict(TINY_STUDENT, type='SwinIRStudent', precision=precision)
    yml = write_yaml(tmp_path / 'train.yml', opt)
    result = run_cli(['-m', 'dtkd.train', '-opt', yml], cwd=str(tmp_path), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert os.path.isfile(tmp_path / 'experiments' / f'gpu_{precision}' / 'models' / 'net_g_latest.pth')


@pytest.mark.parametrize('tile', [0, 16])
def test_infer_on_cuda_with_and_without_tiles(tmp_path, tile):
    import cv2
    import numpy as np

    torch.manual_seed(0)
    net = SwinIRStudent(**PAPER)
    torch.save({'params': net.state_dict()}, tmp_path / 'student.pth')
    img = (np.random.default_rng(0).random((40, 52, 3)) * 255).astype(np.uint8)
    cv2.imwrite(str(tmp_path / 'in.png'), img)
    args = ['-m', 'dtkd.infer', '--model', str(tmp_path / 'student.pth'), '-i', str(tmp_path / 'in.png'),
            '-o', str(tmp_path / 'out'), '--device', 'cuda', '--tile', str(tile)]
    result = run_cli(args, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    out = cv2.imread(str(next((tmp_path / 'out').iterdir())))
    assert out.shape == (160, 208, 3)


def test_one_process_nccl_ddp_start(tiny_pairs, tmp_path):
    opt = train_options(tiny_pairs, 'gpu_ddp', total_iter=2)
    opt['num_gpu'] = 1
    opt['network_g'] = dict(TINY_STUDENT, type='SwinIRStudent')
    yml = write_yaml(tmp_path / 'train.yml', opt)
    env = dict(os.environ, PYTHONPATH=REPO)
    result = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=1',
                             '-m', 'dtkd.train', '-opt', yml, '--launcher', 'pytorch'], cwd=str(tmp_path), env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert os.path.isfile(tmp_path / 'experiments' / 'gpu_ddp' / 'models' / 'net_g_latest.pth')


def _train_log(exp):
    return ''.join(open(p).read() for p in sorted(glob.glob(str(exp / 'train_*.log'))))


@pytest.mark.parametrize('channels_last', [False, True])
def test_fp16_training_with_the_gradient_scaler_20_iterations(tiny_pairs, tmp_path, channels_last):
    name = f'gpu_fp16{"_cl" if channels_last else ""}'
    opt = train_options(tiny_pairs, name, total_iter=20, save_freq=10,
                        kd_opt={'type': 'DWTKDLoss', 'loss_weight': 2.0, 'level': 2, 'group_weights': [1, 2, 1]},
                        kd_schedule={'type': 'linear'})
    opt['num_gpu'] = 1
    opt['network_g'] = dict(TINY_STUDENT, type='SwinIRStudent', precision='fp16')
    opt['train']['channels_last'] = channels_last
    yml = write_yaml(tmp_path / 'train.yml', opt)
    result = run_cli(['-m', 'dtkd.train', '-opt', yml], cwd=str(tmp_path), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    exp = tmp_path / 'experiments' / name
    log = _train_log(exp)
    assert 'the loss is scaled by a gradient scaler' in log
    assert ('train.channels_last: the student and its LQ inputs use the channels_last' in log) == channels_last
    assert 'non-finite' not in log  # scaler skips (if any) are not non-finite steps
    weights = torch.load(exp / 'models' / 'net_g_latest.pth', weights_only=True)['params']
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert all(v.is_contiguous() for v in weights.values())
    for it in (10, 20):
        state = torch.load(exp / 'training_states' / f'{it}.state', weights_only=True)
        assert state['grad_scaler']['scale'] > 0, state['grad_scaler']


@pytest.mark.parametrize('precision', ['fp32', 'bf16'])
def test_compile_on_cuda_trains_a_few_iterations(tiny_pairs, tmp_path, precision):
    name = f'gpu_compile_{precision}'
    opt = train_options(tiny_pairs, name, total_iter=4, save_freq=2,
                        kd_opt={'type': 'DWTKDLoss', 'loss_weight': 2.0, 'level': 2, 'group_weights': [1, 2, 1]})
    opt['num_gpu'] = 1
    opt['network_g'] = dict(TINY_STUDENT, type='SwinIRStudent', precision=precision)
    opt['train']['compile'] = True
    yml = write_yaml(tmp_path / 'train.yml', opt)
    result = run_cli(['-m', 'dtkd.train', '-opt', yml], cwd=str(tmp_path), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    exp = tmp_path / 'experiments' / name
    assert len(re.findall(r'train\.compile: compiled the student in [\d.]+ s', _train_log(exp))) == 1
    params = {k: v for k, v in TINY_STUDENT.items() if k != 'type'}
    keys = list(SwinIRStudent(**params).state_dict())
    for name in ('net_g_2.pth', 'net_g_latest.pth'):
        assert list(torch.load(exp / 'models' / name, weights_only=True)['params']) == keys


def test_realworld_path_with_a_bf16_online_teacher(tiny_pairs, tmp_path):
    """RealWorldDTKDModel on CUDA: the degradation on the device, reproducible from its key; the online
    teacher in bf16 autocast (teacher.precision auto) on exactly the student's LQ; the runner trains."""
    import cv2
    from basicsr.models import build_model
    from test_online_teacher import tiny_teacher_file
    from test_realworld_train import gt_batch, realworld_options

    from conftest import photo, write_rgb

    write_rgb(str(tmp_path / 'gt' / 'gt' / 'astronaut.png'), cv2.resize(photo('astronaut'), (400, 400)))
    (tmp_path / 'gt' / 'meta_info.txt').write_text('astronaut.png\n')
    (tmp_path / 'teacher').mkdir()
    teacher_yml = tiny_teacher_file(tmp_path / 'teacher')
    opt = realworld_options(tiny_pairs, tmp_path / 'gt', teacher_yml, 'gpu_realworld', total_iter=4)
    opt['num_gpu'] = 1
    model = build_model(dict(copy.deepcopy(opt), is_train=True, dist=False, rank=0, world_size=1))
    assert model.online_teacher.precision == 'bf16' and model.device.type == 'cuda'
    seen = []
    sample = model.online_teacher.sample
    model.online_teacher.sample = lambda lq, generator=None: seen.append(lq.clone()) or sample(lq, generator)
    model.feed_data({'gt': gt_batch(tmp_path / 'gt')})
    model.optimize_parameters(1)
    assert model.lq.is_cuda and len(seen) == 1 and torch.equal(seen[0], model.lq)
    assert torch.isfinite(model.teacher).all() and model.log_dict['l_kd'] == model.log_dict['l_kd']
    lq = model.lq.clone()
    model.feed_data({'gt': gt_batch(tmp_path / 'gt')})
    model.optimize_parameters(1)
    # the same key on the device: the same degradation (up to an 8-bit rounding flip, should a kernel
    # choose another algorithm)
    assert float((model.lq - lq).abs().max()) <= 1.01 / 255 and float((model.lq - lq).abs().mean()) < 1e-3
    # bf16 teacher against the fp32 one on the same LQ and noise (random tiny networks amplify rounding)
    from dtkd_teacher.teacher import ResShiftTeacher

    fp32 = ResShiftTeacher.from_options(teacher_yml, device='cuda', precision='fp32')
    gens = [torch.Generator().manual_seed(i) for i in range(lq.shape[0])]
    ref = fp32.sample(lq, generator=gens)
    gens = [torch.Generator().manual_seed(i) for i in range(lq.shape[0])]
    out = sample(lq, gens)
    assert float((out - ref).abs().mean()) < 0.15
    result = run_cli(['-m', 'dtkd.train', '-opt', write_yaml(tmp_path / 'train.yml', opt)], cwd=str(tmp_path),
                     timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert os.path.isfile(tmp_path / 'experiments' / 'gpu_realworld' / 'models' / 'net_g_4.pth')
