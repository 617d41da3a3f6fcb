"""Model complexity and latency (the paper's Table 2): teacher (15 steps), teacher (1 step), student.

    python scripts/benchmark_complexity.py --random-weights            # LR 64x64, CPU or GPU
    python scripts/benchmark_complexity.py --lr-size 128 --repeats 10 --device cuda

For each model: parameters, FLOPs and MACs for one LR image of ``--lr-size`` (x4 output), and the
median latency over ``--repeats`` runs after ``--warmup`` runs, in fp32 and in reduced precision
(autocast bf16 on CPU; fp16 and bf16 on GPU). Printed as Markdown with the machine.

Conventions:
* FLOPs from ``torch.utils.flop_counter.FlopCounterMode``: matrix multiplications and convolutions
  only, 2 FLOPs per multiply-accumulate; MACs = FLOPs / 2. Normalisation, activations, soft-max and
  the bicubic up-sampling are not counted.
* Teacher FLOPs = encoder (x4 bicubic of the padded LR) + steps x UNet + decoder, at the LR size
  padded to ``sampler.pad_multiple`` (64 for the official model), as ``ResShiftTeacher.sample`` runs
  it. Parameters: UNet (the paper's 118.59 M) and UNet + autoencoder.
* Student: ``network_g`` of ``--student-opt`` (SwinIR-small of options/train_dtkd.yml), timed with its
  own ``precision`` (``SwinIRStudent``) or under ``torch.autocast`` (other architectures).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))  # benchmark_common, also when loaded by path

import dtkd_compat  # noqa: E402,F401  (must precede basicsr)

# isort: split
import torch  # noqa: E402
from basicsr.utils.registry import ARCH_REGISTRY  # noqa: E402
from benchmark_common import (  # noqa: E402
    add_teacher_run_arguments,
    count_flops,
    machine_description,
    markdown_table,
    median_time,
    prepare_teacher_run,
    teacher_flops,
)

import dtkd_arch  # noqa: E402,F401  (registers the project's architectures)
from dtkd_compat import OptionError  # noqa: E402
from dtkd_utils.device import autocast  # noqa: E402
from dtkd_utils.options import load_yaml  # noqa: E402


def n_params(module):
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def build_students(opt_path, device):
    opt = load_yaml(opt_path, key='--student-opt')
    net_opt = dict(opt.get('network_g') or {})
    if 'type' not in net_opt:
        raise OptionError(f'--student-opt {opt_path}: network_g.type is required')
    arch = net_opt.pop('type')
    net_opt.pop('precision', None)  # set per timed precision
    return [(f'{arch} (student)', ARCH_REGISTRY.get(arch)(**net_opt).eval().to(device))]


def student_runner(net, x, precision, device):
    """Inference of ``net`` on ``x`` in ``precision``: the network's own ``precision`` where it has one
    (SwinIRStudent, whose fp32 forward switches an outer autocast off), else under autocast."""
    own = hasattr(net, 'precision')

    def run():
        if own:
            net.precision = precision
        with torch.no_grad(), autocast('fp32' if own else precision, device):
            net(x)
    return run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_teacher_run_arguments(parser)
    parser.add_argument('--student-opt', default='options/train_dtkd.yml', help='option file with network_g')
    parser.add_argument('--repeats', type=int, default=3, help='timed runs per model and precision (median)')
    parser.add_argument('--warmup', type=int, default=1, help='untimed runs first')
    parser.add_argument('--teacher-steps', type=int, nargs='*', default=[15, 1],
                        help='teacher step counts to report (none: students only)')
    parser.add_argument('--no-latency', action='store_true', help='parameters and FLOPs only')
    args = parser.parse_args(argv)
    try:
        if args.repeats < 1 or args.warmup < 0:
            raise OptionError('--repeats must be >= 1 and --warmup >= 0')
        device, precisions, (h, w), teacher = prepare_teacher_run(args)
        students = build_students(args.student_opt, device)
    except (OptionError, FileNotFoundError, ValueError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 2

    enc, step, dec, (hp, wp) = teacher_flops(teacher, h, w)
    lq = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0)).to(device)
    rows = []
    unet_p, ae_p = n_params(teacher.unet), n_params(teacher.autoencoder)
    for steps in args.teacher_steps:
        flops = enc + steps * step + dec
        row = [f'ResShift ({steps} step{"s" if steps > 1 else ""})', steps,
               f'{unet_p / 1e6:.2f} M (+{ae_p / 1e6:.2f} M AE)', f'{flops / 1e9:.3f}', f'{flops / 2e9:.3f}']
        for precision in precisions:
            if args.no_latency:
                row.append('-')
                continue
            teacher.set_steps(steps)
            teacher.precision = precision
            med, _ = median_time(lambda: teacher.sample(lq, generator=torch.Generator().manual_seed(0)), device,
                                 args.repeats, args.warmup)
            row.append(f'{1000 * med:.2f}')
            print(f'  teacher {steps} steps {precision}: {1000 * med:.1f} ms', file=sys.stderr)
        rows.append(row)
    for name, net in students:
        flops = count_flops(net, lq)
        row = [name, '-', f'{n_params(net) / 1e6:.3f} M', f'{flops / 1e9:.3f}', f'{flops / 2e9:.3f}']
        for precision in precisions:
            if args.no_latency:
                row.append('-')
                continue
            med, _ = median_time(student_runner(net, lq, precision, device), device, args.repeats, args.warmup)
            row.append(f'{1000 * med:.2f}')
            print(f'  {name} {precision}: {1000 * med:.1f} ms', file=sys.stderr)
        rows.append(row)

    weights = 'random weights' if args.random_weights else 'checkpoint weights'
    print(f'## Model complexity and latency ({weights})\n')
    print(f'Machine: {machine_description(device)}  ')
    print(f'Input: one {h}x{w} LR image, x4 output, batch 1 (teacher LR padded to {hp}x{wp}; per step: '
          f'UNet {step / 1e9:.3f} GFLOPs, encoder {enc / 1e9:.3f}, decoder {dec / 1e9:.3f}).  ')
    print('FLOPs: matmul + convolution, 2 FLOPs per multiply-accumulate (FlopCounterMode); MACs = FLOPs / 2.  ')
    if args.no_latency:
        print('Latency: not measured (--no-latency).\n')
    else:
        print(f'Latency: median of {args.repeats} run(s) after {args.warmup} warm-up run(s), ms per image.\n')
    header = ['Model', 'Sampling steps', 'Params', 'GFLOPs', 'GMACs'] + [f'Latency {p} (ms)' for p in precisions]
    print(markdown_table(header, rows))
    return 0


if __name__ == '__main__':
    sys.exit(main())
