"""FastSwinIR against BasicSR's SwinIR (the reference implementation) on shared weights."""
import math

import dtkd_compat  # noqa: F401, I001  (must precede basicsr)

# isort: split
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from basicsr.archs.swinir_arch import SwinIR
from basicsr.utils.registry import ARCH_REGISTRY

from dtkd_arch.fast_swinir_arch import FastSwinIR, reflect_pad_to_multiple

PAPER = dict(upscale=4, img_size=64, window_size=8, img_range=1., depths=[6, 6, 6, 6], embed_dim=60,
             num_heads=[6, 6, 6, 6], mlp_ratio=2, upsampler='pixelshuffledirect', resi_connection='1conv')
TINY = dict(upscale=4, img_size=32, window_size=8, img_range=1., depths=[2, 3], embed_dim=12, num_heads=[2, 3],
            mlp_ratio=2, upsampler='pixelshuffledirect', resi_connection='1conv')
CONFIGS = {
    'tiny_direct': TINY,
    'pixelshuffle_x2_3conv': dict(TINY, upscale=2, upsampler='pixelshuffle', resi_connection='3conv'),
    'pixelshuffle_x3_w4': dict(TINY, upscale=3, upsampler='pixelshuffle', window_size=4, img_size=16),
    'nearest_conv': dict(TINY, upsampler='nearest+conv', depths=[2], num_heads=[3]),
    'denoise_gray': dict(TINY, upscale=1, upsampler='', in_chans=1, img_range=255., patch_norm=False),
    'qk_scale_no_qkv_bias': dict(TINY, qk_scale=0.3, qkv_bias=False, depths=[2], num_heads=[2]),
    # 49 tokens per window: not a multiple of 8, so the compiled CPU kernel leaves it to the PyTorch path
    'window7': dict(TINY, window_size=7, img_size=28, depths=[2], num_heads=[2]),
}
ATOL = 1e-4


