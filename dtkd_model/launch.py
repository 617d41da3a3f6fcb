"""Entry-point plumbing shared by ``dtkd-train`` and ``dtkd-test``.

BasicSR's runners (``basicsr.train.train_pipeline`` and ``basicsr.test.test_pipeline``) are used
unchanged. Three of the functions they call are replaced by safer equivalents before they run:

- ``parse_options``: BasicSR 1.4.2 parses option files with PyYAML's full ``Loader`` (a YAML file
  containing ``!!python/object/apply:os.system`` runs that command) and applies ``--force_yml``
  with ``exec``/``eval``. Here option files go through ``yaml.safe_load`` and ``--force_yml``
  values through ``yaml.safe_load`` with an explicit key walk.
- distributed initialisation: BasicSR hard-codes NCCL and ``torch.cuda.set_device``, so it cannot
  start without a GPU. Here the backend is NCCL when CUDA is available and gloo otherwise
  (``dist_params.backend`` overrides), and device selection is skipped on the CPU.
- ``load_resume_state``: BasicSR maps the state onto ``torch.cuda.current_device()``; here it is
  loaded on the CPU (the optimizer moves it where its parameters are) with ``weights_only=True``;
  a state file carrying pickled code is refused (nothing from it runs).

Before anything is created, :func:`validate_options` checks the options: required keys, the keys
of the project's own blocks (``train.kd_opt``, ``train.kd_schedule``, ``train.augkd_opt``,
``teacher``, ``val.tile``, the data-set blocks, and for DTKD models the ``train``/``val``/top-level
blocks: an unknown key is an error that names it and suggests the closest valid one), the paths
(data roots, teacher option file, checkpoints, which must hold weights only); then
:func:`dtkd_data.image_checks.check_datasets` scans the data sets (``dataset_check: quick`` by default,
``full`` to decode every image, ``off``) and reports every bad image at once.
"""
import argparse
import collections
import difflib
import inspect
import os
import random
import sys
from os import path as osp

import torch
import torch.distributed as dist
import yaml

from dtkd_compat import OptionError


def register_all():
    """Import every DTKD package so its classes enter BasicSR's registries."""
    import dtkd_arch  # noqa: F401
    import dtkd_data  # noqa: F401
    import dtkd_loss  # noqa: F401
    import dtkd_metric  # noqa: F401
    import dtkd_model  # noqa: F401


def load_yaml(path, key=None):
    """Read an option file with the safe loader. Returns a dict; errors name the file (and the
    option ``key`` that gave its path, when there is one)."""
    where = f'{key}: ' if key else ''
    if not osp.isfile(path):
        raise OptionError(f'{where}option file {path!r} does not exist')
    with open(path, encoding='utf-8') as f:
        try:
            opt = yaml.safe_load(f)
        except yaml.YAMLError as err:
            raise OptionError(f'{where}option file {path!r} is not valid YAML (only plain YAML is accepted, '
                              f'no python tags): {err}') from None
    if not isinstance(opt, dict):
        raise OptionError(f'{where}option file {path!r}: expected a mapping at the top level')
    return opt


def unknown_key_error(key, known, where):
    """OptionError for an unknown ``key`` of the block ``where``, suggesting the closest known key."""
    known = sorted(str(k) for k in known)
    close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ''
    return OptionError(f'{where}.{key}: unknown option{hint} (valid: {", ".join(known)})')


def check_keys(block, known, where):
    """Raise :func:`unknown_key_error` for the first key of the mapping ``block`` not in ``known``."""
    if not isinstance(block, dict):
        raise OptionError(f'{where}: expected a mapping, got {type(block).__name__}')
    for key in block:
        if key not in known:
            raise unknown_key_error(key, known, where)


def apply_force_yml(opt, entries):
    """Apply ``--force_yml a:b:c=value`` overrides. Values are parsed as YAML scalars/lists.

    Like BasicSR, only existing keys can be overridden; unlike BasicSR, nothing is evaluated.
    """
    for entry in entries or []:
        if '=' not in entry:
            raise OptionError(f'--force_yml {entry!r}: expected key:subkey=value')
        keys, value = entry.split('=', 1)
        keys = [k.strip() for k in keys.strip().split(':')]
        try:
            value = yaml.safe_load(value.strip())
        except yaml.YAMLError as err:
            raise OptionError(f'--force_yml {entry!r}: the value is not plain YAML (python tags are refused): '
                              f'{str(err).splitlines()[0]}') from None
        node = opt
        for i, key in enumerate(keys):
            if not isinstance(node, dict) or key not in node:
                raise OptionError(f'--force_yml {entry!r}: option {":".join(keys[:i + 1])!r} does not exist '
                                  '(only existing keys can be overridden)')
            if i == len(keys) - 1:
                node[key] = value
            else:
                node = node[key]


