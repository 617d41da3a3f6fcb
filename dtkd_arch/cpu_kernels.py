"""Compiled CPU kernels (C++), built on first use: fused window attention, LayerNorm, fully connected products
and the MLP with its GELU for FastSwinIR, and Winograd 3x3 convolutions for the ResShift teacher.

``window_attention(qkv, masks_t, pattern, heads, scale)`` computes ``softmax(q k^T scale + mask) v``
for every window and head of FastSwinIR's window-ordered token stream in one pass per window, head
after head, that stays in a core's L1/L2 cache (``dtkd_arch/csrc/cpu_kernels.cpp`` explains the layout),
with autograd: the backward recomputes the probabilities from a per-query maximum and normaliser
kept by the forward (as flash attention does) and also returns the gradient of the additive masks,
hence of the relative position bias tables. Compared with the PyTorch composition it replaces
(batched products, copies for the transposes, softmax, mask addition) it removes every
intermediate tensor; ``scripts/benchmark_student.py`` prints the speed with and without it.

``layer_norm(x, weight, bias, eps)`` is the LayerNorm of FastSwinIR's (tokens, channels) streams
with its backward, one pass over each row per direction.

``mlp_gelu(x, w1, b1, w2, b2)`` is a transformer block's MLP, ``fc2(GELU(fc1(x)))``, with fc1's GELU (and
in the backward its derivative) applied in the epilogue of the compiled matrix product
(``csrc/gemm_kernels.h``); the same product, ``torch.ops.dtkd_cpu.linear_rows``, is one of the
candidates :mod:`dtkd_arch.cpu_ops` times per layer shape for fully connected layers.

:class:`Conv2d` is ``nn.Conv2d`` (same parameters and state-dict keys) whose 3x3 convolutions with
stride 1 and padding 1 can run as Winograd F(2x2, 3x3) convolutions on fp32 CPU tensors: the
compiled input and output transforms (``csrc/winograd_kernels.h``) around one batched matrix
product per block of tiles, 2.25x fewer multiplications than a direct convolution and, measured
against float64, no less accurate (its transform coefficients are 0, +-1 and +-1/2). By default
('auto') a convolution whose input and output both have at least ``WINOGRAD_MIN_CHANNELS`` channels
runs as Winograd and the others in oneDNN's direct algorithm: a fixed rule, so that a process gives
the same outputs as the next (a teacher cache resumed by another process stays bit-identical).
'tuned' measures both once per input shape, the way :mod:`dtkd_arch.cpu_ops` tunes its fully
connected layers, and keeps the faster (not reproducible from one process to the next when the two
are about as fast); 'direct' and 'winograd' fix one (``DTKD_CPU_CONV`` or :func:`set_conv_algorithm`).
In training the gradient of the input is a 3x3 convolution too and goes the same way; the weight
gradient stays oneDNN's. Autocast, other dtypes, devices and convolution shapes use ``F.conv2d``.

The kernel is compiled with the system C++ compiler through ``torch.utils.cpp_extension`` the first
time it is needed (about 10-20 s on 2 cores), with ``-O3 -march=native``, into torch's extension
cache (``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``) under a name that holds a
hash of the CPU's feature flags and of the sources, so a cache shared between different CPUs never
serves a binary built for another instruction set (or torch version), and an edited kernel is always
rebuilt. Later processes load the cached library directly, in milliseconds.

If the build fails (no compiler, say), :func:`available` is False, FastSwinIR and the teacher fall
back to PyTorch attention and oneDNN convolutions (same results within float rounding, slower) and
one RuntimeWarning gives the compiler's message. ``DTKD_CPU_KERNELS=0`` (or :func:`set_enabled`)
switches the compiled kernels off without trying to build them.
"""
import hashlib
import logging
import math
import os
import platform
import threading
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from dtkd_arch import cpu_ops

_ENV = 'DTKD_CPU_KERNELS'
_CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'csrc')
_SOURCE = os.path.join(_CSRC, 'cpu_kernels.cpp')
_LANES = 8  # the kernel's vector width in floats: tokens per window must be a multiple of it

_lock = threading.Lock()
_state = {'loaded': None, 'error': None}  # loaded: None (not tried), True, False


def _enabled_from_environment():
    value = os.environ.get(_ENV, '1').strip().lower()
    if value not in ('0', '1', 'false', 'true', 'off', 'on', ''):
        raise ValueError(f'environment variable {_ENV}={os.environ[_ENV]!r}: use 1 (default) or 0')
    return value not in ('0', 'false', 'off')


