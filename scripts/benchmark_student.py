"""Speed of the SwinIR-small student: BasicSR's SwinIR (fp32, eager) against what PyTorch offers.

Variants (``variants``): SwinIRStudent with the same weights in fp32; under autocast in the reduced
precisions that pay on the device (fp16, and bf16 where supported, on CUDA; bf16 on CPUs with bf16
matrix instructions, ``dtkd_utils.device.cpu_supports_bf16``; elsewhere torch's bf16 runs many times
slower than fp32 and is not timed); in channels-last memory format; and, with ``--compile``, wrapped in
``torch.compile`` (fp32 and each reduced precision; compiling costs minutes on a CPU).

Measured side by side in one process: every round runs each variant once, in a rotated order, so that
machine noise hits all alike; the tables give medians and the speed-up against BasicSR's SwinIR, as
the ratio of medians and as the median of per-round ratios. Timed: inference on one LR image of each
``--sizes``, and a training iteration (forward + L1 + backward + Adam, batch ``--batch``, LR
``--train-size``). First, an accuracy check on photographs shipped with scikit-image: fp32 variants must
equal BasicSR's SwinIR (max abs difference <= 1e-5, images in [0, 1]), reduced precisions must reach a
PSNR >= 45 dB against it; the script exits with status 1 if one does not.

    python scripts/benchmark_student.py [--sizes 64 128] [--repeats 9] [--train-iters 7] [--threads 2]
        [--device auto|cpu|cuda] [--weights net_g.pth] [--compile] [--no-train] [--no-inference]

Without --weights the networks have BasicSR's seeded random initialisation (speed does not depend on
the values; the accuracy check is then a check of arithmetic, not of a trained model).
"""
import argparse
import os
import sys
from collections import namedtuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))  # benchmark_common, also when loaded by path

import dtkd_compat  # noqa: E402, F401  (must precede basicsr)

# isort: split
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from basicsr.archs.swinir_arch import SwinIR  # noqa: E402
from benchmark_common import accuracy_table, interleaved, machine_description, speedup_table  # noqa: E402

from dtkd.infer import PAPER_STUDENT  # noqa: E402
from dtkd_arch.swinir_student_arch import SwinIRStudent  # noqa: E402
from dtkd_compat import OptionError  # noqa: E402
from dtkd_utils.device import pick_device  # noqa: E402

STUDENT = {k: v for k, v in PAPER_STUDENT.items() if k != 'type'}
REFERENCE = 'BasicSR SwinIR fp32'
PAPER_LATENCY_MS = 19.09  # SwinIR-small inference time reported in the DTKD paper (its GPU, 64x64 LR)
PHOTOS = ('astronaut', 'coffee', 'chelsea', 'rocket', 'camera', 'brick')
FP32_ATOL, MIN_PSNR = 1e-5, 45.0

Variant = namedtuple('Variant', 'name precision channels_last compiled')


def variants(device, compile=False):
    """The SwinIRStudent variants timed against BasicSR's SwinIR on ``device``."""
    from benchmark_common import reduced_precisions

    reduced = reduced_precisions(device)
    out = [Variant('SwinIRStudent fp32', 'fp32', False, False)]
    out += [Variant(f'SwinIRStudent {p} autocast', p, False, False) for p in reduced]
    out.append(Variant('SwinIRStudent fp32 channels-last', 'fp32', True, False))
    if compile:
        out += [Variant(f'SwinIRStudent {p} torch.compile', p, False, True) for p in ['fp32'] + reduced]
    return out


def build(vs, state_dict, device, train):
    """{name: (network, channels_last)}: BasicSR's SwinIR first, then every variant, all with ``state_dict``."""
    ref = SwinIR(**STUDENT)
    ref.load_state_dict(state_dict)
    nets = {REFERENCE: (ref.to(device).train(train), False)}
    for v in vs:
        net = SwinIRStudent(**STUDENT, precision=v.precision)
        net.load_state_dict(state_dict)
        net = net.to(device).train(train)
        if v.channels_last:
            net = net.to(memory_format=torch.channels_last)
        nets[v.name] = (torch.compile(net, dynamic=False) if v.compiled else net, v.channels_last)
    return nets


def layout(x, channels_last):
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def photos_lr(size):
    from skimage import data

    for name in PHOTOS:
        img = getattr(data, name)()
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        img = torch.from_numpy(np.ascontiguousarray(img[..., :3])).permute(2, 0, 1)[None].float() / 255.
        side = min(img.shape[-2:])
        top, left = (img.shape[-2] - side) // 2, (img.shape[-1] - side) // 2
        img = img[..., top:top + side, left:left + side]
        yield F.interpolate(img, size=(size, size), mode='bicubic', antialias=True, align_corners=False).clamp(0, 1)


