"""DTKD's command-line entry points (``dtkd-train``, ``dtkd-test``, ``dtkd-infer``) and BasicSR hooks.

The top layer: it imports the other DTKD packages, none of them imports it.
"""
import dtkd_compat  # noqa: F401  (must precede basicsr)
