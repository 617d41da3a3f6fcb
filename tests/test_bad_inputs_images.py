"""Bad training and test images: each one is handled correctly or refused with an error naming the file,
found up front by the data-set scan (scripts/check_dataset.py and the start of dtkd-train/dtkd-test),
never an opaque crash inside a data-loader worker.

Every kind is produced on the fly from real photographs: truncated PNG and JPEG, zero-byte file,
CMYK JPEG (written by PIL), RGBA with transparency, opaque RGBA, 16-bit PNG, grayscale, images
smaller than the crop, LQ/GT and teacher/GT size mismatches.
"""
import importlib.util
import os

import cv2
import forking
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, TINY_STUDENT, bicubic_down, photo, train_options, write_rgb, write_yaml
from dtkd_data.image_checks import BadImageError, check_datasets, probe_bytes, scan_dataset
from dtkd_data.paired_teacher_dataset import PairedTeacherDataset

# name -> what the scan must say (None: usable)
EXPECTED = {
    'trunc_png': ('lq', 'is truncated'),
    'trunc_jpg': ('gt', 'is truncated'),
    'empty': ('gt', 'is empty (0 bytes)'),
    'cmyk': ('gt', 'is a CMYK JPEG'),
    'transparent': ('gt', 'has transparent pixels'),
    'gray_lq': ('pair', 'LQ is gray but GT is colour'),
    'small': ('pair', 'is smaller than the training crop gt_size=32'),
    'lq_mismatch': ('pair', 'GT is not 4x the LQ: GT 64x64'),
    'teacher_mismatch': ('pair', 'teacher 60x64'),
    'opaque_rgba': None,
    'b16': None,
    'gray': None,
    'good': None,
}


def _write(folder, name, rgb, ext='.png'):
    path = os.path.join(folder, name + ext)
    if ext == '.png':
        write_rgb(path, rgb)
    else:
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(rgb).save(path, quality=95)
    return path


def _cut(path, fraction=0.6):
    data = open(path, 'rb').read()
    open(path, 'wb').write(data[:int(len(data) * fraction)])


@pytest.fixture(scope='module')
def bad_set(tmp_path_factory):
    """GT/LQ/teacher folders with one entry per kind in EXPECTED (teacher = GT where not the subject)."""
    root = tmp_path_factory.mktemp('bad_set')
    gt_dir, lq_dir, t_dir = (str(root / d) for d in ('gt', 'lq', 'teacher'))
    src = photo('astronaut')
    crops = {name: src[40 * i:40 * i + 64, 150:214] for i, name in enumerate(EXPECTED)}
    for name, gt in crops.items():
        ext = '.jpg' if name in ('trunc_jpg', 'cmyk') else '.png'
        _write(gt_dir, name, gt, ext)
        _write(lq_dir, name, bicubic_down(gt, 4), ext)
        _write(t_dir, name, gt)
    _cut(os.path.join(lq_dir, 'trunc_png.png'))
    _cut(os.path.join(gt_dir, 'trunc_jpg.jpg'))
    open(os.path.join(gt_dir, 'empty.png'), 'wb').close()
    Image.fromarray(crops['cmyk']).convert('CMYK').save(os.path.join(gt_dir, 'cmyk.jpg'))
    rgba = np.dstack([crops['transparent'], np.full((64, 64), 255, np.uint8)])
    rgba[:4, :4, 3] = 0
    Image.fromarray(rgba).save(os.path.join(gt_dir, 'transparent.png'))
    Image.fromarray(np.dstack([crops['opaque_rgba'], np.full((64, 64), 255, np.uint8)])).save(
        os.path.join(gt_dir, 'opaque_rgba.png'))
    gt16 = crops['b16'][..., ::-1].astype(np.uint16) * 257 + np.arange(64, dtype=np.uint16)[:, None, None]
    cv2.imwrite(os.path.join(gt_dir, 'b16.png'), gt16)
    for name, targets in (('gray_lq', (lq_dir,)), ('gray', (gt_dir, lq_dir, t_dir))):
        for folder in targets:
            img = cv2.imread(os.path.join(folder, f'{name}.png'))
            cv2.imwrite(os.path.join(folder, f'{name}.png'), cv2.cvtColor(img, cv2.COLOR_BGR2GRAY))
    small = src[0:24, 300:324]
    for folder, img in ((gt_dir, small), (lq_dir, bicubic_down(small, 4)), (t_dir, small)):
        _write(folder, 'small', img)
    _write(lq_dir, 'lq_mismatch', bicubic_down(src[0:60, 300:360], 4))
    _write(t_dir, 'teacher_mismatch', src[0:60, 300:364])
    return root


