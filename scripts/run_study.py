"""``make study``: the distillation losses compared over several seeds on the demo data, with paired tests.

Built on the demo's stages (``scripts/run_demo.py``: data, teacher cache, option generation from the
paper's option files, ``dtkd-train``, ``dtkd-test``, each reused when an earlier run completed it with
the same inputs). Every method trains from its own option file with only the data paths, the schedule
length and ``manual_seed`` changed; each (method, seed) student is evaluated on the held-out
photographs. The report (``<out>/report.md``, numbers in ``study.json``, figure ``study.png``) gives:

* each metric's mean ± standard deviation over seeds (per seed: the mean over the test images);
* each method against plain DWT-KD: paired differences over the (image, seed) pairs, their mean with a
  95 % t confidence interval, and the two-sided Wilcoxon signed-rank test (``scipy.stats.wilcoxon``;
  exact null distribution when there are no ties or zero differences, else the normal approximation);
  significant at p < 0.05, without correction for the number of comparisons;
* the band-group (LF/MF/HF, two-level Haar) discrepancy of each method's outputs to the teacher's
  outputs and to the GT on the test images (``dtkd_metric.figures.compute_band_discrepancy``);
* the machine, the commands and the wall time of every stage.

The per-image values come from ``results/<run>/demo_test_metrics.csv``, which ``dtkd-test`` writes.
"""
import argparse
import csv
import json
import math
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, 'scripts'))

import run_demo  # noqa: E402

METHODS = {
    # name: (source option file, label)
    'no_kd': ('options/ablation/train_swinir_small_l1.yml', 'no KD'),
    'kd_l1': ('options/ablation/train_kd_l1.yml', 'L1-KD'),
    'kd_dwt': ('options/train_dtkd.yml', 'DWT-KD'),
    'dwt_gt_agreement': ('options/ablation/train_dwt_confidence.yml', 'DWT-KD + gt_agreement'),
    'dwt_teacher_spread': ('options/ablation/train_dwt_spread.yml', 'DWT-KD + teacher_spread'),
    'dwt_adaptive': ('options/ablation/train_dwt_adaptive.yml', 'DWT-KD + adaptive weights'),
}
BASELINE = 'kd_dwt'
GROUPS = ('LF', 'MF', 'HF')
ALPHA = 0.05
TEST_SET = 'demo_test'


# ---------------------------------------------------------------------------------------------- statistics
def t_quantile_975(dof):
    from scipy import stats

    return float(stats.t.ppf(0.975, dof))


def paired_comparison(values, baseline):
    """``values``/``baseline``: {(image, seed): value}, same pairs. Returns the paired statistics of
    ``values - baseline``: n, mean, 95 % t interval, Wilcoxon signed-rank statistic and two-sided p."""
    from scipy import stats

    pairs = sorted(baseline)
    if sorted(values) != pairs:
        raise ValueError('paired comparison: the two runs cover different (image, seed) pairs')
    diffs = [values[p] - baseline[p] for p in pairs]
    n = len(diffs)
    mean = sum(diffs) / n
    out = {'n': n, 'mean_diff': mean, 'ci95': [float('nan'), float('nan')], 'test': 'Wilcoxon signed-rank, two-sided',
           'statistic': float('nan'), 'p': float('nan'), 'method': None}
    if n > 1:
        sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
        half = t_quantile_975(n - 1) * sd / math.sqrt(n)
        out['ci95'] = [mean - half, mean + half]
    nonzero = [abs(d) for d in diffs if d != 0]
    if nonzero:
        exact = len(set(nonzero)) == len(nonzero) and len(nonzero) == n
        res = stats.wilcoxon(diffs, zero_method='wilcox', alternative='two-sided',
                             method='exact' if exact else 'approx')
        out.update(statistic=float(res.statistic), p=float(res.pvalue), method='exact' if exact else 'approx')
    else:
        out.update(statistic=0.0, p=1.0, method='all differences zero')
    return out


