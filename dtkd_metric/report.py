"""Per-image metric records, per-dataset summaries and tables in the layout of the paper's Table 1.

The paper (Park and Song, Electronics 2026, Table 1) reports, per dataset, one row per model:
``Dataset | Model | KD loss | PSNR↑ | LPIPS↓ | MUSIQ↑``, averaged over three runs as mean ± standard
deviation. :class:`ResultsRecorder` writes one run's numbers; :func:`aggregate_summaries` combines
several runs (``scripts/aggregate_runs.py``).
"""
import csv
import hashlib
import io
import json
import math
import os

from dtkd_compat import atomic_write

# Column order and direction of the usual metrics, keyed by the lower-cased metric name as used
# under ``val.metrics``. Others follow in the order first seen; their direction comes from the
# ``better`` map given to the writer, else no arrow.
KNOWN_METRICS = {
    'psnr': ('PSNR', 'higher', 2),
    'psnr_y': ('PSNR-Y', 'higher', 2),
    'ssim': ('SSIM', 'higher', 4),
    'ssim_y': ('SSIM-Y', 'higher', 4),
    'lpips': ('LPIPS', 'lower', 3),
    'musiq': ('MUSIQ', 'higher', 3),
    'niqe': ('NIQE', 'lower', 3),
}
ARROWS = {'higher': '↑', 'lower': '↓'}


def order_metrics(names):
    """Known metrics first (PSNR, SSIM, LPIPS, MUSIQ, NIQE), then the rest in the given order."""
    names = list(dict.fromkeys(names))
    known = [n for k in KNOWN_METRICS for n in names if n.lower() == k]
    return known + [n for n in names if n not in known]


def metric_header(name, better=None):
    """Column title with the direction arrow, e.g. ``PSNR↑``, ``LPIPS↓``."""
    label, direction, _ = KNOWN_METRICS.get(name.lower(), (name, None, 4))
    direction = (better or {}).get(name, direction)
    return label + ARROWS.get(direction, '')


def metric_decimals(name):
    return KNOWN_METRICS.get(name.lower(), (None, None, 4))[2]


def _markdown_table(header, rows):
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join(['---'] * len(header)) + '|']
    lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
    return '\n'.join(lines) + '\n'


def _check_name(kind, name):
    if not isinstance(name, str) or not name or name in ('.', '..') or '/' in name or os.sep in name:
        raise ValueError(f'{kind} must be a non-empty name without path separators, got {name!r}')


