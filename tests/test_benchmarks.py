"""The benchmark scripts (scripts/benchmark_*.py) on a tiny teacher and student, and tiny sizes.

Timings are not asserted (shared machines); FLOP counts are checked against hand-computed
multiply-accumulate counts, parameter counts against the networks.
"""
import importlib.util
import os
import re
import sys

import pytest
import torch
import yaml
from torch import nn

import dtkd_arch  # noqa: F401  (registers the architectures)
from conftest import REPO, TINY_STUDENT

sys.path.insert(0, os.path.join(REPO, "scripts"))
from benchmark_common import count_flops, parse_size  # noqa: E402

TINY = os.path.join(REPO, 'tests', 'data', 'options', 'tiny_teacher.yml')


def load_script(name):
    spec = importlib.util.spec_from_file_location(f'_bench_{name}', os.path.join(REPO, 'scripts', f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def table_rows(text):
    """Markdown table rows (without header and rule) as lists of cells."""
    lines = [line for line in text.splitlines() if line.startswith('|')]
    return [[c.strip() for c in line.strip('|').split('|')] for line in lines[2:]]


def test_count_flops_matches_hand_counted_macs():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    # 2 FLOPs per MAC: out pixels x out channels x (in channels x 3 x 3)
    assert count_flops(conv, torch.empty(1, 3, 16, 20)) == 2 * 16 * 20 * 8 * 3 * 9
    lin = nn.Linear(12, 5)
    assert count_flops(lin, torch.empty(7, 12)) == 2 * 7 * 12 * 5
    assert conv.weight.device.type == 'cpu' and conv.weight.abs().sum() > 0  # counted on fake tensors
    # attention counts as its two matrix products (the fused CPU kernel has no FLOP formula of its own)
    q = torch.empty(2, 3, 10, 4)
    attention = nn.functional.scaled_dot_product_attention
    assert count_flops(attention, q, q, q) == 2 * 2 * (2 * 3 * 10 * 10 * 4)
    assert parse_size('48x80') == (48, 80) and parse_size(16) == (16, 16)


def test_benchmark_complexity_table(tmp_path, capsys):
    student_opt = str(tmp_path / 'student.yml')
    with open(student_opt, 'w') as f:
        yaml.safe_dump({'network_g': dict(TINY_STUDENT, type='SwinIRStudent')}, f)
    script = load_script('benchmark_complexity')
    rc = script.main(['-opt', TINY, '--random-weights', '--student-opt', student_opt, '--lr-size', '8',
                      '--device', 'cpu', '--repeats', '1', '--warmup', '0', '--teacher-steps', '3', '1',
                      '--precision', 'fp32'])
    out = capsys.readouterr().out
    assert rc == 0
    assert 'Machine:' in out and 'Input: one 8x8 LR image' in out
    rows = table_rows(out)
    names = [r[0] for r in rows]
    assert names[:3] == ['ResShift (3 steps)', 'ResShift (1 step)', 'SwinIRStudent (student)']
    assert len(rows[0]) == 6 and float(rows[0][5]) > 0  # one latency column (fp32)
    gflops = {r[0]: float(r[3]) for r in rows}
    step = float(re.search(r'UNet ([0-9.]+) GFLOPs', out).group(1))
    assert gflops['ResShift (3 steps)'] - gflops['ResShift (1 step)'] == pytest.approx(2 * step, abs=2e-3)
    assert float(rows[2][4]) == pytest.approx(gflops['SwinIRStudent (student)'] / 2, abs=1e-3)

    # student parameters and the hand count of its first convolution's share of the FLOPs
    from basicsr.archs.swinir_arch import SwinIR

    net_opt = {k: v for k, v in TINY_STUDENT.items() if k != 'type'}
    student = SwinIR(**net_opt)
    assert rows[2][2] == f'{sum(p.numel() for p in student.parameters()) / 1e6:.3f} M'
    assert float(rows[2][3]) * 1e9 > 2 * 8 * 8 * 12 * 3 * 9


@pytest.mark.parametrize('native_bf16', [True, False])
def test_benchmark_teacher_table(capsys, monkeypatch, native_bf16):
    """fp32 rows, and bf16 rows only on CPUs with bf16 instructions (elsewhere bf16 is many times slower)."""
    from dtkd_utils import device

    monkeypatch.setattr(device, 'cpu_supports_bf16', lambda: native_bf16)
    script = load_script('benchmark_teacher')
    rc = script.main(['-opt', TINY, '--random-weights', '--lr-size', '8x12', '--steps', '2', '1', '--device', 'cpu',
                      '--repeats', '1'])
    out = capsys.readouterr().out
    assert rc == 0
    assert 'LR input 8x12' in out and 'Machine:' in out
    rows = table_rows(out)
    expected = [('2', 'fp32'), ('1', 'fp32')] + ([('2', 'bf16'), ('1', 'bf16')] if native_bf16 else [])
    assert [(r[0], r[1]) for r in rows] == expected
    for row in rows:
        assert float(row[2]) > 0 and float(row[3]) > 0 and float(row[4]) > 0 and float(row[5]) > 0


def test_benchmark_teacher_cache_batches(capsys):
    """The cache table: one row per batch size, rates positive, batch 1 at 1.00x."""
    script = load_script('benchmark_teacher')
    rc = script.main(['-opt', TINY, '--random-weights', '--lr-size', '8x12', '--steps', '1', '--device', 'cpu',
                      '--precision', 'fp32', '--repeats', '1', '--cache-batches', '1', '3'])
    out = capsys.readouterr().out
    assert rc == 0 and 'Teacher-output cache: 1 steps, fp32' in out
    rows = [r for r in table_rows(out) if r[0] in ('1', '3') and r[-1].endswith('x')]
    assert [r[0] for r in rows] == ['1', '3'] and rows[0][2] == '1.00x'
    assert all(float(r[1]) > 0 for r in rows)
    assert script.main(['-opt', TINY, '--random-weights', '--device', 'cpu', '--cache-batches', '0']) == 2


def test_benchmark_errors(capsys):
    script = load_script('benchmark_teacher')
    assert script.main(['-opt', TINY, '--random-weights', '--device', 'cpu', '--precision', 'fp16']) == 2
    assert 'fp16' in capsys.readouterr().err
    # the tiny option file has no checkpoints: without --random-weights the teacher refuses
    assert script.main(['-opt', TINY, '--device', 'cpu']) == 2
    assert 'unet.ckpt' in capsys.readouterr().err
    # --official-root must be a ResShift checkout (models/unet.py); the message names the option
    assert script.main(['-opt', TINY, '--random-weights', '--device', 'cpu', '--official-root', str(REPO)]) == 2
    assert '--official-root' in capsys.readouterr().err


def test_perturb_zero_layers_fills_only_zero_parameters():
    script = load_script('benchmark_teacher')
    net = nn.Sequential(nn.Conv2d(2, 3, 1), nn.Conv2d(3, 3, 1))
    nn.init.zeros_(net[1].weight)
    nn.init.zeros_(net[1].bias)
    before = net[0].weight.detach().clone()
    script.perturb_zero_layers(net)
    assert torch.equal(net[0].weight, before)
    assert net[1].weight.abs().min() > 0 and net[1].bias.abs().min() > 0


def test_compute_bound_table(capsys):
    """Rates are FLOPs over the timer's mean seconds; the reference is a 3x3 convolution measured here."""
    script = load_script('benchmark_teacher')

    class Timer:
        times = {'unet': [0.5, 1.5], 'encode': [2.0], 'decode': []}

    script.print_compute_bound((8e9, 3e9, 5e9), Timer(), torch.device('cpu'))
    out = capsys.readouterr().out
    assert '3x3 convolution 256 -> 256' in out
    rows = table_rows(out)
    assert [r[0] for r in rows] == ['UNet call', 'encode']  # decode: no calls timed
    assert rows[0][1:4] == ['3.0', '1000.0', '3']
    assert rows[1][1:4] == ['8.0', '2000.0', '4']


def expected_variants(native_bf16, compile=False):
    """The student variants on a CPU: bf16 autocast only with bf16 matrix instructions."""
    reduced = ['bf16'] if native_bf16 else []
    names = ['SwinIRStudent fp32'] + [f'SwinIRStudent {p} autocast' for p in reduced]
    names.append('SwinIRStudent fp32 channels-last')
    if compile:
        names += [f'SwinIRStudent {p} torch.compile' for p in ['fp32'] + reduced]
    return names


@pytest.mark.parametrize('native_bf16', [True, False])
@pytest.mark.parametrize('compile', [False, True])
def test_student_variants_follow_cpu_features(monkeypatch, native_bf16, compile):
    from dtkd_utils import device

    monkeypatch.setattr(device, 'cpu_supports_bf16', lambda: native_bf16)
    script = load_script('benchmark_student')
    vs = script.variants(torch.device('cpu'), compile=compile)
    assert [v.name for v in vs] == expected_variants(native_bf16, compile)
    assert all(v.compiled == v.name.endswith('torch.compile') for v in vs)
    assert [v.name for v in vs if v.channels_last] == ['SwinIRStudent fp32 channels-last']


@pytest.mark.parametrize('bf16_supported', [True, False])
def test_reduced_precisions_on_cuda(monkeypatch, bf16_supported):
    """CUDA: fp16 always, bf16 where the GPU supports it (no GPU needed to decide)."""
    from benchmark_common import reduced_precisions

    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda *a, **k: bf16_supported)
    assert reduced_precisions(torch.device('cuda')) == ['fp16'] + (['bf16'] if bf16_supported else [])


STUDENT_ARGS = ['--device', 'cpu', '--sizes', '8', '--repeats', '1', '--warmup', '0', '--train-iters', '1',
                '--train-warmup', '0', '--batch', '1', '--train-size', '8', '--psnr-size', '8']


@pytest.mark.parametrize('native_bf16', [True, False])
def test_benchmark_student_runs_every_variant(capsys, monkeypatch, native_bf16):
    """The student benchmark end to end on tiny sizes: accuracy, inference and training tables."""
    from dtkd_utils import device

    monkeypatch.setattr(device, 'cpu_supports_bf16', lambda: native_bf16)
    script = load_script('benchmark_student')
    assert script.main(STUDENT_ARGS) == 0
    out = capsys.readouterr().out
    assert '929,628 parameters' in out and 'machine: ' in out
    names = ['BasicSR SwinIR fp32'] + expected_variants(native_bf16)
    inference = table_rows(out.split('### Inference')[1].split('###')[0])
    training = table_rows(out.split('### Training')[1])
    for rows in (inference, training):
        assert [r[0] for r in rows] == names
        assert rows[0][3:] == ['1.00x', '1.00x']  # the reference against itself
        assert all(float(r[1]) > 0 and r[4].endswith('x') for r in rows)
    accuracy = {r[0]: r for r in table_rows(out.split('### Accuracy')[1].split('###')[0])}
    assert list(accuracy) == names[1:] and all(r[4] == 'yes' for r in accuracy.values())
    assert float(accuracy['SwinIRStudent fp32'][1]) == 0  # the same network as BasicSR's SwinIR
    if native_bf16:
        assert float(accuracy['SwinIRStudent bf16 autocast'][2]) >= 45


def test_benchmark_student_fails_a_failed_accuracy_check(capsys, monkeypatch):
    script = load_script('benchmark_student')
    monkeypatch.setattr(script, 'FP32_ATOL', -1.0)  # no fp32 variant can pass
    assert script.main(STUDENT_ARGS + ['--no-train']) == 1
    rows = table_rows(capsys.readouterr().out.split('### Accuracy')[1].split('###')[0])
    assert rows[0][0] == 'SwinIRStudent fp32' and rows[0][4] == 'NO'
    assert script.main(['--device', 'nonsense']) == 2


def test_student_runner_precision(monkeypatch):
    """benchmark_complexity sets SwinIRStudent's own precision (its fp32 forward switches autocast off)
    and autocasts other networks."""
    from dtkd_arch.swinir_student_arch import SwinIRStudent

    script = load_script('benchmark_complexity')
    student = SwinIRStudent(**{k: v for k, v in TINY_STUDENT.items() if k != 'type'}).eval()
    x = torch.rand(1, 3, 8, 8)
    script.student_runner(student, x, 'bf16', torch.device('cpu'))()
    assert student.precision == 'bf16'
    dtypes = []
    conv = nn.Conv2d(3, 3, 1)
    conv.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    for precision in ('bf16', 'fp32'):
        script.student_runner(conv, x, precision, torch.device('cpu'))()
    assert dtypes == [torch.bfloat16, torch.float32]


@pytest.mark.slow
def test_benchmark_train_step_reports_the_cost_of_distillation():
    """SRModel against DTKDModel on one tiny batch, and the DWT loss alone with its share of an iteration."""
    import subprocess
    import sys

    cmd = [sys.executable, os.path.join(REPO, 'scripts', 'benchmark_train_step.py'), '--device', 'cpu', '--iters', '1',
           '--warmup', '1', '--lr-size', '8', '--batch', '1', '--loss-repeats', '2']
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True).stdout
    rows = {r[0]: r for r in table_rows(out)}
    assert set(rows) == {'SRModel', 'DTKDModel'} and rows['SRModel'][2] == '1.000'
    assert float(rows['DTKDModel'][1]) > 0
    line = re.search(r'DWT loss alone \(forward \+ backward, \(1, 3, 32, 32\), median of 2\): ([0-9.]+) ms, '
                     r'([0-9.]+)% of a DTKDModel iteration', out)
    assert line and float(line.group(1)) > 0
    assert float(line.group(2)) == pytest.approx(100 * float(line.group(1)) / float(rows['DTKDModel'][1]), abs=0.06)


