"""``make demo``: the DTKD pipeline at small scale on real photographs, on a CPU.

Stages (each timed, each reusing its output when a previous run completed it):
  1. build the embedded data set from the photographs scikit-image ships (LMDB, x4 bicubic);
  2. train the SwinIR-small student with ``dtkd-train`` on a short schedule;
  3. evaluate it on the held-out photographs with ``dtkd-test``;
  4. write ``results/demo/report.md``.

The option files are generated from ``options/train_dtkd.yml`` / ``options/test/test_realsr_x4.yml``
with only data paths and schedule lengths changed, so the demo runs the real pipeline.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def header(text):
    print(f'\n=== {text} ===', flush=True)


def run(cmd):
    print('$ ' + ' '.join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def load(path):
    with open(os.path.join(REPO, path)) as f:
        return yaml.safe_load(f)


def dump(opt, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        yaml.safe_dump(opt, f, sort_keys=False)
    return path


def student_options(data, iters, name, gt_size):
    opt = load('options/ablation/train_swinir_small_l1.yml')
    opt['name'] = name
    opt['num_gpu'] = 'auto'
    train = opt['datasets']['train']
    train.update(dataroot_gt=data['train_gt'], dataroot_lq=data['train_lq'], gt_size=gt_size, batch_size_per_gpu=4,
                 num_worker_per_gpu=1, dataset_enlarge_ratio=100)
    opt['datasets']['val'].update(name='demo_test', dataroot_gt=data['test_gt'], dataroot_lq=data['test_lq'])
    opt['train']['total_iter'] = iters
    opt['train']['scheduler']['milestones'] = [iters * 3 // 4]
    opt['val']['val_freq'] = iters
    opt['logger'].update(print_freq=max(iters // 10, 1), save_checkpoint_freq=iters, use_tb_logger=False)
    return opt


def test_options(data, ckpt, name):
    opt = load('options/test/test_realsr_x4.yml')
    opt['name'] = name
    opt['datasets'] = {'test_1': {'name': 'demo_test', 'type': 'PairedTeacherDataset', 'dataroot_gt': data['test_gt'],
                                  'dataroot_lq': data['test_lq'], 'io_backend': {'type': 'lmdb'}}}
    opt['path']['pretrain_network_g'] = ckpt
    opt['val'].update(model_label='SwinIR-small', kd_label='-', pbar=False)
    for metric in ('lpips', 'musiq'):  # perceptual metrics need weights a user brings
        opt['val']['metrics'][metric]['optional'] = True
    opt['val']['metrics']['niqe'] = {'type': 'calculate_niqe', 'crop_border': 4, 'better': 'lower'}
    return opt


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--iters', type=int, default=300, help='student training iterations')
    parser.add_argument('--preset', default='full', choices=['full', 'tiny'], help='demo data size')
    parser.add_argument('--work', default='.', help='folder that receives datasets/, experiments/, results/')
    args = parser.parse_args()
    work = os.path.abspath(args.work)
    os.makedirs(work, exist_ok=True)
    os.chdir(work)
    py = sys.executable
    times = {}

    header('1/4 Building the demo data set from scikit-image photographs')
    t0 = time.time()
    sys.path.insert(0, REPO)
    from dtkd_data.demo_data import build_demo_dataset

    data = build_demo_dataset(os.path.join(work, 'datasets', 'demo'), scale=4, preset=args.preset)
    times['data'] = time.time() - t0

    header(f'2/4 Training SwinIR-small ({args.iters} iterations)')
    t0 = time.time()
    name = 'demo_swinir_small'
    ckpt = os.path.join(work, 'experiments', name, 'models', 'net_g_latest.pth')
    if os.path.isfile(ckpt):
        print(f'reusing {ckpt}')
    else:
        opt = student_options(data, args.iters, name, gt_size=64 if args.preset == 'tiny' else 128)
        yml = dump(opt, os.path.join(work, 'options_demo', f'{name}.yml'))
        run([py, '-m', 'dtkd_model.train', '-opt', yml, '--auto_resume'])
    times['train'] = time.time() - t0

    header('3/4 Evaluating on the held-out photographs')
    t0 = time.time()
    yml = dump(test_options(data, ckpt, 'demo_eval_swinir_small'), os.path.join(work, 'options_demo', 'eval.yml'))
    run([py, '-m', 'dtkd_model.test', '-opt', yml])
    times['test'] = time.time() - t0

    header('4/4 Writing results/demo/report.md')
    res = os.path.join(work, 'results', 'demo_eval_swinir_small')
    with open(os.path.join(res, 'summary.md')) as f:
        table = f.read()
    with open(os.path.join(res, 'summary.json')) as f:
        summary = json.load(f)
    os.makedirs(os.path.join(work, 'results', 'demo'), exist_ok=True)
    report = os.path.join(work, 'results', 'demo', 'report.md')
    with open(report, 'w') as f:
        f.write('# DTKD demo report\n\n')
        f.write('A small CPU run that exercises the pipeline on real photographs; it is not the paper\'s '
                'experiment (that needs the official ResShift weights, DIV2K and a GPU).\n\n')
        f.write(table + '\n\n')
        f.write('| stage | seconds |\n|---|---|\n')
        for stage, sec in times.items():
            f.write(f'| {stage} | {sec:.0f} |\n')
        f.write(f'\nMachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, '
                f'Python {platform.python_version()}.\n')
    print(open(report).read())
    print(f'report: {report}; metrics: {json.dumps(summary)}')


if __name__ == '__main__':
    main()
