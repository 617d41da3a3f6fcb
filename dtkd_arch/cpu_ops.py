"""CPU kernels chosen for speed: fully connected layers through the faster of BLAS and oneDNN.

``torch.nn.functional.linear`` on the CPU calls the BLAS library torch was built with (MKL in the
official wheels). Which library is faster depends on the CPU and on the pass, and not by a little:

- On an AMD EPYC Zen 4 (AVX-512), MKL takes a slower code path: a 2048 x 2048 fp32 product runs at
  about 210 GFLOP/s while oneDNN's convolutions reach about 450, and a fully connected layer run as
  oneDNN's 1x1 convolution over a channels-last view of the same memory was about 2x faster than
  ``F.linear`` for the layer shapes of SwinIR-small and of ResShift's Swin blocks, forward and
  backward.
- On an AMD EPYC Zen 3 (AVX2 only) the 1x1 convolution is still about 1.1x faster forward (its bias
  is fused; ``F.linear`` copies the bias into the output first), but oneDNN's weight gradient of a
  1x1 convolution over one tall "image" is 2.4x to 7x slower than the BLAS product ``g^T x``
  (``scripts/benchmark_cpu_kernels.py`` prints these per layer shape and pass).

So by default (``'auto'``) each pass of each layer shape is measured once per process, the way
cuDNN's benchmark mode picks convolution algorithms: the first time a (pass, dtype, row count
rounded up to a power of two, input and output features, bias, threads, compiled kernels on or
off) combination runs, every
candidate runs once untimed and then ``_TRIALS`` times, interleaved, on the real data, and the
fastest (by its best time) is kept for the rest of the process; it then runs once more for the result,
so that measuring holds no more memory than a plain call. The passes and their candidates:

- forward: ``F.linear`` (BLAS), the 1x1 convolution (oneDNN) or, for fp32 where
  :mod:`dtkd_arch.cpu_kernels` is built and the weight has at most 2^17 elements, its compiled
  product (``csrc/gemm_kernels.h``, 'compiled');
- gradient of the input: ``g W`` as a BLAS product, as a 1x1 convolution with ``W^T`` or as the
  compiled product;
- gradient of the weight: ``g^T x`` as a BLAS product or oneDNN's convolution weight gradient;
- gradient of the bias: ``g.sum(0)`` (no choice).

All candidates compute the same products and sums, so results agree up to float rounding, but a
tuned run is not bitwise reproducible from one process to the next (the choice can differ when
two candidates are about as fast). ``set_linear_backend('blas')`` or ``'onednn'`` (or the
environment variable ``DTKD_CPU_LINEAR=blas|onednn|auto``) fixes the kernels for every layer,
process-wide: 'blas' is ``F.linear`` itself, 'onednn' the 1x1 convolution with autograd's own
convolution backward. :func:`linear_choices` lists what the tuner picked. GPUs, other dtypes and
code traced by ``torch.compile`` always use ``F.linear``.

bf16 on the CPU (:func:`cpu_supports_bf16`, :func:`warn_if_slow_bf16`): torch's bf16 kernels are
fast only on CPUs with bf16 matrix instructions (AVX512-BF16 or AMX). Elsewhere they fall back to
generic code; on an AVX2-only AMD EPYC (Zen 3), with torch 2.14.1 and 2 threads, a 3x3
convolution 160 -> 160 channels on 64x64 took 5.7 s in bf16 against 17 ms in fp32 (7.5x as long
channels-last), a fully connected layer 10x and a batched product 20x as long as in fp32,
FastSwinIR about 9x and one ResShift UNet call about 160x.
"""
import contextlib
import functools
import math
import os
import time
import warnings

import torch
import torch.nn.functional as F

_BACKENDS = ('auto', 'onednn', 'blas')
_ENV = 'DTKD_CPU_LINEAR'
_TRIALS = 5  # timed runs per candidate when a pass is tuned, after one untimed run (the best time counts)


def choice_from_environment(variable, choices):
    """The value of environment variable ``variable`` (lower-cased; unset or empty: ``choices[0]``), which must be
    one of ``choices``; a ValueError naming the variable otherwise."""
    name = os.environ.get(variable, '').strip().lower() or choices[0]
    if name not in choices:
        raise ValueError(f'environment variable {variable}={os.environ[variable]!r}: use one of {choices}')
    return name