def dataset_opt(root, phase='train', **extra):
    opt = {'name': 'bad', 'type': 'PairedTeacherDataset', 'phase': phase, 'scale': 4, 'gt_size': 32,
           'dataroot_gt': str(root / 'gt'), 'dataroot_lq': str(root / 'lq'), 'dataroot_teacher': str(root / 'teacher'),
           'io_backend': {'type': 'disk'}, 'use_hflip': False, 'use_rot': False}
    opt.update(extra)
    return opt


def test_truncated_jpeg_is_decoded_silently_by_opencv(bad_set):
    # the reason the scan exists: OpenCV (BasicSR's reader) fills a cut JPEG with grey and goes on
    assert cv2.imread(str(bad_set / 'gt' / 'trunc_jpg.jpg')) is not None


def test_scan_reports_every_bad_entry_at_once(bad_set):
    count, problems = scan_dataset(dataset_opt(bad_set), 'datasets.train', 'quick')
    assert count == 3 * len(EXPECTED)
    text = '\n'.join(problems)
    for name, expected in EXPECTED.items():
        mentions = [p for p in problems if f'/{name}.' in p or p.startswith(f'{name}:')]
        if expected is None:
            assert not mentions, mentions
            continue
        kind, reason = expected
        assert mentions and any(reason in p for p in mentions), f'{name}: {reason!r} not in\n{text}'
        if kind != 'pair':
            assert any(os.path.join(str(bad_set / kind), name) in p for p in mentions), mentions
    assert len(problems) == sum(e is not None for e in EXPECTED.values())


def test_check_dataset_script_lists_problems_and_exits_1(bad_set, tmp_path):
    spec = importlib.util.spec_from_file_location('_check_dataset', os.path.join(REPO, 'scripts', 'check_dataset.py'))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    args = ['--gt', str(bad_set / 'gt'), '--lq', str(bad_set / 'lq'), '--teacher', str(bad_set / 'teacher'),
            '--gt-size', '32']
    code, out = forking.run(lambda: script.main(args), str(tmp_path / 'log'))
    assert code == 1, out
    lines = [line for line in out.splitlines() if line.startswith('--gt/--lq: ')]
    assert len(lines) == 9 and 'check_dataset (quick): 39 images in 1 data set(s), 9 problem(s)' in out
    # a clean set: exit 0
    good = tmp_path / 'good'
    for d in ('gt', 'lq'):
        (good / d).mkdir(parents=True)
        os.link(bad_set / d / 'good.png', good / d / 'good.png')
    code, out = forking.run(lambda: script.main(['--gt', str(good / 'gt'), '--lq', str(good / 'lq'), '--full']),
                            str(tmp_path / 'log'))
    assert code == 0 and '1 data set(s), all usable' in out, out


def test_full_mode_finds_damage_inside_a_file(tmp_path):
    gt = photo('coffee')[:64, :64]
    path = _write(str(tmp_path), 'x', gt)
    data = bytearray(open(path, 'rb').read())
    data[200:240] = bytes(40)  # damage inside the compressed data; header and IEND intact
    assert probe_bytes(bytes(data)).h == 64  # the quick check reads only the header and the end
    with pytest.raises(BadImageError, match='is corrupt|is truncated'):
        probe_bytes(bytes(data), full=True)


