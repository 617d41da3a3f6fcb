"""Option files cannot run code: every entry point parses YAML safely and refuses python tags.

Each entry point runs in its own (forked) process on a real option file whose ``name`` is
``!!python/object/apply:os.system ["touch <marker>"]``: PyYAML's full loader (BasicSR's) would
create the marker. The control test shows that it does.
"""
import importlib.util
import os

import cv2
import forking
import numpy as np
import pytest
import yaml

from conftest import REPO, train_options, write_yaml

SCRIPTS = os.path.join(REPO, 'scripts')


def evil_yaml(tmp_path, name='evil.yml'):
    marker = tmp_path / f'{name}.ran'
    path = tmp_path / name
    path.write_text(f'name: !!python/object/apply:os.system ["touch {marker}"]\nmodel_type: DTKDModel\n')
    return str(path), marker


def load_script(name):
    spec = importlib.util.spec_from_file_location(f'_script_{name}', os.path.join(SCRIPTS, f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def one_error_line(output):
    lines = [line for line in output.strip().splitlines() if line.startswith('error:')]
    assert len(lines) == 1 and 'Traceback' not in output, output[-3000:]
    return lines[0]


def test_control_full_loader_runs_the_file(tmp_path):
    path, marker = evil_yaml(tmp_path)
    with open(path) as f:
        yaml.load(f, Loader=yaml.UnsafeLoader)  # what a full loader does with the file
    assert marker.exists()


def _entry_points(tmp_path, path):
    """(label, function run in the child) for every entry point that reads a user option file.

    Everything is imported here, in the parent, so that each child only runs the entry point."""
    from basicsr import test as _basicsr_test  # noqa: F401  (imported once here, not in every child)
    from basicsr import train as _basicsr_train  # noqa: F401

    from dtkd import infer, test, train

    scripts = {name: load_script(name) for name in ('generate_teacher_outputs', 'benchmark_teacher',
                                                     'benchmark_complexity', 'check_dataset')}
    teacher_yml = os.path.join(REPO, 'tests', 'data', 'options', 'tiny_teacher.yml')
    img = tmp_path / 'in.png'
    cv2.imwrite(str(img), np.full((8, 8, 3), 128, np.uint8))

    def with_argv(module, argv):
        def fn():
            import sys

            sys.argv = argv
            return module.main()
        return fn

    return [
        ('dtkd-train', with_argv(train, ['dtkd-train', '-opt', path])),
        ('dtkd-test', with_argv(test, ['dtkd-test', '-opt', path])),
        ('dtkd-infer', lambda: infer.main(['-i', str(img), '-o', str(tmp_path / 'out'), '-opt', path])),
        ('generate_teacher_outputs.py', lambda: scripts['generate_teacher_outputs'].main(
            ['-opt', path, '--input', str(tmp_path), '--output', str(tmp_path / 'cache'), '--no-progress'])),
        ('benchmark_teacher.py', lambda: scripts['benchmark_teacher'].main(['-opt', path])),
        ('benchmark_complexity.py -opt', lambda: scripts['benchmark_complexity'].main(['-opt', path])),
        ('benchmark_complexity.py --student-opt', lambda: scripts['benchmark_complexity'].main(
            ['-opt', teacher_yml, '--random-weights', '--student-opt', path])),
        ('check_dataset.py', lambda: scripts['check_dataset'].main(['-opt', path])),
    ]


def test_every_entry_point_refuses_python_tags(tmp_path):
    path, marker = evil_yaml(tmp_path)
    for label, fn in _entry_points(tmp_path, path):
        code, out = forking.run(fn, str(tmp_path / 'child.log'), cwd=str(tmp_path))
        assert code == 2, f'{label}: exit {code}\n{out[-3000:]}'
        line = one_error_line(out)
        assert 'evil.yml' in line and 'not valid YAML' in line, f'{label}: {line}'
        assert not marker.exists(), label
        assert not (tmp_path / 'experiments').exists() and not (tmp_path / 'results').exists(), label


def test_teacher_option_file_of_a_training_file_is_parsed_safely(tiny_pairs, tmp_path):
    teacher_yml, marker = evil_yaml(tmp_path, 'teacher.yml')
    opt = train_options(tiny_pairs, 'online', kd_opt={'type': 'L1Loss', 'loss_weight': 1.0}, teacher=False)
    opt['teacher'] = {'opt': teacher_yml, 'precision': 'fp32'}
    yml = write_yaml(tmp_path / 'train.yml', opt)
    from dtkd import train

    code, out = forking.run_entry_point(train, ['dtkd-train', '-opt', yml], str(tmp_path / 'log'), str(tmp_path))
    assert code == 2, out[-3000:]
    line = one_error_line(out)
    assert 'teacher.opt' in line and 'teacher.yml' in line and 'not valid YAML' in line
    assert not marker.exists() and not (tmp_path / 'experiments').exists()


def test_force_yml_values_are_data_not_code(tiny_pairs, tmp_path):
    from dtkd.launch import apply_force_yml
    from dtkd_compat import OptionError

    marker = tmp_path / 'forced.ran'
    opt = train_options(tiny_pairs, 'forced')
    # a python tag in a value is refused, naming the entry
    with pytest.raises(OptionError, match=r"--force_yml 'name=!!python/object/apply:os.system.*not plain YAML"):
        apply_force_yml(opt, [f'name=!!python/object/apply:os.system ["touch {marker}"]'])
    # an expression (BasicSR evaluates these) stays a string
    expr = f"__import__('os').system('touch {marker}')"
    apply_force_yml(opt, [f'name={expr}', 'train:total_iter=7', 'network_g:depths=[2, 2]'])
    assert opt['name'] == expr and opt['train']['total_iter'] == 7 and opt['network_g']['depths'] == [2, 2]
    assert not marker.exists()
    with pytest.raises(OptionError, match="'trian' does not exist"):
        apply_force_yml(opt, ['trian:total_iter=3'])
    apply_force_yml(opt, ['val:metrics:psnr:optional=true'])  # a new key in an existing block
    assert opt['val']['metrics']['psnr']['optional'] is True

    # through the command-line parser of dtkd-train (argparse, --force_yml with several entries)
    from dtkd.launch import parse_options

    yml = write_yaml(tmp_path / 'forced.yml', train_options(tiny_pairs, 'forced'))
    parsed, _ = parse_options(str(tmp_path), is_train=True,
                              argv=['-opt', yml, '--force_yml', f'name={expr}', 'train:total_iter=3'])
    assert parsed['name'] == expr and parsed['train']['total_iter'] == 3
    assert not marker.exists()
    # a misspelt new key is refused by the option checks that follow, with the closest valid key
    with pytest.raises(OptionError, match=r"train\.total_itr: unknown option; did you mean 'total_iter'"):
        parse_options(str(tmp_path), is_train=True, argv=['-opt', yml, '--force_yml', 'train:total_itr=3'])
