"""``make demo``: the whole DTKD pipeline at small scale on real photographs, on a CPU.

Stages (each timed; each reuses its output when an earlier run completed it with the same inputs):

1. build the embedded data set from the photographs scikit-image ships (LMDB, x4 MATLAB bicubic);
2. check the teacher (``--teacher``: the project's small demo ResShift by default, or
   ``options/teacher/resshift_realsr_x4.yml`` with the official weights) and cache its outputs on
   the training set with ``scripts/generate_teacher_outputs.py``;
3. train three students with ``dtkd-train``: SwinIR-small alone, L1 distillation and DWT
   distillation, from the option files of the paper's experiments (``options/ablation/
   train_swinir_small_l1.yml``, ``options/ablation/train_kd_l1.yml``, ``options/train_dtkd.yml``)
   with only data paths and schedule lengths changed;
4. evaluate teacher and students on the held-out photographs with ``dtkd-test``;
5. draw the band-group discrepancy figure and a qualitative grid, and write
   ``results/demo/report.md``.

Every generated option file is kept under ``options_demo/`` of the work folder. A stage whose
command fails stops the demo with its exit status; the report is written only from results of this
run's completed stages (or reused ones, marked as such).
"""
import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from dtkd_compat import OptionError  # noqa: E402

DEMO_TEACHER = 'options/demo/resshift_demo_x4.yml'
STUDENTS = (
    # (run name, source option file, model label, KD label)
    ('demo_swinir_small', 'options/ablation/train_swinir_small_l1.yml', 'SwinIR-small', '-'),
    ('demo_kd_l1', 'options/ablation/train_kd_l1.yml', 'SwinIR-small', 'L1-KD'),
    ('demo_kd_dwt', 'options/train_dtkd.yml', 'SwinIR-small', 'DWT-KD'),
)
STAGE_FILE = 'stages.json'


def header(text):
    print(f'\n=== {text} ===', flush=True)


def run(cmd, env=None):
    print('$ ' + ' '.join(cmd), flush=True)
    result = subprocess.run(cmd, env=env)
    if result.returncode != 0:
        raise OptionError(f'command failed with exit status {result.returncode}: {" ".join(cmd)}')


def load_yaml(path):
    from dtkd_utils.options import load_yaml as safe_load

    return safe_load(path if os.path.isabs(path) else os.path.join(REPO, path))


def dump(opt, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w', encoding='utf-8') as f:
        yaml.safe_dump(opt, f, sort_keys=False)
    return path


def fingerprint(*parts):
    blob = json.dumps(parts, sort_keys=True, default=str).encode('utf-8')
    return hashlib.sha256(blob).hexdigest()[:16]


def file_digest(path):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 22), b''):
            h.update(chunk)
    return h.hexdigest()[:16]


class Stages:
    """Stage records (``<work>/results/demo/stages.json``): what each stage produced, from what inputs."""

    def __init__(self, folder):
        self.path = os.path.join(folder, STAGE_FILE)
        os.makedirs(folder, exist_ok=True)
        self.records = {}
        if os.path.isfile(self.path):
            try:
                with open(self.path, encoding='utf-8') as f:
                    self.records = json.load(f)
            except (OSError, json.JSONDecodeError):
                self.records = {}
        self.times = {}
        self.reused = {}

    def valid(self, name, key, outputs):
        rec = self.records.get(name) or {}
        return rec.get('key') == key and 'finished' in rec and all(os.path.exists(p) for p in outputs)

    def started_with(self, name):
        """The inputs key a stage was last started (or finished) with, or None."""
        return (self.records.get(name) or {}).get('key')

    def start(self, name, key):
        self.records[name] = {'key': key}
        self._write()

    def done(self, name, key, seconds, reused):
        self.records[name] = {'key': key, 'finished': time.strftime('%Y-%m-%d %H:%M:%S')}
        self.times[name] = seconds
        self.reused[name] = reused
        self._write()

    def _write(self):
        from dtkd_compat import atomic_write

        atomic_write(self.path, json.dumps(self.records, indent=2))


