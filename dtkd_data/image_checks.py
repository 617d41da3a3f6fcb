"""Image and data-set checks: bad images are named, with what is wrong, before long work starts.

What training, validation and test images may be (``PairedTeacherDataset`` reads them with
:func:`decode_image`, the data-set scan applies the same rules up front):

- PNG, JPEG or another format OpenCV reads (BMP, TIFF, WebP, PPM/PGM), 8 or 16 bits per channel.
  8-bit images become ``value / 255`` as in BasicSR; 16-bit images keep their precision
  (``value / 65535``) instead of BasicSR's silent reduction to 8 bits.
- Grayscale and palette images: expanded to three channels, as BasicSR does. The LQ, GT and teacher
  images of one pair must agree (a grayscale LQ with a colour GT is refused).
- An alpha channel only when fully opaque (it is then dropped): transparent pixels have no defined
  colour, so images with transparency are refused.

Refused, naming the file and the reason: a missing, empty, truncated or corrupt file, an unknown
format, a CMYK/YCCK JPEG (converting it to RGB needs its colour profile), transparency; per pair
(:func:`scan_dataset`): sizes that do not match the scale (training: GT = scale x LQ exactly;
validation/test: GT may exceed scale x LQ by less than the scale, as BasicSR crops it), a teacher
image of another size than the GT, training images smaller than ``gt_size``.

Two depths of checking: ``quick`` reads each file's header and its last bytes (a PNG must end with
its IEND chunk, a JPEG with its end-of-image marker; a file that does not is decoded in full to
decide), which finds missing, empty, truncated, wrongly sized and wrongly typed images at the cost
of a few kilobytes per file; ``full`` decodes every image, which also finds damage inside the data.
"""
import io
import os
import os.path as osp
import struct
import time
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import cv2
import numpy as np

from dtkd_compat import OptionError
from dtkd_data.lmdb_tools import IMG_EXTENSIONS, LmdbFormatError, listing, read_meta_info

# Data-set types whose folders or LMDBs the checks understand (GT / LQ / teacher roots).
PAIRED_DATASETS = ('PairedTeacherDataset', 'PairedImageDataset')

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
PNG_END = b'\x00\x00\x00\x00IEND\xaeB`\x82'
HEAD_BYTES = 1 << 16
MODES = ('quick', 'full')
MAX_LISTED = 10


class BadImageError(OptionError):
    """An image cannot be used; the message names it and says why."""


class DatasetCheckError(OptionError):
    """The data-set scan found bad entries; ``problems`` lists every one ('<file>: <reason>')."""

    def __init__(self, message, problems=()):
        super().__init__(message)
        self.problems = list(problems)


class _NeedMore(Exception):
    """The header lies beyond the bytes read so far."""


@dataclass
class ImageInfo:
    """What an image's header says. ``channels`` as stored (1 gray, 2 gray+alpha, 3, 4 RGBA/CMYK)."""
    fmt: str
    h: int
    w: int
    channels: int
    depth: int
    alpha: bool = False
    cmyk: str = None  # 'CMYK' or 'YCCK' (Adobe's YCbCr-coded CMYK) for four-colour images

    @property
    def gray(self):
        return self.channels in (1, 2) and not self.cmyk

    def describe(self):
        kind = self.cmyk or {1: 'gray', 2: 'gray+alpha', 3: 'RGB', 4: 'RGBA'}[self.channels]
        return f'{self.fmt} {self.h}x{self.w} {kind} {self.depth}-bit'


# ---------------------------------------------------------------------------------------------- headers
def _png_info(data):
    if len(data) < 33:
        raise _NeedMore
    if data[12:16] != b'IHDR':
        raise BadImageError('has a damaged PNG header (no IHDR chunk)')
    w, h, depth, ctype = struct.unpack('>IIBB', data[16:26])
    if ctype not in (0, 2, 3, 4, 6) or depth not in (1, 2, 4, 8, 16) or w == 0 or h == 0:
        raise BadImageError(f'has an invalid PNG header (size {w}x{h}, bit depth {depth}, colour type {ctype})')
    channels = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}[ctype]
    alpha = ctype in (4, 6)
    if not alpha:  # a tRNS chunk before the image data makes some pixels transparent
        pos = 8
        while True:
            if pos + 8 > len(data):
                raise _NeedMore
            length, kind = struct.unpack('>I4s', data[pos:pos + 8])
            if kind in (b'IDAT', b'IEND'):
                break
            if kind == b'tRNS':
                alpha = True
                break
            pos += 12 + length
    return ImageInfo('PNG', h, w, channels, 8 if ctype == 3 else depth, alpha=alpha)