def accuracy(nets, vs, device, size):
    """Print the worst max abs difference and PSNR of each variant against BasicSR's SwinIR; True if all pass."""
    def forward(name, lr):
        net, channels_last = nets[name]
        return net(layout(lr, channels_last))

    return accuracy_table(forward, [(v.name, v.precision) for v in vs], [lr.to(device) for lr in photos_lr(size)],
                          REFERENCE, FP32_ATOL, MIN_PSNR,
                          f'{len(PHOTOS)} skimage.data photographs, centre crop, bicubic down to {size}x{size} LR')


def inference(nets, device, args):
    for size in args.sizes:
        x = torch.rand(1, 3, size, size, device=device)

        def runner(net, x):
            def run():
                with torch.inference_mode():
                    net(x)
            return run

        times = interleaved({name: runner(net, layout(x, cl)) for name, (net, cl) in nets.items()},
                            args.repeats, args.warmup, device)
        print(f'\n### Inference, {device}, 1x3x{size}x{size} LR -> x4 ({args.repeats} rounds after {args.warmup} '
              f'warm-up)\n')
        print(speedup_table(times, REFERENCE))
        if device.type == 'cuda' and size == 64:
            print(f'\nThe DTKD paper reports {PAPER_LATENCY_MS} ms for SwinIR-small at this size on its GPU.')


def train_step(net, x, gt, fp16):
    """One training iteration of ``net``: forward, L1, backward and Adam (with loss scaling for fp16)."""
    opt = torch.optim.Adam(net.parameters(), lr=2e-4, betas=(0.9, 0.99))
    scaler = torch.amp.GradScaler(x.device.type, enabled=fp16)

    def step():
        opt.zero_grad(set_to_none=True)
        scaler.scale(F.l1_loss(net(x), gt)).backward()
        scaler.step(opt)
        scaler.update()
    return step


def training(nets, vs, device, args):
    s = args.train_size
    x = torch.rand(args.batch, 3, s, s, device=device)
    gt = torch.rand(args.batch, 3, 4 * s, 4 * s, device=device)
    precision = {v.name: v.precision for v in vs}
    fns = {name: train_step(net, layout(x, channels_last), gt, precision.get(name) == 'fp16')
           for name, (net, channels_last) in nets.items()}
    times = interleaved(fns, args.train_iters, args.train_warmup, device)
    print(f'\n### Training iteration, {device}: forward + L1 + backward + Adam, batch {args.batch}, {s}x{s} LR '
          f'({args.train_iters} rounds after {args.train_warmup} warm-up)\n')
    print(speedup_table(times, REFERENCE))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--sizes', type=int, nargs='+', default=[64, 128], help='LR sizes for inference')
    parser.add_argument('--repeats', type=int, default=9, help='timed rounds per inference size')
    parser.add_argument('--warmup', type=int, default=2, help='untimed inference rounds')
    parser.add_argument('--train-iters', type=int, default=7, help='timed training rounds')
    parser.add_argument('--train-warmup', type=int, default=3, help='untimed training rounds')
    parser.add_argument('--batch', type=int, default=4, help='training batch size')
    parser.add_argument('--train-size', type=int, default=64, help='training LR patch side (GT is 4x)')
    parser.add_argument('--psnr-size', type=int, default=64, help='LR side of the photographs of the accuracy check')
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch default)')
    parser.add_argument('--device', default='auto', help="'auto' (CUDA if available), 'cpu', 'cuda', 'cuda:1'")
    parser.add_argument('--weights', default=None, help='optional SwinIR-small checkpoint (BasicSR format)')
    parser.add_argument('--compile', action='store_true', help='also time torch.compile variants (slow to compile)')
    parser.add_argument('--no-train', action='store_true', help='skip the training-iteration benchmark')
    parser.add_argument('--no-inference', action='store_true', help='skip the accuracy and inference benchmarks')
    args = parser.parse_args(argv)
    try:
        device = pick_device(args.device)
    except OptionError as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ref = SwinIR(**STUDENT)
    if args.weights:
        from dtkd_arch.checkpoint import load_pretrained

        load_pretrained(ref, args.weights, strict=True, what='SwinIR-small student', option_key='--weights')
    state_dict = ref.state_dict()
    vs = variants(device, args.compile)
    print(f'\n## SwinIR-small ({sum(p.numel() for p in ref.parameters()):,} parameters) on {device}\n')
    print(f'- machine: {machine_description(device)}')
    print(f'- weights: {args.weights or "random (seeded BasicSR initialisation)"}')
    print(f'- reference: {REFERENCE} (eager); variants: {", ".join(v.name for v in vs)}')
    ok = True
    if not args.no_inference:
        nets = build(vs, state_dict, device, train=False)
        ok = accuracy(nets, vs, device, args.psnr_size)
        inference(nets, device, args)
        del nets
    if not args.no_train:
        training(build(vs, state_dict, device, train=True), vs, device, args)
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
