"""ConfidenceDWTKDLoss against an independent computation (a two-level orthonormal Haar DWT written here
in float64), and the properties it promises: equal to DWTKDLoss where the teacher agrees with the GT,
a 10x smaller gradient where the teacher departs from the GT by far more than tau, unchanged elsewhere."""
import math

import pytest
import torch
from basicsr.utils.registry import LOSS_REGISTRY

import dtkd_loss  # noqa: F401  (registers the losses)
from dtkd_loss.confidence_kd_loss import ConfidenceDWTKDLoss
from dtkd_loss.dwt_kd_loss import DWTKDLoss

TAU = 0.05


def haar_level(x):
    """(..., H, W) with even H, W -> LL, (LH, HL, HH) of one orthonormal Haar level."""
    a, b = x[..., 0::2, 0::2], x[..., 0::2, 1::2]
    c, d = x[..., 1::2, 0::2], x[..., 1::2, 1::2]
    return (a + b + c + d) / 2, ((a + b - c - d) / 2, (a - b + c - d) / 2, (a - b - c + d) / 2)


def inverse_haar_level(ll, details):
    """Inverse of :func:`haar_level` (the transform is orthonormal: its inverse is its transpose)."""
    lh, hl, hh = details
    out = ll.new_zeros(*ll.shape[:-2], 2 * ll.shape[-2], 2 * ll.shape[-1])
    out[..., 0::2, 0::2] = (ll + lh + hl + hh) / 2
    out[..., 0::2, 1::2] = (ll + lh - hl - hh) / 2
    out[..., 1::2, 0::2] = (ll - lh + hl - hh) / 2
    out[..., 1::2, 1::2] = (ll - lh - hl + hh) / 2
    return out


def groups_by_hand(x):
    """Two levels: {'LF': [LL2], 'MF': [level-2 details], 'HF': [level-1 details]}."""
    ll1, hf = haar_level(x)
    ll2, mf = haar_level(ll1)
    return {'LF': [ll2], 'MF': list(mf), 'HF': list(hf)}


def loss_by_hand(student, teacher, gt, tau, weights=(1, 2, 1)):
    s_groups, d_groups = groups_by_hand(student - teacher), groups_by_hand(teacher - gt)
    total = 0
    for (name, s_bands), w in zip(s_groups.items(), weights):
        num = count = 0
        for s, d in zip(s_bands, d_groups[name]):
            excess = torch.clamp(d.abs() - tau, min=0) / tau
            num = num + (torch.exp(-excess ** 2) * s.abs()).sum()
            count += s.numel()
        total = total + w * num / count
    return total


def images(seed, shape=(2, 3, 32, 32)):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(shape, generator=g, dtype=torch.float64) for _ in range(3)]


def test_matches_the_independent_computation():
    student, teacher, gt = images(0)
    gt = teacher + 0.2 * (gt - 0.5)  # differences around tau: every regime of the weight occurs
    loss = ConfidenceDWTKDLoss(confidence={'type': 'gt_agreement', 'tau': TAU})
    value = loss(student, teacher, gt=gt)
    expected = loss_by_hand(student, teacher, gt, TAU)
    assert abs(value.item() - expected.item()) < 1e-12
    confidences = loss.last_confidence
    assert set(confidences) == {'LF', 'MF', 'HF'} and all(0 < float(c) < 1 for c in confidences.values())


def test_teacher_equal_to_gt_gives_plain_dwt_kd():
    student, teacher, _ = images(1)
    plain = DWTKDLoss(loss_weight=2.0)(student, teacher)
    conf = ConfidenceDWTKDLoss(loss_weight=2.0, confidence={'type': 'gt_agreement', 'tau': TAU})
    assert conf(student, teacher, gt=teacher.clone()).item() == pytest.approx(plain.item(), rel=0, abs=1e-14)
    assert all(float(c) == 1.0 for c in conf.last_confidence.values())