def mean_std(values):
    """Mean and sample standard deviation (ddof 1; 0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def read_per_image(csv_path):
    """{image: {metric: value}} from a dtkd-test ``<dataset>_metrics.csv``."""
    with open(csv_path, encoding='utf-8', newline='') as f:
        rows = list(csv.DictReader(f))
    return {row['image']: {k: float(v) for k, v in row.items() if k != 'image' and v not in ('', None)}
            for row in rows}


# ---------------------------------------------------------------------------------------------- options
def method_train_options(method, seed, data, teacher_lmdb, args):
    source, _ = METHODS[method]
    opt = run_demo.student_train_options(source, f'study_{method}_s{seed}', data, teacher_lmdb, args)
    opt['manual_seed'] = int(seed)
    return opt


def samples_needed(methods):
    """The largest ``datasets.train.teacher_samples`` among the methods' option files (1 if none)."""
    k = 1
    for method in methods:
        opt = run_demo.load_yaml(METHODS[method][0])
        k = max(k, int(opt['datasets']['train'].get('teacher_samples') or 1))
    return k


# ---------------------------------------------------------------------------------------------- analysis
def analyse(work, methods, seeds, data, teacher_vis):
    """Every number of the report, from the result folders of the evaluated runs."""
    from dtkd_metric.figures import compute_band_discrepancy

    per_image = {}  # method -> seed -> image -> {metric: value}
    for method in methods:
        per_image[method] = {}
        for seed in seeds:
            res = os.path.join(work, 'results', f'study_eval_{method}_s{seed}')
            per_image[method][seed] = read_per_image(os.path.join(res, f'{TEST_SET}_metrics.csv'))
    vis = {(m, s): os.path.join(work, 'results', f'study_eval_{m}_s{s}', 'visualization', TEST_SET)
           for m in methods for s in seeds}
    students = {f'{m} s{s}': folder for (m, s), folder in vis.items()}
    for ref, folder in (('teacher', teacher_vis), ('gt', data['test_gt_folder'])):
        result = compute_band_discrepancy(folder, students, strip_suffixes=['_sr'])
        for (m, s) in vis:
            for image, groups in result['per_image'][f'{m} s{s}'].items():
                row = per_image[m][s][image]
                for g, v in groups.items():
                    row[f'{g}_to_{ref}'] = v
    metrics = sorted({k for m in methods for s in seeds for img in per_image[m][s].values() for k in img})
    summary = {}
    for method in methods:
        summary[method] = {}
        for metric in metrics:
            per_seed = [sum(v[metric] for v in per_image[method][s].values()) / len(per_image[method][s])
                        for s in seeds]
            mean, std = mean_std(per_seed)
            summary[method][metric] = {'mean': mean, 'std': std, 'per_seed': per_seed}
    def against(reference):
        tests = {}
        if reference in methods:
            base = {(img, s): v for s in seeds for img, v in per_image[reference][s].items()}
            for method in methods:
                if method == reference:
                    continue
                tests[method] = {}
                for metric in metrics:
                    a = {(img, s): v[metric] for s in seeds for img, v in per_image[method][s].items()}
                    tests[method][metric] = paired_comparison(a, {k: v[metric] for k, v in base.items()})
        return tests

    return {'metrics': metrics, 'per_image': {m: {str(s): per_image[m][s] for s in seeds} for m in methods},
            'summary': summary, 'tests': against(BASELINE), 'tests_vs_no_kd': against('no_kd'),
            'baseline': BASELINE, 'alpha': ALPHA}


def better_of(metric):
    return 'lower' if metric == 'niqe' or '_to_' in metric else 'higher'


def fmt(value, metric):
    if metric.endswith(('_to_teacher', '_to_gt')):
        return f'{value:.4f}'
    return run_demo.fmt(value, metric)


