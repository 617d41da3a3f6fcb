"""Let BasicSR's own runner (``basicsr/train.py``, ``python -m basicsr.train``) find the DTKD classes.

BasicSR 1.4.2 has no plugin entry points: its registries (``ARCH_REGISTRY``, ``MODEL_REGISTRY``, ...)
are filled by importing the modules that define the classes. Installing DTKD (``pip install .`` or
``pip install -e .``) puts ``dtkd_basicsr.pth`` (a copy of ``dtkd/dtkd_basicsr.pth``) into site-packages.
At interpreter start-up its one line imports the ``dtkd`` package, unless ``DTKD_BASICSR_PLUGIN`` is
``0``/``false``/``no``/``off``, and ignores any error doing so. ``dtkd/__init__.py`` imports nothing
heavy (no torch, no basicsr): it calls :func:`install`, which puts :class:`BasicsrImportHook` first in
``sys.meta_path``. On the first import of ``basicsr`` the hook

1. imports ``dtkd_compat`` before ``basicsr/__init__.py`` runs, so that basicsr 1.4.2 can be imported
   with current torchvision (see there);
2. once ``basicsr`` is imported (its ``__init__`` imports ``basicsr.archs``, ``.data``, ``.losses``,
   ``.metrics`` and ``.models``, so every registry is filled), removes itself from ``sys.meta_path`` and
   imports :data:`PACKAGES`, so that the DTKD classes enter the registries (and lets ``torch.load``'s
   weights-only mode read the ``collections.Counter`` in BasicSR's training states).

When ``basicsr`` is first imported by a DTKD module (as in DTKD's own entry points), step 2 would import
DTKD packages while one of them is half imported; it is then left to the first registry look-up of a
name that is not registered (``Registry.get`` is wrapped for that) or to :func:`dtkd.launch.register_all`,
which DTKD's entry points call. A failure to register is reported as one warning; BasicSR keeps working.
"""
import importlib
import sys
import warnings

ENV_VAR = 'DTKD_BASICSR_PLUGIN'
# The packages whose modules register classes with BasicSR (dtkd.launch.register_all imports them too).
PACKAGES = ('dtkd_arch', 'dtkd_loss', 'dtkd_data', 'dtkd_metric', 'dtkd_model')
# What the hook waits for: basicsr's __init__ imports archs, data, losses, metrics and models.
TRIGGER = 'basicsr'

_state = {'registered': False, 'registering': False}


def _initializing(module):
    """Whether ``module`` is being imported right now (the flag CPython's import system keeps on the spec)."""
    return bool(getattr(getattr(module, '__spec__', None), '_initializing', False))


def dtkd_import_in_progress():
    """True while a DTKD module is half imported: importing the DTKD packages now could see it half done."""
    return any((name == 'dtkd' or name.startswith(('dtkd.', 'dtkd_'))) and _initializing(module)
               for name, module in list(sys.modules.items()))


def register():
    """Import :data:`PACKAGES` so the DTKD classes enter BasicSR's registries; tried once.

    Does nothing while a DTKD module is half imported (a later call does it) or while registering;
    a failure is reported as one warning and not retried.
    """
    if _state['registered'] or _state['registering'] or dtkd_import_in_progress():
        return
    _state['registering'] = True
    try:
        for name in PACKAGES:
            importlib.import_module(name)
        _allow_scheduler_states()
    except Exception as err:  # BasicSR must keep working without the DTKD classes
        warnings.warn(f'DTKD classes could not be registered with BasicSR ({type(err).__name__}: {err}); '
                      f'set {ENV_VAR}=0 to stop trying', RuntimeWarning, stacklevel=2)
    finally:
        _state['registering'] = False
        _state['registered'] = True  # done, or failed and reported once


def _allow_scheduler_states():
    """BasicSR keeps a MultiStepLR's milestones in a ``collections.Counter``: allow it in ``torch.load``'s
    weights-only mode (the default since torch 2.6), so that BasicSR's runner can read its training states."""
    import collections

    import torch

    add_safe_globals = getattr(torch.serialization, 'add_safe_globals', None)
    if add_safe_globals is not None:
        add_safe_globals([collections.Counter])


def _patch_registry():
    """Let a registry look-up that misses register the DTKD classes first (when that was deferred)."""
    registry = sys.modules.get('basicsr.utils.registry')
    cls = getattr(registry, 'Registry', None)
    if cls is None or getattr(cls.get, '_dtkd_hook', False):
        return
    original = cls.get

    def get(self, name, *args, **kwargs):
        if not _state['registered'] and name not in getattr(self, '_obj_map', {}):
            register()
        return original(self, name, *args, **kwargs)

    get._dtkd_hook = True
    get.__doc__, get.__wrapped__ = original.__doc__, original
    cls.get = get


def _before_basicsr():
    try:
        importlib.import_module('dtkd_compat')  # the torchvision shim basicsr 1.4.2 needs
    except Exception:  # basicsr then reports the missing module itself
        pass


def _after_basicsr():
    uninstall()
    _patch_registry()
    register()


class BasicsrImportHook:
    """A ``sys.meta_path`` finder that only acts on ``basicsr``: it asks the other finders for its spec
    and wraps the loader's ``exec_module`` with :func:`_before_basicsr` / :func:`_after_basicsr`."""

    def __init__(self):
        self._finding = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != TRIGGER or self._finding:
            return None
        self._finding = True
        try:
            spec = None
            for finder in list(sys.meta_path):
                find = getattr(finder, 'find_spec', None)
                if isinstance(finder, BasicsrImportHook) or find is None:
                    continue
                spec = find(fullname, path, target)
                if spec is not None:
                    break
        finally:
            self._finding = False
        loader = getattr(spec, 'loader', None)
        if loader is None or not hasattr(loader, 'exec_module'):
            return spec
        original = loader.exec_module

        def exec_module(module):
            try:
                del loader.exec_module  # one use: the loader is what it was again
            except AttributeError:
                pass
            _before_basicsr()
            original(module)
            _after_basicsr()

        try:
            loader.exec_module = exec_module
        except (AttributeError, TypeError):  # a loader without instance attributes: import it unhooked
            pass
        return spec

    def invalidate_caches(self):
        pass


def installed():
    """Whether the hook is in ``sys.meta_path`` (it leaves once basicsr is imported)."""
    return any(isinstance(finder, BasicsrImportHook) for finder in sys.meta_path)


def install():
    """Add the import hook to ``sys.meta_path`` (once). Does nothing when basicsr is already imported."""
    if TRIGGER in sys.modules or installed():
        return
    sys.meta_path.insert(0, BasicsrImportHook())


def uninstall():
    """Remove the hook from ``sys.meta_path``."""
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, BasicsrImportHook)]
