"""dtkd_arch.cpu_ops.linear (per-shape choice of BLAS and oneDNN kernels) against torch.nn.functional.linear."""
import itertools
import time

import pytest
import torch
import torch.nn.functional as F

from dtkd_arch import cpu_ops

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason='torch built without oneDNN')


@pytest.fixture(autouse=True)
def fresh_choices():
    cpu_ops.reset_linear_choices()
    yield
    cpu_ops.reset_linear_choices()


def run_both(x, w, b, fn):
    """Output and gradients (x, w[, b]) of fn(x, w, b) for a fixed non-uniform output gradient."""
    xi, wi = x.detach().clone().requires_grad_(), w.clone().requires_grad_()
    bi = b.clone().requires_grad_() if b is not None else None
    out = fn(xi, wi, bi)
    out.backward(torch.cos(torch.arange(out.numel(), dtype=out.dtype)).view(out.shape))
    return out.detach(), [xi.grad, wi.grad] + ([bi.grad] if b is not None else [])


def assert_matches_f_linear(x, w, b, fn):
    expected, expected_grads = run_both(x, w, b, F.linear)
    got, grads = run_both(x, w, b, fn)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    for g, e in zip(grads, expected_grads):
        assert g.shape == e.shape and torch.allclose(g, e, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize('backend', ['auto', 'onednn', 'blas'])
@pytest.mark.parametrize('shape, cin, cout, bias, layout', [
    ((300, ), 60, 180, True, 'rows'),
    ((2, 37, ), 13, 7, False, 'rows'),
    ((3, 5, 11), 24, 72, True, 'rows'),
    ((4, 9), 16, 48, True, 'transposed'),  # non-contiguous rows: (B, HW, C) view of an NCHW image
    ((1, ), 8, 3, True, 'rows'),
])
def test_linear_matches_f_linear_values_and_gradients(backend, shape, cin, cout, bias, layout):
    torch.manual_seed(0)
    if layout == 'transposed':
        x = torch.randn(shape[0], cin, shape[1], dtype=torch.float32).transpose(1, 2)
    else:
        x = torch.randn(*shape, cin)
    w = torch.randn(cout, cin) * 0.2
    b = torch.randn(cout) if bias else None
    with cpu_ops.using_linear_backend(backend):
        assert_matches_f_linear(x, w, b, cpu_ops.linear)


@needs_onednn
@pytest.mark.parametrize('forward, grad_input, grad_weight', list(itertools.product(
    ['blas', 'onednn', 'compiled'], ['blas', 'onednn', 'compiled'], ['blas', 'onednn'])))
def test_every_combination_of_tuned_kernels_is_exact(monkeypatch, forward, grad_input, grad_weight):
    """Whatever the tuner picks for each pass, values and gradients are F.linear's (up to rounding); 'compiled'
    is dtkd_arch.cpu_kernels' product."""
    from dtkd_arch import cpu_kernels
    assert cpu_kernels.available(), cpu_kernels.build_error()
    torch.manual_seed(1)
    x, w, b = torch.randn(2, 150, 40), torch.randn(72, 40) * 0.2, torch.randn(72)
    key = cpu_ops._key(x.reshape(-1, 40), w, True)
    picked = {'forward': forward, 'grad_input': grad_input, 'grad_weight': grad_weight}
    cpu_ops._choices.update({(p,) + key: name for p, name in picked.items()})
    calls = []
    tables = {'forward': cpu_ops._FORWARD, 'grad_input': cpu_ops._GRAD_INPUT, 'grad_weight': cpu_ops._GRAD_WEIGHT}
    for pass_, table in tables.items():
        for name, fn in list(table.items()):
            monkeypatch.setitem(table, name, lambda *a, fn=fn, tag=(pass_, name): calls.append(tag) or fn(*a))
    with cpu_ops.using_linear_backend('auto'):
        got, grads = run_both(x, w, b, cpu_ops.linear)
    assert calls == list(picked.items())  # the picked kernels ran, once each, and nothing was re-measured
    expected, expected_grads = run_both(x, w, b, F.linear)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    for g, e in zip(grads, expected_grads):
        assert torch.allclose(g, e, atol=1e-4, rtol=1e-5)


def test_tuner_measures_once_and_keeps_the_fastest(monkeypatch):
    calls = {'slow': 0, 'fast': 0}

    def slow(x, w, b):
        calls['slow'] += 1
        time.sleep(0.01)
        return F.linear(x, w, b)

    def fast(x, w, b):
        calls['fast'] += 1
        return F.linear(x, w, b)

    monkeypatch.setattr(cpu_ops, '_FORWARD', {'slow': slow, 'fast': fast})
    x, w = torch.randn(10, 4), torch.randn(3, 4)
    with cpu_ops.using_linear_backend('auto'), torch.no_grad():
        first = cpu_ops.linear(x, w)  # each candidate: one untimed and _TRIALS timed runs; the winner once more
        assert calls == {'slow': 1 + cpu_ops._TRIALS, 'fast': 2 + cpu_ops._TRIALS}
        second = cpu_ops.linear(x, w)
        assert calls == {'slow': 1 + cpu_ops._TRIALS, 'fast': 3 + cpu_ops._TRIALS}
        cpu_ops.linear(torch.randn(12, 4), w)  # 12 rows fall in the same power-of-two bucket (16)
        assert calls['slow'] == 1 + cpu_ops._TRIALS
        cpu_ops.linear(torch.randn(40, 4), w)  # another bucket: measured again
        assert calls['slow'] == 2 + 2 * cpu_ops._TRIALS
    assert torch.equal(first, second) and torch.equal(first, F.linear(x, w))
    choices = cpu_ops.linear_choices()
    compiled = cpu_ops._compiled_available(x, w)
    assert choices == {('forward', torch.float32, 16, 4, 3, False, torch.get_num_threads(), compiled): 'fast',
                       ('forward', torch.float32, 64, 4, 3, False, torch.get_num_threads(), compiled): 'fast'}


def test_linear_bf16_and_backend_switch(monkeypatch):
    torch.manual_seed(1)
    x, w, b = torch.randn(64, 32), torch.randn(16, 32) * 0.2, torch.randn(16)
    expected = F.linear(x, w, b)
    for backend in ('auto', 'onednn'):
        with cpu_ops.using_linear_backend(backend):
            got = cpu_ops.linear(x.bfloat16(), w.bfloat16(), b.bfloat16())
        assert got.dtype == torch.bfloat16
        assert (got.float() - expected).abs().max() < 0.1
    calls = []
    original = F.conv2d
    monkeypatch.setattr(F, 'conv2d', lambda *a, **k: calls.append(1) or original(*a, **k))
    before = cpu_ops.linear_backend()
    with cpu_ops.using_linear_backend('blas'):
        assert torch.equal(cpu_ops.linear(x, w, b), F.linear(x, w, b)) and not calls
        with cpu_ops.using_linear_backend('onednn'):
            cpu_ops.linear(x, w, b)
        assert cpu_ops.linear_backend() == 'blas'
    assert cpu_ops.linear_backend() == before
    assert calls == ([1] if torch.backends.mkldnn.is_available() else [])
    with pytest.raises(ValueError, match='linear backend'):
        cpu_ops.set_linear_backend('mkl')
    assert cpu_ops.linear_backend() == before


def test_autocast_bf16_casts_like_f_linear():
    """Under CPU autocast the tuned path returns bf16, as F.linear does, and fp32 parameters get fp32 gradients."""
    torch.manual_seed(2)
    x = torch.randn(50, 24)
    lin = cpu_ops.Linear(24, 36)
    outs, grads = [], []
    for backend in ('blas', 'auto'):
        lin.zero_grad()
        xi = x.clone().requires_grad_()
        with cpu_ops.using_linear_backend(backend), torch.autocast('cpu', dtype=torch.bfloat16):
            out = lin(xi)
        assert out.dtype == torch.bfloat16
        out.float().square().sum().backward()
        assert xi.grad.dtype == torch.float32 and lin.weight.grad.dtype == torch.float32
        outs.append(out.float())
        grads.append((xi.grad, lin.weight.grad, lin.bias.grad))
    assert (outs[0] - outs[1]).abs().max() < 0.05
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=0.05, atol=0.05 * a.abs().max().item())


