#!/usr/bin/env python
"""The one-shot GPU check (``make gpu-check``): correctness on CUDA, then the benchmarks, in one run.

Needs one CUDA GPU; finishes in a few minutes (tiny data made on the spot, random weights). Writes
``results/gpu/`` (one Markdown file per step, and ``summary.md``). Without a GPU it exits with status 1
and one line saying so. Steps:

1. ``pytest -m cuda``: the student forward and gradients (fp32, bf16) against float64 on the CPU, the
   teacher on CUDA against the CPU, 20 training iterations of the paper's options (fp32, bf16 autocast,
   fp16 with the gradient scaler, with and without channels-last), train.compile, dtkd-infer with and
   without tiles, a one-process NCCL start, the real-world path with a bf16 online teacher;
2. the student's latency and training speed (``benchmark_student.py --device cuda``);
3. the teacher's latency and the teacher/student ratio, and the teacher-output cache's images per
   second at batch 1, 8 and 32 (``benchmark_teacher.py --cache-batches``, random weights; the goal is
   5x the rate of batch 1);
4. FLOPs and parameters (``benchmark_complexity.py``);
5. a training step (``benchmark_train_step.py --device cuda``);
6. a training step at batch 64 with the full-size teachers online in bf16 (SinSR 1 step, ResShift v3
   4 steps, ResShift 15 steps, random weights) and the real-world path (Real-ESRGAN degradation + SinSR):
   ``benchmark_train_step.py --device cuda --online``; the goal is an online one-step iteration at
   most 3x a plain SRModel iteration.

    python scripts/gpu_check.py [--out results/gpu] [--only STEP ...]
"""
import argparse
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = [
    ('pytest_cuda', [sys.executable, '-m', 'pytest', '-q', '-m', 'cuda', '-p', 'no:cacheprovider', 'tests']),
    ('benchmark_student', [sys.executable, 'scripts/benchmark_student.py', '--device', 'cuda']),
    ('benchmark_teacher', [sys.executable, 'scripts/benchmark_teacher.py', '--random-weights', '--device', 'cuda',
                           '--cache-batches', '1', '8', '32', '--repeats', '3']),
    ('benchmark_complexity', [sys.executable, 'scripts/benchmark_complexity.py', '--random-weights',
                              '--device', 'cuda']),
    ('benchmark_train_step', [sys.executable, 'scripts/benchmark_train_step.py', '--device', 'cuda']),
    ('benchmark_train_step_online', [sys.executable, 'scripts/benchmark_train_step.py', '--device', 'cuda',
                                     '--online', '--batch', '64', '--iters', '5', '--warmup', '2',
                                     '--loss-repeats', '3']),
]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', default=os.path.join('results', 'gpu'), help='folder for the tables')
    parser.add_argument('--only', nargs='+', choices=[name for name, _ in STEPS], help='run only these steps')
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print('gpu-check: no CUDA device was found (torch.cuda.is_available() is False); run it on a machine '
              'with a GPU', file=sys.stderr)
        return 1
    os.makedirs(args.out, exist_ok=True)
    lines = [f'# GPU check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}',
             '', '| step | exit | seconds | output |', '|---|---:|---:|---|']
    failed = []
    for name, cmd in STEPS:
        if args.only and name not in args.only:
            continue
        path = os.path.join(args.out, f'{name}.md')
        print(f'gpu-check: {name}: {" ".join(cmd[1:])}', flush=True)
        start = time.time()
        with open(path, 'w', encoding='utf-8') as f:
            code = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT).returncode
        seconds = time.time() - start
        lines.append(f'| {name} | {code} | {seconds:.0f} | {path} |')
        if code:
            failed.append(name)
        print(f'gpu-check: {name}: exit {code} in {seconds:.0f} s -> {path}', flush=True)
    with open(os.path.join(args.out, 'summary.md'), 'w', encoding='utf-8') as f:
        f.write('\n'.join(lines) + '\n')
    print('\n'.join(lines))
    if failed:
        print(f'gpu-check: failed: {", ".join(failed)}', file=sys.stderr)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
