"""Devices and reduced precisions: the one device picker and precision check of the project."""
import functools
import warnings

import torch

from dtkd_compat import OptionError

PRECISIONS = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}


def pick_device(name, option='--device'):
    """'auto' or None (CUDA when available), 'cpu', 'cuda' or 'cuda:<i>' -> torch.device.

    Errors name ``option``, the key or flag the user set.
    """
    if name in (None, 'auto'):
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise OptionError(f"{option}: expected auto, cpu, cuda or cuda:<index>, got {name!r}") from None
    if device.type not in ('cpu', 'cuda'):
        raise OptionError(f'{option}: expected auto, cpu, cuda or cuda:<index>, got {name!r}')
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            raise OptionError(f'{option} {name}: CUDA is not available on this machine (use cpu)')
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise OptionError(f'{option} {name}: only {torch.cuda.device_count()} CUDA device(s) found')
    return device


def parse_cpu_flags(text):
    """The feature flags listed in /proc/cpuinfo text (a frozenset), or None if it lists none."""
    flags = set()
    for line in text.splitlines():
        key, _, value = line.partition(':')
        if key.strip() in ('flags', 'Features'):
            flags.update(value.split())
    return frozenset(flags) or None


@functools.lru_cache(maxsize=1)
def cpu_flags():
    """The CPU feature flags from /proc/cpuinfo (x86 'flags', Arm 'Features'), or None where unknown."""
    try:
        with open('/proc/cpuinfo') as f:
            return parse_cpu_flags(f.read())
    except OSError:
        return None


def cpu_supports_bf16():
    """True when this CPU has native bf16 matrix instructions (x86 AVX512-BF16 or AMX, Arm BF16)."""
    return bool({'avx512_bf16', 'amx_bf16', 'bf16'} & (cpu_flags() or set()))


def check_precision(precision, device, option):
    """Validate a precision ('fp32', 'bf16', 'fp16') for ``device``; returns it.

    fp16 autocast needs CUDA. bf16 on a CPU without bf16 instructions is allowed but warned about:
    torch then runs bf16 products in generic code, many times slower than fp32.
    """
    if precision not in PRECISIONS:
        raise OptionError(f'{option}: expected one of {", ".join(PRECISIONS)}, got {precision!r}')
    device = torch.device(device)
    if precision == 'fp16' and device.type != 'cuda':
        raise OptionError(f"{option}: 'fp16' autocast needs a CUDA device; use 'bf16' or 'fp32' on {device.type}")
    if precision == 'bf16' and device.type == 'cpu' and cpu_flags() is not None and not cpu_supports_bf16():
        warnings.warn(f'{option}: bf16 on a CPU without bf16 matrix instructions (AVX512-BF16 or AMX) runs in '
                      'slow generic code, typically many times slower than fp32; use fp32 on this machine',
                      RuntimeWarning, stacklevel=2)
    return precision


def autocast(precision, device):
    """``torch.autocast`` for a reduced precision, or a no-op context for fp32."""
    device = torch.device(device)
    return torch.autocast(device_type=device.type, dtype=PRECISIONS[precision], enabled=precision != 'fp32')
