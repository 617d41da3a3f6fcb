"""Whole-image inference for window-based SR networks: reflect padding and seamless tiling.

Window-attention networks (SwinIR and relatives) need the input height and width to be multiples
of their window size, and large images do not fit in memory in one pass. ``pad_to_multiple`` /
crop handle the first; ``tiled_forward`` the second, blending overlapping tiles with weights that
ramp linearly across the overlap so that no seam is visible where tiles meet.
"""
import torch
import torch.nn.functional as F


def pad_to_multiple(x, multiple):
    """Reflect-pad the bottom and right of ``x`` (B, C, H, W) to multiples of ``multiple``.

    Returns the padded tensor and the original (H, W). As the official SwinIR and ResShift test code
    (``check_image_size``); where the padding is not smaller than a side (which a single reflection
    cannot do), the reflection is repeated, and a 1-pixel side is replicated.
    """
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    while ph > 0 or pw > 0:
        sh, sw = min(ph, x.shape[-2] - 1), min(pw, x.shape[-1] - 1)
        if sh == 0 and sw == 0:
            x = F.pad(x, (0, pw, 0, ph), mode='replicate')
            break
        x = F.pad(x, (0, sw, 0, sh), mode='reflect')
        ph, pw = ph - sh, pw - sw
    return x, (h, w)


def forward_padded(net, x, multiple, scale):
    """Run ``net`` on ``x`` padded to ``multiple`` and crop the result back to ``scale`` × size."""
    xp, (h, w) = pad_to_multiple(x, multiple)
    return net(xp)[..., :h * scale, :w * scale]


def _ramp(length_hr, left_hr, right_hr, device, dtype):
    """1-D blending weight of a tile: 1 over its core, 0 over the outer half of its context, and
    linear in between. Every pixel lies in exactly one core, so the weights never sum to zero."""
    u = torch.arange(length_hr, device=device, dtype=dtype) + 0.5
    w = torch.ones(length_hr, device=device, dtype=dtype)
    if left_hr > 0:
        w = torch.minimum(w, ((u - left_hr / 2) / (left_hr / 2)).clamp(0, 1))
    if right_hr > 0:
        w = torch.minimum(w, ((length_hr - u - right_hr / 2) / (right_hr / 2)).clamp(0, 1))
    return w


def tiled_forward(net, x, scale, tile_size, tile_pad, multiple=1):
    """Super-resolve ``x`` (B, C, H, W) tile by tile.

    The image is cut into cores of ``tile_size`` × ``tile_size`` LR pixels; each core is run with
    up to ``tile_pad`` pixels of context on every side, and the overlapping outputs are blended
    with weights that are 1 over a tile's core and fall linearly to zero across the inner half of
    its context. For a network whose receptive radius is at most ``tile_pad / 2`` the result equals
    whole-image inference; for others (attention) the blend hides the seams. Memory is bounded by
    one tile of ``tile_size + 2 * tile_pad`` pixels a side.

    Returns a tensor of shape (B, C_out, scale·H, scale·W).
    """
    b, _, h, w = x.shape
    if tile_size <= 0 or tile_pad < 0:
        raise ValueError(f'val.tile: tile_size must be > 0 and tile_pad >= 0, got {tile_size} and {tile_pad}')
    if h <= tile_size and w <= tile_size:
        return forward_padded(net, x, multiple, scale)
    out = weight = None
    for y0 in range(0, h, tile_size):
        for x0 in range(0, w, tile_size):
            y1, x1 = min(y0 + tile_size, h), min(x0 + tile_size, w)
            ay0, ax0 = max(y0 - tile_pad, 0), max(x0 - tile_pad, 0)
            ay1, ax1 = min(y1 + tile_pad, h), min(x1 + tile_pad, w)
            tile_out = forward_padded(net, x[..., ay0:ay1, ax0:ax1], multiple, scale)
            if out is None:
                out = x.new_zeros(b, tile_out.shape[1], h * scale, w * scale, dtype=tile_out.dtype)
                weight = x.new_zeros(1, 1, h * scale, w * scale, dtype=tile_out.dtype)
            wy = _ramp((ay1 - ay0) * scale, (y0 - ay0) * scale, (ay1 - y1) * scale, x.device, tile_out.dtype)
            wx = _ramp((ax1 - ax0) * scale, (x0 - ax0) * scale, (ax1 - x1) * scale, x.device, tile_out.dtype)
            wt = wy[:, None] * wx[None, :]
            out[..., ay0 * scale:ay1 * scale, ax0 * scale:ax1 * scale] += tile_out * wt
            weight[..., ay0 * scale:ay1 * scale, ax0 * scale:ax1 * scale] += wt
    return out / weight
