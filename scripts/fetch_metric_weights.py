#!/usr/bin/env python
"""Download the LPIPS and MUSIQ weights into the caches the evaluation reads (needs internet).

Files and default places (``<hub>`` = ``torch.hub.get_dir()``, i.e. ``$TORCH_HOME/hub``, by default
``~/.cache/torch/hub``):

    <hub>/checkpoints/alexnet-owt-7be5be79.pth      torchvision AlexNet (LPIPS backbone)
    <hub>/pyiqa/LPIPS_v0.1_alex-df73285e.pth        LPIPS v0.1 linear layers (pyiqa)
    <hub>/pyiqa/musiq_koniq_ckpt-e95806b9.pth       MUSIQ, KonIQ-10k (pyiqa)

For an offline machine: run this where there is internet (``--hub-dir`` to choose the folder), then
copy the folder to the offline machine's torch hub dir (or set TORCH_HOME there). ``--list`` only
prints what would go where.
"""
import argparse
import hashlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dtkd_metric.weights import ALL_WEIGHT_FILES, METRIC_WEIGHTS, torch_hub_dir  # noqa: E402

METRICS = {'lpips': METRIC_WEIGHTS['calculate_lpips'], 'musiq': METRIC_WEIGHTS['calculate_musiq']}


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(weight, hub_dir, force=False):
    """Download one file into ``hub_dir/<cache>/``; returns its path. Tries the mirrors in order."""
    from torch.hub import download_url_to_file

    folder = os.path.join(hub_dir, weight.cache)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, weight.name)
    if os.path.isfile(path) and not force:
        print(f'present: {path}')
        return path
    errors = []
    for url in weight.urls:
        print(f'downloading {url}\n         -> {path}')
        try:
            # torchvision's file names carry the sha256 prefix and torch hub checks it; pyiqa's are checked below.
            download_url_to_file(url, path, hash_prefix=weight.sha256_prefix if weight.cache == 'checkpoints' else None)
        except Exception as error:  # network errors come in many types; try the next mirror
            errors.append(f'{url}: {error}')
            continue
        if weight.cache != 'checkpoints' and not sha256_of(path).startswith(weight.sha256_prefix):
            print(f'warning: sha256 of {path} does not start with {weight.sha256_prefix} (the tag in its name)')
        return path
    raise RuntimeError(f'could not download {weight.name}:\n  ' + '\n  '.join(errors))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--metric', choices=sorted(METRICS), action='append',
                        help='only the files of this metric (repeatable; default all)')
    parser.add_argument('--hub-dir', default=None, help='torch hub dir to fill (default: torch.hub.get_dir())')
    parser.add_argument('--force', action='store_true', help='download again even if present')
    parser.add_argument('--list', action='store_true', help='print the files and destinations, download nothing')
    args = parser.parse_args(argv)
    hub_dir = os.path.abspath(os.path.expanduser(args.hub_dir or torch_hub_dir()))
    wanted = [w for w in ALL_WEIGHT_FILES if not args.metric or any(w in METRICS[m] for m in args.metric)]
    if args.list:
        for weight in wanted:
            path = os.path.join(hub_dir, weight.cache, weight.name)
            state = 'present' if os.path.isfile(path) else 'missing'
            print(f'{state:8s}{path}\n        {weight.what}; from {weight.urls[0]}')
        return 0
    failed = []
    for weight in wanted:
        try:
            fetch(weight, hub_dir, force=args.force)
        except RuntimeError as error:
            failed.append(str(error))
    if failed:
        print('fetch_metric_weights: error:\n' + '\n'.join(failed), file=sys.stderr)
        return 1
    print(f'done; the evaluation finds these files when torch.hub.get_dir() is {hub_dir}.')
    return 0


if __name__ == '__main__':
    sys.exit(main())