def test_training_refuses_a_bad_set_before_starting(bad_set, tiny_pairs, tmp_path):
    from basicsr import train as _basicsr_train  # noqa: F401

    from dtkd import train

    opt = train_options(tiny_pairs, 'bad_data')
    opt['datasets']['train'].update(dataroot_gt=str(bad_set / 'gt'), dataroot_lq=str(bad_set / 'lq'),
                                    dataroot_teacher=str(bad_set / 'teacher'))
    yml = write_yaml(tmp_path / 'train.yml', opt)
    code, out = forking.run_entry_point(train, ['dtkd-train', '-opt', yml], str(tmp_path / 'log'), str(tmp_path))
    errors = [line for line in out.splitlines() if line.startswith('error:')]
    assert code == 2 and len(errors) == 1 and 'Traceback' not in out, out[-3000:]
    assert 'dataset_check (quick): 9 problem(s) found before starting' in errors[0]
    assert str(bad_set / 'lq' / 'trunc_png.png') in errors[0] and str(bad_set / 'gt' / 'cmyk.jpg') in errors[0]
    assert not (tmp_path / 'experiments').exists()


def test_reader_handles_16_bit_gray_and_opaque_alpha(bad_set):
    opt = dataset_opt(bad_set, phase='val')
    del opt['dataroot_teacher']
    ds = PairedTeacherDataset(opt)
    items = {os.path.splitext(os.path.basename(p['gt_path']))[0]: i for i, p in enumerate(ds.paths)}
    # 16-bit: full precision (BasicSR's reader would keep only the high byte)
    item = ds[items['b16']]
    gt16 = cv2.imread(str(bad_set / 'gt' / 'b16.png'), cv2.IMREAD_UNCHANGED)
    expected = torch.from_numpy(gt16[..., ::-1].astype(np.float32) / 65535).permute(2, 0, 1)
    assert torch.equal(item['gt'], expected)
    assert not torch.equal(item['gt'], torch.round(item['gt'] * 255) / 255)
    # grayscale: three equal channels, as BasicSR
    item = ds[items['gray']]
    assert item['gt'].shape == (3, 64, 64) and torch.equal(item['gt'][0], item['gt'][2])
    # opaque alpha is dropped: the same pixels as the RGB file
    item = ds[items['opaque_rgba']]
    rgb = cv2.imread(str(bad_set / 'teacher' / 'opaque_rgba.png'))[..., ::-1].astype(np.float32) / 255
    assert torch.equal(item['gt'], torch.from_numpy(rgb.copy()).permute(2, 0, 1))


@pytest.mark.parametrize('name, match', [
    ('trunc_png', r'LQ image .*trunc_png\.png is truncated'),
    ('trunc_jpg', r'GT image .*trunc_jpg\.jpg is truncated'),
    ('empty', r'GT image .*empty\.png is empty'),
    ('cmyk', r'GT image .*cmyk\.jpg is a CMYK JPEG'),
    ('transparent', r'GT image .*transparent\.png has transparent pixels'),
    ('small', r'GT .*small\.png \(24x24\) is smaller than the training crop datasets.train.gt_size=32'),
    ('lq_mismatch', r'GT .*lq_mismatch\.png \(64x64\) is not 4x its LQ .*lq_mismatch\.png \(15x15\)'),
])
def test_reader_errors_name_the_file_even_without_the_scan(bad_set, name, match):
    opt = dataset_opt(bad_set)
    del opt['dataroot_teacher']  # the teacher mismatch is refused at construction (test below)
    ds = PairedTeacherDataset(opt)
    index = [os.path.basename(p['gt_path']).split('.')[0] for p in ds.paths].index(name)
    with pytest.raises(BadImageError, match=match):
        ds[index]


def test_errors_in_a_data_loader_worker_name_the_file(bad_set):
    opt = dataset_opt(bad_set)
    del opt['dataroot_teacher']
    ds = PairedTeacherDataset(opt)
    index = [os.path.basename(p['gt_path']).split('.')[0] for p in ds.paths].index('trunc_jpg')
    batches = iter(torch.utils.data.DataLoader(torch.utils.data.Subset(ds, [index]), num_workers=1))
    try:
        with pytest.raises(BadImageError, match=r'trunc_jpg\.jpg is truncated'):
            next(batches)
    finally:
        batches._shutdown_workers()


