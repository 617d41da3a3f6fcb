"""A finished run's saved option file: the options as run (--force_yml applied, the command recorded),
and `-opt` of it works for dtkd-test, which gives the same numbers to the last digit when run twice."""
import json

import forking
import yaml

from conftest import train_options, write_yaml


def test_saved_options_are_the_effective_ones_and_test_reproduces(tiny_pairs, tmp_path):
    from dtkd import test, train

    opt = train_options(tiny_pairs, 'saved', total_iter=4, save_freq=2)
    yml = write_yaml(tmp_path / 'train_tiny.yml', opt)
    argv = ['dtkd-train', '-opt', yml, '--force_yml', 'train:total_iter=2', 'val:val_freq=2']
    code, out = forking.run_entry_point(train, argv, str(tmp_path / 'train.log'), str(tmp_path))
    assert code == 0, out[-3000:]
    assert 'Network: SwinIR,' in out and 'RSTB' not in out  # the module tree is in the log file only
    saved = tmp_path / 'experiments' / 'saved' / 'train_tiny.yml'
    text = saved.read_text()
    assert 'train:total_iter=2' in text.splitlines()[2]  # the command line
    saved_opt = yaml.safe_load(text)
    assert saved_opt['train']['total_iter'] == 2 and saved_opt['val']['val_freq'] == 2
    assert 'dist' not in saved_opt and 'experiments_root' not in saved_opt['path']  # no runtime entries
    assert '@ iter 2' in out and '@ iter 3' not in out and '@ iter 4' not in out

    summaries = []
    for attempt in range(2):
        code, out = forking.run_entry_point(test, ['dtkd-test', '-opt', str(saved)],
                                            str(tmp_path / f'test{attempt}.log'), str(tmp_path))
        assert code == 0, out[-3000:]
        summary = tmp_path / 'results' / 'saved' / 'summary.json'
        assert str(summary) in out  # the runner says where the summary went
        summaries.append(json.loads(summary.read_text()))
    assert summaries[0] == summaries[1] and summaries[0]['results']['tinyval']['psnr'] > 0
    protocol = summaries[0]['protocol']
    assert protocol['datasets']['tinyval']['images'] == 1 and protocol['versions']['basicsr'] == '1.4.2'
    assert protocol['metrics']['psnr']['crop_border'] == 4 and 'not rounded' in protocol['metrics']['psnr']['y_channel']


def test_testing_a_training_file_without_a_checkpoint_names_where_it_looked(tiny_pairs, tmp_path):
    from dtkd import test

    yml = write_yaml(tmp_path / 'never_trained.yml', train_options(tiny_pairs, 'never_trained'))
    code, out = forking.run_entry_point(test, ['dtkd-test', '-opt', yml], str(tmp_path / 'log'), str(tmp_path))
    assert code == 2, out[-3000:]
    assert 'no checkpoint to test' in out and 'experiments/never_trained/models/net_g_latest.pth' in out
    assert not (tmp_path / 'results').exists()