def test_traced_code_uses_f_linear(monkeypatch):
    """Under torch.compile the layers are plain F.linear (the compiler picks kernels), never tuned."""
    monkeypatch.setattr(torch.compiler, 'is_compiling', lambda: True)
    x, w = torch.randn(8, 4), torch.randn(3, 4)
    with cpu_ops.using_linear_backend('auto'):
        assert torch.equal(cpu_ops.linear(x, w), F.linear(x, w))
    assert cpu_ops.linear_choices() == {}


def test_linear_module_keeps_nn_linear_keys():
    m = cpu_ops.Linear(5, 3)
    assert isinstance(m, torch.nn.Linear)
    assert set(m.state_dict()) == {'weight', 'bias'}
    x = torch.randn(7, 5)
    assert torch.allclose(m(x), F.linear(x, m.weight, m.bias), atol=1e-6)


def test_environment_variable_selects_the_backend(monkeypatch):
    monkeypatch.setenv('DTKD_CPU_LINEAR', 'BLAS')
    assert cpu_ops.choice_from_environment('DTKD_CPU_LINEAR', cpu_ops._BACKENDS) == 'blas'
    monkeypatch.setenv('DTKD_CPU_LINEAR', 'onednn')
    assert cpu_ops.choice_from_environment('DTKD_CPU_LINEAR', cpu_ops._BACKENDS) == 'onednn'
    monkeypatch.setenv('DTKD_CPU_LINEAR', 'mkl')
    with pytest.raises(ValueError, match='DTKD_CPU_LINEAR'):
        cpu_ops.choice_from_environment('DTKD_CPU_LINEAR', cpu_ops._BACKENDS)
    monkeypatch.delenv('DTKD_CPU_LINEAR')
    assert cpu_ops.choice_from_environment('DTKD_CPU_LINEAR', cpu_ops._BACKENDS) == 'auto'


