#!/usr/bin/env python
"""Combine several runs' summary.json (e.g. three seeds) into mean ± standard deviation, as in Table 1.

The standard deviation is the sample one (ddof=1, divisor n - 1). Example::

    python scripts/aggregate_runs.py results/dtkd_seed0 results/dtkd_seed1 results/dtkd_seed2

writes ``aggregate.json`` and ``aggregate.md`` into ``--out`` (default: ``aggregate/`` in the runs'
common folder, here ``results/aggregate``). The Model and KD loss columns come from the runs' own
labels (recorded in their ``summary.json`` by ``dtkd-test``) when the runs agree; ``--model`` / ``--kd``
override them. Runs evaluated under different protocols (metric variants, library versions, data sets:
see ``summary.json``'s ``protocol``) are refused, naming the field.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dtkd_metric.report import (  # noqa: E402
    aggregate_summaries,
    load_labels,
    load_protocol,
    load_summary,
    protocol_differences,
    write_aggregate,
)


def common_label(runs, key):
    """The runs' shared label ``key`` (from run.json), or None when they have none or disagree."""
    values = {load_labels(run).get(key) for run in runs}
    return values.pop() if len(values) == 1 else None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('runs', nargs='+', help='summary.json files or result folders holding one (two or more)')
    parser.add_argument('--out', default=None,
                        help="output folder for aggregate.json and aggregate.md (default: the runs' common folder "
                             '/ aggregate)')
    parser.add_argument('--model', default=None, help="Model column label (default: the runs' own, if they agree)")
    parser.add_argument('--kd', default=None, help="KD loss column label (default: the runs' own, if they agree)")
    args = parser.parse_args(argv)
    try:
        summaries = {}
        for run in args.runs:
            if run in summaries:
                raise ValueError(f'run given twice: {run}')
            summaries[run] = load_summary(run)
        problems = protocol_differences({run: load_protocol(run) for run in args.runs})
        if problems:
            raise ValueError('the runs were evaluated under different protocols:\n  ' + '\n  '.join(problems))
        aggregate = aggregate_summaries(summaries)
        out = args.out or os.path.join(os.path.commonpath([os.path.abspath(r) for r in args.runs]), 'aggregate')
        out_json = os.path.join(out, 'aggregate.json')
        out_md = os.path.join(out, 'aggregate.md')
        model = args.model or common_label(args.runs, 'model')
        kd = args.kd or common_label(args.runs, 'kd_loss')
        write_aggregate(aggregate, out_json, out_md, run_paths=args.runs, model_label=model, kd_label=kd)
    except (ValueError, FileNotFoundError) as error:
        print(f'aggregate_runs: error: {error}', file=sys.stderr)
        return 2
    with open(out_md, encoding='utf-8') as f:
        print(f.read(), end='')
    print(f'wrote {out_json} and {out_md}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
