#!/usr/bin/env python
"""Combine several runs' summary.json (e.g. three seeds) into mean ± standard deviation, as in Table 1.

The standard deviation is the sample one (ddof=1, divisor n - 1). Example::

    python scripts/aggregate_runs.py results/dtkd_seed0 results/dtkd_seed1 results/dtkd_seed2 \
        --out results/dtkd_3seeds --model Student --kd DWT

writes ``results/dtkd_3seeds/aggregate.json`` and ``aggregate.md``.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dtkd_metric.report import aggregate_summaries, load_summary, write_aggregate  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('runs', nargs='+', help='summary.json files or result folders holding one (two or more)')
    parser.add_argument('--out', required=True, help='output folder for aggregate.json and aggregate.md')
    parser.add_argument('--model', default=None, help='Model column label (e.g. Student)')
    parser.add_argument('--kd', default=None, help='KD loss column label (e.g. DWT)')
    args = parser.parse_args(argv)
    try:
        summaries = {}
        for run in args.runs:
            if run in summaries:
                raise ValueError(f'run given twice: {run}')
            summaries[run] = load_summary(run)
        aggregate = aggregate_summaries(summaries)
        out_json = os.path.join(args.out, 'aggregate.json')
        out_md = os.path.join(args.out, 'aggregate.md')
        write_aggregate(aggregate, out_json, out_md, run_paths=args.runs, model_label=args.model, kd_label=args.kd)
    except (ValueError, FileNotFoundError) as error:
        print(f'aggregate_runs: error: {error}', file=sys.stderr)
        return 2
    with open(out_md, encoding='utf-8') as f:
        print(f.read(), end='')
    print(f'wrote {out_json} and {out_md}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
