"""The CPU kernels behind DTKD's speed choices, timed side by side on this machine.

1. Fully connected layers: for each layer shape and pass (forward, input gradient, weight gradient),
   the BLAS library (MKL in torch's wheels), oneDNN and, for the forward and the input gradient,
   the compiled product of ``dtkd_arch.cpu_kernels``: the candidates between which
   ``dtkd_arch.cpu_ops`` picks per shape; with the pick of its default ('auto') backend.
2. 3x3 convolutions (stride 1, padding 1, fp32, batch 1): oneDNN's direct algorithm against the
   Winograd F(2x2, 3x3) convolution of ``dtkd_arch.cpu_kernels``, with each one's largest error
   against a float64 convolution, what ``cpu_kernels.Conv2d`` measures and picks with
   ``DTKD_CPU_CONV=tuned`` and what its fixed default rule ('auto') runs; the default shapes are the
   ResShift UNet's, its VQ autoencoder's and SwinIR-small's.
3. bf16 against fp32 for a 3x3 convolution (NCHW and channels-last), a fully connected layer and a
   batched matrix product: the ratio is large on CPUs without bf16 instructions (AVX512-BF16 or AMX),
   which is why DTKD warns when bf16 is asked for there.

    python scripts/benchmark_cpu_kernels.py [--rows 16384] [--layers 60x180 60x60 60x120 120x60]
        [--winograd 160x160x64 ...] [--repeats 7] [--threads 2] [--no-bf16] [--conv 160x64]

Rounds are interleaved (every candidate once per round) and the tables give medians in ms.
The default layer shapes are SwinIR-small's (qkv, proj, fc1, fc2) at a training batch of 4 x 64 x 64 tokens.
"""
import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dtkd_compat  # noqa: E402, F401  (must precede basicsr)

# isort: split
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from dtkd_arch import cpu_kernels, cpu_ops  # noqa: E402
from dtkd_model.benchmarking import interleaved, machine_description, markdown_table  # noqa: E402

# (in, out, side): SwinIR-small's body and second x2 upsampling convolution at 64x64 LR, the ResShift UNet's
# widths at 64x64 latents, the VQ autoencoder's at 256x256 pixels
WINOGRAD_SHAPES = [(60, 60, 64), (64, 256, 128), (160, 160, 64), (320, 320, 32), (640, 640, 16), (640, 640, 8),
                   (128, 128, 256), (256, 256, 128), (512, 512, 64)]
PASSES = (('forward', cpu_ops._FORWARD), ('grad_input', cpu_ops._GRAD_INPUT), ('grad_weight', cpu_ops._GRAD_WEIGHT))


def medians(fns, repeats):
    """{name: callable} -> {name: median seconds}; one untimed round, then ``repeats`` interleaved rounds."""
    return {name: statistics.median(v) for name, v in interleaved(fns, repeats, 1, 'cpu').items()}


def pair(form, count=2):
    """An argparse type for 'AxB' (``count`` positive integers); ``form`` names them in the error."""
    def parse(text):
        try:
            values = tuple(int(v) for v in text.lower().split('x'))
        except ValueError:
            values = ()
        if len(values) != count:
            raise argparse.ArgumentTypeError(f'expected {form}, got {text!r}')
        if min(values) < 1:
            raise argparse.ArgumentTypeError(f'expected {form} with positive numbers, got {text!r}')
        return values
    return parse


def linear_table(rows, layers, repeats):
    """Markdown rows: layer, pass, BLAS ms, oneDNN ms, compiled ms ('-' where it is no candidate), BLAS / oneDNN,
    and what the tuner picks."""
    out = []
    cpu_ops.reset_linear_choices()
    for cin, cout in layers:
        x = torch.randn(rows, cin)
        w = torch.randn(cout, cin) * cin ** -0.5
        b = torch.randn(cout)
        g = torch.randn(rows, cout)
        args = {'forward': (x, w, b), 'grad_input': (g, w), 'grad_weight': (g, x, w)}
        with cpu_ops.using_linear_backend('auto'):
            xi, wi, bi = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
            cpu_ops.linear(xi, wi, bi).backward(g)  # lets the tuner choose, as in a training step
        key = cpu_ops._key(x, w, True)
        picks = {p: cpu_ops.linear_choices().get((p,) + key, '-') for p, _ in PASSES}
        for name, candidates in PASSES:
            candidates = cpu_ops._candidates(candidates, cpu_ops._compiled_available(x, w))
            med = medians({c: (lambda fn=fn, a=args[name]: fn(*a)) for c, fn in candidates.items()}, repeats)
            compiled = f'{med["compiled"] * 1e3:.2f}' if 'compiled' in med else '-'
            out.append([f'{cin} -> {cout}', name, f'{med["blas"] * 1e3:.2f}', f'{med["onednn"] * 1e3:.2f}', compiled,
                        f'{med["blas"] / med["onednn"]:.2f}', picks[name]])
    return out


