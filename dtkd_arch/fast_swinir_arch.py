"""FastSwinIR: BasicSR's SwinIR with the same weights, rearranged for speed.

SwinIR (Liang et al., "SwinIR: Image Restoration Using Swin Transformer", ICCVW 2021,
https://github.com/JingyunLiang/SwinIR) as packaged by BasicSR (``basicsr.archs.swinir_arch.SwinIR``).
``FastSwinIR`` takes the same constructor arguments and has the same state-dict keys and shapes, so
checkpoints load both ways with ``strict=True``; in fp32 its outputs match BasicSR's within float
rounding (about 1e-6 for images in [0, 1]).

What is different is only how the numbers are moved around:

- Tokens stay in one flat ``(tokens, C)`` stream whose order is "window by window". Every
  operation of a Swin block except attention is per token, so the order does not matter to them;
  going from a regular to a shifted block is a single row gather (the cyclic roll and the window
  partition in one step) instead of roll, partition, head split, merge, reverse and roll back.
- Attention on the CPU in fp32 runs in a compiled C++ kernel (``dtkd_arch.cpu_kernels``: one pass
  per window and head in a core's L1 cache, forward and backward, mask gradients included) when
  the window has a multiple of 8 tokens and the kernel could be built. Otherwise (no compiler,
  7 x 7 windows, bf16) attention on the CPU (``window_attention_cpu``) runs over chunks of windows
  small enough for their scores to stay in a core's cache, with every matrix product arranged so
  that its output has N = window_size^2 columns rather than the head dimension (10 for the paper's
  student): the value product is computed as ``O^T = v^T P^T``. This is several times faster than
  both the plain ``P v`` and torch's fused CPU attention kernel, whose tiles suit long sequences.
  On GPUs attention runs in ``scaled_dot_product_attention``.
- The relative position bias and the shift mask are folded into one additive mask per head. The
  windows of a shifted block are ordered as interior, last window row, last window column, corner:
  each of these four groups shares one shift pattern, so each group needs only one
  ``(heads, N, N)`` mask whatever the image size. Without gradients the folded masks are cached
  and rebuilt when the bias table changes (its ``_version`` or storage changes, e.g. after an
  optimizer step or ``load_state_dict``). Tokens of different regions of a shifted window get
  -inf rather than BasicSR's -100 (weights of exactly 0 instead of about 1e-44, denormal floats).
- Without the compiled kernel, training on the CPU in fp32 uses a custom autograd function
  (``_WindowAttentionFunction``) whose backward returns the gradient of the folded masks (the sum
  of the score gradients over windows and images), which torch's fused kernels do not give; it
  keeps the probabilities, as autograd does for BasicSR's attention. Elsewhere (GPU, reduced
  precision, attention dropout) attention with gradients for the bias tables is computed
  explicitly in one batched computation per block: the windows-then-images order lets one
  ``(windows, heads, N, N)`` mask broadcast over the batch.
- Gathers between token orders are permutations: their backward is the inverse gather rather than
  autograd's scatter-add; stochastic depth and the residual sum are one ``addcmul``.
- ``use_checkpoint=True`` checkpoints each block (BasicSR's version of this option fails).
- Convolutions run on channels-last tensors, which are the token stream itself (no copies).
- On the CPU in fp32, window attention (windows of a multiple of 8 tokens) and LayerNorm run in
  compiled kernels (``dtkd_arch/cpu_kernels.py``, C++ built on first use); without a compiler they
  run in the PyTorch code described above.
- Any input size: the input is reflect-padded to a multiple of the window size and the output is
  cropped back, as the official SwinIR test code does (``check_image_size``).
- Reduced precision: ``precision='bf16'`` (CPUs with AMX/AVX512-BF16, recent GPUs) or ``'fp16'``
  (GPUs) runs the forward under ``torch.autocast``; outputs are returned in the input dtype.
  Accuracy check (``tests/test_fast_swinir.py``, ``scripts/benchmark_student.py``): bf16 output
  against fp32 on skimage.data photographs (64x64 LR) has a PSNR of about 55 dB with BasicSR's
  initialisation and about 51 dB with randomised weights (required: at least 45 dB).
- ``use_compile=True`` compiles the token-wise parts of the Swin blocks with ``torch.compile``, as
  functions that take the weights as arguments, so that one compiled graph serves all blocks
  (optional, never required; on the CPUs measured here it gave no speed-up).
"""
import math
import warnings
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as torch_checkpoint
from basicsr.utils.registry import ARCH_REGISTRY

from dtkd_arch import cpu_kernels
from dtkd_arch.cpu_ops import Linear, cpu_supports_bf16, warn_if_slow_bf16  # noqa: F401 (re-export)

PRECISIONS = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}
UPSAMPLERS = ('pixelshuffle', 'pixelshuffledirect', 'nearest+conv', '')
RESI_CONNECTIONS = ('1conv', '3conv')
# Value BasicSR's SwinIR puts between tokens of different regions of a shifted window.
_SHIFT_MASK_VALUE = -100.0
_PLAN_CACHE_SIZE = 4
_MASK_CACHE_SIZE = 4


def _to_2tuple(value):
    if isinstance(value, (tuple, list)):
        return tuple(value)
    return (value, value)


def _norm(module, x):
    """``module(x)`` for a norm layer on a (T, C) stream; nn.LayerNorm over C runs in the compiled CPU kernel
    (``cpu_kernels.layer_norm``) where it applies (fp32 on the CPU)."""
    if (type(module) is nn.LayerNorm and x.dim() == 2 and module.normalized_shape == (x.shape[1],)
            and cpu_kernels.supports_tokens(x)):
        return cpu_kernels.layer_norm(x, module.weight, module.bias, module.eps)
    return module(x)


def _drop_path_factor(drop_prob, training, batch, dtype, device):
    """Stochastic depth drawn exactly as BasicSR/timm draw it, or None when it is off: one
    ``torch.rand((batch, 1, 1))`` per call, ``keep = floor(keep_prob + rand)``; returns keep / keep_prob
    as a (1, batch, 1, 1) per-image factor."""
    if drop_prob == 0. or not training:
        return None
    keep_prob = 1 - drop_prob
    random_tensor = keep_prob + torch.rand((batch, 1, 1), dtype=dtype, device=device)
    random_tensor.floor_()
    return (random_tensor / keep_prob).view(1, batch, 1, 1)