_JPEG_SOF = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_info(data):
    pos, adobe = 2, None
    while True:
        if pos + 4 > len(data):
            raise _NeedMore
        if data[pos] != 0xFF:
            raise BadImageError(f'has a damaged JPEG header (no marker at byte {pos})')
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        if marker in (0xD9, 0xDA):
            raise BadImageError('has no JPEG frame header before its image data')
        length = int.from_bytes(data[pos + 2:pos + 4], 'big')
        if pos + 2 + length > len(data):
            raise _NeedMore
        seg = data[pos + 4:pos + 2 + length]
        if marker == 0xEE and seg[:5] == b'Adobe' and len(seg) >= 12:
            adobe = seg[11]
        if marker in _JPEG_SOF:
            if len(seg) < 6:
                raise BadImageError('has a damaged JPEG frame header')
            depth, h, w, ncomp = struct.unpack('>BHHB', seg[:6])
            if ncomp not in (1, 3, 4) or w == 0:
                raise BadImageError(f'has an unsupported JPEG layout ({ncomp} components, width {w})')
            if ncomp == 4:
                return ImageInfo('JPEG', h, w, 4, depth, cmyk='YCCK' if adobe == 2 else 'CMYK')
            return ImageInfo('JPEG', h, w, ncomp, depth)
        pos += 2 + length


_PIL_MODES = {'1': (1, 8), 'L': (1, 8), 'P': (3, 8), 'LA': (2, 8), 'PA': (4, 8), 'RGB': (3, 8), 'RGBA': (4, 8),
              'RGBX': (3, 8), 'CMYK': (4, 8), 'YCbCr': (3, 8), 'I;16': (1, 16), 'I;16B': (1, 16), 'I;16L': (1, 16),
              'I;16N': (1, 16)}


def _pil_info(data):
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            with Image.open(io.BytesIO(data)) as img:
                w, h, mode, fmt = img.size[0], img.size[1], img.mode, img.format or 'image'
                transparency = 'transparency' in img.info
    except Exception as err:  # PIL raises many kinds for unknown or damaged files
        raise BadImageError(f'is not a readable image ({_first_line(err)})') from None
    if mode not in _PIL_MODES:
        raise BadImageError(f'has an unsupported pixel format ({fmt} mode {mode}; 8- or 16-bit gray/RGB expected)')
    channels, depth = _PIL_MODES[mode]
    return ImageInfo(fmt, h, w, channels, depth, alpha=mode in ('LA', 'PA', 'RGBA') or transparency,
                     cmyk='CMYK' if mode == 'CMYK' else None)


def _first_line(err):
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _header(data):
    if data.startswith(PNG_SIGNATURE):
        return _png_info(data)
    if data.startswith(b'\xff\xd8'):
        return _jpeg_info(data)
    return _pil_info(data)


def _ends_cleanly(fmt, tail):
    """Whether the last bytes end the format's stream (False: possibly truncated, decode to decide)."""
    if fmt == 'PNG':
        return tail.endswith(PNG_END)
    if fmt == 'JPEG':
        return tail.rstrip(b'\x00\r\n ').endswith(b'\xff\xd9')
    return True


