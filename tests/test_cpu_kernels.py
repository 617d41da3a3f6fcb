"""The compiled CPU kernels (dtkd_arch/cpu_kernels.py, csrc/): window attention against an independent float64
computation of softmax(q k^T scale + mask) v and its autograd gradients, LayerNorm against float64
F.layer_norm, the fully connected products and the MLP with fused GELU against float64 F.linear / F.gelu."""
import os
import subprocess
import sys
import warnings

import dtkd_compat  # noqa: F401, I001  (must precede basicsr)

# isort: split
import pytest
import torch

from dtkd_arch import cpu_kernels, cpu_ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module', autouse=True)
def built():
    assert cpu_kernels.available(), cpu_kernels.build_error()


def _inputs(windows, n, heads, d, patterns, seed, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(windows * n, 3 * heads * d, generator=g, dtype=torch.float64) * spread
    masks = torch.randn(patterns, heads, n, n, generator=g, dtype=torch.float64)
    if patterns > 1:  # shift-style patterns: blocks of keys a query must not see (never its own token)
        region = (torch.arange(n) >= n // 2).long()
        masks[1:] = masks[1:].masked_fill(region[:, None] != region[None, :], float('-inf'))
    pattern = torch.randint(0, patterns, (windows,), generator=g)
    return qkv, masks, pattern


def _reference(qkv, masks, pattern, heads, scale):
    windows = pattern.numel()
    n = masks.shape[-1]
    d = qkv.shape[1] // 3 // heads
    q, k, v = qkv.view(windows, n, 3, heads, d).permute(2, 0, 3, 1, 4)
    attn = ((q * scale) @ k.transpose(-2, -1) + masks[pattern]).softmax(-1)
    return (attn @ v).transpose(1, 2).reshape(windows * n, heads * d)


@pytest.mark.parametrize('windows, n, heads, d, patterns, spread', [
    (10, 64, 6, 10, 4, 1.0),  # the paper's student: 8 x 8 windows, 6 heads of 10 channels, shifted masks
    (7, 16, 3, 5, 4, 1.0),  # 4 x 4 windows
    (5, 24, 1, 3, 2, 1.0),  # 3 vectors of 8 queries per register block
    (3, 128, 2, 8, 1, 1.0),  # more queries than one register block (two blocks of 64)
    (4, 64, 2, 32, 1, 4.0),  # wide heads, large scores: softmax far from uniform, exponentials near 0
])
def test_forward_and_gradients_match_float64_reference(windows, n, heads, d, patterns, spread):
    qkv, masks, pattern = _inputs(windows, n, heads, d, patterns, seed=n + d, spread=spread)
    scale = d**-0.5
    grad_out = torch.randn(windows * n, heads * d, generator=torch.Generator().manual_seed(d), dtype=torch.float64)
    results = {}
    for name, dtype, fn in (('float64', torch.float64, _reference), ('torch float32', torch.float32, _reference),
                            ('kernel', torch.float32, cpu_kernels.window_attention)):
        a = qkv.to(dtype, copy=True).requires_grad_()
        b = masks.to(dtype, copy=True).requires_grad_()
        out = fn(a, b.transpose(-2, -1) if fn is cpu_kernels.window_attention else b, pattern, heads, scale)
        out.backward(grad_out.to(dtype))
        results[name] = [t.detach().double() for t in (out, a.grad, b.grad)]
    for k, what in enumerate(('out', 'grad qkv', 'grad masks')):
        want = results['float64'][k]
        err = (results['kernel'][k] - want).abs().max().item()
        # Float32 rounding level: within a few times the error of torch's own float32 attention, which grows
        # with the spread of the scores (measured: forward 0.9-1.9x, gradients 1.3-3.2x torch's error; the
        # probabilities of the backward are recomputed through a 1.6-ulp exp2 instead of stored).
        torch_err = (results['torch float32'][k] - want).abs().max().item()
        assert err < max(4 * torch_err, 1e-6 * want.abs().max().item()), (what, err, torch_err)
    out, mf = results['kernel'][0], results['kernel'][2]
    assert torch.isfinite(mf).all() and (mf[1:][torch.isinf(masks[1:])] == 0).all()
    with torch.no_grad():
        plain = cpu_kernels.window_attention(qkv.float(), masks.float().transpose(-2, -1), pattern, heads, scale)
    assert torch.equal(plain.double(), out)  # the inference call (no statistics kept) computes the same


def test_gradient_of_qkv_only_and_threads_agree():
    qkv, masks, pattern = _inputs(12, 64, 6, 10, 4, seed=1)
    qkv, masks = qkv.float(), masks.float().transpose(-2, -1).contiguous()
    grad_out = torch.randn(qkv.shape[0], qkv.shape[1] // 3)
    results = []
    threads = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            a = qkv.clone().requires_grad_()
            b = masks.clone().requires_grad_()
            cpu_kernels.window_attention(a, b, pattern, 6, 0.3).backward(grad_out)
            c = qkv.clone().requires_grad_()
            cpu_kernels.window_attention(c, masks, pattern, 6, 0.3).backward(grad_out)  # masks need no gradient
            assert torch.equal(c.grad, a.grad)
            results.append((a.grad, b.grad))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0])  # each (window, head) is computed by one thread
    assert (results[0][1] - results[1][1]).abs().max() < 1e-5  # mask gradients: per-thread partial sums


def test_bad_inputs_raise_clear_errors():
    qkv, masks, pattern = (t.float() if t.is_floating_point() else t for t in _inputs(2, 16, 2, 4, 2, seed=2))
    op = torch.ops.dtkd_cpu.window_attention_forward
    masks_t = masks.transpose(-2, -1).contiguous()
    with pytest.raises(RuntimeError, match='multiple of 8'):
        op(qkv[:2 * 12].contiguous(), masks_t[..., :12, :12].contiguous(), pattern, 2, 0.5, False)
    with pytest.raises(RuntimeError, match='float32'):
        op(qkv.double(), masks_t, pattern, 2, 0.5, False)
    with pytest.raises(RuntimeError, match='pattern 5 of window 1 out of range'):
        op(qkv, masks_t, torch.tensor([0, 5]), 2, 0.5, False)
    with pytest.raises(RuntimeError, match='rows for 3 windows'):
        op(qkv, masks_t, torch.tensor([0, 1, 0]), 2, 0.5, False)
    with pytest.raises(RuntimeError, match='does not match 3 heads'):
        op(qkv, masks_t, pattern, 3, 0.5, False)


def test_supports_only_what_the_kernel_computes():
    x = torch.zeros(64, 3 * 12)
    assert cpu_kernels.supports(x, 64, 2)
    assert not cpu_kernels.supports(x.double(), 64, 2)
    assert not cpu_kernels.supports(x.bfloat16(), 64, 2)
    assert not cpu_kernels.supports(x, 49, 2)  # 7 x 7 windows
    assert not cpu_kernels.supports(x, 64, 2, dropout=0.1)
    with cpu_kernels.using_kernels(False):
        assert not cpu_kernels.supports(x, 64, 2)
    assert cpu_kernels.supports(x, 64, 2)


def test_build_name_depends_on_the_cpu(monkeypatch):
    import dtkd_arch.cpu_ops as cpu_ops

    name = cpu_kernels.build_name()
    assert name.startswith('dtkd_cpu_kernels_')
    monkeypatch.setattr(cpu_ops, '_cpu_flags', lambda: frozenset({'sse2'}))
    other = cpu_kernels.build_name()
    monkeypatch.setattr(cpu_ops, '_cpu_flags', lambda: frozenset({'sse2', 'avx2'}))
    assert len({name, other, cpu_kernels.build_name()}) == 3


def test_failed_build_warns_once_and_fastswinir_falls_back(monkeypatch):
    from basicsr.archs.swinir_arch import SwinIR

    from dtkd_arch.fast_swinir_arch import FastSwinIR

    monkeypatch.setattr(cpu_kernels, '_state', {'loaded': None, 'error': None})
    monkeypatch.setattr(torch.ops, 'dtkd_cpu', None, raising=False)  # as in a process that never built it

    def failing_build():
        raise RuntimeError('g++: command not found')

    monkeypatch.setattr(cpu_kernels, '_build', failing_build)
    cfg = dict(upscale=2, img_size=16, window_size=8, img_range=1., depths=[2], embed_dim=12, num_heads=[2],
               mlp_ratio=2, upsampler='pixelshuffledirect', resi_connection='1conv')
    ref = SwinIR(**cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.2)
    fast = FastSwinIR(**cfg).eval()
    fast.load_state_dict(ref.state_dict())
    x = torch.rand(1, 3, 16, 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        with torch.no_grad():
            got = fast(x)
            fast(x)
        conv = cpu_kernels.Conv2d(16, 16, 3, padding=1)  # the teacher's convolutions: oneDNN instead of Winograd
        y = torch.randn(1, 16, 8, 8)
        with torch.no_grad():
            conv_out = conv(y)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and 'g++: command not found' in messages[0] and 'cpu_kernels.cpp' in messages[0]
    assert not cpu_kernels.available() and 'g++' in cpu_kernels.build_error()
    with torch.no_grad():
        assert (got - ref(x)).abs().max() < 1e-4
        assert torch.equal(conv_out, torch.nn.functional.conv2d(y, conv.weight, conv.bias, padding=1))


def test_environment_variable_switches_the_kernels_off():
    code = ('from dtkd_arch import cpu_kernels, fast_swinir_arch; import torch; '
            'assert not cpu_kernels.enabled(); x = torch.zeros(64, 36); '
            'assert not cpu_kernels.supports(x, 64, 2); assert cpu_kernels._state["loaded"] is None')
    env = dict(os.environ, DTKD_CPU_KERNELS='0')
    subprocess.run([sys.executable, '-c', code], check=True, cwd=ROOT, env=env, timeout=300)
    env['DTKD_CPU_KERNELS'] = 'fast'
    res = subprocess.run([sys.executable, '-c', 'import dtkd_arch.cpu_kernels'], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "DTKD_CPU_KERNELS='fast'" in res.stderr


@pytest.mark.parametrize('rows, c, affine', [(300, 60, True), (5, 13, True), (64, 8, False), (1, 3, True),
                                             (513, 180, True)])
def test_layer_norm_matches_float64_reference(rows, c, affine):
    g = torch.Generator().manual_seed(rows + c)
    x = torch.randn(rows, c, generator=g, dtype=torch.float64) * 3 + 2
    weight = torch.randn(c, generator=g, dtype=torch.float64) if affine else None
    bias = torch.randn(c, generator=g, dtype=torch.float64) if affine else None
    grad = torch.randn(rows, c, generator=g, dtype=torch.float64)
    results = {}
    for name, dtype in (('float64', torch.float64), ('torch float32', torch.float32), ('kernel', torch.float32)):
        leaves = [t.to(dtype, copy=True).requires_grad_() if t is not None else None for t in (x, weight, bias)]
        if name == 'kernel':
            y = cpu_kernels.layer_norm(*leaves, 1e-5)
        else:
            y = torch.nn.functional.layer_norm(leaves[0], (c,), leaves[1], leaves[2], 1e-5)
        y.backward(grad.to(dtype))
        results[name] = [y.detach().double()] + [t.grad.double() for t in leaves if t is not None]
    for k in range(len(results['float64'])):
        want = results['float64'][k]
        err = (results['kernel'][k] - want).abs().max().item()
        torch_err = (results['torch float32'][k] - want).abs().max().item()
        assert err < max(4 * torch_err, 1e-6 * want.abs().max().item()), (k, err, torch_err)
    with torch.no_grad():
        plain = cpu_kernels.layer_norm(x.float(), None if weight is None else weight.float(),
                                       None if bias is None else bias.float(), 1e-5)
    assert torch.equal(plain.double(), results['kernel'][0])


def test_layer_norm_gradient_flags_and_errors():
    x = torch.randn(40, 12, requires_grad=True)
    weight = torch.randn(12)  # no gradient wanted for the weight
    bias = torch.randn(12, requires_grad=True)
    cpu_kernels.layer_norm(x, weight, bias, 1e-6).sum().backward()
    assert weight.grad is None and bias.grad is not None and x.grad is not None
    assert torch.allclose(bias.grad, torch.full((12,), 40.0))
    op = torch.ops.dtkd_cpu.layer_norm_forward
    with pytest.raises(RuntimeError, match='vector of 12 values'):
        op(x.detach(), torch.ones(11), None, 1e-5)
    with pytest.raises(RuntimeError, match='float32'):
        op(x.detach().double(), None, None, 1e-5)
    assert cpu_kernels.supports_tokens(x) and not cpu_kernels.supports_tokens(x.double())


def test_sources_are_staged_once_into_the_build_directory(tmp_path):
    """The build compiles copies in its own directory (the same paths from every checkout); a second staging of
    unchanged sources rewrites nothing, so ninja sees no change and does not rebuild."""
    source = cpu_kernels._stage_sources(str(tmp_path / 'src'))
    assert source == str(tmp_path / 'src' / 'cpu_kernels.cpp')
    names = sorted(os.listdir(cpu_kernels._CSRC))
    assert sorted(os.listdir(tmp_path / 'src')) == names and 'window_attention_kernels.h' in names
    os.utime(tmp_path / 'src' / names[0], ns=(1, 1))
    (tmp_path / 'src' / names[1]).write_bytes(b'edited')
    cpu_kernels._stage_sources(str(tmp_path / 'src'))
    assert os.stat(tmp_path / 'src' / names[0]).st_mtime_ns == 1  # unchanged content: left alone
    for n in names:
        with open(os.path.join(cpu_kernels._CSRC, n), 'rb') as f:
            assert (tmp_path / 'src' / n).read_bytes() == f.read()


def test_a_built_library_is_loaded_without_the_build_tools():
    """A later process loads the cached library directly: it works even where cpp_extension.load would fail."""
    code = ('import torch.utils.cpp_extension as ext\n'
            'def refuse(*a, **k):\n'
            '    raise RuntimeError("the build tools ran")\n'
            'ext.load = refuse\n'
            'from dtkd_arch import cpu_kernels\n'
            'assert cpu_kernels.available(), cpu_kernels.build_error()\n')
    subprocess.run([sys.executable, '-c', code], check=True, cwd=ROOT, timeout=300)


def _errors_within_torch_float32(results, scale_floor=1e-6):
    """results: {'float64': [...], 'torch float32': [...], 'kernel': [...]}, tensors in the same order: every kernel
    error within 4x torch's own float32 error (or a 1e-6 relative floor)."""
    for k, want in enumerate(results['float64']):
        err = (results['kernel'][k].double() - want).abs().max().item()
        torch_err = (results['torch float32'][k].double() - want).abs().max().item()
        assert err < max(4 * torch_err, scale_floor * want.abs().max().item()), (k, err, torch_err)


@pytest.mark.parametrize('rows, k, n', [
    (300, 60, 180),  # SwinIR-small's qkv layer: 11 full panels of 16 columns and one of 4
    (97, 120, 60),  # rows not a multiple of the 6-row micro-kernel
    (50, 60, 16),  # one full panel
    (7, 13, 5),  # fewer columns than one vector
    (1, 3, 17),  # a single row
    (61, 33, 31),
])
def test_linear_kernels_match_float64_reference(rows, k, n):
    """linear_rows, linear_gelu (pre-activation and GELU) and linear_gelu_backward against float64."""
    g = torch.Generator().manual_seed(rows + k + n)
    x = torch.randn(rows, k, generator=g, dtype=torch.float64)
    w = torch.randn(n, k, generator=g, dtype=torch.float64) * k**-0.5 * 2
    b = torch.randn(n, generator=g, dtype=torch.float64)
    up = torch.randn(rows, k, generator=g, dtype=torch.float64)  # gradient arriving from the next layer ...
    w_next = torch.randn(k, n, generator=g, dtype=torch.float64)  # ... through weight (k, n): grad (rows, n)
    op = torch.ops.dtkd_cpu
    results = {}
    for name, dtype in (('float64', torch.float64), ('torch float32', torch.float32), ('kernel', torch.float32)):
        xs, ws, bs, ups, wns = (t.to(dtype) for t in (x, w, b, up, w_next))
        if name == 'kernel':
            y = op.linear_rows(xs, ws, bs)
            h, a = op.linear_gelu(xs, ws, bs, True)
            dh = op.linear_gelu_backward(ups, wns.t().contiguous(), h)
            assert torch.equal(op.linear_gelu(xs, ws, bs, False)[1], a)
        else:
            y = torch.nn.functional.linear(xs, ws, bs)
            h = y
            a = torch.nn.functional.gelu(h)
            dh = torch.ops.aten.gelu_backward(ups @ wns, h)
        results[name] = [y, h, a, dh]
    _errors_within_torch_float32(results)


def test_linear_kernels_bad_inputs():
    op = torch.ops.dtkd_cpu
    x = torch.randn(10, 6)
    with pytest.raises(RuntimeError, match='does not match 6 input features'):
        op.linear_rows(x, torch.randn(4, 5), None)
    with pytest.raises(RuntimeError, match='vector of 4 values'):
        op.linear_gelu(x, torch.randn(4, 6), torch.randn(3), True)
    with pytest.raises(RuntimeError, match='float32'):
        op.linear_rows(x.double(), torch.randn(4, 6).double(), None)
    with pytest.raises(RuntimeError, match='h'):
        op.linear_gelu_backward(torch.randn(10, 6), torch.randn(4, 6), torch.randn(10, 5))


@pytest.mark.parametrize('need', ['all', 'weights only', 'input only'])
def test_mlp_gelu_matches_float64_reference(need):
    """cpu_kernels.mlp_gelu (fc2(GELU(fc1(x))), fused GELU) and its gradients against float64 autograd; the
    tensors that need no gradient get none."""
    g = torch.Generator().manual_seed(5)
    shapes = [(200, 60), (120, 60), (120,), (60, 120), (60,)]
    tensors = [torch.randn(*s, generator=g, dtype=torch.float64) * (0.2 if len(s) == 2 and i else 1)
               for i, s in enumerate(shapes)]
    wants = {'all': [True] * 5, 'weights only': [False, True, True, True, True],
             'input only': [True, False, False, False, False]}[need]
    grad = torch.randn(200, 60, generator=g, dtype=torch.float64)
    results = {}
    for name, dtype in (('float64', torch.float64), ('torch float32', torch.float32), ('kernel', torch.float32)):
        leaves = [t.to(dtype, copy=True).requires_grad_(want) for t, want in zip(tensors, wants)]
        if name == 'kernel':
            assert cpu_kernels.supports_mlp(leaves[0], leaves[1], leaves[3])
            y = cpu_kernels.mlp_gelu(*leaves)
        else:
            f = torch.nn.functional
            y = f.linear(f.gelu(f.linear(leaves[0], leaves[1], leaves[2])), leaves[3], leaves[4])
        y.backward(grad.to(dtype))
        results[name] = [y.detach()] + [t.grad for t in leaves if t.requires_grad]
        if name == 'kernel':
            assert all((t.grad is None) != want for t, want in zip(leaves, wants))
            with torch.no_grad():  # no pre-activation kept: the same output
                assert torch.equal(cpu_kernels.mlp_gelu(*leaves), y.detach())
    _errors_within_torch_float32(results)


def test_mlp_gelu_supports_only_what_it_computes():
    x, w = torch.randn(8, 4), torch.randn(6, 4)
    w2 = w.t().contiguous()
    assert cpu_kernels.supports_mlp(x, w, w2)
    assert not cpu_kernels.supports_mlp(x.double(), w, w2)
    assert not cpu_kernels.supports_mlp(x, w.double(), w2)
    assert not cpu_kernels.supports_mlp(x[:0], w, w2)
    assert not cpu_kernels.supports_mlp(x.view(2, 4, 4), w, w2)
    assert not cpu_kernels.supports_mlp(x, w2.t(), w2)  # a transposed view
    big = torch.empty(cpu_ops.COMPILED_MAX_WEIGHT + 1, 1)  # larger than the compiled product takes
    assert not cpu_kernels.supports_mlp(torch.randn(3, 1), big, big.t())
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert not cpu_kernels.supports_mlp(x, w, w2)
