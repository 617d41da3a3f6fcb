"""Load network weights from the checkpoint layouts this project meets, with errors that say what is wrong.

Handled layouts: a bare state dict (ResShift's released ``.pth`` files), one nested under
``'state_dict'`` (ResShift / Lightning training checkpoints), ``'params_ema'`` or ``'params'``
(BasicSR's ``save_network``), with keys possibly prefixed by ``module.`` (DataParallel /
DistributedDataParallel) or ``_orig_mod.`` (``torch.compile``).

Every file is read by :func:`safe_torch_load`: ``torch.load(weights_only=True)``, which rebuilds
tensors, numbers, strings and containers (and, here, plain numpy arrays) but never calls the
functions a pickle names. A file that names anything else (a checkpoint carrying pickled code)
is refused with :class:`UnsafeCheckpointError`, and nothing from it runs.
"""
import os
import pickle
import re

import numpy as np
import torch

from dtkd_compat import OptionError

# Wrapper keys in order of preference: BasicSR saves 'params_ema' next to 'params' and the EMA
# weights are the ones to evaluate.
_WRAPPER_KEYS = ('state_dict', 'params_ema', 'params')
_PREFIXES = ('module.', '_orig_mod.')

# How to obtain the files this project loads, for the not-found message.
_DOWNLOAD_HINTS = {
    'resshift_realsrx4_s15_v1.pth': 'download it from the ResShift release page '
                                    '(https://github.com/zsyOAOA/ResShift/releases, v2.0)',
    'autoencoder_vq_f4.pth': 'download it from the ResShift release page '
                             '(https://github.com/zsyOAOA/ResShift/releases, v2.0)',
}


class CheckpointMismatchError(OptionError):
    """The checkpoint's keys or tensor shapes do not match the network."""


class CheckpointFormatError(OptionError):
    """The file is not a state dict in one of the supported layouts."""


class UnsafeCheckpointError(CheckpointFormatError):
    """The file holds pickled Python objects other than weights (it could run code); it is not loaded."""


def _numpy_globals():
    """numpy's array, scalar and dtype constructors (pure data), under the names numpy 1.x and 2.x pickle them."""
    multiarray = getattr(np, '_core', getattr(np, 'core', None)).multiarray
    objs = [(multiarray._reconstruct, 'numpy.core.multiarray._reconstruct'),
            (multiarray._reconstruct, 'numpy._core.multiarray._reconstruct'),
            (multiarray.scalar, 'numpy.core.multiarray.scalar'),
            (multiarray.scalar, 'numpy._core.multiarray.scalar'),
            (np.ndarray, 'numpy.ndarray'), (np.dtype, 'numpy.dtype')]
    for code in '?bBhHiIlLqQefdgFDG':
        cls = type(np.dtype(code))
        objs.append((cls, f'numpy.dtypes.{cls.__name__}'))
    return objs


_SAFE_EXTRA = _numpy_globals()


def unsafe_globals(path):
    """Names of the Python objects the pickle in ``path`` refers to that weights-only loading refuses."""
    try:
        with torch.serialization.safe_globals(_SAFE_EXTRA):
            return list(torch.serialization.get_unsafe_globals_in_checkpoint(os.fspath(path)))
    except Exception:  # legacy (non-zip) files: the name comes from the loader's message instead
        return []


def safe_torch_load(path, what='checkpoint', option_key=None):
    """``torch.load(path, map_location='cpu', weights_only=True)`` with errors that say what is wrong.

    Tensors, numbers, strings, containers and plain numpy arrays load; nothing the file names is
    called. Raises FileNotFoundError (missing file), :class:`UnsafeCheckpointError` (the file holds
    pickled code or other objects) or :class:`CheckpointFormatError` (truncated or not a PyTorch file);
    the messages name the file and, when given, the option key that holds its path.
    """
    path = os.fspath(path)
    where = f'{option_key}: ' if option_key else ''
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{where}{what} '{path}' does not exist")
    try:
        with torch.serialization.safe_globals(_SAFE_EXTRA):
            return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as err:
        names = unsafe_globals(path) or re.findall(r'GLOBAL ([\w.]+)', str(err))[:1]
        if not names:  # not a refusal of some object: the pickle itself is damaged or not one
            detail = str(err).split('WeightsUnpickler error:')[-1].strip().splitlines()
            raise CheckpointFormatError(f"{where}{what} '{path}' cannot be read (corrupt or not a PyTorch file): "
                                        f"{detail[0] if detail else 'unreadable pickle'}") from None
        raise UnsafeCheckpointError(
            f"{where}{what} '{path}' was refused: it holds pickled Python objects ({', '.join(names[:5])}) besides "
            'weights, and loading them could run code. Only tensors, numbers, strings, containers and numpy arrays '
            'are read (torch.load weights_only=True); save the weights as a plain state dict.') from None
    except (RuntimeError, EOFError, ValueError, OSError, KeyError) as err:
        first = str(err).splitlines()[0] if str(err) else ''
        raise CheckpointFormatError(f"{where}{what} '{path}' cannot be read (truncated, corrupt or not a PyTorch "
                                    f'file): {first or "empty file"}') from None


