"""Speed of the SwinIR-small student: BasicSR's SwinIR against FastSwinIR (fp32 and reduced precision).

Measured side by side in one run: every round runs each variant once, in a rotating order, so
that machine noise hits all variants alike; the tables give medians and the median of per-round
speed-ups. Also checks that FastSwinIR fp32 equals BasicSR's SwinIR on the same weights, and the
PSNR of the reduced-precision output against fp32 on photographs shipped with scikit-image.
On the CPU, FastSwinIR fp32 also runs without its compiled C++ kernels (``dtkd_arch.cpu_kernels``:
window attention and LayerNorm, then in PyTorch operations), and with its fully connected layers
fixed to BLAS and to oneDNN next to the default per-shape choice (``dtkd_arch.cpu_ops``), whose
picks are printed at the end; bf16 is timed only on CPUs with bf16 instructions (elsewhere it is
many times slower than fp32).

    python scripts/benchmark_student.py [--sizes 64 128] [--repeats 9] [--train-iters 7] [--threads 2]
        [--device auto|cpu|cuda] [--weights net_g.pth] [--compile] [--no-train] [--no-inference]
        [--default-malloc]

Without --weights the networks have BasicSR's random initialisation (speed does not depend on
the values; the PSNR check is then a check of arithmetic, not of a trained model).

On Linux with glibc, the script first tells malloc to keep freed memory (``steady_malloc``) for all
variants alike: by default glibc returns the hundreds of MiB that a training iteration frees to the
system and maps them again in the next one (hundreds of thousands of page faults per iteration
here), which makes CPU training times depend on the heap's history more than on the network.
``--default-malloc`` measures with glibc's defaults instead. The same effect for any program:
``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=2147483647``, or jemalloc/tcmalloc.
"""
import argparse
import contextlib
import math
import os
import platform
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dtkd_compat  # noqa: E402, F401  (must precede basicsr)

# isort: split
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from basicsr.archs.swinir_arch import SwinIR  # noqa: E402
from benchmark_common import interleaved  # noqa: E402

from dtkd_arch import cpu_kernels  # noqa: E402
from dtkd_arch.cpu_ops import linear_choices, using_linear_backend  # noqa: E402
from dtkd_arch.fast_swinir_arch import FastSwinIR, cpu_supports_bf16  # noqa: E402

STUDENT = dict(upscale=4, img_size=64, window_size=8, img_range=1., depths=[6, 6, 6, 6], embed_dim=60,
               num_heads=[6, 6, 6, 6], mlp_ratio=2, upsampler='pixelshuffledirect', resi_connection='1conv')
PAPER_LATENCY_MS = 19.09  # SwinIR-small inference time reported in the DTKD paper (its GPU)
# CPU variants of FastSwinIR fp32: name -> (fully connected layers, compiled attention kernel). 'auto' is the
# per-shape choice of dtkd_arch.cpu_ops; 'blas' (F.linear) and 'onednn' (1x1 convolution) fix one library.
CPU_VARIANTS = {'FastSwinIR fp32, no C++ kernels': ('auto', False),
                'FastSwinIR fp32, BLAS linear': ('blas', True),
                'FastSwinIR fp32, oneDNN linear': ('onednn', True)}


@contextlib.contextmanager
def cpu_variant(linear='auto', kernels=True):
    with using_linear_backend(linear), cpu_kernels.using_kernels(kernels):
        yield
PHOTOS = ('astronaut', 'coffee', 'chelsea', 'rocket', 'camera', 'brick')


def machine(device):
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    cpu = line.split(':', 1)[1].strip()
                    break
    except OSError:
        pass
    lines = [f'- CPU: {cpu}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}, '
             f'bf16 matrix instructions (AMX/AVX512-BF16): {cpu_supports_bf16()}',
             f'- torch {torch.__version__}, Python {platform.python_version()}']
    if device == 'cuda':
        lines.append(f'- GPU: {torch.cuda.get_device_name(0)}')
    return '\n'.join(lines)


