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

Before anything is created, :func:`dtkd_model.options.validate_options` checks the options (see
there) and :func:`dtkd_model.options.check_paths` the paths; then
:func:`dtkd_data.image_checks.check_datasets` scans the data sets (``dataset_check: quick`` by default,
``full`` to decode every image, ``off``) and reports every bad image at once.
"""
import argparse
import collections
import copy
import importlib
import os
import random
import sys
import time
from os import path as osp

import torch
import torch.distributed as dist
import yaml

from dtkd.basicsr_plugin import PACKAGES
from dtkd_compat import OptionError
from dtkd_model.options import check_paths, validate_options
from dtkd_utils.options import load_yaml


def register_all():
    """Import every DTKD package so its classes enter BasicSR's registries (errors propagate)."""
    for name in PACKAGES:
        importlib.import_module(name)


def apply_force_yml(opt, entries):
    """Apply ``--force_yml a:b:c=value`` overrides. Values are parsed as YAML scalars/lists.

    The path up to the last key must exist; the last key may be new (e.g.
    ``val:metrics:lpips:optional=true``): the option checks that follow refuse keys a block does not
    know. Unlike BasicSR, nothing is evaluated.
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
            last = i == len(keys) - 1
            if not isinstance(node, dict) or (key not in node and not last):
                raise OptionError(f'--force_yml {entry!r}: option {":".join(keys[:i + 1])!r} does not exist '
                                  '(a new key can only be added to an existing block)')
            if last:
                node[key] = value
            else:
                node = node[key]


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


_EFFECTIVE = []  # the options as run: the file with --force_yml applied, before runtime entries are added


def save_effective_options(opt_file, experiments_root):
    """Replacement for BasicSR's ``copy_opt_file``: save the options the run really uses (``--force_yml``
    applied) under the option file's name, with the command line, so ``-opt`` of the run reproduces it."""
    from dtkd_compat import atomic_write

    header = (f'# Options of this run: {opt_file} with the command line overrides applied.\n'
              f'# Written: {time.asctime()}\n# Command: {" ".join(sys.argv)}\n\n')
    body = yaml.safe_dump(_EFFECTIVE[0] if _EFFECTIVE else load_yaml(opt_file), sort_keys=False)
    atomic_write(osp.join(experiments_root, osp.basename(opt_file)), header + body)


def test_options_of_training_file(opt, opt_file, root_path):
    """``dtkd-test -opt <training option file>``: evaluate the run's checkpoint on its validation sets.

    The training data set and block are dropped; the checkpoint is ``path.pretrain_network_g`` if set,
    else the run's latest (``experiments/<name>/models/net_g_latest.pth``).
    """
    opt = dict(opt)
    opt['datasets'] = {k: v for k, v in (opt.get('datasets') or {}).items() if k.split('_')[0] != 'train'}
    if not opt['datasets']:
        raise OptionError(f'-opt {opt_file}: a training option file without a validation data set '
                          '(datasets.val) has nothing to test')
    opt.pop('train', None)
    opt['path'] = dict(opt.get('path') or {})
    opt['path'].pop('resume_state', None)
    if not opt['path'].get('pretrain_network_g'):
        name = str(opt.get('name'))
        looked = [osp.join(root_path, 'experiments', name, 'models', 'net_g_latest.pth'),
                  osp.join(osp.dirname(osp.abspath(opt_file)), 'models', 'net_g_latest.pth')]
        found = [p for p in looked if osp.isfile(p)]
        if not found:
            raise OptionError(f'-opt {opt_file}: no checkpoint to test: path.pretrain_network_g is not set and '
                              f'the run has no latest checkpoint (looked for {" and ".join(looked)})')
        opt['path']['pretrain_network_g'] = found[0]
    return opt


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
    # action='extend': a second --force_yml adds its entries (as the missing-weights hint tells users to
    # do) instead of silently replacing the first one's, which argparse's default 'store' would do.
    parser.add_argument('--force_yml', nargs='+', action='extend', default=None,
                        help='Override existing options, e.g. train:ema_decay=0.999 (repeatable)')
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    opt = load_yaml(args.opt)
    apply_force_yml(opt, args.force_yml)
    if not is_train and 'train' in opt:
        opt = test_options_of_training_file(opt, args.opt, root_path)
    validate_options(opt, is_train)
    check_paths(opt)
    resolve_metric_weights(opt)
    _EFFECTIVE[:] = [copy.deepcopy(opt)]  # what copy_opt_file saves with a training run

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


def run(pipeline_module, pipeline_name, is_train):
    """Run a BasicSR pipeline with the DTKD classes registered and the safe hooks installed.

    Results go under the current working directory (``experiments/``, ``tb_logger/``, ``results/``).
    Option errors are printed as one line and exit with status 2 (no traceback).
    """
    register_all()
    pipeline_module.parse_options = lambda root_path, is_train=is_train: parse_options(root_path, is_train)
    if is_train:
        pipeline_module.load_resume_state = load_resume_state
        pipeline_module.copy_opt_file = save_effective_options
    from dtkd_model.safe_training import NonFiniteError

    try:
        getattr(pipeline_module, pipeline_name)(os.getcwd())
    except OptionError as err:
        print(f'error: {err}', file=sys.stderr)
        raise SystemExit(2) from None
    except NonFiniteError as err:
        print(f'error: {err}', file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
