"""The offline demo data set: split, bicubic LR, sub-image LMDBs readable by BasicSR, reuse on rerun."""
import copy
import os
import random

import numpy as np
import pytest
import skimage.data

# isort: off
import dtkd_data  # noqa: F401  (makes basicsr importable)
from basicsr.data.paired_image_dataset import PairedImageDataset
from basicsr.utils import FileClient, imfrombytes
from basicsr.utils.matlab_functions import imresize
from dtkd_data.demo_data import PRESETS, TEST_PHOTOS, TRAIN_PHOTOS, build_demo_dataset
# isort: on


def _silent(*args, **kwargs):
    pass


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp('demo')
    return build_demo_dataset(str(root / 'demo'), preset='tiny', log=_silent)


def read_lmdb(lmdb_path):
    """{key: uint8 RGB image} read through BasicSR's FileClient and meta_info.txt."""
    with open(os.path.join(lmdb_path, 'meta_info.txt')) as f:
        keys = [line.split('.')[0] for line in f if line.strip()]
    client = FileClient('lmdb', db_paths=[lmdb_path], client_keys=['x'])
    images = {}
    for key in keys:
        img = imfrombytes(client.get(key, 'x'), flag='color', float32=False)
        images[key] = img[:, :, ::-1]
    return images


def expected_gt(name, side=128):
    """The documented preparation, recomputed here: RGB photo, centre crop to ``side``, mod-crop 4."""
    if name.startswith('motorcycle'):
        left, right, _ = skimage.data.stereo_motorcycle()
        img = left if name.endswith('left') else right
    else:
        img = getattr(skimage.data, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=2)
    h, w = img.shape[:2]
    th, tw = min(h, side), min(w, side)
    img = img[(h - th) // 2:(h - th) // 2 + th, (w - tw) // 2:(w - tw) // 2 + tw, :3]
    return img[:th // 4 * 4, :tw // 4 * 4]


def matlab_bicubic_x4(gt):
    lr = imresize(gt.astype(np.float32) / 255., 0.25)
    return np.clip(np.round(lr * 255.), 0, 255).astype(np.uint8)


def test_split_has_no_overlap(tiny):
    assert set(TRAIN_PHOTOS).isdisjoint(TEST_PHOTOS)
    for preset in PRESETS.values():
        assert set(preset['train_photos']).isdisjoint(preset['test_photos'])
        assert set(preset['train_photos']) <= set(TRAIN_PHOTOS) and set(preset['test_photos']) <= set(TEST_PHOTOS)
    train_sources = {k.rsplit('_s', 1)[0] for k in read_lmdb(tiny['train_gt'])}
    test_sources = set(read_lmdb(tiny['test_gt']))
    assert train_sources == set(PRESETS['tiny']['train_photos'])
    assert test_sources == set(PRESETS['tiny']['test_photos'])
    # No training sub-image is a crop of a test image (pixel level, not just by name).
    for test_img in read_lmdb(tiny['test_gt']).values():
        for patch in read_lmdb(tiny['train_gt']).values():
            assert not np.array_equal(patch, test_img[:patch.shape[0], :patch.shape[1]])


def test_test_set_is_matlab_bicubic_of_the_photo(tiny):
    gts, lqs = read_lmdb(tiny['test_gt']), read_lmdb(tiny['test_lq'])
    for name in PRESETS['tiny']['test_photos']:
        gt = expected_gt(name)
        np.testing.assert_array_equal(gts[name], gt)
        np.testing.assert_array_equal(lqs[name], matlab_bicubic_x4(gt))
        # the PNG folders hold the same images
        folder_gt = imfrombytes(open(os.path.join(tiny['test_gt_folder'], f'{name}.png'), 'rb').read())
        np.testing.assert_array_equal(folder_gt[:, :, ::-1], gt)


def test_training_sub_images_follow_the_basicsr_grid(tiny):
    gts, lqs = read_lmdb(tiny['train_gt']), read_lmdb(tiny['train_lq'])
    assert set(gts) == set(lqs)
    for name in PRESETS['tiny']['train_photos']:
        gt = expected_gt(name)
        lq = matlab_bicubic_x4(gt)  # LR of the whole image, then cropped (not LR of each crop)
        index = 0
        for top in (0, 32, 64):  # 128 px, crop 64, step 32: the last crop is already flush
            for left in (0, 32, 64):
                index += 1
                key = f'{name}_s{index:03d}'
                np.testing.assert_array_equal(gts[key], gt[top:top + 64, left:left + 64])
                np.testing.assert_array_equal(lqs[key], lq[top // 4:top // 4 + 16, left // 4:left // 4 + 16])
        assert f'{name}_s{index + 1:03d}' not in gts


def test_basicsr_paired_dataset_reads_the_lmdbs(tiny):
    opt = {'name': 'demo', 'phase': 'train', 'scale': 4, 'io_backend': {'type': 'lmdb'}, 'gt_size': 32,
           'use_hflip': True, 'use_rot': True, 'dataroot_gt': tiny['train_gt'], 'dataroot_lq': tiny['train_lq']}
    ds = PairedImageDataset(copy.deepcopy(opt))
    assert len(ds) == 18
    random.seed(0)
    sample = ds[0]
    assert tuple(sample['gt'].shape) == (3, 32, 32) and tuple(sample['lq'].shape) == (3, 8, 8)
    val = PairedImageDataset({'name': 'demo_test', 'phase': 'val', 'scale': 4, 'io_backend': {'type': 'lmdb'},
                              'dataroot_gt': tiny['test_gt'], 'dataroot_lq': tiny['test_lq']})
    assert tuple(val[0]['gt'].shape) == (3, 128, 128) and tuple(val[0]['lq'].shape) == (3, 32, 32)


def test_rerun_reuses_and_rebuilds_when_invalid(tmp_path):
    messages = []
    root = str(tmp_path / 'demo')
    paths = build_demo_dataset(root, preset='tiny', log=messages.append)
    data_file = os.path.join(paths['train_gt'], 'data.mdb')
    stamp = os.stat(data_file).st_mtime_ns
    messages.clear()
    assert build_demo_dataset(root, preset='tiny', log=messages.append) == paths
    assert any('reusing' in m for m in messages) and os.stat(data_file).st_mtime_ns == stamp

    # A damaged file (size differs from the manifest) triggers a rebuild that restores it.
    lq_png = os.path.join(paths['test_lq_folder'], 'coffee.png')
    good = open(lq_png, 'rb').read()
    with open(lq_png, 'ab') as f:
        f.write(b'junk')
    messages.clear()
    build_demo_dataset(root, preset='tiny', log=messages.append)
    assert not any('reusing' in m for m in messages)
    assert open(lq_png, 'rb').read() == good

    # Different parameters rebuild too, and the manifest follows them.
    messages.clear()
    build_demo_dataset(root, preset='tiny', step=64, log=messages.append)
    assert not any('reusing' in m for m in messages)
    assert len(read_lmdb(paths['train_gt'])) == 2 * 4


def test_bad_arguments_raise(tmp_path):
    with pytest.raises(ValueError, match='overlap'):
        build_demo_dataset(str(tmp_path), preset='tiny', test_photos=('astronaut', ), log=None)
    with pytest.raises(ValueError, match='crop_size: 62 must be a positive multiple of scale 4'):
        build_demo_dataset(str(tmp_path), preset='tiny', crop_size=62, log=None)
    with pytest.raises(ValueError, match='preset'):
        build_demo_dataset(str(tmp_path), preset='huge', log=None)
