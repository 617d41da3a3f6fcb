"""Swin transformer stage used inside the ResShift denoising UNet.

ResShift (Yue et al., "ResShift: Efficient Diffusion Model for Image Super-resolution by Residual
Shifting", NeurIPS 2023; code github.com/zsyOAOA/ResShift, ``models/swin_transformer.py``) inserts
Swin stages (Liu et al., ICCV 2021) between the residual blocks of its UNet. Their variant works on
BCHW feature maps: GroupNorm(32) instead of LayerNorm, 1x1 convolutions for the MLP and the patch
(un)embedding, and windowed multi-head self-attention with a relative position bias.

This module reproduces that computation with the same parameter names (so the official
checkpoints load unchanged) but runs it faster: the stage keeps its tokens channels-last so that
the 1x1 convolutions become plain matrix products, the attention scores and the bias come out of
one batched GEMM, and the relative position bias plus the shift mask are gathered once per feature
size instead of on every call.

One detail must be kept to stay numerically equal to the released weights: the official shift
mask labels image regions by rows only and reads the in-window positions transposed (see
:func:`shift_window_mask`). The released model was trained with that mask, so it is reproduced
exactly rather than "fixed".
"""
import torch
import torch.nn.functional as F
from torch import nn

# Additive mask value the reference implementation uses between tokens of different shifted regions.
_MASK_VALUE = -100.0


def relative_position_index(window_size):
    """Index into the relative position bias table for every (query, key) pair of a window.

    Args:
        window_size (int): side of the square window, ws.

    Returns:
        LongTensor (ws*ws, ws*ws): ``(dy + ws - 1) * (2*ws - 1) + (dx + ws - 1)`` where
        ``(dy, dx)`` is the query position minus the key position (row-major token order).
    """
    coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing='ij'))
    coords = coords.flatten(1)  # 2 x N
    rel = coords[:, :, None] - coords[:, None, :] + (window_size - 1)  # 2 x N x N
    return rel[0] * (2 * window_size - 1) + rel[1]


def shift_window_mask(height, width, window_size, shift_size):
    """Additive attention mask for shifted windows, identical to the ResShift reference.

    The reference builds a region-label image of shape (1, 1, H, W) but indexes it as if it were
    (1, H, W, 1), so only the row position decides the region (rows ``< H - ws``, rows in
    ``[H - ws, H - shift)``, rows ``>= H - shift``), and it then flattens each window transposed
    (column-major). Token ``t`` of a window in window-row ``i`` therefore carries the label of image
    row ``i * ws + (t mod ws)``. Tokens with different labels get ``-100`` added to their score.

    Args:
        height, width (int): feature size, multiples of ``window_size``.
        window_size (int): window side ws.
        shift_size (int): cyclic shift, 0 < shift < ws.

    Returns:
        Tensor (nW, ws*ws, ws*ws) float32 with values 0 or -100, windows in row-major order.
    """
    rows = torch.arange(height)
    labels = (rows >= height - window_size).long() + (rows >= height - shift_size).long()  # H
    n_h, n_w = height // window_size, width // window_size
    pos = torch.arange(window_size * window_size) % window_size
    token_labels = labels.view(n_h, window_size)[:, pos]  # n_h x N
    diff = token_labels[:, :, None] != token_labels[:, None, :]  # n_h x N x N
    mask = diff.float() * _MASK_VALUE
    return mask.repeat_interleave(n_w, dim=0)


def _linear_1x1(x, conv):
    """Apply a 1x1 ``nn.Conv2d`` to a channels-last tensor (..., C_in) as a matrix product."""
    return F.linear(x, conv.weight.flatten(1), conv.bias)


def _group_norm_channels_last(x, norm):
    """GroupNorm over the last axis of a (B, H, W, C) tensor, without changing its memory layout."""
    return F.group_norm(x.permute(0, 3, 1, 2), norm.num_groups, norm.weight, norm.bias, norm.eps).permute(0, 2, 3, 1)