def test_benchmark_engines_runs_every_variant(capsys, monkeypatch):
    """scripts/benchmark_engines.py on the tiny student at 8x8: every variant of this CPU in the accuracy check
    and the timing table; the bf16 variants follow the CPU flags."""
    script = load_script('benchmark_engines')
    monkeypatch.setattr(script, 'NETWORK_G', dict(TINY_STUDENT, type='SwinIRStudent'))
    assert script.main(['--sizes', '8', '--repeats', '1', '--warmup', '0', '--threads', '1', '--psnr-size', '8']) == 0
    out = capsys.readouterr().out
    names = [v[0] for v in script.variants()]
    assert 'machine: ' in out and 'ONNX export' in out
    rows = table_rows(out.split('### Forward pass')[1])
    assert [r[0] for r in rows] == ['BasicSR SwinIR fp32'] + names and all(float(r[1]) > 0 for r in rows)
    accuracy = table_rows(out.split('### Accuracy')[1].split('###')[0])
    assert [r[0] for r in accuracy] == names and all(r[4] == 'yes' for r in accuracy)
    for bf16 in (True, False):
        monkeypatch.setattr(script, 'cpu_supports_bf16', lambda b=bf16: b)
        monkeypatch.setattr(script, 'openvino_has_bf16', lambda b=bf16: b)
        expected = ['onnxruntime fp32', 'OpenVINO fp32'] + ['OpenVINO bf16'] * bf16
        assert [v[0] for v in script.variants()] == ['SwinIRStudent bf16 autocast'] * bf16 + expected