def _residual(x, y, factor, batch, tokens_per_window):
    """``x + y * factor`` per image (``factor`` from ``_drop_path_factor``; None: ``x + y``).

    x, y: (T, C) window-ordered streams, T = windows * batch * tokens_per_window. The scaling and the
    residual sum are one ``addcmul``, which saves two passes over the stream forward and one backward;
    the result differs from BasicSR's two-step scaling by float rounding only.
    """
    if factor is None:
        return x + y
    c = y.shape[-1]
    out = torch.addcmul(x.view(-1, batch, tokens_per_window, c), y.view(-1, batch, tokens_per_window, c), factor)
    return out.view(-1, c)


def _add_drop_path(x, y, drop_prob, training, batch, tokens_per_window):
    """``x + drop_path(y)``: one stochastic depth draw (``_drop_path_factor``), then ``_residual``."""
    factor = _drop_path_factor(drop_prob, training, batch, y.dtype, y.device)
    return _residual(x, y, factor, batch, tokens_per_window)


def _block_qkv(x, norm_weight, norm_bias, eps, qkv_weight, qkv_bias):
    """LayerNorm then the qkv projection: the token-wise part of a Swin block before attention."""
    return F.linear(F.layer_norm(x, (x.shape[-1],), norm_weight, norm_bias, eps), qkv_weight, qkv_bias)


def _block_rest(x, attn_out, proj_weight, proj_bias, norm_weight, norm_bias, eps, fc1_weight, fc1_bias, fc2_weight,
                fc2_bias, factor1, factor2, batch, tokens_per_window):
    """The token-wise part of a Swin block after attention: projection, residual, LayerNorm, MLP, residual."""
    x = _residual(x, F.linear(attn_out, proj_weight, proj_bias), factor1, batch, tokens_per_window)
    h = F.layer_norm(x, (x.shape[-1],), norm_weight, norm_bias, eps)
    h = F.linear(F.gelu(F.linear(h, fc1_weight, fc1_bias)), fc2_weight, fc2_bias)
    return _residual(x, h, factor2, batch, tokens_per_window)


_COMPILED_PARTS = {}


def compiled_block_parts():
    """``torch.compile`` of ``_block_qkv`` and ``_block_rest``, made once per process and shared by every block
    of every FastSwinIR with ``use_compile=True``: the weights are arguments, so the compiled code is guarded on
    shapes and dtypes only, not on a block (compiling the blocks' own methods would compile and guard each
    block separately and soon hit dynamo's recompile limit)."""
    if not _COMPILED_PARTS:
        _COMPILED_PARTS['qkv'] = torch.compile(_block_qkv)
        _COMPILED_PARTS['rest'] = torch.compile(_block_rest)
    return _COMPILED_PARTS['qkv'], _COMPILED_PARTS['rest']


def shift_patterns(window_size, shift_size, value=float('-inf')):
    """The four shift masks of a shifted-window block, (4, N, N) float32 with entries 0 or ``value``.

    Index 0: interior windows (all zero), 1: windows of the last window row (not the corner), 2: windows
    of the last window column (not the corner), 3: the corner window. With the cyclic shift, the last
    window row holds ``window_size - shift_size`` rows of one image region and ``shift_size`` rows of
    another; tokens of different regions must not attend to each other (Liu et al., Swin Transformer,
    ICCV 2021, section 3.2). BasicSR adds -100 there, which leaves weights of about 1e-44 (denormal
    floats, slow on CPUs); the default -inf makes them exact zeros, a difference far below float
    rounding of the outputs.
    """
    ws, s = window_size, shift_size
    r = torch.arange(ws)
    split = (r >= ws - s).long() + 1  # region 1 or 2 along one axis inside the last window row/column
    zero = torch.zeros(ws, dtype=torch.long)
    row_ids = [zero, split, zero, split]
    col_ids = [zero, zero, split, split]
    out = []
    for rid, cid in zip(row_ids, col_ids):
        region = (rid[:, None] * 3 + cid[None, :]).reshape(-1)
        diff = region[:, None] != region[None, :]
        out.append(torch.where(diff, torch.tensor(float(value)), torch.tensor(0.0)))
    return torch.stack(out)


def basicsr_attn_mask(input_resolution, window_size, shift_size):
    """The ``attn_mask`` buffer BasicSR's SwinTransformerBlock stores, (nW, N, N) for ``input_resolution``."""
    h, w = input_resolution
    img_mask = torch.zeros((h, w))
    slices = (slice(0, -window_size), slice(-window_size, -shift_size), slice(-shift_size, None))
    cnt = 0
    for hs in slices:
        for wsl in slices:
            img_mask[hs, wsl] = cnt
            cnt += 1
    win = img_mask.view(h // window_size, window_size, w // window_size, window_size).permute(0, 2, 1, 3)
    win = win.reshape(-1, window_size * window_size)
    diff = win.unsqueeze(1) - win.unsqueeze(2)
    return diff.masked_fill(diff != 0, _SHIFT_MASK_VALUE).masked_fill(diff == 0, 0.0)


def relative_position_index(window_size):
    """(N, N) index into the (2*ws-1)^2 bias table, as in Swin Transformer / SwinIR."""
    coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing='ij'))
    coords = coords.flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += window_size - 1
    rel[:, :, 1] += window_size - 1
    rel[:, :, 0] *= 2 * window_size - 1
    return rel.sum(-1)