class WindowAttention(nn.Module):
    """Window multi-head self-attention with a learned relative position bias.

    Parameter/buffer names follow the reference: ``relative_position_bias_table``
    ((2ws-1)^2, heads), ``relative_position_index`` (N, N) buffer, ``qkv`` (Linear C -> 3C) and
    ``proj`` (Linear C -> C).
    """

    def __init__(self, dim, window_size, num_heads, qkv_bias=True):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f'swin embed dim {dim} is not divisible by the number of heads {num_heads}')
        self.dim = dim
        self.window_size = window_size
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer('relative_position_index', relative_position_index(window_size))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def position_bias(self):
        """Relative position bias, (heads, N, N)."""
        n = self.window_size * self.window_size
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(n, n, self.num_heads).permute(2, 0, 1)

    def forward(self, x, attn_bias):
        """Attend within each window.

        Args:
            x: (B, nW, N, C) window tokens, N = ws*ws in row-major order.
            attn_bias: (nW, heads, N, N) additive bias (shared by the batch).

        Returns:
            (B, nW, N, C)
        """
        b, n_win, n, c = x.shape
        heads, head_dim = self.num_heads, c // self.num_heads
        qkv = self.qkv(x).view(b, n_win, n, 3, heads, head_dim).permute(3, 0, 1, 4, 2, 5)
        q = (qkv[0] * self.scale).reshape(-1, n, head_dim)
        k = qkv[1].reshape(-1, n, head_dim)
        v = qkv[2].reshape(-1, n, head_dim)
        # Scores and bias in one batched GEMM; on CPU this beats scaled_dot_product_attention with a
        # float mask for these small windows (64 tokens) and follows the reference's order of operations.
        bias = attn_bias.expand(b, n_win, heads, n, n).reshape(-1, n, n)
        attn = torch.baddbmm(bias, q, k.transpose(1, 2)).softmax(dim=-1)
        out = torch.bmm(attn, v).view(b, n_win, heads, n, head_dim).transpose(2, 3).reshape(b, n_win, n, c)
        return self.proj(out)


