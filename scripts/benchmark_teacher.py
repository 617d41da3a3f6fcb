"""Time the ResShift teacher: per image and per sampling step, with peak memory, for 15 and 1 steps.

    python scripts/benchmark_teacher.py                          # official config and weights
    python scripts/benchmark_teacher.py --random-weights --lr-size 64 --device cpu
    python scripts/benchmark_teacher.py --random-weights --official-root /path/to/ResShift --precision fp32

Prints a Markdown table: for each precision (fp32 and the reduced ones: bf16 on CPU, fp16 and bf16
on GPU) and each step count, the median time per image (full ``ResShiftTeacher.sample``: up-sampling,
encoding, sampling loop, decoding), the mean time of one UNet call, of encoding and of decoding,
and the peak memory (GPU allocator, or the process's resident set size on the CPU). Before the timed
runs of a precision one 1-step image warms up the kernels. ``--random-weights`` runs the official
architecture with random weights (the timings do not depend on the weights).

``--official-root DIR`` (a checkout of github.com/zsyOAOA/ResShift; never part of this project)
also builds the official ``UNetModelSwin``, ``VQModelTorch`` and ``create_gaussian_diffusion`` from
that directory, gives them this teacher's weights (with ``--random-weights``: the seeded
initialisation, plus small random values in the layers both initialise to zero, so that every layer
counts) and times the official sampling (``sampler.py: ResShiftSampler.sample_func`` on an LR
patch: ``p_sample_loop`` with encoding and decoding, then clamping) against ``ResShiftTeacher.sample``
side by side, alternating, with the same global seed: it prints the median times, the speed-up and
the largest absolute difference of the two outputs (images in [0, 1]), and where the time of this
teacher goes (rate of the UNet, encoder and decoder against a plain 3x3 convolution measured here).
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))  # benchmark_common, also when loaded by path

import dtkd_compat  # noqa: E402,F401  (must precede basicsr)

# isort: split
import torch  # noqa: E402
from benchmark_common import (  # noqa: E402
    PeakMemory,
    add_teacher_run_arguments,
    conv_rate,
    fmt_bytes,
    machine_description,
    markdown_table,
    matmul_rate,
    prepare_teacher_run,
    sync,
    teacher_flops,
)

from dtkd_compat import OptionError  # noqa: E402


def load_official(root):
    """The official classes from a ResShift checkout: (UNetModelSwin, VQModelTorch, create_gaussian_diffusion)."""
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isfile(os.path.join(root, 'models', 'unet.py')):
        raise OptionError(f'--official-root: {root} does not look like a ResShift checkout (no models/unet.py)')
    if root not in sys.path:
        sys.path.insert(0, root)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        from ldm.models.autoencoder import VQModelTorch
        from models.script_util import create_gaussian_diffusion
        from models.unet import UNetModelSwin
    return UNetModelSwin, VQModelTorch, create_gaussian_diffusion


def perturb_zero_layers(module, seed=0):
    """Small random values in parameters that are initialised to zero (so they matter in a comparison)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() > 0 and not p.any():
                p.copy_(0.02 * torch.randn(p.shape, generator=g))


def build_official(root, opt, teacher):
    """Official UNet, autoencoder and diffusion with ``teacher``'s weights (state-dict keys are the same)."""
    unet_cls, vq_cls, make_diffusion = load_official(root)
    params = {k: v for k, v in opt['unet'].items() if k not in ('type', 'ckpt')}
    unet = unet_cls(**params)
    unet.load_state_dict(teacher.unet.state_dict(), strict=True)
    autoencoder = None
    if teacher.autoencoder is not None:
        ae = {k: v for k, v in opt['autoencoder'].items() if k not in ('type', 'ckpt')}
        autoencoder = vq_cls(**ae)
        autoencoder.load_state_dict(teacher.autoencoder.state_dict(), strict=True)
        autoencoder = autoencoder.to(teacher.device).eval()
    diffusion_opt = dict(opt['diffusion'])
    diffusion_opt['timestep_respacing'] = teacher.steps if teacher.steps != diffusion_opt['steps'] else None
    diffusion = make_diffusion(**diffusion_opt)
    return unet.to(teacher.device).eval(), autoencoder, diffusion