def test_an_artifact_in_the_teacher_is_not_distilled_and_the_rest_is_unchanged():
    """An artifact pasted into the teacher (texture the GT does not have, departing from it by 0.5 >> tau in
    every coefficient of an 8x8 region): the student's gradient inside the region falls by at least 10x
    against plain DWT-KD; outside it (the region is aligned to the 4x4 support of the two-level Haar
    coefficients) the gradient is exactly plain DWT-KD's."""
    student, gt, _ = images(2)
    g = torch.Generator().manual_seed(3)
    teacher = gt + 0.01 * (torch.rand(gt.shape, generator=g, dtype=gt.dtype) - 0.5)

    def coefficients(size):
        return 0.5 * torch.sign(torch.randn(2, 3, size, size, generator=g, dtype=gt.dtype))

    ll1 = inverse_haar_level(coefficients(2), [coefficients(2) for _ in range(3)])
    teacher[..., 8:16, 12:20] += inverse_haar_level(ll1, [coefficients(4) for _ in range(3)])
    region = torch.zeros_like(gt, dtype=torch.bool)
    region[..., 8:16, 12:20] = True
    grads = {}
    for name, loss in (('plain', DWTKDLoss()),
                       ('confidence', ConfidenceDWTKDLoss(confidence={'type': 'gt_agreement', 'tau': TAU}))):
        s = student.clone().requires_grad_(True)
        (loss(s, teacher) if name == 'plain' else loss(s, teacher, gt=gt)).backward()
        grads[name] = s.grad
    inside = grads['plain'][region].abs().mean() / grads['confidence'][region].abs().mean()
    assert inside >= 10, inside.item()
    torch.testing.assert_close(grads['confidence'][~region], grads['plain'][~region], atol=1e-15, rtol=0)


def test_the_confidence_is_not_a_path_for_gradients():
    student, teacher, gt = images(4)
    teacher.requires_grad_(True)
    gt.requires_grad_(True)
    loss = ConfidenceDWTKDLoss(confidence={'type': 'gt_agreement', 'tau': TAU})
    loss(student.requires_grad_(True), teacher, gt=gt).backward()
    assert gt.grad is None  # the GT only enters the (detached) weights
    # the teacher gets exactly the negated student gradient: nothing through the weights
    torch.testing.assert_close(teacher.grad, -student.grad, atol=1e-15, rtol=0)


def test_per_group_tau_and_option_errors():
    student, teacher, gt = images(5)
    gt = teacher + 0.3 * (gt - 0.5)
    loss = ConfidenceDWTKDLoss(confidence={'type': 'gt_agreement', 'tau': [1e3, 1e3, 1e-3]})
    loss(student, teacher, gt=gt)
    assert float(loss.last_confidence['LF']) == 1.0 and float(loss.last_confidence['HF']) < 0.05
    assert LOSS_REGISTRY.get('ConfidenceDWTKDLoss') is ConfidenceDWTKDLoss
    for bad, key in (({'type': 'teacher_spreed', 'tau': 0.1}, 'confidence.type'),
                     ({'type': 'gt_agreement', 'tau': 0}, 'confidence.tau'),
                     ({'type': 'gt_agreement', 'tau': [1, 2]}, 'confidence.tau'),
                     ({'type': 'gt_agreement', 'tua': 0.1}, 'confidence.tua'), (None, 'confidence')):
        with pytest.raises(ValueError, match=key.replace('.', r'\.')):
            ConfidenceDWTKDLoss(confidence=bad)
    with pytest.raises(ValueError, match='gt=gt'):
        ConfidenceDWTKDLoss(confidence={'type': 'gt_agreement', 'tau': 0.1})(student, teacher)


def test_weight_falls_as_documented():
    from dtkd_loss.confidence_kd_loss import agreement_weight

    d = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    expected = [1.0, 1.0, math.exp(-1), math.exp(-4), math.exp(-9)]
    torch.testing.assert_close(agreement_weight(d, 1.0), torch.tensor(expected, dtype=torch.float64))


def test_the_hand_written_haar_is_orthonormal_and_matches_dwt_kd():
    x, y, _ = images(6)
    ll, details = haar_level(x)
    back = inverse_haar_level(ll, details)
    torch.testing.assert_close(back, x, atol=1e-15, rtol=0)
    assert abs((x.square().sum() - ll.square().sum() - sum(d.square().sum() for d in details)).item()) < 1e-9
    by_hand = sum(w * sum(b.abs().sum() for b in bands) / sum(b.numel() for b in bands)
                  for w, bands in zip((1, 2, 1), groups_by_hand(x - y).values()))
    assert abs(DWTKDLoss()(x, y).item() - by_hand.item()) < 1e-12


# ---------------------------------------------------------------------------------------------- teacher_spread
SPREAD = {'type': 'teacher_spread', 'tau': TAU}


def spread_loss_by_hand(student, teacher, samples, tau, weights=(1, 2, 1)):
    """The documented formula with the hand-written Haar: c = w(std over the K samples of each coefficient)."""
    per_sample = [groups_by_hand(samples[:, k]) for k in range(samples.shape[1])]
    s_groups = groups_by_hand(student - teacher)
    total = 0
    for (name, s_bands), w in zip(s_groups.items(), weights):
        num = count = 0
        for i, s in enumerate(s_bands):
            coeffs = torch.stack([p[name][i] for p in per_sample])  # (K, B, C, h, w)
            spread = coeffs.std(dim=0, unbiased=True)
            excess = torch.clamp(spread - tau, min=0) / tau
            num = num + (torch.exp(-excess ** 2) * s.abs()).sum()
            count += s.numel()
        total = total + w * num / count
    return total


