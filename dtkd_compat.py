"""Make basicsr 1.4.2 importable with current torchvision, and share package auto-discovery.

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


class OptionError(ValueError):
    """Invalid user input (an option, a file, an image). The message names the offending key,
    file or image; the command-line entry points print it as one line, without a traceback."""
