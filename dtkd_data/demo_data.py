"""A small, real-photograph x4 SR data set built offline from the images scikit-image ships.

scikit-image installs a handful of real photographs inside its wheel (``skimage.data``; sources and
licences are listed in its documentation), so this data set needs no download. The split is fixed:

* training photos: astronaut, rocket, motorcycle_left, motorcycle_right (one stereo pair, kept on
  the same side), hubble_deep_field, immunohistochemistry, brick, grass, coins;
* held-out test photos: coffee, chelsea, camera, gravel.

Grayscale photographs are replicated to three channels. Each photo is (optionally) centre-cropped
to at most ``max_side`` pixels per side, then mod-cropped to a multiple of ``scale`` (GT). The LR is
MATLAB-style bicubic downscaling, as in the DIV2K/BasicSR benchmarks::

    LR = uint8(round(clip(basicsr.utils.matlab_functions.imresize(GT / 255, 1 / scale) * 255, 0, 255)))

computed on the whole image. Training images are then cut into BasicSR sub-images (GT
``crop_size`` x ``crop_size`` every ``step`` pixels, the matching LR windows ``crop_size / scale`` every
``step / scale``; keys ``<photo>_s001``...) and packed into LMDBs; test images are stored whole, as
LMDBs (keys ``<photo>``) and as PNG folders.

Layout under ``root``::

    train/gt.lmdb  train/lq.lmdb  test/gt.lmdb  test/lq.lmdb  test/gt/*.png  test/lq/*.png  manifest.json

``manifest.json`` records the build parameters and the size of every file written; a rerun with the
same parameters reuses the data when every file is still there with its recorded size, and
rebuilds it otherwise.
"""
import json
import os
import os.path as osp
import shutil

import cv2
import numpy as np
from basicsr.utils.matlab_functions import imresize

from dtkd_compat import atomic_write
from dtkd_data.lmdb_tools import LmdbWriter, subimage_windows

TRAIN_PHOTOS = ('astronaut', 'rocket', 'motorcycle_left', 'motorcycle_right', 'hubble_deep_field',
                'immunohistochemistry', 'brick', 'grass', 'coins')
TEST_PHOTOS = ('coffee', 'chelsea', 'camera', 'gravel')

PRESETS = {
    # The demo training set: every photo at full size, 192x192 GT sub-images (48x48 LR), side by side
    # (random training crops are taken inside them; the teacher is run once per sub-image).
    'full': dict(train_photos=TRAIN_PHOTOS, test_photos=TEST_PHOTOS, max_side=None, crop_size=192, step=192),
    # For tests and CI: two training photos and one test photo, centre-cropped to 128x128.
    'tiny': dict(train_photos=('astronaut', 'rocket'), test_photos=('coffee', ), max_side=128, crop_size=64,
                 step=32),
}
FORMAT_VERSION = 1
MANIFEST = 'manifest.json'
_OUTPUTS = ('train/gt.lmdb', 'train/lq.lmdb', 'test/gt.lmdb', 'test/lq.lmdb', 'test/gt', 'test/lq')


def load_photo(name):
    """A scikit-image photograph as uint8 RGB HWC (grayscale replicated to three channels)."""
    from skimage import data as skdata

    if name in ('motorcycle_left', 'motorcycle_right'):
        left, right, _ = skdata.stereo_motorcycle()
        img = left if name == 'motorcycle_left' else right
    else:
        if not hasattr(skdata, name):
            raise ValueError(f'skimage.data has no photograph {name!r}.')
        img = getattr(skdata, name)()
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise ValueError(f'skimage.data.{name} is {img.dtype}, expected uint8.')
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    return np.ascontiguousarray(img[:, :, :3])


def prepare_gt(img, scale, max_side=None):
    """Centre-crop to at most ``max_side`` per side (if given), then mod-crop to a multiple of ``scale``."""
    h, w = img.shape[:2]
    if max_side is not None:
        th, tw = min(h, max_side), min(w, max_side)
        top, left = (h - th) // 2, (w - tw) // 2
        img = img[top:top + th, left:left + tw]
        h, w = th, tw
    return np.ascontiguousarray(img[:h - h % scale, :w - w % scale])


def bicubic_downscale(gt, scale):
    """MATLAB-style bicubic LR of a uint8 HWC image (antialiased), rounded back to uint8."""
    lr = imresize(gt.astype(np.float32) / 255., 1. / scale)
    return np.clip(np.round(lr * 255.), 0, 255).astype(np.uint8)


def _paths(root):
    return {
        'root': root,
        'train_gt': osp.join(root, 'train', 'gt.lmdb'),
        'train_lq': osp.join(root, 'train', 'lq.lmdb'),
        'test_gt': osp.join(root, 'test', 'gt.lmdb'),
        'test_lq': osp.join(root, 'test', 'lq.lmdb'),
        'test_gt_folder': osp.join(root, 'test', 'gt'),
        'test_lq_folder': osp.join(root, 'test', 'lq'),
        'manifest': osp.join(root, MANIFEST),
    }


def _file_sizes(root):
    sizes = {}
    for out in _OUTPUTS:
        for dirpath, _, files in os.walk(osp.join(root, out)):
            for name in files:
                if name == 'lock.mdb':  # LMDB rewrites its lock file on every open
                    continue
                path = osp.join(dirpath, name)
                sizes[osp.relpath(path, root)] = os.path.getsize(path)
    return dict(sorted(sizes.items()))


def _manifest_valid(root, params):
    try:
        with open(osp.join(root, MANIFEST)) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return False
    if manifest.get('params') != params or not manifest.get('files'):
        return False
    for rel, size in manifest['files'].items():
        path = osp.join(root, rel)
        if not osp.isfile(path) or osp.getsize(path) != size:
            return False
    return True