def _require(opt, key, where, kind=None):
    if key not in opt or opt[key] is None:
        raise OptionError(f'{where}{key}: required option is missing')
    if kind is not None and not isinstance(opt[key], kind):
        raise OptionError(f'{where}{key}: expected {kind.__name__}, got {type(opt[key]).__name__}')
    return opt[key]


def validate_options(opt, is_train):
    """Check the options the runners need, before any directory is made or data read."""
    _require(opt, 'name', '', str)
    _require(opt, 'model_type', '', str)
    datasets = _require(opt, 'datasets', '', dict)
    if not datasets:
        raise OptionError('datasets: at least one dataset block is required')
    for phase, dopt in datasets.items():
        if not isinstance(dopt, dict):
            raise OptionError(f'datasets.{phase}: expected a mapping')
        _require(dopt, 'type', f'datasets.{phase}.', str)
        _require(dopt, 'name', f'datasets.{phase}.', str)
        if is_train and phase.split('_')[0] not in ('train', 'val'):
            raise OptionError(f'datasets.{phase}: training phases are named train or val_*')
    if is_train:
        if 'train' not in datasets:
            raise OptionError('datasets.train: a training dataset block is required')
        train = _require(opt, 'train', '', dict)
        total = _require(train, 'total_iter', 'train.')
        if not isinstance(total, int) or total <= 0:
            raise OptionError(f'train.total_iter: expected a positive integer, got {total!r}')
        _require(train, 'optim_g', 'train.', dict)
        _require(train, 'scheduler', 'train.', dict)
        logger = _require(opt, 'logger', '', dict)
        _require(logger, 'print_freq', 'logger.')
        _require(logger, 'save_checkpoint_freq', 'logger.')
        if opt.get('val') is not None:
            _require(opt['val'], 'val_freq', 'val.')
    _require(opt, 'network_g', '', dict)
    opt.setdefault('path', {})
    if not isinstance(opt['path'], dict):
        raise OptionError('path: expected a mapping')
    for key, val in opt['path'].items():
        if 'pretrain_network' in key and val is not None:
            check_checkpoint_file(osp.expanduser(val), f'path.{key}')
    check_project_blocks(opt, is_train)
    num_gpu = opt.get('num_gpu', 'auto')
    if num_gpu != 'auto' and (not isinstance(num_gpu, int) or num_gpu < 0):
        raise OptionError(f"num_gpu: expected 'auto' or a non-negative integer, got {num_gpu!r}")
    if isinstance(num_gpu, int) and num_gpu > torch.cuda.device_count():
        raise OptionError(f'num_gpu: {num_gpu} requested but {torch.cuda.device_count()} CUDA device(s) '
                          "available; use num_gpu: auto (0 means CPU)")


DTKD_MODELS = ('DTKDModel', 'AugKDModel')
TOP_KEYS = ('name', 'model_type', 'scale', 'num_gpu', 'manual_seed', 'datasets', 'network_g', 'path', 'train', 'val',
            'logger', 'dist_params', 'teacher', 'dataset_check', 'find_unused_parameters')
TRAIN_KEYS = ('ema_decay', 'optim_g', 'scheduler', 'total_iter', 'warmup_iter', 'pixel_opt', 'perceptual_opt',
              'kd_opt', 'kd_schedule', 'max_nonfinite_steps')
VAL_KEYS = ('val_freq', 'save_img', 'suffix', 'pbar', 'metrics', 'tile', 'pad_multiple', 'model_label', 'kd_label')
TEACHER_KEYS = ('opt', 'precision')
TILE_KEYS = ('tile_size', 'tile_pad')
PAIRED_DATASETS = ('PairedTeacherDataset', 'PairedImageDataset')
DATASET_KEYS = ('name', 'type', 'phase', 'scale', 'dataroot_gt', 'dataroot_lq', 'dataroot_teacher', 'io_backend',
                'meta_info_file', 'filename_tmpl', 'gt_size', 'use_hflip', 'use_rot', 'color', 'mean', 'std',
                'num_worker_per_gpu', 'batch_size_per_gpu', 'dataset_enlarge_ratio', 'prefetch_mode',
                'num_prefetch_queue', 'pin_memory', 'persistent_workers', 'use_shuffle')