def _strip_prefixes(key):
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                changed = True
    return key


def load_state_dict_file(path, what='checkpoint', option_key=None):
    """Read a state dict from ``path`` onto the CPU without unpickling arbitrary objects.

    Args:
        path (str | os.PathLike): checkpoint file.
        what (str): human name of the network, used in error messages (e.g. 'ResShift UNet').
        option_key (str | None): option that holds ``path`` (e.g. 'unet.ckpt'), named in errors.

    Returns:
        dict[str, Tensor]: keys without ``module.`` / ``_orig_mod.`` prefixes.

    Raises:
        FileNotFoundError: the file does not exist (the message says how to get it).
        CheckpointFormatError: the file holds no tensor dict in a known layout, or cannot be read.
        UnsafeCheckpointError: the file holds pickled objects other than weights (nothing is run).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        hint = _DOWNLOAD_HINTS.get(os.path.basename(path), 'check the path')
        where = f' and set {option_key}' if option_key else ''
        raise FileNotFoundError(f"{what} checkpoint '{path}' not found: {hint}{where}")
    state = safe_torch_load(path, what=f'{what} checkpoint', option_key=option_key)
    if isinstance(state, dict):
        for key in _WRAPPER_KEYS:
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointFormatError(
            f"{what} checkpoint '{path}' is not a state dict (expected a dict of tensors, possibly under one of "
            f'{list(_WRAPPER_KEYS)})')
    out = {}
    for key, value in state.items():
        new_key = _strip_prefixes(key)
        if new_key in out:
            raise CheckpointFormatError(f"{what} checkpoint '{path}' has key '{new_key}' twice after removing "
                                        f'{list(_PREFIXES)} prefixes')
        out[new_key] = value
    return out


def describe_mismatch(module_state, loaded):
    """Missing keys, unexpected keys and shape differences between two state dicts.

    Returns:
        tuple(list[str], list[str], list[str]): missing, unexpected and 'key: checkpoint (shape) vs
        network (shape)' lines, each sorted by the network's / checkpoint's key order.
    """
    missing = [k for k in module_state if k not in loaded]
    unexpected = [k for k in loaded if k not in module_state]
    shapes = [f'{k}: checkpoint {tuple(loaded[k].shape)} vs network {tuple(v.shape)}'
              for k, v in module_state.items() if k in loaded and tuple(loaded[k].shape) != tuple(v.shape)]
    return missing, unexpected, shapes


def load_pretrained(module, path, strict=True, what='network', option_key=None, limit=10):
    """Load ``path`` into ``module``; on disagreement raise an error that lists what differs.

    Args:
        module (nn.Module): network to fill.
        path (str | os.PathLike): checkpoint file (layouts as :func:`load_state_dict_file`).
        strict (bool): require exactly the same keys. Shape differences are always errors.
        what (str): human name of the network for messages.
        option_key (str | None): option holding the path, named in messages.
        limit (int): how many entries of each kind to print.

    Returns:
        The same module.

    Raises:
        FileNotFoundError, CheckpointFormatError: see :func:`load_state_dict_file`.
        CheckpointMismatchError: keys (strict) or shapes differ; message gives counts and the first
        ``limit`` of missing keys, unexpected keys and shape differences, and names the file.
    """
    state = load_state_dict_file(path, what=what, option_key=option_key)
    missing, unexpected, shapes = describe_mismatch(module.state_dict(), state)
    if shapes or (strict and (missing or unexpected)):
        lines = [f"{what} checkpoint '{os.fspath(path)}' does not match the network "
                 f'({type(module).__name__}):']
        for title, items in (('missing keys', missing), ('unexpected keys', unexpected),
                             ('shape differences', shapes)):
            if items:
                more = f' (first {limit})' if len(items) > limit else ''
                lines.append(f'  {len(items)} {title}{more}:')
                lines.extend(f'    {item}' for item in items[:limit])
        if option_key:
            lines.append(f'  check the network options next to {option_key}')
        raise CheckpointMismatchError('\n'.join(lines))
    module.load_state_dict(state, strict=strict)
    return module
