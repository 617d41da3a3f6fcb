"""ResShift teacher networks against the official implementation.

Independent references, produced once from the official code (github.com/zsyOAOA/ResShift at
commit 3ce1d81e8402fd50083809ae288a3977f6921bdd) and committed under tests/data/:

* ``resshift_unet_keys.txt`` / ``vq_f4_keys.txt``: ``key<TAB>shape`` of every state-dict entry of
  the official ``UNetModelSwin`` and ``VQModelTorch`` built from
  ``configs/realsr_swinunet_realesrgan256.yaml`` (``model.params`` / ``autoencoder.params``).
* ``resshift_tiny_reference.pt``: for the tiny configs below, the official networks were filled
  with the weights :func:`reference_weights` generates (NumPy ``RandomState``, whose stream NumPy
  keeps fixed across versions, so the weights need not be stored), run on fixed inputs, and their
  outputs saved, together with the official non-learned buffers (relative position indices and
  shifted-window masks) and the input tensors. Tensors, strings and dicts only (``weights_only``).

Tiny configs (same structure as the released model, small widths; exercise Swin stages with and
without shifted windows at the stored and at other feature sizes, LQ concatenation and the LQ
feature extractor, residual blocks with FiLM and additive conditioning, conv and residual-block
resampling, patch_norm, the VQ encoder/decoder with level and middle attention, and the quantiser).
Inputs: torch.Generator seeded with the weight seed + 1 (UNet) or 14 (VQ); see the reference file.
"""
import os

import numpy as np
import pytest
import torch

import dtkd_arch  # noqa: F401  (registers the architectures)
from conftest import read_keys
from dtkd_arch.resshift_swin import shift_window_mask
from dtkd_arch.resshift_unet_arch import ResShiftUNet
from dtkd_arch.vq_autoencoder_arch import VQAutoencoder

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data')

TINY_UNET = dict(image_size=16, in_channels=3, model_channels=32, out_channels=3, attention_resolutions=[16, 8],
                 dropout=0, channel_mult=[1, 2], num_res_blocks=[2, 1], conv_resample=True, dims=2, use_fp16=False,
                 num_head_channels=16, use_scale_shift_norm=True, resblock_updown=False, swin_depth=2,
                 swin_embed_dim=32, window_size=4, mlp_ratio=2, cond_lq=True, lq_size=16)
TINY_UNET_VARIANT = dict(image_size=16, in_channels=3, model_channels=32, out_channels=3, attention_resolutions=[8],
                         dropout=0, channel_mult=[1, 1], num_res_blocks=1, conv_resample=True, dims=2,
                         use_fp16=False, num_heads=2, num_head_channels=-1, use_scale_shift_norm=False,
                         resblock_updown=True, swin_depth=2, swin_embed_dim=32, window_size=4, mlp_ratio=2,
                         patch_norm=True, cond_lq=True, lq_size=32)
TINY_VQ = dict(embed_dim=3, n_embed=64,
               ddconfig=dict(double_z=False, z_channels=3, resolution=32, in_channels=3, out_ch=3, ch=32,
                             ch_mult=[1, 2], num_res_blocks=[1, 2], attn_resolutions=[16], dropout=0.0,
                             padding_mode='zeros'))

