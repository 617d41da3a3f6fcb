"""Data preparation scripts on tiny synthetic data: sub-image grid, pairing checks, atomic output."""
import copy
import importlib.util
import os

import cv2
import numpy as np
import pytest

# isort: off
import dtkd_data  # noqa: F401  (makes basicsr importable)
from basicsr.data.paired_image_dataset import PairedImageDataset
from basicsr.utils import FileClient, imfrombytes
from dtkd_data import lmdb_tools
# isort: on

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, 'scripts', f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_lmdb(lmdb_path):
    """{key: uint8 BGR image} through BasicSR's FileClient; keys as BasicSR derives them from meta_info."""
    with open(os.path.join(lmdb_path, 'meta_info.txt')) as f:
        lines = [line.strip() for line in f if line.strip()]
    client = FileClient('lmdb', db_paths=[lmdb_path], client_keys=['x'])
    out = {}
    for line in lines:
        key = line.split('.')[0]
        img = imfrombytes(client.get(key, 'x'), float32=False)
        name, shape, level = line.split(' ')
        assert name == f'{key}.png' and shape == '({},{},{})'.format(*img.shape) and level == '1'
        out[key] = img
    return out


def basicsr_grid(length, crop, step, thresh=0):
    """Sub-image offsets as in BasicSR's extract_subimages.py, written out independently."""
    offsets = list(range(0, length - crop + 1, step))
    if length - (offsets[-1] + crop) > thresh:
        offsets.append(length - crop)
    return offsets


@pytest.fixture
def div2k(tmp_path):
    """Two HR images (44x56 needs a border-flush row of crops, 48x48 does not) and LR = HR[::4, ::4]."""
    rng = np.random.default_rng(0)
    hr_dir, lr_dir = tmp_path / 'HR', tmp_path / 'LR' / 'X4'
    hr_dir.mkdir()
    lr_dir.mkdir(parents=True)
    images = {}
    for stem, (h, w) in (('0001', (44, 56)), ('0002', (48, 48))):
        hr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        cv2.imwrite(str(hr_dir / f'{stem}.png'), hr)
        cv2.imwrite(str(lr_dir / f'{stem}x4.png'), hr[::4, ::4])
        images[stem] = hr
    return tmp_path, hr_dir, lr_dir, images


def div2k_argv(root, hr_dir, lr_dir, *extra):
    return ['--hr', str(hr_dir), '--lr', str(lr_dir), '--out-gt', str(root / 'gt.lmdb'),
            '--out-lq', str(root / 'lq.lmdb'), '--crop-size', '16', '--step', '8', *extra]


def test_prepare_div2k_sub_images(div2k):
    root, hr_dir, lr_dir, images = div2k
    script = load_script('prepare_div2k_lmdb')
    assert script.main(div2k_argv(root, hr_dir, lr_dir)) == 0
    gts, lqs = read_lmdb(str(root / 'gt.lmdb')), read_lmdb(str(root / 'lq.lmdb'))
    expected_keys = []
    for stem, hr in images.items():
        index = 0
        for top in basicsr_grid(hr.shape[0], 16, 8):
            for left in basicsr_grid(hr.shape[1], 16, 8):
                index += 1
                key = f'{stem}_s{index:03d}'
                expected_keys.append(key)
                np.testing.assert_array_equal(gts[key], hr[top:top + 16, left:left + 16])
                np.testing.assert_array_equal(lqs[key], hr[top:top + 16:4, left:left + 16:4])
    assert sorted(gts) == sorted(lqs) == sorted(expected_keys)
    assert len(expected_keys) == 5 * 6 + 5 * 5  # 44 -> 0,8,16,24 + flush 28; 56 -> 0..40; 48 -> 0..32
    # BasicSR's paired LMDB reader accepts the pair
    opt = {'name': 'div2k', 'phase': 'train', 'scale': 4, 'io_backend': {'type': 'lmdb'}, 'gt_size': 16,
           'use_hflip': False, 'use_rot': False, 'dataroot_gt': str(root / 'gt.lmdb'),
           'dataroot_lq': str(root / 'lq.lmdb')}
    assert len(PairedImageDataset(copy.deepcopy(opt))) == len(expected_keys)


