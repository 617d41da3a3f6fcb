"""Adaptive band-group weights of DWTKDLoss (group_weights: {type: adaptive, ...})."""
import pytest
import torch

import dtkd_loss  # noqa: F401  (registers the losses)
from dtkd_loss.adaptive_weights import AdaptiveGroupWeights
from dtkd_loss.dwt_kd_loss import DWTKDLoss

NAMES = ('LF', 'MF', 'HF')


def terms(lf, mf, hf):
    return {n: torch.tensor(v, dtype=torch.float64) for n, v in zip(NAMES, (lf, mf, hf))}


def test_constant_terms_keep_the_paper_weights():
    weights = AdaptiveGroupWeights(NAMES, {'type': 'adaptive'})
    assert weights.weights() == {'LF': 1.0, 'MF': 2.0, 'HF': 1.0}
    for _ in range(5):
        out = weights.update(terms(0.3, 0.2, 0.1))
    assert out == pytest.approx({'LF': 1.0, 'MF': 2.0, 'HF': 1.0}, abs=1e-12)


def test_the_update_rule_step_by_step():
    """Momentum 0.5, alpha 1: the numbers of the documented rule, computed by hand."""
    weights = AdaptiveGroupWeights(NAMES, {'type': 'adaptive', 'momentum': 0.5, 'low': 0.1, 'high': 10})
    weights.update(terms(1.0, 1.0, 1.0))
    out = weights.update(terms(1.0, 1.0, 0.2))  # HF fell: running means 1, 1, 0.6
    progress = [1 / (2.6 / 3), 1 / (2.6 / 3), 0.6 / (2.6 / 3)]
    raw = [1 * progress[0], 2 * progress[1], 1 * progress[2]]
    expected = [w * 4 / sum(raw) for w in raw]
    assert [out[n] for n in NAMES] == pytest.approx(expected, rel=1e-12)
    assert out['HF'] < 1 < out['LF'] and sum(out.values()) == pytest.approx(4.0)


def test_weights_stay_within_their_bounds():
    weights = AdaptiveGroupWeights(NAMES, {'type': 'adaptive', 'momentum': 0.0, 'alpha': 3, 'low': 0.5,
                                           'high': 1.5})
    weights.update(terms(1.0, 1.0, 1.0))
    out = weights.update(terms(1.0, 1.0, 1e-6))
    assert out['HF'] == pytest.approx(0.5) and out['LF'] <= 1.5 + 1e-12 and out['MF'] <= 3.0 + 1e-12


def test_loss_uses_the_weights_without_a_gradient_path_and_resumes_from_its_state():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.rand(2, 3, 16, 16, generator=g), torch.rand(2, 3, 16, 16, generator=g)
    loss = DWTKDLoss(group_weights={'type': 'adaptive', 'momentum': 0.0})
    loss(pred, target)  # first step fixes the starting point
    p = pred.clone().requires_grad_(True)
    value = loss(p, target * 0.5)
    w = loss.group_weights_now()
    group_terms = loss.group_losses(pred, target * 0.5)
    assert value.item() == pytest.approx(sum(w[n] * group_terms[n].item() for n in NAMES), rel=1e-6)
    value.backward()
    q = pred.clone().requires_grad_(True)
    fixed = loss.group_losses(q, target * 0.5)
    sum(w[n] * fixed[n] for n in NAMES).backward()  # the same weights as constants
    torch.testing.assert_close(p.grad, q.grad, atol=1e-7, rtol=0)
    # the state goes through a state dict (what the training state saves) and comes back
    restored = DWTKDLoss(group_weights={'type': 'adaptive', 'momentum': 0.0})
    restored.load_state_dict(loss.state_dict())
    assert restored.group_weights_now() == pytest.approx(w)
    # evaluation does not move the weights
    loss.eval()
    loss(pred, target)
    assert loss.group_weights_now() == w


def test_option_errors_name_the_key():
    for options, key in (({'type': 'adaptiv'}, 'group_weights.type'), ({'type': 'adaptive', 'alpah': 1}, 'alpah'),
                         ({'type': 'adaptive', 'low': 0}, 'group_weights.low'),
                         ({'type': 'adaptive', 'momentum': 2}, 'group_weights.momentum'),
                         ({'type': 'adaptive', 'base': [1, 2]}, 'group_weights')):
        with pytest.raises(ValueError, match=key):
            DWTKDLoss(group_weights=options)


def test_training_logs_the_weights_and_confidence_and_resume_restores_the_weights(tiny_pairs, tmp_path):
    import forking

    from conftest import train_options, write_yaml
    from dtkd import train
    from dtkd_arch.checkpoint import safe_torch_load

    kd = {'type': 'ConfidenceDWTKDLoss', 'loss_weight': 2.0, 'confidence': {'type': 'gt_agreement', 'tau': 0.05},
          'group_weights': {'type': 'adaptive', 'momentum': 0.5}}
    opt = train_options(tiny_pairs, 'adaptive', total_iter=4, save_freq=2, kd_opt=kd,
                        kd_schedule={'type': 'linear'})
    yml = write_yaml(tmp_path / 'adaptive.yml', opt)
    code, out = forking.run_entry_point(train, ['dtkd-train', '-opt', yml, '--force_yml', 'train:total_iter=2'],
                                        str(tmp_path / 'log1'), str(tmp_path))
    assert code == 0, out[-3000:]
    assert 'kd_w_LF' in out and 'kd_conf_HF' in out
    state = safe_torch_load(str(tmp_path / 'experiments' / 'adaptive' / 'training_states' / '2.state'))
    saved = state['kd_adaptive_weights']
    assert int(saved['count']) == 2 and saved['current'].sum().item() == pytest.approx(4.0)
    code, out = forking.run_entry_point(train, ['dtkd-train', '-opt', yml, '--auto_resume'], str(tmp_path / 'log2'),
                                        str(tmp_path))
    assert code == 0, out[-3000:]
    assert 'Resumed the adaptive band-group weights at' in out
    final = safe_torch_load(str(tmp_path / 'experiments' / 'adaptive' / 'training_states' / '4.state'))
    assert int(final['kd_adaptive_weights']['count']) == 4  # continued from 2, not restarted