def _randomize(model, seed, gain=1.0):
    """Weights far from BasicSR's near-identity init, so that attention, bias and masks matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if 'relative_position_bias_table' in name:
                p.copy_(noise)
            elif p.dim() >= 2:
                fan_in = p[0].numel()
                p.copy_(noise * gain / math.sqrt(fan_in))
            elif name.endswith('norm1.weight') or name.endswith('norm2.weight') or name.endswith('norm.weight'):
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(0.05 * noise)


def _pair(cfg, seed=0, gain=1.0):
    ref = SwinIR(**cfg)
    _randomize(ref, seed, gain)
    fast = FastSwinIR(**cfg)
    fast.load_state_dict(ref.state_dict(), strict=True)
    return ref, fast


def _max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize('name', ['paper'] + sorted(CONFIGS) + ['ape', 'small_img_size'])
def test_state_dict_keys_and_shapes_match_basicsr(name):
    cfg = {'paper': PAPER, 'ape': dict(TINY, ape=True), 'small_img_size': dict(TINY, img_size=6)}.get(name)
    cfg = cfg or CONFIGS[name]
    ref, fast = SwinIR(**cfg).state_dict(), FastSwinIR(**cfg).state_dict()
    assert list(fast) == list(ref)
    assert {k: tuple(v.shape) for k, v in fast.items()} == {k: tuple(v.shape) for k, v in ref.items()}
    # Buffers too: relative position indices and stored shift masks are value-identical.
    for key, value in ref.items():
        if key.endswith('relative_position_index') or key.endswith('attn_mask'):
            assert torch.equal(fast[key], value), key


def test_paper_config_parameter_count_and_registry():
    model = ARCH_REGISTRY.get('FastSwinIR')(**PAPER)
    assert sum(p.numel() for p in model.parameters()) == 929628


def test_strict_loading_both_ways():
    ref, fast = _pair(TINY, seed=1)
    back = SwinIR(**TINY)
    back.load_state_dict(fast.state_dict(), strict=True)
    other = FastSwinIR(**TINY)
    other.load_state_dict(back.state_dict(), strict=True)
    x = torch.rand(1, 3, 16, 24)
    with torch.no_grad():
        assert _max_diff(back.eval()(x), ref.eval()(x)) == 0
        assert _max_diff(other.eval()(x), ref(x)) < ATOL


@pytest.mark.parametrize('name', sorted(CONFIGS))
@pytest.mark.parametrize('size', [(16, 24), (40, 32), (8, 8)])
def test_eval_output_matches_basicsr(name, size):
    cfg = CONFIGS[name]
    ref, fast = _pair(cfg, seed=2)
    ref.eval(), fast.eval()
    x = torch.rand(2, cfg.get('in_chans', 3), *size)
    h, w = size
    ws, s = cfg['window_size'], cfg['upscale'] if cfg['upsampler'] else 1
    with torch.no_grad():  # BasicSR needs multiples of the window: reflect-pad its input, crop its output
        expected = ref(F.pad(x, (0, -w % ws, 0, -h % ws), mode='reflect'))[:, :, :h * s, :w * s]
        got = fast(x)
    assert got.shape == expected.shape
    scale = expected.abs().max().item()
    assert scale > 0.1  # non-trivial output, the tolerance below is meaningful
    tol = ATOL * max(1.0, cfg.get('img_range', 1.0))
    assert _max_diff(got, expected) < tol


@pytest.mark.parametrize('attention', ['compiled', 'pytorch'])
def test_paper_config_matches_basicsr_with_shifted_windows(attention, monkeypatch):
    import dtkd_arch.fast_swinir_arch as fast_arch
    from dtkd_arch import cpu_kernels

    if attention == 'compiled':
        assert cpu_kernels.available(), cpu_kernels.build_error()
    monkeypatch.setattr(cpu_kernels, '_enabled', attention == 'compiled')
    calls = {'compiled': 0, 'pytorch': 0}
    for name, module, attr in (('compiled', cpu_kernels, 'window_attention'),
                               ('pytorch', fast_arch, 'window_attention_cpu')):
        original = getattr(module, attr)
        monkeypatch.setattr(module, attr, lambda *a, _f=original, _n=name, **k: calls.__setitem__(
            _n, calls[_n] + 1) or _f(*a, **k))
    ref, fast = _pair(PAPER, seed=3, gain=0.7)
    ref.eval(), fast.eval()
    x = torch.rand(2, 3, 24, 32)  # 3 x 4 windows: interior, border and corner shifted windows
    with torch.no_grad():
        assert _max_diff(fast(x), ref(x)) < ATOL
    assert calls[attention] == sum(PAPER['depths']) and sum(calls.values()) == calls[attention]


@pytest.mark.parametrize('img_size', [8, 4])
def test_training_size_not_larger_than_window(img_size):
    # BasicSR shrinks the window to the training size and drops the shift.
    cfg = dict(TINY, img_size=img_size)
    ref, fast = _pair(cfg, seed=4)
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert _max_diff(fast.eval()(x), ref.eval()(x)) < ATOL


@pytest.mark.parametrize('size', [(13, 21), (9, 30), (5, 7), (17, 8)])
def test_any_size_matches_reflect_padded_reference(size):
    ref, fast = _pair(TINY, seed=5)
    ref.eval(), fast.eval()
    h, w = size
    x = torch.rand(1, 3, h, w)
    pad_h, pad_w = (-h) % 8, (-w) % 8
    with torch.no_grad():
        expected = ref(F.pad(x, (0, pad_w, 0, pad_h), mode='reflect'))[:, :, :4 * h, :4 * w]
        got = fast(x)
    assert got.shape == (1, 3, 4 * h, 4 * w)
    assert _max_diff(got, expected) < ATOL


def test_reflect_pad_tiny_inputs():
    x = torch.arange(6.).view(1, 1, 2, 3)
    y = reflect_pad_to_multiple(x, 8)
    assert y.shape == (1, 1, 8, 8)
    # Reflection without repeating the edge: columns 0 1 2 1 0 1 2 1, rows 0 1 0 1 ...
    assert y[0, 0, 0].tolist() == [0, 1, 2, 1, 0, 1, 2, 1]
    assert y[0, 0, :, 0].tolist() == [0, 3, 0, 3, 0, 3, 0, 3]
    model = FastSwinIR(**TINY).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 1, 3)).shape == (1, 3, 4, 12)


def test_train_mode_outputs_and_gradients_match_basicsr():
    cfg = dict(TINY, drop_path_rate=0.2)  # stochastic depth on: same random draws in the same order
    ref, fast = _pair(cfg, seed=6)
    ref.train(), fast.train()
    x = torch.rand(2, 3, 16, 24)
    target = torch.rand(2, 3, 64, 96)
    outs = []
    for model in (ref, fast):
        torch.manual_seed(123)
        out = model(x)
        F.mse_loss(out, target).backward()
        outs.append(out.detach())
    assert _max_diff(outs[0], outs[1]) < ATOL
    ref_grads = dict(ref.named_parameters())
    checked = 0
    for name, p in fast.named_parameters():
        ga, gf = ref_grads[name].grad, p.grad
        assert gf is not None, name
        tol = 1e-4 * max(1.0, ga.abs().max().item())
        assert _max_diff(gf, ga) < tol, name
        checked += 1
    assert checked == len(ref_grads)
    assert fast.layers[0].residual_group.blocks[1].attn.relative_position_bias_table.grad.abs().sum() > 0


def test_use_checkpoint_gives_the_same_gradients():
    plain = FastSwinIR(**dict(TINY, drop_path_rate=0.))
    _randomize(plain, 7)
    ckpt = FastSwinIR(**dict(TINY, drop_path_rate=0., use_checkpoint=True))
    ckpt.load_state_dict(plain.state_dict())
    x = torch.rand(1, 3, 16, 16)
    for model in (plain, ckpt):
        model.train()
        model(x).square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        assert _max_diff(a.grad, b.grad) < 1e-6 * max(1.0, a.grad.abs().max().item()), name


def test_mask_cache_follows_parameter_updates():
    ref, fast = _pair(TINY, seed=8)
    x = torch.rand(1, 3, 16, 16)
    fast.eval()
    with torch.no_grad():
        before = fast(x)  # fills the folded-mask cache
    # One training step that changes the bias tables (and everything else).
    fast.train()
    opt = torch.optim.Adam(fast.parameters(), lr=1e-2)
    table = fast.layers[0].residual_group.blocks[1].attn.relative_position_bias_table
    old_table = table.detach().clone()
    fast(x).square().mean().backward()
    opt.step()
    assert _max_diff(table, old_table) > 1e-3
    fast.eval()
    ref.load_state_dict(fast.state_dict())
    ref.eval()
    with torch.no_grad():
        after = fast(x)
        assert _max_diff(after, before) > 1e-2
        assert _max_diff(after, ref(x)) < ATOL
        # An in-place edit under no_grad (as an EMA update does) also reaches the output.
        table.mul_(-1.0)
        ref.layers[0].residual_group.blocks[1].attn.relative_position_bias_table.mul_(-1.0)
        assert _max_diff(fast(x), ref(x)) < ATOL
        assert _max_diff(fast(x), after) > 1e-3


def _psnr(a, b):
    mse = torch.mean((a.clamp(0, 1) - b.clamp(0, 1))**2).item()
    return 10 * math.log10(1.0 / mse)


def _photo_lr(size=64):
    from skimage import data
    img = torch.from_numpy(np.ascontiguousarray(data.astronaut())).permute(2, 0, 1)[None].float() / 255.
    img = F.interpolate(img, size=(4 * size, 4 * size), mode='bicubic', antialias=True, align_corners=False)
    return F.interpolate(img, size=(size, size), mode='bicubic', antialias=True, align_corners=False).clamp(0, 1)


def test_bf16_psnr_against_fp32_on_a_photo():
    # The accuracy bound holds on any CPU (without AMX/AVX512-BF16, bf16 is emulated: slower, same numbers).
    ref, fast = _pair(PAPER, seed=9, gain=0.7)
    ref.eval(), fast.eval()
    lr = _photo_lr(64)
    fast.precision = 'bf16'
    with torch.no_grad():
        expected = ref(lr)
        got = fast(lr)
    assert got.dtype == torch.float32
    psnr = _psnr(got, expected)
    assert 45.0 <= psnr < 100.0  # reduced precision is in effect, and accurate enough


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match='upsampler'):
        FastSwinIR(**dict(TINY, upsampler='bilinear'))
    with pytest.raises(ValueError, match='resi_connection'):
        FastSwinIR(**dict(TINY, resi_connection='2conv'))
    with pytest.raises(ValueError, match='precision'):
        FastSwinIR(**TINY, precision='int8')
    with pytest.raises(ValueError, match='upscale'):
        FastSwinIR(**dict(TINY, upscale=5, upsampler='pixelshuffle'))
    with pytest.raises(ValueError, match='nearest'):
        FastSwinIR(**dict(TINY, upscale=2, upsampler='nearest+conv'))
    model = FastSwinIR(**TINY)
    with pytest.raises(ValueError, match='expects input'):
        model(torch.rand(1, 1, 16, 16))


def test_inference_mode_then_training():
    # Caches filled under torch.inference_mode() must still serve autograd afterwards.
    ref, fast = _pair(dict(TINY, drop_path_rate=0.), seed=10)
    x = torch.rand(1, 3, 16, 16)
    with torch.inference_mode():
        fast.eval()(x)
    fast.train()
    for blk in fast.layers[0].residual_group.blocks:
        blk.attn.relative_position_bias_table.requires_grad_(False)  # attention with autograd, masks without gradients
    out = fast(x)
    out.square().mean().backward()
    ref.train()
    with torch.no_grad():
        assert _max_diff(out, ref(x)) < ATOL


@pytest.mark.parametrize('attention', ['compiled', 'pytorch'])
@pytest.mark.parametrize('cfg_name, size, batch', [
    ('paper_width', (24, 32), 3),  # 3 x 4 windows: interior, border and corner shifted windows
    ('paper_width', (8, 8), 2),  # one window: the shifted block has only the corner pattern
    ('window4_x3', (12, 20), 2),
    ('window7', (14, 21), 2),
])
def test_training_gradients_match_basicsr_tightly(cfg_name, size, batch, attention, monkeypatch):
    """All parameter gradients (relative position bias tables included) and the input gradient of the
    CPU fp32 training paths against BasicSR's autograd: the compiled kernel (``dtkd_arch.cpu_kernels``)
    and the PyTorch one (fused forward, hand-written backward), which also serves windows of a size the
    kernel does not take (7 x 7 = 49 tokens)."""
    import dtkd_arch.fast_swinir_arch as fast_arch
    from dtkd_arch import cpu_kernels

    cfgs = {'paper_width': dict(PAPER, depths=[2, 2], num_heads=[6, 6], drop_path_rate=0.),
            'window4_x3': dict(CONFIGS['pixelshuffle_x3_w4'], drop_path_rate=0.),
            'window7': dict(CONFIGS['window7'], drop_path_rate=0.)}
    cfg = cfgs[cfg_name]
    ref, fast = _pair(cfg, seed=11, gain=0.8)
    ref.train(), fast.train()
    calls = []
    if attention == 'compiled' and cfg_name != 'window7':
        assert cpu_kernels.available(), cpu_kernels.build_error()
        spied = cpu_kernels._WindowAttention
    else:
        monkeypatch.setattr(cpu_kernels, '_enabled', attention == 'compiled')
        spied = fast_arch._WindowAttentionFunction
    original = spied.apply
    monkeypatch.setattr(spied, 'apply', lambda *args: calls.append(1) or original(*args))
    norms, mlps = [], []
    original_norm, original_mlp = cpu_kernels._LayerNorm.apply, cpu_kernels._MlpGelu.apply
    monkeypatch.setattr(cpu_kernels._LayerNorm, 'apply', lambda *args: norms.append(1) or original_norm(*args))
    monkeypatch.setattr(cpu_kernels._MlpGelu, 'apply', lambda *args: mlps.append(1) or original_mlp(*args))
    x = torch.rand(batch, 3, *size)
    target = torch.rand(batch, 3, size[0] * cfg['upscale'], size[1] * cfg['upscale'])
    grads_in = []
    for model in (ref, fast):
        xi = x.clone().requires_grad_()
        F.l1_loss(model(xi), target).backward()
        grads_in.append(xi.grad)
    assert len(calls) == sum(cfg['depths'])  # every block took the fast training path
    # LayerNorm: two per block, the patch embedding's and the final one, in the kernel where it is enabled
    assert len(norms) == (2 * sum(cfg['depths']) + 2 if cpu_kernels.enabled() else 0)
    assert len(mlps) == (sum(cfg['depths']) if cpu_kernels.enabled() else 0)  # the MLPs with their fused GELU
    assert _max_diff(grads_in[0], grads_in[1]) < 1e-5 * grads_in[0].abs().max().item()
    ref_params = dict(ref.named_parameters())
    tables = 0
    for name, p in fast.named_parameters():
        expected = ref_params[name].grad
        scale = expected.abs().max().item()
        assert scale > 0, name
        assert _max_diff(p.grad, expected) < 2e-5 * scale, name
        tables += name.endswith('relative_position_bias_table')
    assert tables == sum(cfg['depths'])



@pytest.mark.parametrize('chunk_elements', [1, 1 << 40])
def test_attention_chunking_does_not_change_results(chunk_elements, monkeypatch):
    """One window per chunk and all windows in one chunk give the outputs and gradients of the default
    chunking (and of the explicit attention computed without chunks)."""
    import dtkd_arch.fast_swinir_arch as fast_arch

    torch.manual_seed(3)
    windows, heads, n, d = 7, 3, 16, 5
    qkv = torch.randn(windows * n, 3 * heads * d, dtype=torch.float64)
    masks = torch.randn(4, heads, n, n, dtype=torch.float64)
    masks[1:] += fast_arch.shift_patterns(4, 2).to(torch.float64)[1:].unsqueeze(1)
    groups = [(0, 3 * n, 0), (3 * n, 5 * n, 1), (5 * n, 6 * n, 2), (6 * n, 7 * n, 3)]
    grad_out = torch.randn(windows * n, heads * d, dtype=torch.float64)
    scale = d**-0.5

    def explicit(qkv, masks):
        q, k, v = qkv.view(windows, n, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)
        key = torch.tensor([0, 0, 0, 1, 1, 2, 3])
        attn = ((q * scale) @ k.transpose(-2, -1) + masks[key]).softmax(-1)
        return (attn @ v).transpose(1, 2).reshape(windows * n, heads * d)

    results = []
    for fn in (explicit, lambda a, b: fast_arch._WindowAttentionFunction.apply(a, b, groups, n, heads, scale)):
        a, b = qkv.clone().requires_grad_(), masks.clone().requires_grad_()
        monkeypatch.setattr(fast_arch, '_CHUNK_ELEMENTS', chunk_elements)
        out = fn(a, b)
        out.backward(grad_out)
        results.append((out.detach(), a.grad, b.grad))
        with torch.no_grad():
            assert torch.allclose(fast_arch.window_attention_cpu(qkv, masks, groups, n, heads, scale), results[0][0],
                                  atol=1e-12)
    for expected, got in zip(*results):
        assert torch.allclose(got, expected, atol=1e-12), (got - expected).abs().max()


def test_device_independent_attention_path_matches_basicsr(monkeypatch):
    """The path GPUs take (fused SDPA without gradients for the bias tables, explicit attention with them),
    forced on the CPU: outputs and gradients equal BasicSR's."""
    import dtkd_arch.fast_swinir_arch as fast_arch

    monkeypatch.setattr(fast_arch, '_CPU_ATTENTION', False)
    calls = []
    monkeypatch.setattr(fast_arch, 'window_attention_cpu', lambda *a, **k: calls.append(1))
    cfg = dict(PAPER, depths=[2, 2], num_heads=[6, 6], drop_path_rate=0.)
    ref, fast = _pair(cfg, seed=12, gain=0.8)
    x = torch.rand(2, 3, 24, 32)
    with torch.no_grad():
        assert _max_diff(fast.eval()(x), ref.eval()(x)) < ATOL
    ref.train(), fast.train()
    target = torch.rand(2, 3, 96, 128)
    for model in (ref, fast):
        F.l1_loss(model(x), target).backward()
    ref_params = dict(ref.named_parameters())
    for name, p in fast.named_parameters():
        expected = ref_params[name].grad
        assert _max_diff(p.grad, expected) < 2e-5 * expected.abs().max().item(), name
    assert not calls


