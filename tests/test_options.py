"""The shipped option files: they parse safely, validate, and say what the paper's tables say."""
import copy
import glob
import os

import pytest

from conftest import REPO
from dtkd_compat import MissingFileError
from dtkd_model.options import validate_options
from dtkd_utils.options import load_yaml

TRAIN_FILES = sorted(glob.glob(os.path.join(REPO, 'options', 'train_*.yml')) +
                     glob.glob(os.path.join(REPO, 'options', 'ablation', '*.yml')))
TEST_FILES = sorted(glob.glob(os.path.join(REPO, 'options', 'test', '*.yml')))

# file -> (kd loss type, level, group weights, schedule type, final weight); None = no distillation
EXPECTED = {
    'train_dtkd.yml': ('DWTKDLoss', 2, [1, 2, 1], 'linear', 2.0),
    'train_dtkd_realworld.yml': ('DWTKDLoss', 2, [1, 2, 1], 'linear', 2.0),
    'train_swinir_small_l1.yml': None,
    'train_kd_l1.yml': ('L1Loss', None, None, 'linear', 2.0),
    'train_dwt_level1.yml': ('DWTKDLoss', 1, [1, 0, 1], 'linear', 2.0),
    'train_dwt_level2_equal.yml': ('DWTKDLoss', 2, [1, 1, 1], 'linear', 2.0),
    'train_dwt_level3.yml': ('DWTKDLoss', 3, [1, 1, 1], 'linear', 2.0),
    'train_dwt_level4.yml': ('DWTKDLoss', 4, [1, 1, 1], 'linear', 2.0),
    'train_fourier.yml': ('FourierKDLoss', None, None, 'linear', 2.0),
    'train_dtcwt.yml': ('DTCWTKDLoss', 2, [1, 2, 1], 'linear', 2.0),
    'train_dwt_weights_232.yml': ('DWTKDLoss', 2, [2, 3, 2], 'linear', 2.0),
    'train_dwt_weights_252.yml': ('DWTKDLoss', 2, [2, 5, 2], 'linear', 2.0),
    'train_schedule_constant1.yml': ('DWTKDLoss', 2, [1, 2, 1], 'constant', 1.0),
    'train_schedule_linear0p5.yml': ('DWTKDLoss', 2, [1, 2, 1], 'linear', 0.5),
    'train_schedule_linear1.yml': ('DWTKDLoss', 2, [1, 2, 1], 'linear', 1.0),
    'train_schedule_linear3.yml': ('DWTKDLoss', 2, [1, 2, 1], 'linear', 3.0),
    'train_augkd.yml': ('L1Loss', None, None, 'constant', 0.2),
    'train_dwt_confidence.yml': ('ConfidenceDWTKDLoss', 2, [1, 2, 1], 'linear', 2.0),
    'train_dwt_spread.yml': ('ConfidenceDWTKDLoss', 2, [1, 2, 1], 'linear', 2.0),
    'train_dwt_adaptive.yml': ('DWTKDLoss', 2, {'type': 'adaptive', 'base': [1, 2, 1], 'alpha': 1.0, 'momentum': 0.99,
                                                'low': 0.25, 'high': 4.0}, 'linear', 2.0),
}


def test_every_training_file_is_listed():
    assert sorted(os.path.basename(f) for f in TRAIN_FILES) == sorted(EXPECTED)


@pytest.mark.parametrize('path', TRAIN_FILES, ids=os.path.basename)
def test_training_option_file(path):
    from basicsr.losses import build_loss

    import dtkd_compat  # noqa: F401
    from dtkd_model.kd_schedule import KDWeightSchedule

    opt = load_yaml(path)
    realworld = opt['model_type'] == 'RealWorldDTKDModel'  # LQ made on the fly, SinSR teacher online
    if 'teacher' in opt:  # an online teacher: its weights are checked with the options
        official = copy.deepcopy(opt)
        weights = 'SinSR_v1.pth' if realworld else 'resshift_realsrx4_s15_v1.pth'
        with pytest.raises(MissingFileError, match=weights.replace('.', r'\.')):
            validate_options(official, is_train=True)
        opt['teacher']['opt'] = 'options/demo/resshift_demo_x4.yml'  # committed weights
    validate_options(opt, is_train=True)
    model_type = 'AugKDModel' if 'augkd' in path else 'RealWorldDTKDModel' if 'realworld' in path else 'DTKDModel'
    assert opt['model_type'] == model_type
    assert opt['network_g']['embed_dim'] == 60 and opt['network_g']['depths'] == [6, 6, 6, 6]
    assert opt['train']['pixel_opt'] == {'type': 'L1Loss', 'loss_weight': 1.0, 'reduction': 'mean'}
    expected = EXPECTED[os.path.basename(path)]
    train_set = opt['datasets']['train']
    if expected is None:
        assert 'kd_opt' not in opt['train'] and 'dataroot_teacher' not in train_set
        return
    kd_type, level, weights, schedule, final = expected
    kd = dict(opt['train']['kd_opt'])
    assert kd['type'] == kd_type and kd['loss_weight'] == final
    if level is not None:
        assert kd['level'] == level and kd['group_weights'] == weights
    if realworld:  # no cache: the teacher labels each degraded batch online
        assert 'dataroot_teacher' not in train_set and 'teacher' in opt and 'degradation' in opt
    else:
        assert train_set['dataroot_teacher'].endswith('.lmdb')
    build_loss(dict(kd))  # every loss configuration constructs
    sched = KDWeightSchedule.from_options(opt['train']['kd_schedule'], final, opt['train']['total_iter'])
    total = opt['train']['total_iter']
    if schedule == 'linear':
        assert sched(0) == 0 and sched(total // 2) == pytest.approx(final / 2) and sched(total) == final
    else:
        assert sched(1) == final and sched(total) == final


def test_paper_student_has_0_930_m_parameters():
    from basicsr.archs import build_network

    import dtkd_arch  # noqa: F401

    net = build_network(dict(load_yaml(os.path.join(REPO, 'options', 'train_dtkd.yml'))['network_g']))
    assert sum(p.numel() for p in net.parameters()) == 929_628


@pytest.mark.parametrize('path', TEST_FILES, ids=os.path.basename)
def test_test_option_file(path):
    opt = load_yaml(path)
    assert opt['path']['pretrain_network_g']
    opt['path']['pretrain_network_g'] = None  # the checkpoint is made by training
    validate_options(opt, is_train=False)
    metrics = opt['val']['metrics']
    assert {'psnr', 'lpips', 'musiq'} <= set(metrics)