class _TokenPlan:
    """Token orders for one (batch, height, width, device): gathers between raster and window orders.

    A window order lists windows group by group (see ``shift_patterns``), then images, then the tokens
    of a window row by row, so that ``stream.view(windows * batch, N, C)`` is a batch of windows and
    each group of windows is one contiguous slice of rows.
    """

    def __init__(self, batch, height, width, window_size, shift_size, device):
        self.batch, self.height, self.width = batch, height, width
        self.tokens_per_window = window_size * window_size
        self.order = {}  # layout -> raster index of each stream row
        self.groups = {}  # layout -> [(start_row, stop_row, pattern_index)]
        self.window_keys = {}  # layout -> (windows,) pattern index of each window, in stream order
        self.window_patterns = {}  # layout -> (windows * batch,) int64 pattern index of each window of the stream
        shifts = [0] + ([shift_size] if shift_size > 0 else [])
        for layout, shift in enumerate(shifts):
            self.order[layout], self.groups[layout], self.window_keys[layout] = self._window_order(
                window_size, shift, device)
            self.window_patterns[layout] = self.window_keys[layout].repeat_interleave(batch)
        inverse = {}
        for layout, idx in self.order.items():
            inv = torch.empty_like(idx)
            inv[idx] = torch.arange(idx.numel(), device=device)
            inverse[layout] = inv
        self.enter = self.order  # raster -> layout
        self.leave = inverse  # layout -> raster
        self.switch = {}
        for a in self.order:
            for b in self.order:
                if a != b:
                    self.switch[(a, b)] = inverse[a][self.order[b]]

    def _window_order(self, ws, shift, device):
        b, h, w = self.batch, self.height, self.width
        nh, nw = h // ws, w // ws
        wi, wj = torch.meshgrid(torch.arange(nh), torch.arange(nw), indexing='ij')
        wi, wj = wi.reshape(-1), wj.reshape(-1)
        if shift > 0:
            key = (wi == nh - 1).long() + 2 * (wj == nw - 1).long()
        else:
            key = torch.zeros_like(wi)
        perm = torch.argsort(key, stable=True)
        wi, wj, key = wi[perm], wj[perm], key[perm]
        r, c = torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing='ij')
        # A token at (row, col) of the rolled image comes from ((row + shift) % h, (col + shift) % w).
        rows = (wi[:, None] * ws + r.reshape(1, -1) + shift) % h
        cols = (wj[:, None] * ws + c.reshape(1, -1) + shift) % w
        pix = rows * w + cols  # (nW, N)
        idx = pix[:, None, :] + (torch.arange(b) * h * w)[None, :, None]
        groups = []
        rows_per_window = b * ws * ws
        start = 0
        for g in range(4):
            count = int((key == g).sum())
            if count:
                groups.append((start * rows_per_window, (start + count) * rows_per_window, g))
                start += count
        return idx.reshape(-1).to(device), groups, key.to(device)


class _PermuteRows(torch.autograd.Function):
    """``x.index_select(0, order)`` for a permutation ``order``, whose backward is the inverse gather.

    Autograd's own backward of ``index_select`` is a scatter-add (``index_add``), several times slower
    than a gather on CPUs; for a permutation the inverse gather gives the same gradient exactly.
    """

    @staticmethod
    def forward(ctx, x, order, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, order)

    @staticmethod
    def backward(ctx, grad):
        inverse, = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def _permute_rows(x, order, inverse):
    if torch.is_grad_enabled() and x.requires_grad:
        return _PermuteRows.apply(x, order, inverse)
    return x.index_select(0, order)


_CHUNK_ELEMENTS = 1 << 19  # attention scores per chunk of windows (2 MiB in fp32: they stay in a core's cache)
# False: CPUs take the device-independent attention path (scaled_dot_product_attention, or the explicit
# computation when the bias tables need gradients), as GPUs do; the tests use it to check that path on CPUs.
_CPU_ATTENTION = True


