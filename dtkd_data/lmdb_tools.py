"""Reading and writing BasicSR-style image LMDBs.

BasicSR (``basicsr.utils.lmdb_util``) stores each image PNG-encoded under an ASCII key and keeps a
``meta_info.txt`` beside ``data.mdb`` with one line per image::

    <key>.png (<h>,<w>,<c>) <png compression level>

Its readers take the key as ``line.split('.')[0]``, so keys must not contain dots or spaces.
The writer here produces exactly that layout, but builds it in a hidden temporary folder and
renames it into place only after the last commit: an interrupted run never leaves an LMDB that
looks complete. Sub-image extraction follows BasicSR's ``scripts/data_preparation/extract_subimages.py``.
"""
import fnmatch
import os
import os.path as osp
import re
import shutil

import cv2
import lmdb
import numpy as np

from dtkd_compat import OptionError
from dtkd_data.image_io import read_lmdb_image

IMG_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp', '.ppm', '.pgm')
_META_LINE = re.compile(r'^(\S+)\s+\((\d+),(\d+),(\d+)\)\s+(\d+)\s*$')
_KEY_OK = re.compile(r'^[A-Za-z0-9_\-]+$')


class LmdbFormatError(OptionError):
    """An LMDB folder is missing, incomplete or has an unreadable ``meta_info.txt``."""


def lmdb_is_complete(lmdb_path):
    """True when ``lmdb_path`` holds ``data.mdb`` and ``meta_info.txt`` (what a finished writer leaves)."""
    return osp.isfile(osp.join(lmdb_path, 'data.mdb')) and osp.isfile(osp.join(lmdb_path, 'meta_info.txt'))


def read_meta_info(lmdb_path):
    """Parse ``<lmdb_path>/meta_info.txt``.

    Returns:
        dict: key (file name without extension) -> (h, w, c), in file order.

    Raises:
        LmdbFormatError: when the folder is not a complete LMDB or a line does not match
            ``<name> (<h>,<w>,<c>) <level>``.
    """
    if not lmdb_is_complete(lmdb_path):
        raise LmdbFormatError(f'{lmdb_path} is not a complete LMDB: expected data.mdb and meta_info.txt inside.')
    sizes = {}
    meta_path = osp.join(lmdb_path, 'meta_info.txt')
    with open(meta_path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            match = _META_LINE.match(line.strip())
            if match is None:
                raise LmdbFormatError(f'{meta_path}:{line_no}: expected "<name>.png (h,w,c) <level>", '
                                      f'got {line.strip()!r}')
            name, h, w, c = match.group(1), int(match.group(2)), int(match.group(3)), int(match.group(4))
            sizes[name.split('.')[0]] = (h, w, c)
    return sizes


def check_key(key):
    """Raise ValueError unless ``key`` is usable as a BasicSR LMDB key (no dots, spaces or non-ASCII)."""
    if not _KEY_OK.match(key):
        raise ValueError(f'LMDB key {key!r} is not usable by BasicSR readers: only letters, digits, "_" and "-" '
                         'are allowed (BasicSR takes the key as the meta_info name up to the first dot).')


def list_images(folder, what='folder'):
    """Sorted image file names (not paths) directly inside ``folder``.

    Raises FileNotFoundError naming ``what`` when the folder does not exist or holds no image.
    """
    if not osp.isdir(folder):
        raise FileNotFoundError(f'{what}: folder {folder} does not exist.')
    names = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMG_EXTENSIONS))
    if not names:
        raise FileNotFoundError(f'{what}: folder {folder} contains no images (extensions {IMG_EXTENSIONS}).')
    return names


def encode_png(img, compress_level=1):
    """PNG-encode a uint8/uint16 HWC BGR (or HW gray) image; returns (bytes, (h, w, c))."""
    ok, buf = cv2.imencode('.png', img, [cv2.IMWRITE_PNG_COMPRESSION, compress_level])
    if not ok:
        raise OSError('PNG encoding failed.')
    c = 1 if img.ndim == 2 else img.shape[2]
    return buf.tobytes(), (img.shape[0], img.shape[1], c)


def extract_positions(length, crop_size, step, thresh_size=0):
    """Top (or left) offsets of BasicSR's sub-image grid along one axis.

    Offsets ``0, step, 2*step, ...`` while the crop fits, plus a last crop flush with the border
    when more than ``thresh_size`` pixels would otherwise be left out (``extract_subimages.py``).
    """
    if length < crop_size:
        return np.zeros(0, dtype=int)
    space = np.arange(0, length - crop_size + 1, step)
    if length - (space[-1] + crop_size) > thresh_size:
        space = np.append(space, length - crop_size)
    return space


