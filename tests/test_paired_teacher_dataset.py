"""PairedTeacherDataset: teacher/GT alignment, teacher checks, LMDB vs folder, parity with BasicSR."""
import copy
import os
import random

import cv2
import numpy as np
import pytest
import torch

# isort: off
import dtkd_data  # noqa: F401  (registers the dataset, makes basicsr importable)
from basicsr.data.paired_image_dataset import PairedImageDataset
from basicsr.utils.lmdb_util import make_lmdb_from_imgs
from dtkd_data.paired_teacher_dataset import OptionError, PairedTeacherDataset, TeacherDataError
# isort: on

SCALE = 4
# (name, GT height, GT width): different shapes so that a transposed or misplaced window shows.
IMAGES = [('img_a', 48, 40), ('img_b', 40, 56), ('img_c', 44, 44)]


def coded_gt(h, w, image_id):
    """uint8 BGR image whose pixels reveal their position: channel 2 (R) = 4*row, 1 (G) = 4*col."""
    rows, cols = np.mgrid[0:h, 0:w]
    img = np.stack([np.full((h, w), 20 + 60 * image_id), 4 * cols + 1, 4 * rows + 2], axis=2)
    return img.astype(np.uint8)


def coded_lq(h, w, image_id):
    """LQ whose pixels also reveal their position (different code from the GT's)."""
    rows, cols = np.mgrid[0:h, 0:w]
    img = np.stack([np.full((h, w), 30 + 50 * image_id), 7 * cols + 3, 7 * rows + 5], axis=2)
    return img.astype(np.uint8)


