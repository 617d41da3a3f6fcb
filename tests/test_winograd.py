"""Winograd F(2x2, 3x3) convolutions (dtkd_arch.cpu_kernels.conv3x3_winograd and Conv2d) against an independent
float64 F.conv2d, and the rules of when Conv2d uses them."""
import dtkd_compat  # noqa: F401, I001  (must precede basicsr)

# isort: split
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dtkd_arch import cpu_kernels, cpu_ops


@pytest.fixture(scope='module', autouse=True)
def built():
    assert cpu_kernels.available(), cpu_kernels.build_error()


def _case(n, c, co, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g)
    weight = torch.randn(co, c, 3, 3, generator=g) / (3 * c ** 0.5)
    bias = torch.randn(co, generator=g)
    return x, weight, bias


def _errors(x, weight, bias):
    """(Winograd error, direct fp32 error) against float64, max abs."""
    ref = F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), padding=1)
    got = cpu_kernels.conv3x3_winograd(x, cpu_kernels.winograd_weights(weight), bias)
    direct = F.conv2d(x, weight, bias, padding=1)
    assert got.shape == ref.shape and got.dtype == torch.float32 and got.is_contiguous()
    return (got.double() - ref).abs().max().item(), (direct.double() - ref).abs().max().item()


@pytest.mark.parametrize('n, c, co, h, w, block_tiles', [
    (1, 16, 24, 32, 32, 1024),  # one block
    (2, 7, 5, 9, 11, 1024),  # odd height and width: partial tiles at the bottom and right
    (1, 3, 4, 1, 1, 1024),  # a single pixel: every neighbour is padding
    (1, 2, 3, 2, 5, 1024),
    (3, 8, 8, 13, 6, 4),  # blocks of 2 tile rows (4 tiles, 3 per row): several blocks, a short last one
    (1, 40, 33, 20, 36, 18),  # blocks of one tile row
])
def test_matches_float64_reference(n, c, co, h, w, block_tiles, monkeypatch):
    monkeypatch.setattr(cpu_kernels, '_BLOCK_TILES', block_tiles)
    x, weight, bias = _case(n, c, co, h, w)
    for b in (bias, None):
        err, direct = _errors(x, weight, b)
        # F(2x2, 3x3) transforms multiply by 0, +-1 and +-1/2 only: as accurate as a direct fp32 convolution
        assert err <= 2 * direct + 1e-6, (err, direct)


def test_real_layer_width_is_as_accurate_as_direct():
    """A ResShift width (160 channels, 32 x 32): measured Winograd error below 1.2x the direct one."""
    x, weight, bias = _case(1, 160, 160, 32, 32, seed=3)
    err, direct = _errors(x, weight, bias)
    assert err < 1.2 * direct, (err, direct)


def test_weights_transform_matches_definition():
    weight = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    g = torch.tensor(cpu_kernels._G, dtype=torch.float64)
    u = cpu_kernels.winograd_weights(weight)
    assert u.shape == (16, 4, 3) and u.dtype == torch.float32
    for o in range(4):
        for i in range(3):
            expected = (g @ weight[o, i] @ g.T).flatten()
            assert torch.allclose(u[:, o, i].double(), expected, atol=1e-6)
    with pytest.raises(ValueError, match=r'\(Co, Ci, 3, 3\)'):
        cpu_kernels.winograd_weights(torch.zeros(4, 3, 5, 5))


def test_transform_operators_reject_bad_inputs():
    x = torch.randn(1, 4, 6, 6)
    v = torch.empty(16, 4, 3)  # one tile row of 3 tiles
    torch.ops.dtkd_cpu.winograd_f2_input(x, 0, 0, 1, v)
    with pytest.raises(RuntimeError, match='winograd_f2_input v: a contiguous float32 tensor'):
        torch.ops.dtkd_cpu.winograd_f2_input(x, 0, 0, 2, v)  # two tile rows do not fit
    with pytest.raises(RuntimeError, match=r'tile rows \[2, 4\) outside 1 images of 3 tile rows'):
        torch.ops.dtkd_cpu.winograd_f2_input(x, 0, 2, 2, torch.empty(16, 4, 6))
    with pytest.raises(RuntimeError, match='image 1'):
        torch.ops.dtkd_cpu.winograd_f2_input(x, 1, 0, 1, v)
    with pytest.raises(RuntimeError, match=r'contiguous float32 CPU tensor \(N, C, H, W\)'):
        torch.ops.dtkd_cpu.winograd_f2_input(x.double(), 0, 0, 1, v)
    out = torch.empty(1, 5, 6, 6)
    with pytest.raises(RuntimeError, match='winograd_f2_output bias: a contiguous float32 vector of 5 values'):
        torch.ops.dtkd_cpu.winograd_f2_output(torch.empty(16, 5, 3), torch.zeros(4), 0, 0, 1, out)
    with pytest.raises(ValueError, match=r'transformed weights \(16, Co, Ci\)'):
        cpu_kernels.conv3x3_winograd(x, torch.zeros(16, 5, 3))