# ---------------------------------------------------------------------------------------------- options
def teacher_test_options(teacher_opt, teacher_file, data, name, device_gpu):
    """dtkd-test options that run the ResShift teacher (``ResShiftModel``) on the test photographs."""
    unet = dict(teacher_opt['unet'])
    ckpt = unet.pop('ckpt')
    sampler = teacher_opt.get('sampler') or {}
    label = 'ResShift (demo)' if is_demo_teacher(teacher_file) else 'ResShift'
    val = {'save_img': True, 'suffix': 'sr', 'pbar': True, 'model_label': f'{label}, teacher',
           'kd_label': '-', 'steps': sampler.get('steps'), 'seed': 0}
    for key in ('pad_multiple', 'chop_size', 'chop_stride'):
        if sampler.get(key) is not None:
            val[key] = sampler[key]
    return {
        'name': name, 'model_type': 'ResShiftModel', 'scale': teacher_opt['diffusion'].get('sf', 4),
        'num_gpu': 'auto' if device_gpu else 0, 'manual_seed': 0,
        'datasets': test_datasets(data),
        'network_g': unet, 'autoencoder': teacher_opt['autoencoder'], 'diffusion': teacher_opt['diffusion'],
        'path': {'pretrain_network_g': resolve(ckpt), 'param_key_g': 'params_ema', 'strict_load_g': True},
        'val': dict(val, metrics=test_metrics(data)),
    }


def is_demo_teacher(teacher_file):
    return os.path.abspath(teacher_file) == os.path.join(REPO, DEMO_TEACHER)


def resolve(path):
    path = os.path.expanduser(str(path))
    if os.path.isabs(path) or os.path.exists(path):
        return os.path.abspath(path)
    return os.path.join(REPO, path)


def test_datasets(data):
    return {'test_1': {'name': 'demo_test', 'type': 'PairedTeacherDataset', 'dataroot_gt': data['test_gt'],
                       'dataroot_lq': data['test_lq'], 'io_backend': {'type': 'lmdb'}}}


NIQE_CROP = 4
NIQE_MIN_SIDE = 192  # NIQE's statistics need at least two 96x96 blocks per image (basicsr.metrics.niqe)


def test_metrics(data):
    """The test option file's metrics (LPIPS/MUSIQ optional: their weights are a user's to bring) plus
    NIQE where every test image is large enough for it."""
    import cv2

    metrics = load_yaml('options/test/test_realsr_x4.yml')['val']['metrics']
    for metric in ('lpips', 'musiq'):
        metrics[metric]['optional'] = True
    folder = data['test_gt_folder']
    sides = [min(cv2.imread(os.path.join(folder, f)).shape[:2]) for f in sorted(os.listdir(folder))]
    if min(sides) - 2 * NIQE_CROP >= NIQE_MIN_SIDE:
        metrics['niqe'] = {'type': 'calculate_niqe', 'crop_border': NIQE_CROP, 'better': 'lower'}
    else:
        print(f'NIQE left out: it needs test images of at least {NIQE_MIN_SIDE + 2 * NIQE_CROP} pixels a side '
              f'(smallest here: {min(sides)})')
    return metrics