def plot(result, methods, out_png):
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    labels = [METHODS[m][1].replace('DWT-KD + ', '+ ').replace(' weights', '') for m in methods]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    ax = axes[0]
    for i, m in enumerate(methods):
        s = result['summary'][m]['psnr']
        ax.scatter([i] * len(s['per_seed']), s['per_seed'], s=14, color='0.5', zorder=3)
        ax.errorbar([i], [s['mean']], yerr=[s['std']], fmt='o', color='C0', capsize=4, zorder=4)
    ax.set_xticks(range(len(methods)), labels, fontsize=7, rotation=25, ha='right')
    ax.set_ylabel('PSNR (dB, Y)')
    ax.set_title('PSNR: seeds (grey), mean ± std (blue)', fontsize=9)
    width = 0.8 / len(methods)
    for ax, ref, title in ((axes[1], 'teacher', 'to the teacher'), (axes[2], 'gt', 'to the GT')):
        for i, m in enumerate(methods):
            means = [result['summary'][m][f'{g}_to_{ref}']['mean'] for g in GROUPS]
            stds = [result['summary'][m][f'{g}_to_{ref}']['std'] for g in GROUPS]
            ax.bar([j + (i - (len(methods) - 1) / 2) * width for j in range(len(GROUPS))], means, width, yerr=stds,
                   capsize=2, label=METHODS[m][1], color=f'C{i}')
        ax.set_xticks(range(len(GROUPS)), GROUPS)
        ax.set_ylabel('mean |W_g(ref) - W_g(student)|')
        ax.set_title(f'Band-group discrepancy {title}', fontsize=9)
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return out_png


