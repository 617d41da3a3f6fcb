"""``dtkd-infer --engine onnxruntime|openvino`` (dtkd.engines): the exported student against PyTorch.

A tiny random student (TINY_STUDENT, relative position biases drawn large so that a wrong mask or bias
in the graph shows) is exported once. fp32 engines must agree with the network run in float64 within
the same absolute bound as PyTorch fp32; OpenVINO bf16, run only on CPUs with AMX or AVX512-BF16 (from
/proc/cpuinfo), must reach 35 dB PSNR against fp32. Through the CLI, a 16-bit RGBA image of an odd size
goes through tiles and the network's alpha in every engine and is compared with the torch engine.
"""
import math
import sys

import cv2
import numpy as np
import pytest
import torch

from conftest import TINY_STUDENT, photo, write_yaml
from dtkd import engines, infer
from dtkd.engines import GraphEngine, engine_precision, openvino_has_bf16
from dtkd.onnx_export import export_student
from dtkd_arch.swinir_student_arch import SwinIRStudent
from dtkd_arch.tiling import forward_padded
from dtkd_compat import OptionError

ATOL = 1e-4  # |fp32 - float64| on outputs in about [0, 1], for PyTorch and the fp32 engines alike
MIN_BF16_PSNR = 35.0
# (engine, precision): fp32 everywhere, OpenVINO bf16 where the CPU computes it natively
RUNS = [('onnxruntime', 'fp32'), ('openvino', 'fp32')] + ([('openvino', 'bf16')] if openvino_has_bf16() else [])


pytestmark = pytest.mark.usefixtures('one_thread_module')


@pytest.fixture(scope='module')
def student(tmp_path_factory):
    root = tmp_path_factory.mktemp('engines')
    torch.manual_seed(0)
    net = SwinIRStudent(**{k: v for k, v in TINY_STUDENT.items() if k != 'type'}).eval()
    for name, p in net.named_parameters():
        if 'relative_position_bias_table' in name:
            p.data.normal_(0, 1)
    torch.save({'params': net.state_dict()}, root / 'tiny.pth')
    network_g = dict(TINY_STUDENT, type='SwinIRStudent')
    opt = write_yaml(root / 'tiny.yml', {'network_g': network_g})
    export_student(network_g, net.state_dict(), str(root / 'tiny.onnx'))
    return {'net': net, 'ckpt': str(root / 'tiny.pth'), 'opt': opt, 'onnx': str(root / 'tiny.onnx'), 'root': root}


@pytest.fixture(scope='module')
def graphs(student):
    """One loaded engine per run, shared by the tests (compiling is the slow part)."""
    return {run: GraphEngine(student['onnx'], *run, threads=1) for run in RUNS}


def cli(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        infer.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def psnr(a, b, peak=1.0):
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64))**2)
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


@pytest.mark.parametrize('run', RUNS, ids='-'.join)
def test_engine_matches_float64_on_odd_sizes(student, graphs, run):
    """Sizes that are no multiple of the window (8), one smaller than it, through dtkd-infer's runner."""
    engine, cpu = graphs[run], torch.device('cpu')
    assert (engine.scale, engine.multiple, engine.in_chans) == (4, 8, 3)
    net64 = SwinIRStudent(**{k: v for k, v in TINY_STUDENT.items() if k != 'type'}).double().eval()
    net64.load_state_dict(student['net'].state_dict())
    torch_runner = infer.StudentRunner(student['net'], 4, 8, cpu)
    engine_runner = infer.StudentRunner(engine, 4, 8, cpu)
    g = torch.Generator().manual_seed(1)
    for h, w in ((13, 21), (8, 8), (5, 30), (24, 17)):
        x = torch.rand(1, 3, h, w, generator=g)
        with torch.no_grad():
            ref = forward_padded(net64, x.double(), 8, 4)
        out = engine_runner(x)
        assert out.shape == (1, 3, 4 * h, 4 * w) and out.dtype == torch.float32
        assert (torch_runner(x).double() - ref).abs().max() < ATOL  # the bound holds for PyTorch itself
        if run[1] == 'fp32':
            assert (out.double() - ref).abs().max() < ATOL, (h, w)
        else:
            assert psnr(out.clamp(0, 1), ref.clamp(0, 1)) > MIN_BF16_PSNR, (h, w)
            # computed in bf16 indeed: further from float64 than fp32 arithmetic gets
            assert (out.double() - ref).abs().max() > 10 * ATOL
    # the comparison can fail: another network is far away
    other = SwinIRStudent(**{k: v for k, v in TINY_STUDENT.items() if k != 'type'}).eval()
    with torch.no_grad():
        assert (other(x) - engine_runner(x)).abs().max() > 1e-2