def verify_decodes(data):
    """Decode ``data`` in full with PIL (strict about truncation); raises BadImageError with the reason."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            with Image.open(io.BytesIO(data)) as img:
                img.load()
    except (OSError, SyntaxError, ValueError, EOFError, zlib.error, struct.error, Image.DecompressionBombError) as err:
        message = _first_line(err)
        if 'truncated' in message or isinstance(err, EOFError):
            raise BadImageError(f'is truncated ({message})') from None
        raise BadImageError(f'is corrupt ({message})') from None


# ---------------------------------------------------------------------------------------------- probing
class _Bytes:
    def __init__(self, data):
        self.data = data
        self.size = len(data)

    def head(self, n):
        return self.data[:n]

    def tail(self, n):
        return self.data[-n:]

    def all(self):
        return self.data


class _File:
    def __init__(self, path):
        self.path = path
        self.size = os.path.getsize(path)

    def head(self, n):
        with open(self.path, 'rb') as f:
            return f.read(n)

    def tail(self, n):
        with open(self.path, 'rb') as f:
            f.seek(max(self.size - n, 0))
            return f.read()

    def all(self):
        with open(self.path, 'rb') as f:
            return f.read()


def _probe(src, full):
    if src.size == 0:
        raise BadImageError('is empty (0 bytes)')
    data = src.head(HEAD_BYTES)
    try:
        info = _header(data)
    except _NeedMore:
        data = src.all()
        try:
            info = _header(data)
        except _NeedMore:
            raise BadImageError('is truncated (it ends inside its header)') from None
    if full or not _ends_cleanly(info.fmt, src.tail(64)):
        verify_decodes(src.all())
    return info


def probe_bytes(data, full=False):
    """:class:`ImageInfo` of an encoded image; raises BadImageError (message: what is wrong, without the name)."""
    return _probe(_Bytes(bytes(data)), full)


def probe_file(path, full=False):
    """:class:`ImageInfo` of an image file; raises BadImageError (message: what is wrong, without the name)."""
    if not osp.isfile(path):
        raise BadImageError('does not exist')
    return _probe(_File(path), full)


def usage_problem(info):
    """Why an image with this header cannot be used (None when it can; transparency needs the pixels)."""
    if info.cmyk:
        return (f'is a {info.cmyk} {info.fmt}; convert it to RGB with its colour profile (an image editor, or '
                'ImageMagick: convert in.jpg -colorspace sRGB out.png)')
    if info.depth not in (1, 2, 4, 8, 16):
        return f'has {info.depth} bits per channel (8 or 16 expected)'
    return None


def _decode(data, info):
    """uint8/uint16 HWC BGR (3 channels) with OpenCV, as BasicSR reads it, refusing transparency."""
    buf = np.frombuffer(data, np.uint8)
    if info.alpha:
        img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
        if img is not None and img.ndim == 3 and img.shape[2] in (2, 4):
            alpha = img[..., -1]
            if alpha.min() < np.iinfo(img.dtype).max:
                raise BadImageError(f'has transparent pixels ({int((alpha < np.iinfo(img.dtype).max).sum())} of '
                                    f'{alpha.size}); flatten it onto a background first, transparent pixels have '
                                    'no defined colour')
            img = img[..., :-1]
            if img.shape[2] == 1:
                img = img[..., 0]
        if img is not None and img.ndim == 2:
            img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    else:
        img = cv2.imdecode(buf, cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH)
    if img is None:
        raise BadImageError('cannot be decoded by OpenCV')
    if img.dtype not in (np.uint8, np.uint16):
        raise BadImageError(f'decodes to {img.dtype} pixels (8- or 16-bit expected)')
    return img


def decode_image(data, name):
    """Encoded image -> HWC BGR float32 in [0, 1] with 3 channels (BasicSR's ``imfrombytes(float32=True)``
    for 8-bit images; 16-bit images keep their precision). Errors name ``name`` and what is wrong."""
    try:
        if data is None or len(data) == 0:
            raise BadImageError('is empty (0 bytes)' if data is not None else 'is missing')
        info = probe_bytes(data)
        problem = usage_problem(info)
        if problem:
            raise BadImageError(problem)
        img = _decode(data, info)
    except BadImageError as err:
        raise BadImageError(f'{name} {err}') from None
    scale = 65535.0 if img.dtype == np.uint16 else 255.0
    return img.astype(np.float32) / scale


# ---------------------------------------------------------------------------------------------- data sets
@dataclass
class _Ref:
    """One image of a data set: a file or an LMDB key."""
    label: str
    path: str = None
    lmdb: str = None
    key: str = None


def check_image(ref, full=False, env=None):
    """(ImageInfo or None, problem or None) for one image reference."""
    try:
        if ref.lmdb is None:
            info = probe_file(ref.path, full=full)
            data = None
        else:
            with env.begin(write=False) as txn:
                buf = txn.get(ref.key.encode('utf-8'))
            if buf is None:
                raise BadImageError('is listed in meta_info.txt but not stored')
            data = bytes(buf)
            info = probe_bytes(data, full=full)
        problem = usage_problem(info)
        if problem:
            return info, problem
        if info.alpha:  # transparency needs the pixels
            _decode(data if data is not None else open(ref.path, 'rb').read(), info)
        return info, None
    except BadImageError as err:
        return None, str(err)
    except OSError as err:
        return None, f'cannot be read ({_first_line(err)})'


def check_image_file(path, full=False):
    """(ImageInfo or None, problem or None) for one image file."""
    return check_image(_Ref(path, path=path), full=full)


def _entries(dopt, where):
    """[(name, {'gt': _Ref, 'lq': _Ref, 'teacher': _Ref}), ...] and problems with the listing itself."""
    problems = []
    backend = (dopt.get('io_backend') or {}).get('type', 'disk')
    gt_root, lq_root, t_root = dopt.get('dataroot_gt'), dopt.get('dataroot_lq'), dopt.get('dataroot_teacher')
    tmpl = dopt.get('filename_tmpl', '{}')
    entries = []
    if backend == 'lmdb':
        sizes = {}
        for kind, root in (('gt', gt_root), ('lq', lq_root), ('teacher', t_root)):
            if root is None:
                continue
            try:
                sizes[kind] = read_meta_info(root)
            except LmdbFormatError as err:
                raise DatasetCheckError(f'{where}.dataroot_{kind}: {err}') from None
        for key in sorted(set(sizes['gt']) | set(sizes['lq'])):
            refs = {}
            for kind, root in (('gt', gt_root), ('lq', lq_root), ('teacher', t_root)):
                if root is None:
                    continue
                if key in sizes[kind]:
                    refs[kind] = _Ref(f'{root} key {key}', lmdb=root, key=key)
                else:
                    problems.append(f'{root} key {key}: missing ({kind.upper()} for key {key})')
            entries.append((key, refs))
        return entries, problems, sizes

    if dopt.get('meta_info_file'):
        with open(dopt['meta_info_file']) as f:
            gt_names = [line.strip().split(' ')[0] for line in f if line.strip()]
    else:
        gt_names = sorted(n for n in os.listdir(gt_root) if n.lower().endswith(IMG_EXTENSIONS))
        if not gt_names:
            problems.append(f'{gt_root}: contains no images ({where}.dataroot_gt)')
    teacher_by_stem = {}
    if t_root is not None:
        for n in sorted(os.listdir(t_root)):
            if n.lower().endswith(IMG_EXTENSIONS):
                teacher_by_stem.setdefault(osp.splitext(n)[0], n)
    for name in gt_names:
        stem, ext = osp.splitext(name)
        refs = {'gt': _Ref(osp.join(gt_root, name), path=osp.join(gt_root, name))}
        lq = osp.join(lq_root, f'{tmpl.format(stem)}{ext}')
        refs['lq'] = _Ref(lq, path=lq)
        if t_root is not None:
            if stem in teacher_by_stem:
                path = osp.join(t_root, teacher_by_stem[stem])
                refs['teacher'] = _Ref(path, path=path)
            else:
                problems.append(f'{osp.join(t_root, stem)}.*: missing (no teacher image for GT {name})')
        entries.append((stem, refs))
    return entries, problems, None


def _pair_problems(name, refs, infos, dopt, scale):
    """Size and channel agreement of one LQ/GT(/teacher) entry."""
    gt, lq, teacher = infos.get('gt'), infos.get('lq'), infos.get('teacher')
    out = []
    if gt is not None and lq is not None:
        train = dopt.get('phase') == 'train'
        sizes = f"GT {gt.h}x{gt.w} ({refs['gt'].label}), LQ {lq.h}x{lq.w} ({refs['lq'].label})"
        if train and (gt.h, gt.w) != (lq.h * scale, lq.w * scale):
            out.append(f'{name}: GT is not {scale}x the LQ: {sizes}')
        elif not train and not (0 <= gt.h - lq.h * scale < scale and 0 <= gt.w - lq.w * scale < scale):
            out.append(f'{name}: GT does not match {scale}x the LQ: {sizes}')
        gt_size = dopt.get('gt_size')
        if train and isinstance(gt_size, int) and min(gt.h, gt.w) < gt_size:
            out.append(f"{name}: GT {gt.h}x{gt.w} ({refs['gt'].label}) is smaller than the training crop "
                       f"gt_size={gt_size}")
        if gt.gray != lq.gray:
            out.append(f"{name}: LQ is {'gray' if lq.gray else 'colour'} but GT is {'gray' if gt.gray else 'colour'} "
                       f"({refs['lq'].label}, {refs['gt'].label})")
    if gt is not None and teacher is not None:
        if (teacher.h, teacher.w) != (gt.h, gt.w):
            out.append(f"{name}: teacher {teacher.h}x{teacher.w} ({refs['teacher'].label}) differs in size from "
                       f"GT {gt.h}x{gt.w}")
        if teacher.gray != gt.gray:
            out.append(f"{name}: teacher is {'gray' if teacher.gray else 'colour'} but GT is "
                       f"{'gray' if gt.gray else 'colour'} ({refs['teacher'].label})")
    return out


def scan_dataset(dopt, where='datasets.train', mode='quick', workers=None):
    """Check every image of one paired data-set block (``PairedTeacherDataset`` options).

    Args:
        dopt (dict): the block (``dataroot_gt``, ``dataroot_lq``, optional ``dataroot_teacher``,
            ``io_backend``, ``meta_info_file``, ``filename_tmpl``, ``scale``, ``phase``, ``gt_size``).
        where (str): option prefix for messages.
        mode (str): 'quick' (headers and stream ends) or 'full' (decode everything).
        workers (int | None): threads (default: up to 8).

    Returns:
        tuple(int, list[str]): number of images checked and one '<file or entry>: <reason>' per problem.
    """
    if mode not in MODES:
        raise OptionError(f"dataset_check: expected 'quick', 'full' or 'off', got {mode!r}")
    scale = int(dopt.get('scale') or 1)
    entries, problems, lmdb_sizes = _entries(dopt, where)
    refs = [ref for _, r in entries for ref in r.values()]
    envs = {}
    if lmdb_sizes is not None:
        import lmdb

        for ref in refs:
            if ref.lmdb not in envs:
                envs[ref.lmdb] = lmdb.open(ref.lmdb, readonly=True, lock=False, readahead=False, meminit=False)
    try:
        workers = workers or min(8, (os.cpu_count() or 1) + 2)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(lambda r: check_image(r, mode == 'full', envs.get(r.lmdb)), refs))
    finally:
        for env in envs.values():
            env.close()
    by_ref = {id(ref): res for ref, res in zip(refs, results)}
    for name, entry in entries:
        infos = {}
        for kind, ref in entry.items():
            info, problem = by_ref[id(ref)]
            if problem:
                problems.append(f'{ref.label}: {problem}')
            elif info is not None:
                infos[kind] = info
                if lmdb_sizes is not None:
                    h, w, _ = lmdb_sizes[kind][ref.key]
                    if (h, w) != (info.h, info.w):
                        problems.append(f'{ref.label}: meta_info.txt says {h}x{w}, the image is {info.h}x{info.w}')
        problems += _pair_problems(name, entry, infos, dopt, scale)
    return len(refs), problems


def check_datasets(opt, mode='quick', out=None):
    """Scan every paired data set of an option dict; raise :class:`DatasetCheckError` listing the problems.

    Called by ``dtkd-train`` / ``dtkd-test`` after the options are parsed (``dataset_check``).
    Returns {phase: number of images checked}.
    """
    import sys


    out = sys.stdout if out is None else out
    counts, problems = {}, []
    start = time.time()
    for phase, dopt in opt['datasets'].items():
        if dopt.get('type') not in PAIRED_DATASETS:
            continue
        counts[phase], found = scan_dataset(dopt, f'datasets.{phase}', mode)
        problems += [f'datasets.{phase}: {p}' for p in found]
    if problems:
        raise DatasetCheckError(f'dataset_check ({mode}): {len(problems)} problem(s) found before starting: '
                                f'{listing(problems, MAX_LISTED)}. Fix or remove these images; '
                                'scripts/check_dataset.py -opt <file> lists them all; dataset_check: off skips '
                                'the scan', problems)
    if counts and opt.get('rank', 0) == 0:
        print(f'dataset_check ({mode}): {sum(counts.values())} images in {len(counts)} data set(s) are usable '
              f'({time.time() - start:.1f} s)', file=out)
    return counts