def test_prepare_div2k_multiprocessing_matches(div2k):
    root, hr_dir, lr_dir, _ = div2k
    script = load_script('prepare_div2k_lmdb')
    script.main(div2k_argv(root, hr_dir, lr_dir))
    single = read_lmdb(str(root / 'gt.lmdb'))
    script.main(div2k_argv(root, hr_dir, lr_dir, '--n-thread', '2', '--overwrite'))
    multi = read_lmdb(str(root / 'gt.lmdb'))
    assert list(single) == list(multi) and all(np.array_equal(single[k], multi[k]) for k in single)


def test_prepare_div2k_errors(div2k):
    root, hr_dir, lr_dir, images = div2k
    script = load_script('prepare_div2k_lmdb')
    os.rename(lr_dir / '0002x4.png', lr_dir / '0002.png')
    with pytest.raises(SystemExit, match=r"1 of 2 GT images .* '\{\}x4'.*0002x4 \(for 0002\.png\)"):
        script.main(div2k_argv(root, hr_dir, lr_dir))
    cv2.imwrite(str(lr_dir / '0002x4.png'), images['0002'][::4, :44:4])
    with pytest.raises(SystemExit, match=r'not exactly 4x their LR image .*: 0002\.png 48x48 vs 0002x4\.png 12x11'):
        script.main(div2k_argv(root, hr_dir, lr_dir))
    with pytest.raises(SystemExit, match=r'--hr: folder .*missing does not exist'):
        script.main(div2k_argv(root, root / 'missing', lr_dir))
    with pytest.raises(SystemExit, match='--step 6 must be a positive multiple of --scale 4'):
        script.main(div2k_argv(root, hr_dir, lr_dir, '--step', '6'))
    assert not os.path.exists(root / 'gt.lmdb') and not os.path.exists(root / 'lq.lmdb')


def test_prepare_div2k_is_atomic_and_does_not_overwrite(div2k, monkeypatch):
    root, hr_dir, lr_dir, _ = div2k
    script = load_script('prepare_div2k_lmdb')
    real = lmdb_tools.crop_subimage_pair

    def crash_on_second(job):
        if job[0] == '0002':
            raise RuntimeError('simulated crash')
        return real(job)

    monkeypatch.setattr(lmdb_tools, 'crop_subimage_pair', crash_on_second)
    with pytest.raises(RuntimeError, match='simulated crash'):
        script.main(div2k_argv(root, hr_dir, lr_dir))
    assert not any(name.endswith('.lmdb') or 'partial' in name for name in os.listdir(root))
    monkeypatch.setattr(lmdb_tools, 'crop_subimage_pair', real)
    script.main(div2k_argv(root, hr_dir, lr_dir))
    with pytest.raises(SystemExit, match='already exists; pass --overwrite'):
        script.main(div2k_argv(root, hr_dir, lr_dir))


