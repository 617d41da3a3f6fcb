"""Band-group discrepancy (paper Figs. 3-4) against PyWavelets, and both figure scripts on tiny folders."""
import importlib.util
import json
import os

import numpy as np
import pytest
import pywt
import skimage.data
from PIL import Image

from dtkd_metric.figures import compute_band_discrepancy, match_images, parse_box, plot_qualitative_grid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def _load_script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, 'scripts', f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _save(folder, name, rgb_uint8):
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(rgb_uint8).save(os.path.join(folder, name))


def _results(tmp_path, size=32):
    """Teacher outputs and two student checkpoints (different distortions) for three real photo crops."""
    rng = np.random.default_rng(0)
    crops = {'astro': skimage.data.astronaut()[100:100 + size, 200:200 + size],
             'cat': skimage.data.chelsea()[50:50 + size, 150:150 + size],
             'coffee': skimage.data.coffee()[100:100 + size, 200:200 + size]}
    for name, img in crops.items():
        _save(tmp_path / 'teacher', f'{name}.png', img)
        noisy = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
        _save(tmp_path / 'ckpt_a', f'{name}_runA.png', noisy)
        # A smoothed copy: the 2x2 block mean leaves LL nearly unchanged, removes level-1 details.
        smooth = img.astype(np.float64).reshape(size // 2, 2, size // 2, 2, 3).mean(axis=(1, 3))
        _save(tmp_path / 'ckpt_b', f'{name}.png', np.repeat(np.repeat(smooth, 2, 0), 2, 1).round().astype(np.uint8))
    return crops


def _read(path):
    return np.asarray(Image.open(path).convert('RGB'), dtype=np.float64) / 255.0


def _pywt_groups(student, teacher, level=2, wavelet='haar'):
    """Per-group mean |coefficient difference| over the three channels, by PyWavelets."""
    sums = {'LF': [], 'MF': [], 'HF': []}
    for c in range(3):
        cs = pywt.wavedec2(student[:, :, c], wavelet, mode='symmetric', level=level)
        ct = pywt.wavedec2(teacher[:, :, c], wavelet, mode='symmetric', level=level)
        sums['LF'].append(np.abs(cs[0] - ct[0]).ravel())
        for j in range(1, level + 1):  # cs[1] is the coarsest detail level (level J), cs[-1] level 1
            group = 'HF' if j == level else 'MF'
            sums[group].extend(np.abs(a - b).ravel() for a, b in zip(cs[j], ct[j]))
    return {g: float(np.concatenate(v).mean()) for g, v in sums.items()}


def test_band_discrepancy_matches_pywavelets(tmp_path):
    crops = _results(tmp_path)
    result = compute_band_discrepancy(tmp_path / 'teacher', {'A': tmp_path / 'ckpt_a', 'B': tmp_path / 'ckpt_b'},
                                      strip_suffixes=['_runA'])
    assert result['images'] == sorted(crops) and result['groups'] == ['LF', 'MF', 'HF']
    for label, folder, suffix in (('A', 'ckpt_a', '_runA'), ('B', 'ckpt_b', '')):
        refs = []
        for name in crops:
            student = _read(tmp_path / folder / f'{name}{suffix}.png')
            ref = _pywt_groups(student, _read(tmp_path / 'teacher' / f'{name}.png'))
            for g in ('LF', 'MF', 'HF'):
                assert result['per_image'][label][name][g] == pytest.approx(ref[g], rel=1e-4, abs=1e-6)
            refs.append(ref)
        for g in ('LF', 'MF', 'HF'):
            assert result['mean'][label][g] == pytest.approx(np.mean([r[g] for r in refs]), rel=1e-4)
    # The smoothed checkpoint differs mostly in the finest details, the noisy one everywhere.
    assert result['mean']['B']['HF'] > 5 * result['mean']['B']['LF']


def test_unmatched_and_mismatched_images_are_named(tmp_path):
    _results(tmp_path)
    with pytest.raises(ValueError) as info:
        match_images({'teacher': tmp_path / 'teacher', 'A': tmp_path / 'ckpt_a'})
    message = str(info.value)
    assert 'astro_runA' in message and 'astro' in message and 'A (' in message and 'teacher (' in message
    _save(tmp_path / 'small', 'astro.png', np.zeros((16, 16, 3), np.uint8))
    for name in ('cat', 'coffee'):
        _save(tmp_path / 'small', f'{name}.png', np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match='image "astro": S is 16x16 but the teacher is 32x32'):
        compute_band_discrepancy(tmp_path / 'teacher', {'S': tmp_path / 'small'})
    with pytest.raises(FileNotFoundError, match='result folder not found'):
        match_images({'teacher': tmp_path / 'nowhere'})


def _png_size(path):
    with open(path, 'rb') as f:
        assert f.read(8) == PNG_SIGNATURE
    with Image.open(path) as img:
        return img.size


def test_band_discrepancy_script_writes_figure_and_numbers(tmp_path, capsys):
    _results(tmp_path)
    script = _load_script('plot_band_discrepancy')
    out = tmp_path / 'fig' / 'band.png'
    rc = script.main(['--teacher', str(tmp_path / 'teacher'), '--student', f'noisy={tmp_path / "ckpt_a"}',
                      '--student', f'smooth={tmp_path / "ckpt_b"}', '--strip-suffix', '_runA', '--out', str(out)])
    assert rc == 0
    width, height = _png_size(out)
    assert width > 400 and height > 200
    numbers = json.loads((tmp_path / 'fig' / 'band.json').read_text())
    assert set(numbers['mean']) == {'noisy', 'smooth'} and len(numbers['images']) == 3
    assert script.main(['--teacher', str(tmp_path / 'teacher'), '--student', f'A={tmp_path / "ckpt_a"}',
                        '--out', str(tmp_path / 'x.png')]) == 2
    err = capsys.readouterr().err
    assert 'astro_runA' in err and 'Traceback' not in err


def _red_pixels(path):
    rgb = np.asarray(Image.open(path).convert('RGB')).astype(int)
    return int(np.sum((rgb[:, :, 0] > 200) & (rgb[:, :, 1] < 60) & (rgb[:, :, 2] < 60)))


def test_qualitative_grid_script(tmp_path):
    gray = (np.linspace(0, 1, 64)[None, :, None] * np.ones((48, 1, 3))).astype(np.float32)  # no red anywhere
    for folder, shift in (('student', 0.0), ('teacher', 0.1), ('gt', 0.2)):
        _save(tmp_path / folder, 'img1.png', (np.clip(gray + shift, 0, 1) * 255).astype(np.uint8))
    _save(tmp_path / 'lr', 'img1.png', (gray[::4, ::4] * 255).astype(np.uint8))
    script = _load_script('plot_qualitative_grid')
    out = tmp_path / 'grid.png'
    args = ['--image', 'img1', '--lr', str(tmp_path / 'lr'), '--panel', f'Student={tmp_path / "student"}',
            '--panel', f'Teacher={tmp_path / "teacher"}', '--gt', str(tmp_path / 'gt'), '--box', '8,8,16,12',
            '--out', str(out)]
    assert script.main(args) == 0
    width, height = _png_size(out)
    assert width > height > 100
    assert _red_pixels(out) > 50  # the red boxes are drawn
    assert script.main(args[:-4] + ['--box', '60,40,16,16', '--out', str(out)]) == 2  # box outside the image
    assert script.main(args[:2] + ['--panel', f'S={tmp_path / "student"}', '--box', '1,1,4,4', '--out',
                                   str(tmp_path / 'g2.png'), '--image', 'nope']) == 2


def test_qualitative_grid_checks_inputs(tmp_path):
    a = np.zeros((20, 30, 3), np.float32)
    with pytest.raises(ValueError, match='all panels must have the same size'):
        plot_qualitative_grid([('a', a), ('b', np.zeros((20, 20, 3), np.float32))], (0, 0, 5, 5), tmp_path / 'g.png')
    with pytest.raises(ValueError, match='x,y,width,height'):
        parse_box('1,2,3')
    assert parse_box('4,5,6,7') == (4, 5, 6, 7)


def test_dtkd_test_result_folders_match_without_strip_suffix(tmp_path):
    """dtkd-test writes results/<run>/visualization/<dataset>/<image>_<run>.png: the run names are removed
    by themselves, so two runs and a teacher folder match with no --strip-suffix."""
    crops = _results(tmp_path)
    folders = {}
    for run, source, suffix in (('teacher_run', 'teacher', ''), ('run_a', 'ckpt_a', '_runA'),
                                ('run_b', 'ckpt_b', '')):
        folder = tmp_path / 'results' / run / 'visualization' / 'RealSR'
        folder.mkdir(parents=True)
        for name in crops:
            os.replace(tmp_path / source / f'{name}{suffix}.png', folder / f'{name}_{run}.png')
        folders[run] = folder
    result = compute_band_discrepancy(folders.pop('teacher_run'), folders)
    assert result['images'] == sorted(crops)
