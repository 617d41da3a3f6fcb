"""Image and data-set checks: bad images are named, with what is wrong, before long work starts.

What training, validation and test images may be (``PairedTeacherDataset`` reads them with
:func:`dtkd_data.image_io.read_training_image`, the project's one reader with its training policy;
the data-set scan applies the same rules up front, from the same header parser):

- PNG, JPEG or another format OpenCV reads (BMP, TIFF, WebP, PPM/PGM), 8 or 16 bits per channel.
  EXIF orientation is applied (sizes below are the oriented sizes).
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
import os
import os.path as osp
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from dtkd_compat import OptionError
from dtkd_data.image_io import (  # noqa: F401  (BadImageError, ImageInfo, probe_*: part of this module's interface)
    BadImageError,
    ImageInfo,
    as_training,
    decode_probed,
    probe_bytes,
    probe_file,
    usage_problem,
    verify_decodes,
)
from dtkd_data.lmdb_tools import IMG_EXTENSIONS, LmdbFormatError, listing, read_meta_info

# Data-set types whose folders or LMDBs the checks understand (GT / LQ / teacher roots).
PAIRED_DATASETS = ('PairedTeacherDataset', 'PairedImageDataset')

MODES = ('quick', 'full')
MAX_LISTED = 10


class DatasetCheckError(OptionError):
    """The data-set scan found bad entries; ``problems`` lists every one ('<file>: <reason>')."""

    def __init__(self, message, problems=()):
        super().__init__(message)
        self.problems = list(problems)


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
        if info.alpha:  # transparency needs the pixels: decoded as the data set will read them
            if data is None:
                with open(ref.path, 'rb') as f:
                    data = f.read()
            as_training(decode_probed(data, info))
        return info, None
    except BadImageError as err:
        return None, err.reason
    except OSError as err:
        return None, f'cannot be read ({err.strerror or err})'


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