def student_train_options(source, name, data, teacher_lmdb, args):
    opt = load_yaml(source)
    opt['name'] = name
    opt['num_gpu'] = 'auto'
    train = opt['datasets']['train']
    train.update(name='demo_train', dataroot_gt=data['train_gt'], dataroot_lq=data['train_lq'], gt_size=args.gt_size,
                 batch_size_per_gpu=args.batch_size, num_worker_per_gpu=1, dataset_enlarge_ratio=100)
    if 'dataroot_teacher' in train:
        train['dataroot_teacher'] = teacher_lmdb
    # evaluation is the dtkd-test stage; no validation during these short runs
    opt['datasets'].pop('val', None)
    opt.pop('val', None)
    iters = args.student_iters
    opt['train']['total_iter'] = iters
    opt['train']['scheduler']['milestones'] = [max(iters * 3 // 4, 1)]
    opt['logger'].update(print_freq=max(iters // 10, 1), save_checkpoint_freq=iters, use_tb_logger=False)
    return opt


def student_test_options(name, ckpt, data, model_label, kd_label):
    opt = load_yaml('options/test/test_realsr_x4.yml')
    opt['name'] = name
    opt['datasets'] = test_datasets(data)
    opt['path']['pretrain_network_g'] = ckpt
    opt['val'].update(model_label=model_label, kd_label=kd_label, pbar=True, suffix='sr', metrics=test_metrics(data))
    return opt


# ---------------------------------------------------------------------------------------------- helpers
def machine():
    import torch
    from benchmark_common import machine_description

    return machine_description(torch.device('cuda' if torch_cuda() else 'cpu'))


def zoom_box(gt_path, size):
    """The ``size`` x ``size`` window of the GT image with the most detail (largest Laplacian energy)."""
    import cv2
    import numpy as np

    img = cv2.imread(gt_path, cv2.IMREAD_GRAYSCALE).astype(np.float32)
    h, w = img.shape
    size = min(size, h, w)
    energy = np.abs(cv2.Laplacian(img, cv2.CV_32F))
    integral = cv2.integral(energy)
    best, best_xy = -1.0, (0, 0)
    step = max(size // 4, 1)
    for y in range(0, h - size + 1, step):
        for x in range(0, w - size + 1, step):
            s = integral[y + size, x + size] - integral[y, x + size] - integral[y + size, x] + integral[y, x]
            if s > best:
                best, best_xy = s, (x, y)
    return best_xy[0], best_xy[1], size, size


def fmt(value, metric):
    from dtkd_metric.report import metric_decimals

    return f'{value:.{metric_decimals(metric)}f}'


# ---------------------------------------------------------------------------------------------- stages
def cache_teacher(work, data, teacher_file, precision, stages, env, samples=1):
    """Stage 2: the teacher's outputs on the training set (``samples`` per image) in
    ``datasets/demo/train/teacher_<tag>.lmdb``, made or completed with ``scripts/generate_teacher_outputs.py``.
    Returns (the LMDB, a key that changes whenever its content does)."""
    t0 = time.time()
    from dtkd_data.paired_teacher_dataset import teacher_sample_path
    from dtkd_teacher.cache import RECORD_NAME, _settings_differ, cache_settings, load_teacher_options

    tag = os.path.splitext(os.path.basename(teacher_file))[0]
    teacher_lmdb = os.path.join(work, 'datasets', 'demo', 'train', f'teacher_{tag}.lmdb')
    settings = cache_settings(load_teacher_options(teacher_file, precision=precision), 0)
    cmd = [sys.executable, os.path.join(REPO, 'scripts', 'generate_teacher_outputs.py'), '-opt', teacher_file,
           '--input', data['train_lq'], '--gt', data['train_gt'], '--output', teacher_lmdb, '--precision', precision]
    if samples > 1:
        cmd += ['--samples', str(samples), '--batch-size', '4']
    stores = [teacher_sample_path(teacher_lmdb, k) for k in range(samples)]
    record = os.path.join(teacher_lmdb, RECORD_NAME)
    complete = all(os.path.isfile(os.path.join(p, 'meta_info.txt')) for p in stores)
    if os.path.isfile(record):
        with open(record, encoding='utf-8') as f:
            if _settings_differ(json.load(f), settings):
                print(f'{teacher_lmdb} was made with another teacher or settings: rebuilding it')
                cmd.append('--overwrite')
                complete = False
    run(cmd, env=env)  # checks what is there, resumes or skips finished keys
    teacher_key = fingerprint(settings, *[file_digest(os.path.join(p, 'meta_info.txt')) for p in stores])
    stages.done('teacher_cache', teacher_key, time.time() - t0, complete)
    return teacher_lmdb, teacher_key


def train_student(work, opt, teacher_key, stages, env):
    """Stage 3 for one student: ``dtkd-train`` with ``opt`` (kept under ``options_demo/``), reused when
    a finished run had the same options and teacher cache. Returns its last checkpoint."""
    t0 = time.time()
    name = opt['name']
    key = fingerprint(opt, teacher_key if 'dataroot_teacher' in opt['datasets']['train'] else None)
    exp = os.path.join(work, 'experiments', name)
    ckpt = os.path.join(exp, 'models', 'net_g_latest.pth')
    if stages.valid(f'train_{name}', key, [ckpt]):
        print(f'reusing {ckpt}')
        stages.done(f'train_{name}', key, time.time() - t0, True)
        return ckpt
    if stages.started_with(f'train_{name}') != key and os.path.isdir(exp):
        # made from other options or another teacher: start again; an interrupted run started
        # with the same options resumes (--auto_resume)
        shutil.rmtree(exp)
    stages.start(f'train_{name}', key)
    yml = dump(opt, os.path.join(work, 'options_demo', f'{name}.yml'))
    run([sys.executable, '-m', 'dtkd.train', '-opt', yml, '--auto_resume'], env=env)
    if not os.path.isfile(ckpt):
        raise OptionError(f'training {name} finished without writing {ckpt}')
    stages.done(f'train_{name}', key, time.time() - t0, False)
    return ckpt


def evaluate(work, opt, weights, data, stages, env):
    """Stage 4 for one run: ``dtkd-test`` with ``opt`` into ``results/<name>``, reused when a finished
    evaluation had the same options, weights and data. Returns its ``summary.json``."""
    t0 = time.time()
    run_name = opt['name']
    res = os.path.join(work, 'results', run_name)
    key = fingerprint(opt, file_digest(weights), data['test_gt'], file_digest(os.path.join(
        data['root'], 'manifest.json')))
    summary = os.path.join(res, 'summary.json')
    if stages.valid(f'eval_{run_name}', key, [summary]):
        print(f'reusing {summary}')
        stages.done(f'eval_{run_name}', key, time.time() - t0, True)
        return summary
    stages.start(f'eval_{run_name}', key)
    if os.path.isdir(res):
        shutil.rmtree(res)
    yml = dump(opt, os.path.join(work, 'options_demo', f'{run_name}.yml'))
    run([sys.executable, '-m', 'dtkd.test', '-opt', yml], env=env)
    if not os.path.isfile(summary):
        raise OptionError(f'evaluation {run_name} finished without writing {summary}')
    stages.done(f'eval_{run_name}', key, time.time() - t0, False)
    return summary


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--teacher', default=DEMO_TEACHER,
                        help='teacher option file (default: the demo teacher; the paper\'s: '
                             'options/teacher/resshift_realsr_x4.yml with the official weights)')
    parser.add_argument('--student-iters', type=int, default=200, help='training iterations per student')
    parser.add_argument('--batch-size', type=int, default=4, help='student batch size')
    parser.add_argument('--gt-size', type=int, default=None, help='student GT patch size (default 96; tiny: 64)')
    parser.add_argument('--teacher-precision', choices=('fp32', 'bf16'), default='fp32',
                        help='teacher sampling precision (bf16: autocast; for the small demo teacher it was not '
                             'faster than fp32 on the CPU it was measured on)')
    parser.add_argument('--preset', default='full', choices=['full', 'tiny'], help='demo data size (tiny: for tests)')
    parser.add_argument('--work', default='.', help='folder that receives datasets/, experiments/, results/')
    args = parser.parse_args(argv)
    if args.gt_size is None:
        args.gt_size = 64 if args.preset == 'tiny' else 96
    for key in ('student_iters', 'batch_size', 'gt_size'):
        if getattr(args, key) < 1:
            parser.error(f'--{key.replace("_", "-")} must be positive')
    if args.gt_size % 32:
        parser.error('--gt-size must be a multiple of 32 (x4 and the window of 8 LR pixels)')
    return args


def main(argv=None):
    args = parse_args(argv)
    sys.path.insert(0, REPO)
    import dtkd_model  # noqa: F401  (registers the project's classes; makes basicsr importable)
    from dtkd_compat import OptionError

    work = os.path.abspath(args.work)
    os.makedirs(work, exist_ok=True)
    os.chdir(work)
    report_dir = os.path.join(work, 'results', 'demo')
    py = sys.executable
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
    start = time.time()

    # ------------------------------------------------------------------ 0. the teacher, checked first
    teacher_file = resolve(args.teacher)
    try:
        teacher_opt = load_yaml(teacher_file)
        from dtkd_teacher.teacher import ResShiftTeacher

        # builds the networks and loads the checkpoints: missing weights stop the demo here
        ResShiftTeacher.from_options(teacher_file, device='cpu')
    except (OptionError, FileNotFoundError) as err:
        raise OptionError(f'--teacher {args.teacher}: {err}') from None
    precision = args.teacher_precision
    stages = Stages(report_dir)
    report = os.path.join(report_dir, 'report.md')
    if os.path.isfile(report):  # this run's report replaces it only if every stage completes
        os.replace(report, os.path.join(report_dir, 'report.previous.md'))

    # ------------------------------------------------------------------ 1. data
    header('1/5 Data: the embedded photographs, x4 bicubic, LMDB')
    t0 = time.time()
    from dtkd_data.demo_data import build_demo_dataset

    manifest = os.path.join(work, 'datasets', 'demo', 'manifest.json')
    before = os.path.getmtime(manifest) if os.path.isfile(manifest) else None
    data = build_demo_dataset(os.path.join(work, 'datasets', 'demo'), scale=4, preset=args.preset)
    stages.done('data', args.preset, time.time() - t0, before == os.path.getmtime(manifest))

    # ------------------------------------------------------------------ 2. teacher outputs
    header(f'2/5 Teacher: caching its outputs on the training set ({os.path.relpath(teacher_file, REPO)}, '
           f'{precision})')
    teacher_lmdb, teacher_key = cache_teacher(work, data, teacher_file, precision, stages, env)

    # ------------------------------------------------------------------ 3. students
    ckpts = {}
    for i, (name, source, _, kd_label) in enumerate(STUDENTS):
        header(f'3/5 Student {i + 1}/3: {kd_label if kd_label != "-" else "no distillation"} '
               f'({args.student_iters} iterations, from {source})')
        opt = student_train_options(source, name, data, teacher_lmdb, args)
        ckpts[name] = train_student(work, opt, teacher_key, stages, env)

    # ------------------------------------------------------------------ 4. evaluation
    runs = [('demo_eval_teacher', None)] + [(f'demo_eval_{name[5:]}', name) for name, *_ in STUDENTS]
    summaries = {}
    for i, (run_name, student) in enumerate(runs):
        header(f'4/5 Evaluation {i + 1}/{len(runs)}: {"teacher" if student is None else student} on the held-out '
               'photographs')
        if student is None:
            opt = teacher_test_options(teacher_opt, teacher_file, data, run_name, torch_cuda())
            weights = resolve(teacher_opt['unet']['ckpt'])
        else:
            label = next(s for s in STUDENTS if s[0] == student)
            opt = student_test_options(run_name, ckpts[student], data, label[2], label[3])
            weights = ckpts[student]
        summary = evaluate(work, opt, weights, data, stages, env)
        with open(summary, encoding='utf-8') as f:
            summaries[run_name] = json.load(f)['results']['demo_test']

    # ------------------------------------------------------------------ 5. figures and report
    header('5/5 Figures and results/demo/report.md')
    t0 = time.time()
    vis = {run_name: os.path.join(work, 'results', run_name, 'visualization', 'demo_test') for run_name, _ in runs}
    band_png = os.path.join(report_dir, 'band_discrepancy.png')
    cmd = [py, os.path.join(REPO, 'scripts', 'plot_band_discrepancy.py'), '--teacher', vis['demo_eval_teacher'],
           '--strip-suffix', '_sr', '--out', band_png, '--title', 'Band-group discrepancy to the teacher (demo)']
    for (run_name, _), (_, _, _, kd_label) in zip(runs[1:], STUDENTS):
        cmd += ['--student', f'{kd_label if kd_label != "-" else "no KD"}={vis[run_name]}']
    run(cmd, env=env)
    image = 'coffee'
    gt_png = os.path.join(data['test_gt_folder'], f'{image}.png')
    box = zoom_box(gt_png, 48 if args.preset == 'tiny' else 96)
    grid_png = os.path.join(report_dir, 'qualitative_grid.png')
    cmd = [py, os.path.join(REPO, 'scripts', 'plot_qualitative_grid.py'), '--image', image,
           '--lr', data['test_lq_folder'], '--gt', data['test_gt_folder'], '--box', ','.join(map(str, box)),
           '--strip-suffix', '_sr', '--out', grid_png]
    for (run_name, _), (_, _, _, kd_label) in zip(runs[1:], STUDENTS):
        cmd += ['--panel', f'{"SwinIR-small" if kd_label == "-" else kd_label}={vis[run_name]}']
    cmd += ['--panel', f'Teacher={vis["demo_eval_teacher"]}']
    run(cmd, env=env)
    stages.times['figures'] = time.time() - t0
    stages.reused['figures'] = False

    write_report(report_dir, runs, summaries, stages, args, teacher_file, precision, time.time() - start)
    print(f'\nreport: {os.path.join(report_dir, "report.md")}')
    return 0


def torch_cuda():
    import torch

    return torch.cuda.is_available()


def write_report(report_dir, runs, summaries, stages, args, teacher_file, precision, total):
    from dtkd_compat import atomic_write
    from dtkd_metric.report import metric_header, order_metrics

    labels = {'demo_eval_teacher': ('Teacher: ' + ('ResShift (demo, 15 steps)' if is_demo_teacher(teacher_file)
                                                    else 'ResShift (15 steps)'), '-')}
    for (run_name, _), (_, _, model, kd) in zip(runs[1:], STUDENTS):
        labels[run_name] = (model, kd)
    names = order_metrics({m for s in summaries.values() for m in s})
    better = {'niqe': 'lower', 'lpips': 'lower'}
    from dtkd_data.demo_data import PRESETS

    preset = PRESETS[args.preset]
    lines = ['# DTKD demo report', '',
             f'A small CPU run that exercises the whole pipeline on real photographs ({len(preset["train_photos"])} '
             f'training photographs, {len(preset["test_photos"])} held-out ones, x4 bicubic; preset '
             f'`{args.preset}`). It is not the paper\'s experiment, which needs the official ResShift weights, '
             'DIV2K and a GPU (see the README).', '',
             f'Teacher: `{os.path.relpath(teacher_file, REPO)}`, sampled in {precision}. Students: SwinIR-small '
             f'(0.93 M parameters), {args.student_iters} iterations each, batch {args.batch_size}, '
             f'{args.gt_size}x{args.gt_size} GT patches.', '',
             '| Model | KD loss | ' + ' | '.join(metric_header(n, better) for n in names) + ' |',
             '|---|---|' + '---|' * len(names)]
    for run_name, _ in runs:
        model, kd = labels[run_name]
        s = summaries[run_name]
        lines.append(f'| {model} | {kd} | ' + ' | '.join(fmt(s[n], n) if n in s else '-' for n in names) + ' |')
    lines += ['', 'Means over the held-out photographs (per image: `results/<run>/demo_test_metrics.csv`). '
              'PSNR/SSIM on the Y channel without border crop' + (
                  f', NIQE with a {NIQE_CROP}-pixel border crop.' if 'niqe' in names else '.'), '',
              '## Band-group discrepancy to the teacher', '',
              'Mean |W_g(teacher) - W_g(student)| per frequency group of a two-level Haar DWT '
              '(numbers: `band_discrepancy.json`).', '', '![band-group discrepancy](band_discrepancy.png)', '',
              '## Qualitative comparison', '', '![qualitative grid](qualitative_grid.png)', '',
              '## Stages', '', '| stage | seconds | |', '|---|---|---|']
    for stage, sec in stages.times.items():
        lines.append(f'| {stage} | {sec:.1f} | {"reused from an earlier run" if stages.reused.get(stage) else ""} |')
    lines += [f'| total | {total:.1f} | |', '', f'Machine: {machine()}.', '']
    atomic_write(os.path.join(report_dir, 'report.md'), '\n'.join(lines))
    print('\n'.join(lines))


def run_cli(main, name):
    """Exit with ``main()``'s status; an option error is one line (status 2), an interruption says that a
    rerun resumes (status 130)."""
    try:
        sys.exit(main())
    except OptionError as err:
        print(f'\n{name}: error: {err}', file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f'\n{name}: interrupted; a rerun continues where this one stopped', file=sys.stderr)
        sys.exit(130)


if __name__ == '__main__':
    run_cli(main, 'make demo')