def official_sample(unet, autoencoder, diffusion, lq, pad_multiple):
    """The official ``ResShiftSampler.sample_func`` on one LR patch (no chopping): [0, 1] in and out."""
    import math

    y0 = (lq - 0.5) / 0.5
    h, w = y0.shape[-2:]
    ph, pw = math.ceil(h / pad_multiple) * pad_multiple - h, math.ceil(w / pad_multiple) * pad_multiple - w
    if ph or pw:
        y0 = torch.nn.functional.pad(y0, (0, pw, 0, ph), mode='reflect')
    with torch.no_grad():
        out = diffusion.p_sample_loop(y=y0, model=unet, first_stage_model=autoencoder, noise=None,
                                      noise_repeat=False, clip_denoised=autoencoder is None, denoised_fn=None,
                                      model_kwargs={'lq': y0}, progress=False)
    sf = diffusion.sf
    return out[..., :h * sf, :w * sf].clamp_(-1.0, 1.0) * 0.5 + 0.5


def psnr(a, b):
    import math

    mse = torch.mean((a.double() - b.double()) ** 2).item()
    return float('inf') if mse == 0 else 10 * math.log10(1.0 / mse)


def compare_official(args, opt, teacher, device, size):
    """Side-by-side timing of the official sampler and ResShiftTeacher (fp32), and their largest difference."""

    if args.random_weights:
        perturb_zero_layers(teacher)
    teacher.set_steps(args.steps[0])
    teacher.precision = 'fp32'
    unet, autoencoder, diffusion = build_official(args.official_root, opt, teacher)
    lq = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(0)).to(device)
    if max(size) > teacher.chop_size:
        raise OptionError(f'--lr-size: the official comparison samples one patch; use at most {teacher.chop_size}')

    def ours(seed):
        torch.manual_seed(seed)
        return teacher.sample(lq)

    def official(seed):
        torch.manual_seed(seed)
        return official_sample(unet, autoencoder, diffusion, lq, teacher.pad_multiple)

    runs = {'official': official, 'DTKD': ours}
    flops = teacher_flops(teacher, *size)[:3]  # before the timer wraps encode and decode
    timer = ComponentTimer(teacher)
    times = {name: [] for name in runs}
    outputs = {}
    for r in range(args.repeats + 1):  # round 0 warms up (and is not timed)
        order = list(runs) if r % 2 == 0 else list(runs)[::-1]
        for name in order:
            sync(device)
            start = time.perf_counter()
            if r == 1 and name == 'DTKD':
                timer.reset()
            outputs[name] = runs[name](r)
            sync(device)
            if r:
                times[name].append(time.perf_counter() - start)
            print(f'  round {r} {name}: {time.perf_counter() - start:.2f} s', file=sys.stderr)
    diff = (outputs['official'] - outputs['DTKD']).abs().max().item()
    med = {name: statistics.median(v) for name, v in times.items()}
    paired = statistics.median(a / b for a, b in zip(times['official'], times['DTKD']))
    rows = [[name, f'{med[name]:.2f}', f'{med["official"] / med[name]:.2f}x'] for name in runs]
    extra = ''
    if args.compare_bf16:
        teacher.precision = 'bf16'
        bf = []
        for _ in range(args.repeats):
            sync(device)
            start = time.perf_counter()
            out16 = ours(1)
            sync(device)
            bf.append(time.perf_counter() - start)
        teacher.precision = 'fp32'
        ref = ours(1)
        rows.append(['DTKD bf16 autocast', f'{statistics.median(bf):.2f}',
                     f'{med["official"] / statistics.median(bf):.2f}x'])
        extra = f'; DTKD bf16 against DTKD fp32 (same seed): PSNR {psnr(out16.float(), ref):.2f} dB'
    print(f'\n## ResShift teacher against the official implementation ({args.official_root})\n')
    print(f'Machine: {machine_description(device)}  ')
    weights = 'checkpoint weights'
    if args.random_weights:
        weights = 'random weights (seeded, zero-initialised layers perturbed)'
    print(f'LR {size[0]}x{size[1]}, {teacher.steps} steps, batch 1, fp32, {weights}; '
          f'{args.repeats} timed image(s) each, alternating, after one untimed round.\n')
    print(markdown_table(['Implementation', 'Per image (s), median', 'Speed-up vs official'], rows))
    print(f'\nPaired speed-up (median of per-round ratios): {paired:.2f}x; largest |official - DTKD| '
          f'(fp32, same seed, images in [0, 1]): {diff:.2e}{extra}')
    print_compute_bound(flops, timer, device)
    return 0