def subimage_windows(h, w, crop_size, step, thresh_size=0):
    """List of (index, top, left) in BasicSR's order (row-major, index from 1)."""
    windows = []
    for top in extract_positions(h, crop_size, step, thresh_size):
        for left in extract_positions(w, crop_size, step, thresh_size):
            windows.append((len(windows) + 1, int(top), int(left)))
    return windows


def aligned_lq_size(gt_hw, lq_hw, scale, allow_crop=False):
    """LQ (h, w) of the aligned region of a GT/LQ pair, or None when the pair does not fit.

    Exact pairs (GT = ``scale`` x LQ) give the LQ size. With ``allow_crop``, pairs whose GT differs
    from ``scale`` x LQ by less than ``scale`` pixels per side (the GT was not mod-cropped, or the
    LQ size was rounded up) give the largest top-left region on which both agree.
    """
    (gh, gw), (lh, lw) = gt_hw, lq_hw
    if (gh, gw) == (lh * scale, lw * scale):
        return lh, lw
    if allow_crop and abs(gh - lh * scale) < scale and abs(gw - lw * scale) < scale:
        return min(lh, gh // scale), min(lw, gw // scale)
    return None


def crop_subimage_pair(job):
    """Cut one GT/LQ pair into PNG-encoded sub-images (a picklable worker for multiprocessing).

    Args:
        job (tuple): (stem, gt_path, lq_path, scale, crop_size, step, thresh_size, compress_level,
            allow_crop); GT and LQ are read with :func:`dtkd_data.image_io.read_lmdb_image` (8 or 16
            bits, gray or BGR as stored, EXIF orientation applied, transparency refused) and first reduced
            to their aligned region (``aligned_lq_size``). LQ windows sit at GT position / ``scale``.

    Returns:
        list of (key, gt_bytes, gt_shape, lq_bytes, lq_shape) with keys ``<stem>_s001``, ... .
    """
    stem, gt_path, lq_path, scale, crop, step, thresh, level, allow_crop = job
    gt, lq = read_lmdb_image(gt_path), read_lmdb_image(lq_path)
    size = aligned_lq_size(gt.shape[:2], lq.shape[:2], scale, allow_crop)
    if size is None:
        raise ValueError(f'{gt_path} ({gt.shape[0]}x{gt.shape[1]}) is not {scale}x {lq_path} '
                         f'({lq.shape[0]}x{lq.shape[1]}).')
    lq = lq[:size[0], :size[1]]
    gt = gt[:size[0] * scale, :size[1] * scale]
    lq_crop = crop // scale
    out = []
    for index, top, left in subimage_windows(gt.shape[0], gt.shape[1], crop, step, thresh):
        gt_bytes, gt_shape = encode_png(gt[top:top + crop, left:left + crop], level)
        t, lf = top // scale, left // scale
        lq_bytes, lq_shape = encode_png(lq[t:t + lq_crop, lf:lf + lq_crop], level)
        out.append((f'{stem}_s{index:03d}', gt_bytes, gt_shape, lq_bytes, lq_shape))
    return out


class LmdbWriter:
    """Write PNG-encoded images into a BasicSR LMDB, atomically.

    Use as a context manager: images go to a hidden ``.<name>.partial`` folder beside
    ``lmdb_path`` which is renamed to ``lmdb_path`` on a clean exit and deleted on an exception.

    Args:
        lmdb_path (str): Output folder; must end with ``.lmdb`` (BasicSR's readers require it).
        compress_level (int): PNG compression level 0-9 written into ``meta_info.txt``.
        overwrite (bool): Replace an existing ``lmdb_path``; otherwise raise FileExistsError.
        batch (int): Images per LMDB transaction.
    """

    def __init__(self, lmdb_path, compress_level=1, overwrite=False, batch=1000):
        lmdb_path = osp.abspath(lmdb_path.rstrip('/'))
        if not lmdb_path.endswith('.lmdb'):
            raise ValueError(f'LMDB output path must end with ".lmdb" (BasicSR requires it), got {lmdb_path}.')
        if osp.exists(lmdb_path) and not overwrite:
            raise FileExistsError(f'{lmdb_path} already exists; pass overwrite (--overwrite) to replace it.')
        self.lmdb_path = lmdb_path
        self.tmp_path = osp.join(osp.dirname(lmdb_path), f'.{osp.basename(lmdb_path)}.partial')
        self.compress_level = int(compress_level)
        self.overwrite = overwrite
        self.batch = batch
        self._env = None
        self._txn = None
        self._meta = []
        self._keys = set()
        self._pending = []  # (key, bytes) since the last commit, replayed if the map must grow
        self._map_size = 64 * 1024**2

    def __enter__(self):
        os.makedirs(osp.dirname(self.lmdb_path), exist_ok=True)
        if osp.exists(self.tmp_path):
            shutil.rmtree(self.tmp_path)
        self._env = lmdb.open(self.tmp_path, map_size=self._map_size)
        self._txn = self._env.begin(write=True)
        return self

    def put_bytes(self, key, img_bytes, shape):
        """Store already PNG-encoded bytes under ``key``; ``shape`` is (h, w, c)."""
        check_key(key)
        if key in self._keys:
            raise ValueError(f'Duplicate LMDB key {key!r} for {self.lmdb_path}.')
        while True:
            try:
                self._txn.put(key.encode('ascii'), img_bytes)
                break
            except lmdb.MapFullError:
                # Grow the map instead of guessing a huge size up front; the aborted transaction
                # lost this batch's puts, so they are replayed.
                self._txn.abort()
                self._map_size *= 2
                self._env.set_mapsize(self._map_size)
                self._txn = self._env.begin(write=True)
                for k, b in self._pending:
                    self._txn.put(k.encode('ascii'), b)
        self._pending.append((key, img_bytes))
        self._keys.add(key)
        h, w, c = shape
        self._meta.append(f'{key}.png ({h},{w},{c}) {self.compress_level}\n')
        if len(self._pending) >= self.batch:
            self._commit()

    def put(self, key, img):
        """PNG-encode and store a uint8/uint16 HWC BGR image (or HW gray) under ``key``."""
        img_bytes, shape = encode_png(img, self.compress_level)
        self.put_bytes(key, img_bytes, shape)

    def _commit(self):
        self._txn.commit()
        self._pending = []
        self._txn = self._env.begin(write=True)

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self._txn.abort()
            self._env.close()
            shutil.rmtree(self.tmp_path, ignore_errors=True)
            return False
        self._txn.commit()
        self._env.close()
        # meta_info.txt last: its presence marks the LMDB complete (lmdb_is_complete).
        with open(osp.join(self.tmp_path, 'meta_info.txt'), 'w') as f:
            f.writelines(self._meta)
        if osp.exists(self.lmdb_path):
            shutil.rmtree(self.lmdb_path)
        os.replace(self.tmp_path, self.lmdb_path)
        return False

    @property
    def count(self):
        """Number of images written so far."""
        return len(self._meta)


def write_image_lmdb(lmdb_path, items, compress_level=1, overwrite=False):
    """Write ``(key, uint8/uint16 BGR image)`` pairs from ``items`` into a new BasicSR LMDB; returns the count."""
    with LmdbWriter(lmdb_path, compress_level=compress_level, overwrite=overwrite) as writer:
        for key, img in items:
            writer.put(key, img)
    return writer.count


def listing(items, limit=10):
    """``'a, b, c, ... (n more)'`` for error messages: at most ``limit`` entries."""
    items = list(items)
    shown = ', '.join(str(v) for v in items[:limit])
    return shown + (f', ... ({len(items) - limit} more)' if len(items) > limit else '')


def find_pairs(gt_folder, lq_folder, lq_tmpl='{}', gt_what='GT folder', lq_what='LQ folder', gt_pattern=None):
    """Pair every GT image with its LQ image: stem ``lq_tmpl.format(<GT stem>)``, any image extension.

    Args:
        lq_tmpl (str | callable): template containing ``{}``, or a function GT stem -> LQ stem.
        gt_pattern (str | None): ``fnmatch`` pattern selecting GT files (for sets such as RealSR
            that keep GT and LQ in one folder, e.g. ``'*_HR.png'``).

    Returns:
        list of (stem, gt_path, lq_path), sorted by GT file name.

    Raises:
        FileNotFoundError: a folder is missing or empty, or LQ images are missing (the message lists
            up to ten of them and the total count).
    """
    gt_names = list_images(gt_folder, gt_what)
    if gt_pattern is not None:
        gt_names = [n for n in gt_names if fnmatch.fnmatchcase(n, gt_pattern)]
        if not gt_names:
            raise FileNotFoundError(f'{gt_what}: no image in {gt_folder} matches {gt_pattern!r}.')
    to_lq = lq_tmpl if callable(lq_tmpl) else lq_tmpl.format
    lq_by_stem = {}
    for name in list_images(lq_folder, lq_what):
        lq_by_stem.setdefault(osp.splitext(name)[0], name)
    pairs, missing = [], []
    for name in gt_names:
        stem = osp.splitext(name)[0]
        lq_stem = to_lq(stem)
        if lq_stem not in lq_by_stem:
            missing.append(f'{lq_stem} (for {name})')
            continue
        pairs.append((stem, osp.join(gt_folder, name), osp.join(lq_folder, lq_by_stem[lq_stem])))
    if missing:
        raise FileNotFoundError(f'{lq_what} {lq_folder}: {len(missing)} of {len(gt_names)} GT images in {gt_folder} '
                                f'have no LQ image (LQ stem {lq_tmpl if isinstance(lq_tmpl, str) else "rule"!r}): '
                                f'{listing(missing)}')
    return pairs