_backend = choice_from_environment(_ENV, _BACKENDS)
_choices = {}  # tuning key -> name of the fastest candidate


def set_linear_backend(name):
    """Select how ``linear`` runs on the CPU: 'auto' (measured per layer shape, default), 'onednn'
    (1x1 convolution) or 'blas' (``F.linear``). Returns the previous setting."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f'linear backend must be one of {_BACKENDS}, got {name!r}')
    previous, _backend = _backend, name
    return previous


def linear_backend():
    return _backend


@contextlib.contextmanager
def scoped_setting(setter, value):
    """``setter(value)`` for the body of a ``with`` block, then the previous setting again; ``setter``
    returns the previous setting (as ``set_linear_backend`` and ``cpu_kernels.set_enabled`` do)."""
    previous = setter(value)
    try:
        yield
    finally:
        setter(previous)


def using_linear_backend(name):
    """``set_linear_backend(name)`` for the body of a ``with`` block, then the previous setting again."""
    return scoped_setting(set_linear_backend, name)


def linear_choices():
    """What the 'auto' backend picked so far: {(pass, dtype, rows, in, out, bias, threads, compiled): 'blas' |
    'onednn' | 'compiled'}.

    pass is 'forward', 'grad_input' or 'grad_weight'; rows is the row count rounded up to a power of two;
    compiled whether the compiled product was a candidate. The 3x3 convolutions of ``dtkd_arch.cpu_kernels``
    tuned as 'tuned' are listed here too, under the pass 'conv3x3'."""
    return dict(_choices)


def reset_linear_choices():
    """Forget the tuned choices (the next call of each pass measures again)."""
    _choices.clear()


@functools.lru_cache(maxsize=1)
def _cpu_flags():
    """The CPU feature flags from /proc/cpuinfo (x86 'flags', Arm 'Features'), or None where unknown."""
    try:
        with open('/proc/cpuinfo') as f:
            return parse_cpu_flags(f.read())
    except OSError:
        return None


def parse_cpu_flags(text):
    """The feature flags listed in /proc/cpuinfo text (a frozenset), or None if it lists none."""
    flags = set()
    for line in text.splitlines():
        key, _, value = line.partition(':')
        if key.strip() in ('flags', 'Features'):
            flags.update(value.split())
    return frozenset(flags) or None


def cpu_supports_bf16():
    """True when this CPU has native bf16 matrix instructions (x86 AVX512-BF16 or AMX, Arm BF16), so
    bf16 pays off; False when it has none or its features cannot be read."""
    return bool({'avx512_bf16', 'amx_bf16', 'bf16'} & (_cpu_flags() or set()))


def warn_if_slow_bf16(precision, device, option):
    """Warn (once per message) when ``precision`` is 'bf16' on a CPU known to lack bf16 instructions.

    option: what the user set, named in the message (e.g. 'sampler.precision'). Returns True if it warned.
    """
    if precision != 'bf16' or torch.device(device).type != 'cpu' or _cpu_flags() is None or cpu_supports_bf16():
        return False
    warnings.warn(f'{option}: bf16 on a CPU without bf16 matrix instructions (AVX512-BF16 or AMX): torch runs '
                  'bf16 convolutions and matrix products in slow generic code here, typically 7x to 300x slower '
                  'than fp32 (FastSwinIR about 9x, the ResShift UNet about 160x on an AVX2 CPU); use fp32 on '
                  'this machine', RuntimeWarning, stacklevel=3)
    return True


def _cpu_kernel_dtype(x):
    return (x.device.type == 'cpu' and x.dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)


def _image(rows):
    """(T, C) contiguous rows as the channels-last memory of a (1, C, T, 1) image (a view, no copy)."""
    t, c = rows.shape
    return rows.view(1, t, 1, c).permute(0, 3, 1, 2)


def _rows(image, lead):
    """(1, C, T, 1) convolution output back to (*lead, C) rows (a view when it is channels-last)."""
    return image.permute(0, 2, 3, 1).reshape(*lead, image.shape[1])


def _conv_linear(rows, weight, bias):
    out = F.conv2d(_image(rows), weight.view(weight.shape[0], weight.shape[1], 1, 1), bias)
    return _rows(out, rows.shape[:1])


def _conv_weight_grad(grad, rows, weight):
    w4 = weight.view(weight.shape[0], weight.shape[1], 1, 1)
    return torch.ops.aten.convolution_backward(_image(grad), _image(rows), w4, None, [1, 1], [0, 0], [1, 1], False,
                                               [0, 0], 1, [False, True, False])[1].view_as(weight)


def _compiled_linear(rows, weight, bias):
    return torch.ops.dtkd_cpu.linear_rows(rows, weight.contiguous(), None if bias is None else bias.contiguous())


# 'compiled': dtkd_arch.cpu_kernels' matrix product (csrc/gemm_kernels.h), a candidate where it is built, the rows
# are fp32 and the weight is small (``_candidates``). No compiled weight gradient: a kernel of the same design
# (2 x 6 x 16 register blocks over chunks of 128 rows) was no faster than MKL's g^T x for these layers on Zen 3.
_FORWARD = {'blas': F.linear, 'onednn': _conv_linear, 'compiled': _compiled_linear}
_GRAD_INPUT = {'blas': lambda g, w: torch.mm(g, w),
               'onednn': lambda g, w: _conv_linear(g, w.t().contiguous(), None),
               'compiled': lambda g, w: _compiled_linear(g, w.t().contiguous(), None)}
_GRAD_WEIGHT = {'blas': lambda g, x, w: torch.mm(g.t(), x), 'onednn': _conv_weight_grad}


COMPILED_MAX_WEIGHT = 1 << 17  # weight elements (512 KiB): the compiled product keeps the whole weight in L2


def _compiled_available(rows, weight):
    if rows.dtype != torch.float32 or weight.numel() > COMPILED_MAX_WEIGHT:
        return False
    from dtkd_arch import cpu_kernels  # imports this module: a top-level import would be circular
    return cpu_kernels.available()


def _candidates(table, compiled):
    """The kernels of ``table``, without the compiled one unless ``compiled`` (``_compiled_available``)."""
    if 'compiled' in table and not compiled:
        return {name: fn for name, fn in table.items() if name != 'compiled'}
    return table


def _tuned(name, key, candidates, *args, trials=_TRIALS, probe=None):
    """Run the fastest of ``candidates`` (name -> function) for ``key``, measuring them on first use
    (one untimed and ``trials`` timed runs each, interleaved; the best time counts). ``probe``: a function
    called only when measuring, returning other arguments to measure on (a smaller problem of the same
    kind) or None for ``args`` themselves."""
    key = (name,) + key
    choice = _choices.get(key)
    if choice in candidates:  # (a choice no longer among them, say compiled kernels since switched off: measure)
        return candidates[choice](*args)
    sample = (probe() if probe is not None else None) or args
    best = {}
    for fn in candidates.values():
        fn(*sample)  # the first call of a shape also builds oneDNN's kernel
    for _ in range(trials):
        for cand, fn in candidates.items():
            start = time.perf_counter()
            fn(*sample)  # the result is dropped at once: measuring holds no more memory than a plain call
            best[cand] = min(best.get(cand, math.inf), time.perf_counter() - start)
    choice = min(best, key=best.get)
    _choices[key] = choice
    return candidates[choice](*args)


def _table(name):
    """The candidates of pass ``name`` (looked up at each call, so that they can be replaced)."""
    return {'forward': _FORWARD, 'grad_input': _GRAD_INPUT, 'grad_weight': _GRAD_WEIGHT}[name]


def linear_pass(name, rows, weight, has_bias, *args):
    """One pass ('forward', 'grad_input' or 'grad_weight') of the fully connected layer with forward input
    ``rows`` (T, in) and ``weight`` (out, in), on ``args`` (as the kernels of ``_FORWARD``, ``_GRAD_INPUT``,
    ``_GRAD_WEIGHT`` take them), in the backend's kernel: for kernels that build a layer's backward themselves.
    'auto' shares its per-shape choices with :func:`linear`."""
    candidates = _table(name)
    if _backend == 'blas' or not _cpu_kernel_dtype(rows):
        return candidates['blas'](*args)
    if _backend != 'auto':
        return candidates[_backend](*args)
    return _tuned_pass(name, rows, weight, has_bias, *args)


def weight_and_bias_grads(rows, weight, has_bias, grad, need_weight, need_bias):
    """(gradient of the weight or None, gradient of the bias or None) of the fully connected layer with forward
    input ``rows`` (T, in), ``weight`` (out, in) and output gradient ``grad`` (T, out), in the backend's kernels."""
    grad_weight = linear_pass('grad_weight', rows, weight, has_bias, grad, rows, weight) if need_weight else None
    return grad_weight, (grad.sum(0) if need_bias else None)


