"""DTKD's command-line entry points (``dtkd-train``, ``dtkd-test``, ``dtkd-infer``) and BasicSR hooks.

The top layer: it imports the other DTKD packages, none of them imports it.

Importing this package is cheap (no torch, no basicsr): installed DTKD imports it at interpreter start-up
(``dtkd_basicsr.pth``, see :mod:`dtkd.basicsr_plugin`). It installs the import hook that loads
``dtkd_compat`` before ``basicsr`` (the torchvision shim basicsr 1.4.2 needs) and registers the DTKD
classes with BasicSR's registries once ``basicsr`` is imported.
"""
from dtkd import basicsr_plugin as _basicsr_plugin

_basicsr_plugin.install()
