"""DTKDModel hands the batch's K cached teacher samples to a KD loss whose forward takes
``teacher_samples`` (as it hands it the GT), and to no other loss."""
import copy

import torch

import dtkd_compat  # noqa: F401  (before basicsr)
import dtkd_data  # noqa: F401,I001  (registers PairedTeacherDataset)
import dtkd_model  # noqa: F401
from conftest import TINY_STUDENT, train_options
from dtkd_loss.confidence_kd_loss import ConfidenceDWTKDLoss
from dtkd_model.dtkd_model import DTKDModel

SPREAD = {'type': 'ConfidenceDWTKDLoss', 'loss_weight': 2.0, 'confidence': {'type': 'teacher_spread', 'tau': 0.05}}
PLAIN = {'type': 'DWTKDLoss', 'loss_weight': 2.0}


def build(tmp_path, kd_opt):
    opt = train_options(tmp_path, 'samples', total_iter=40, kd_opt=dict(kd_opt), kd_schedule={'type': 'constant'})
    opt.update(is_train=True, dist=False, rank=0, world_size=1)
    opt['network_g'] = dict(TINY_STUDENT, type='SwinIRStudent', drop_path_rate=0.0)
    opt['path'].update(models=str(tmp_path / 'models'), training_states=str(tmp_path / 'training_states'))
    torch.manual_seed(0)
    return DTKDModel(copy.deepcopy(opt))


def batch(k=3, size=16):
    g = torch.Generator().manual_seed(0)
    teacher = torch.rand(2, 3, 4 * size, 4 * size, generator=g)
    samples = torch.cat([teacher[:, None], torch.rand(2, k - 1, 3, 4 * size, 4 * size, generator=g)], dim=1)
    return {'lq': torch.rand(2, 3, size, size, generator=g), 'gt': torch.rand(2, 3, 4 * size, 4 * size, generator=g),
            'teacher': teacher, 'teacher_samples': samples, 'gt_path': ['a/0001.png', 'a/0002.png']}


def test_the_samples_reach_a_loss_that_takes_them(tmp_path):
    model = build(tmp_path, SPREAD)
    assert model.kd_takes_samples and model.kd_takes_gt  # the loss takes both keywords
    seen = []
    forward = model.cri_kd.forward

    def recording(pred, target, gt=None, teacher_samples=None):
        seen.append(teacher_samples)
        return forward(pred, target, gt=gt, teacher_samples=teacher_samples)

    model.cri_kd.forward = recording
    data = batch()
    model.feed_data(data)
    model.optimize_parameters(1)
    assert len(seen) == 1 and torch.equal(seen[0], data['teacher_samples'])
    # the logged KD term is the loss of these samples, and the mean confidence per group is logged
    reference = ConfidenceDWTKDLoss(confidence=SPREAD['confidence'])
    expected = reference(model.output.detach(), data['teacher'], teacher_samples=data['teacher_samples'])
    assert abs(model.log_dict['l_kd'] - expected.item()) < 1e-5
    assert {'kd_conf_LF', 'kd_conf_MF', 'kd_conf_HF'} <= set(model.log_dict)
    assert all(0 < model.log_dict[f'kd_conf_{g}'] < 1 for g in ('LF', 'MF', 'HF'))


def test_a_loss_without_the_keyword_gets_none_and_a_batch_without_samples_is_refused(tmp_path):
    model = build(tmp_path, PLAIN)
    assert not model.kd_takes_samples
    model.feed_data(batch())
    model.optimize_parameters(1)  # DWTKDLoss.forward(pred, target): a teacher_samples keyword would fail
    spread = build(tmp_path / 'spread', SPREAD)
    data = batch()
    del data['teacher_samples']
    spread.feed_data(data)
    try:
        spread.optimize_parameters(1)
    except ValueError as err:
        assert 'datasets.train.teacher_samples' in str(err)
    else:
        raise AssertionError('teacher_spread without samples must raise')