def test_teacher_size_mismatch_refused_at_construction(bad_set):
    from dtkd_data.paired_teacher_dataset import TeacherDataError

    with pytest.raises(TeacherDataError) as info:
        PairedTeacherDataset(dataset_opt(bad_set))
    message = str(info.value)  # every problem at once, each file named
    assert 'teacher_mismatch (teacher 60x64, GT 64x64)' in message
    # sizes come from the shared header reader, which also finds truncated files
    assert '2 image(s) cannot be read' in message and 'empty.png is empty' in message
    assert 'trunc_jpg.jpg is truncated' in message


def test_validation_images_smaller_than_the_window_work(tmp_path):
    """A 3x5 LQ image (window 8): padded and cropped back, scored like any other."""
    from basicsr.models import build_model

    import dtkd_model  # noqa: F401

    gt = photo('chelsea')[100:112, 150:170]  # 12x20 -> LQ 3x5
    write_rgb(str(tmp_path / 'gt' / 'tiny.png'), gt)
    write_rgb(str(tmp_path / 'lq' / 'tiny.png'), bicubic_down(gt, 4))
    dopt = {'name': 'tiny', 'type': 'PairedTeacherDataset', 'phase': 'val', 'scale': 4,
            'dataroot_gt': str(tmp_path / 'gt'), 'dataroot_lq': str(tmp_path / 'lq'), 'io_backend': {'type': 'disk'}}
    opt = {'name': 'tiny', 'model_type': 'DTKDModel', 'scale': 4, 'num_gpu': 0, 'is_train': False, 'dist': False,
           'rank': 0, 'world_size': 1, 'datasets': {'test_1': dopt}, 'network_g': dict(TINY_STUDENT),
           'path': {'pretrain_network_g': None}, 'val': {'save_img': False}}
    assert check_datasets(opt) == {'test_1': 2}  # images: GT and LQ
    model = build_model(opt)
    model.feed_data({k: v[None] if torch.is_tensor(v) else v for k, v in PairedTeacherDataset(dopt)[0].items()})
    model.test()
    assert model.output.shape == (1, 3, 12, 20) and torch.isfinite(model.output).all()


def test_lmdb_entries_are_checked_like_files(tmp_path):
    """LMDB values are decoded from their bytes; a cut value and a meta_info.txt that lies are named by key."""
    import lmdb

    from dtkd_data.lmdb_tools import write_image_lmdb

    gts = {f'k{i}': photo('coffee')[40 * i:40 * i + 64, 100:164][..., ::-1].copy() for i in range(3)}
    write_image_lmdb(str(tmp_path / 'gt.lmdb'), sorted(gts.items()))
    write_image_lmdb(str(tmp_path / 'lq.lmdb'), sorted((k, bicubic_down(v, 4)) for k, v in gts.items()))
    env = lmdb.open(str(tmp_path / 'lq.lmdb'), map_size=1 << 24)
    with env.begin(write=True) as txn:
        value = txn.get(b'k1')
        txn.put(b'k1', value[:len(value) // 2])
    env.close()
    meta = tmp_path / 'gt.lmdb' / 'meta_info.txt'
    meta.write_text(meta.read_text().replace('k2.png (64,64,3)', 'k2.png (64,60,3)'))
    opt = {'dataroot_gt': str(tmp_path / 'gt.lmdb'), 'dataroot_lq': str(tmp_path / 'lq.lmdb'), 'scale': 4,
           'phase': 'test', 'io_backend': {'type': 'lmdb'}}
    count, problems = scan_dataset(opt, 'datasets.test_1')
    assert count == 6 and len(problems) == 2, problems
    assert problems[0].startswith(f"{tmp_path / 'lq.lmdb'} key k1: is truncated")
    assert problems[1] == f"{tmp_path / 'gt.lmdb'} key k2: meta_info.txt says 64x60, the image is 64x64"