_enabled = _enabled_from_environment()


def set_enabled(flag):
    """Use the compiled kernels (True, default) or always the PyTorch code (False). Returns the previous
    setting."""
    global _enabled
    previous, _enabled = _enabled, bool(flag)
    return previous


def enabled():
    return _enabled


def using_kernels(flag):
    """``set_enabled(flag)`` for the body of a ``with`` block, then the previous setting again."""
    return cpu_ops.scoped_setting(set_enabled, flag)


def build_name():
    """Extension name: the kernels' purpose plus a hash of the machine's architecture, its CPU flags, the torch
    version and the sources (headers included: torch's own rebuild check looks only at the listed source
    files). A library of that name, once built, is loaded without running the build tools again."""
    flags = ' '.join(sorted(cpu_ops._cpu_flags() or ()))
    digest = hashlib.sha1(f'{platform.machine()} {flags} {torch.__version__}'.encode())
    for name in sorted(os.listdir(_CSRC)):
        with open(os.path.join(_CSRC, name), 'rb') as f:
            digest.update(name.encode() + b'\0' + f.read())
    return f'dtkd_cpu_kernels_{digest.hexdigest()[:12]}'


def _build():
    # -fopenmp: at::parallel_for is an OpenMP region compiled into this library; the process already has
    # torch's libgomp.so.1 loaded, which the library then uses (same soname), so there is one thread pool.
    cflags = ['-O3', '-march=native', '-fno-math-errno', '-fopenmp']
    # cpp_extension logs a CUDA_HOME warning on CUDA builds of torch without a GPU; it is irrelevant here.
    logger = logging.getLogger('torch.utils.cpp_extension')
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
        name = build_name()
        build_dir = cpp_extension._get_build_directory(name, verbose=False)
        library = os.path.join(build_dir, f'{name}.so')
        if os.path.exists(library):  # built before from these very sources, flags and torch: just load it
            try:
                torch.ops.load_library(library)
                return
            except OSError:  # unusable (e.g. cut short): let the build below check and redo it
                pass
        logging.getLogger('basicsr').info('dtkd_arch.cpu_kernels: compiling the CPU kernels into %s (once per '
                                          'machine and version, about 20 s)', build_dir)
        source = _stage_sources(os.path.join(build_dir, 'src'))
        cpp_extension.load(name=name, sources=[source], extra_cflags=cflags, extra_ldflags=['-fopenmp'],
                           build_directory=build_dir, with_cuda=False, is_python_module=False, verbose=False)
    finally:
        logger.setLevel(level)


def _stage_sources(folder):
    """Copy the sources into the build directory (atomically, only where missing or different) and return
    the path of the main source there. The build then names the same paths from every checkout of the
    same sources, so two clones do not rebuild each other's library (ninja's build file holds the paths)."""
    os.makedirs(folder, exist_ok=True)
    for name in sorted(os.listdir(_CSRC)):
        with open(os.path.join(_CSRC, name), 'rb') as f:
            data = f.read()
        target = os.path.join(folder, name)
        try:
            with open(target, 'rb') as f:
                if f.read() == data:
                    continue
        except OSError:
            pass
        tmp = f'{target}.{os.getpid()}.tmp'
        with open(tmp, 'wb') as f:
            f.write(data)
        os.replace(tmp, target)
    return os.path.join(folder, os.path.basename(_SOURCE))


def load():
    """Build (first time) and load the kernels; True on success. Thread-safe; tried once per process."""
    if _state['loaded'] is None:
        with _lock:
            if _state['loaded'] is None:
                if hasattr(torch.ops, 'dtkd_cpu') and hasattr(torch.ops.dtkd_cpu, 'window_attention_forward'):
                    _state['loaded'] = True
                else:
                    try:
                        _build()
                        torch.ops.dtkd_cpu.window_attention_forward  # noqa: B018 (raises if not registered)
                        _state['loaded'] = True
                    except Exception as exc:  # compiler missing or failing: fall back, say why once
                        _state['loaded'] = False
                        _state['error'] = f'{type(exc).__name__}: {exc}'
                        warnings.warn(f'dtkd_arch.cpu_kernels: building {_SOURCE} failed, FastSwinIR and the ResShift '
                                      f'teacher use their slower PyTorch attention and oneDNN convolutions on the '
                                      f'CPU ({_state["error"][-2000:]}). Set {_ENV}=0 to skip the build.',
                                      RuntimeWarning, stacklevel=2)
    return _state['loaded']