def rgba16(h=37, w=45):
    """A 16-bit BGRA image of an odd size: a photograph and a smooth alpha ramp."""
    rgb = photo('astronaut')[120:120 + h, 180:180 + w].astype(np.uint16) * 257
    rgb = rgb + np.random.default_rng(0).integers(0, 257, rgb.shape, dtype=np.uint16)  # use the low bits too
    alpha = np.linspace(0, 65535, h * w).reshape(h, w).astype(np.uint16)
    return np.dstack([rgb[..., ::-1], alpha])


@pytest.mark.parametrize('engine,precision', [('onnxruntime', None), ('openvino', 'fp32'), ('openvino', None)])
def test_cli_rgba_16bit_tiles_match_the_torch_engine(student, tmp_path, capsys, engine, precision):
    """The engine exports the checkpoint at start-up; the default precision follows the CPU."""
    img = rgba16()
    cv2.imwrite(str(tmp_path / 'a.png'), img)
    common = ['-i', tmp_path / 'a.png', '-opt', student['opt'], '--model', student['ckpt'], '--tile', 16,
              '--tile-pad', 8]
    code, _, err = cli(common + ['-o', tmp_path / 'torch'], capsys)
    assert code == 0, err
    extra = ['--precision', precision] if precision else []
    code, out, err = cli(common + ['-o', tmp_path / engine, '--engine', engine] + extra, capsys)
    assert code == 0, err
    expected = precision or ('bf16' if engine == 'openvino' and openvino_has_bf16() else 'fp32')
    assert f'{engine} {expected}: student exported to ONNX' in err and '1 done' in out
    ref = cv2.imread(str(tmp_path / 'torch' / 'a_x4.png'), cv2.IMREAD_UNCHANGED)
    res = cv2.imread(str(tmp_path / engine / 'a_x4.png'), cv2.IMREAD_UNCHANGED)
    assert res.dtype == np.uint16 and res.shape == ref.shape == (4 * 37, 4 * 45, 4)
    if expected == 'fp32':  # both within ATOL of float64, plus one rounding step
        assert np.abs(res.astype(np.int64) - ref).max() <= math.ceil(2 * ATOL * 65535) + 1
    else:
        assert psnr(res, ref, 65535) > MIN_BF16_PSNR
    assert np.abs(ref[..., 3].astype(np.int64) - np.repeat(np.repeat(img[..., 3], 4, 0), 4, 1)).mean() > 100


def test_cli_onnx_file_equals_the_export_at_start_up(student, tmp_path, capsys):
    cv2.imwrite(str(tmp_path / 'a.png'), rgba16(19, 26)[..., :3])
    code, _, err = cli(['-i', tmp_path / 'a.png', '-o', tmp_path / 'ckpt', '-opt', student['opt'], '--model',
                        student['ckpt'], '--engine', 'onnxruntime'], capsys)
    assert code == 0, err
    code, _, err = cli(['-i', tmp_path / 'a.png', '-o', tmp_path / 'file', '--onnx', student['onnx'], '--engine',
                        'onnxruntime'], capsys)
    assert code == 0, err
    a = cv2.imread(str(tmp_path / 'ckpt' / 'a_x4.png'), cv2.IMREAD_UNCHANGED)
    assert a.shape == (76, 104, 3) and np.array_equal(a, cv2.imread(str(tmp_path / 'file' / 'a_x4.png'),
                                                                    cv2.IMREAD_UNCHANGED))


