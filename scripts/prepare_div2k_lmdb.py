"""DIV2K (HR + bicubic LR) -> BasicSR sub-image LMDBs for training.

Follows BasicSR's data preparation (``scripts/data_preparation/extract_subimages.py`` and
``create_lmdb.py``, https://github.com/XPixelGroup/BasicSR/blob/master/docs/DatasetPreparation.md):
every HR image is cut into ``crop_size`` x ``crop_size`` sub-images every ``step`` pixels (plus a last
crop flush with the border when more than ``thresh_size`` pixels would be left), the LR image into the
matching ``crop_size / scale`` windows, and both go into LMDBs with ``meta_info.txt`` under the keys
``<HR stem>_s001``, ``_s002``, ... (the same key in both, as BasicSR's paired LMDB reader expects).
Unlike the two-step BasicSR route, LR windows are taken at exactly HR position / scale, so pairs
always align.

Example (the defaults)::

    python scripts/prepare_div2k_lmdb.py \\
        --hr datasets/DIV2K/DIV2K_train_HR --lr datasets/DIV2K/DIV2K_train_LR_bicubic/X4 \\
        --out-gt datasets/DIV2K/DIV2K_train_HR_sub.lmdb --out-lq datasets/DIV2K/DIV2K_train_LR_bicubic_X4_sub.lmdb

Every pair is checked before anything is written: readable headers, keys BasicSR can use, HR exactly
``scale`` x LR (or within ``scale`` pixels with ``--crop-gt``), and no HR image smaller than
``--crop-size`` (it would give no sub-image). Images are read with
:func:`dtkd_data.image_io.read_lmdb_image`: 8 or 16 bits, gray or colour as in the file, EXIF
orientation applied, opaque alpha dropped, transparent images refused.

Outputs are written to hidden ``.partial`` folders and renamed at the end, so an interrupted run
leaves no LMDB that looks complete; an existing output is kept unless ``--overwrite``.
"""
import argparse
import os
import os.path as osp
import sys
from multiprocessing import Pool

