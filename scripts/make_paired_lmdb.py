"""Any paired SR test set (GT folder + LQ folder) -> a GT LMDB and an LQ LMDB with the same keys.

Each GT image ``<stem>.<ext>`` is paired with the LQ image whose stem is ``--filename-tmpl`` applied
to ``<stem>`` (any image extension), and both are stored under the key ``<stem>`` with BasicSR's
``meta_info.txt``. Every pair is checked before anything is written: both images must be readable
(:func:`dtkd_data.image_io.image_size`) and the GT must be exactly ``--scale`` x the LQ. Images are
stored as :func:`dtkd_data.image_io.read_lmdb_image` reads them: 8 or 16 bits, gray or colour as in
the file, EXIF orientation applied, opaque alpha dropped; transparent images are refused. With
``--crop-gt``, pairs that are off by less than ``scale`` pixels per side (benchmark GTs that were
not mod-cropped, LQ sizes rounded up) keep their common top-left region, as BasicSR crops such GTs
at test time.

Example (RealSR V3 Canon x4 test set: ``Canon_001_HR.png`` and ``Canon_001_LR4.png`` in one folder)::

    python scripts/make_paired_lmdb.py --gt datasets/RealSR/Canon/Test/4 --lq datasets/RealSR/Canon/Test/4 \\
        --gt-glob '*_HR.png' --gt-suffix _HR --filename-tmpl '{}_LR4' --scale 4 \\
        --out-gt datasets/RealSR/Canon_x4_test_gt.lmdb --out-lq datasets/RealSR/Canon_x4_test_lq.lmdb

Outputs are written to hidden ``.partial`` folders and renamed at the end; an existing output is
kept unless ``--overwrite``.
"""
import argparse
import os.path as osp
import re
import sys

import numpy as np
from tqdm import tqdm

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from dtkd_compat import OptionError  # noqa: E402
from dtkd_data.image_io import image_size, read_lmdb_image  # noqa: E402
from dtkd_data.lmdb_tools import LmdbWriter, aligned_lq_size, find_pairs, listing  # noqa: E402

_KEY_UNSAFE = re.compile(r'[^A-Za-z0-9_\-]')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--gt', required=True, help='GT image folder')
    parser.add_argument('--lq', required=True, help='LQ image folder')
    parser.add_argument('--out-gt', required=True, help='GT LMDB to write (must end with .lmdb)')
    parser.add_argument('--out-lq', required=True, help='LQ LMDB to write (must end with .lmdb)')
    parser.add_argument('--scale', type=int, default=4)
    parser.add_argument('--filename-tmpl', default='{}',
                        help="LQ file stem from the GT stem, e.g. '{}x4' (DIV2K) or '{}' (same names)")
    parser.add_argument('--gt-suffix', default='',
                        help="strip this suffix from GT stems before applying --filename-tmpl and using them as "
                             "keys, e.g. '_HR' for RealSR (whose LQ template is then '{}_LR4')")
    parser.add_argument('--gt-glob', default=None,
                        help="select GT files by pattern, for sets with GT and LQ in one folder (RealSR: '*_HR.png')")
    parser.add_argument('--crop-gt', action='store_true',
                        help='accept pairs whose GT differs from scale x LQ by less than scale pixels per side and '
                             'keep their common top-left region, instead of failing')
    parser.add_argument('--compress-level', type=int, default=1, help='PNG compression level (0-9)')
    parser.add_argument('--overwrite', action='store_true', help='replace existing output LMDBs')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    scale = args.scale
    if scale < 1:
        raise SystemExit(f'--scale must be a positive integer, got {scale}.')
    if '{}' not in args.filename_tmpl:
        raise SystemExit(f"--filename-tmpl must contain '{{}}', got {args.filename_tmpl!r}.")
    for out in (args.out_gt, args.out_lq):
        if not out.rstrip('/').endswith('.lmdb'):
            raise SystemExit(f'{out}: output LMDB paths must end with .lmdb (BasicSR requires it).')
        if osp.exists(out) and not args.overwrite:
            raise SystemExit(f'{out} already exists; pass --overwrite to replace it.')

    suffix = args.gt_suffix

    def lq_stem(gt_stem):
        if suffix and gt_stem.endswith(suffix):
            gt_stem = gt_stem[:-len(suffix)]
        return args.filename_tmpl.format(gt_stem)

    try:
        pairs = find_pairs(args.gt, args.lq, lq_stem, '--gt', '--lq', gt_pattern=args.gt_glob)
    except FileNotFoundError as err:
        raise SystemExit(str(err)) from err

    keys, bad_sizes, crops, unreadable = {}, [], {}, []
    for stem, gt_path, lq_path in pairs:
        key = _KEY_UNSAFE.sub('_', stem[:-len(suffix)] if suffix and stem.endswith(suffix) else stem)
        if key in keys:
            raise SystemExit(f'GT images {keys[key]} and {gt_path} map to the same LMDB key {key!r}.')
        keys[key] = gt_path
        try:
            (gh, gw), (lh, lw) = image_size(gt_path), image_size(lq_path)
        except OptionError as err:
            unreadable.append(str(err))
            continue
        size = aligned_lq_size((gh, gw), (lh, lw), scale, args.crop_gt)
        if size is None:
            bad_sizes.append(f'{osp.basename(gt_path)} {gh}x{gw} vs {osp.basename(lq_path)} {lh}x{lw}')
        elif size != (lh, lw) or (gh, gw) != (lh * scale, lw * scale):
            crops[gt_path] = size
    if unreadable:
        raise SystemExit(f'{len(unreadable)} images cannot be used: {listing(unreadable)}')
    if bad_sizes:
        hint = '' if args.crop_gt else ' (--crop-gt accepts pairs that differ by less than scale pixels per side)'
        raise SystemExit(f'{len(bad_sizes)} GT images are not {scale}x their LQ image{hint}: {listing(bad_sizes)}')
    if crops:
        print(f'Cropping {len(crops)} pairs to their aligned region: {listing(osp.basename(p) for p in crops)}')

    try:
        with LmdbWriter(args.out_gt, args.compress_level, args.overwrite) as gt_db, \
                LmdbWriter(args.out_lq, args.compress_level, args.overwrite) as lq_db:
            for (key, gt_path), (_, _, lq_path) in tqdm(list(zip(keys.items(), pairs)), unit='pair', desc='pairs'):
                gt, lq = read_lmdb_image(gt_path), read_lmdb_image(lq_path)
                lh, lw = crops.get(gt_path, lq.shape[:2])
                gt_db.put(key, np.ascontiguousarray(gt[:lh * scale, :lw * scale]))
                lq_db.put(key, np.ascontiguousarray(lq[:lh, :lw]))
    except OptionError as err:  # an image the header check passed but that cannot be decoded or stored
        raise SystemExit(f'{err} (nothing was written)') from None
    print(f'Wrote {gt_db.count} pairs to {osp.abspath(args.out_gt)} and {osp.abspath(args.out_lq)}.')
    return 0


if __name__ == '__main__':
    sys.exit(main())
