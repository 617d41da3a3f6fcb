#!/usr/bin/env python
"""Band-group discrepancy between teacher and student outputs (the paper's Figures 3 and 4).

For every image and checkpoint: mean |W_g(T) - W_g(S)| over the coefficients of each frequency group
(LF = LL2, MF = LH2/HL2/HH2, HF = LH1/HL1/HH1 for the paper's two-level Haar DWT). Example::

    python scripts/plot_band_discrepancy.py --teacher results/teacher_RealSR_Canon \
        --student "no KD=results/swinir_s/visualization/RealSR_Canon" \
        --student "DWT KD=results/dtkd/visualization/RealSR_Canon" --out figures/band_discrepancy.png

writes the PNG and, beside it, the numbers as JSON (same name, .json). The teacher's folder holds its SR
image of every test image, named by the test set's keys: ``scripts/generate_teacher_outputs.py`` with
the test set's LQ and GT LMDBs as ``--input``/``--gt`` and a folder as ``--output`` writes it
(docs/evaluation.md, "Figures"). Images are matched by file
name; the run name dtkd-test appends to its images (``<image>_<run>.png``) is removed automatically,
other name endings with ``--strip-suffix``.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dtkd_compat import atomic_write  # noqa: E402
from dtkd_metric.figures import compute_band_discrepancy, plot_band_discrepancy  # noqa: E402


def parse_labelled(values, option):
    out = {}
    for text in values:
        label, sep, folder = text.partition('=')
        if not sep or not label or not folder:
            raise ValueError(f'{option} expects LABEL=FOLDER, got {text!r}')
        if label in out:
            raise ValueError(f'{option}: label "{label}" given twice')
        out[label] = folder
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--teacher', required=True, help='folder of teacher outputs')
    parser.add_argument('--student', action='append', required=True, metavar='LABEL=FOLDER',
                        help='student outputs of one checkpoint (repeat for several, side by side)')
    parser.add_argument('--out', required=True, help='PNG file to write')
    parser.add_argument('--level', type=int, default=2, help='DWT levels (paper: 2)')
    parser.add_argument('--wavelet', default='haar', help='PyWavelets wavelet name (paper: haar)')
    parser.add_argument('--strip-suffix', action='append', default=[],
                        help='name ending removed before matching images by stem (repeatable)')
    parser.add_argument('--max-images', type=int, default=4, help='per-image panels shown before the mean panel')
    parser.add_argument('--title', default=None)
    args = parser.parse_args(argv)
    try:
        students = parse_labelled(args.student, '--student')
        result = compute_band_discrepancy(args.teacher, students, level=args.level, wavelet=args.wavelet,
                                          strip_suffixes=args.strip_suffix)
        plot_band_discrepancy(result, args.out, max_images=args.max_images, title=args.title)
        numbers = os.path.splitext(args.out)[0] + '.json'
        atomic_write(numbers, json.dumps(result, indent=2) + '\n')
    except (ValueError, FileNotFoundError) as error:
        print(f'plot_band_discrepancy: error: {error}', file=sys.stderr)
        return 2
    for label, groups in result['mean'].items():
        print(f'{label}: ' + ', '.join(f'{g} {v:.5f}' for g, v in groups.items()))
    print(f'wrote {args.out} and {numbers} ({len(result["images"])} images)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
