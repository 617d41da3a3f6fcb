"""The three ways to start DTKD: ``dtkd-train`` / ``python -m dtkd.train``, ``python dtkd/train.py`` and
BasicSR's own runner (through ``dtkd_basicsr.pth`` and :mod:`dtkd.basicsr_plugin`).

Every check runs in a fresh interpreter of this environment without PYTHONPATH: what it sees is what
the installation (``pip install -e .``) provides.
"""
import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig

import pytest

from conftest import REPO, TINY_STUDENT, train_options, write_yaml

PTH = os.path.join(REPO, 'dtkd', 'dtkd_basicsr.pth')
REGISTERED = {'MODEL_REGISTRY': 'DTKDModel', 'ARCH_REGISTRY': 'SwinIRStudent', 'LOSS_REGISTRY': 'DWTKDLoss',
              'DATASET_REGISTRY': 'PairedTeacherDataset'}


def run_py(args, cwd, env_extra=None, timeout=600):
    """``python ARGS`` in a fresh interpreter of this environment, without PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'DTKD_BASICSR_PLUGIN')}
    env.setdefault('OMP_NUM_THREADS', '1')
    env.update(env_extra or {})
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def assert_ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def lookups(names=REGISTERED):
    return ''.join(f'from basicsr.utils.registry import {reg}; print({reg}.get({name!r}).__module__)\n'
                   for reg, name in names.items())


# --------------------------------------------------------------------------------------------- the .pth hook
def test_pth_is_installed_in_site_packages():
    installed = os.path.join(sysconfig.get_path('purelib'), 'dtkd_basicsr.pth')
    assert os.path.isfile(installed), (f'{installed} is missing: reinstall the project '
                                       '(pip install --no-build-isolation --no-deps -e .)')
    with open(installed) as f, open(PTH) as g:
        assert f.read() == g.read()


def test_startup_is_light_and_can_be_switched_off(tmp_path):
    code = ("import sys; started = 'dtkd' in sys.modules\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'torchvision', 'basicsr', 'numpy', 'cv2', 'dtkd_compat'))\n"
            'from dtkd.basicsr_plugin import installed; print(started, installed(), heavy)\n')
    proc = run_py(['-c', code], tmp_path)
    assert_ok(proc)
    assert proc.stdout.split('\n')[0] == 'True True []'
    proc = run_py(['-c', "import sys; print('dtkd' in sys.modules)"], tmp_path, {'DTKD_BASICSR_PLUGIN': '0'})
    assert_ok(proc)
    assert proc.stdout.strip() == 'False'


def test_pth_line_is_silent_when_dtkd_is_not_importable(tmp_path):
    # -S: no site-packages, so neither DTKD nor its dependencies can be imported
    proc = run_py(['-S', '-c', f'exec(open({PTH!r}).read()); import sys; print("dtkd" in sys.modules)'], tmp_path)
    assert_ok(proc)
    assert proc.stdout.strip() == 'False' and proc.stderr == ''


def test_basicsr_registries_hold_the_dtkd_classes_in_a_fresh_interpreter(tmp_path):
    code = ('import sys\nimport basicsr.models\n' + lookups()
            + "from basicsr.utils.registry import METRIC_REGISTRY; print(METRIC_REGISTRY.get('calculate_lpips'))\n"
            "from dtkd.basicsr_plugin import installed; print('hook left', installed())\n")
    proc = run_py(['-c', code], tmp_path)
    assert_ok(proc)
    lines = proc.stdout.split('\n')
    assert lines[:4] == ['dtkd_model.dtkd_model', 'dtkd_arch.swinir_student_arch', 'dtkd_loss.dwt_kd_loss',
                         'dtkd_data.paired_teacher_dataset']
    assert 'calculate_lpips' in lines[4] and lines[5] == 'hook left False'
    assert 'Warning' not in proc.stderr, proc.stderr


def test_registration_waits_while_a_dtkd_package_is_being_imported(tmp_path):
    """dtkd_arch imports basicsr: the hook must not import dtkd_model (which imports dtkd_arch) then;
    the first look-up of a missing name registers the rest."""
    code = ("import sys\nimport dtkd_arch\nprint('dtkd_model' in sys.modules)\n"
            + lookups({'MODEL_REGISTRY': 'DTKDModel'}))
    proc = run_py(['-c', code], tmp_path)
    assert_ok(proc)
    assert proc.stdout.split('\n')[:2] == ['False', 'dtkd_model.dtkd_model']


def test_a_dtkd_import_error_leaves_basicsr_working(tmp_path):
    code = ("import sys\nsys.modules['dtkd_metric'] = None  # cannot be imported\n"
            "import basicsr.models\nfrom basicsr.utils.registry import ARCH_REGISTRY, MODEL_REGISTRY\n"
            "print(ARCH_REGISTRY.get('SwinIR').__name__, 'DTKDModel' in MODEL_REGISTRY)\n")
    proc = run_py(['-c', code], tmp_path)
    assert_ok(proc)
    assert proc.stdout.strip().split('\n')[-1] == 'SwinIR False'
    assert proc.stderr.count('DTKD classes could not be registered with BasicSR') == 1


# --------------------------------------------------------------------------------------------- python dtkd/train.py
def test_scripts_import_from_the_repository_and_load_the_shim_first(tmp_path):
    code = 'import runpy, sys\n'
    for script in ('train', 'test'):
        path = os.path.join(REPO, 'dtkd', f'{script}.py')
        code += (f'sys.path.insert(0, {os.path.dirname(path)!r})  # what python dtkd/{script}.py does\n'
                 f'g = runpy.run_path({path!r}, run_name="as_script")\n'
                 "print(sys.path[0], any(p.rstrip('/').endswith('dtkd') for p in sys.path), "
                 "'torchvision.transforms.functional_tensor' in sys.modules, callable(g['main']))\n")
    proc = run_py(['-c', code], tmp_path)
    assert_ok(proc)
    assert proc.stdout.split('\n')[:2] == [f'{REPO} False True True'] * 2


def tiny_train_yaml(tiny_pairs, folder, name):
    opt = train_options(tiny_pairs, name, total_iter=4, save_freq=2)
    opt['logger']['use_tb_logger'] = False
    return opt, write_yaml(folder / f'{name}.yml', opt)


@pytest.mark.slow
def test_python_dtkd_train_and_test_scripts(tiny_pairs, tmp_path):
    opt, yml = tiny_train_yaml(tiny_pairs, tmp_path, 'script_run')
    proc = run_py([os.path.join(REPO, 'dtkd', 'train.py'), '-opt', yml, '--force_yml', 'train:total_iter=2',
                   'val:val_freq=2'], tmp_path)
    assert_ok(proc)
    models = tmp_path / 'experiments' / 'script_run' / 'models'
    assert sorted(os.listdir(models)) == ['net_g_2.pth', 'net_g_latest.pth']

    test_opt = {'name': 'script_test', 'model_type': 'DTKDModel', 'scale': 4, 'num_gpu': 0,
                'datasets': {'test_1': opt['datasets']['val']}, 'network_g': dict(TINY_STUDENT),
                'path': {'pretrain_network_g': str(models / 'net_g_2.pth')},
                'val': {'save_img': True,
                        'metrics': {'psnr': {'type': 'calculate_psnr', 'crop_border': 4, 'test_y_channel': True}}}}
    proc = run_py([os.path.join(REPO, 'dtkd', 'test.py'), '-opt', write_yaml(tmp_path / 'test.yml', test_opt)],
                  tmp_path)
    assert_ok(proc)
    results = tmp_path / 'results' / 'script_test'
    assert glob.glob(str(results / 'visualization' / 'tinyval' / '*.png'))
    log = open(glob.glob(str(results / 'test_*.log'))[0]).read()
    assert '# psnr:' in log

    # a DTKD option error is one line through the script too
    proc = run_py([os.path.join(REPO, 'dtkd', 'train.py'), '-opt', yml, '--force_yml', 'train:no_such_key=1'],
                  tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().startswith('error:') and 'Traceback' not in proc.stderr


@pytest.mark.slow
def test_basicsrs_own_runner_trains_the_dtkd_model(tiny_pairs, tmp_path):
    """BasicSR's runner in a BasicSR checkout (a copy of the installed basicsr package, importable through
    PYTHONPATH=. as BasicSR's documentation says), started both ways: ``python basicsr/train.py`` and
    ``python -m basicsr.train``. The DTKD classes come from the .pth hook."""
    import basicsr

    checkout = tmp_path / 'BasicSR'
    shutil.copytree(os.path.dirname(basicsr.__file__), checkout / 'basicsr',
                    ignore=shutil.ignore_patterns('__pycache__'))
    proc = run_py(['-c', "import importlib.util; print(importlib.util.find_spec('basicsr').origin)"], checkout,
                  {'PYTHONPATH': '.'})
    assert proc.stdout.strip() == str(checkout / 'basicsr' / '__init__.py')  # the checkout's basicsr runs
    for name, start in (('basicsr_script', ['basicsr/train.py']), ('basicsr_module', ['-m', 'basicsr.train'])):
        _, yml = tiny_train_yaml(tiny_pairs, tmp_path, name)
        proc = run_py([*start, '-opt', yml, '--force_yml', 'train:total_iter=2', 'val:val_freq=2'], checkout,
                      {'PYTHONPATH': '.'})
        assert_ok(proc)
        exp = checkout / 'experiments' / name  # BasicSR's root: the folder above its basicsr package
        assert sorted(os.listdir(exp / 'models')) == ['net_g_2.pth', 'net_g_latest.pth']
        log = open(glob.glob(str(exp / 'train_*.log'))[0]).read()
        assert 'Model [DTKDModel] is created.' in log and re.search(r'iter: +2, ', log)
