"""Checkpoint loading: wrapper layouts, key prefixes and the error messages users see."""
import collections

import pytest
import torch
from torch import nn

from dtkd_arch.checkpoint import CheckpointFormatError, CheckpointMismatchError, load_pretrained, load_state_dict_file


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Conv2d(4, 2, 1))


def reference_state():
    return {k: v.clone() for k, v in small_net().state_dict().items()}


@pytest.mark.parametrize('wrap', ['bare', 'state_dict', 'params', 'params_ema', 'module', 'compiled', 'ddp_compiled'])
def test_layouts_load_to_the_same_tensors(tmp_path, wrap):
    state = reference_state()
    if wrap in ('state_dict', 'params', 'params_ema'):
        payload = {wrap: state, 'epoch': 3}
    elif wrap == 'module':
        payload = {'module.' + k: v for k, v in state.items()}
    elif wrap == 'compiled':
        payload = {'_orig_mod.' + k: v for k, v in state.items()}
    elif wrap == 'ddp_compiled':
        payload = {'state_dict': {'module._orig_mod.' + k: v for k, v in state.items()}}
    else:
        payload = state
    path = tmp_path / 'w.pth'
    torch.save(payload, path)
    loaded = load_state_dict_file(path)
    assert list(loaded) == list(state)
    for k in state:
        assert torch.equal(loaded[k], state[k])

    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Conv2d(4, 2, 1))
    load_pretrained(net, path, what='test net')
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k])


def test_params_ema_preferred_over_params(tmp_path):
    state = reference_state()
    other = {k: torch.zeros_like(v) for k, v in state.items()}
    torch.save({'params': other, 'params_ema': state}, tmp_path / 'basicsr.pth')
    loaded = load_state_dict_file(tmp_path / 'basicsr.pth')
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_missing_file_message_names_file_and_download(tmp_path):
    path = tmp_path / 'weights' / 'resshift_realsrx4_s15_v1.pth'
    with pytest.raises(FileNotFoundError) as info:
        load_pretrained(small_net(), path, what='ResShift UNet', option_key='unet.ckpt')
    msg = str(info.value)
    assert 'ResShift UNet' in msg and str(path) in msg
    assert 'github.com/zsyOAOA/ResShift/releases' in msg and 'unet.ckpt' in msg


def test_mismatch_lists_missing_unexpected_and_shapes(tmp_path):
    state = collections.OrderedDict(reference_state())
    state.pop('1.bias')                        # missing
    state['3.weight'] = torch.zeros(1)         # unexpected
    state['0.weight'] = torch.zeros(4, 3, 5, 5)  # shape difference
    path = tmp_path / 'bad.pth'
    torch.save(state, path)
    with pytest.raises(CheckpointMismatchError) as info:
        load_pretrained(small_net(), path, what='VQ autoencoder')
    msg = str(info.value)
    assert 'VQ autoencoder' in msg and str(path) in msg
    assert '1 missing keys' in msg and '1.bias' in msg
    assert '1 unexpected keys' in msg and '3.weight' in msg
    assert '1 shape differences' in msg and '0.weight: checkpoint (4, 3, 5, 5) vs network (4, 3, 3, 3)' in msg


def test_mismatch_truncates_long_lists(tmp_path):
    torch.save({f'extra.{i}': torch.zeros(1) for i in range(25)} | reference_state(), tmp_path / 'many.pth')
    with pytest.raises(CheckpointMismatchError) as info:
        load_pretrained(small_net(), tmp_path / 'many.pth', limit=5)
    msg = str(info.value)
    assert '25 unexpected keys (first 5)' in msg
    assert 'extra.4' in msg and 'extra.5' not in msg


def test_non_strict_ignores_extra_keys_but_not_shapes(tmp_path):
    state = reference_state()
    state['extra'] = torch.ones(2)
    torch.save(state, tmp_path / 'extra.pth')
    net = load_pretrained(small_net(), tmp_path / 'extra.pth', strict=False)
    assert torch.equal(net.state_dict()['0.weight'], state['0.weight'])
    state['0.weight'] = torch.zeros(1)
    torch.save(state, tmp_path / 'shape.pth')
    with pytest.raises(CheckpointMismatchError, match='shape differences'):
        load_pretrained(small_net(), tmp_path / 'shape.pth', strict=False)


def test_not_a_state_dict(tmp_path):
    torch.save({'epoch': 3, 'lr': 0.1}, tmp_path / 'meta.pth')
    with pytest.raises(CheckpointFormatError, match='not a state dict'):
        load_state_dict_file(tmp_path / 'meta.pth', what='ResShift UNet')