@pytest.mark.parametrize('algorithm', ['winograd', 'direct', 'auto', 'tuned'])
def test_conv2d_module_matches_nn_conv2d(algorithm, monkeypatch):
    calls = []
    original = cpu_kernels.conv3x3_winograd
    monkeypatch.setattr(cpu_kernels, 'conv3x3_winograd', lambda *a: calls.append(1) or original(*a))
    monkeypatch.setattr(cpu_ops, '_choices', {})
    torch.manual_seed(0)
    plain = nn.Conv2d(16, 20, 3, padding=1)
    conv = cpu_kernels.Conv2d(16, 20, 3, padding=1)
    assert list(conv.state_dict()) == list(plain.state_dict())
    conv.load_state_dict(plain.state_dict())
    x = torch.randn(2, 16, 17, 10)
    with cpu_kernels.using_conv_algorithm(algorithm), torch.no_grad():
        assert (conv(x) - plain(x)).abs().max().item() < 1e-5
        assert (conv(x.contiguous(memory_format=torch.channels_last)) - plain(x)).abs().max().item() < 1e-5
    assert bool(calls) == (algorithm != 'direct')  # 'tuned' measures both (then keeps the faster)
    tuned = {k: v for k, v in cpu_ops.linear_choices().items() if k[0] == 'conv3x3'}
    if algorithm == 'tuned':
        (key, choice), = tuned.items()
        assert key[1] == (2, 16, 17, 10) and choice in ('direct', 'winograd')
    else:
        assert not tuned


def test_auto_runs_few_channel_convolutions_direct(monkeypatch):
    calls = []
    original = cpu_kernels.conv3x3_winograd
    monkeypatch.setattr(cpu_kernels, 'conv3x3_winograd', lambda *a: calls.append(a[1].shape) or original(*a))
    x = torch.randn(1, 3, 8, 8)
    with cpu_kernels.using_conv_algorithm('auto'), torch.no_grad():
        low = cpu_kernels.WINOGRAD_MIN_CHANNELS
        first = cpu_kernels.Conv2d(3, 64, 3, padding=1)  # an image in: direct
        hidden = cpu_kernels.Conv2d(64, low, 3, padding=1)  # both at the threshold: Winograd
        last = cpu_kernels.Conv2d(low, 3, 3, padding=1)  # an image out: direct
        y = last(hidden(first(x)))
        ref = F.conv2d(F.conv2d(F.conv2d(x, first.weight, first.bias, padding=1), hidden.weight, hidden.bias,
                                padding=1), last.weight, last.bias, padding=1)
    assert torch.allclose(y, ref, atol=1e-5)
    assert calls == [(16, low, 64)]


@pytest.mark.parametrize('algorithm', ['winograd', 'auto', 'tuned', 'direct'])
@pytest.mark.parametrize('bias, input_grad', [(True, True), (False, True), (True, False)])
def test_conv2d_module_gradients_match_float64(algorithm, bias, input_grad, monkeypatch):
    calls = []
    original = cpu_kernels.conv3x3_winograd
    monkeypatch.setattr(cpu_kernels, 'conv3x3_winograd', lambda *a: calls.append(a[0].shape) or original(*a))
    monkeypatch.setattr(cpu_ops, '_choices', {})
    torch.manual_seed(2)
    conv = cpu_kernels.Conv2d(16, 18, 3, padding=1, bias=bias)
    ref = nn.Conv2d(16, 18, 3, padding=1, bias=bias).double()
    ref.load_state_dict(conv.state_dict())
    x = torch.randn(2, 16, 11, 8, requires_grad=input_grad)
    x64 = x.detach().double().requires_grad_(input_grad)
    g = torch.randn(2, 18, 11, 8)
    with cpu_kernels.using_conv_algorithm(algorithm):
        out = conv(x)
        out.backward(g)
    expected = ref(x64)
    expected.backward(g.double())
    pairs = [(out, expected), (conv.weight.grad, ref.weight.grad)]
    pairs += [(x.grad, x64.grad)] if input_grad else []
    pairs += [(conv.bias.grad, ref.bias.grad)] if bias else []
    for got, want in pairs:
        assert got.shape == want.shape
        assert (got.double() - want).abs().max().item() < 1e-5 * max(1.0, want.abs().max().item())
    if not input_grad:
        assert x.grad is None
    if algorithm in ('winograd', 'auto'):  # the forward, and the input gradient (a convolution of 18 channels)
        assert calls == [(2, 16, 11, 8)] + ([(2, 18, 11, 8)] if input_grad else [])
    elif algorithm == 'direct':
        assert not calls


