"""LQ/GT pairs plus the teacher's super-resolved image for offline distillation.

``PairedTeacherDataset`` behaves like BasicSR 1.4.2's ``PairedImageDataset`` (folders, LMDB,
``meta_info_file``, ``filename_tmpl``, ``gt_size`` random crop, flips/rotations, ``color: y``,
``mean``/``std``) and optionally reads a third source, ``dataroot_teacher``: the teacher's SR output
for every training image, at GT size, stored under the GT's name (folder: same file stem as the GT;
LMDB: same key, same ``io_backend`` type as the GT). Teacher and GT share the crop window and
the flip/rotation draw, so the teacher patch is always the teacher's view of the GT patch.

``teacher_samples: K`` (K >= 2) also reads K samples of the stochastic teacher for every image
(``scripts/generate_teacher_outputs.py --samples K``): sample 0 is ``dataroot_teacher`` itself, sample
k >= 1 lives beside it at :func:`teacher_sample_path` (``<dataroot_teacher>/sample<k>.lmdb`` or
``<dataroot_teacher>/sample<k>/``). All K ride along with the GT (same crop, same flip/rotation).

All teacher entries are checked at construction (presence and size, from ``meta_info.txt`` for
LMDB and from image headers for folders), so a missing or wrongly sized teacher image stops the
run before training starts. Images are decoded by :func:`dtkd_data.image_io.read_training_image`
(the project's one reader with its training policy): 8-bit images exactly as BasicSR reads them,
16-bit images at full precision, grayscale expanded to RGB, EXIF orientation applied; an unreadable,
truncated, CMYK or transparent image, or a pair whose sizes do not fit the
scale or the crop, raises an error naming the files (``dtkd-train``/``dtkd-test`` scan the whole
data set for these before starting, see :mod:`dtkd_data.image_checks`). (The ``dtkd_data``
package imports ``dtkd_compat`` before this module, which makes basicsr importable.)
"""
import copy
import os
import os.path as osp

import torch
from basicsr.data.data_util import paired_paths_from_meta_info_file
from basicsr.data.transforms import augment, paired_random_crop
from basicsr.utils import FileClient, bgr2ycbcr, img2tensor, scandir
from basicsr.utils.registry import DATASET_REGISTRY
from torch.utils import data as data
from torchvision.transforms.functional import normalize

from dtkd_compat import OptionError
from dtkd_data.image_io import BadImageError, image_size, read_training_image
from dtkd_data.lmdb_tools import IMG_EXTENSIONS, LmdbFormatError, listing, lmdb_is_complete, read_meta_info

MAX_LISTED = 10


def teacher_sample_path(root, k):
    """Where teacher sample ``k`` of the store ``root`` lives: ``root`` itself for k = 0, else the
    ``sample<k>.lmdb`` (LMDB store) or ``sample<k>`` (folder store) inside it."""
    root = root.rstrip('/')
    if k == 0:
        return root
    return osp.join(root, f'sample{k}.lmdb' if root.endswith('.lmdb') else f'sample{k}')


class TeacherDataError(OptionError):
    """Teacher images are missing or do not have the GT's size."""


