"""Run the ResShift teacher once over a training set and store its SR images for distillation.

The output (a folder of ``<key>.png`` or a BasicSR ``.lmdb``) holds the teacher's x4 image of every
LQ image under the GT's key: set it as ``dataroot_teacher`` of ``PairedTeacherDataset``.

    python scripts/generate_teacher_outputs.py -opt options/teacher/resshift_realsr_x4.yml \\
        --input datasets/DF2K/DF2K_train_LR_bicubic_X4_sub.lmdb \\
        --gt datasets/DF2K/DF2K_train_HR_sub.lmdb \\
        --output datasets/DF2K/DF2K_train_ResShift_sub.lmdb

    # several GPUs / nodes: every rank takes every world_size-th key
    torchrun --nproc_per_node=8 scripts/generate_teacher_outputs.py -opt ... --input ... --output ...

Rerunning the same command resumes (finished keys are skipped); a killed run leaves no partial
entry. Every image draws its noise from its own generator seeded from (--seed, key), so the results
do not depend on interruptions, sharding or --batch-size (a batched network call may only move a few
pixels by one grey level). ``--samples K`` stores K independent teacher samples per image (sample 0 is
the output itself, unchanged; sample k in ``<output>/sample<k>.lmdb``) for the ``teacher_spread``
confidence of ``ConfidenceDWTKDLoss``. See ``dtkd_teacher/cache.py``. LQ images are read
as ``PairedTeacherDataset`` reads them (``dtkd_data.image_io.read_training_image``).
"""
import argparse
import datetime
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dtkd_model  # noqa: E402,F401  (makes basicsr importable)

# isort: split
import torch  # noqa: E402

from dtkd_compat import OptionError  # noqa: E402
from dtkd_teacher.cache import generate_teacher_outputs  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('-opt', default='options/teacher/resshift_realsr_x4.yml', help='teacher option file')
    parser.add_argument('--input', required=True, help='LQ images: folder or .lmdb')
    parser.add_argument('--output', required=True, help='output folder, or .lmdb for a BasicSR LMDB')
    parser.add_argument('--gt', default=None, help='GT folder or .lmdb: output keys = GT keys, sizes checked')
    parser.add_argument('--filename-tmpl', default='{}',
                        help="LQ name of GT key k, e.g. '{}x4' (as PairedImageDataset's filename_tmpl)")
    parser.add_argument('--batch-size', type=int, default=1,
                        help='sample up to this many consecutive LQ images of equal size in one batched '
                        'network call (and one write transaction); every image keeps its own generator, so '
                        'results do not depend on this (up to one grey level on a few pixels)')
    parser.add_argument('--precision', choices=('fp32', 'bf16', 'fp16'), default=None,
                        help="override sampler.precision (fp16: CUDA only)")
    parser.add_argument('--steps', type=int, default=None, help='override sampler.steps (e.g. 1)')
    parser.add_argument('--device', default=None, help="override sampler.device ('auto', 'cpu', 'cuda:0')")
    parser.add_argument('--seed', type=int, default=0, help='base seed; per image: sha256(seed:key)')
    parser.add_argument('--samples', type=int, default=1,
                        help='K teacher samples per image (for teacher_spread confidence): sample 0 is the '
                        'output itself (the same as with K = 1), sample k the store <output>/sample<k>.lmdb '
                        '(or folder <output>/sample<k>), each drawn from its own per-key seed')
    parser.add_argument('--overwrite', action='store_true', help='replace an output made with other settings')
    parser.add_argument('--no-progress', action='store_true', help='no progress bar')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    rank = int(os.environ.get('RANK', '0'))
    barrier = None
    device = args.device
    if world_size > 1:
        import torch.distributed as dist

        # gloo: only barriers are needed, and it works with and without GPUs. The long timeout lets
        # fast ranks wait for slow ones at the final barrier; a crashed rank is reaped by torchrun.
        dist.init_process_group('gloo', timeout=datetime.timedelta(hours=72))
        barrier = dist.barrier
        local_rank = int(os.environ.get('LOCAL_RANK', '0'))
        if device in (None, 'auto') and torch.cuda.is_available():
            device = f'cuda:{local_rank % torch.cuda.device_count()}'
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    try:
        stats = generate_teacher_outputs(
            args.opt, args.input, args.output, gt_path=args.gt, filename_tmpl=args.filename_tmpl, seed=args.seed,
            steps=args.steps, precision=args.precision, device=device, batch_size=args.batch_size,
            overwrite=args.overwrite, rank=rank, world_size=world_size, barrier=barrier,
            progress=not args.no_progress, samples=args.samples)
    except OptionError as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    finally:
        if world_size > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
    if rank == 0:
        print(f"teacher outputs: {stats['written']} written by rank 0, {stats['skipped']} already present, "
              f"{stats['total']} keys x {stats['samples']} sample(s) in {args.output} ({stats['seconds']:.1f} s)")
    return 0


if __name__ == '__main__':
    sys.exit(main())