@pytest.mark.parametrize('flags,expected', [
    (frozenset({'avx512f', 'amx_tile', 'amx_bf16'}), 'bf16'),
    (frozenset({'avx512f', 'avx512_bf16'}), 'bf16'),
    (frozenset({'avx2', 'avx512f'}), 'fp32'),
    (None, 'fp32'),  # flags unknown
])
def test_precision_follows_the_cpu_flags(monkeypatch, flags, expected):
    monkeypatch.setattr(engines, 'cpu_flags', lambda: flags)
    assert engine_precision('openvino') == expected
    assert engine_precision('openvino', 'fp32') == 'fp32'  # a flag overrides
    assert engine_precision('onnxruntime') == engine_precision('torch') == 'fp32'
    if expected == 'bf16':
        assert engine_precision('openvino', 'bf16') == 'bf16'
    else:
        with pytest.raises(OptionError, match='--precision bf16: OpenVINO computes bf16 on CPUs with AMX'):
            engine_precision('openvino', 'bf16')


@pytest.mark.parametrize('extra,match', [
    (['--engine', 'onnxruntime', '--precision', 'bf16'], '--precision bf16: the onnxruntime engine runs fp32'),
    (['--engine', 'openvino', '--precision', 'fp16'], '--precision fp16: the openvino engine runs fp32 or bf16'),
    (['--engine', 'openvino', '--device', 'cuda'], '--engine openvino: runs on the CPU'),
    (['--engine', 'openvino', '--teacher', 't.yml'], 'the teacher runs with --engine torch'),
    (['--onnx', '{onnx}'], '--onnx: runs with --engine onnxruntime or --engine openvino'),
    (['--engine', 'openvino', '--onnx', '{onnx}', '--model', '{ckpt}'], 'do not combine it with --model/-opt'),
    (['--engine', 'openvino', '--onnx', 'missing.onnx'], "--onnx: file 'missing.onnx' does not exist"),
    (['--engine', 'onnxruntime', '--onnx', '{ckpt}'], 'not a readable ONNX file'),
])
def test_option_errors_name_the_flag(student, tmp_path, capsys, extra, match):
    extra = [a.format(**student) for a in extra]
    code, _, err = cli(['-i', tmp_path, '-o', tmp_path / 'o'] + extra, capsys)
    assert code == 2 and err.startswith('error: ') and match in err and 'Traceback' not in err


@pytest.mark.parametrize('engine', ['onnxruntime', 'openvino'])
def test_missing_package_is_named_before_any_work(student, tmp_path, capsys, monkeypatch, engine):
    monkeypatch.setitem(sys.modules, engine, None)  # import fails as when the package is not installed
    code, out, err = cli(['-i', tmp_path / 'no_such_input', '-o', tmp_path / 'o', '--model', 'missing.pth',
                          '--engine', engine], capsys)
    assert code == 2 and out == ''
    assert err == (f"error: --engine {engine}: the Python package {engine} is not installed: pip install {engine} "
                   "(or pip install 'dtkd[deploy]' for every engine)\n")
    assert not (tmp_path / 'o').exists()


def test_engine_out_of_memory_falls_back_to_smaller_tiles(student, graphs):
    """An allocation failure inside the engine (onnxruntime's message) takes dtkd-infer's fall-back:
    the image is retried with tiles half as large; other errors pass through."""
    engine = GraphEngine(student['onnx'], 'onnxruntime', threads=1)
    real = engine._run

    def run(x):
        if max(x.shape[-2:]) > 32:
            raise RuntimeError(f'[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Failed to allocate memory for {x.shape}')
        return real(x)

    engine._run = run
    lines = []
    x = torch.rand(1, 3, 40, 40, generator=torch.Generator().manual_seed(2))
    out = infer.StudentRunner(engine, 4, 8, torch.device('cpu'), tile=0, tile_pad=4, log=lines.append)(x)
    assert lines == ['out of memory with the whole image; continuing with --tile 16']
    engine._run = real
    ref = infer.StudentRunner(engine, 4, 8, torch.device('cpu'), tile=16, tile_pad=4)(x)
    assert torch.equal(out, ref)
    engine._run = lambda x: 1 / 0
    with pytest.raises(ZeroDivisionError):
        engine(x)
    with pytest.raises(OptionError, match='--precision bf16: the onnxruntime engine'):
        GraphEngine(student['onnx'], 'onnxruntime', 'bf16')