def test_cpu_flags_are_read_from_x86_and_arm_cpuinfo():
    x86 = 'processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu avx2\n'
    assert cpu_ops.parse_cpu_flags(x86) == {'fpu', 'sse', 'avx2', 'fma'}
    arm = 'processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\nCPU implementer\t: 0x41\n'
    assert 'bf16' in cpu_ops.parse_cpu_flags(arm)
    assert cpu_ops.parse_cpu_flags('processor\t: 0\n') is None


@pytest.mark.parametrize('flags, precision, device, warns', [
    ({'avx2', 'fma'}, 'bf16', 'cpu', True),
    ({'avx512f', 'avx512_bf16'}, 'bf16', 'cpu', False),
    ({'avx512f', 'amx_bf16', 'amx_tile'}, 'bf16', 'cpu', False),
    ({'avx2'}, 'fp32', 'cpu', False),
    ({'avx2'}, 'bf16', 'cuda', False),
    (None, 'bf16', 'cpu', False),  # features unknown (no /proc/cpuinfo): no guess
])
def test_slow_bf16_warning(monkeypatch, recwarn, flags, precision, device, warns):
    monkeypatch.setattr(cpu_ops, '_cpu_flags', lambda: None if flags is None else frozenset(flags))
    assert cpu_ops.cpu_supports_bf16() == bool(flags and flags & {'avx512_bf16', 'amx_bf16'})
    assert cpu_ops.warn_if_slow_bf16(precision, device, 'option.key') is warns
    messages = [str(w.message) for w in recwarn if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == int(warns)
    if warns:
        assert messages[0].startswith('option.key: bf16 on a CPU without bf16 matrix instructions')
        assert 'use fp32' in messages[0]


def test_bf16_users_are_warned_where_they_set_it(monkeypatch, tmp_path):
    """FastSwinIR and the ResShift teacher name the option that asked for bf16 (before any long work)."""
    from conftest import tiny_teacher_options
    from dtkd_arch.fast_swinir_arch import FastSwinIR
    from dtkd_model.resshift_teacher import ResShiftTeacher

    monkeypatch.setattr(cpu_ops, '_cpu_flags', lambda: frozenset({'avx2'}))
    net = FastSwinIR(upscale=2, img_size=16, window_size=4, depths=[2], embed_dim=12, num_heads=[2], mlp_ratio=2,
                     upsampler='pixelshuffledirect', precision='bf16')
    with pytest.warns(RuntimeWarning, match=r"FastSwinIR precision 'bf16' \(network_g.precision"):
        out = net(torch.rand(1, 3, 8, 8))
    assert out.dtype == torch.float32 and out.shape == (1, 3, 16, 16)
    opt = tiny_teacher_options(tmp_path)
    opt['sampler'].update(precision='bf16', device='cpu')
    with pytest.warns(RuntimeWarning, match=r"ResShift teacher precision 'bf16' \(sampler.precision"):
        ResShiftTeacher.from_options(opt)


@needs_onednn
def test_a_choice_that_is_no_longer_available_is_measured_again(monkeypatch):
    """A choice that is not among the candidates any more (a kernel table changed since) is measured again instead
    of failing; and switching the compiled kernels off changes the tuning key."""
    from dtkd_arch import cpu_kernels
    x, w, b = torch.randn(64, 12), torch.randn(20, 12), torch.randn(20)
    key = ('forward',) + cpu_ops._key(x, w, True)
    with cpu_kernels.using_kernels(False):
        assert cpu_ops._key(x, w, True) != key[1:]
    cpu_ops._choices[key] = 'compiled'
    monkeypatch.setattr(cpu_ops, '_candidates', lambda table, compiled: {
        name: fn for name, fn in table.items() if name != 'compiled'})
    with cpu_ops.using_linear_backend('auto'), torch.no_grad():
        out = cpu_ops.linear(x, w, b)
    assert cpu_ops._choices[key] in ('blas', 'onednn')
    assert torch.allclose(out, F.linear(x, w, b), atol=1e-6)


def test_compiled_product_takes_weights_that_are_views():
    """The compiled candidate copies a non-contiguous weight (a transposed view, say) instead of failing."""
    x, w, b = torch.randn(30, 12), torch.randn(12, 20).t(), torch.randn(40)[::2]
    cpu_ops._choices[('forward',) + cpu_ops._key(x, w, True)] = 'compiled'
    with cpu_ops.using_linear_backend('auto'), torch.no_grad():
        out = cpu_ops.linear(x, w, b)
    assert torch.allclose(out, F.linear(x, w, b), atol=1e-5)