def write_folder_set(root, images=IMAGES, teacher=True, gt_pad=0):
    """GT / LQ / teacher (= 255 - GT) folders; ``gt_pad`` adds pixels beyond scale x LQ to the GT."""
    for sub in ('gt', 'lq', 'teacher'):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    for i, (name, h, w) in enumerate(images):
        gt = coded_gt(h + gt_pad, w + gt_pad, i)
        cv2.imwrite(os.path.join(root, 'gt', f'{name}.png'), gt)
        cv2.imwrite(os.path.join(root, 'lq', f'{name}.png'), coded_lq(h // SCALE, w // SCALE, i))
        if teacher:
            cv2.imwrite(os.path.join(root, 'teacher', f'{name}.png'), 255 - gt)
    return {k: os.path.join(root, k) for k in ('gt', 'lq', 'teacher')}


def folder_to_lmdb(folder, lmdb_path):
    """Pack a folder with BasicSR's own LMDB writer (so the dataset is tested on BasicSR-made LMDBs)."""
    names = sorted(os.listdir(folder))
    make_lmdb_from_imgs(folder, lmdb_path, names, [os.path.splitext(n)[0] for n in names], map_size=1 << 24)
    return lmdb_path


def options(paths, backend='disk', phase='train', teacher=True, **extra):
    opt = {'name': 'tiny', 'phase': phase, 'scale': SCALE, 'io_backend': {'type': backend},
           'dataroot_gt': paths['gt'], 'dataroot_lq': paths['lq']}
    if phase == 'train':
        opt.update(gt_size=16, use_hflip=True, use_rot=True)
    if teacher:
        opt['dataroot_teacher'] = paths['teacher']
    opt.update(extra)
    return opt


@pytest.fixture(scope='module')
def data_sets(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('teacher_data'))
    folders = write_folder_set(os.path.join(root, 'folders'))
    lmdbs = {k: folder_to_lmdb(v, os.path.join(root, f'{k}.lmdb')) for k, v in folders.items()}
    return folders, lmdbs


def _to_uint8(t):
    """CHW RGB float tensor in [0, 1] -> HWC BGR uint8 array (the file's pixel values)."""
    return np.round(t.numpy().transpose(1, 2, 0)[:, :, ::-1] * 255).astype(np.int64)


def _transform(img, hflip, vflip, rot90):
    """The transform BasicSR's augment applies (in its order)."""
    if hflip:
        img = img[:, ::-1]
    if vflip:
        img = img[::-1, :]
    if rot90:
        img = img.transpose(1, 0, 2)
    return img


def _locate(gt_patch, gt_full, size):
    """Find (top, left, hflip, vflip, rot90) such that the patch is that window of gt_full, transformed."""
    matches = []
    for hflip in (False, True):
        for vflip in (False, True):
            for rot90 in (False, True):
                untransformed = gt_patch
                # invert: transpose, then vflip, then hflip
                if rot90:
                    untransformed = untransformed.transpose(1, 0, 2)
                if vflip:
                    untransformed = untransformed[::-1, :]
                if hflip:
                    untransformed = untransformed[:, ::-1]
                top, left = (untransformed[0, 0, 2] - 2) // 4, (untransformed[0, 0, 1] - 1) // 4
                window = gt_full[top:top + size, left:left + size].astype(np.int64)
                if window.shape[:2] == (size, size) and np.array_equal(window, untransformed):
                    matches.append((int(top), int(left), hflip, vflip, rot90))
    assert len(matches) == 1, f'GT patch is not a unique transformed window of its image: {matches}'
    return matches[0]


@pytest.mark.parametrize('backend', ['disk', 'lmdb'])
def test_teacher_patch_is_the_gt_window_after_crop_flip_rot(data_sets, backend):
    folders, lmdbs = data_sets
    ds = PairedTeacherDataset(options(lmdbs if backend == 'lmdb' else folders, backend))
    gt_full = {name: coded_gt(h, w, i) for i, (name, h, w) in enumerate(IMAGES)}
    lq_full = {name: coded_lq(h // SCALE, w // SCALE, i) for i, (name, h, w) in enumerate(IMAGES)}
    seen = set()
    random.seed(1)
    for draw in range(120):
        sample = ds[draw % len(ds)]
        name = os.path.splitext(os.path.basename(sample['gt_path']))[0]
        gt, teacher, lq = _to_uint8(sample['gt']), _to_uint8(sample['teacher']), _to_uint8(sample['lq'])
        assert gt.shape == teacher.shape == (16, 16, 3) and lq.shape == (4, 4, 3)
        # teacher = 255 - GT pixel by pixel; GT pixels are unique, so any other window/transform fails.
        np.testing.assert_array_equal(teacher, 255 - gt)
        top, left, hflip, vflip, rot90 = _locate(gt, gt_full[name], 16)
        assert top % SCALE == 0 and left % SCALE == 0
        t, lf = top // SCALE, left // SCALE
        expected_lq = _transform(lq_full[name][t:t + 4, lf:lf + 4], hflip, vflip, rot90)
        np.testing.assert_array_equal(lq, expected_lq)
        assert sample['teacher_path'] in (os.path.join(folders['teacher'], f'{name}.png'), name)
        seen.add((hflip, vflip, rot90))
    assert len(seen) == 8  # every flip/rotation combination was exercised


def test_lmdb_and_folder_give_identical_samples(data_sets):
    folders, lmdbs = data_sets
    ds_disk = PairedTeacherDataset(options(folders, 'disk'))
    ds_lmdb = PairedTeacherDataset(options(lmdbs, 'lmdb'))
    lmdb_index = {p['gt_path']: i for i, p in enumerate(ds_lmdb.paths)}
    assert len(ds_disk) == len(ds_lmdb) == len(IMAGES)
    for seed in range(12):
        i = seed % len(ds_disk)
        key = os.path.splitext(os.path.basename(ds_disk.paths[i]['gt_path']))[0]
        random.seed(seed)
        a = ds_disk[i]
        random.seed(seed)
        b = ds_lmdb[lmdb_index[key]]
        for k in ('lq', 'gt', 'teacher'):
            assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize('extra', [{}, {'color': 'y'}, {'mean': [0.4, 0.5, 0.6], 'std': [0.2, 0.3, 0.25]}])
@pytest.mark.parametrize('phase', ['train', 'val'])
def test_without_teacher_matches_basicsr_paired_image_dataset(tmp_path, phase, extra):
    # GT 3 px larger than scale x LQ in validation: both must crop it the same way.
    paths = write_folder_set(str(tmp_path), teacher=False, gt_pad=0 if phase == 'train' else 3)
    if phase == 'val':
        # Unequal GT padding would break training crops, so the padded set is only used for val.
        assert cv2.imread(os.path.join(paths['gt'], 'img_a.png')).shape[:2] == (51, 43)
    opt = options(paths, 'disk', phase, teacher=False, **extra)
    ours = PairedTeacherDataset(copy.deepcopy(opt))
    reference = PairedImageDataset(copy.deepcopy(opt))
    assert [p['gt_path'] for p in ours.paths] == [p['gt_path'] for p in reference.paths]
    for seed in range(2 * len(IMAGES)):
        i = seed % len(IMAGES)
        random.seed(seed)
        a = ours[i]
        random.seed(seed)
        b = reference[i]
        assert set(a) == set(b)
        for k in ('lq', 'gt'):
            assert a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k
        assert a['gt_path'] == b['gt_path'] and a['lq_path'] == b['lq_path']


def test_validation_crops_teacher_like_gt(tmp_path):
    paths = write_folder_set(str(tmp_path), gt_pad=2)
    ds = PairedTeacherDataset(options(paths, 'disk', 'val'))
    for sample in (ds[i] for i in range(len(ds))):
        h, w = sample['lq'].shape[1] * SCALE, sample['lq'].shape[2] * SCALE
        assert sample['gt'].shape[1:] == sample['teacher'].shape[1:] == (h, w)
        np.testing.assert_array_equal(_to_uint8(sample['teacher']), 255 - _to_uint8(sample['gt']))


def _many_images(n):
    return [(f'k{i:02d}', 8, 8) for i in range(n)]


def test_missing_teacher_error_names_keys(tmp_path):
    images = _many_images(14)
    paths = write_folder_set(str(tmp_path), images=images)
    for name, _, _ in images[:12]:
        os.remove(os.path.join(paths['teacher'], f'{name}.png'))
    with pytest.raises(TeacherDataError) as info:
        PairedTeacherDataset(options(paths, 'disk', gt_size=8))
    msg = str(info.value)
    assert 'datasets.train.dataroot_teacher' in msg and '12 GT image(s) have no teacher image' in msg
    for name, _, _ in images[:10]:
        assert name in msg
    assert 'k10' not in msg and 'k11' not in msg and '(2 more)' in msg
    assert 'k12' not in msg and 'k13' not in msg


def test_teacher_size_mismatch_error_names_keys(tmp_path):
    images = _many_images(3)
    paths = write_folder_set(str(tmp_path), images=images)
    cv2.imwrite(os.path.join(paths['teacher'], 'k01.png'), np.zeros((8, 12, 3), np.uint8))
    with pytest.raises(TeacherDataError, match=r'1 teacher image\(s\) differ in size from the GT: k01 '
                                               r'\(teacher 8x12, GT 8x8\)'):
        PairedTeacherDataset(options(paths, 'disk', gt_size=8))


def test_lmdb_teacher_checked_from_meta_info(tmp_path):
    images = _many_images(4)
    paths = write_folder_set(str(tmp_path / 'f'), images=images)
    os.remove(os.path.join(paths['teacher'], 'k02.png'))
    cv2.imwrite(os.path.join(paths['teacher'], 'k03.png'), np.zeros((16, 8, 3), np.uint8))
    lmdbs = {k: folder_to_lmdb(v, str(tmp_path / f'{k}.lmdb')) for k, v in paths.items()}
    with pytest.raises(TeacherDataError) as info:
        PairedTeacherDataset(options(lmdbs, 'lmdb', gt_size=8))
    msg = str(info.value)
    assert '1 GT image(s) have no teacher image: k02' in msg
    assert 'k03 (teacher 16x8, GT 8x8)' in msg


def test_option_errors_name_the_key(tmp_path, data_sets):
    folders, lmdbs = data_sets
    with pytest.raises(OptionError, match=r'datasets\.train\.io_backend\.type'):
        PairedTeacherDataset(options(folders, 'memcache'))
    with pytest.raises(OptionError, match=r'datasets\.train\.gt_size: 18 is not divisible by scale 4'):
        PairedTeacherDataset(options(folders, gt_size=18))
    with pytest.raises(FileNotFoundError, match=r'datasets\.train\.dataroot_gt: folder .*nowhere does not exist'):
        PairedTeacherDataset(options(dict(folders, gt=str(tmp_path / 'nowhere'))))
    with pytest.raises(OptionError, match=r'datasets\.val\.dataroot_lq: .* must end with "\.lmdb"'):
        PairedTeacherDataset(options(dict(lmdbs, lq=folders['lq']), 'lmdb', 'val'))
    with pytest.raises(OptionError, match=r'datasets\.train\.dataroot_gt is required'):
        opt = options(folders)
        del opt['dataroot_gt']
        PairedTeacherDataset(opt)
    with pytest.raises(OptionError, match=r'datasets\.train\.dataroot_gt: 3 GT image\(s\) .*'
                                                 r'smaller than datasets\.train\.gt_size=48'):
        PairedTeacherDataset(options(lmdbs, 'lmdb', gt_size=48))
    os.makedirs(tmp_path / 'lq_partial')
    cv2.imwrite(str(tmp_path / 'lq_partial' / 'img_a.png'), coded_lq(12, 10, 0))
    with pytest.raises(FileNotFoundError, match=r'datasets\.train\.dataroot_lq: 2 LQ image\(s\) .*img_b\.png'):
        PairedTeacherDataset(options(dict(folders, lq=str(tmp_path / 'lq_partial'))))


def test_meta_info_file_selects_images(tmp_path, data_sets):
    folders, _ = data_sets
    meta = tmp_path / 'meta_info.txt'
    meta.write_text('img_c.png (44,44,3)\nimg_a.png (48,40,3)\n')
    ds = PairedTeacherDataset(options(folders, meta_info_file=str(meta)))
    assert [os.path.basename(p['gt_path']) for p in ds.paths] == ['img_c.png', 'img_a.png']
    assert [os.path.basename(p['teacher_path']) for p in ds.paths] == ['img_c.png', 'img_a.png']
    random.seed(3)
    sample = ds[1]
    np.testing.assert_array_equal(_to_uint8(sample['teacher']), 255 - _to_uint8(sample['gt']))
    meta.write_text('img_c.png (44,44,3)\nimg_z.png (48,40,3)\n')
    with pytest.raises(FileNotFoundError, match=r'datasets\.train\.meta_info_file: 1 GT file\(s\) .*img_z\.png'):
        PairedTeacherDataset(options(folders, meta_info_file=str(meta)))