def available():
    """True when the kernels are enabled and built (building them now if they were not tried yet)."""
    return _enabled and load()


def build_error():
    """The build's error message, or None."""
    return _state['error']


def supports(qkv, n, heads, dropout=0.):
    """Whether :func:`window_attention` handles this call: fp32 CPU tensors, N a multiple of 8, no
    attention dropout, not under ``torch.compile`` tracing, and the kernels available."""
    return (qkv.device.type == 'cpu' and qkv.dtype == torch.float32 and n % _LANES == 0 and dropout == 0
            and (qkv.shape[1] // 3) % heads == 0 and not torch.compiler.is_compiling() and available())


class _WindowAttention(torch.autograd.Function):

    @staticmethod
    def forward(ctx, qkv, masks_t, pattern, heads, scale):
        out, stats = torch.ops.dtkd_cpu.window_attention_forward(qkv, masks_t, pattern, heads, scale, True)
        ctx.save_for_backward(qkv, masks_t, pattern, stats, out)
        ctx.heads, ctx.scale = heads, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        qkv, masks_t, pattern, stats, out = ctx.saved_tensors
        grad_qkv, grad_masks = torch.ops.dtkd_cpu.window_attention_backward(
            grad_out.contiguous(), qkv, masks_t, pattern, stats, out, ctx.heads, ctx.scale, ctx.needs_input_grad[1])
        return (grad_qkv if ctx.needs_input_grad[0] else None,
                grad_masks if ctx.needs_input_grad[1] else None, None, None, None)


def window_attention(qkv, masks_t, pattern, heads, scale):
    """Fused window attention (call :func:`supports` first).

    qkv: (W * N, 3C) float32, rows window by window, columns q | k | v with heads of C / heads channels;
    masks_t: (P, heads, N, N) additive masks, transposed (``masks_t[g, h, j, i]`` is added to the score of
    query i and key j); pattern: (W,) int64 mask index of each window; scale: the factor of q k^T.
    Returns (W * N, C). Differentiable with respect to qkv and masks_t.
    """
    if not load():
        raise RuntimeError(f'dtkd_arch.cpu_kernels: the kernels are not built ({_state["error"]})')
    qkv = qkv.contiguous()
    masks_t = masks_t.contiguous()
    if torch.is_grad_enabled() and (qkv.requires_grad or masks_t.requires_grad):
        return _WindowAttention.apply(qkv, masks_t, pattern, heads, float(scale))
    out, _ = torch.ops.dtkd_cpu.window_attention_forward(qkv, masks_t, pattern, heads, float(scale), False)
    return out


def supports_tokens(x):
    """Whether :func:`layer_norm` handles ``x``: fp32 CPU, not under ``torch.compile``, kernels built."""
    return (x.device.type == 'cpu' and x.dtype == torch.float32 and not torch.compiler.is_compiling()
            and available())


class _LayerNorm(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        y, mean, rstd = torch.ops.dtkd_cpu.layer_norm_forward(x, weight, bias, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, mean, rstd = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx, dw, db = torch.ops.dtkd_cpu.layer_norm_backward(grad.contiguous(), x, mean, rstd, weight, need_w, need_b)
        return dx if need_x else None, dw if need_w else None, db if need_b else None, None


def layer_norm(x, weight, bias, eps):
    """``F.layer_norm(x, (C,), weight, bias, eps)`` for x (rows, C) float32 on the CPU (call
    :func:`supports_tokens` first); weight and bias (C,) or None. Differentiable."""
    x = x.contiguous()
    if torch.is_grad_enabled() and (x.requires_grad or any(t is not None and t.requires_grad for t in (weight, bias))):
        return _LayerNorm.apply(x, weight, bias, float(eps))
    return torch.ops.dtkd_cpu.layer_norm_forward(x, weight, bias, float(eps))[0]


# ---- The MLP of a transformer block: fc2(GELU(fc1(x))) ----

def supports_mlp(x, *weights):
    """Whether :func:`mlp_gelu` handles ``x`` (rows, C) and the layers' ``weights``: fp32 CPU tensors (contiguous
    weights), no autocast, not under ``torch.compile``, kernels built, weights small enough for the compiled
    product (at most ``cpu_ops.COMPILED_MAX_WEIGHT`` elements: it keeps a whole weight in L2)."""
    return (supports_tokens(x) and x.dim() == 2 and x.shape[0] > 0 and not torch.is_autocast_enabled('cpu')
            and all(w.device.type == 'cpu' and w.dtype == torch.float32 and w.is_contiguous()
                    and w.numel() <= cpu_ops.COMPILED_MAX_WEIGHT for w in weights))


class _MlpGelu(torch.autograd.Function):
    """fc2(GELU(fc1(x))) with fc1 and its GELU fused: the forward's GELU runs on fc1's products while they are in
    registers (``linear_gelu``, keeping the pre-activation h), and the backward's GELU derivative on the products
    ``grad @ fc2.weight`` (``linear_gelu_backward``), so neither makes a pass of its own over the (T, hidden)
    activations. fc2 and the weight and input gradients run in :mod:`dtkd_arch.cpu_ops` (tuned per shape)."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2):
        h, a = torch.ops.dtkd_cpu.linear_gelu(x, w1, b1, True)
        ctx.save_for_backward(x, h, a, w1, w2)
        ctx.has_bias = (b1 is not None, b2 is not None)
        return cpu_ops.linear_pass('forward', a, w2, b2 is not None, a, w2, b2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, h, a, w1, w2 = ctx.saved_tensors
        (has_b1, has_b2), need = ctx.has_bias, ctx.needs_input_grad
        grad = grad.contiguous()
        gw2, gb2 = cpu_ops.weight_and_bias_grads(a, w2, has_b2, grad, need[3], has_b2 and need[4])
        gx = gw1 = gb1 = None
        if need[0] or need[1] or need[2]:
            dh = torch.ops.dtkd_cpu.linear_gelu_backward(grad, w2.t().contiguous(), h)
            gw1, gb1 = cpu_ops.weight_and_bias_grads(x, w1, has_b1, dh, need[1], has_b1 and need[2])
            gx = cpu_ops.linear_pass('grad_input', x, w1, has_b1, dh, w1) if need[0] else None
        return gx, gw1, gb1, gw2, gb2


def mlp_gelu(x, w1, b1, w2, b2):
    """``F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)`` (exact GELU) for x (rows, C) on the CPU (call
    :func:`supports_mlp` first); differentiable. Without gradients the pre-activation is not kept."""
    x = x.contiguous()
    tensors = [t for t in (x, w1, b1, w2, b2) if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _MlpGelu.apply(x, w1, b1, w2, b2)
    a = torch.ops.dtkd_cpu.linear_gelu(x, w1, b1, False)[1]
    return cpu_ops.linear_pass('forward', a, w2, b2 is not None, a, w2, b2)


# ---- 3x3 convolutions as Winograd F(2x2, 3x3) ----

_CONV_ENV = 'DTKD_CPU_CONV'
_CONV_ALGORITHMS = ('auto', 'direct', 'winograd', 'tuned')
# 'auto': Winograd when input and output have at least this many channels (from scripts/benchmark_cpu_kernels.py:
# 1.25x to 2.1x faster than oneDNN at 60 to 640 channels on an AVX2 AMD EPYC; 3-channel image convolutions
# were faster direct)
WINOGRAD_MIN_CHANNELS = 16
_CONV_TRIALS = 3  # timed runs per algorithm when a shape is tuned (convolutions are long, their ratio large)
_PROBE_FLOP = 4e9  # a larger convolution is tuned on a strip of rows of its first image of about this much work
_BLOCK_TILES = 1024  # tiles per batched product, fewer for wide layers (see _block_rows)
_BLOCK_FLOATS = 1 << 21  # at most this many transformed input values (8 MiB) per block
_G = ((1., 0., 0.), (.5, .5, .5), (.5, -.5, .5), (0., 0., 1.))  # filter transform of F(2x2, 3x3)


_conv_algorithm = cpu_ops.choice_from_environment(_CONV_ENV, _CONV_ALGORITHMS)


def set_conv_algorithm(name):
    """How :class:`Conv2d` runs the 3x3 convolutions it can: 'auto' (Winograd when input and output have at
    least ``WINOGRAD_MIN_CHANNELS`` channels, else direct; default), 'direct' (``F.conv2d``), 'winograd' or
    'tuned' (the faster of the two, measured once per shape). Returns the previous setting."""
    global _conv_algorithm
    if name not in _CONV_ALGORITHMS:
        raise ValueError(f'convolution algorithm must be one of {_CONV_ALGORITHMS}, got {name!r}')
    previous, _conv_algorithm = _conv_algorithm, name
    return previous


def conv_algorithm():
    return _conv_algorithm


def using_conv_algorithm(name):
    """``set_conv_algorithm(name)`` for the body of a ``with`` block, then the previous setting again."""
    return cpu_ops.scoped_setting(set_conv_algorithm, name)


def winograd_weights(weight):
    """The transformed filters ``U = G g G^T`` of a (Co, Ci, 3, 3) weight, as (16, Co, Ci) float32 (computed
    in float64): position ``p = 4a + b`` of the 4x4 transformed tile is ``U[p]``."""
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f'winograd_weights: a (Co, Ci, 3, 3) weight expected, got {tuple(weight.shape)}')
    g = torch.tensor(_G, dtype=torch.float64, device=weight.device)
    u = torch.einsum('ak,oikl,bl->aboi', g, weight.detach().double(), g)
    return u.reshape(16, weight.shape[0], weight.shape[1]).float().contiguous()


def _block_rows(tiles_h, tiles_w, c):
    tiles = max(1, min(_BLOCK_TILES, _BLOCK_FLOATS // (16 * c)))
    return max(1, min(tiles_h, tiles // tiles_w))


def conv3x3_winograd(x, u, bias=None):
    """``F.conv2d(x, weight, bias, padding=1)`` for float32 CPU x (N, Ci, H, W), with ``u =
    winograd_weights(weight)``: per block of tile rows, the compiled input transform, one batched product
    ``M = U V`` and the compiled output transform (plus bias). Returns a contiguous (N, Co, H, W) tensor."""
    if not load():
        raise RuntimeError(f'dtkd_arch.cpu_kernels: the kernels are not built ({_state["error"]})')
    if x.dim() != 4 or u.dim() != 3 or u.shape[0] != 16 or u.shape[2] != x.shape[1]:
        raise ValueError(f'conv3x3_winograd: input (N, Ci, H, W) and transformed weights (16, Co, Ci) expected, '
                         f'got {tuple(x.shape)} and {tuple(u.shape)}')
    x = x.contiguous()
    n, c, h, w = x.shape
    co = u.shape[1]
    th, tw = (h + 1) // 2, (w + 1) // 2
    out = x.new_empty(n, co, h, w)
    if out.numel() == 0:
        return out
    block = _block_rows(th, tw, c)
    v_buf = x.new_empty(16 * c * block * tw)
    m_buf = x.new_empty(16 * co * block * tw)
    bias = None if bias is None else bias.detach().contiguous()
    for i in range(n):
        for r0 in range(0, th, block):
            rows = min(block, th - r0)
            t = rows * tw
            v = v_buf[:16 * c * t].view(16, c, t)
            torch.ops.dtkd_cpu.winograd_f2_input(x, i, r0, rows, v)
            m = m_buf[:16 * co * t].view(16, co, t)
            torch.bmm(u, v, out=m)
            torch.ops.dtkd_cpu.winograd_f2_output(m, bias, i, r0, rows, out)
    return out


def supports_conv3x3(x, weight, stride, padding, dilation, groups):
    """Whether :func:`conv3x3` can replace ``F.conv2d(x, weight, ..., stride, padding, dilation, groups)``: a 3x3
    float32 convolution on the CPU with stride 1, padding 1, no dilation or groups, outside autocast and
    ``torch.compile`` tracing, and the kernels built."""
    return (x.device.type == 'cpu' and x.dtype == torch.float32 and weight.dtype == torch.float32 and x.dim() == 4
            and tuple(weight.shape[2:]) == (3, 3) and tuple(stride) == (1, 1) and tuple(padding) == (1, 1)
            and tuple(dilation) == (1, 1) and groups == 1
            and not torch.is_autocast_enabled('cpu') and not torch.compiler.is_compiling() and available())


def _probe(x, out_channels):
    """What a convolution of x is tuned on: a strip of whole rows of its first image (the same tiles per row
    as x), at least one block of tile rows and about ``_PROBE_FLOP`` of direct-convolution work, when that is
    at most half of x; else None (x itself)."""
    n, c, h, w = x.shape
    flop_per_row = 18 * w * c * out_channels
    rows = max(2 * _block_rows((h + 1) // 2, (w + 1) // 2, c), 2 * math.ceil(_PROBE_FLOP / (2 * flop_per_row)))
    if 2 * rows > n * h:
        return None
    return (x[:1, :, :rows].contiguous(),)


def auto_conv_algorithm(in_channels, out_channels):
    """The algorithm of the 'auto' rule for a 3x3 convolution: 'winograd' when input and output both have at
    least ``WINOGRAD_MIN_CHANNELS`` channels, else 'direct'."""
    return 'winograd' if min(in_channels, out_channels) >= WINOGRAD_MIN_CHANNELS else 'direct'


def conv3x3(x, weight, bias, transformed):
    """``F.conv2d(x, weight, bias, padding=1)`` (no autograd) by the algorithm :func:`set_conv_algorithm` selects;
    'tuned' measures both once per (input shape, output channels, bias, threads). ``transformed()`` returns
    ``winograd_weights(weight)`` (called only when the Winograd algorithm runs)."""
    algorithm = _conv_algorithm
    if algorithm == 'auto':
        algorithm = auto_conv_algorithm(weight.shape[1], weight.shape[0])
    if algorithm == 'winograd':
        return conv3x3_winograd(x, transformed(), bias)
    if algorithm == 'direct':
        return F.conv2d(x, weight, bias, 1, 1)
    candidates = {'direct': lambda t: F.conv2d(t, weight, bias, 1, 1),
                  'winograd': lambda t: conv3x3_winograd(t, transformed(), bias)}
    key = (tuple(x.shape), weight.shape[0], bias is not None, torch.get_num_threads())
    return cpu_ops._tuned('conv3x3', key, candidates, x, trials=_CONV_TRIALS,
                          probe=lambda: _probe(x, weight.shape[0]))


class _Conv3x3(torch.autograd.Function):
    """:func:`conv3x3` with autograd: the gradient of the input is the 3x3 convolution of the output gradient
    with the filters flipped and transposed (run by :func:`conv3x3` too); the weight and bias gradients are
    oneDNN's (``aten.convolution_backward``)."""

    @staticmethod
    def forward(ctx, x, weight, bias, transformed):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return conv3x3(x, weight, bias, transformed)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = grad_w = grad_b = None
        if need_x:
            flipped = weight.flip(2, 3).transpose(0, 1).contiguous()
            grad_x = conv3x3(grad, flipped, None, lambda: winograd_weights(flipped))
        if need_w or (ctx.has_bias and need_b):
            _, grad_w, grad_b = torch.ops.aten.convolution_backward(
                grad, x, weight, [weight.shape[0]] if ctx.has_bias else None, [1, 1], [1, 1], [1, 1], False, [0, 0],
                1, [False, need_w, ctx.has_bias and need_b])
        return grad_x, grad_w, grad_b, None


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` whose 3x3 stride-1 padding-1 convolutions run, in fp32 on the CPU, as :func:`conv3x3_winograd`
    or oneDNN's direct convolution (see :func:`set_conv_algorithm`), in training too: the input gradient is such
    a convolution as well. Every other case is ``nn.Conv2d`` itself."""

    def forward(self, x):
        if (_conv_algorithm == 'direct' or self.padding_mode != 'zeros'
                or not supports_conv3x3(x, self.weight, self.stride, self.padding, self.dilation, self.groups)):
            return super().forward(x)
        params = (x, self.weight) if self.bias is None else (x, self.weight, self.bias)
        if torch.is_grad_enabled() and any(t.requires_grad for t in params):
            return _Conv3x3.apply(x, self.weight, self.bias, self._winograd_weights)
        return conv3x3(x, self.weight, self.bias, self._winograd_weights)

    def _winograd_weights(self):
        """:func:`winograd_weights` of the weight, cached while the weight tensor, its storage and its version
        are unchanged (``load_state_dict`` and optimiser steps edit it in place, ``.to()`` replaces it)."""
        weight = self.weight
        version = -1 if weight.is_inference() else weight._version
        key = (id(weight), weight.data_ptr(), version)
        cached = getattr(self, '_winograd_cache', None)
        if cached is None or cached[0] != key:
            cached = self._winograd_cache = (key, winograd_weights(weight))
        return cached[1]
