"""A trained student checkpoint is readable by the SwinIR ecosystem, unchanged.

References produced once from the official SwinIR code (github.com/JingyunLiang/SwinIR,
``models/network_swinir.py`` at commit 6545850fbf8df298df73d81f3e8cba638787c8bd; the code itself is
not part of this project) and committed under tests/data/:

* ``swinir_official_keys.txt``: ``key<TAB>shape`` of every state-dict entry of the official ``SwinIR``
  built with the paper's student configuration (929,628 parameters).
* ``swinir_official_reference.pt``: the official network in the TINY_STUDENT configuration, its
  parameters drawn from ``torch.Generator().manual_seed(2021)`` (N(0, 1/fan_in) for matrices and
  kernels, 1 + 0.1 N for norm weights, 0.05 N otherwise) and its buffers as built; its state dict,
  two inputs (13 x 18 and 16 x 24) and the official outputs for them.

spandrel (the loader of ComfyUI, chaiNNer and others) is pinned in requirements.txt and loads the
checkpoint by detecting the architecture from the keys alone.
"""
import os

import pytest
import torch
from basicsr.archs.swinir_arch import SwinIR

from conftest import TINY_STUDENT, read_keys
from dtkd.infer import PAPER_STUDENT
from dtkd_arch.swinir_student_arch import SwinIRStudent

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data')


def params(config):
    return {k: v for k, v in config.items() if k != 'type'}


@pytest.fixture(scope='module')
def reference():
    return torch.load(os.path.join(DATA, 'swinir_official_reference.pt'), weights_only=True)


@pytest.fixture(scope='module')
def trained_checkpoint(tmp_path_factory):
    """A student checkpoint as training saves it (BasicSR's save_network: params and params_ema)."""
    torch.manual_seed(7)
    net = SwinIRStudent(**params(PAPER_STUDENT))
    for p in net.parameters():  # away from the initialisation, as after training
        p.data.add_(0.02 * torch.randn_like(p))
    path = tmp_path_factory.mktemp('ckpt') / 'net_g_latest.pth'
    torch.save({'params': net.state_dict(), 'params_ema': net.state_dict()}, path)
    return str(path), net.eval()


def test_student_keys_are_the_official_swinir_keys():
    official = read_keys('swinir_official_keys.txt')
    for cls in (SwinIRStudent, SwinIR):
        net = cls(**params(PAPER_STUDENT))
        assert [(k, tuple(v.shape)) for k, v in net.state_dict().items()] == official, cls.__name__
    assert sum(p.numel() for p in net.parameters()) == 929_628


def test_official_checkpoint_and_outputs_reproduced(reference):
    """The official network's weights load strictly into SwinIRStudent and BasicSR's SwinIR, and both give
    the official outputs (the official forward reflect-pads odd sizes; so do SwinIRStudent and dtkd-infer)."""
    from dtkd_arch.tiling import forward_padded

    assert reference['config'] == params(TINY_STUDENT)
    fast = SwinIRStudent(**reference['config']).eval()
    fast.load_state_dict(reference['state_dict'], strict=True)
    basic = SwinIR(**reference['config']).eval()
    basic.load_state_dict(reference['state_dict'], strict=True)
    for name, x in reference['inputs'].items():
        with torch.no_grad():
            torch.testing.assert_close(fast(x), reference['outputs'][name], atol=1e-5, rtol=0)
            torch.testing.assert_close(forward_padded(basic, x, 8, 4), reference['outputs'][name], atol=1e-5, rtol=0)


def test_trained_checkpoint_loads_unchanged_into_basicsr_swinir(trained_checkpoint):
    path, student = trained_checkpoint
    state = torch.load(path, weights_only=True)
    basic = SwinIR(**params(PAPER_STUDENT)).eval()
    basic.load_state_dict(state['params_ema'], strict=True)
    x = torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(student(x), basic(x), atol=1e-5, rtol=0)


def test_trained_checkpoint_loads_into_spandrel(trained_checkpoint):
    import spandrel

    path, student = trained_checkpoint
    descriptor = spandrel.ModelLoader().load_from_file(path)
    assert descriptor.architecture.name == 'SwinIR'
    assert descriptor.scale == 4 and descriptor.input_channels == 3 and descriptor.output_channels == 3
    x = torch.rand(1, 3, 19, 21, generator=torch.Generator().manual_seed(1))  # spandrel pads odd sizes itself
    with torch.no_grad():
        torch.testing.assert_close(descriptor.model.eval()(x), student(x), atol=1e-5, rtol=0)