def winograd_table(shapes, repeats):
    """Markdown rows: shape, direct ms, Winograd ms, direct / Winograd, both errors against float64, the pick of
    'tuned' and the algorithm of 'auto'."""
    out = []
    cpu_ops.reset_linear_choices()
    g = torch.Generator().manual_seed(0)
    for cin, cout, side in shapes:
        x = torch.randn(1, cin, side, side, generator=g)
        w = torch.randn(cout, cin, 3, 3, generator=g) / (3 * cin ** 0.5)
        b = torch.randn(cout, generator=g)
        conv = cpu_kernels.Conv2d(cin, cout, 3, padding=1)
        with torch.no_grad():
            conv.weight.copy_(w)
            conv.bias.copy_(b)
            with cpu_kernels.using_conv_algorithm('tuned'):
                conv(x)  # measures both once and keeps the faster
            pick = cpu_ops.linear_choices()[('conv3x3', (1, cin, side, side), cout, True, torch.get_num_threads())]
            rule = cpu_kernels.auto_conv_algorithm(cin, cout)
            u = cpu_kernels.winograd_weights(w)
            fns = {'direct': lambda x=x, w=w, b=b: F.conv2d(x, w, b, padding=1),
                   'winograd': lambda x=x, u=u, b=b: cpu_kernels.conv3x3_winograd(x, u, b)}
            med = medians(fns, repeats)
            ref = F.conv2d(x.double(), w.double(), b.double(), padding=1)
            err = {name: (fn().double() - ref).abs().max().item() for name, fn in fns.items()}
        out.append([f'{cin} -> {cout}, {side}x{side}', f'{med["direct"] * 1e3:.2f}', f'{med["winograd"] * 1e3:.2f}',
                    f'{med["direct"] / med["winograd"]:.2f}', f'{err["direct"]:.1e}', f'{err["winograd"]:.1e}', pick,
                    rule])
    return out


def bf16_table(conv, repeats):
    """Markdown rows: operation, fp32 ms, bf16 ms, bf16 / fp32."""
    channels, side = conv
    x = torch.randn(1, channels, side, side)
    w = torch.randn(channels, channels, 3, 3) * 0.05
    cl = torch.channels_last
    a, lw = torch.randn(4096, 192), torch.randn(768, 192) * 0.07
    q, k = torch.randn(384, 64, 32), torch.randn(384, 32, 64)
    ops = {
        f'3x3 convolution {channels} -> {channels}, {side}x{side}, NCHW':
            lambda t: F.conv2d(x.to(t), w.to(t), padding=1),
        f'3x3 convolution {channels} -> {channels}, {side}x{side}, channels-last':
            lambda t: F.conv2d(x.to(t).contiguous(memory_format=cl), w.to(t).contiguous(memory_format=cl), padding=1),
        'fully connected 4096 x 192 -> 768': lambda t: F.linear(a.to(t), lw.to(t)),
        'batched product 384 x (64 x 32) x (32 x 64)': lambda t: torch.bmm(q.to(t), k.to(t)),
    }
    out = []
    with torch.no_grad():
        for name, op in ops.items():
            med = medians({'fp32': lambda op=op: op(torch.float32), 'bf16': lambda op=op: op(torch.bfloat16)},
                          repeats)
            ratio = med['bf16'] / med['fp32']
            out.append([name, f'{med["fp32"] * 1e3:.2f}', f'{med["bf16"] * 1e3:.2f}', f'{ratio:.1f}x'])
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--rows', type=int, default=16384, help='token rows of the fully connected layers')
    parser.add_argument('--layers', type=pair('INxOUT (e.g. 60x180)'), nargs='+',
                        default=[(60, 180), (60, 60), (60, 120), (120, 60)],
                        help='layer shapes IN x OUT (default: SwinIR-small)')
    parser.add_argument('--winograd', type=pair('INxOUTxSIDE (e.g. 160x160x64)', 3), nargs='+',
                        default=WINOGRAD_SHAPES, metavar='INxOUTxSIDE',
                        help='3x3 convolution shapes of the Winograd table (default: ResShift and SwinIR-small)')
    parser.add_argument('--repeats', type=int, default=7, help='timed rounds (median reported)')
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch default)')
    parser.add_argument('--no-bf16', action='store_true', help='skip the bf16 table (slow without bf16 instructions)')
    parser.add_argument('--conv', type=pair('CHANNELSxSIDE (e.g. 160x64)'), default=(160, 64), metavar='CHANNELSxSIDE',
                        help='the bf16 table convolution: channels x image side (default 160x64)')
    args = parser.parse_args(argv)
    if args.rows < 1 or args.repeats < 1:
        parser.error('--rows and --repeats must be positive')
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f'Machine: {machine_description(torch.device("cpu"))}; bf16 instructions (AVX512-BF16, AMX or Arm BF16): '
          f'{cpu_ops.cpu_supports_bf16()}\n')
    print(f'### Fully connected layers, {args.rows} rows, fp32 (median ms of {args.repeats})\n')
    print(markdown_table(['layer', 'pass', 'BLAS', 'oneDNN', 'compiled', 'BLAS / oneDNN', 'auto picks'],
                         linear_table(args.rows, args.layers, args.repeats)))
    if cpu_kernels.available():
        print(f'\n### 3x3 convolutions, fp32: oneDNN direct against Winograd F(2x2, 3x3) (median ms of '
              f'{args.repeats}; errors: largest |output - float64 output|)\n')
        header = ['convolution', 'direct', 'Winograd', 'direct / Winograd', 'direct error', 'Winograd error',
                  'tuned picks', 'auto runs']
        print(markdown_table(header, winograd_table(args.winograd, args.repeats)))
    else:
        print(f'\n(no Winograd table: the compiled kernels are off or failed to build: {cpu_kernels.build_error()})')
    if not args.no_bf16:
        print(f'\n### bf16 against fp32 (median ms of {args.repeats})\n')
        print(markdown_table(['operation', 'fp32', 'bf16', 'bf16 / fp32'], bf16_table(args.conv, args.repeats)))
    return 0


if __name__ == '__main__':
    sys.exit(main())
