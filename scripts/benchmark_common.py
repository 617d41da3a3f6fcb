"""Shared pieces of the benchmark scripts: machine description, timers, peak memory, FLOP counts.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode``, which counts matrix multiplications and
convolutions only, at 2 FLOPs per multiply-accumulate (MAC): GMACs = GFLOPs / 2. Normalisations,
activations, soft-max and element-wise additions are not counted. Counting runs the networks on fake
tensors (``FakeTensorMode``: shapes without data), so it costs no arithmetic.
"""
import math
import os
import platform
import statistics
import threading
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from dtkd_compat import OptionError


def machine_description(device):
    """One line: CPU model, logical CPUs, bf16 matrix instructions, torch version and threads; GPU name on CUDA."""
    from dtkd_utils.device import cpu_flags

    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            cpu = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        pass
    flags = cpu_flags() or set()
    bf16 = ', AMX-BF16' if 'amx_bf16' in flags else ', AVX512-BF16' if 'avx512_bf16' in flags else ''
    desc = f'{cpu} ({os.cpu_count()} logical CPUs{bf16}), torch {torch.__version__}, {torch.get_num_threads()} threads'
    if device.type == 'cuda':
        desc = f'{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}); host: {desc}'
    return desc


def reduced_precisions(device):
    """Reduced precisions worth timing on ``device``: fp16 (and bf16 where supported) on CUDA; bf16 on CPUs
    with bf16 matrix instructions (``cpu_supports_bf16``; elsewhere torch's bf16 kernels are many times
    slower than fp32), else none."""
    from dtkd_utils.device import cpu_supports_bf16

    device = torch.device(device)
    if device.type == 'cuda':
        return ['fp16'] + (['bf16'] if torch.cuda.is_bf16_supported() else [])
    return ['bf16'] if cpu_supports_bf16() else []


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _rss_bytes():
    try:
        with open('/proc/self/statm') as f:
            return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
    except (OSError, ValueError):
        return 0


