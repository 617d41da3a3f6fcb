"""ResultsRecorder files and the multi-run aggregation (scripts/aggregate_runs.py)."""
import csv
import importlib.util
import json
import os

import numpy as np
import pytest

from dtkd_metric import report
from dtkd_metric.report import ResultsRecorder, aggregate_summaries, load_summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RNG = np.random.default_rng(0)


def _load_script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, 'scripts', f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fill(recorder, offset=0.0):
    values = {}
    for dataset, n in (('RealSR', 4), ('ImageNet-Test', 3)):
        values[dataset] = {}
        for i in range(n):
            # Insertion order deliberately not the table order.
            m = {'musiq': 40 + 10 * RNG.random() + offset, 'lpips': 0.3 + 0.1 * RNG.random(),
                 'psnr': 27 + RNG.random() + offset}
            recorder.add(dataset, f'img_{i:03d}', m)
            values[dataset][f'img_{i:03d}'] = m
    return values


def test_summary_csv_and_table(tmp_path):
    rec = ResultsRecorder(tmp_path / 'run', model_label='Student', kd_label='DWT')
    values = _fill(rec)
    paths = rec.write()
    payload = json.loads((tmp_path / 'run' / 'summary.json').read_text())
    summary = payload['results']
    assert payload['labels'] == {'model': 'Student', 'kd_loss': 'DWT', 'better': {}}
    assert payload['protocol']['datasets']['RealSR']['images'] == len(values['RealSR'])
    assert list(summary) == ['RealSR', 'ImageNet-Test']
    for dataset, images in values.items():
        assert list(summary[dataset]) == ['psnr', 'lpips', 'musiq']
        for metric in ('psnr', 'lpips', 'musiq'):
            assert summary[dataset][metric] == pytest.approx(np.mean([m[metric] for m in images.values()]), rel=1e-12)
        with open(paths['csv'][dataset], newline='') as f:
            rows = list(csv.DictReader(f))
        assert [r['image'] for r in rows] == list(images)
        for row in rows:
            for metric in ('psnr', 'lpips', 'musiq'):
                assert float(row[metric]) == images[row['image']][metric]  # exact round trip
    md = (tmp_path / 'run' / 'summary.md').read_text()
    assert '| Dataset | Model | KD loss | PSNR↑ | LPIPS↓ | MUSIQ↑ |' in md
    psnr, lpips, musiq = (summary['RealSR'][k] for k in ('psnr', 'lpips', 'musiq'))
    assert f'| RealSR | Student | DWT | {psnr:.2f} | {lpips:.3f} | {musiq:.3f} |' in md
    assert load_summary(tmp_path / 'run') == summary
    assert not [p for p in os.listdir(tmp_path / 'run') if p.endswith('.tmp')]


def test_unknown_metric_direction_and_missing_labels(tmp_path):
    rec = ResultsRecorder(tmp_path, better={'fid': 'lower'})
    rec.add('Set', 'a', {'fid': 3.0, 'sharpness': 1.0, 'ssim': 0.5})
    md = rec.markdown()
    assert '| Dataset | Model | KD loss | SSIM↑ | fid↓ | sharpness |' in md
    assert '| Set | - | - | 0.5000 | 3.0000 | 1.0000 |' in md


@pytest.mark.parametrize('call, match', [
    (lambda r: r.add('RealSR', 'img_000', {'psnr': 1.0}), 'already recorded'),
    (lambda r: r.add('RealSR', 'img_009', {'psnr': 1.0}), 'differ from the other images'),
    (lambda r: r.add('RealSR', 'img_009', {'psnr': float('nan'), 'lpips': 1, 'musiq': 1}), 'is nan'),
    (lambda r: r.add('RealSR', 'img_009', {'psnr': 'x', 'lpips': 1, 'musiq': 1}), 'not a number'),
    (lambda r: r.add('a/b', 'img', {'psnr': 1.0}), 'path separators'),
])
def test_bad_records_are_refused(tmp_path, call, match):
    rec = ResultsRecorder(tmp_path)
    rec.add('RealSR', 'img_000', {'psnr': 1.0, 'lpips': 0.1, 'musiq': 3.0})
    with pytest.raises(ValueError, match=match):
        call(rec)


def test_write_without_results_and_atomic_replace(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match='no results recorded'):
        ResultsRecorder(tmp_path).write()
    rec = ResultsRecorder(tmp_path)
    rec.add('RealSR', 'a', {'psnr': 20.0})
    rec.write()
    before = (tmp_path / 'summary.json').read_text()
    rec2 = ResultsRecorder(tmp_path)
    rec2.add('RealSR', 'a', {'psnr': 30.0})

    def failing_replace(src, dst):
        raise OSError('disk full')

    monkeypatch.setattr(report.os, 'replace', failing_replace)
    with pytest.raises(OSError, match='disk full'):
        rec2.write()
    assert (tmp_path / 'summary.json').read_text() == before  # the old complete file is intact
    assert sorted(os.listdir(tmp_path)) == ['RealSR_metrics.csv', 'summary.json', 'summary.md']