class ResultsRecorder:
    """Collects per-image metrics of one run and writes its summary files.

    Args:
        results_root: folder for the files (created on write).
        model_label: ``Model`` column of the table (e.g. ``Student``); ``-`` when None.
        kd_label: ``KD loss`` column (e.g. ``DWT``); ``-`` when None.
        better: optional ``{metric: 'higher' | 'lower'}`` for metrics not known by name (as the
            ``better`` key of ``val.metrics``).

        protocol: ``{'metrics': {name: variant}, 'versions': {...}}`` (see :func:`metric_protocol`); the
            data sets' image counts and file-list fingerprints are added from the records.

    Files written by :meth:`write`:
        ``summary.json``: ``{'results': {dataset: {metric: mean over images}}, 'labels': {model, kd_loss,
        better}, 'protocol': {metrics, versions, datasets}}`` (read back by :func:`load_summary` and
        :func:`load_labels`);
        ``<dataset>_metrics.csv``: one row per image (``image`` then the metrics);
        ``summary.md``: ``Dataset | Model | KD loss | PSNR↑ | ...``, one row per dataset, then the protocol.
    """

    def __init__(self, results_root, model_label=None, kd_label=None, better=None, protocol=None):
        self.results_root = str(results_root)
        self.model_label = model_label
        self.kd_label = kd_label
        self.better = dict(better or {})
        self.protocol = dict(protocol or {})
        self._records = {}  # dataset -> {image: {metric: value}}

    def add(self, dataset_name, image_name, metrics):
        """Record one image's metrics (``{name: number}``); all images of a dataset need the same names."""
        _check_name('dataset_name', dataset_name)
        if not isinstance(image_name, str) or not image_name:
            raise ValueError(f'image_name must be a non-empty string, got {image_name!r}')
        if not isinstance(metrics, dict) or not metrics:
            raise ValueError(f'{dataset_name}/{image_name}: metrics must be a non-empty dict of name -> number')
        values = {}
        for name, value in metrics.items():
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise ValueError(f'{dataset_name}/{image_name}: metric {name!r} is not a number: {value!r}') from None
            if not math.isfinite(value):
                raise ValueError(f'{dataset_name}/{image_name}: metric {name!r} is {value}')
            values[str(name)] = value
        images = self._records.setdefault(dataset_name, {})
        if image_name in images:
            raise ValueError(f'{dataset_name}/{image_name} was already recorded')
        if images:
            expected = set(next(iter(images.values())))
            if set(values) != expected:
                raise ValueError(f'{dataset_name}/{image_name}: metrics {sorted(values)} differ from the other '
                                 f'images of {dataset_name}: {sorted(expected)}')
        images[image_name] = values

    def summary(self):
        """``{dataset: {metric: mean over its images}}`` in insertion order."""
        out = {}
        for dataset, images in self._records.items():
            names = order_metrics(next(iter(images.values())))
            out[dataset] = {n: math.fsum(v[n] for v in images.values()) / len(images) for n in names}
        return out

    def full_protocol(self):
        """The protocol given at construction plus, per data set, its image count and a fingerprint
        (SHA-256 of its sorted image names, first 16 hex digits)."""
        datasets = {}
        for dataset, images in self._records.items():
            digest = hashlib.sha256('\n'.join(sorted(images)).encode('utf-8')).hexdigest()[:16]
            datasets[dataset] = {'images': len(images), 'fingerprint': digest}
        return {**self.protocol, 'datasets': datasets}

    def csv_text(self, dataset_name):
        images = self._records[dataset_name]
        names = order_metrics(next(iter(images.values())))
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator='\n')
        writer.writerow(['image'] + names)
        for image, values in images.items():
            writer.writerow([image] + [repr(values[n]) for n in names])
        return buf.getvalue()

    def markdown(self):
        summary = self.summary()
        names = order_metrics(n for metrics in summary.values() for n in metrics)
        header = ['Dataset', 'Model', 'KD loss'] + [metric_header(n, self.better) for n in names]
        rows = []
        for dataset, metrics in summary.items():
            cells = [f'{metrics[n]:.{metric_decimals(n)}f}' if n in metrics else '-' for n in names]
            rows.append([dataset, self.model_label or '-', self.kd_label or '-'] + cells)
        counts = ', '.join(f'{d}: {len(i)}' for d, i in self._records.items())
        return (_markdown_table(header, rows) + f'\nMean over images ({counts}).\n\n'
                + protocol_markdown(self.full_protocol()))

    def write(self):
        """Write the summary files (each atomically). Returns ``{'json': path, 'markdown': path, 'csv': {...}}``."""
        if not self._records:
            raise ValueError(f'no results recorded for {self.results_root}: call add() before write()')
        paths = {'csv': {}}
        for dataset in self._records:
            path = os.path.join(self.results_root, f'{dataset}_metrics.csv')
            atomic_write(path, self.csv_text(dataset))
            paths['csv'][dataset] = path
        paths['json'] = os.path.join(self.results_root, 'summary.json')
        payload = {'results': self.summary(),
                   'labels': {'model': self.model_label, 'kd_loss': self.kd_label, 'better': self.better},
                   'protocol': self.full_protocol()}
        atomic_write(paths['json'], json.dumps(payload, indent=2) + '\n')
        paths['markdown'] = os.path.join(self.results_root, 'summary.md')
        atomic_write(paths['markdown'], self.markdown())
        return paths


def metric_protocol(metrics_opt):
    """The evaluation protocol of ``val.metrics``: each metric's exact variant (its options: colour space,
    border crop, ...; for pyiqa metrics the pyiqa metric and weight files) and the library versions."""
    from importlib import metadata

    from dtkd_metric.weights import metric_weight_files

    metrics = {}
    for name, mopt in (metrics_opt or {}).items():
        variant = {k: v for k, v in mopt.items() if k not in ('optional', 'better')}
        if mopt.get('test_y_channel'):
            # BasicSR's to_y_channel: BT.601 Y of [0, 255] floats, not rounded to integers
            variant['y_channel'] = 'BT.601 Y, not rounded (BasicSR to_y_channel)'
        files = metric_weight_files(name, mopt)
        if files:
            variant['weights'] = files
        metrics[name] = variant
    versions = {}
    for package in ('torch', 'basicsr', 'pyiqa'):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {'metrics': metrics, 'versions': versions}


def protocol_markdown(protocol):
    lines = ['Protocol:']
    for name, variant in protocol.get('metrics', {}).items():
        lines.append(f'- {name}: ' + ', '.join(f'{k}={v}' for k, v in variant.items()))
    if protocol.get('versions'):
        lines.append('- versions: ' + ', '.join(f'{k} {v}' for k, v in protocol['versions'].items()))
    for dataset, info in protocol.get('datasets', {}).items():
        lines.append(f'- {dataset}: {info["images"]} images, file list {info["fingerprint"]}')
    return '\n'.join(lines) + '\n'


def _read_summary_file(path):
    if os.path.isdir(path):
        path = os.path.join(path, 'summary.json')
    if not os.path.isfile(path):
        raise FileNotFoundError(f'no summary file at {path}')
    with open(path, encoding='utf-8') as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f'{path} is not valid JSON: {error}') from None
    if not isinstance(data, dict) or not isinstance(data.get('results'), dict):
        raise ValueError(f'{path}: expected {{"results": {{dataset: {{metric: number}}}}, ...}} as written by '
                         'ResultsRecorder')
    return path, data