class SwinTransformerBlock(nn.Module):
    """One (shifted-)window attention block with GroupNorm and a 1x1-conv MLP.

    ``window_size`` and ``shift_size`` are reduced as in the reference when the construction-time
    resolution is not larger than the window (one window, no shift). Shifted blocks keep the
    reference's ``attn_mask`` buffer for the construction-time resolution (it is part of the
    checkpoints); other sizes get their mask computed on first use and cached.
    """

    def __init__(self, dim, input_resolution, num_heads, window_size, shift_size, mlp_ratio, qkv_bias=True,
                 drop=0.0):
        super().__init__()
        self.dim = dim
        self.input_resolution = tuple(input_resolution)
        self.num_heads = num_heads
        if min(self.input_resolution) <= window_size:
            window_size = min(self.input_resolution)
            shift_size = 0
        if not 0 <= shift_size < window_size:
            raise ValueError(f'swin shift size {shift_size} must be in [0, window size {window_size})')
        self.window_size = window_size
        self.shift_size = shift_size

        self.norm1 = nn.GroupNorm(32, dim)
        self.attn = WindowAttention(dim, window_size, num_heads, qkv_bias=qkv_bias)
        self.norm2 = nn.GroupNorm(32, dim)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Conv2d(dim, int(dim * mlp_ratio), 1)
        self.mlp.fc2 = nn.Conv2d(int(dim * mlp_ratio), dim, 1)
        self.drop = nn.Dropout(drop)
        if shift_size > 0:
            self.register_buffer('attn_mask', shift_window_mask(*self.input_resolution, window_size, shift_size))
        else:
            self.attn_mask = None
        self._bias_cache = {}

    def _shift_mask(self, height, width, device, dtype):
        if (height, width) == self.input_resolution:
            return self.attn_mask.to(device=device, dtype=dtype)
        return shift_window_mask(height, width, self.window_size, self.shift_size).to(device=device, dtype=dtype)

    def attention_bias(self, height, width, device, dtype):
        """Position bias plus shift mask, (nW, heads, N, N); cached while the weights are unchanged."""
        table = self.attn.relative_position_bias_table
        cacheable = not (torch.is_grad_enabled() and table.requires_grad)
        mask_version = self.attn_mask._version if self.attn_mask is not None else 0
        key = (height, width, device, dtype, table._version, mask_version)
        if cacheable and key in self._bias_cache:
            return self._bias_cache[key]
        bias = self.attn.position_bias().to(dtype).unsqueeze(0)  # 1 x heads x N x N
        if self.shift_size > 0:
            bias = bias + self._shift_mask(height, width, device, dtype).unsqueeze(1)
        else:
            # Materialised per window so that a batch of one needs no copy in the attention.
            n_win = (height // self.window_size) * (width // self.window_size)
            bias = bias.expand(n_win, -1, -1, -1).contiguous()
        if cacheable:
            self._bias_cache.clear()
            self._bias_cache[key] = bias.detach()
        return bias

    def _apply(self, fn, *args, **kwargs):
        self._bias_cache = {}
        return super()._apply(fn, *args, **kwargs)

    def forward(self, x):
        """x: (B, H, W, C) channels-last tokens, H and W multiples of the window size -> same shape."""
        b, h, w, c = x.shape
        ws, shift = self.window_size, self.shift_size
        if h % ws or w % ws:
            raise ValueError(f'swin feature size {h}x{w} must be a multiple of the window size {ws}')
        y = _group_norm_channels_last(x, self.norm1)
        if shift > 0:
            y = torch.roll(y, shifts=(-shift, -shift), dims=(1, 2))
        n_h, n_w = h // ws, w // ws
        win = y.reshape(b, n_h, ws, n_w, ws, c).transpose(2, 3).reshape(b, n_h * n_w, ws * ws, c)
        win = self.attn(win, self.attention_bias(h, w, x.device, x.dtype))
        win = self.drop(win)
        y = win.view(b, n_h, n_w, ws, ws, c).transpose(2, 3).reshape(b, h, w, c)
        if shift > 0:
            y = torch.roll(y, shifts=(shift, shift), dims=(1, 2))
        x = x + y
        y = _linear_1x1(_group_norm_channels_last(x, self.norm2), self.mlp.fc1)
        y = self.drop(F.gelu(y))
        y = self.drop(_linear_1x1(y, self.mlp.fc2))
        return x + y


class SwinStage(nn.Module):
    """Patch embedding (1x1 conv), ``depth`` Swin blocks alternating plain/shifted windows, unembedding.

    Reference name: ``BasicLayer`` with ``patch_size=1``. Keys: ``patch_embed.proj``,
    ``patch_embed.norm`` (only with ``patch_norm``), ``blocks.<i>.*``, ``patch_unembed.proj``,
    ``patch_unembed.norm``.

    Args:
        in_chans (int): channels of the UNet feature map.
        embed_dim (int): token width inside the stage.
        num_heads (int): attention heads.
        window_size (int): attention window side.
        depth (int): number of blocks (odd blocks use shifted windows).
        img_size (int): feature-map side at construction (decides window reduction and stored masks).
        mlp_ratio (float): MLP hidden width / embed_dim.
        drop (float): dropout after attention and MLP.
        patch_norm (bool): GroupNorm after the patch embedding and after the unembedding.
    """

    def __init__(self, in_chans, embed_dim, num_heads, window_size, depth, img_size, mlp_ratio, drop=0.0,
                 patch_norm=False):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_chans, embed_dim, 1)
        self.patch_embed.norm = nn.GroupNorm(32, embed_dim) if patch_norm else nn.Identity()
        self.patch_unembed = nn.Module()
        self.patch_unembed.proj = nn.Conv2d(embed_dim, in_chans, 1)
        self.patch_unembed.norm = nn.GroupNorm(32, in_chans) if patch_norm else nn.Identity()
        resolution = (img_size, img_size)
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(embed_dim, resolution, num_heads, window_size,
                                 0 if i % 2 == 0 else window_size // 2, mlp_ratio, drop=drop)
            for i in range(depth))

    @staticmethod
    def _norm(x, norm):
        return x if isinstance(norm, nn.Identity) else _group_norm_channels_last(x, norm)

    def forward(self, x):
        """x: (B, C, H, W) -> (B, C, H, W)."""
        y = self._norm(_linear_1x1(x.permute(0, 2, 3, 1), self.patch_embed.proj), self.patch_embed.norm)
        for block in self.blocks:
            y = block(y)
        y = self._norm(_linear_1x1(y, self.patch_unembed.proj), self.patch_unembed.norm)
        y = y.permute(0, 3, 1, 2)  # channels-last strides: free when the caller works channels-last
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            return y
        return y.contiguous()