def write_report(out_dir, result, methods, seeds, args, stages, commands, total, samples):
    from dtkd_compat import atomic_write
    from dtkd_metric.report import order_metrics

    quality = order_metrics([m for m in result['metrics'] if '_to_' not in m])
    band = [f'{g}_to_{ref}' for ref in ('teacher', 'gt') for g in GROUPS]
    arrow = {'higher': '↑', 'lower': '↓'}
    lines = ['# Study: distillation losses over seeds', '',
             f'{len(methods)} methods x {len(seeds)} seeds (seeds {", ".join(map(str, seeds))}), SwinIR-small, '
             f'{args.iters} iterations each, batch {args.batch_size}, {args.gt_size}x{args.gt_size} GT patches, '
             f'demo data (preset `{args.preset}`), teacher `{os.path.relpath(run_demo.resolve(args.teacher), REPO)}` '
             f'({samples} cached sample(s) per training image).', '',
             '## Metrics (mean ± std over seeds)', '',
             'Per seed, the mean over the test images; then mean ± sample standard deviation over the seeds.', '',
             '| Method | ' + ' | '.join(f'{m.upper()} {arrow[better_of(m)]}' for m in quality) + ' |',
             '|---|' + '---|' * len(quality)]
    for m in methods:
        s = result['summary'][m]
        lines.append(f'| {METHODS[m][1]} | ' + ' | '.join(
            f'{fmt(s[q]["mean"], q)} ± {fmt(s[q]["std"], q)}' for q in quality) + ' |')
    lines += ['', '## Band-group discrepancy (mean ± std over seeds)', '',
              'Mean |W_g(reference) - W_g(student)| per group of a two-level Haar DWT of the test images '
              '(LF = LL2, MF = level-2 details, HF = level-1 details); lower is closer.', '',
              '| Method | ' + ' | '.join(f'{g} to {ref}' for ref in ('teacher', 'GT') for g in GROUPS) + ' |',
              '|---|' + '---|' * len(band)]
    for m in methods:
        s = result['summary'][m]
        lines.append(f'| {METHODS[m][1]} | ' + ' | '.join(
            f'{fmt(s[b]["mean"], b)} ± {fmt(s[b]["std"], b)}' for b in band) + ' |')
    for key, reference, shown_metrics in (('tests', 'DWT-KD', quality + ['HF_to_teacher', 'HF_to_gt']),
                                          ('tests_vs_no_kd', 'no KD', ['psnr', 'HF_to_teacher'])):
        if not result[key]:
            continue
        n = next(iter(next(iter(result[key].values())).values()))['n']
        lines += ['', f'## Against {reference} (paired over {n} (image, seed) pairs)', '',
                  f'Difference = method - {reference} per (image, seed); mean with its 95 % t confidence interval; '
                  f'p: two-sided Wilcoxon signed-rank test (scipy). Significant: p < {ALPHA} (no correction for '
                  'the number of comparisons; * marks it).', '',
                  '| Method | metric | mean difference | 95 % CI | W | p | |', '|---|---|---|---|---|---|---|']
        for m, per_metric in result[key].items():
            for q in shown_metrics:
                t = per_metric[q]
                lo, hi = t['ci95']
                star = '*' if t['p'] < ALPHA else ''
                lines.append(f'| {METHODS[m][1]} | {q} | {t["mean_diff"]:+.4f} | [{lo:+.4f}, {hi:+.4f}] | '
                             f'{t["statistic"]:.1f} | {t["p"]:.3g} | {star} |')
    shown = commands['stages'][:4]
    if len(commands['stages']) > 4:
        shown.append(f'... ({len(commands["stages"])} commands in all, in `study.json`)')
    lines += ['', '![study](study.png)', '', '## Commands', '', '```', ' '.join(commands['study']), '```', '',
              'Per run (options under `options_demo/`):', '', '```'] + shown + [
        '```', '', '## Stages', '', '| stage | seconds | |', '|---|---|---|']
    for stage, sec in stages.times.items():
        lines.append(f'| {stage} | {sec:.1f} | {"reused from an earlier run" if stages.reused.get(stage) else ""} |')
    lines += [f'| total | {total:.1f} | |', '', f'Machine: {run_demo.machine()}.', '']
    atomic_write(os.path.join(out_dir, 'report.md'), '\n'.join(lines))
    return '\n'.join(lines)


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--methods', nargs='+', default=list(METHODS), choices=list(METHODS),
                        help=f'methods to train (default: all; the paired tests need {BASELINE})')
    parser.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2], help='manual_seed of the runs')
    parser.add_argument('--iters', type=int, default=250,
                        help='training iterations per run (250: the 18 runs take about an hour on 2 shared CPU cores)')
    parser.add_argument('--batch-size', type=int, default=4, help='student batch size')
    parser.add_argument('--gt-size', type=int, default=64, help='student GT patch size (default 64)')
    parser.add_argument('--teacher', default=run_demo.DEMO_TEACHER, help='teacher option file')
    parser.add_argument('--teacher-precision', choices=('fp32', 'bf16'), default='fp32')
    parser.add_argument('--preset', default='full', choices=['full', 'tiny'], help='demo data size (tiny: tests)')
    parser.add_argument('--work', default='.', help='folder that receives datasets/, experiments/, results/')
    parser.add_argument('--out', default=None, help='report folder (default <work>/results/study)')
    args = parser.parse_args(argv)
    for key in ('iters', 'batch_size', 'gt_size'):
        if getattr(args, key) < 1:
            parser.error(f'--{key.replace("_", "-")} must be positive')
    if args.gt_size % 32:
        parser.error('--gt-size must be a multiple of 32 (x4 and the window of 8 LR pixels)')
    if len(set(args.seeds)) != len(args.seeds) or len(set(args.methods)) != len(args.methods):
        parser.error('--seeds and --methods must not repeat')
    args.methods = [m for m in METHODS if m in args.methods]  # the table's order
    args.student_iters = args.iters  # the name run_demo's option generation reads
    return args


