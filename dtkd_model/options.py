"""The option schema of the DTKD runners: required keys, the project's own blocks, paths.

:func:`validate_options` runs before any directory is made or data read: required keys, the keys of
the project's own blocks (``train.kd_opt``, ``train.kd_schedule``, ``train.augkd_opt``, ``teacher``,
``val.tile``, the data-set blocks, and for DTKD models the ``train``/``val``/top-level blocks: an
unknown key is an error that names it and suggests the closest valid one), and the checkpoints
(which must hold weights only). :func:`check_paths` checks the data roots.
"""
import difflib
import inspect
from os import path as osp

import torch

from dtkd_compat import OptionError
from dtkd_data.image_checks import PAIRED_DATASETS
from dtkd_data.realworld_degradation import check_degradation_options
from dtkd_model.kd_schedule import KDWeightSchedule
from dtkd_model.safe_training import max_nonfinite_steps
from dtkd_teacher.teacher import check_checkpoints, resolve_project_path
from dtkd_utils.options import check_keys, load_yaml
from dtkd_utils.options import require as _require


def _registered():
    """Import the DTKD packages whose classes the schema checks (losses, models)."""
    import dtkd_loss  # noqa: F401
    import dtkd_model  # noqa: F401


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


DTKD_MODELS = ('DTKDModel', 'AugKDModel', 'RealWorldDTKDModel')
TOP_KEYS = ('name', 'model_type', 'scale', 'num_gpu', 'manual_seed', 'datasets', 'network_g', 'path', 'train', 'val',
            'logger', 'dist_params', 'teacher', 'dataset_check', 'find_unused_parameters', 'degradation')
TRAIN_KEYS = ('ema_decay', 'optim_g', 'scheduler', 'total_iter', 'warmup_iter', 'pixel_opt', 'perceptual_opt',
              'kd_opt', 'kd_schedule', 'max_nonfinite_steps', 'channels_last', 'compile')
# train keys that are switches (docs/gpu_training.md): true or false, default false
TRAIN_SWITCHES = ('channels_last', 'compile')
VAL_KEYS = ('val_freq', 'save_img', 'suffix', 'pbar', 'metrics', 'tile', 'pad_multiple', 'model_label', 'kd_label')
TEACHER_KEYS = ('opt', 'precision')
TILE_KEYS = ('tile_size', 'tile_pad')
DATASET_KEYS = ('name', 'type', 'phase', 'scale', 'dataroot_gt', 'dataroot_lq', 'dataroot_teacher',
                'teacher_samples', 'io_backend',
                'meta_info_file', 'filename_tmpl', 'gt_size', 'use_hflip', 'use_rot', 'color', 'mean', 'std',
                'num_worker_per_gpu', 'batch_size_per_gpu', 'dataset_enlarge_ratio', 'prefetch_mode',
                'num_prefetch_queue', 'pin_memory', 'persistent_workers', 'use_shuffle')
DATASET_CHECK_MODES = ('quick', 'full', 'off')


def _check_loss_block(block, where):
    """A loss block: a registered ``type`` and only the keyword arguments its class takes."""
    from basicsr.utils.registry import LOSS_REGISTRY

    _registered()
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