class PeakMemory:
    """Peak memory while the block runs: CUDA allocator peak on a GPU, else the peak resident set
    size of the process sampled every 2 ms, minus its value at entry (bytes, ``.peak``)."""

    def __init__(self, device):
        self.device = device
        self.peak = 0

    def __enter__(self):
        if self.device.type == 'cuda':
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = _rss_bytes()
            self._max = self._base
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self):
        while not self._stop.is_set():
            self._max = max(self._max, _rss_bytes())
            self._stop.wait(0.002)

    def __exit__(self, *exc):
        if self.device.type == 'cuda':
            sync(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._stop.set()
            self._thread.join()
            self._max = max(self._max, _rss_bytes())
            self.peak = self._max - self._base
        return False


def interleaved(fns, repeats, warmup, device):
    """fns: {name: callable}. Returns {name: [seconds per round]}: ``warmup`` untimed rounds, then
    ``repeats`` timed rounds, each running every callable once in an order rotated from round to round
    (so that machine noise hits all alike); ``device`` (torch.device or name) is synchronised around each call."""
    device = torch.device(device)
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    sync(device)
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            sync(device)
            t0 = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def speedup_table(times, baseline):
    """Markdown table of ``interleaved`` times: median and minimum ms, and the speed-up against ``baseline``
    as the ratio of medians and as the median of the per-round ratios (paired: robust to machine noise)."""
    base = times[baseline]
    rows = []
    for name, ts in times.items():
        paired = statistics.median(b / t for b, t in zip(base, ts))
        rows.append([name, f'{statistics.median(ts) * 1e3:.1f}', f'{min(ts) * 1e3:.1f}',
                     f'{statistics.median(base) / statistics.median(ts):.2f}x', f'{paired:.2f}x'])
    return markdown_table(['variant', 'median ms', 'min ms', 'speed-up (medians)', 'speed-up (paired)'], rows)


def median_time(fn, device, repeats, warmup):
    """Median wall time (s) of ``fn()`` over ``repeats`` runs after ``warmup`` runs, and all times."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def count_flops(module, *args, **kwargs):
    """FLOPs (2 per MAC, matmul/conv only) of ``module(*args, **kwargs)``, counted without arithmetic.

    ``module`` may be any callable (a network or a bound method such as ``autoencoder.encode``). It runs
    under ``FakeTensorMode``: parameters and inputs become fake tensors that carry shapes, dtypes and
    devices but no data, so nothing is computed; tensors in args/kwargs give shapes only.
    """
    return _fake_run(module, *args, **kwargs)[0]


def _fake_run(fn, *args, **kwargs):
    """(FLOPs, output shape) of ``fn(*args, **kwargs)`` under FakeTensorMode (see ``count_flops``)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        def fake(v):
            return mode.from_tensor(v) if torch.is_tensor(v) else v

        # scaled_dot_product_attention in its math form (matrix products the counter sees; the fused CPU
        # kernel has no FLOP formula and would count as zero)
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            out = fn(*[fake(a) for a in args], **{k: fake(v) for k, v in kwargs.items()})
        shape = tuple(out.shape) if torch.is_tensor(out) else None
    return counter.get_total_flops(), shape


def teacher_flops(teacher, h, w):
    """(encode, one UNet step, decode) FLOPs and the padded LR size for an h x w LR image, as
    ``ResShiftTeacher.sample`` pads it."""
    m, sf = teacher.pad_multiple, teacher.diffusion.sf
    hp, wp = h + (-h) % m, w + (-w) % m
    up = torch.empty(1, 3, sf * hp, sf * wp)
    ae = teacher.autoencoder
    if ae is not None:
        enc, latent_shape = _fake_run(ae.encode, up)
        dec = count_flops(ae.decode, torch.empty(latent_shape))
    else:
        enc = dec = 0
        latent_shape = tuple(up.shape)
    kwargs = {'lq': torch.empty(1, 3, hp, wp)} if teacher.cond_lq else {}
    step = count_flops(teacher.unet, torch.empty(latent_shape), torch.zeros(1, dtype=torch.long), **kwargs)
    return enc, step, dec, (hp, wp)


def matmul_rate(device, dtype=torch.float32, n=2048, repeats=5):
    """GFLOP/s of an n x n x n matrix product on ``device`` (the BLAS library on CPUs)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds, _ = median_time(lambda: torch.mm(a, b), device, repeats=repeats, warmup=2)
    return 2 * n**3 / seconds / 1e9


def conv_rate(device, dtype=torch.float32, channels=256, size=64, repeats=5):
    """GFLOP/s of a 3x3 convolution, ``channels`` to ``channels`` on a ``size`` x ``size`` image (oneDNN on CPUs)."""
    x = torch.randn(1, channels, size, size, device=device, dtype=dtype)
    w = torch.randn(channels, channels, 3, 3, device=device, dtype=dtype)
    with torch.no_grad():
        seconds, _ = median_time(lambda: torch.nn.functional.conv2d(x, w, padding=1), device, repeats=repeats,
                                 warmup=2)
    return 2 * channels * channels * 9 * size * size / seconds / 1e9


def parse_size(text):
    """'64' -> (64, 64); '48x80' -> (48, 80) (height x width, LR pixels)."""
    try:
        parts = [int(v) for v in str(text).lower().split('x')]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 1:
        raise OptionError(f"--lr-size: expected N or HxW with positive integers, got {text!r}")
    return tuple(parts)


def add_teacher_run_arguments(parser):
    """The options every teacher benchmark takes: teacher file, weights, LR size, device, precision, threads."""
    parser.add_argument('-opt', default='options/teacher/resshift_realsr_x4.yml', help='teacher option file')
    parser.add_argument('--random-weights', action='store_true', help='ignore the ckpt keys (random weights)')
    parser.add_argument('--lr-size', default='64', help='LR input size: N or HxW (default 64)')
    parser.add_argument('--device', default='auto', help="'auto', 'cpu', 'cuda', 'cuda:1'")
    parser.add_argument('--precision', nargs='+', default=None,
                        help='precisions (default: fp32, plus fp16 and bf16 on GPU and bf16 on CPUs with bf16 '
                             'instructions)')
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch default)')


def prepare_teacher_run(args):
    """Apply ``add_teacher_run_arguments``' options: set the threads, resolve device, precisions
    and LR size (checked before the slow part), then build the teacher.

    Returns ``(device, precisions, (h, w), teacher)``; bad options raise ``OptionError``.
    """
    from dtkd_teacher.cache import load_teacher_options
    from dtkd_teacher.teacher import build_teacher
    from dtkd_utils.device import check_precision, pick_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    precisions = args.precision or ['fp32'] + reduced_precisions(device)
    for p in precisions:
        check_precision(p, device, '--precision')
    size = parse_size(args.lr_size)
    opt = load_teacher_options(args.opt, device=str(device))
    teacher = build_teacher(opt, random_weights=args.random_weights)
    return device, precisions, size, teacher


def fmt_bytes(n):
    return f'{n / 2**20:.0f} MiB' if n >= 2**20 else f'{n / 2**10:.1f} KiB'


def markdown_table(header, rows):
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join('---' for _ in header) + '|']
    lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
    return '\n'.join(lines)


def psnr(a, b):
    """PSNR (dB) of images in [0, 1] (clamped), in float64."""
    mse = torch.mean((a.clamp(0, 1) - b.clamp(0, 1)).double()**2).item()
    return float('inf') if mse == 0 else 10 * math.log10(1.0 / mse)


def accuracy_table(forward, variants, inputs, reference, atol, min_psnr, caption):
    """Print each variant's worst max abs difference and PSNR against ``reference`` over ``inputs``;
    True if all pass (fp32 variants: max abs <= ``atol``; reduced precisions: PSNR >= ``min_psnr``).

    forward(name, x): the output of variant ``name`` (or of ``reference``) for input ``x``;
    variants: [(name, precision)]; caption: what the inputs are, for the heading."""
    worst = {name: [0.0, float('inf')] for name, _ in variants}
    with torch.inference_mode():
        for x in inputs:
            expected = forward(reference, x).float()
            for name, _ in variants:
                out = forward(name, x).float()
                worst[name][0] = max(worst[name][0], (out - expected).abs().max().item())
                worst[name][1] = min(worst[name][1], psnr(out, expected))
    rows, ok = [], True
    for name, precision in variants:
        diff, value = worst[name]
        passed = diff <= atol if precision == 'fp32' else value >= min_psnr
        ok &= passed
        need = f'max abs <= {atol:g}' if precision == 'fp32' else f'PSNR >= {min_psnr:g} dB'
        rows.append([name, f'{diff:.2e}', f'{value:.2f}', need, 'yes' if passed else 'NO'])
    print(f'\n### Accuracy against {reference} ({caption}; worst photograph)\n')
    print(markdown_table(['variant', 'max abs difference', 'PSNR dB', 'requirement', 'passed'], rows))
    return ok