def main(argv=None):
    args = parse_args(argv)
    import dtkd_model  # noqa: F401  (registers the project's classes; makes basicsr importable)

    work = os.path.abspath(args.work)
    out_dir = os.path.abspath(args.out) if args.out else os.path.join(work, 'results', 'study')
    os.makedirs(work, exist_ok=True)
    os.chdir(work)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
    start = time.time()
    commands = {'study': [os.path.relpath(sys.executable, REPO), 'scripts/run_study.py'] + list(
        argv if argv is not None else sys.argv[1:]), 'stages': []}
    real_run = run_demo.run

    def logged_run(cmd, env=None):
        def short(arg):  # paths relative to the work folder, else to the project
            for root in (work, REPO):
                if os.path.isabs(arg) and arg.startswith(root + os.sep):
                    return os.path.relpath(arg, root)
            return arg

        commands['stages'].append(' '.join(short(c) for c in cmd))
        return real_run(cmd, env=env)

    run_demo.run = logged_run
    teacher_file = run_demo.resolve(args.teacher)
    teacher_opt = run_demo.load_yaml(teacher_file)
    for m in args.methods:  # every option file read before any long work
        run_demo.load_yaml(METHODS[m][0])
    samples = samples_needed(args.methods)
    stages = run_demo.Stages(out_dir)
    report = os.path.join(out_dir, 'report.md')
    if os.path.isfile(report):
        os.replace(report, os.path.join(out_dir, 'report.previous.md'))

    run_demo.header('1/5 Data')
    t0 = time.time()
    from dtkd_data.demo_data import build_demo_dataset

    data = build_demo_dataset(os.path.join(work, 'datasets', 'demo'), scale=4, preset=args.preset)
    stages.done('data', args.preset, time.time() - t0, False)

    run_demo.header(f'2/5 Teacher outputs on the training set ({samples} sample(s) per image)')
    teacher_lmdb, teacher_key = run_demo.cache_teacher(work, data, teacher_file, args.teacher_precision, stages,
                                                       env, samples=samples)

    ckpts = {}
    runs = [(m, s) for s in args.seeds for m in args.methods]  # seed-major: a partial study is balanced
    for i, (m, s) in enumerate(runs):
        run_demo.header(f'3/5 Training {i + 1}/{len(runs)}: {METHODS[m][1]}, seed {s} ({args.iters} iterations)')
        opt = method_train_options(m, s, data, teacher_lmdb, args)
        ckpts[m, s] = run_demo.train_student(work, opt, teacher_key, stages, env)

    run_demo.header('4/5 Evaluation: the teacher and every student on the held-out photographs')
    opt = run_demo.teacher_test_options(teacher_opt, teacher_file, data, 'study_eval_teacher', run_demo.torch_cuda())
    run_demo.evaluate(work, opt, run_demo.resolve(teacher_opt['unet']['ckpt']), data, stages, env)
    for i, (m, s) in enumerate(runs):
        print(f'evaluation {i + 1}/{len(runs)}: {m}, seed {s}', flush=True)
        opt = run_demo.student_test_options(f'study_eval_{m}_s{s}', ckpts[m, s], data, 'SwinIR-small',
                                            METHODS[m][1])
        run_demo.evaluate(work, opt, ckpts[m, s], data, stages, env)

    run_demo.header('5/5 Statistics, figure and report')
    t0 = time.time()
    teacher_vis = os.path.join(work, 'results', 'study_eval_teacher', 'visualization', TEST_SET)
    result = analyse(work, args.methods, args.seeds, data, teacher_vis)
    plot(result, args.methods, os.path.join(out_dir, 'study.png'))
    stages.times['analysis'] = time.time() - t0
    stages.reused['analysis'] = False
    total = time.time() - start
    result.update(methods=args.methods, seeds=args.seeds, iters=args.iters, batch_size=args.batch_size,
                  gt_size=args.gt_size, teacher_samples=samples, commands=commands, seconds=total,
                  stage_seconds=stages.times, machine=run_demo.machine())
    from dtkd_compat import atomic_write

    atomic_write(os.path.join(out_dir, 'study.json'), json.dumps(result, indent=2, sort_keys=True) + '\n')
    print(write_report(out_dir, result, args.methods, args.seeds, args, stages, commands, total, samples))
    print(f'\nreport: {report}')
    return 0


if __name__ == '__main__':
    run_demo.run_cli(main, 'make study')