def test_spread_matches_the_independent_computation():
    student, teacher, _ = images(10)
    g = torch.Generator().manual_seed(11)
    # spreads around tau: every regime of the weight occurs
    samples = teacher[:, None] + 0.04 * torch.randn((2, 4, 3, 32, 32), generator=g, dtype=teacher.dtype)
    loss = ConfidenceDWTKDLoss(confidence=SPREAD)
    value = loss(student, teacher, teacher_samples=samples)
    assert abs(value.item() - spread_loss_by_hand(student, teacher, samples, TAU).item()) < 1e-12
    assert all(0 < float(c) < 1 for c in loss.last_confidence.values())


def test_identical_samples_give_plain_dwt_kd():
    student, teacher, _ = images(12)
    plain = DWTKDLoss(loss_weight=2.0)(student, teacher)
    loss = ConfidenceDWTKDLoss(loss_weight=2.0, confidence=SPREAD)
    value = loss(student, teacher, teacher_samples=teacher[:, None].repeat(1, 3, 1, 1, 1))
    assert value.item() == pytest.approx(plain.item(), rel=0, abs=1e-14)
    assert all(float(c) == 1.0 for c in loss.last_confidence.values())


def test_where_the_samples_disagree_the_gradient_falls_and_is_unchanged_elsewhere():
    """Samples that agree up to a small noise (spread << tau) except in an 8x8 region, where they invent
    different textures (coefficients of +-0.5): the student's gradient there falls by >= 10x against
    plain DWT-KD; outside (the region is aligned to the 4x4 support of the two-level Haar
    coefficients) it is plain DWT-KD's exactly."""
    student, teacher, _ = images(13)
    g = torch.Generator().manual_seed(14)
    k = 4
    samples = teacher[:, None] + 0.002 * torch.randn((2, k, 3, 32, 32), generator=g, dtype=teacher.dtype)

    def coefficients(size):
        return 0.5 * torch.sign(torch.randn(2, 3, size, size, generator=g, dtype=teacher.dtype))

    for i in range(0, k, 2):  # samples 2j and 2j + 1 invent opposite textures: no coefficient agrees
        ll1 = inverse_haar_level(coefficients(2), [coefficients(2) for _ in range(3)])
        texture = inverse_haar_level(ll1, [coefficients(4) for _ in range(3)])
        samples[:, i, :, 8:16, 12:20] += texture
        samples[:, i + 1, :, 8:16, 12:20] -= texture
    teacher = samples[:, 0].clone()  # the distillation target is sample 0, artifact included
    region = torch.zeros_like(teacher, dtype=torch.bool)
    region[..., 8:16, 12:20] = True
    grads = {}
    for name, loss in (('plain', DWTKDLoss()), ('spread', ConfidenceDWTKDLoss(confidence=SPREAD))):
        s = student.clone().requires_grad_(True)
        (loss(s, teacher) if name == 'plain' else loss(s, teacher, teacher_samples=samples)).backward()
        grads[name] = s.grad
    inside = grads['plain'][region].abs().mean() / grads['spread'][region].abs().mean()
    assert inside >= 10, inside.item()
    torch.testing.assert_close(grads['spread'][~region], grads['plain'][~region], atol=1e-15, rtol=0)


def test_the_spread_is_not_a_path_for_gradients_and_the_target_is_the_teacher():
    student, teacher, _ = images(15)
    g = torch.Generator().manual_seed(16)
    samples = (teacher[:, None] + 0.05 * torch.randn((2, 3, 3, 32, 32), generator=g,
                                                      dtype=teacher.dtype)).requires_grad_(True)
    teacher.requires_grad_(True)
    loss = ConfidenceDWTKDLoss(confidence=SPREAD)
    loss(student.requires_grad_(True), teacher, teacher_samples=samples).backward()
    assert samples.grad is None  # the samples only enter the (detached) weights
    torch.testing.assert_close(teacher.grad, -student.grad, atol=1e-15, rtol=0)
    # a student equal to the teacher (sample 0 here, not the samples' mean) has zero loss
    assert loss(teacher.detach(), teacher.detach(), teacher_samples=samples.detach()).item() == 0


def test_spread_input_errors():
    student, teacher, _ = images(17)
    loss = ConfidenceDWTKDLoss(confidence=SPREAD)
    with pytest.raises(ValueError, match='teacher_samples'):
        loss(student, teacher)
    with pytest.raises(ValueError, match='K >= 2'):
        loss(student, teacher, teacher_samples=teacher[:, None])
    with pytest.raises(ValueError, match=r'\(B, K, C, H, W\)'):
        loss(student, teacher, teacher_samples=teacher)
