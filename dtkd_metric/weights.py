"""Where the perceptual metrics' weights live, and a clear stop when they are missing.

Nothing is downloaded at run time. The files are looked for in the caches that torchvision and
pyiqa 0.1.16 themselves use, so weights fetched once by either library (or by
``scripts/fetch_metric_weights.py``) are found:

- ``alexnet-owt-7be5be79.pth``: torchvision's AlexNet ImageNet weights (the LPIPS backbone), in
  ``<torch hub dir>/checkpoints``;
- ``LPIPS_v0.1_alex-df73285e.pth``: the LPIPS v0.1 linear layers for AlexNet, in
  ``<torch hub dir>/pyiqa``;
- ``musiq_koniq_ckpt-e95806b9.pth``: MUSIQ trained on KonIQ-10k, in ``<torch hub dir>/pyiqa``.

``<torch hub dir>`` is ``torch.hub.get_dir()``: ``$TORCH_HOME/hub``, by default
``~/.cache/torch/hub``. A metric's options may name a file instead: ``weights_path`` (the LPIPS
linear layers or the MUSIQ checkpoint) and ``backbone_path`` (LPIPS only: the AlexNet file).

Metric options understood here (besides the metric's own keys, all under ``val.metrics.<name>``):
``optional: true`` (skip the metric with a warning when its weights are missing, instead of
stopping), ``weights_path``, ``backbone_path``.
"""
import copy
import os
from dataclasses import dataclass

from dtkd_compat import MissingFileError, OptionError

FETCH_SCRIPT = 'scripts/fetch_metric_weights.py'


@dataclass(frozen=True)
class WeightFile:
    """One pretrained file a metric needs.

    Attributes:
        name: file name, exactly as torchvision / pyiqa cache it.
        cache: ``'checkpoints'`` (torchvision's cache) or ``'pyiqa'`` (pyiqa's cache), both under
            the torch hub dir.
        urls: where ``scripts/fetch_metric_weights.py`` downloads it from, tried in order.
        what: human description for messages.
        option_key: the metric option that points at a file elsewhere.
        sha256_prefix: the hash prefix the name carries (torch hub convention), checked after a
            download.
    """

    name: str
    cache: str
    urls: tuple
    what: str
    option_key: str
    sha256_prefix: str


def _pyiqa_urls(name):
    # The two stores pyiqa 0.1.16 knows (pyiqa/archs/arch_util.py: get_url_from_name).
    return (
        f'https://huggingface.co/chaofengc/IQA-PyTorch-Weights/resolve/main/{name}',
        f'https://github.com/chaofengc/IQA-PyTorch/releases/download/v0.1-weights/{name}',
    )


ALEXNET = WeightFile(
    name='alexnet-owt-7be5be79.pth',
    cache='checkpoints',
    urls=('https://download.pytorch.org/models/alexnet-owt-7be5be79.pth',),
    what='torchvision AlexNet ImageNet weights (LPIPS backbone)',
    option_key='backbone_path',
    sha256_prefix='7be5be79',
)
LPIPS_ALEX = WeightFile(
    name='LPIPS_v0.1_alex-df73285e.pth',
    cache='pyiqa',
    urls=_pyiqa_urls('LPIPS_v0.1_alex-df73285e.pth'),
    what='LPIPS v0.1 linear layers for AlexNet (pyiqa)',
    option_key='weights_path',
    sha256_prefix='df73285e',
)
MUSIQ_KONIQ = WeightFile(
    name='musiq_koniq_ckpt-e95806b9.pth',
    cache='pyiqa',
    urls=_pyiqa_urls('musiq_koniq_ckpt-e95806b9.pth'),
    what='MUSIQ trained on KonIQ-10k (pyiqa)',
    option_key='weights_path',
    sha256_prefix='e95806b9',
)

ALL_WEIGHT_FILES = (ALEXNET, LPIPS_ALEX, MUSIQ_KONIQ)

# Metric type (as registered in METRIC_REGISTRY) -> files it needs.
METRIC_WEIGHTS = {
    'calculate_lpips': (LPIPS_ALEX, ALEXNET),
    'calculate_musiq': (MUSIQ_KONIQ,),
}


# Metrics for which lower is better; BasicSR's best-result tracking reads ``better`` (default 'higher').
LOWER_IS_BETTER = ('calculate_lpips', 'calculate_niqe')


class MissingWeightsError(MissingFileError):
    """Pretrained weights of configured metrics are not on disk: ``error.problems`` lists one line per
    missing file; ``str(error)`` is the whole message for the user."""

    def __init__(self, problems):
        self.problems = list(problems)
        super().__init__(missing_weights_message(self.problems))

    def __str__(self):
        return missing_weights_message(self.problems)


def torch_hub_dir():
    """``torch.hub.get_dir()``, read at call time so ``TORCH_HOME`` set later still counts."""
    import torch

    return torch.hub.get_dir()


def cache_dir(weight):
    """Directory where torchvision / pyiqa cache ``weight`` (a :class:`WeightFile`)."""
    return os.path.join(torch_hub_dir(), weight.cache)


def default_weight_path(weight):
    return os.path.join(cache_dir(weight), weight.name)


def weight_path(weight, metric_opt=None):
    """Path of ``weight`` for a metric: the option ``weight.option_key`` if set, else the cache.

    Returns the absolute path, whether or not the file exists.
    """
    override = (metric_opt or {}).get(weight.option_key)
    if override:
        return os.path.abspath(os.path.expanduser(str(override)))
    return default_weight_path(weight)


