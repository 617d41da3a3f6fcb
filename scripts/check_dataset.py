"""Check every image of a training or test set and list every bad entry at once.

    python scripts/check_dataset.py -opt options/train_dtkd.yml            # every paired data set of the file
    python scripts/check_dataset.py -opt options/train_dtkd.yml --full     # decode every image as well
    python scripts/check_dataset.py --gt DIR_OR_LMDB --lq DIR_OR_LMDB [--teacher ...] --scale 4 --gt-size 256

Finds missing, empty, truncated or corrupt files, unknown formats, CMYK JPEGs, images with
transparency, LQ/GT/teacher size mismatches and training images smaller than ``gt_size``, with the
rules ``PairedTeacherDataset`` reads by (see ``dtkd_data/image_checks.py``). ``dtkd-train`` and
``dtkd-test`` run the quick scan themselves before starting (option ``dataset_check``).
Exit status: 0 all usable, 1 problems found (one line each on stdout), 2 bad options.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dtkd_data  # noqa: E402,F401  (makes basicsr importable)

# isort: split
from dtkd_compat import OptionError  # noqa: E402
from dtkd_data.image_checks import scan_dataset  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('-opt', help='option file: every PairedTeacherDataset / PairedImageDataset block is checked')
    parser.add_argument('--gt', help='GT folder or .lmdb (instead of -opt)')
    parser.add_argument('--lq', help='LQ folder or .lmdb')
    parser.add_argument('--teacher', help='teacher outputs, folder or .lmdb (optional)')
    parser.add_argument('--scale', type=int, default=4)
    parser.add_argument('--phase', choices=['train', 'val', 'test'], default='train',
                        help='train: GT = scale x LQ exactly, at least --gt-size; val/test: GT cropped to scale x LQ')
    parser.add_argument('--gt-size', type=int, default=None, help='training crop (GT pixels)')
    parser.add_argument('--filename-tmpl', default='{}', help="LQ name template, e.g. '{}x4'")
    parser.add_argument('--full', action='store_true', help='decode every image (slower; finds damage inside files)')
    parser.add_argument('--workers', type=int, default=None, help='reader threads (default: up to 8)')
    return parser.parse_args(argv)


def blocks_from_args(args):
    """[(where, dataset block)] from -opt or from --gt/--lq."""
    if args.opt:
        from dtkd_data.image_checks import PAIRED_DATASETS
        from dtkd_utils.options import load_yaml

        opt = load_yaml(args.opt)
        datasets = opt.get('datasets')
        if not isinstance(datasets, dict):
            raise OptionError(f'{args.opt}: datasets: expected a mapping of data-set blocks')
        blocks = []
        for phase, dopt in datasets.items():
            if not isinstance(dopt, dict) or dopt.get('type') not in PAIRED_DATASETS:
                continue
            dopt = dict(dopt, phase=phase.split('_')[0], scale=opt.get('scale', dopt.get('scale', 1)))
            for key in ('dataroot_gt', 'dataroot_lq', 'dataroot_teacher', 'meta_info_file'):
                if dopt.get(key) is not None:
                    dopt[key] = os.path.expanduser(str(dopt[key]))
            blocks.append((f'datasets.{phase}', dopt))
        if not blocks:
            raise OptionError(f'{args.opt}: no PairedTeacherDataset / PairedImageDataset block to check')
        return blocks
    if not args.gt or not args.lq:
        raise OptionError('give -opt <option file>, or --gt and --lq')
    lmdb = args.gt.rstrip('/').endswith('.lmdb')
    dopt = {'dataroot_gt': args.gt, 'dataroot_lq': args.lq, 'dataroot_teacher': args.teacher, 'scale': args.scale,
            'phase': args.phase, 'gt_size': args.gt_size, 'filename_tmpl': args.filename_tmpl,
            'io_backend': {'type': 'lmdb' if lmdb else 'disk'}}
    return [('--gt/--lq', dopt)]


def check_roots(where, dopt):
    for key in ('dataroot_gt', 'dataroot_lq', 'dataroot_teacher'):
        root = dopt.get(key)
        if root is not None and not os.path.isdir(root):
            raise OptionError(f'{where}.{key}: {root!r} does not exist')
    if '{}' not in dopt.get('filename_tmpl', '{}'):
        raise OptionError(f"{where}.filename_tmpl: expected a template containing '{{}}'")


def main(argv=None):
    args = parse_args(argv)
    start = time.time()
    mode = 'full' if args.full else 'quick'
    try:
        blocks = blocks_from_args(args)
        total, problems = 0, []
        for where, dopt in blocks:
            check_roots(where, dopt)
            count, found = scan_dataset(dopt, where, mode, workers=args.workers)
            total += count
            problems += [f'{where}: {p}' for p in found]
    except OptionError as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    for line in problems:
        print(line)
    status = f'{len(problems)} problem(s)' if problems else 'all usable'
    seconds = time.time() - start
    print(f'check_dataset ({mode}): {total} images in {len(blocks)} data set(s), {status} ({seconds:.1f} s)',
          file=sys.stderr)
    return 1 if problems else 0


if __name__ == '__main__':
    sys.exit(main())