def test_use_compile_shares_one_graph_between_blocks_and_matches_eager():
    """``use_compile``: the token-wise parts of all blocks go through two compiled functions (weights as
    arguments), so the number of compiled graphs does not grow with the number of blocks; outputs and
    gradients equal the eager model's."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    cfg = dict(TINY, depths=[3, 3], num_heads=[2, 2], drop_path_rate=0.1)  # 6 blocks, stochastic depth
    eager = FastSwinIR(**cfg)
    _randomize(eager, 21)
    compiled = FastSwinIR(**cfg, use_compile=True)
    compiled.load_state_dict(eager.state_dict())
    x = torch.rand(2, 3, 16, 24)
    with torch.no_grad():
        assert _max_diff(compiled.eval()(x), eager.eval()(x)) < 1e-5
    assert counters['stats']['unique_graphs'] == 2  # _block_qkv and _block_rest, for all six blocks
    target = torch.rand(2, 3, 64, 96)
    for model in (eager, compiled):
        model.train()
        torch.manual_seed(4)  # the same stochastic depth draws
        F.l1_loss(model(x), target).backward()
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        assert _max_diff(a.grad, b.grad) < 1e-5 * max(1.0, a.grad.abs().max().item()), name
    # training: drop path factors (tensors) for the blocks that have them, None for the first: a few more graphs
    assert counters['stats']['unique_graphs'] <= 6
    assert not counters['recompiles'] or sum(counters['recompiles'].values()) < 8