def _three_runs(tmp_path):
    runs = []
    for seed in range(3):
        rec = ResultsRecorder(tmp_path / f'seed{seed}', model_label='Student', kd_label='DWT')
        _fill(rec, offset=0.1 * seed)
        rec.write()
        runs.append(str(tmp_path / f'seed{seed}'))
    return runs


def test_aggregate_mean_and_sample_std(tmp_path):
    runs = _three_runs(tmp_path)
    summaries = {r: load_summary(r) for r in runs}
    agg = aggregate_summaries(summaries)
    for dataset in ('RealSR', 'ImageNet-Test'):
        for metric in ('psnr', 'lpips', 'musiq'):
            values = [summaries[r][dataset][metric] for r in runs]
            assert agg[dataset][metric]['mean'] == pytest.approx(np.mean(values), rel=1e-12)
            assert agg[dataset][metric]['std'] == pytest.approx(np.std(values, ddof=1), rel=1e-10)
            assert agg[dataset][metric]['n'] == 3

    script = _load_script('aggregate_runs')
    assert script.main(runs + ['--out', str(tmp_path / 'agg'), '--model', 'Student', '--kd', 'DWT']) == 0
    payload = json.loads((tmp_path / 'agg' / 'aggregate.json').read_text())
    assert payload['results']['RealSR']['psnr']['std'] == pytest.approx(agg['RealSR']['psnr']['std'])
    assert 'ddof=1' in payload['std']
    md = (tmp_path / 'agg' / 'aggregate.md').read_text()
    p = agg['RealSR']['psnr']
    assert f'| RealSR | Student | DWT | {p["mean"]:.2f} ± {p["std"]:.2f} |' in md
    assert 'ddof=1' in md and '3 runs' in md
    # as documented: no --out (the runs' common folder / aggregate) and the labels the runs recorded
    assert script.main(runs) == 0
    md = (tmp_path / 'aggregate' / 'aggregate.md').read_text()
    assert f'| RealSR | Student | DWT | {p["mean"]:.2f} ± {p["std"]:.2f} |' in md


def test_aggregate_refuses_mismatched_runs(tmp_path, capsys):
    runs = _three_runs(tmp_path)
    odd = ResultsRecorder(tmp_path / 'odd')
    odd.add('RealSR', 'a', {'psnr': 1.0, 'lpips': 0.1, 'musiq': 3.0})
    odd.write()
    script = _load_script('aggregate_runs')
    assert script.main(runs[:2] + [str(tmp_path / 'odd'), '--out', str(tmp_path / 'agg')]) == 2
    err = capsys.readouterr().err
    assert 'odd' in err and 'ImageNet-Test' in err and 'datasets' in err and 'Traceback' not in err

    fewer = ResultsRecorder(tmp_path / 'fewer')
    _fill(fewer)
    fewer._records['RealSR'] = {k: {'psnr': v['psnr']} for k, v in fewer._records['RealSR'].items()}
    fewer.write()
    with pytest.raises(ValueError, match=r"metrics of RealSR \['psnr'\] differ"):
        aggregate_summaries({r: load_summary(r) for r in runs[:1] + [str(tmp_path / 'fewer')]})
    with pytest.raises(ValueError, match='at least two runs'):
        aggregate_summaries({runs[0]: load_summary(runs[0])})
    assert script.main([str(tmp_path / 'missing'), runs[0], '--out', str(tmp_path / 'agg')]) == 2
    assert 'no summary file' in capsys.readouterr().err


def test_aggregate_refuses_runs_under_different_protocols(tmp_path, capsys):
    runs = []
    for seed, crop in ((0, 0), (1, 4)):
        rec = ResultsRecorder(tmp_path / f'seed{seed}', protocol={'metrics': {'psnr': {'crop_border': crop}}})
        _fill(rec, offset=0.1 * seed)
        rec.write()
        runs.append(str(tmp_path / f'seed{seed}'))
    md = (tmp_path / 'seed1' / 'summary.md').read_text()
    assert 'Protocol:' in md and 'crop_border=4' in md and 'file list' in md
    script = _load_script('aggregate_runs')
    assert script.main(runs) == 2
    err = capsys.readouterr().err
    assert 'different protocols' in err and 'protocol field metrics.psnr.crop_border is 4' in err


def test_the_protocol_names_the_metric_variants_and_versions():
    from dtkd_metric.report import metric_protocol

    protocol = metric_protocol({'psnr': {'type': 'calculate_psnr', 'crop_border': 0, 'test_y_channel': True},
                                'lpips': {'type': 'calculate_lpips', 'better': 'lower'}})
    assert protocol['metrics']['psnr'] == {'type': 'calculate_psnr', 'crop_border': 0, 'test_y_channel': True,
                                           'y_channel': 'BT.601 Y, not rounded (BasicSR to_y_channel)'}
    assert protocol['metrics']['lpips']['weights'] == ['LPIPS_v0.1_alex-df73285e.pth', 'alexnet-owt-7be5be79.pth']
    assert set(protocol['versions']) == {'torch', 'basicsr', 'pyiqa'} and protocol['versions']['basicsr'] == '1.4.2'
