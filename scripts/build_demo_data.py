"""Build the offline demo x4 SR data set from scikit-image's photographs (see dtkd_data/demo_data.py).

    python scripts/build_demo_data.py                       # datasets/demo, all photos
    python scripts/build_demo_data.py --preset tiny --root datasets/demo_tiny

A rerun with the same parameters reuses the existing build when its manifest still matches the
files on disk; ``--force`` rebuilds regardless.
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

import dtkd_data  # noqa: E402, F401  (makes basicsr importable)
from dtkd_data.demo_data import PRESETS, build_demo_dataset  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--root', default='datasets/demo', help='output folder')
    parser.add_argument('--scale', type=int, default=4)
    parser.add_argument('--preset', choices=sorted(PRESETS), default='full',
                        help='full: every photo at full size; tiny: two training photos and one test photo, '
                             '128x128 (for tests)')
    parser.add_argument('--crop-size', type=int, default=None, help='GT sub-image size (overrides the preset)')
    parser.add_argument('--step', type=int, default=None, help='GT sub-image stride (overrides the preset)')
    parser.add_argument('--max-side', type=int, default=None, help='centre-crop photos to this size first')
    parser.add_argument('--force', action='store_true', help='rebuild even if a valid build exists')
    args = parser.parse_args(argv)
    try:
        paths = build_demo_dataset(args.root, scale=args.scale, preset=args.preset, max_side=args.max_side,
                                   crop_size=args.crop_size, step=args.step, force=args.force)
    except ValueError as err:
        raise SystemExit(str(err)) from err
    for name, path in paths.items():
        print(f'{name:15s} {path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