@DATASET_REGISTRY.register()
class PairedTeacherDataset(data.Dataset):
    """Paired LQ/GT images with optional teacher SR images (BasicSR dataset).

    Options (``opt``), as in ``PairedImageDataset`` unless noted:
        dataroot_gt, dataroot_lq (str): folders, or ``.lmdb`` folders when ``io_backend.type`` is lmdb.
        dataroot_teacher (str, optional): teacher SR images at GT size, named like the GT
            (folder: same file stem, any image extension; LMDB: same keys). Omit for val/test.
        teacher_samples (int, optional): K >= 2 teacher samples per image (module docstring); needs
            ``dataroot_teacher``. Default: none (only the teacher image).
        io_backend (dict): ``type`` is ``disk`` or ``lmdb``.
        meta_info_file (str, optional): GT names for the disk backend.
        filename_tmpl (str): LQ name template without extension. Default ``'{}'``.
        scale (int): LQ -> GT factor (BasicSR adds it from the top-level ``scale``).
        phase (str): ``train`` applies crop and augmentation; otherwise GT (and teacher) are cropped
            to ``scale`` x the LQ size, as BasicSR does for benchmark sets.
        gt_size (int): GT patch size in pixels (train only); a multiple of ``scale``.
        use_hflip, use_rot (bool): augmentations (train only). Default False.
        color (str, optional): ``'y'`` for the Y channel of YCbCr.
        mean, std (list[float], optional): normalization applied to every returned image.

    Returns per item:
        dict with ``lq`` (C, h, w), ``gt`` (C, H, W), with a teacher ``teacher`` (C, H, W) and with
        ``teacher_samples`` a ``teacher_samples`` (K, C, H, W) whose first sample is ``teacher``:
        float32 tensors, RGB (or Y), range [0, 1] before normalization; ``lq_path``, ``gt_path``
        (and ``teacher_path``): file paths, or LMDB keys.
    """

    def __init__(self, opt):
        super().__init__()
        self.opt = opt
        self._prefix = f"datasets.{opt.get('phase', '?')}"
        self._validate_options()
        self.io_backend_opt = copy.deepcopy(opt['io_backend'])
        self.backend = self.io_backend_opt.pop('type')
        self.file_client = None
        self.mean = opt.get('mean')
        self.std = opt.get('std')
        self.filename_tmpl = opt.get('filename_tmpl', '{}')
        self.gt_folder, self.lq_folder = opt['dataroot_gt'], opt['dataroot_lq']
        self.teacher_folder = opt.get('dataroot_teacher')
        k = opt.get('teacher_samples')
        self.sample_folders = [teacher_sample_path(self.teacher_folder, i) for i in range(1, k)] if k else []
        # the store behind each file-client key, for error messages
        self.folders = {'gt': self.gt_folder, 'lq': self.lq_folder, 'teacher': self.teacher_folder,
                        **{f'teacher{i}': f for i, f in enumerate(self.sample_folders, 1)}}

        if self.backend == 'lmdb':
            self.paths = self._paths_from_lmdb()
            self.io_backend_opt['db_paths'] = [self.lq_folder, self.gt_folder]
            self.io_backend_opt['client_keys'] = ['lq', 'gt']
            if self.teacher_folder is not None:
                self.io_backend_opt['db_paths'].append(self.teacher_folder)
                self.io_backend_opt['client_keys'].append('teacher')
            for i, folder in enumerate(self.sample_folders, 1):
                self.io_backend_opt['db_paths'].append(folder)
                self.io_backend_opt['client_keys'].append(f'teacher{i}')
        elif opt.get('meta_info_file') is not None:
            self.paths = paired_paths_from_meta_info_file([self.lq_folder, self.gt_folder], ['lq', 'gt'],
                                                          opt['meta_info_file'], self.filename_tmpl)
            self._check_files_exist()
        else:
            self.paths = self._paths_from_folders()
        if self.teacher_folder is not None:
            self._attach_teacher_paths()
        for i, folder in enumerate(self.sample_folders, 1):
            self._attach_teacher_paths(folder, i)

    # ------------------------------------------------------------------ validation
    def _key(self, name):
        return f'{self._prefix}.{name}'

    def _validate_options(self):
        opt = self.opt
        io_opt = opt.get('io_backend')
        if not isinstance(io_opt, dict) or 'type' not in io_opt:
            raise OptionError(f"{self._key('io_backend')}: expected a dict with 'type' (disk or lmdb), "
                                     f'got {io_opt!r}.')
        backend = io_opt['type']
        if backend not in ('disk', 'lmdb'):
            raise OptionError(f"{self._key('io_backend.type')}: expected 'disk' or 'lmdb', got {backend!r}.")
        for name in ('dataroot_gt', 'dataroot_lq', 'dataroot_teacher'):
            if name not in opt or opt[name] is None:
                if name == 'dataroot_teacher':
                    continue
                raise OptionError(f'{self._key(name)} is required (a folder or .lmdb folder).')
            path = opt[name]
            if not isinstance(path, str):
                raise OptionError(f'{self._key(name)}: expected a path string, got {path!r}.')
            if backend == 'lmdb':
                if not path.rstrip('/').endswith('.lmdb'):
                    raise OptionError(f'{self._key(name)}: io_backend type is lmdb, so the path must end '
                                             f'with ".lmdb", got {path}.')
                if not osp.isdir(path):
                    raise FileNotFoundError(f'{self._key(name)}: LMDB folder {path} does not exist.')
                if not lmdb_is_complete(path):
                    raise FileNotFoundError(f'{self._key(name)}: {path} is not a complete LMDB '
                                            '(data.mdb and meta_info.txt expected).')
            elif not osp.isdir(path):
                raise FileNotFoundError(f'{self._key(name)}: folder {path} does not exist.')
        samples = opt.get('teacher_samples')
        if samples is not None:
            if not isinstance(samples, int) or isinstance(samples, bool) or samples < 2:
                raise OptionError(f"{self._key('teacher_samples')}: expected an integer >= 2 (teacher samples "
                                  f'per image), got {samples!r}.')
            if opt.get('dataroot_teacher') is None:
                raise OptionError(f"{self._key('teacher_samples')} needs {self._key('dataroot_teacher')} "
                                  '(the store of sample 0).')
            for k in range(1, samples):
                path = teacher_sample_path(opt['dataroot_teacher'], k)
                ok = (lmdb_is_complete(path) if backend == 'lmdb' else osp.isdir(path))
                if not ok:
                    raise TeacherDataError(
                        f"{self._key('teacher_samples')}={samples}: teacher sample {k} of "
                        f"{self._key('dataroot_teacher')} ({opt['dataroot_teacher']}) is missing: {path} is not a "
                        + ('complete LMDB' if backend == 'lmdb' else 'folder')
                        + f'. Generate the samples with scripts/generate_teacher_outputs.py --samples {samples}.')
        meta = opt.get('meta_info_file')
        if meta is not None and backend != 'lmdb' and not osp.isfile(meta):
            raise FileNotFoundError(f"{self._key('meta_info_file')}: file {meta} does not exist.")
        tmpl = opt.get('filename_tmpl', '{}')
        if not isinstance(tmpl, str) or '{}' not in tmpl:
            raise OptionError(f"{self._key('filename_tmpl')}: expected a template containing '{{}}', "
                                     f'got {tmpl!r}.')
        scale = opt.get('scale')
        if not isinstance(scale, int) or isinstance(scale, bool) or scale < 1:
            raise OptionError(f"{self._key('scale')}: expected a positive integer, got {scale!r}.")
        if opt.get('phase') == 'train':
            gt_size = opt.get('gt_size')
            if not isinstance(gt_size, int) or isinstance(gt_size, bool) or gt_size < 1:
                raise OptionError(f"{self._key('gt_size')}: expected a positive integer for training, "
                                         f'got {gt_size!r}.')
            if gt_size % scale != 0:
                raise OptionError(f"{self._key('gt_size')}: {gt_size} is not divisible by scale {scale}.")
        color = opt.get('color')
        if color not in (None, 'y', 'rgb'):
            raise OptionError(f"{self._key('color')}: expected 'y' or none, got {color!r}.")
        channels = 1 if color == 'y' else 3
        for name in ('mean', 'std'):
            value = opt.get(name)
            if value is not None and (not isinstance(value, (list, tuple)) or len(value) != channels):
                raise OptionError(f'{self._key(name)}: expected a list of {channels} numbers, got {value!r}.')

    def _paths_from_folders(self):
        """``paired_paths_from_folder`` without its asserts: same order, errors naming missing LQ files."""
        gt_names = [f for f in scandir(self.gt_folder) if f.lower().endswith(IMG_EXTENSIONS)]
        if not gt_names:
            raise FileNotFoundError(f"{self._key('dataroot_gt')}: folder {self.gt_folder} contains no images.")
        lq_names = set(os.listdir(self.lq_folder))
        paths, missing = [], []
        for name in gt_names:
            stem, ext = osp.splitext(name)
            lq_name = f'{self.filename_tmpl.format(stem)}{ext}'
            if lq_name not in lq_names:
                missing.append(lq_name)
            paths.append({'lq_path': osp.join(self.lq_folder, lq_name), 'gt_path': osp.join(self.gt_folder, name)})
        if missing:
            raise FileNotFoundError(f"{self._key('dataroot_lq')}: {len(missing)} LQ image(s) for the GT images "
                                    f"are missing from {self.lq_folder} (filename_tmpl {self.filename_tmpl!r}): "
                                    f'{_listing(missing)}')
        return paths

    def _paths_from_lmdb(self):
        """``paired_paths_from_lmdb`` (keys sorted), naming unpaired keys and, for training, bad sizes."""
        gt_sizes, lq_sizes = read_meta_info(self.gt_folder), read_meta_info(self.lq_folder)
        only_gt = sorted(set(gt_sizes) - set(lq_sizes))
        only_lq = sorted(set(lq_sizes) - set(gt_sizes))
        if only_gt or only_lq:
            raise OptionError(f"{self._key('dataroot_lq')} ({self.lq_folder}) and {self._key('dataroot_gt')} "
                                     f'({self.gt_folder}) hold different keys: only in GT: {_listing(only_gt)}; '
                                     f'only in LQ: {_listing(only_lq)}')
        if self.opt.get('phase') == 'train':
            scale, gt_size = self.opt['scale'], self.opt['gt_size']
            bad = [f'{k} (GT {_hw(gt_sizes[k])}, LQ {_hw(lq_sizes[k])})' for k in sorted(gt_sizes)
                   if gt_sizes[k][:2] != (lq_sizes[k][0] * scale, lq_sizes[k][1] * scale)
                   or min(gt_sizes[k][:2]) < gt_size]
            if bad:
                raise OptionError(f"{self._key('dataroot_gt')}: {len(bad)} GT image(s) are not {scale}x their "
                                         f"LQ image or are smaller than {self._key('gt_size')}={gt_size}: "
                                         f'{_listing(bad)}')
        return [{'lq_path': key, 'gt_path': key} for key in sorted(lq_sizes)]

    def _check_files_exist(self):
        for kind in ('gt', 'lq'):
            missing = [p[f'{kind}_path'] for p in self.paths if not osp.isfile(p[f'{kind}_path'])]
            if missing:
                raise FileNotFoundError(f"{self._key('meta_info_file')}: {len(missing)} {kind.upper()} file(s) "
                                        f'listed in {self.opt["meta_info_file"]} do not exist: {_listing(missing)}')

    def _attach_teacher_paths(self, folder=None, sample=0):
        """Add ``teacher_path`` (sample 0, ``folder`` = ``dataroot_teacher``) or ``teacher<k>_path``
        (sample k) to every item after checking presence and size against the GT."""
        folder = self.teacher_folder if folder is None else folder
        field = 'teacher_path' if sample == 0 else f'teacher{sample}_path'
        what = self._key('dataroot_teacher') + (f' sample {sample}' if sample else '')
        missing, mismatched, unreadable = [], [], []
        if self.backend == 'lmdb':
            try:
                gt_sizes = read_meta_info(self.gt_folder)
                teacher_sizes = read_meta_info(folder)
            except LmdbFormatError as err:
                raise TeacherDataError(f'{what}: {err}') from err
            for item in self.paths:
                key = item['gt_path']
                item[field] = key
                if key not in teacher_sizes:
                    missing.append(key)
                elif teacher_sizes[key][:2] != gt_sizes[key][:2]:
                    mismatched.append(f'{key} (teacher {_hw(teacher_sizes[key])}, GT {_hw(gt_sizes[key])})')
        else:
            by_stem = {}
            for name in sorted(os.listdir(folder)):
                stem, ext = osp.splitext(name)
                if ext.lower() in IMG_EXTENSIONS:
                    by_stem.setdefault(stem, name)
            for item in self.paths:
                stem = osp.splitext(osp.basename(item['gt_path']))[0]
                if stem not in by_stem:
                    missing.append(stem)
                    continue
                teacher_path = osp.join(folder, by_stem[stem])
                item[field] = teacher_path
                try:
                    gt_size, teacher_size = _image_hw(item['gt_path']), _image_hw(teacher_path)
                except TeacherDataError as err:
                    unreadable.append(str(err))
                    continue
                if gt_size != teacher_size:
                    mismatched.append(f'{stem} (teacher {_hw(teacher_size)}, GT {_hw(gt_size)})')
        if missing or mismatched or unreadable:
            missing, mismatched = sorted(missing), sorted(mismatched)
            parts = [f'{len(unreadable)} image(s) cannot be read: {_listing(unreadable)}'] if unreadable else []
            if missing:
                parts.append(f'{len(missing)} GT image(s) have no teacher image: {_listing(missing)}')
            if mismatched:
                parts.append(f'{len(mismatched)} teacher image(s) differ in size from the GT: {_listing(mismatched)}')
            raise TeacherDataError(f"{what} ({folder}), checked against "
                                   f"{self._key('dataroot_gt')} ({self.gt_folder}) for {len(self.paths)} images: "
                                   + '; '.join(parts) + '. Regenerate the teacher outputs for these images.')

    # ------------------------------------------------------------------ reading
    def _read(self, path, client_key):
        folder = self.folders[client_key]
        name = f'{client_key.upper()} image {path}' + (f' of {folder}' if self.backend == 'lmdb' else '')
        try:
            img_bytes = self.file_client.get(path, client_key)
        except OSError as err:
            raise BadImageError(f'cannot be read ({err.strerror or err})', name) from None
        if img_bytes is None:
            raise BadImageError(f'is not in {self.backend} storage.', name)
        return read_training_image(img_bytes, name)

    def _check_pair(self, img_gt, img_lq, gt_path, lq_path):
        """Training pairs: GT exactly scale x LQ and at least gt_size (BasicSR's crop would fail obscurely)."""
        scale, gt_size = self.opt['scale'], self.opt['gt_size']
        (hg, wg), (hl, wl) = img_gt.shape[:2], img_lq.shape[:2]
        if (hg, wg) != (hl * scale, wl * scale):
            raise BadImageError(f'GT {gt_path} ({hg}x{wg}) is not {scale}x its LQ {lq_path} ({hl}x{wl})')
        if min(hg, wg) < gt_size:
            raise BadImageError(f'GT {gt_path} ({hg}x{wg}) is smaller than the training crop '
                                f"{self._key('gt_size')}={gt_size}")

    def __getitem__(self, index):
        if self.file_client is None:
            self.file_client = FileClient(self.backend, **self.io_backend_opt)
        scale = self.opt['scale']
        item = self.paths[index]
        gt_path, lq_path = item['gt_path'], item['lq_path']
        # HWC, BGR, float32 in [0, 1]
        img_gt = self._read(gt_path, 'gt')
        img_lq = self._read(lq_path, 'lq')
        gts = [img_gt]
        if self.teacher_folder is not None:
            gts.append(self._read(item['teacher_path'], 'teacher'))
        for i in range(1, len(self.sample_folders) + 1):
            gts.append(self._read(item[f'teacher{i}_path'], f'teacher{i}'))

        if self.opt.get('phase') == 'train':
            self._check_pair(img_gt, img_lq, gt_path, lq_path)
            # The teacher rides along with the GT: one crop window, one flip/rotation draw. The
            # draws are the same as PairedImageDataset's, so with the same seed gt/lq are identical.
            gts, img_lq = paired_random_crop(gts, img_lq, self.opt['gt_size'], scale, gt_path)
            if not isinstance(gts, list):
                gts = [gts]
            imgs = augment([gts[0], img_lq] + gts[1:], self.opt.get('use_hflip', False),
                           self.opt.get('use_rot', False))
            gts, img_lq = [imgs[0]] + imgs[2:], imgs[1]

        if self.opt.get('color') == 'y':
            gts = [bgr2ycbcr(img, y_only=True)[..., None] for img in gts]
            img_lq = bgr2ycbcr(img_lq, y_only=True)[..., None]

        if self.opt.get('phase') != 'train':
            (hg, wg), (hl, wl) = gts[0].shape[:2], img_lq.shape[:2]
            if hg < hl * scale or wg < wl * scale:
                raise BadImageError(f'GT {gt_path} ({hg}x{wg}) is smaller than {scale}x its LQ {lq_path} ({hl}x{wl})')
            # Benchmark GTs are not always scale x LQ; BasicSR crops them the same way.
            gts = [img[0:img_lq.shape[0] * scale, 0:img_lq.shape[1] * scale, :] for img in gts]

        tensors = img2tensor(gts + [img_lq], bgr2rgb=True, float32=True)
        if self.mean is not None or self.std is not None:
            for t in tensors:
                normalize(t, self.mean, self.std, inplace=True)
        out = {'lq': tensors[-1], 'gt': tensors[0], 'lq_path': lq_path, 'gt_path': gt_path}
        if self.teacher_folder is not None:
            out['teacher'] = tensors[1]
            out['teacher_path'] = item['teacher_path']
        if self.sample_folders:
            out['teacher_samples'] = torch.stack(tensors[1:-1])
        return out

    def __len__(self):
        return len(self.paths)


def _image_hw(path):
    try:
        return image_size(path)
    except BadImageError as err:
        raise TeacherDataError(str(err)) from err


def _hw(size):
    return f'{size[0]}x{size[1]}'


def _listing(items):
    return listing(items, MAX_LISTED)