def describe_missing_file(metric_name, weight, path, from_option):
    where = (f'given by val.metrics.{metric_name}.{weight.option_key}' if from_option
             else f'looked for in {os.path.dirname(path)}')
    return (f'metric "{metric_name}": missing {weight.what}: file {os.path.basename(path)} '
            f'({where}; full path {path})')


def missing_weights_message(problems):
    """The message shown when weights are missing: what, where, and how to get them."""
    lines = ['Pretrained weights for the configured metrics are missing, so evaluation did not start:']
    lines += [f'  - {p}' for p in problems]
    lines += [
        'Nothing is downloaded at run time. To get the files, on a machine with internet access run',
        f'  python {FETCH_SCRIPT}',
        f'which puts them in the torch hub cache ({torch_hub_dir()}; set TORCH_HOME to choose another), '
        'and copy that cache to this machine;',
        'or point val.metrics.<name>.weights_path / backbone_path at the files;',
        'or skip a metric with a warning: set val.metrics.<name>.optional: true in the option file, or add',
        '  --force_yml val:metrics:<name>:optional=true',
        'to the command (one entry per metric, e.g. val:metrics:lpips:optional=true).',
    ]
    return '\n'.join(lines)


def metric_weight_files(metric_name, metric_opt):
    """The weight files a metric uses, by released name (their SHA-256 prefix is in the name), for the
    evaluation protocol; [] for metrics without weights."""
    return [weight.name for weight in METRIC_WEIGHTS.get((metric_opt or {}).get('type'), ())]


def metric_weight_problems(metric_name, metric_opt):
    """One message per weight file that ``metric_opt`` needs and that is not on disk."""
    problems = []
    for weight in METRIC_WEIGHTS.get(metric_opt.get('type'), ()):
        path = weight_path(weight, metric_opt)
        if not os.path.isfile(path):
            problems.append(describe_missing_file(metric_name, weight, path, bool(metric_opt.get(weight.option_key))))
    return problems


def _validate_metrics_opt(metrics_opt):
    if metrics_opt is None:
        return {}
    if not isinstance(metrics_opt, dict):
        raise OptionError('val.metrics must be a mapping of metric name to options, '
                                f'got {type(metrics_opt).__name__}')
    from basicsr.utils.registry import METRIC_REGISTRY

    for name, opt in metrics_opt.items():
        if not isinstance(opt, dict) or 'type' not in opt:
            raise OptionError(f'val.metrics.{name} needs a "type" key (e.g. type: calculate_psnr)')
        if opt['type'] not in METRIC_REGISTRY:
            known = ', '.join(sorted(k for k, _ in METRIC_REGISTRY))
            raise OptionError(f'val.metrics.{name}.type: unknown metric "{opt["type"]}"; registered: {known}')
        optional = opt.get('optional', False)
        if not isinstance(optional, bool):
            raise OptionError(f'val.metrics.{name}.optional must be true or false, got {optional!r}')
        better = opt.get('better', 'higher')
        if better not in ('higher', 'lower'):
            raise OptionError(f'val.metrics.{name}.better must be "higher" or "lower", got {better!r}')
    return metrics_opt


def resolve_metrics(metrics_opt):
    """Split the configured metrics into those to run and those skipped for missing weights.

    Args:
        metrics_opt: ``opt['val']['metrics']`` (``{name: {type: ..., ...}}``) or None.

    Returns:
        ``(metrics, warnings)``: ``metrics`` is a copy of ``metrics_opt`` without the optional
        metrics whose weights are missing, and with ``better: lower`` added to LPIPS and NIQE
        entries that do not say (BasicSR's best-result tracking assumes higher is better); the
        metric functions ignore ``optional`` / ``weights_path`` / ``better``. ``warnings`` has one
        message per skipped metric.

    Raises:
        MissingWeightsError: a metric that is not optional has missing weights (all of them listed).
        OptionError: an entry has no or an unknown ``type``, or a bad ``optional`` / ``better``.
    """
    metrics_opt = _validate_metrics_opt(metrics_opt)
    runnable, warnings, problems = {}, [], []
    for name, opt in metrics_opt.items():
        missing = metric_weight_problems(name, opt)
        if not missing:
            runnable[name] = copy.deepcopy(opt)
            if opt['type'] in LOWER_IS_BETTER:
                runnable[name].setdefault('better', 'lower')
        elif opt.get('optional', False):
            warnings.append(f'Skipping optional metric "{name}" ({opt["type"]}): ' + '; '.join(missing)
                            + f'. Get the weights with python {FETCH_SCRIPT}.')
        else:
            problems.extend(missing)
    if problems:
        raise MissingWeightsError(problems)
    return runnable, warnings


def check_metric_weights(metrics_opt, raise_error=True):
    """Start-up check of every configured metric's weights (call before evaluating anything).

    Optional metrics (``optional: true``) are not problems; :func:`resolve_metrics` reports them.

    Args:
        metrics_opt: ``opt['val']['metrics']`` or None.
        raise_error: raise :class:`MissingWeightsError` when something is missing (default);
            with False, return the problems instead.

    Returns:
        List of problem lines (empty when everything needed is there).
    """
    metrics_opt = _validate_metrics_opt(metrics_opt)
    problems = []
    for name, opt in metrics_opt.items():
        if not opt.get('optional', False):
            problems.extend(metric_weight_problems(name, opt))
    if problems and raise_error:
        raise MissingWeightsError(problems)
    return problems
