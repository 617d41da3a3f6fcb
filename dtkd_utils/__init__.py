"""Helpers shared by every DTKD package: option files, devices and precisions, images.

The lowest layer of the project after ``dtkd_compat``: it imports no other DTKD package.
"""
import dtkd_compat  # noqa: F401  (must precede basicsr)
