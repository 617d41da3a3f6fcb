"""Make basicsr 1.4.2 importable with current torchvision; share package auto-discovery, the
user-error types and atomic file writes.

Every DTKD package imports this module before anything from ``basicsr``.

basicsr 1.4.2 (``basicsr/data/degradations.py``) imports
``torchvision.transforms.functional_tensor``, a private module removed in torchvision 0.17.
Its only use there is ``rgb_to_grayscale``, which the public ``functional`` module still has, so
a module of the old name that re-exports it is enough.
"""
import fnmatch
import importlib
import os
import signal
import sys
import types

_LEGACY = 'torchvision.transforms.functional_tensor'


def _install_functional_tensor_shim():
    if _LEGACY in sys.modules:
        return
    try:
        importlib.import_module(_LEGACY)
        return
    except ImportError:
        pass
    from torchvision.transforms import functional as tvf

    shim = types.ModuleType(_LEGACY)
    shim.rgb_to_grayscale = tvf.rgb_to_grayscale
    sys.modules[_LEGACY] = shim


_install_functional_tensor_shim()


def import_modules(package_name, package_file, suffix):
    """Import every ``*<suffix>.py`` module beside ``package_file`` so its classes register.

    Mirrors BasicSR's convention: files named by role (``_arch.py``, ``_loss.py``, ...) are
    discovered automatically. Returns the imported modules, sorted by file name.
    """
    folder = os.path.dirname(os.path.abspath(package_file))
    names = sorted(f[:-3] for f in os.listdir(folder) if f.endswith(suffix + '.py'))
    return [importlib.import_module(f'{package_name}.{name}') for name in names]


# ---------------------------------------------------------------------------------------------- fault injection
FAULT_ENV = 'DTKD_FAULT_INJECT'
_fault_counts = {}


def fault_point(name):
    """A named place where the crash tests (``tests/test_crash_*.py``) make the process die; no effect
    unless the environment variable ``DTKD_FAULT_INJECT`` is set.

    ``DTKD_FAULT_INJECT=<pattern>[@<n>]``: the process sends itself SIGKILL the ``n``-th time (default
    1st, counted per process) it reaches a point whose name matches the ``fnmatch`` pattern. Points:

    - ``atomic_write.before_replace:<file name>``: :func:`atomic_write` has written, flushed and
      fsynced the temporary file and is about to rename it over ``<file name>`` (checkpoints,
      training states, teacher-cache PNGs and ``meta_info.txt``, YAML, result images);
    - ``save_training_state.saved:<iter>``: the training state of iteration ``<iter>`` is complete
      (:mod:`dtkd_model.safe_training`);
    - ``teacher_cache.before_commit``, ``teacher_cache.committed``: an LMDB teacher-cache transaction
      holds its entries but is not committed / has been committed (:mod:`dtkd_teacher.cache`).
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    pattern, _, nth = spec.partition('@')
    if not fnmatch.fnmatchcase(name, pattern):
        return
    _fault_counts[pattern] = _fault_counts.get(pattern, 0) + 1
    if _fault_counts[pattern] >= int(nth or 1):
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def atomic_write(path, data, fsync=True, tmp_prefix='.', tmp_suffix=None):
    """Write ``path`` so that it is at every moment either the old file or the complete new one.

    ``data`` is bytes, a str (written as UTF-8) or a callable that writes into the binary file object
    it gets (``lambda f: torch.save(obj, f)``). It goes to ``<tmp_prefix><name><tmp_suffix>`` in the
    same folder (suffix default ``.<pid>.tmp``), is flushed (and fsynced unless ``fsync`` is false) and
    renamed over ``path``; on any error the temporary file is removed. Missing folders are created.
    """
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f'{tmp_prefix}{name}{f".{os.getpid()}.tmp" if tmp_suffix is None else tmp_suffix}')
    try:
        with open(tmp, 'wb') as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode('utf-8') if isinstance(data, str) else data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        fault_point(f'atomic_write.before_replace:{name}')
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class OptionError(ValueError):
    """The base of every user error: invalid input (an option, a file, an image, a checkpoint).

    The message names the offending key, file or image and says what was expected; every
    command-line entry point prints it as one line, without a traceback, and exits with status 2.
    """


class MissingFileError(OptionError, FileNotFoundError):
    """A file the user must bring (weights, data, an option file) is absent; the message names the
    file, the option that points at it and where to get it."""