OFFICIAL_CONFIG = dict(
    model=dict(image_size=64, in_channels=3, model_channels=160, out_channels=3, attention_resolutions=[64, 32, 16, 8],
               dropout=0, channel_mult=[1, 2, 2, 4], num_res_blocks=[2, 2, 2, 2], conv_resample=True, dims=2,
               use_fp16=False, num_head_channels=32, use_scale_shift_norm=True, resblock_updown=False, swin_depth=2,
               swin_embed_dim=192, window_size=8, mlp_ratio=4, cond_lq=True, lq_size=64),
    autoencoder=dict(embed_dim=3, n_embed=8192,
                     ddconfig=dict(double_z=False, z_channels=3, resolution=256, in_channels=3, out_ch=3, ch=128,
                                   ch_mult=[1, 2, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0,
                                   padding_mode='zeros')),
)

_BUFFER_SUFFIXES = ('relative_position_index', 'attn_mask')


def reference_weights(keys_shapes, buffers, seed):
    """Deterministic weights for a state-dict layout (the same in the reference generator and here).

    Args:
        keys_shapes: list of (key, shape) in state-dict order.
        buffers: dict of the official non-learned buffers (taken as they are).
        seed (int): RandomState seed.

    Returns:
        dict key -> float32 tensor. Matrices/kernels: uniform with variance 1/fan_in; norm weights
        1 +- 0.1; biases +- 0.1; relative position tables +- 0.5; codebooks +- 1.5.
    """
    rng = np.random.RandomState(seed)
    out = {}
    for key, shape in keys_shapes:
        if key.endswith(_BUFFER_SUFFIXES):
            out[key] = buffers[key]
            continue
        u = rng.uniform(-1.0, 1.0, size=shape)
        if key.endswith('relative_position_bias_table'):
            value = 0.5 * u
        elif key.endswith('embedding.weight'):
            value = 1.5 * u
        elif len(shape) >= 2:
            value = u * np.sqrt(3.0 / int(np.prod(shape[1:])))
        elif key.endswith('weight'):
            value = 1.0 + 0.1 * u
        else:
            value = 0.1 * u
        out[key] = torch.from_numpy(value.astype(np.float32))
    return out


@pytest.fixture(scope='module')
def reference():
    return torch.load(os.path.join(DATA, 'resshift_tiny_reference.pt'), map_location='cpu', weights_only=True)


def _state_layout(module):
    return [(k, tuple(v.shape)) for k, v in module.state_dict().items()]


def test_unet_state_dict_layout_and_size_match_official():
    with torch.device('meta'):
        unet = ResShiftUNet(**OFFICIAL_CONFIG['model'])
    assert _state_layout(unet) == read_keys('resshift_unet_keys.txt')
    assert sum(p.numel() for p in unet.parameters()) == 118_593_583  # the paper's 118.59 M


def test_vq_state_dict_layout_and_size_match_official():
    with torch.device('meta'):
        vq = VQAutoencoder(**OFFICIAL_CONFIG['autoencoder'])
    assert _state_layout(vq) == read_keys('vq_f4_keys.txt')
    assert sum(p.numel() for p in vq.parameters()) == 55_322_782


def test_registered_in_basicsr():
    from basicsr.utils.registry import ARCH_REGISTRY

    assert ARCH_REGISTRY.get('ResShiftUNet') is ResShiftUNet
    assert ARCH_REGISTRY.get('VQAutoencoder') is VQAutoencoder


def test_shift_masks_equal_official_buffers(reference):
    """The shifted-window masks (with the reference's row-only, transposed labelling) and indices."""
    unet = ResShiftUNet(**TINY_UNET)
    buffers = reference['unet']['buffers']
    masks = [k for k in buffers if k.endswith('attn_mask')]
    assert len(masks) == 5
    own = unet.state_dict()
    for key, value in buffers.items():
        assert torch.equal(own[key], value), key
    # A size the network was not built for: 24 x 16 at window 4, shift 2 (computed by the reference).
    assert torch.equal(shift_window_mask(24, 16, 4, 2), reference['unet']['mask_24x16'])


def _load_reference(module, ref, seed):
    state = reference_weights(ref['keys'], ref['buffers'], seed)
    module.load_state_dict(state, strict=True)
    return module.eval()


@pytest.mark.parametrize('name,config,layout', [
    ('unet', TINY_UNET, 'nchw'), ('unet_variant', TINY_UNET_VARIANT, 'nchw'), ('unet', TINY_UNET, 'channels_last')])
def test_unet_forward_matches_official(reference, name, config, layout):
    ref = reference[name]
    unet = _load_reference(ResShiftUNet(**config), ref, ref['seed'])
    fmt = torch.channels_last if layout == 'channels_last' else torch.contiguous_format
    unet = unet.to(memory_format=fmt)
    with torch.no_grad():
        for case in ref['cases']:
            out = unet(case['x'].contiguous(memory_format=fmt), case['t'], lq=case['lq'].contiguous(memory_format=fmt))
            assert out.shape == case['out'].shape
            err = (out - case['out']).abs().max().item()
            assert err < 1e-5 * max(1.0, case['out'].abs().max().item()), (name, tuple(case['x'].shape), err)


def test_vq_encode_decode_match_official(reference):
    ref = reference['vq']
    vq = _load_reference(VQAutoencoder(**TINY_VQ), ref, ref['seed'])
    with torch.no_grad():
        z = vq.encode(ref['image'])
        assert (z - ref['encoded']).abs().max().item() < 1e-5
        codes = vq.quantize.codes(ref['latent'])
        assert torch.equal(codes.flatten(), ref['codes'].flatten())
        dec = vq.decode(ref['latent'])
        assert (dec - ref['decoded']).abs().max().item() < 1e-5
        dec_nq = vq.decode(ref['latent'], force_not_quantize=True)
        assert (dec_nq - ref['decoded_not_quantized']).abs().max().item() < 1e-5
    # Quantisation really happened: the quantised and unquantised decodings differ.
    assert (ref['decoded'] - ref['decoded_not_quantized']).abs().max().item() > 1e-3


def test_unet_gradients_flow_through_the_cached_bias():
    """Training mode recomputes the position bias so the table receives gradients."""
    unet = ResShiftUNet(**TINY_UNET)
    x = torch.randn(1, 3, 16, 16)
    out = unet(x, torch.tensor([3]), lq=torch.randn(1, 3, 16, 16))
    out.square().mean().backward()
    table = unet.input_blocks[1][1].blocks[1].attn.relative_position_bias_table
    assert table.grad is not None and table.grad.abs().sum() > 0


@pytest.mark.parametrize('kwargs,word', [
    (dict(dims=3), 'dims'), (dict(use_fp16=True), 'use_fp16'), (dict(cond_lq=False), 'cond_lq'),
    (dict(lq_size=24), 'lq_size'), (dict(num_head_channels=12), 'num_head_channels'),
    (dict(num_res_blocks=[1, 1, 1]), 'num_res_blocks'),
])
def test_unet_rejects_unsupported_options(kwargs, word):
    with pytest.raises(ValueError, match=word):
        ResShiftUNet(**{**TINY_UNET, **kwargs})


def test_unet_rejects_bad_inputs():
    unet = ResShiftUNet(**TINY_UNET)
    with pytest.raises(ValueError, match='lq'):
        unet(torch.zeros(1, 3, 16, 16), torch.tensor([0]))
    with pytest.raises(ValueError, match='timesteps'):
        unet(torch.zeros(2, 3, 16, 16), torch.tensor([0]), lq=torch.zeros(2, 3, 16, 16))
    with pytest.raises(ValueError, match='multiple of the window'):
        unet(torch.zeros(1, 3, 20, 20), torch.tensor([0]), lq=torch.zeros(1, 3, 20, 20))


def test_vq_rejects_unsupported_options():
    with pytest.raises(ValueError, match='remap'):
        VQAutoencoder(**TINY_VQ, remap='used.npy')
    with pytest.raises(ValueError, match='double_z'):
        VQAutoencoder(embed_dim=3, n_embed=8, ddconfig={**TINY_VQ['ddconfig'], 'double_z': True})
    with pytest.raises(KeyError, match='bogus'):
        VQAutoencoder(embed_dim=3, n_embed=8, ddconfig={**TINY_VQ['ddconfig'], 'bogus': 1})
    vq = VQAutoencoder(**TINY_VQ)
    with pytest.raises(ValueError, match='multiple of 2'):
        vq.encode(torch.zeros(1, 3, 15, 16))


def test_cached_bias_follows_weight_changes():
    """The per-size bias cache must not survive a weight reload (e.g. loading a checkpoint after a forward)."""
    torch.manual_seed(0)
    unet = ResShiftUNet(**TINY_UNET).eval()
    x, lq, t = torch.randn(1, 3, 16, 16), torch.randn(1, 3, 16, 16), torch.tensor([2])
    with torch.no_grad():
        unet(x, t, lq=lq)  # fills the caches
        other = ResShiftUNet(**TINY_UNET).eval()
        for name, p in other.named_parameters():
            if name.endswith('relative_position_bias_table'):
                p.uniform_(-1, 1)
        unet.load_state_dict(other.state_dict())
        assert torch.allclose(unet(x, t, lq=lq), other(x, t, lq=lq), atol=1e-6)


def test_unet_under_inference_mode_matches_no_grad():
    """The kernel path's cached transposed bias also works for inference tensors (no version counter)."""
    torch.manual_seed(0)
    unet = ResShiftUNet(**TINY_UNET).eval()
    x, lq, t = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16), torch.tensor([3, 7])
    with torch.no_grad():
        expected = unet(x, t, lq=lq)
    with torch.inference_mode():
        first = unet(x, t, lq=lq)
        second = unet(x, t, lq=lq)  # served from the caches
    assert torch.equal(first, second) and (first - expected).abs().max() < 1e-6
