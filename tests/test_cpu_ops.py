"""dtkd_arch.cpu_ops.linear (oneDNN 1x1 convolution) against torch.nn.functional.linear."""
import pytest
import torch
import torch.nn.functional as F

from dtkd_arch import cpu_ops


@pytest.mark.parametrize('shape, cin, cout, bias, layout', [
    ((300, ), 60, 180, True, 'rows'),
    ((2, 37, ), 13, 7, False, 'rows'),
    ((3, 5, 11), 24, 72, True, 'rows'),
    ((4, 9), 16, 48, True, 'transposed'),  # non-contiguous rows: (B, HW, C) view of an NCHW image
    ((1, ), 8, 3, True, 'rows'),
])
def test_linear_matches_f_linear_values_and_gradients(shape, cin, cout, bias, layout):
    torch.manual_seed(0)
    if layout == 'transposed':
        x = torch.randn(shape[0], cin, shape[1], dtype=torch.float32).transpose(1, 2)
    else:
        x = torch.randn(*shape, cin)
    w = torch.randn(cout, cin) * 0.2
    b = torch.randn(cout) if bias else None
    grads = []
    outs = []
    for fn in (F.linear, cpu_ops.linear):
        xi, wi = x.detach().clone().requires_grad_(), w.clone().requires_grad_()
        bi = b.clone().requires_grad_() if bias else None
        out = fn(xi, wi, bi)
        out.backward(torch.cos(torch.arange(out.numel(), dtype=out.dtype)).view(out.shape))
        outs.append(out.detach())
        grads.append([xi.grad, wi.grad] + ([bi.grad] if bias else []))
    assert outs[1].shape == outs[0].shape
    assert torch.allclose(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    for got, expected in zip(grads[1], grads[0]):
        assert torch.allclose(got, expected, atol=1e-4, rtol=1e-5)


def test_linear_bf16_and_backend_switch(monkeypatch):
    torch.manual_seed(1)
    x, w, b = torch.randn(64, 32), torch.randn(16, 32) * 0.2, torch.randn(16)
    expected = F.linear(x, w, b)
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


def test_linear_module_keeps_nn_linear_keys():
    m = cpu_ops.Linear(5, 3)
    assert isinstance(m, torch.nn.Linear)
    assert set(m.state_dict()) == {'weight', 'bias'}
    x = torch.randn(7, 5)
    assert torch.allclose(m(x), F.linear(x, m.weight, m.bias), atol=1e-6)


def test_environment_variable_selects_the_backend(monkeypatch):
    monkeypatch.setenv('DTKD_CPU_LINEAR', 'BLAS')
    assert cpu_ops._backend_from_environment() == 'blas'
    monkeypatch.setenv('DTKD_CPU_LINEAR', 'mkl')
    with pytest.raises(ValueError, match='DTKD_CPU_LINEAR'):
        cpu_ops._backend_from_environment()
    monkeypatch.delenv('DTKD_CPU_LINEAR')
    assert cpu_ops._backend_from_environment() == 'onednn'
