"""Make basicsr 1.4.2 importable with current torchvision; share package auto-discovery, the
user-error types and atomic file writes.

Every DTKD package imports this module before anything from ``basicsr``.

basicsr 1.4.2 (``basicsr/data/degradations.py``) imports
``torchvision.transforms.functional_tensor``, a private module removed in torchvision 0.17.
Its only use there is ``rgb_to_grayscale``, which the public ``functional`` module still has, so
a module of the old name that re-exports it is enough.
"""
import importlib
import os
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
