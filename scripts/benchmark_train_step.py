"""Cost of distillation per training iteration: DTKDModel (cached teacher) vs BasicSR's SRModel.

Both models train the same student on the same batch; their iterations are interleaved so that
machine noise hits both alike, and the medians and their ratio are printed as Markdown. The DWT
distillation loss alone (forward and backward on a student output and a teacher output of the
batch's GT size, median of ``--loss-repeats``) is printed with its share of a DTKDModel iteration.

``--online`` adds DTKD with the teacher online (it samples the batch's LQ each iteration, no
gradients): SinSR one step, ResShift v3 four steps, ResShift fifteen steps, and the real-world path
(``RealWorldDTKDModel``: Real-ESRGAN degradation of a GT square, then SinSR on that LQ). Random
weights: on the CPU the teachers have the demo teacher's size (``options/demo/resshift_demo_x4.yml``,
run for 1, 4 and 15 steps), on CUDA the full size of ``options/teacher/*.yml`` (bf16 autocast, as
``teacher.precision: auto``; ``--teacher-precision`` changes it).

    python scripts/benchmark_train_step.py [--batch 4] [--lr-size 64] [--iters 20] [--device cpu] [--online]
"""
import argparse
import copy
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))  # benchmark_common, also when loaded by path

from dtkd.launch import register_all  # noqa: E402  (must precede basicsr)

# isort: split
import torch  # noqa: E402
from basicsr.models import build_model  # noqa: E402
from benchmark_common import machine_description  # noqa: E402

from dtkd.infer import PAPER_STUDENT as STUDENT  # noqa: E402  (SwinIR-small x4)


def make_opt(model_type, device, total_iter, arch):
    train = {'ema_decay': 0, 'optim_g': {'type': 'Adam', 'lr': 2e-4, 'betas': [0.9, 0.99]},
             'scheduler': {'type': 'MultiStepLR', 'milestones': [10 ** 9], 'gamma': 0.5},
             'total_iter': total_iter, 'pixel_opt': {'type': 'L1Loss', 'loss_weight': 1.0}}
    if model_type != 'SRModel':
        train['kd_opt'] = {'type': 'DWTKDLoss', 'loss_weight': 2.0, 'level': 2, 'group_weights': [1, 2, 1]}
    return {'name': 'bench', 'model_type': model_type, 'scale': 4, 'is_train': True, 'dist': False,
            'rank': 0, 'world_size': 1, 'num_gpu': 1 if device == 'cuda' else 0,
            'network_g': dict(STUDENT, type=arch), 'path': {}, 'train': train,
            'logger': {'print_freq': 10 ** 9}}


DEMO_TEACHER = 'options/demo/resshift_demo_x4.yml'
REALWORLD = 'real-world DTKD, SinSR 1 step online (degradation included)'
# label, full-size teacher option file (CUDA), sampling steps
ONLINE_TEACHERS = [
    ('SinSR 1 step', 'options/teacher/sinsr_realsr_x4.yml', 1),
    ('ResShift v3 4 steps', 'options/teacher/resshift_v3_realsr_x4.yml', 4),
    ('ResShift 15 steps', 'options/teacher/resshift_realsr_x4.yml', 15),
]


def online_teacher(path, steps, device, precision):
    """A random-weight teacher: the demo size on the CPU (``steps`` steps), full size on CUDA."""
    from dtkd_teacher.teacher import build_teacher

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if device == 'cuda':
        return build_teacher(os.path.join(root, path), random_weights=True, device='cuda', precision=precision)
    return build_teacher(os.path.join(root, DEMO_TEACHER), random_weights=True, steps=steps, device='cpu',
                         precision='fp32')


