#!/usr/bin/env python
"""Qualitative comparison with a zoomed region in a red box (the paper's Figures 5 and 6).

Columns in order: the bicubic-upsampled LR input (--lr), each --panel as given, the ground truth
(--gt). Each of them is a folder, in which the image is found by file stem (``--image``; the run name
dtkd-test appends to its images is removed automatically, other name endings with ``--strip-suffix``),
or one image file. Example with the paper's columns, on RealSR V3 (whose HR and LR images share one
folder, so they are named as files)::

    python scripts/plot_qualitative_grid.py --image Canon_005 \
        --lr datasets/RealSR/Canon/Test/4/Canon_005_LR4.png --gt datasets/RealSR/Canon/Test/4/Canon_005_HR.png \
        --panel "SwinIR-small=results/swinir_s/visualization/RealSR_Canon" \
        --panel "L1 KD=results/l1kd/visualization/RealSR_Canon" \
        --panel "DWT KD (ours)=results/dtkd/visualization/RealSR_Canon" \
        --panel "Teacher=results/teacher_RealSR_Canon" --box 200,120,64,64 --out figures/fig5.png
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dtkd_metric.figures import list_images, parse_box, plot_qualitative_grid, read_rgb, upsample_bicubic  # noqa: E402


def _find(folder, image, strip_suffixes, what):
    """The image ``image`` of a result folder, or ``folder`` itself when it is an image file."""
    if os.path.isfile(folder):
        return folder
    images = list_images(folder, strip_suffixes)
    if image not in images:
        shown = ', '.join(sorted(images)[:10]) + (' ...' if len(images) > 10 else '')
        raise ValueError(f'{what}: no image "{image}" in {folder} (found: {shown})')
    return images[image]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--image', required=True, help='image name (file stem) to show from each folder')
    parser.add_argument('--panel', action='append', default=[], metavar='LABEL=FOLDER',
                        help='a result folder (or one image file) and its column title (repeat, in column order)')
    parser.add_argument('--lr', default=None,
                        help='folder of LR inputs (or the LR image file), shown bicubic-upsampled as the first column')
    parser.add_argument('--lr-label', default='Bicubic')
    parser.add_argument('--gt', default=None,
                        help='folder of ground truths (or the GT image file), shown as the last column')
    parser.add_argument('--gt-label', default='GT')
    parser.add_argument('--box', required=True, help='zoom box "x,y,width,height" in output-image pixels')
    parser.add_argument('--strip-suffix', action='append', default=[],
                        help='name ending removed before matching file stems (repeatable)')
    parser.add_argument('--title', default=None)
    parser.add_argument('--out', required=True, help='PNG file to write')
    args = parser.parse_args(argv)
    try:
        box = parse_box(args.box)
        panels = []
        for text in args.panel:
            label, sep, folder = text.partition('=')
            if not sep or not label or not folder:
                raise ValueError(f'--panel expects LABEL=FOLDER, got {text!r}')
            panels.append((label, read_rgb(_find(folder, args.image, args.strip_suffix, label))))
        if args.gt:
            panels.append((args.gt_label, read_rgb(_find(args.gt, args.image, args.strip_suffix, args.gt_label))))
        if not panels:
            raise ValueError('give at least one --panel or --gt (the LR column is upsampled to their size)')
        if args.lr:
            lr = read_rgb(_find(args.lr, args.image, args.strip_suffix, args.lr_label))
            panels.insert(0, (args.lr_label, upsample_bicubic(lr, panels[0][1].shape[:2])))
        plot_qualitative_grid(panels, box, args.out, title=args.title)
    except (ValueError, FileNotFoundError) as error:
        print(f'plot_qualitative_grid: error: {error}', file=sys.stderr)
        return 2
    print(f'wrote {args.out} ({len(panels)} columns)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