def _chunk_windows(heads, n):
    return max(1, _CHUNK_ELEMENTS // (heads * n * n))


def _chunks(qkv, groups, n, heads, scale):
    """Chunks of windows for the CPU attention loops: yields (w0, w1, pattern, q_t, k_t, v_t).

    Windows ``w0:w1`` share one shift pattern and fit in cache (``_CHUNK_ELEMENTS``); q_t, k_t, v_t
    are one contiguous (3, windows * heads, d, N) copy of their q (already times ``scale``), k and v,
    each transposed (d x N).
    """
    d = qkv.shape[1] // 3 // heads
    step = _chunk_windows(heads, n)
    for start, stop, g in groups:
        for w0 in range(start // n, stop // n, step):
            w1 = min(w0 + step, stop // n)
            qkv_t = qkv[w0 * n:w1 * n].view(w1 - w0, n, 3, heads, d).permute(2, 0, 3, 4, 1).contiguous()
            q_t, k_t, v_t = qkv_t.view(3, (w1 - w0) * heads, d, n).unbind(0)
            q_t.mul_(scale)
            yield w0, w1, g, q_t, k_t, v_t


def _chunk_probabilities(q_t, k_t, mask, windows, heads, n, out=None):
    """softmax(q k^T + mask) for one chunk, (windows * heads, N, N); q_t is already scaled."""
    s = torch.bmm(q_t.transpose(1, 2), k_t, out=out)
    s.view(windows, heads, n, n).add_(mask)
    return torch.softmax(s, -1, out=s)


def window_attention_cpu(qkv, masks, groups, n, heads, scale, keep_probabilities=False):
    """Window attention on the CPU without autograd: ``softmax(q k^T scale + mask) v`` for every window.

    qkv: (T, 3C) window-ordered output of the qkv projection; masks: (patterns, heads, N, N) additive
    masks (bias plus shift pattern); groups: [(start_row, stop_row, pattern)]. Returns (T, C), and with
    ``keep_probabilities`` also the attention probabilities (windows * heads, N, N).

    Windows are processed in chunks whose scores fit in a core's cache, and every product is laid
    out so that its output has N (not the head dimension d, typically 10 to 32) columns: the value
    product is computed as ``O^T = v^T P^T``. For small d this is several times faster than both
    ``P v`` and the fused CPU attention kernel, whose tiles are sized for long sequences.
    """
    t, c3 = qkv.shape
    c = c3 // 3
    d = c // heads
    out = qkv.new_empty(t // n, n, heads, d)
    probs = qkv.new_empty(t // n * heads, n, n) if keep_probabilities else None
    for w0, w1, g, q_t, k_t, v_t in _chunks(qkv, groups, n, heads, scale):
        p = _chunk_probabilities(q_t, k_t, masks[g], w1 - w0, heads, n,
                                 out=None if probs is None else probs[w0 * heads:w1 * heads])
        o_t = torch.bmm(v_t, p.transpose(1, 2))  # (windows * heads, d, N)
        out[w0:w1].copy_(o_t.view(w1 - w0, heads, d, n).permute(0, 3, 1, 2))
    out = out.view(t, c)
    return (out, probs) if keep_probabilities else out


class _WindowAttentionFunction(torch.autograd.Function):
    """``window_attention_cpu`` with autograd, including the gradient of the additive masks.

    The gradient of the masks (hence of the relative position bias tables) is the sum over windows and
    images of the score gradients ``dS``; torch's fused attention kernels do not return it. Forward
    as ``window_attention_cpu``, keeping the probabilities ``P`` (as autograd keeps them for BasicSR's
    attention); the backward takes each chunk's q, k, v copies again and computes ``dV^T = dO^T P``,
    ``dP = dO v^T``, ``dS = P * (dP - rowsum(P * dP))``, ``dQ^T = k^T dS^T`` and ``dK^T = q^T dS``,
    all with N output columns (see ``window_attention_cpu``).

    Args of ``apply``: qkv (T, 3C), masks (patterns, heads, N, N) (may require gradients), groups
    [(start_row, stop_row, pattern)], tokens per window N, heads, scale. Returns (T, C).
    """

    @staticmethod
    def forward(ctx, qkv, masks, groups, n, heads, scale):
        out, probs = window_attention_cpu(qkv, masks, groups, n, heads, scale, keep_probabilities=True)
        ctx.save_for_backward(qkv, probs)
        ctx.groups, ctx.n, ctx.heads, ctx.scale = groups, n, heads, scale
        ctx.mask_grad = ctx.needs_input_grad[1]
        ctx.mask_shape = masks.shape
        return out

    @staticmethod
    def backward(ctx, grad_out):
        qkv, probs = ctx.saved_tensors
        groups, n, heads, scale = ctx.groups, ctx.n, ctx.heads, ctx.scale
        t, c3 = qkv.shape
        c = c3 // 3
        d = c // heads
        grad_qkv = qkv.new_empty(t // n, n, 3, heads, d)
        grad_masks = qkv.new_zeros(ctx.mask_shape) if ctx.mask_grad else None
        grad_out = grad_out.view(t // n, n, heads, d)
        for w0, w1, g, q_t, k_t, v_t in _chunks(qkv, groups, n, heads, scale):
            w = w1 - w0
            p = probs[w0 * heads:w1 * heads]
            go_t = grad_out[w0:w1].permute(0, 2, 3, 1).reshape(w * heads, d, n)
            grads = qkv.new_empty(3, w * heads, d, n)
            torch.bmm(go_t, p, out=grads[2])  # dV^T
            ds = torch.bmm(go_t.transpose(1, 2), v_t)  # dP
            ds = torch._softmax_backward_data(ds, p, -1, p.dtype)  # dS = P * (dP - rowsum(P * dP))
            if grad_masks is not None:
                grad_masks[g] += ds.view(w, heads, n, n).sum(0)
            torch.bmm(k_t, ds.transpose(1, 2), out=grads[0]).mul_(scale)  # dQ^T
            torch.bmm(q_t, ds, out=grads[1])  # dK^T (q_t holds q * scale)
            grad_qkv[w0:w1].copy_(grads.view(3, w, heads, d, n).permute(1, 4, 0, 2, 3))
        return grad_qkv.view(t, c3), grad_masks, None, None, None, None


class _Mlp(nn.Module):

    def __init__(self, in_features, hidden_features, act_layer=nn.GELU, drop=0.):
        super().__init__()
        self.fc1 = Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        """x: (T, C) token stream. Exact GELU without dropout runs as one fused CPU kernel where it applies
        (``cpu_kernels.mlp_gelu``)."""
        fc1, fc2 = self.fc1, self.fc2
        if (type(self.act) is nn.GELU and self.act.approximate == 'none' and (self.drop.p == 0 or not self.training)
                and cpu_kernels.supports_mlp(x, fc1.weight, fc2.weight)):
            return cpu_kernels.mlp_gelu(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias)
        return self.drop(fc2(self.drop(self.act(fc1(x)))))


class _WindowAttention(nn.Module):
    """Window attention with relative position bias; parameters named as in BasicSR's WindowAttention."""

    def __init__(self, dim, window_size, num_heads, qkv_bias=True, qk_scale=None, attn_drop=0., proj_drop=0.):
        super().__init__()
        self.dim = dim
        self.window_size = (window_size, window_size)
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim**-0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1)**2, num_heads))
        self.register_buffer('relative_position_index', relative_position_index(window_size))
        self.qkv = Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=.02)
        self._mask_cache = OrderedDict()

    def relative_bias(self):
        """(heads, N, N) relative position bias, differentiable w.r.t. the table."""
        n = self.window_size[0] * self.window_size[1]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        return bias.permute(2, 0, 1)

    def folded_masks(self, patterns, dtype, device, differentiable, transposed=False):
        """Additive masks (patterns, heads, N, N), bias plus shift pattern, for pattern indices 0..3.

        patterns: (4, N, N) shift patterns or None for a block without shift (then one mask). Without
        ``differentiable`` the masks are cached until the bias table changes. ``transposed``: each
        (N, N) mask transposed (key by query, contiguous), as the compiled CPU kernel reads them.
        """
        if differentiable:
            masks = self._fold(patterns, dtype, device)
            return masks.transpose(-2, -1).contiguous() if transposed else masks
        table, index = self.relative_position_bias_table, self.relative_position_index
        key = (patterns is not None, dtype, device, transposed, table.data_ptr(), table._version, index.data_ptr(),
               index._version)
        masks = self._mask_cache.get(key)
        if masks is None:
            # Cached tensors must outlive an inference_mode() call and serve later autograd calls.
            with torch.inference_mode(False), torch.no_grad():
                masks = self._fold(patterns, dtype, device)
                if transposed:
                    masks = masks.transpose(-2, -1).contiguous()
            self._mask_cache[key] = masks
            while len(self._mask_cache) > _MASK_CACHE_SIZE:
                self._mask_cache.popitem(last=False)
        else:
            self._mask_cache.move_to_end(key)
        return masks

    def _fold(self, patterns, dtype, device):
        bias = self.relative_bias().float().unsqueeze(0)
        if patterns is not None:
            bias = bias + patterns.to(device=device).unsqueeze(1)
        return bias.to(device=device, dtype=dtype).contiguous()

    @torch.compiler.disable  # Python loops and caches: torch.compile would recompile them per block
    def attend(self, qkv, groups, patterns, tokens_per_window, window_keys, batch, window_patterns=None):
        """Attention over windows of a window-ordered stream.

        qkv: (T, 3C) output of the qkv projection; groups: [(start, stop, pattern)] row slices;
        window_keys: (windows,) pattern index of each window; window_patterns: (windows * batch,) int64
        pattern index of each window of the stream (``_TokenPlan.window_patterns``; needed by the
        compiled CPU kernel). Returns (T, C) in the same token order.
        """
        n = tokens_per_window
        c = qkv.shape[1] // 3
        heads = self.num_heads
        table = self.relative_position_bias_table
        grad = torch.is_grad_enabled() and (qkv.requires_grad or table.requires_grad)
        dropout = self.attn_drop.p if self.training else 0.
        if _CPU_ATTENTION and window_patterns is not None and cpu_kernels.supports(qkv, n, heads, dropout):
            masks_t = self.folded_masks(patterns, qkv.dtype, qkv.device, transposed=True,
                                        differentiable=grad and table.requires_grad)
            return cpu_kernels.window_attention(qkv, masks_t, window_patterns, heads, self.scale)
        if qkv.device.type == 'cpu' and dropout == 0 and _CPU_ATTENTION:
            if not grad:
                masks = self.folded_masks(patterns, qkv.dtype, qkv.device, differentiable=False)
                return window_attention_cpu(qkv, masks, groups, n, heads, self.scale)
            if qkv.dtype == torch.float32:
                masks = self.folded_masks(patterns, qkv.dtype, qkv.device, differentiable=table.requires_grad)
                return _WindowAttentionFunction.apply(qkv, masks, groups, n, heads, self.scale)
        if grad and table.requires_grad:
            return self._attend_explicit(qkv, window_keys, patterns, n, batch)
        masks = self.folded_masks(patterns, qkv.dtype, qkv.device, differentiable=False)
        outs = []
        for start, stop, g in groups:
            q, k, v = qkv[start:stop].view(-1, n, 3, heads, c // heads).unbind(2)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (windows, heads, N, d) views
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=masks[g:g + 1], dropout_p=dropout,
                                                 scale=self.scale)
            outs.append(out.transpose(1, 2).reshape(-1, c))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _attend_explicit(self, qkv, window_keys, patterns, n, batch):
        """Attention with gradients for the bias table (fused kernels return none for masks).

        One batched computation for all windows: the windows-then-images token order lets one
        (windows, 1, heads, N, N) mask broadcast over the images.
        """
        heads = self.num_heads
        c = qkv.shape[1] // 3
        q, k, v = qkv.view(-1, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4).contiguous().unbind(0)
        attn = torch.matmul(q * self.scale, k.transpose(-2, -1))  # (windows * B, heads, N, N)
        mask = self.relative_bias().unsqueeze(0)
        if patterns is not None:
            mask = mask + patterns[window_keys].unsqueeze(1)
        attn = attn.view(-1, batch, heads, n, n) + mask.unsqueeze(1).to(attn.dtype)
        attn = self.attn_drop(attn.softmax(dim=-1)).view(-1, heads, n, n)
        return torch.matmul(attn, v).transpose(1, 2).reshape(-1, c)

    def extra_repr(self):
        return f'dim={self.dim}, window_size={self.window_size}, num_heads={self.num_heads}'


class _DropPath(nn.Module):
    """Holds the stochastic depth rate of a block (no parameters, as BasicSR's DropPath)."""

    def __init__(self, drop_prob):
        super().__init__()
        self.drop_prob = drop_prob

    def extra_repr(self):
        return f'drop_prob={self.drop_prob}'


class _SwinBlock(nn.Module):
    """Swin Transformer block on a window-ordered token stream; names as BasicSR's SwinTransformerBlock."""

    def __init__(self, dim, input_resolution, num_heads, window_size, shift_size, mlp_ratio, qkv_bias, qk_scale,
                 drop, attn_drop, drop_path, norm_layer):
        super().__init__()
        self.dim = dim
        self.input_resolution = input_resolution
        self.num_heads = num_heads
        self.window_size = window_size
        self.shift_size = shift_size
        self.mlp_ratio = mlp_ratio
        if min(input_resolution) <= window_size:
            # As BasicSR: a training size not larger than the window means one window, no shift.
            self.shift_size = 0
            self.window_size = min(input_resolution)
        if not 0 <= self.shift_size < self.window_size:
            raise ValueError(f'shift_size must be in [0, window_size), got {self.shift_size}, {self.window_size}')
        self.norm1 = norm_layer(dim)
        self.attn = _WindowAttention(dim, self.window_size, num_heads, qkv_bias, qk_scale, attn_drop, drop)
        self.drop_path = _DropPath(drop_path)
        self.norm2 = norm_layer(dim)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio), nn.GELU, drop)
        attn_mask = None
        if self.shift_size > 0:
            attn_mask = basicsr_attn_mask(input_resolution, self.window_size, self.shift_size)
        # Kept only so that state dicts match BasicSR's; the forward builds its own masks.
        self.register_buffer('attn_mask', attn_mask)
        self.layout = 1 if self.shift_size > 0 else 0

    def forward(self, x, plan, patterns, compiled=False):
        """x: (T, C) stream in this block's window order -> same shape and order.

        compiled: run the token-wise parts through ``compiled_block_parts`` (``use_compile``), where this
        block's configuration allows it (LayerNorm, GELU, no dropout); attention runs eagerly either way.
        """
        n = plan.tokens_per_window
        p = self.drop_path.drop_prob
        attn = self.attn
        groups = plan.groups[self.layout]
        shifted = self.shift_size > 0
        if compiled and self._compilable():
            block_qkv, block_rest = compiled_block_parts()
            n1, n2, mlp = self.norm1, self.norm2, self.mlp
            qkv = block_qkv(x, n1.weight, n1.bias, n1.eps, attn.qkv.weight, attn.qkv.bias)
            out = attn.attend(qkv, groups, patterns if shifted else None, n, plan.window_keys[self.layout],
                              plan.batch, plan.window_patterns[self.layout])
            f1 = _drop_path_factor(p, self.training, plan.batch, x.dtype, x.device)
            f2 = _drop_path_factor(p, self.training, plan.batch, x.dtype, x.device)
            return block_rest(x, out, attn.proj.weight, attn.proj.bias, n2.weight, n2.bias, n2.eps, mlp.fc1.weight,
                              mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias, f1, f2, plan.batch, n)
        qkv = attn.qkv(_norm(self.norm1, x))
        out = attn.attend(qkv, groups, patterns if shifted else None, n, plan.window_keys[self.layout], plan.batch,
                          plan.window_patterns[self.layout])
        y = attn.proj_drop(attn.proj(out))
        x = _add_drop_path(x, y, p, self.training, plan.batch, n)
        x = _add_drop_path(x, self.mlp(_norm(self.norm2, x)), p, self.training, plan.batch, n)
        return x

    def _compilable(self):
        norms = all(type(m) is nn.LayerNorm and m.elementwise_affine and m.weight.dim() == 1
                    for m in (self.norm1, self.norm2))
        gelu = type(self.mlp.act) is nn.GELU and self.mlp.act.approximate == 'none'
        no_dropout = not self.training or (self.attn.proj_drop.p == 0 and self.mlp.drop.p == 0)
        return norms and gelu and no_dropout

    def extra_repr(self):
        return (f'dim={self.dim}, input_resolution={self.input_resolution}, num_heads={self.num_heads}, '
                f'window_size={self.window_size}, shift_size={self.shift_size}, mlp_ratio={self.mlp_ratio}')


class _BasicLayer(nn.Module):

    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)


