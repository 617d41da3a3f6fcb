"""Unknown keys in the project's option blocks are errors naming the key and the closest valid one;
paths are checked before any directory is made or data read."""
import copy
import os

import forking
import pytest

from conftest import REPO, train_options, write_yaml
from dtkd_compat import OptionError
from dtkd_model.options import validate_options

DWT = {'type': 'DWTKDLoss', 'loss_weight': 2.0, 'level': 2, 'wavelet': 'haar', 'group_weights': [1, 2, 1]}


def base(tiny_pairs, model_type='DTKDModel'):
    opt = train_options(tiny_pairs, 'keys', kd_opt=dict(DWT),
                        kd_schedule={'type': 'linear', 'start_iter': 0, 'end_iter': 4})
    opt['model_type'] = model_type
    opt['val']['tile'] = {'tile_size': 8, 'tile_pad': 2}
    # the demo teacher: its weights are committed, so the options are valid as a whole
    opt['teacher'] = {'opt': os.path.join(REPO, 'options', 'demo', 'resshift_demo_x4.yml'), 'precision': 'bf16'}
    if model_type == 'AugKDModel':
        opt['train']['augkd_opt'] = {'zoom_in_weight': 1.0, 'consistency': {'prob': 0.3}}
    return opt


def rename(opt, keys, new):
    """Rename the last key of the path ``keys`` to ``new`` (a typo in an option file)."""
    node = opt
    for key in keys[:-1]:
        node = node[key]
    node[new] = node.pop(keys[-1])


TYPOS = [  # (model type, path of the key, misspelt key, expected message)
    ('DTKDModel', ['train', 'kd_opt', 'level'], 'levle', "train.kd_opt.levle: unknown option; did you mean 'level'?"),
    ('DTKDModel', ['train', 'kd_schedule', 'end_iter'], 'end_itr',
     "train.kd_schedule.end_itr: unknown option; did you mean 'end_iter'?"),
    ('DTKDModel', ['teacher', 'precision'], 'precison', "teacher.precison: unknown option; did you mean 'precision'?"),
    ('DTKDModel', ['val', 'tile', 'tile_size'], 'tile_sise', "val.tile.tile_sise: unknown option; did you mean "
                                                             "'tile_size'?"),
    ('DTKDModel', ['val', 'tile'], 'tiles', "val.tiles: unknown option; did you mean 'tile'?"),
    ('DTKDModel', ['train', 'kd_opt'], 'kd_opts', "train.kd_opts: unknown option; did you mean 'kd_opt'?"),
    ('DTKDModel', ['teacher'], 'teachr', "options.teachr: unknown option; did you mean 'teacher'?"),
    ('DTKDModel', ['datasets', 'train', 'gt_size'], 'gt_sise',
     "datasets.train.gt_sise: unknown option; did you mean 'gt_size'?"),
    ('DTKDModel', ['datasets', 'train', 'dataroot_teacher'], 'dataroot_teachers',
     "datasets.train.dataroot_teachers: unknown option; did you mean 'dataroot_teacher'?"),
    ('AugKDModel', ['train', 'augkd_opt', 'zoom_in_weight'], 'zoom_in_wieght',
     "train.augkd_opt.zoom_in_wieght: unknown option; did you mean 'zoom_in_weight'?"),
    ('AugKDModel', ['train', 'augkd_opt', 'consistency', 'prob'], 'probability',
     "train.augkd_opt.consistency.probability: unknown option; did you mean 'prob'?"),
]


def test_the_reference_options_are_valid(tiny_pairs):
    for model_type in ('DTKDModel', 'AugKDModel'):
        validate_options(base(tiny_pairs, model_type), is_train=True)


@pytest.mark.parametrize('model_type, keys, typo, message', TYPOS, ids=[t[2] for t in TYPOS])
def test_unknown_keys_are_named_with_the_closest_valid_one(tiny_pairs, model_type, keys, typo, message):
    opt = base(tiny_pairs, model_type)
    rename(opt, keys, typo)
    with pytest.raises(OptionError) as info:
        validate_options(opt, is_train=True)
    assert str(info.value).startswith(message), str(info.value)


def test_bad_values_of_the_project_blocks(tiny_pairs):
    cases = [
        (('train', 'kd_opt', 'type'), 'DWTKDLos', "train.kd_opt.type: unknown loss 'DWTKDLos'; did you mean "
                                                  "'DWTKDLoss'?"),
        (('train', 'kd_schedule', 'type'), 'exponential', 'train.kd_schedule.type: expected one of linear'),
        (('train', 'max_nonfinite_steps'), 0, 'train.max_nonfinite_steps: expected an integer >= 1'),
        (('dataset_check',), 'sometimes', "dataset_check: expected one of quick, full, off, got 'sometimes'"),
        (('teacher', 'opt'), 'options/teacher/nowhere.yml', "teacher.opt: option file 'options/teacher/nowhere.yml' "
                                                            'does not exist'),
    ]
    for keys, value, message in cases:
        opt = base(tiny_pairs)
        node = opt
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value
        with pytest.raises(OptionError) as info:
            validate_options(opt, is_train=True)
        assert str(info.value).startswith(message), str(info.value)


def test_paths_are_checked_before_anything_is_created(tiny_pairs, tmp_path):
    from basicsr import train as _basicsr_train  # noqa: F401

    from dtkd import train

    good = base(tiny_pairs)
    del good['teacher']
    cases = [(('datasets', 'train', 'dataroot_lq'), str(tmp_path / 'no_lq'), 'datasets.train.dataroot_lq: folder'),
             (('datasets', 'val', 'dataroot_gt'), str(tmp_path / 'no_gt'), 'datasets.val.dataroot_gt: folder'),
             (('path', 'pretrain_network_g'), str(tmp_path / 'no.pth'), 'path.pretrain_network_g: checkpoint')]
    for keys, value, message in cases:
        opt = copy.deepcopy(good)
        node = opt
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value
        yml = write_yaml(tmp_path / 'opt.yml', opt)
        code, out = forking.run_entry_point(train, ['dtkd-train', '-opt', yml], str(tmp_path / 'log'), str(tmp_path))
        errors = [line for line in out.splitlines() if line.startswith('error:')]
        assert code == 2 and len(errors) == 1 and 'Traceback' not in out, out[-3000:]
        assert errors[0].startswith(f'error: {message}') and value in errors[0], errors[0]
        assert not (tmp_path / 'experiments').exists() and not (tmp_path / 'tb_logger').exists()


def test_paper_augkd_file_without_teacher_weights_stops_before_anything_is_created(tmp_path):
    """options/ablation/train_augkd.yml runs the official teacher online: without its weights the run
    stops at once with one line naming the missing file and the option, before its data or a folder."""
    from dtkd import train

    yml = os.path.join(REPO, 'options', 'ablation', 'train_augkd.yml')
    code, out = forking.run_entry_point(train, ['dtkd-train', '-opt', yml], str(tmp_path / 'log'), str(tmp_path))
    errors = [line for line in out.splitlines() if line.startswith('error:')]
    assert code == 2 and len(errors) == 1 and 'Traceback' not in out, out[-3000:]
    assert 'teacher.opt' in errors[0] and 'resshift_realsrx4_s15_v1.pth' in errors[0] and 'unet.ckpt' in errors[0]
    assert not (tmp_path / 'experiments').exists() and not (tmp_path / 'tb_logger').exists()