DATASET_CHECK_MODES = ('quick', 'full', 'off')


def _check_loss_block(block, where):
    """A loss block: a registered ``type`` and only the keyword arguments its class takes."""
    from basicsr.utils.registry import LOSS_REGISTRY

    register_all()
    if not isinstance(block, dict) or not isinstance(block.get('type'), str):
        raise OptionError(f'{where}.type: expected a loss block with a type, e.g. {{type: L1Loss}}')
    names = list(LOSS_REGISTRY._obj_map)
    if block['type'] not in names:
        close = difflib.get_close_matches(block['type'], names, n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ''
        raise OptionError(f"{where}.type: unknown loss {block['type']!r}{hint}")
    params = inspect.signature(LOSS_REGISTRY.get(block['type']).__init__).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return
    check_keys(block, ['type'] + [n for n in params if n != 'self'], where)


def check_project_blocks(opt, is_train):
    """Unknown keys and values of the project's own option blocks, named with the closest valid key."""
    from dtkd_model.kd_schedule import KDWeightSchedule
    from dtkd_model.safe_training import max_nonfinite_steps

    dtkd = opt.get('model_type') in DTKD_MODELS
    if dtkd:
        check_keys(opt, TOP_KEYS, 'options')
    mode = opt.get('dataset_check', 'quick')
    if mode is False:
        mode = 'off'
    if mode not in DATASET_CHECK_MODES:
        raise OptionError(f'dataset_check: expected one of {", ".join(DATASET_CHECK_MODES)}, got {mode!r}')
    for phase, dopt in opt['datasets'].items():
        if dopt.get('type') in PAIRED_DATASETS:
            check_keys(dopt, DATASET_KEYS, f'datasets.{phase}')
    teacher = opt.get('teacher')
    if teacher is not None:
        check_keys(teacher, TEACHER_KEYS, 'teacher')
        if not isinstance(teacher.get('opt'), str):
            raise OptionError('teacher.opt: expected the path of a teacher option file, '
                              'e.g. options/teacher/resshift_realsr_x4.yml')
        load_yaml(osp.expanduser(teacher['opt']), key='teacher.opt')  # as the teacher loader opens it
    val = opt.get('val')
    if val is not None:
        if not isinstance(val, dict):
            raise OptionError('val: expected a mapping')
        if dtkd:
            check_keys(val, VAL_KEYS, 'val')
        if val.get('tile') is not None:
            check_keys(val['tile'], TILE_KEYS, 'val.tile')
    train = opt.get('train')
    if not is_train or not isinstance(train, dict):
        return
    if dtkd:
        known = TRAIN_KEYS + (('augkd_opt',) if opt['model_type'] == 'AugKDModel' else ())
        check_keys(train, known, 'train')
        for name in ('pixel_opt', 'perceptual_opt', 'kd_opt'):
            if train.get(name) is not None:
                _check_loss_block(train[name], f'train.{name}')
    max_nonfinite_steps(train)
    kd_opt = train.get('kd_opt')
    if train.get('kd_schedule') is not None or kd_opt is not None:
        schedule = train.get('kd_schedule')
        if isinstance(schedule, dict):
            check_keys(schedule, ('type', 'start_iter', 'end_iter'), 'train.kd_schedule')
        weight = kd_opt.get('loss_weight', 1.0) if isinstance(kd_opt, dict) else 1.0
        try:
            KDWeightSchedule.from_options(schedule, weight, train.get('total_iter'))
        except ValueError as err:
            raise OptionError(str(err)) from None
    if opt['model_type'] == 'AugKDModel':
        from dtkd_model.augkd_model import AugKDModel

        AugKDModel._parse_augkd(train.get('augkd_opt'))


def check_paths(opt):
    """The data roots and files the data sets read exist (the data-set scan looks inside them)."""
    for phase, dopt in opt['datasets'].items():
        if dopt.get('type') not in PAIRED_DATASETS:
            continue
        lmdb = isinstance(dopt.get('io_backend'), dict) and dopt['io_backend'].get('type') == 'lmdb'
        for key in ('dataroot_gt', 'dataroot_lq', 'dataroot_teacher'):
            root = dopt.get(key)
            if root is None:
                continue
            if not isinstance(root, str):
                raise OptionError(f'datasets.{phase}.{key}: expected a path, got {root!r}')
            root = osp.expanduser(root)
            if not osp.isdir(root):
                raise OptionError(f'datasets.{phase}.{key}: {"LMDB" if lmdb else "folder"} {root!r} does not exist')
            if lmdb and not (osp.isfile(osp.join(root, 'data.mdb')) and osp.isfile(osp.join(root, 'meta_info.txt'))):
                raise OptionError(f'datasets.{phase}.{key}: {root!r} is not a complete LMDB '
                                  '(data.mdb and meta_info.txt expected)')
        meta = dopt.get('meta_info_file')
        if meta is not None and not lmdb and not osp.isfile(osp.expanduser(str(meta))):
            raise OptionError(f'datasets.{phase}.meta_info_file: file {meta!r} does not exist')


def check_checkpoint_file(path, key):
    """A checkpoint named by option ``key`` exists and holds weights only (its pickle is scanned, not loaded)."""
    from dtkd_arch.checkpoint import UnsafeCheckpointError, unsafe_globals

    if not osp.isfile(path):
        raise OptionError(f'{key}: checkpoint {path!r} does not exist')
    names = unsafe_globals(path)
    if names:
        raise UnsafeCheckpointError(f"{key}: checkpoint '{path}' was refused: it holds pickled Python objects "
                                    f"({', '.join(names[:5])}) besides weights, and loading them could run code; "
                                    'save the weights as a plain state dict')


def resolve_metric_weights(opt):
    """Stop now if a metric's weights are missing; drop optional metrics that cannot run."""
    from dtkd_metric.weights import resolve_metrics

    val = opt.get('val')
    if not val or not val.get('metrics'):
        return
    val['metrics'], warnings = resolve_metrics(val['metrics'])
    for warning in warnings:
        print(f'warning: {warning}', file=sys.stderr)


def init_distributed(launcher, dist_params=None):
    """Initialise torch.distributed for ``--launcher pytorch|slurm`` on GPU or CPU."""
    dist_params = dict(dist_params or {})
    backend = dist_params.pop('backend', None) or ('nccl' if torch.cuda.is_available() else 'gloo')
    if launcher == 'slurm':
        proc_id = int(os.environ['SLURM_PROCID'])
        ntasks = int(os.environ['SLURM_NTASKS'])
        node_list = os.environ['SLURM_NODELIST']
        import subprocess

        addr = subprocess.getoutput(f'scontrol show hostname {node_list} | head -n1')
        port = dist_params.pop('port', None)
        os.environ['MASTER_PORT'] = str(port or os.environ.get('MASTER_PORT', '29500'))
        os.environ['MASTER_ADDR'] = addr
        os.environ['WORLD_SIZE'] = str(ntasks)
        os.environ['RANK'] = str(proc_id)
        n_local = max(torch.cuda.device_count(), 1)
        os.environ['LOCAL_RANK'] = str(proc_id % n_local)
    elif launcher != 'pytorch':
        raise OptionError(f'--launcher: expected none, pytorch or slurm, got {launcher!r}')
    for var in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT'):
        if var not in os.environ:
            raise OptionError(f'--launcher {launcher}: environment variable {var} is not set; '
                              'start the job with torchrun (or srun for slurm)')
    if backend == 'nccl':
        local_rank = int(os.environ.get('LOCAL_RANK', os.environ['RANK']))
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    dist.init_process_group(backend=backend)


def parse_options(root_path, is_train=True, argv=None):
    """Drop-in replacement for ``basicsr.utils.options.parse_options`` (same flags, same result)."""
    from basicsr.utils import set_random_seed
    from basicsr.utils.dist_util import get_dist_info

    parser = argparse.ArgumentParser(prog='dtkd-train' if is_train else 'dtkd-test')
    parser.add_argument('-opt', type=str, required=True, help='Path to option YAML file.')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm'], default='none', help='job launcher')
    parser.add_argument('--auto_resume', action='store_true')
    parser.add_argument('--debug', action='store_true')
    parser.add_argument('--local_rank', type=int, default=0)
    parser.add_argument('--force_yml', nargs='+', default=None,
                        help='Override existing options, e.g. train:ema_decay=0.999')
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    opt = load_yaml(args.opt)
    apply_force_yml(opt, args.force_yml)
    validate_options(opt, is_train)
    check_paths(opt)
    resolve_metric_weights(opt)

    if args.launcher == 'none':
        opt['dist'] = False
    else:
        opt['dist'] = True
        init_distributed(args.launcher, opt.get('dist_params'))
    opt['rank'], opt['world_size'] = get_dist_info()

    seed = opt.get('manual_seed')
    if seed is None:
        seed = random.randint(1, 10000)
        opt['manual_seed'] = seed
    set_random_seed(seed + opt['rank'])

    opt['auto_resume'] = args.auto_resume
    opt['is_train'] = is_train
    if args.debug and not opt['name'].startswith('debug'):
        opt['name'] = 'debug_' + opt['name']
    if opt.get('num_gpu', 'auto') == 'auto':
        opt['num_gpu'] = torch.cuda.device_count()

    for phase, dataset in opt['datasets'].items():
        dataset['phase'] = phase.split('_')[0]
        if 'scale' in opt:
            dataset['scale'] = opt['scale']
        for key in ('dataroot_gt', 'dataroot_lq', 'dataroot_teacher'):
            if dataset.get(key) is not None:
                dataset[key] = osp.expanduser(dataset[key])

    for key, val in opt['path'].items():
        if val is not None and ('resume_state' in key or 'pretrain_network' in key):
            opt['path'][key] = osp.expanduser(val)
    opt['path'].setdefault('resume_state', None)

    if opt.get('dataset_check', 'quick') not in ('off', False):
        from dtkd_data.image_checks import check_datasets

        check_datasets(opt, mode=opt.get('dataset_check', 'quick'))

    if is_train:
        experiments_root = osp.join(root_path, 'experiments', opt['name'])
        opt['path']['experiments_root'] = experiments_root
        opt['path']['models'] = osp.join(experiments_root, 'models')
        opt['path']['training_states'] = osp.join(experiments_root, 'training_states')
        opt['path']['log'] = experiments_root
        opt['path']['visualization'] = osp.join(experiments_root, 'visualization')
        if 'debug' in opt['name']:
            if opt.get('val') is not None:
                opt['val']['val_freq'] = 8
            opt['logger']['print_freq'] = 1
            opt['logger']['save_checkpoint_freq'] = 8
    else:
        results_root = osp.join(root_path, 'results', opt['name'])
        opt['path']['results_root'] = results_root
        opt['path']['log'] = results_root
        opt['path']['visualization'] = osp.join(results_root, 'visualization')
    return opt, args


# BasicSR's schedulers keep their milestones in a Counter; allow it for weights-only loading.
torch.serialization.add_safe_globals([collections.Counter])


def load_resume_state(opt):
    """CPU-safe replacement for ``basicsr.train.load_resume_state``."""
    from basicsr.utils import check_resume, scandir

    resume_state_path = None
    if opt['auto_resume']:
        state_path = osp.join(opt['root_path'], 'experiments', opt['name'], 'training_states')
        if osp.isdir(state_path):
            states = [int(v.split('.state')[0]) for v in scandir(state_path, suffix='state')]
            if states:
                resume_state_path = osp.join(state_path, f'{max(states)}.state')
                opt['path']['resume_state'] = resume_state_path
    elif opt['path'].get('resume_state'):
        resume_state_path = opt['path']['resume_state']
        if not osp.isfile(resume_state_path):
            raise OptionError(f'path.resume_state: {resume_state_path!r} does not exist')

    if resume_state_path is None:
        return None
    from dtkd_arch.checkpoint import CheckpointFormatError, safe_torch_load

    resume_state = safe_torch_load(resume_state_path, what='training state', option_key='path.resume_state')
    if not isinstance(resume_state, dict) or not isinstance(resume_state.get('iter'), int):
        raise CheckpointFormatError(f"path.resume_state: '{resume_state_path}' is not a BasicSR training state")
    check_resume(opt, resume_state['iter'])
    return resume_state


def _user_errors():
    """Exceptions that describe bad input; they are printed as one line, without a traceback."""
    from dtkd_metric.perceptual_metric import WeightsLoadError
    from dtkd_metric.weights import MetricOptionError, MissingWeightsError

    return (OptionError, MissingWeightsError, MetricOptionError, WeightsLoadError)


def run(pipeline_module, pipeline_name, is_train):
    """Run a BasicSR pipeline with the DTKD classes registered and the safe hooks installed.

    Results go under the current working directory (``experiments/``, ``tb_logger/``, ``results/``).
    Option errors are printed as one line and exit with status 2 (no traceback).
    """
    register_all()
    user_errors = _user_errors()
    pipeline_module.parse_options = lambda root_path, is_train=is_train: parse_options(root_path, is_train)
    if is_train:
        pipeline_module.load_resume_state = load_resume_state
    from dtkd_model.safe_training import NonFiniteError

    try:
        getattr(pipeline_module, pipeline_name)(os.getcwd())
    except user_errors as err:
        print(f'error: {err}', file=sys.stderr)
        raise SystemExit(2) from None
    except NonFiniteError as err:
        print(f'error: {err}', file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