from tqdm import tqdm

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from dtkd_compat import OptionError  # noqa: E402
from dtkd_data import lmdb_tools as lt  # noqa: E402
from dtkd_data.image_io import image_size  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--hr', default='datasets/DIV2K/DIV2K_train_HR', help='HR (GT) image folder')
    parser.add_argument('--lr', default='datasets/DIV2K/DIV2K_train_LR_bicubic/X4', help='bicubic LR folder')
    parser.add_argument('--out-gt', default='datasets/DIV2K/DIV2K_train_HR_sub.lmdb', help='GT LMDB to write')
    parser.add_argument('--out-lq', default='datasets/DIV2K/DIV2K_train_LR_bicubic_X4_sub.lmdb',
                        help='LQ LMDB to write')
    parser.add_argument('--scale', type=int, default=4)
    parser.add_argument('--lr-tmpl', default='{}x{scale}',
                        help="LR file stem from the HR stem; DIV2K names 0001.png's LR 0001x4.png")
    parser.add_argument('--crop-size', type=int, default=480, help='GT sub-image size in pixels')
    parser.add_argument('--step', type=int, default=240, help='GT sub-image stride in pixels')
    parser.add_argument('--thresh-size', type=int, default=0,
                        help='add a border-flush crop when more than this many pixels would be left')
    parser.add_argument('--crop-gt', action='store_true',
                        help='accept HR/LR pairs that differ from an exact scale by less than scale pixels per side '
                             'and use their common top-left region')
    parser.add_argument('--compress-level', type=int, default=1, help='PNG compression level (0-9)')
    parser.add_argument('--n-thread', type=int, default=1, help='worker processes that crop and encode')
    parser.add_argument('--overwrite', action='store_true', help='replace existing output LMDBs')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    scale = args.scale
    if scale < 1:
        raise SystemExit(f'--scale must be a positive integer, got {scale}.')
    for name in ('crop_size', 'step'):
        value = getattr(args, name)
        if value < scale or value % scale:
            raise SystemExit(f'--{name.replace("_", "-")} {value} must be a positive multiple of --scale {scale}.')
    for out in (args.out_gt, args.out_lq):
        if osp.exists(out) and not args.overwrite:
            raise SystemExit(f'{out} already exists; pass --overwrite to replace it.')

    # Check everything that can be checked cheaply before the long part starts.
    try:
        pairs = lt.find_pairs(args.hr, args.lr, args.lr_tmpl.replace('{scale}', str(scale)), '--hr', '--lr')
    except FileNotFoundError as err:
        raise SystemExit(str(err)) from err
    bad_keys, unreadable, bad_sizes, small = [], [], [], []
    for stem, hr_path, lr_path in pairs:
        try:
            lt.check_key(stem)
        except ValueError:
            bad_keys.append(stem)
        try:
            (hh, hw), (lh, lw) = image_size(hr_path), image_size(lr_path)
        except OptionError as err:
            unreadable.append(str(err))
            continue
        size = lt.aligned_lq_size((hh, hw), (lh, lw), scale, args.crop_gt)
        if size is None:
            bad_sizes.append(f'{osp.basename(hr_path)} {hh}x{hw} vs {osp.basename(lr_path)} {lh}x{lw}')
        elif min(size) * scale < args.crop_size:
            small.append(f'{osp.basename(hr_path)} {size[0] * scale}x{size[1] * scale}')
    if bad_keys:
        raise SystemExit(f'{len(bad_keys)} HR file names cannot be LMDB keys (letters, digits, _ and - only): '
                         f'{lt.listing(bad_keys)}')
    if unreadable:
        raise SystemExit(f'{len(unreadable)} images cannot be used: {lt.listing(unreadable)}')
    if bad_sizes:
        hint = '' if args.crop_gt else ' (--crop-gt accepts pairs that differ by less than scale pixels)'
        raise SystemExit(f'{len(bad_sizes)} HR images are not exactly {scale}x their LR image{hint}: '
                         f'{lt.listing(bad_sizes)}')
    if small:  # they would give no sub-image (all of them: empty LMDBs)
        raise SystemExit(f'{len(small)} of {len(pairs)} HR images are smaller than --crop-size {args.crop_size} '
                         f'and would give no sub-images: {lt.listing(small)}; use a smaller --crop-size or '
                         'remove these images (nothing was written)')

    jobs = [(stem, hr, lr, scale, args.crop_size, args.step, args.thresh_size, args.compress_level, args.crop_gt)
            for stem, hr, lr in pairs]
    print(f'{len(pairs)} HR/LR pairs; GT crops {args.crop_size} step {args.step}, '
          f'LQ crops {args.crop_size // scale} step {args.step // scale}.')
    pool = Pool(args.n_thread) if args.n_thread > 1 else None
    try:
        results = pool.imap(lt.crop_subimage_pair, jobs) if pool else map(lt.crop_subimage_pair, jobs)
        with lt.LmdbWriter(args.out_gt, args.compress_level, args.overwrite) as gt_db, \
                lt.LmdbWriter(args.out_lq, args.compress_level, args.overwrite) as lq_db:
            for crops in tqdm(results, total=len(jobs), unit='image', desc='sub-images'):
                for key, gt_bytes, gt_shape, lq_bytes, lq_shape in crops:
                    gt_db.put_bytes(key, gt_bytes, gt_shape)
                    lq_db.put_bytes(key, lq_bytes, lq_shape)
    except OptionError as err:  # an image the header check passed but that cannot be decoded or stored
        raise SystemExit(f'{err} (nothing was written)') from None
    finally:
        if pool:
            pool.close()
            pool.join()
    print(f'Wrote {gt_db.count} sub-image pairs to {os.path.abspath(args.out_gt)} and {os.path.abspath(args.out_lq)}.')
    return 0


if __name__ == '__main__':
    sys.exit(main())
