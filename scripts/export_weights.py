"""Write one network's weights from a BasicSR training checkpoint as a bare state dict.

BasicSR saves ``{'params': ..., 'params_ema': ...}``; a teacher or student meant for use only needs
one of them (the EMA weights by default), half the size::

    python scripts/export_weights.py experiments/demo_resshift_x4/models/net_g_latest.pth \\
        weights/demo_resshift_x4.pth
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dtkd_arch  # noqa: E402,F401  (makes basicsr importable)

# isort: split
import torch  # noqa: E402

from dtkd_arch.checkpoint import safe_torch_load  # noqa: E402
from dtkd_compat import atomic_write  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('checkpoint', help='BasicSR checkpoint (net_g_*.pth)')
    parser.add_argument('output', help='file to write (a bare state dict)')
    parser.add_argument('--key', default='params_ema', help="entry to keep (default params_ema; 'params' without EMA)")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.checkpoint):
        print(f'export_weights: error: {args.checkpoint} does not exist', file=sys.stderr)
        return 2
    state = safe_torch_load(args.checkpoint, what='checkpoint')
    if not isinstance(state, dict) or not isinstance(state.get(args.key), dict):
        keys = sorted(state) if isinstance(state, dict) else type(state).__name__
        print(f'export_weights: error: {args.checkpoint} has no {args.key!r} entry (it has: {keys})', file=sys.stderr)
        return 2
    weights = {k: v.detach().clone().contiguous() for k, v in state[args.key].items()}
    atomic_write(args.output, lambda f: torch.save(weights, f))
    n = sum(v.numel() for v in weights.values() if v.is_floating_point())
    size = os.path.getsize(args.output) / 2**20
    print(f'wrote {args.output}: {len(weights)} tensors, {n:,} parameters ({size:.1f} MiB)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
