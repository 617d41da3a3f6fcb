"""SwinIRStudent: BasicSR's SwinIR for any image size, with autocast; same weights and computation."""
import pytest
import torch
import torch.nn.functional as F
from basicsr.archs.swinir_arch import SwinIR

from conftest import TINY_STUDENT
from dtkd_arch.swinir_student_arch import SwinIRStudent
from dtkd_utils import device as device_utils

PARAMS = {k: v for k, v in TINY_STUDENT.items() if k != 'type'}


def pair(seed=0):
    torch.manual_seed(seed)
    ref = SwinIR(**PARAMS).eval()
    student = SwinIRStudent(**PARAMS).eval()
    student.load_state_dict(ref.state_dict(), strict=True)
    return ref, student


def test_same_keys_and_outputs_as_basicsr_on_window_multiples():
    ref, student = pair()
    assert list(ref.state_dict()) == list(student.state_dict())
    x = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(student(x), ref(x))


def test_any_size_is_reflect_padded_and_cropped_back():
    ref, student = pair()
    x = torch.rand(1, 3, 13, 10, generator=torch.Generator().manual_seed(2))
    padded = F.pad(x, (0, 6, 0, 3), mode='reflect')  # independent: one reflection reaches 16 x 16
    with torch.no_grad():
        out = student(x)
        expected = ref(padded)[..., :52, :40]
    assert out.shape == (1, 3, 52, 40)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


def test_gradients_equal_basicsr():
    ref, student = pair()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    for net in (ref, student):  # eval mode: stochastic depth (drop_path_rate 0.1) would draw differently
        net(x).square().mean().backward()
    for (name, a), (_, b) in zip(ref.named_parameters(), student.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=0, rtol=0, msg=name)


@pytest.mark.parametrize('native_bf16', [True, False])
def test_bf16_autocast_is_close_to_fp32_and_keeps_the_dtype(native_bf16, monkeypatch):
    monkeypatch.setattr(device_utils, 'cpu_flags', lambda: frozenset({'amx_bf16'} if native_bf16 else {'avx2'}))
    ref, _ = pair()
    student = SwinIRStudent(**PARAMS, precision='bf16').eval()
    student.load_state_dict(ref.state_dict())
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out, expected = student(x), ref(x.double().float())
    assert out.dtype == torch.float32
    assert (out - expected).abs().max().item() < 0.05  # bf16 keeps 8 bits of mantissa
    with pytest.warns(RuntimeWarning, match='bf16') if not native_bf16 else _no_warning():
        device_utils.check_precision('bf16', 'cpu', 'network_g.precision')


class _no_warning:
    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter('error')

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def test_bad_options_name_the_key():
    with pytest.raises(ValueError, match='network_g.precision'):
        SwinIRStudent(**PARAMS, precision='fp64')
    with pytest.raises(ValueError, match='network_g.windw_size'):
        SwinIRStudent(**PARAMS, windw_size=8)