class _NoParams(nn.Module):
    """Stands where BasicSR has a parameterless module (patch (un)embedding inside RSTB)."""


class _PatchEmbed(nn.Module):

    def __init__(self, embed_dim, norm_layer):
        super().__init__()
        self.norm = norm_layer(embed_dim) if norm_layer is not None else None


class _RSTB(nn.Module):
    """Residual Swin Transformer Block; parameter names as BasicSR's RSTB."""

    def __init__(self, dim, blocks, resi_connection, use_checkpoint):
        super().__init__()
        self.dim = dim
        self.use_checkpoint = use_checkpoint
        self.residual_group = _BasicLayer(blocks)
        self.conv = _resi_conv(dim, resi_connection)
        self.patch_embed = _NoParams()
        self.patch_unembed = _NoParams()

    def forward(self, x, plan, patterns, compiled=False):
        """x: (B*H*W, C) raster-ordered tokens -> same. compiled: see ``_SwinBlock.forward``."""
        b, h, w = plan.batch, plan.height, plan.width
        c = x.shape[1]
        blocks = self.residual_group.blocks
        layout = blocks[0].layout if len(blocks) else 0
        y = _permute_rows(x, plan.enter[layout], plan.leave[layout])
        for blk in blocks:
            if blk.layout != layout:
                y = _permute_rows(y, plan.switch[(layout, blk.layout)], plan.switch[(blk.layout, layout)])
                layout = blk.layout
            if self.use_checkpoint and torch.is_grad_enabled():
                y = torch_checkpoint.checkpoint(blk, y, plan, patterns, compiled, use_reentrant=False)
            else:
                y = blk(y, plan, patterns, compiled)
        y = _permute_rows(y, plan.leave[layout], plan.enter[layout])
        # (B, H, W, C) viewed as NCHW is channels-last: the convolution reads the stream as it is.
        y = self.conv(y.view(b, h, w, c).permute(0, 3, 1, 2))
        return y.permute(0, 2, 3, 1).reshape(-1, c) + x