def load_labels(path):
    """The labels (``model``, ``kd_loss``, ``better``) a ``summary.json`` (or its folder) records; {} if none."""
    try:
        _, data = _read_summary_file(path)
    except (OSError, ValueError):
        return {}
    labels = data.get('labels')
    return labels if isinstance(labels, dict) else {}


def load_protocol(path):
    """The evaluation protocol a ``summary.json`` (or its folder) records ({} if none)."""
    _, data = _read_summary_file(path)
    protocol = data.get('protocol')
    return protocol if isinstance(protocol, dict) else {}


def protocol_differences(protocols):
    """Fields (dotted paths) in which the ``{run: protocol}`` differ from the first run's."""
    def flatten(tree, prefix=''):
        if isinstance(tree, dict):
            out = {}
            for key, value in tree.items():
                out.update(flatten(value, f'{prefix}{key}.'))
            return out
        return {prefix[:-1]: json.dumps(tree, sort_keys=True)}

    labels = list(protocols)
    first = flatten(protocols[labels[0]])
    problems = []
    for label in labels[1:]:
        other = flatten(protocols[label])
        for key in sorted(set(first) | set(other)):
            if first.get(key) != other.get(key):
                problems.append(f'{label}: protocol field {key} is {other.get(key, "absent")}, '
                                f'{labels[0]} has {first.get(key, "absent")}')
    return problems


def load_summary(path):
    """Read a ``summary.json`` (or the folder holding one): its ``{dataset: {metric: number}}`` results."""
    path, data = _read_summary_file(path)
    results = data['results']
    ok = results and all(
        isinstance(m, dict) and m and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in m.values())
        for m in results.values())
    if not ok:
        raise ValueError(f'{path}: expected results {{dataset: {{metric: number}}}} as written by ResultsRecorder')
    return results


def aggregate_summaries(summaries):
    """Mean and sample standard deviation (ddof=1) of each dataset/metric over runs.

    Args:
        summaries: ``{run label: {dataset: {metric: value}}}`` with at least two runs, all with the
            same datasets and, per dataset, the same metrics.

    Returns:
        ``{dataset: {metric: {'mean': m, 'std': s, 'n': runs, 'values': [per run]}}}``.

    Raises:
        ValueError: fewer than two runs, or runs that differ in datasets or metrics (named).
    """
    labels = list(summaries)
    if len(labels) < 2:
        raise ValueError(f'need at least two runs for a sample standard deviation, got {len(labels)}')
    first = summaries[labels[0]]
    problems = []
    for label in labels[1:]:
        other = summaries[label]
        if set(other) != set(first):
            problems.append(f'{label}: datasets {sorted(other)} differ from {labels[0]}: {sorted(first)}')
            continue
        for dataset in first:
            if set(other[dataset]) != set(first[dataset]):
                problems.append(f'{label}: metrics of {dataset} {sorted(other[dataset])} differ from '
                                f'{labels[0]}: {sorted(first[dataset])}')
    if problems:
        raise ValueError('runs do not match:\n  ' + '\n  '.join(problems))
    out = {}
    for dataset in first:
        out[dataset] = {}
        for name in order_metrics(first[dataset]):
            values = [float(summaries[label][dataset][name]) for label in labels]
            mean = math.fsum(values) / len(values)
            std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))
            out[dataset][name] = {'mean': mean, 'std': std, 'n': len(values), 'values': values}
    return out


def aggregate_markdown(aggregate, model_label=None, kd_label=None, better=None):
    """Table 1 layout with ``mean ± std`` cells for the result of :func:`aggregate_summaries`."""
    names = order_metrics(n for metrics in aggregate.values() for n in metrics)
    header = ['Dataset', 'Model', 'KD loss'] + [metric_header(n, better) for n in names]
    rows = []
    for dataset, metrics in aggregate.items():
        cells = []
        for n in names:
            if n not in metrics:
                cells.append('-')
                continue
            d = metric_decimals(n)
            cells.append(f'{metrics[n]["mean"]:.{d}f} ± {metrics[n]["std"]:.{d}f}')
        rows.append([dataset, model_label or '-', kd_label or '-'] + cells)
    runs = next(iter(next(iter(aggregate.values())).values()))['n']
    return _markdown_table(header, rows) + f'\nMean ± sample standard deviation (ddof=1) over {runs} runs.\n'


def write_aggregate(aggregate, out_json, out_md, run_paths=None, model_label=None, kd_label=None, better=None):
    """Write the aggregate as JSON and Markdown (atomically)."""
    payload = {'std': 'sample standard deviation (ddof=1)', 'runs': list(run_paths or []), 'results': aggregate}
    atomic_write(out_json, json.dumps(payload, indent=2) + '\n')
    atomic_write(out_md, aggregate_markdown(aggregate, model_label, kd_label, better))
