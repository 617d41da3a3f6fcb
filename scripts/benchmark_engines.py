"""The SwinIR-small student on CPU engines: PyTorch against onnxruntime and OpenVINO, side by side.

Variants: BasicSR's SwinIR in fp32, eager (the reference); SwinIRStudent under bf16 autocast (on CPUs with
bf16 matrix instructions, ``cpu_supports_bf16``); the student's ONNX graph (``dtkd.onnx_export``, as
``dtkd-infer --engine`` runs it, ``dtkd.engines.GraphEngine``) in onnxruntime fp32, OpenVINO fp32 and
OpenVINO bf16 (on CPUs with AMX or AVX512-BF16, ``openvino_has_bf16``). All have the same weights and
``--threads`` threads.

First an accuracy check on photographs shipped with scikit-image (as ``benchmark_student.py``): fp32
variants must equal the reference within 1e-4 (images in [0, 1]), bf16 variants must reach 45 dB PSNR;
the script exits with status 1 if one does not. Then the start-up costs (ONNX export, engine load and
compile) and the forward pass on one LR image of each ``--sizes``, in interleaved rounds (every round
runs each variant once, in a rotated order), as medians and speed-ups against the reference (ratio of
medians and median of per-round ratios).

    python scripts/benchmark_engines.py [--sizes 64 128] [--repeats 15] [--warmup 2] [--threads 2]
        [--weights net_g.pth]

Without --weights the networks have BasicSR's seeded random initialisation (speed does not depend on
the values). Needs onnx, onnxruntime and openvino (``pip install 'dtkd[deploy]'``).
"""
import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))  # benchmark_common, also when loaded by path

import dtkd_compat  # noqa: E402, F401  (must precede basicsr)

# isort: split
import torch  # noqa: E402
from basicsr.archs.swinir_arch import SwinIR  # noqa: E402
from benchmark_common import accuracy_table, interleaved, machine_description, markdown_table, speedup_table  # noqa: E402
from benchmark_student import PHOTOS, REFERENCE, photos_lr  # noqa: E402

from dtkd.engines import GraphEngine, openvino_has_bf16, require  # noqa: E402
from dtkd.infer import PAPER_STUDENT  # noqa: E402
from dtkd.onnx_export import export_student  # noqa: E402
from dtkd_arch.swinir_student_arch import SwinIRStudent  # noqa: E402
from dtkd_compat import OptionError  # noqa: E402
from dtkd_utils.device import cpu_supports_bf16  # noqa: E402

FP32_ATOL, MIN_PSNR = 1e-4, 45.0
NETWORK_G = dict(PAPER_STUDENT)  # the network timed (network_g options)


def variants():
    """[(name, engine, precision)] timed against the reference on this CPU."""
    out = [('SwinIRStudent bf16 autocast', 'torch', 'bf16')] if cpu_supports_bf16() else []
    out += [('onnxruntime fp32', 'onnxruntime', 'fp32'), ('OpenVINO fp32', 'openvino', 'fp32')]
    if openvino_has_bf16():
        out.append(('OpenVINO bf16', 'openvino', 'bf16'))
    return out


def params(network_g):
    return {k: v for k, v in network_g.items() if k != 'type'}


def build(network_g, state_dict, threads):
    """{name: (callable on (1, 3, h, w) float32, precision)} and the start-up rows [(step, seconds)]."""
    ref = SwinIR(**params(network_g)).eval()
    ref.load_state_dict(state_dict)
    nets, startup = {REFERENCE: (ref, 'fp32')}, []
    with tempfile.TemporaryDirectory(prefix='dtkd-bench-') as folder:
        path = os.path.join(folder, 'student.onnx')
        start = time.perf_counter()
        export_student(network_g, state_dict, path)
        startup.append(('ONNX export (once, shared by the engines)', time.perf_counter() - start))
        for name, engine, precision in variants():
            start = time.perf_counter()
            if engine == 'torch':
                net = SwinIRStudent(**params(network_g), precision=precision).eval()
                net.load_state_dict(state_dict)
            else:
                net = GraphEngine(path, engine, precision, threads=threads)
            startup.append((f'{name}: load', time.perf_counter() - start))
            nets[name] = (net, precision)
    return nets, startup


def accuracy(nets, size):
    """Print the worst max abs difference and PSNR of each variant against the reference; True if all pass."""
    return accuracy_table(lambda name, lr: nets[name][0](lr), [(name, p) for name, (_, p) in nets.items()
                                                               if name != REFERENCE],
                          photos_lr(size), REFERENCE, FP32_ATOL, MIN_PSNR,
                          f'{len(PHOTOS)} skimage.data photographs, {size}x{size} LR')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--sizes', type=int, nargs='+', default=[64, 128], help='LR sizes (square)')
    parser.add_argument('--repeats', type=int, default=15, help='timed rounds per size')
    parser.add_argument('--warmup', type=int, default=2, help='untimed rounds per size')
    parser.add_argument('--threads', type=int, default=None, help='threads of every engine (default: their own)')
    parser.add_argument('--psnr-size', type=int, default=64, help='LR side of the photographs of the accuracy check')
    parser.add_argument('--weights', default=None, help='optional SwinIR-small checkpoint (BasicSR format)')
    args = parser.parse_args(argv)
    try:
        for engine in ('onnxruntime', 'openvino'):
            require(engine, option='engine')
        if min(args.sizes) < 8 or args.repeats < 1 or args.warmup < 0:
            raise OptionError('--sizes: LR sides >= 8 (the window); --repeats >= 1; --warmup >= 0')
    except OptionError as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ref = SwinIR(**params(NETWORK_G))
    if args.weights:
        from dtkd_arch.checkpoint import load_pretrained

        load_pretrained(ref, args.weights, strict=True, what='SwinIR-small student', option_key='--weights')
    nets, startup = build(NETWORK_G, ref.state_dict(), args.threads)
    cpu = torch.device('cpu')
    print(f'\n## SwinIR-small ({sum(p.numel() for p in ref.parameters()):,} parameters) on CPU engines\n')
    print(f'- machine: {machine_description(cpu)}')
    import onnxruntime
    import openvino

    print(f'- engines: onnxruntime {onnxruntime.__version__}, OpenVINO {openvino.__version__.split("-")[0]}, '
          f'{args.threads or "default"} threads each')
    print(f'- weights: {args.weights or "random (seeded BasicSR initialisation)"}')
    print(f'- load average at start (1 min): {os.getloadavg()[0]:.2f}')
    print('\n### Start-up (once per process; OpenVINO compiles the graph when it loads it)\n')
    print(markdown_table(['step', 'seconds'], [[step, f'{sec:.2f}'] for step, sec in startup]))
    ok = accuracy(nets, args.psnr_size)
    for size in args.sizes:
        x = torch.rand(1, 3, size, size)

        def runner(net, x):
            def run():
                with torch.inference_mode():
                    net(x)
            return run

        times = interleaved({name: runner(net, x) for name, (net, _) in nets.items()}, args.repeats, args.warmup, cpu)
        print(f'\n### Forward pass, 1x3x{size}x{size} LR -> x4 ({args.repeats} rounds after {args.warmup} warm-up)\n')
        print(speedup_table(times, REFERENCE))
    print(f'\nLoad average at the end (1 min): {os.getloadavg()[0]:.2f}')
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