def build_demo_dataset(root='datasets/demo', scale=4, preset='full', train_photos=None, test_photos=None,
                       max_side=None, crop_size=None, step=None, force=False, log=print):
    """Build (or reuse) the demo x``scale`` data set under ``root``.

    Args:
        root (str): Output folder.
        scale (int): SR factor; ``crop_size`` and ``step`` must be multiples of it.
        preset (str): ``'full'`` or ``'tiny'`` (see ``PRESETS``); the arguments below override it.
        train_photos, test_photos (sequence[str] | None): ``skimage.data`` names; must not overlap.
        max_side (int | None): centre-crop every photo to at most this many pixels per side.
        crop_size, step (int | None): GT sub-image size and stride in pixels for the training LMDBs.
        force (bool): Rebuild even when a valid build exists.
        log (callable | None): progress messages (``print`` by default, None for silence).

    Returns:
        dict: ``root``, ``train_gt``, ``train_lq`` (sub-image LMDBs), ``test_gt``, ``test_lq`` (LMDBs),
        ``test_gt_folder``, ``test_lq_folder`` (PNG folders), ``manifest``: paths.
    """
    if preset not in PRESETS:
        raise ValueError(f'preset: expected one of {sorted(PRESETS)}, got {preset!r}.')
    cfg = dict(PRESETS[preset])
    for name, value in (('train_photos', train_photos), ('test_photos', test_photos), ('max_side', max_side),
                        ('crop_size', crop_size), ('step', step)):
        if value is not None:
            cfg[name] = value
    if not isinstance(scale, int) or scale < 1:
        raise ValueError(f'scale: expected a positive integer, got {scale!r}.')
    for name in ('crop_size', 'step'):
        if cfg[name] < scale or cfg[name] % scale:
            raise ValueError(f'{name}: {cfg[name]} must be a positive multiple of scale {scale}.')
    overlap = sorted(set(cfg['train_photos']) & set(cfg['test_photos']))
    if overlap:
        raise ValueError(f'train_photos and test_photos overlap: {overlap}.')
    if not cfg['train_photos'] or not cfg['test_photos']:
        raise ValueError('train_photos and test_photos must both be non-empty.')
    log = log or (lambda *a, **k: None)
    import skimage

    params = {
        'format_version': FORMAT_VERSION,
        'scale': scale,
        'train_photos': list(cfg['train_photos']),
        'test_photos': list(cfg['test_photos']),
        'max_side': cfg['max_side'],
        'crop_size': cfg['crop_size'],
        'step': cfg['step'],
        'skimage_version': skimage.__version__,
    }
    root = osp.abspath(root)
    paths = _paths(root)
    if not force and _manifest_valid(root, params):
        log(f'Demo data in {root} is up to date; reusing it.')
        return paths

    log(f'Building demo data in {root} (x{scale}, {len(params["train_photos"])} training and '
        f'{len(params["test_photos"])} test photos)...')
    if osp.exists(paths['manifest']):
        os.remove(paths['manifest'])  # first: an interrupted rebuild must not look valid
    for out in _OUTPUTS:
        target = osp.join(root, out)
        if osp.isdir(target):
            shutil.rmtree(target)
    os.makedirs(osp.join(root, 'train'), exist_ok=True)
    for folder in (paths['test_gt_folder'], paths['test_lq_folder']):
        os.makedirs(folder)

    crop, step = cfg['crop_size'], cfg['step']
    lq_crop = crop // scale
    with LmdbWriter(paths['train_gt']) as gt_db, LmdbWriter(paths['train_lq']) as lq_db:
        for name in params['train_photos']:
            gt = prepare_gt(load_photo(name), scale, cfg['max_side'])
            lq = bicubic_downscale(gt, scale)
            windows = subimage_windows(gt.shape[0], gt.shape[1], crop, step)
            if not windows:
                raise ValueError(f'Training photo {name} ({gt.shape[0]}x{gt.shape[1]}) is smaller than crop_size '
                                 f'{crop}.')
            gt_bgr, lq_bgr = gt[:, :, ::-1], lq[:, :, ::-1]
            for index, top, left in windows:
                key = f'{name}_s{index:03d}'
                gt_db.put(key, np.ascontiguousarray(gt_bgr[top:top + crop, left:left + crop]))
                t, lf = top // scale, left // scale
                lq_db.put(key, np.ascontiguousarray(lq_bgr[t:t + lq_crop, lf:lf + lq_crop]))
            log(f'  train  {name:22s} GT {gt.shape[0]}x{gt.shape[1]} -> {len(windows)} sub-images')
    with LmdbWriter(paths['test_gt']) as gt_db, LmdbWriter(paths['test_lq']) as lq_db:
        for name in params['test_photos']:
            gt = prepare_gt(load_photo(name), scale, cfg['max_side'])
            lq = bicubic_downscale(gt, scale)
            gt_bgr, lq_bgr = np.ascontiguousarray(gt[:, :, ::-1]), np.ascontiguousarray(lq[:, :, ::-1])
            gt_db.put(name, gt_bgr)
            lq_db.put(name, lq_bgr)
            cv2.imwrite(osp.join(paths['test_gt_folder'], f'{name}.png'), gt_bgr)
            cv2.imwrite(osp.join(paths['test_lq_folder'], f'{name}.png'), lq_bgr)
            log(f'  test   {name:22s} GT {gt.shape[0]}x{gt.shape[1]}, LQ {lq.shape[0]}x{lq.shape[1]}')

    manifest = {'params': params, 'files': _file_sizes(root)}
    atomic_write(paths['manifest'], json.dumps(manifest, indent=2))
    log(f'Done: {root}')
    return paths