def steady_malloc():
    """glibc: serve blocks up to 32 MiB from the heap and never trim it, so that a loop that frees and
    allocates the same sizes reuses memory instead of faulting in fresh pages. Returns a description."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library('c')
    if not name or platform.system() != 'Linux':
        return 'default allocator (not glibc)'
    try:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 32 << 20) == 1 and libc.mallopt(m_trim_threshold, 2**31 - 1) == 1
    except (OSError, AttributeError):
        ok = False
    return 'glibc malloc, mmap threshold 32 MiB, no trimming' if ok else 'default allocator (mallopt failed)'


def table(title, times, baseline, extra=None):
    """Markdown table: median ms and speed-up against ``baseline`` (ratio of medians, median of ratios)."""
    base = times[baseline]
    rows = [f'\n### {title}\n', '| variant | median ms | min ms | speed-up (medians) | speed-up (paired) |'
            + (' paper |' if extra else ''), '|---|---:|---:|---:|---:|' + ('---:|' if extra else '')]
    for name, ts in times.items():
        med = statistics.median(ts)
        ratio = statistics.median(base) / med
        paired = statistics.median(b / t for b, t in zip(base, ts))
        row = f'| {name} | {med * 1e3:.1f} | {min(ts) * 1e3:.1f} | {ratio:.2f}x | {paired:.2f}x |'
        if extra:
            row += f' {extra.get(name, "")} |'
        rows.append(row)
    print('\n'.join(rows), flush=True)


def build(args, device):
    torch.manual_seed(0)
    ref = SwinIR(**STUDENT)
    if args.weights:
        from dtkd_arch.checkpoint import load_pretrained

        load_pretrained(ref, args.weights, strict=True, what='SwinIR-small student')
    ref = ref.to(device).eval()
    fast = {}
    for precision in args.precisions:
        model = FastSwinIR(**STUDENT, precision=precision, use_compile=args.compile)
        model.load_state_dict(ref.state_dict(), strict=True)
        fast[precision] = model.to(device).eval()
    return ref, fast


def photos_lr(size):
    from skimage import data

    out = []
    for name in PHOTOS:
        img = getattr(data, name)()
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        img = torch.from_numpy(np.ascontiguousarray(img[..., :3])).permute(2, 0, 1)[None].float() / 255.
        side = min(img.shape[-2:])
        top, left = (img.shape[-2] - side) // 2, (img.shape[-1] - side) // 2
        img = img[..., top:top + side, left:left + side]
        lr = F.interpolate(img, size=(size, size), mode='bicubic', antialias=True, align_corners=False)
        out.append((name, lr.clamp(0, 1)))
    return out


def psnr(a, b):
    mse = torch.mean((a.clamp(0, 1) - b.clamp(0, 1)).double()**2).item()
    return float('inf') if mse == 0 else 10 * math.log10(1.0 / mse)


def accuracy(ref, fast, device, size):
    print(f'\n### Accuracy on photographs (skimage.data, centre crop, bicubic down to {size}x{size} LR)\n')
    precisions = [p for p in fast if p != 'fp32']
    print('| photo | FastSwinIR fp32 vs BasicSR: max abs |' + ''.join(f' {p} vs fp32 PSNR dB |' for p in precisions))
    print('|---|---:|' + '---:|' * len(precisions))
    worst = {p: float('inf') for p in precisions}
    with torch.no_grad():
        for name, lr in photos_lr(size):
            lr = lr.to(device)
            expected = ref(lr)
            diff = (fast['fp32'](lr) - expected).abs().max().item() if 'fp32' in fast else float('nan')
            cells = []
            for p in precisions:
                value = psnr(fast[p](lr).float(), expected)
                worst[p] = min(worst[p], value)
                cells.append(f'{value:.2f}')
            print(f'| {name} | {diff:.2e} |' + ''.join(f' {cell} |' for cell in cells))
    for p in precisions:
        print(f'\nlowest {p} PSNR against fp32: {worst[p]:.2f} dB (requirement: >= 45 dB)')


def inference(ref, fast, device, args):
    for size in args.sizes:
        x = torch.rand(1, 3, size, size, device=device)

        def runner(model, x=x, variant=('auto', True)):
            def run():
                with cpu_variant(*variant), torch.inference_mode():
                    model(x)
            return run

        fns = {'BasicSR SwinIR fp32': runner(ref)}
        fns.update({f'FastSwinIR {p}': runner(m) for p, m in fast.items()})
        if device == 'cpu' and 'fp32' in fast:
            fns.update({name: runner(fast['fp32'], variant=v) for name, v in CPU_VARIANTS.items()})
        times = interleaved(fns, args.repeats, args.warmup, device)
        extra = None
        if device == 'cuda' and size == 64:
            extra = {name: f'{PAPER_LATENCY_MS} ms' for name in times}
        table(f'Inference, {device}, 1x3x{size}x{size} LR -> x4', times, 'BasicSR SwinIR fp32', extra)


def training(device, args):
    torch.manual_seed(0)
    ref = SwinIR(**STUDENT).to(device).train()
    models = {'BasicSR SwinIR fp32': ref}
    for precision in args.train_precisions:
        model = FastSwinIR(**STUDENT, precision=precision, use_compile=args.compile)
        model.load_state_dict(ref.state_dict())
        models[f'FastSwinIR {precision}'] = model.to(device).train()
    if device == 'cpu':
        for name in CPU_VARIANTS:
            model = FastSwinIR(**STUDENT, use_compile=args.compile)
            model.load_state_dict(ref.state_dict())
            models[name] = model.to(device).train()
    x = torch.rand(args.batch, 3, 64, 64, device=device)
    gt = torch.rand(args.batch, 3, 256, 256, device=device)
    fns = {}
    for name, model in models.items():
        opt = torch.optim.Adam(model.parameters(), lr=2e-4, betas=(0.9, 0.99))

        variant = CPU_VARIANTS.get(name, ('auto', True))

        def step(model=model, opt=opt, variant=variant):
            with cpu_variant(*variant):
                opt.zero_grad(set_to_none=True)
                loss = F.l1_loss(model(x), gt)
                loss.backward()
                opt.step()
        fns[name] = step
    times = interleaved(fns, args.train_iters, args.train_warmup, device)
    table(f'Training iteration, {device}: forward + L1 + backward + Adam, batch {args.batch}, 64x64 LR',
          times, 'BasicSR SwinIR fp32')


def print_linear_choices():
    """What the 'auto' linear backend picked, per pass: how many layer shapes went to each library."""
    counts = {}
    for (pass_, *_), choice in linear_choices().items():
        counts.setdefault(pass_, {}).setdefault(choice, 0)
        counts[pass_][choice] += 1
    if counts:
        parts = [f'{p}: ' + ', '.join(f'{c} {n}' for c, n in sorted(v.items())) for p, v in counts.items()]
        print(f'\nFully connected layers, per-shape choice of the default (auto) backend: {"; ".join(parts)} '
              '(layer shapes x row counts)')


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--sizes', type=int, nargs='+', default=[64, 128], help='LR sizes for inference')
    parser.add_argument('--repeats', type=int, default=9, help='timed rounds per inference size')
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--train-iters', type=int, default=7, help='timed training rounds')
    parser.add_argument('--train-warmup', type=int, default=3, help='untimed training rounds')
    parser.add_argument('--batch', type=int, default=4, help='training batch size')
    parser.add_argument('--default-malloc', action='store_true',
                        help="keep glibc's default malloc settings (see the module docstring)")
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch default)')
    parser.add_argument('--device', default='auto', choices=['auto', 'cpu', 'cuda'])
    parser.add_argument('--weights', default=None, help='optional SwinIR-small checkpoint (BasicSR format)')
    parser.add_argument('--compile', action='store_true', help='also wrap FastSwinIR in torch.compile')
    parser.add_argument('--no-train', action='store_true', help='skip the training-iteration benchmark')
    parser.add_argument('--no-inference', action='store_true', help='skip the accuracy and inference benchmarks')
    parser.add_argument('--psnr-size', type=int, default=64, help='LR size of the photographs for the PSNR check')
    args = parser.parse_args()
    allocator = 'glibc defaults' if args.default_malloc else steady_malloc()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])
    if args.device != 'auto':
        if args.device == 'cuda' and not torch.cuda.is_available():
            parser.error('--device cuda: no CUDA device is available')
        devices = [args.device]
    for device in devices:
        if device == 'cpu':
            args.precisions = ['fp32'] + (['bf16'] if cpu_supports_bf16() else [])
        else:
            args.precisions = ['fp32', 'fp16'] + (['bf16'] if torch.cuda.is_bf16_supported() else [])
        args.train_precisions = ['fp32'] + (['bf16'] if 'bf16' in args.precisions else [])
        print(f'\n## SwinIR-small (929,628 parameters) on {device}\n')
        print(machine(device))
        print(f'- memory allocator: {allocator}')
        if device == 'cpu':
            if cpu_kernels.available():
                print(f'- attention: compiled kernel ({cpu_kernels.build_name()}, dtkd_arch/csrc)')
            else:
                print(f'- attention: PyTorch operations (the compiled kernel is unavailable: '
                      f'{cpu_kernels.build_error() or "switched off"})')
        if not args.no_inference:
            ref, fast = build(args, device)
            accuracy(ref, fast, device, args.psnr_size)
            inference(ref, fast, device, args)
        if not args.no_train:
            training(device, args)
        if device == 'cpu':
            print_linear_choices()


if __name__ == '__main__':
    main()