def online_models(args, total):
    """{label: (model, batch factory)} for the online-teacher cases."""
    from unittest import mock

    from dtkd_model.realworld_dtkd_model import RealWorldDTKDModel

    s = args.lr_size
    precision = args.teacher_precision
    cases = {}
    for label, path, steps in ONLINE_TEACHERS:
        model = build_model(make_opt('DTKDModel', args.device, total, args.arch))
        model.online_teacher = online_teacher(path, steps, args.device, precision)
        cases[f'DTKD, {label} online'] = model
    # real-world path: GT square (ResShift's 300 / 256 ratio) -> degradation -> SinSR on that LQ
    opt = make_opt('RealWorldDTKDModel', args.device, total, args.arch)
    opt.update(manual_seed=0, degradation={'gt_size': 4 * s}, teacher={'opt': ONLINE_TEACHERS[0][1]})
    teacher = online_teacher(ONLINE_TEACHERS[0][1], 1, args.device, precision)
    with mock.patch.object(RealWorldDTKDModel, '_build_online_teacher', return_value=teacher):
        cases[REALWORLD] = build_model(opt)
    return cases


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--batch', type=int, default=4)
    parser.add_argument('--lr-size', type=int, default=64, help='LR patch side (GT is 4x)')
    parser.add_argument('--iters', type=int, default=20, help='timed iterations per model')
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--arch', default='SwinIRStudent', help='student arch (SwinIRStudent or SwinIR)')
    parser.add_argument('--device', default='auto', help="'auto' (CUDA if available), 'cpu' or 'cuda'")
    parser.add_argument('--loss-repeats', type=int, default=30, help='timed runs of the DWT loss alone')
    parser.add_argument('--online', action='store_true', help='also DTKD with online teachers (see the docstring)')
    parser.add_argument('--teacher-precision', default='bf16', help='online teachers on CUDA: bf16 | fp16 | fp32')
    args = parser.parse_args()
    from dtkd_compat import OptionError
    from dtkd_utils.device import pick_device

    try:
        args.device = pick_device(args.device).type  # BasicSR's models take num_gpu: CUDA device 0 or the CPU
    except OptionError as err:
        parser.error(str(err))
    register_all()
    torch.manual_seed(0)
    total = 2 * (args.iters + args.warmup) + 2
    models = {name: build_model(make_opt(name, args.device, total, args.arch)) for name in ('SRModel', 'DTKDModel')}
    if args.online:
        models.update(online_models(args, total))
    for model in models.values():
        model.net_g.load_state_dict(models['SRModel'].net_g.state_dict())
    s = args.lr_size
    gt = torch.rand(args.batch, 3, 4 * s, 4 * s)
    batch = {'lq': torch.nn.functional.interpolate(gt, scale_factor=0.25, mode='bicubic').clamp(0, 1), 'gt': gt}
    kd_batch = dict(batch, teacher=(gt + 0.05 * torch.randn_like(gt)).clamp(0, 1))
    side = 4 * round(4 * s * 300 / 256 / 4)  # GT square of the real-world path (ResShift: 300 for 256 patches)
    if args.online:
        side = max(side, models[REALWORLD].degradation.min_gt_side())
    gt_batch = {'gt': torch.rand(args.batch, 3, side, side)}
    sync = torch.cuda.synchronize if args.device == 'cuda' else (lambda: None)

    def batch_of(name):
        if name == 'DTKDModel':
            return kd_batch
        return gt_batch if name.startswith('real-world') else batch

    times = {name: [] for name in models}
    # The KD weight is > 0 from iteration 1 on (linear schedule), so every timed DTKD step pays for it.
    for it in range(1, args.warmup + args.iters + 1):
        for name, model in models.items():
            model.feed_data(copy.copy(batch_of(name)))
            sync()
            t0 = time.perf_counter()
            model.optimize_parameters(it)
            sync()
            if it > args.warmup:
                times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(v) * 1e3 for name, v in times.items()}
    print(f'Machine: {machine_description(torch.device(args.device))}; device {args.device}; student {args.arch}; '
          f'batch {args.batch}, LR {s}x{s} (GT {4 * s}x{4 * s}); median of {args.iters} interleaved iterations\n')
    print('| model | ms / iteration | ratio to SRModel |')
    print('|---|---|---|')
    for name in models:
        print(f'| {name} | {med[name]:.1f} | {med[name] / med["SRModel"]:.3f} |')
    if args.online:
        size = 'full size, random weights' if args.device == 'cuda' else f'demo size ({DEMO_TEACHER}), random weights'
        prec = args.teacher_precision if args.device == 'cuda' else 'fp32'
        print(f'\nOnline teachers: {size}, {prec}; real-world GT squares {side}x{side}, '
              f'patches {4 * s}x{4 * s} after the degradation')
    loss_ms = time_kd_loss(models['DTKDModel'].cri_kd, gt.to(args.device), args.loss_repeats, sync)
    print(f'\nDWT loss alone (forward + backward, {tuple(gt.shape)}, median of {args.loss_repeats}): {loss_ms:.2f} ms, '
          f'{loss_ms / med["DTKDModel"]:.1%} of a DTKDModel iteration')


def time_kd_loss(loss, gt, repeats, sync):
    """Median ms of ``loss(student, teacher)`` forward and backward on tensors of ``gt``'s shape."""
    student = (gt + 0.02 * torch.randn_like(gt)).requires_grad_()
    teacher = (gt + 0.05 * torch.randn_like(gt)).clamp(0, 1)
    times = []
    for i in range(repeats + 3):
        student.grad = None
        sync()
        t0 = time.perf_counter()
        loss(student, teacher).backward()
        sync()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


if __name__ == '__main__':
    main()
