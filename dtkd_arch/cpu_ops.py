"""CPU kernels chosen for speed: fully connected layers through oneDNN.

``torch.nn.functional.linear`` on the CPU calls the BLAS library torch was built with (MKL in the
official wheels). On AMD CPUs MKL takes a slower code path: on the AMD EPYC (Zen 4) machine of the
README's benchmarks a 2048 x 2048 fp32 product runs at about 210 GFLOP/s while oneDNN's 3x3
convolutions reach about 450. ``linear`` therefore runs a fully connected layer on token rows
``(..., C)`` as oneDNN's 1x1 convolution over a channels-last view of the same memory (no copy in
or out): the same products and sums, equal to ``F.linear`` up to float rounding, with gradients.
Measured there (``scripts/benchmark_student.py`` prints both variants): about 2x faster for the
layer shapes of SwinIR-small and of ResShift's Swin blocks, forward and backward.

``set_linear_backend('blas')`` (or the environment variable ``DTKD_CPU_LINEAR=blas``) restores
``F.linear`` everywhere (process-wide), e.g. to compare on another CPU; ``'onednn'`` is the default.
GPUs and other dtypes always use ``F.linear``.
"""
import contextlib
import os

import torch
import torch.nn.functional as F

_BACKENDS = ('onednn', 'blas')
_ENV = 'DTKD_CPU_LINEAR'


def _backend_from_environment():
    name = os.environ.get(_ENV, 'onednn').strip().lower() or 'onednn'
    if name not in _BACKENDS:
        raise ValueError(f'environment variable {_ENV}={os.environ[_ENV]!r}: use one of {_BACKENDS}')
    return name


_backend = _backend_from_environment()


def set_linear_backend(name):
    """Select how ``linear`` runs on the CPU: 'onednn' (1x1 convolution, default) or 'blas' (``F.linear``).

    Returns the previous setting."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f'linear backend must be one of {_BACKENDS}, got {name!r}')
    previous, _backend = _backend, name
    return previous


def linear_backend():
    return _backend


@contextlib.contextmanager
def using_linear_backend(name):
    """``set_linear_backend(name)`` for the body of a ``with`` block, then the previous setting again."""
    previous = set_linear_backend(name)
    try:
        yield
    finally:
        set_linear_backend(previous)


def _use_onednn(x):
    return (_backend == 'onednn' and x.device.type == 'cpu' and x.dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)


def linear(x, weight, bias=None):
    """``F.linear(x, weight, bias)`` (x: (..., in), weight: (out, in)); on the CPU through oneDNN."""
    if not _use_onednn(x) or x.numel() == 0 or weight.dim() != 2:
        return F.linear(x, weight, bias)
    lead = x.shape[:-1]
    c = x.shape[-1]
    rows = x.reshape(-1, c)
    if rows.stride(-1) != 1 or rows.stride(0) != c:
        rows = rows.contiguous()
    t = rows.shape[0]
    # (T, C) rows are the channels-last layout of a (1, C, T, 1) image.
    image = rows.view(1, t, 1, c).permute(0, 3, 1, 2)
    out = F.conv2d(image, weight.view(weight.shape[0], c, 1, 1), bias)
    return out.permute(0, 2, 3, 1).reshape(*lead, weight.shape[0])


class Linear(torch.nn.Linear):
    """``nn.Linear`` (same parameters and state-dict keys) whose forward uses ``linear``."""

    def forward(self, x):
        return linear(x, self.weight, self.bias)