def print_compute_bound(flops, timer, device):
    """Rate (GFLOP/s) of each part of the DTKD fp32 sampler against a dense fp32 matrix product.

    flops: (encode, one UNet call, decode) FLOPs; timer: a ComponentTimer that timed the DTKD runs."""
    enc, step, dec = flops
    peak = conv_rate(device)
    blas = matmul_rate(device)
    rows = []
    for name, key, count in (('UNet call', 'unet', step), ('encode', 'encode', enc), ('decode', 'decode', dec)):
        calls = timer.times[key]
        if not calls or not count:
            continue
        seconds = sum(calls) / len(calls)
        rate = count / seconds / 1e9
        rows.append([name, f'{count / 1e9:.1f}', f'{seconds * 1e3:.1f}', f'{rate:.0f}', f'{rate / peak:.0%}'])
    print(f'\nWhere the DTKD fp32 time goes (mean over the timed rounds; FLOPs: matmul + convolution, 2 per '
          f'multiply-add). fp32 references measured here: a 3x3 convolution 256 -> 256 channels on 64 x 64 runs at '
          f'{peak:.0f} GFLOP/s, a 2048 x 2048 x 2048 matrix product at {blas:.0f} GFLOP/s.\n')
    print(markdown_table(['Part', 'GFLOP', 'ms', 'GFLOP/s', 'of the 3x3 convolution rate'], rows))


