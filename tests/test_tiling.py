"""Padding and tiled inference against whole-image inference."""
import pytest
import torch
from torch import nn

from dtkd_arch.tiling import forward_padded, pad_to_multiple, tiled_forward


def conv_sr(radius_layers, scale=2):
    """A small convolutional x``scale`` network; receptive radius = ``radius_layers`` LR pixels."""
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 8, 3, padding=1)]
    for _ in range(radius_layers - 1):
        layers += [nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)]
    layers += [nn.Conv2d(8, 3 * scale * scale, 1), nn.PixelShuffle(scale)]
    return nn.Sequential(*layers).eval()


def test_pad_to_multiple_reflects_and_forward_padded_crops_back():
    x = torch.arange(2 * 3 * 13 * 10, dtype=torch.float32).reshape(2, 3, 13, 10)
    xp, size = pad_to_multiple(x, 8)
    assert xp.shape[-2:] == (16, 16) and size == (13, 10)
    assert torch.equal(xp[..., :13, :10], x)
    assert torch.equal(xp[..., 13, :10], x[..., 11, :])  # reflection about the last row
    out = forward_padded(lambda t: t.repeat_interleave(4, -1).repeat_interleave(4, -2), x, 8, 4)
    assert out.shape[-2:] == (52, 40)


@pytest.mark.parametrize('tile_size,tile_pad', [(8, 4), (5, 6), (16, 4)])
def test_tiled_equals_whole_image_for_a_local_network(tile_size, tile_pad):
    net = conv_sr(radius_layers=2)  # radius 2 <= tile_pad / 2
    x = torch.rand(1, 3, 23, 30)
    with torch.no_grad():
        full = net(x)
        tiled = tiled_forward(net, x, scale=2, tile_size=tile_size, tile_pad=tile_pad)
    assert tiled.shape == full.shape
    torch.testing.assert_close(tiled, full, atol=1e-5, rtol=1e-5)


def test_tiled_blend_is_a_convex_combination_for_a_wider_network():
    net = conv_sr(radius_layers=6)  # radius 6 > tile_pad / 2: tiles differ near their borders
    x = torch.rand(1, 3, 24, 24)
    with torch.no_grad():
        full = net(x)
        tiled = tiled_forward(net, x, scale=2, tile_size=8, tile_pad=4)
        naive = tiled_forward(net, x, scale=2, tile_size=8, tile_pad=0)
    # Context reduces the error of context-free tiling, and constant images stay constant.
    assert (tiled - full).abs().mean() < (naive - full).abs().mean()
    const = torch.full((1, 3, 20, 20), 0.3)
    ident = tiled_forward(lambda t: t.repeat_interleave(2, -1).repeat_interleave(2, -2), const, 2, 7, 3)
    torch.testing.assert_close(ident, torch.full((1, 3, 40, 40), 0.3))


def test_tile_option_errors():
    with pytest.raises(ValueError, match='tile_size'):
        tiled_forward(conv_sr(1), torch.rand(1, 3, 8, 8), 2, 0, 2)