def check_model_options(opt, is_train):
    """The values DTKDModel, AugKDModel and RealWorldDTKDModel depend on: task and KD loss blocks, the KD
    schedule, the teacher block, RealWorldDTKDModel's ``degradation`` block, ``val.tile``,
    ``train.max_nonfinite_steps`` and the switches ``train.channels_last`` and ``train.compile``. Called
    by :func:`check_project_blocks` (before anything is created) and by the models themselves (when
    another runner builds them)."""
    train = opt.get('train') or {}
    if is_train:
        if not train.get('pixel_opt'):
            raise OptionError('train.pixel_opt: DTKDModel needs a task loss (the paper uses L1Loss)')
        max_nonfinite_steps(train)
        for key in TRAIN_SWITCHES:
            value = train.get(key, False)
            if not isinstance(value, bool):
                raise OptionError(f'train.{key}: expected true or false, got {value!r}')
        kd_opt = train.get('kd_opt')
        if kd_opt is not None:
            if not isinstance(kd_opt, dict) or 'type' not in kd_opt:
                raise OptionError('train.kd_opt: expected a loss block with a type, e.g. {type: DWTKDLoss}')
            weight = kd_opt.get('loss_weight', 1.0)
            if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight < 0:
                raise OptionError(f'train.kd_opt.loss_weight: expected a number >= 0, got {weight!r}')
        schedule = train.get('kd_schedule')
        if schedule is not None and kd_opt is None:
            raise OptionError('train.kd_schedule: given without train.kd_opt (no distillation loss to schedule)')
        if kd_opt is not None:
            if isinstance(schedule, dict):
                check_keys(schedule, ('type', 'start_iter', 'end_iter'), 'train.kd_schedule')
            try:
                KDWeightSchedule.from_options(schedule, kd_opt.get('loss_weight', 1.0), train.get('total_iter'))
            except ValueError as err:
                raise OptionError(str(err)) from None
    teacher = opt.get('teacher')
    if opt.get('model_type') == 'RealWorldDTKDModel':
        check_degradation_options(opt.get('degradation'), opt.get('scale'))
        if is_train and train.get('kd_opt') is not None and teacher is None:
            raise OptionError('teacher: RealWorldDTKDModel distils from an online teacher (its LQ is made on the '
                              'fly, so there are no cached teacher outputs); add a teacher block, e.g. '
                              '{opt: options/teacher/sinsr_realsr_x4.yml}, or remove train.kd_opt')
    if teacher is not None:
        check_keys(teacher, TEACHER_KEYS, 'teacher')
        if not isinstance(teacher.get('opt'), str):
            raise OptionError('teacher.opt: expected the path of a teacher option file, '
                              'e.g. options/teacher/resshift_realsr_x4.yml')
    tile = (opt.get('val') or {}).get('tile')
    if tile is not None:
        check_keys(tile, TILE_KEYS, 'val.tile')
        if not isinstance(tile.get('tile_size'), int) or tile['tile_size'] <= 0:
            raise OptionError('val.tile.tile_size: expected a positive integer (LR pixels)')
        if not isinstance(tile.get('tile_pad', 0), int) or tile.get('tile_pad', 0) < 0:
            raise OptionError('val.tile.tile_pad: expected an integer >= 0 (LR pixels)')


def check_project_blocks(opt, is_train):
    """Unknown keys and values of the project's own option blocks, named with the closest valid key."""
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
    val = opt.get('val')
    if val is not None and not isinstance(val, dict):
        raise OptionError('val: expected a mapping')
    if dtkd and val is not None:
        check_keys(val, VAL_KEYS, 'val')
    train = opt.get('train')
    if dtkd and is_train and isinstance(train, dict):
        known = TRAIN_KEYS + (('augkd_opt',) if opt['model_type'] == 'AugKDModel' else ())
        check_keys(train, known, 'train')
        for name in ('pixel_opt', 'perceptual_opt', 'kd_opt'):
            if train.get(name) is not None:
                _check_loss_block(train[name], f'train.{name}')
    if dtkd:
        check_model_options(opt, is_train)
        if opt['model_type'] != 'RealWorldDTKDModel' and 'degradation' in opt:
            raise OptionError('degradation: only model_type RealWorldDTKDModel makes its LQ on the fly')
    elif is_train and isinstance(train, dict):
        max_nonfinite_steps(train)
    if opt['model_type'] == 'AugKDModel' and is_train and isinstance(train, dict):
        from dtkd_model.augkd_model import AugKDModel

        AugKDModel._parse_augkd(train.get('augkd_opt'))
    teacher = opt.get('teacher')  # last: the option keys are reported before missing weights
    if teacher is not None:
        if not dtkd:
            check_keys(teacher, TEACHER_KEYS, 'teacher')
        teacher_file = resolve_project_path(str(teacher.get('opt')))
        load_yaml(teacher_file, key='teacher.opt')  # as the teacher loader opens it
        try:
            check_checkpoints(teacher_file)
        except OptionError as err:
            raise type(err)(f'teacher.opt {teacher_file}: {err}') from None


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