def test_make_paired_lmdb_realsr_layout(tmp_path):
    """GT and LQ in one folder (RealSR: *_HR.png / *_LR4.png); one GT 2 px too large needs --crop-gt."""
    rng = np.random.default_rng(1)
    folder = tmp_path / 'Test' / '4'
    folder.mkdir(parents=True)
    gts = {}
    for i, (h, w) in enumerate(((32, 40), (34, 26))):
        gt = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        lq = rng.integers(0, 256, (h // 4, w // 4, 3), dtype=np.uint8)
        cv2.imwrite(str(folder / f'Canon_{i:03d}_HR.png'), gt)
        cv2.imwrite(str(folder / f'Canon_{i:03d}_LR4.png'), lq)
        gts[f'Canon_{i:03d}'] = (gt, lq)
    script = load_script('make_paired_lmdb')
    argv = ['--gt', str(folder), '--lq', str(folder), '--gt-glob', '*_HR.png', '--gt-suffix', '_HR',
            '--filename-tmpl', '{}_LR4', '--out-gt', str(tmp_path / 'gt.lmdb'), '--out-lq', str(tmp_path / 'lq.lmdb')]
    with pytest.raises(SystemExit, match=r'1 GT images are not 4x their LQ image .*Canon_001_HR\.png 34x26 vs '
                                         r'Canon_001_LR4\.png 8x6'):
        script.main(argv)
    assert script.main(argv + ['--crop-gt']) == 0
    out_gt, out_lq = read_lmdb(str(tmp_path / 'gt.lmdb')), read_lmdb(str(tmp_path / 'lq.lmdb'))
    assert sorted(out_gt) == sorted(out_lq) == sorted(gts)
    for key, (gt, lq) in gts.items():
        np.testing.assert_array_equal(out_gt[key], gt[:lq.shape[0] * 4, :lq.shape[1] * 4])
        np.testing.assert_array_equal(out_lq[key], lq)
    val = PairedImageDataset({'name': 'realsr', 'phase': 'val', 'scale': 4, 'io_backend': {'type': 'lmdb'},
                              'dataroot_gt': str(tmp_path / 'gt.lmdb'), 'dataroot_lq': str(tmp_path / 'lq.lmdb')})
    assert len(val) == 2
    with pytest.raises(SystemExit, match='already exists'):
        script.main(argv + ['--crop-gt'])
    (folder / 'Canon_000_LR4.png').unlink()
    with pytest.raises(SystemExit, match=r'Canon_000_LR4 \(for Canon_000_HR\.png\)'):
        script.main(argv + ['--crop-gt', '--overwrite'])
    assert os.path.isdir(tmp_path / 'gt.lmdb')  # a failed check leaves the old output untouched


def test_build_demo_data_cli(tmp_path, capsys):
    script = load_script('build_demo_data')
    root = str(tmp_path / 'demo')
    assert script.main(['--preset', 'tiny', '--root', root]) == 0
    out = capsys.readouterr().out
    assert 'train  astronaut' in out and os.path.join(root, 'train', 'gt.lmdb') in out
    assert len(read_lmdb(os.path.join(root, 'train', 'gt.lmdb'))) == 18
    script.main(['--preset', 'tiny', '--root', root])
    assert 'reusing' in capsys.readouterr().out
    with pytest.raises(SystemExit, match='step: 30 must be a positive multiple of scale 4'):
        script.main(['--preset', 'tiny', '--root', root, '--step', '30'])


def test_prepare_div2k_crop_gt_uses_the_aligned_region(div2k):
    """HR not mod-cropped (45x58 for an 11x14 LR), or LR rounded up (12x14 for a 46x56 HR)."""
    root, hr_dir, lr_dir, images = div2k
    hr = images['0001']  # 44x56, LR = hr[::4, ::4] (11x14)
    padded = np.pad(hr, ((0, 1), (0, 2), (0, 0)), mode='reflect')
    cv2.imwrite(str(hr_dir / '0001.png'), padded)
    taller_lr = np.concatenate([hr[::4, ::4], hr[:1, ::4]], axis=0)  # 12x14
    cv2.imwrite(str(hr_dir / '0002.png'), np.pad(hr, ((0, 2), (0, 0), (0, 0)), mode='reflect'))
    cv2.imwrite(str(lr_dir / '0002x4.png'), taller_lr)
    script = load_script('prepare_div2k_lmdb')
    with pytest.raises(SystemExit, match=r'2 HR images are not exactly 4x .*--crop-gt.*0001\.png 45x58 vs 0001x4\.png'):
        script.main(div2k_argv(root, hr_dir, lr_dir))
    script.main(div2k_argv(root, hr_dir, lr_dir, '--crop-gt'))
    gts, lqs = read_lmdb(str(root / 'gt.lmdb')), read_lmdb(str(root / 'lq.lmdb'))
    for stem in ('0001', '0002'):
        index = 0
        for top in basicsr_grid(44, 16, 8):
            for left in basicsr_grid(56, 16, 8):
                index += 1
                key = f'{stem}_s{index:03d}'
                np.testing.assert_array_equal(gts[key], hr[top:top + 16, left:left + 16])
                np.testing.assert_array_equal(lqs[key], hr[top:top + 16:4, left:left + 16:4])
    assert len(gts) == 2 * 30


def test_prepare_div2k_refuses_images_smaller_than_the_crop_before_writing(div2k):
    """An HR image smaller than --crop-size gives no sub-image; once that wrote empty LMDBs and exited 0."""
    root, hr_dir, lr_dir, _ = div2k
    script = load_script('prepare_div2k_lmdb')
    argv = div2k_argv(root, hr_dir, lr_dir)
    with pytest.raises(SystemExit, match=r'1 of 2 HR images are smaller than --crop-size 48 .*: 0001\.png 44x56;'):
        script.main(argv[:-4] + ['--crop-size', '48', '--step', '8'])
    with pytest.raises(SystemExit, match=r'2 of 2 HR images are smaller than --crop-size 64 .*0001\.png 44x56, '
                                         r'0002\.png 48x48'):
        script.main(argv[:-4] + ['--crop-size', '64', '--step', '8'])
    assert not any(n.endswith('.lmdb') or 'partial' in n for n in os.listdir(root))  # nothing was written


def test_prepare_div2k_names_unreadable_images_before_writing(div2k):
    root, hr_dir, lr_dir, _ = div2k
    data = (hr_dir / '0002.png').read_bytes()
    (hr_dir / '0002.png').write_bytes(data[:len(data) // 2])
    (lr_dir / '0001x4.png').write_bytes(b'')
    script = load_script('prepare_div2k_lmdb')
    with pytest.raises(SystemExit, match=r'2 images cannot be used: .*0001x4\.png is empty \(0 bytes\), '
                                         r'.*0002\.png is truncated'):
        script.main(div2k_argv(root, hr_dir, lr_dir))
    assert not any(n.endswith('.lmdb') or 'partial' in n for n in os.listdir(root))


def test_make_paired_lmdb_keeps_16_bits_and_gray_and_refuses_transparency(tmp_path):
    """LMDB preparation stores what the file holds (dtkd_data.image_io.as_lmdb): 16-bit stays 16-bit,
    gray stays gray, an opaque alpha channel is dropped; a transparent image stops the run, nothing written."""
    rng = np.random.default_rng(2)
    gt_dir, lq_dir = tmp_path / 'gt', tmp_path / 'lq'
    gt_dir.mkdir()
    lq_dir.mkdir()
    deep = rng.integers(0, 65536, (16, 12, 3), dtype=np.uint16)
    gray = rng.integers(0, 256, (16, 12), dtype=np.uint8)
    opaque = np.dstack([rng.integers(0, 256, (16, 12, 3), dtype=np.uint8), np.full((16, 12), 255, np.uint8)])
    for stem, img in (('deep', deep), ('gray', gray), ('opaque', opaque)):
        cv2.imwrite(str(gt_dir / f'{stem}.png'), img)
        cv2.imwrite(str(lq_dir / f'{stem}.png'), img[::4, ::4])
    argv = ['--gt', str(gt_dir), '--lq', str(lq_dir), '--out-gt', str(tmp_path / 'gt.lmdb'), '--out-lq',
            str(tmp_path / 'lq.lmdb')]
    script = load_script('make_paired_lmdb')
    assert script.main(argv) == 0
    client = FileClient('lmdb', db_paths=[str(tmp_path / 'gt.lmdb')], client_keys=['x'])
    stored = {k: cv2.imdecode(np.frombuffer(client.get(k, 'x'), np.uint8), cv2.IMREAD_UNCHANGED)
              for k in ('deep', 'gray', 'opaque')}
    assert stored['deep'].dtype == np.uint16 and np.array_equal(stored['deep'], deep)
    assert np.array_equal(stored['gray'], gray) and np.array_equal(stored['opaque'], opaque[..., :3])
    assert lmdb_tools.read_meta_info(str(tmp_path / 'gt.lmdb')) == {'deep': (16, 12, 3), 'gray': (16, 12, 1),
                                                                     'opaque': (16, 12, 3)}
    see_through = opaque.copy()
    see_through[0, 0, 3] = 0
    cv2.imwrite(str(gt_dir / 'opaque.png'), see_through)
    with pytest.raises(SystemExit, match=r'gt/opaque\.png has transparent pixels \(1 of 192\).*nothing was written'):
        script.main(argv + ['--overwrite'])
    assert lmdb_tools.read_meta_info(str(tmp_path / 'gt.lmdb'))['opaque'] == (16, 12, 3)  # the old output stays