class ComponentTimer:
    """Accumulates wall time of UNet calls, ``encode`` and ``decode`` of a teacher (synchronised)."""

    def __init__(self, teacher):
        self.device = teacher.device
        self.times = {'unet': [], 'encode': [], 'decode': []}
        self._start = None
        teacher.unet.register_forward_pre_hook(lambda *_: self._begin())
        teacher.unet.register_forward_hook(lambda *_: self._end('unet'))
        ae = teacher.autoencoder
        if ae is not None:
            for name in ('encode', 'decode'):
                setattr(ae, name, self._wrap(getattr(ae, name), name))

    def _begin(self):
        sync(self.device)
        self._start = time.perf_counter()

    def _end(self, name):
        sync(self.device)
        self.times[name].append(time.perf_counter() - self._start)

    def _wrap(self, fn, name):
        def timed(*args, **kwargs):
            self._begin()
            out = fn(*args, **kwargs)
            self._end(name)
            return out
        return timed

    def reset(self):
        for v in self.times.values():
            v.clear()

    def mean_ms(self, name):
        v = self.times[name]
        return f'{1000 * sum(v) / len(v):.1f}' if v else '-'


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_teacher_run_arguments(parser)
    parser.add_argument('--steps', type=int, nargs='+', default=[15, 1], help='sampling steps to time')
    parser.add_argument('--repeats', type=int, default=1, help='timed images per setting (median reported)')
    parser.add_argument('--official-root', default=None,
                        help='ResShift checkout: time the official sampler against this one (first --steps value)')
    parser.add_argument('--cache-batches', type=int, nargs='+', default=None, metavar='N',
                        help='also time the teacher-output cache: images per second when N same-size images are '
                             'sampled in one call, each with its own generator (as generate_teacher_outputs.py '
                             '--batch-size N does), first --steps value and precision')
    parser.add_argument('--compare-bf16', action='store_true',
                        help='with --official-root: also time this teacher under bf16 autocast, with its PSNR')
    args = parser.parse_args(argv)
    try:
        if args.repeats < 1 or min(args.steps) < 1 or min(args.cache_batches or [1]) < 1:
            raise OptionError('--repeats, --steps and --cache-batches must be positive')
        device, precisions, (h, w), teacher = prepare_teacher_run(args)
        if args.official_root:
            from dtkd_teacher.cache import load_teacher_options

            load_official(args.official_root)  # fails early on a wrong directory
            return compare_official(args, load_teacher_options(args.opt), teacher, device, (h, w))
    except (OptionError, FileNotFoundError, ValueError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    timer = ComponentTimer(teacher)
    lq = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    rows = []
    for precision in precisions:
        teacher.precision = precision
        teacher.set_steps(1)
        teacher.sample(lq, generator=torch.Generator().manual_seed(0))  # warm-up
        for steps in args.steps:
            teacher.set_steps(steps)
            timer.reset()
            per_image = []
            with PeakMemory(device) as mem:
                for i in range(args.repeats):
                    sync(device)
                    start = time.perf_counter()
                    teacher.sample(lq, generator=torch.Generator().manual_seed(i))
                    sync(device)
                    per_image.append(time.perf_counter() - start)
            per_image.sort()
            rows.append([teacher.steps, precision, f'{per_image[len(per_image) // 2]:.3f}', timer.mean_ms('unet'),
                         timer.mean_ms('encode'), timer.mean_ms('decode'), fmt_bytes(mem.peak)])
            print(f'  {steps} steps {precision}: {per_image[len(per_image) // 2]:.3f} s/image', file=sys.stderr)
    weights = 'random weights' if args.random_weights else 'checkpoint weights'
    print(f'## ResShift teacher timing ({os.path.basename(args.opt)}, {weights})\n')
    print(f'Machine: {machine_description(device)}  ')
    print(f'LR input {h}x{w} (padded to a multiple of {teacher.pad_multiple}), x{teacher.diffusion.sf} output, '
          f'batch 1, {args.repeats} timed image(s) per row (median), after a 1-step warm-up per precision.\n')
    print(markdown_table(['Steps', 'Precision', 'Per image (s)', 'Per UNet step (ms)', 'Encode (ms)', 'Decode (ms)',
                          'Peak memory' + (' (GPU)' if device.type == 'cuda' else ' (RSS increase)')], rows))
    if args.cache_batches:
        print_cache_batches(teacher, device, precisions[0], args.steps[0], (h, w), args.cache_batches, args.repeats)
    return 0


def _generators(n, call):
    return [torch.Generator().manual_seed(1000 * call + i) for i in range(n)]


def print_cache_batches(teacher, device, precision, steps, size, batches, repeats):
    """Images per second of batched sampling, one generator per image, against batch 1."""
    teacher.precision = precision
    teacher.set_steps(steps)
    rate = {}
    for n in batches:
        lq = torch.rand(n, 3, *size, generator=torch.Generator().manual_seed(n))
        teacher.sample(lq, generator=_generators(n, 0))  # warm-up (allocations, kernel selection)
        seconds = []
        for r in range(repeats):
            sync(device)
            start = time.perf_counter()
            teacher.sample(lq, generator=_generators(n, r + 1))
            sync(device)
            seconds.append(time.perf_counter() - start)
        rate[n] = n / statistics.median(seconds)
        print(f'  cache batch {n}: {rate[n]:.2f} images/s', file=sys.stderr)
    base = rate.get(1)
    rows = [[n, f'{rate[n]:.3f}', f'{rate[n] / base:.2f}x' if base else '-'] for n in batches]
    print(f'\nTeacher-output cache: {steps} steps, {precision}, LR {size[0]}x{size[1]}, one generator per image, '
          f'median of {repeats} call(s) per batch size after one warm-up call.\n')
    print(markdown_table(['Batch', 'Images per second', 'vs batch 1'], rows))


if __name__ == '__main__':
    sys.exit(main())