def test_conv2d_module_uses_the_plain_convolution_where_winograd_does_not_apply(monkeypatch):
    def fail(*args):
        raise AssertionError('Winograd used where it must not be')

    monkeypatch.setattr(cpu_kernels, 'conv3x3_winograd', fail)
    x = torch.randn(1, 4, 8, 8)
    with cpu_kernels.using_conv_algorithm('winograd'), torch.no_grad():
        conv = cpu_kernels.Conv2d(4, 6, 3, padding=1)
        for other in (cpu_kernels.Conv2d(4, 6, 3, stride=2, padding=1), cpu_kernels.Conv2d(4, 6, 1),
                      cpu_kernels.Conv2d(4, 6, 3, padding=1, padding_mode='reflect'),
                      cpu_kernels.Conv2d(4, 6, 3, padding=2, dilation=2),
                      cpu_kernels.Conv2d(4, 4, 3, padding=1, groups=2)):
            other(x)
        conv.double()(x.double())
        with torch.autocast('cpu', dtype=torch.bfloat16):
            assert conv.float()(x).dtype == torch.bfloat16
        with cpu_kernels.using_kernels(False):
            conv(x)


def test_cached_transformed_weights_follow_weight_changes():
    torch.manual_seed(1)
    conv = cpu_kernels.Conv2d(5, 5, 3, padding=1)
    x = torch.randn(1, 5, 6, 6)
    with cpu_kernels.using_conv_algorithm('winograd'), torch.no_grad():
        first = conv(x)
        assert torch.allclose(first, F.conv2d(x, conv.weight, conv.bias, padding=1), atol=1e-5)
        conv.weight.mul_(2)  # in place, as an optimiser step
        assert torch.allclose(conv(x) - conv.bias.view(1, -1, 1, 1),
                              2 * (first - conv.bias.view(1, -1, 1, 1)), atol=1e-5)
        other = cpu_kernels.Conv2d(5, 5, 3, padding=1)
        conv.load_state_dict(other.state_dict())
        assert torch.allclose(conv(x), other(x), atol=1e-5)
        conv.weight = nn.Parameter(torch.zeros_like(conv.weight))  # a new tensor
        assert torch.allclose(conv(x), conv.bias.view(1, -1, 1, 1).expand(1, 5, 6, 6), atol=1e-6)
    with torch.inference_mode():
        weight = torch.randn(5, 5, 3, 3)  # an inference tensor has no version counter
        conv.weight = nn.Parameter(weight, requires_grad=False)
        with cpu_kernels.using_conv_algorithm('winograd'):
            assert torch.allclose(conv(x), F.conv2d(x, weight, conv.bias, padding=1), atol=1e-5)


def test_large_inputs_are_tuned_on_a_strip(monkeypatch):
    x = torch.zeros(2, 64, 200, 100)
    assert cpu_kernels._probe(x, 64) is None  # 4 GFLOP of probe would be more than half of it
    monkeypatch.setattr(cpu_kernels, '_PROBE_FLOP', 1e8)
    probe, = cpu_kernels._probe(x, 64)
    # at least one block of tile rows (1024 tiles at 50 per row: 20 tile rows, 40 image rows)
    assert probe.shape == (1, 64, 40, 100) and probe.is_contiguous()
    assert cpu_kernels._probe(torch.zeros(1, 8, 16, 16), 8) is None  # small: measured on itself
    seen = []
    monkeypatch.setattr(cpu_ops, '_choices', {})
    monkeypatch.setattr(cpu_kernels, '_conv_algorithm', 'tuned')
    monkeypatch.setattr(cpu_kernels, '_PROBE_FLOP', 1e6)
    monkeypatch.setattr(cpu_kernels, '_BLOCK_TILES', 32)
    original = cpu_kernels.conv3x3_winograd
    monkeypatch.setattr(cpu_kernels, 'conv3x3_winograd', lambda t, *a: seen.append(t.shape) or original(t, *a))
    conv = cpu_kernels.Conv2d(8, 8, 3, padding=1)
    x = torch.randn(1, 8, 64, 32)
    with torch.no_grad():
        out = conv(x)
    assert torch.allclose(out, F.conv2d(x, conv.weight, conv.bias, padding=1), atol=1e-5)
    assert seen[0][2] < 64 and len(seen) >= 4  # measured on strips (untimed + timed runs)
    assert seen[-1][2] == 64 or cpu_ops.linear_choices()[('conv3x3', (1, 8, 64, 32), 8, True,
                                                          torch.get_num_threads())] == 'direct'


def test_set_conv_algorithm_and_environment_variable(monkeypatch):
    with pytest.raises(ValueError, match='convolution algorithm must be one of'):
        cpu_kernels.set_conv_algorithm('fft')
    assert cpu_kernels.conv_algorithm() == 'auto'
    monkeypatch.setenv('DTKD_CPU_CONV', 'Direct')
    assert cpu_ops.choice_from_environment(cpu_kernels._CONV_ENV, cpu_kernels._CONV_ALGORITHMS) == 'direct'
    monkeypatch.setenv('DTKD_CPU_CONV', 'fft')
    with pytest.raises(ValueError, match="DTKD_CPU_CONV='fft'"):
        cpu_ops.choice_from_environment(cpu_kernels._CONV_ENV, cpu_kernels._CONV_ALGORITHMS)
    monkeypatch.delenv('DTKD_CPU_CONV')
    assert cpu_ops.choice_from_environment(cpu_kernels._CONV_ENV, cpu_kernels._CONV_ALGORITHMS) == 'auto'
