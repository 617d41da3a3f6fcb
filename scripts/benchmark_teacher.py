"""Time the ResShift teacher: per image and per sampling step, with peak memory, for 15 and 1 steps.

    python scripts/benchmark_teacher.py                          # official config and weights
    python scripts/benchmark_teacher.py --random-weights --lr-size 64 --device cpu

Prints a Markdown table: for each precision (fp32 and the reduced ones: bf16 on CPU, fp16 and bf16
on GPU) and each step count, the median time per image (full ``ResShiftTeacher.sample``: up-sampling,
encoding, sampling loop, decoding), the mean time of one UNet call, of encoding and of decoding,
and the peak memory (GPU allocator, or the process's resident set size on the CPU). Before the timed
runs of a precision one 1-step image warms up the kernels. ``--random-weights`` runs the official
architecture with random weights (the timings do not depend on the weights).
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dtkd_model  # noqa: E402,F401  (makes basicsr importable)

# isort: split
import torch  # noqa: E402

from dtkd_compat import OptionError  # noqa: E402
from dtkd_model.benchmarking import (  # noqa: E402
    PeakMemory,
    add_teacher_run_arguments,
    fmt_bytes,
    machine_description,
    markdown_table,
    prepare_teacher_run,
    sync,
)


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
    args = parser.parse_args(argv)
    try:
        if args.repeats < 1 or min(args.steps) < 1:
            raise OptionError('--repeats and --steps must be positive')
        device, precisions, (h, w), teacher = prepare_teacher_run(args)
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
    return 0


if __name__ == '__main__':
    sys.exit(main())