def _resi_conv(dim, resi_connection):
    if resi_connection == '1conv':
        return nn.Conv2d(dim, dim, 3, 1, 1)
    return nn.Sequential(
        nn.Conv2d(dim, dim // 4, 3, 1, 1), nn.LeakyReLU(negative_slope=0.2, inplace=True),
        nn.Conv2d(dim // 4, dim // 4, 1, 1, 0), nn.LeakyReLU(negative_slope=0.2, inplace=True),
        nn.Conv2d(dim // 4, dim, 3, 1, 1))


def _upsample(scale, num_feat):
    layers = []
    if (scale & (scale - 1)) == 0:
        for _ in range(int(math.log(scale, 2))):
            layers += [nn.Conv2d(num_feat, 4 * num_feat, 3, 1, 1), nn.PixelShuffle(2)]
    elif scale == 3:
        layers += [nn.Conv2d(num_feat, 9 * num_feat, 3, 1, 1), nn.PixelShuffle(3)]
    else:
        raise ValueError(f'upscale {scale} is not supported by upsampler "pixelshuffle": use 2^n or 3.')
    return nn.Sequential(*layers)


def reflect_pad_to_multiple(x, multiple):
    """Reflect-pad the bottom/right of x (B, C, H, W) so H and W are multiples of ``multiple``.

    As the official SwinIR ``check_image_size``; inputs smaller than the padding are reflected
    repeatedly (where a single reflect pad would fail).
    """
    h, w = x.shape[-2:]
    pad_h = (multiple - h % multiple) % multiple
    pad_w = (multiple - w % multiple) % multiple
    while pad_h or pad_w:
        step_h = min(pad_h, x.shape[-2] - 1)
        step_w = min(pad_w, x.shape[-1] - 1)
        if step_h == 0 and step_w == 0:  # a 1-pixel side cannot be reflected: repeat it
            x = F.pad(x, (0, pad_w, 0, pad_h), mode='replicate')
            break
        x = F.pad(x, (0, step_w, 0, step_h), mode='reflect')
        pad_h -= step_h
        pad_w -= step_w
    return x


@ARCH_REGISTRY.register()
class FastSwinIR(nn.Module):
    r"""SwinIR with BasicSR's constructor and state-dict keys, faster forward (see the module docstring).

    Args: as ``basicsr.archs.swinir_arch.SwinIR`` (img_size, patch_size, in_chans, embed_dim, depths,
        num_heads, window_size, mlp_ratio, qkv_bias, qk_scale, drop_rate, attn_drop_rate, drop_path_rate,
        norm_layer, ape, patch_norm, use_checkpoint, upscale, img_range, upsampler, resi_connection), plus
        precision (str): 'fp32' (default), 'bf16' or 'fp16': the forward runs under ``torch.autocast`` with
            that dtype (bf16 suits CPUs with AMX; fp16/bf16 suit GPUs). Outputs keep the input dtype.
        use_compile (bool): run the token-wise parts of every Swin block (LayerNorm, projections, MLP,
            residuals) through ``torch.compile`` (``compiled_block_parts``: one compiled function for all
            blocks); attention, convolutions and token reordering run eagerly. Default False.

    Input: (B, in_chans, H, W) float in [0, 1] (for img_range=1), any H, W >= 1.
    Output: (B, in_chans, H * s, W * s), s = upscale ('' upsampler: s = 1).
    ``img_size`` only decides, as in BasicSR, the window size (a training size not larger than
    ``window_size`` shrinks it) and the shape of the stored ``attn_mask`` buffers.
    """

    def __init__(self,
                 img_size=64,
                 patch_size=1,
                 in_chans=3,
                 embed_dim=96,
                 depths=(6, 6, 6, 6),
                 num_heads=(6, 6, 6, 6),
                 window_size=7,
                 mlp_ratio=4.,
                 qkv_bias=True,
                 qk_scale=None,
                 drop_rate=0.,
                 attn_drop_rate=0.,
                 drop_path_rate=0.1,
                 norm_layer=nn.LayerNorm,
                 ape=False,
                 patch_norm=True,
                 use_checkpoint=False,
                 upscale=2,
                 img_range=1.,
                 upsampler='',
                 resi_connection='1conv',
                 precision='fp32',
                 use_compile=False,
                 **kwargs):
        super().__init__()
        if kwargs:
            warnings.warn(f'FastSwinIR ignores unknown arguments {sorted(kwargs)} (as BasicSR SwinIR does)',
                          stacklevel=2)
        upsampler = upsampler or ''
        if upsampler not in UPSAMPLERS:
            raise ValueError(f'upsampler must be one of {UPSAMPLERS} (or None), got {upsampler!r}')
        if resi_connection not in RESI_CONNECTIONS:
            raise ValueError(f'resi_connection must be one of {RESI_CONNECTIONS}, got {resi_connection!r}')
        if upsampler == 'nearest+conv' and upscale != 4:
            raise ValueError(f'upsampler "nearest+conv" supports only upscale 4, got {upscale}')
        if precision not in PRECISIONS:
            raise ValueError(f'precision must be one of {sorted(PRECISIONS)}, got {precision!r}')
        if len(depths) != len(num_heads):
            raise ValueError(f'depths and num_heads must have the same length, got {depths} and {num_heads}')
        for heads in num_heads:
            if embed_dim % heads:
                raise ValueError(f'embed_dim {embed_dim} is not divisible by num_heads {heads}')
        num_feat = 64
        self.in_chans = in_chans
        self.img_range = img_range
        if in_chans == 3:
            self.mean = torch.Tensor((0.4488, 0.4371, 0.4040)).view(1, 3, 1, 1)
        else:
            self.mean = torch.zeros(1, 1, 1, 1)
        self.upscale = upscale
        self.upsampler = upsampler
        self.precision = precision
        self.use_compile = use_compile

        self.conv_first = nn.Conv2d(in_chans, embed_dim, 3, 1, 1)
        self.num_layers = len(depths)
        self.embed_dim = embed_dim
        self.ape = ape
        self.patch_norm = patch_norm
        self.num_features = embed_dim
        self.mlp_ratio = mlp_ratio
        img_size = _to_2tuple(img_size)
        patch_size = _to_2tuple(patch_size)
        resolution = (img_size[0] // patch_size[0], img_size[1] // patch_size[1])
        self.patches_resolution = resolution
        self.patch_embed = _PatchEmbed(embed_dim, norm_layer if patch_norm else None)
        self.patch_unembed = _NoParams()
        if ape:
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, resolution[0] * resolution[1], embed_dim))
            nn.init.trunc_normal_(self.absolute_pos_embed, std=.02)
        self.pos_drop = nn.Dropout(p=drop_rate)
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, sum(depths))]
        self.layers = nn.ModuleList()
        for i, depth in enumerate(depths):
            blocks = [
                _SwinBlock(embed_dim, resolution, num_heads[i], window_size, 0 if j % 2 == 0 else window_size // 2,
                           mlp_ratio, qkv_bias, qk_scale, drop_rate, attn_drop_rate, dpr[sum(depths[:i]) + j],
                           norm_layer) for j in range(depth)
            ]
            self.layers.append(_RSTB(embed_dim, blocks, resi_connection, use_checkpoint))
        self.norm = norm_layer(self.num_features)
        self.conv_after_body = _resi_conv(embed_dim, resi_connection)

        if upsampler == 'pixelshuffle':
            self.conv_before_upsample = nn.Sequential(
                nn.Conv2d(embed_dim, num_feat, 3, 1, 1), nn.LeakyReLU(inplace=True))
            self.upsample = _upsample(upscale, num_feat)
            self.conv_last = nn.Conv2d(num_feat, in_chans, 3, 1, 1)
        elif upsampler == 'pixelshuffledirect':
            self.upsample = nn.Sequential(
                nn.Conv2d(embed_dim, upscale**2 * in_chans, 3, 1, 1), nn.PixelShuffle(upscale))
        elif upsampler == 'nearest+conv':
            self.conv_before_upsample = nn.Sequential(
                nn.Conv2d(embed_dim, num_feat, 3, 1, 1), nn.LeakyReLU(inplace=True))
            self.conv_up1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
            self.conv_up2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
            self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
            self.conv_last = nn.Conv2d(num_feat, in_chans, 3, 1, 1)
            self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)
        else:
            self.conv_last = nn.Conv2d(embed_dim, in_chans, 3, 1, 1)
        self.apply(self._init_weights)

        blocks = [blk for layer in self.layers for blk in layer.residual_group.blocks]
        self.window_size = blocks[0].window_size if blocks else window_size
        shifts = {blk.shift_size for blk in blocks if blk.shift_size > 0}
        self.shift_size = shifts.pop() if shifts else 0
        # Pad as the official code (to window_size) and to the window the blocks really use.
        self.pad_multiple = window_size * self.window_size // math.gcd(window_size, self.window_size)
        self._patterns = shift_patterns(self.window_size, self.shift_size) if self.shift_size else None
        self._plans = OrderedDict()

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {'absolute_pos_embed'}

    @torch.jit.ignore
    def no_weight_decay_keywords(self):
        return {'relative_position_bias_table'}

    @property
    def scale(self):
        """Output size / input size."""
        return self.upscale if self.upsampler else 1

    @torch.compiler.disable
    def _plan(self, batch, height, width, device):
        key = (batch, height, width, device)
        plan = self._plans.get(key)
        if plan is None:
            with torch.inference_mode(False):
                plan = _TokenPlan(batch, height, width, self.window_size, self.shift_size, device)
            self._plans[key] = plan
            while len(self._plans) > _PLAN_CACHE_SIZE:
                self._plans.popitem(last=False)
        else:
            self._plans.move_to_end(key)
        return plan

    def forward_features(self, x, stream_dtype=None):
        """x: (B, embed_dim, H, W) with H, W multiples of the window size -> same shape.

        stream_dtype: dtype of the residual token stream (default x.dtype). Under autocast the
        convolutions return bf16/fp16; keeping the stream in fp32 keeps the sums of 4 x depth
        residual branches accurate, and layer norms read fp32 faster than bf16 on CPUs.
        """
        b, c, h, w = x.shape
        plan = self._plan(b, h, w, x.device)
        patterns = self._patterns
        if patterns is not None and patterns.device != x.device:
            with torch.inference_mode(False):
                patterns = self._patterns = patterns.to(x.device)
        tokens = x.permute(0, 2, 3, 1).reshape(-1, c)  # free for channels-last x
        if stream_dtype is not None:
            tokens = tokens.to(stream_dtype)
        if self.patch_embed.norm is not None:
            tokens = _norm(self.patch_embed.norm, tokens)
        if self.ape:
            if self.absolute_pos_embed.shape[1] != h * w:
                raise ValueError(f'ape=True needs inputs of the training size {self.patches_resolution} '
                                 f'(after padding), got {(h, w)}')
            tokens = (tokens.view(b, h * w, c) + self.absolute_pos_embed).view(-1, c)
        tokens = self.pos_drop(tokens)
        for layer in self.layers:
            tokens = layer(tokens, plan, patterns, self.use_compile)
        tokens = _norm(self.norm, tokens)
        return tokens.view(b, h, w, c).permute(0, 3, 1, 2)

    def _forward_padded(self, x):
        dtype = x.dtype
        x = x.contiguous(memory_format=torch.channels_last)
        if self.upsampler == 'pixelshuffle':
            x = self.conv_first(x)
            x = self.conv_after_body(self.forward_features(x, dtype)) + x
            x = self.conv_before_upsample(x)
            x = self.conv_last(self.upsample(x))
        elif self.upsampler == 'pixelshuffledirect':
            x = self.conv_first(x)
            x = self.conv_after_body(self.forward_features(x, dtype)) + x
            x = self.upsample(x)
        elif self.upsampler == 'nearest+conv':
            x = self.conv_first(x)
            x = self.conv_after_body(self.forward_features(x, dtype)) + x
            x = self.conv_before_upsample(x)
            x = self.lrelu(self.conv_up1(F.interpolate(x, scale_factor=2, mode='nearest')))
            x = self.lrelu(self.conv_up2(F.interpolate(x, scale_factor=2, mode='nearest')))
            x = self.conv_last(self.lrelu(self.conv_hr(x)))
        else:
            x_first = self.conv_first(x)
            res = self.conv_after_body(self.forward_features(x_first, dtype)) + x_first
            x = x + self.conv_last(res)
        return x

    def forward(self, x):
        """x: (B, in_chans, H, W) in [0, 1] (img_range 1) -> (B, in_chans, H*s, W*s), same dtype."""
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f'FastSwinIR expects input of shape (B, {self.in_chans}, H, W), got {tuple(x.shape)}')
        h, w = x.shape[-2:]
        if self.mean.device != x.device or self.mean.dtype != x.dtype:
            with torch.inference_mode(False):
                self.mean = self.mean.to(device=x.device, dtype=x.dtype)
        y = (x - self.mean) * self.img_range
        y = reflect_pad_to_multiple(y, self.pad_multiple)
        run = self._forward_padded
        dtype = PRECISIONS[self.precision]
        if dtype == torch.bfloat16 and x.device.type == 'cpu':
            warn_if_slow_bf16('bf16', 'cpu', "FastSwinIR precision 'bf16' (network_g.precision or --precision)")
        if dtype != torch.float32 and dtype != x.dtype:
            with torch.autocast(device_type=x.device.type, dtype=dtype):
                y = run(y)
            y = y.to(x.dtype)
        else:
            y = run(y)
        y = y / self.img_range + self.mean
        s = self.scale
        return y[:, :, :h * s, :w * s].contiguous()


def set_precision(model, precision):
    """Set the forward precision of every FastSwinIR inside ``model`` ('fp32', 'bf16' or 'fp16')."""
    if precision not in PRECISIONS:
        raise ValueError(f'precision must be one of {sorted(PRECISIONS)}, got {precision!r}')
    for m in model.modules():
        if isinstance(m, FastSwinIR):
            m.precision = precision
    return model