def _tuned_pass(name, rows, weight, has_bias, *args):
    """``_tuned`` for one pass of the layer with forward input ``rows`` and ``weight``, among the candidates that
    can run it."""
    key = _key(rows, weight, has_bias)
    return _tuned(name, key, _candidates(_table(name), compiled=key[-1]), *args)


def _key(rows, weight, has_bias):
    """Tuning key of a layer: dtype, row count rounded up to a power of two, features, bias, threads, and whether
    the compiled kernels are candidates (so that a choice made with them switched off does not stick)."""
    bucket = 1 << max(0, (rows.shape[0] - 1).bit_length())
    return (rows.dtype, bucket, weight.shape[1], weight.shape[0], has_bias, torch.get_num_threads(),
            _compiled_available(rows, weight))


class _TunedLinear(torch.autograd.Function):
    """``F.linear`` on (T, in) rows whose forward and backward products each run the tuned kernel."""

    @staticmethod
    def forward(ctx, rows, weight, bias):
        ctx.save_for_backward(rows, weight)
        ctx.has_bias = bias is not None
        return _tuned_pass('forward', rows, weight, ctx.has_bias, rows, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        rows, weight = ctx.saved_tensors
        grad = grad.contiguous()
        grad_rows = None
        if ctx.needs_input_grad[0]:
            grad_rows = _tuned_pass('grad_input', rows, weight, ctx.has_bias, grad, weight)
        grad_weight, grad_bias = weight_and_bias_grads(rows, weight, ctx.has_bias, grad, ctx.needs_input_grad[1],
                                                       ctx.has_bias and ctx.needs_input_grad[2])
        return grad_rows, grad_weight, grad_bias


def linear(x, weight, bias=None):
    """``F.linear(x, weight, bias)`` (x: (..., in), weight: (out, in)) with the CPU kernels of the backend."""
    if (_backend == 'blas' or torch.compiler.is_compiling() or x.numel() == 0 or weight.dim() != 2
            or not _cpu_kernel_dtype(x)):
        return F.linear(x, weight, bias)
    lead = x.shape[:-1]
    c = x.shape[-1]
    rows = x.reshape(-1, c)
    if rows.stride(-1) != 1 or rows.stride(0) != c:
        rows = rows.contiguous()
    if _backend == 'onednn':
        return _conv_linear(rows, weight, bias).view(*lead, weight.shape[0])
    if torch.is_autocast_enabled('cpu'):
        # the autograd function below is opaque to autocast: cast as autocast casts F.linear's inputs
        dtype = torch.get_autocast_dtype('cpu')
        if dtype not in (torch.float32, torch.bfloat16):
            return F.linear(x, weight, bias)
        rows, weight = rows.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    if rows.dtype != weight.dtype or (bias is not None and bias.dtype != rows.dtype):
        return F.linear(x, weight, bias)  # let torch report (or handle) mixed dtypes
    needs_grad = torch.is_grad_enabled() and (rows.requires_grad or weight.requires_grad
                                              or (bias is not None and bias.requires_grad))
    if needs_grad:
        out = _TunedLinear.apply(rows, weight, bias)
    else:
        out = _tuned_pass('forward', rows, weight, bias is not None, rows, weight, bias)
    return out.view(*lead, weight.shape[0])


class Linear(torch.nn.Linear):
    """``nn.Linear`` (same parameters and state-dict keys) whose forward uses ``linear``."""

    def forward(self, x):
        return linear(x, self.weight, self.bias)
