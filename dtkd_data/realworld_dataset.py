"""GT patches for real-world training: BasicSR's ``RealESRGANDataset`` without its blur kernels.

Real-ESRGAN (Wang et al., ICCVW 2021) and ResShift read GT images, flip them, reflect-pad / crop them to
a fixed square, draw three blur kernels per image in the loader, and degrade the batch on the
device. Here the kernels are drawn with the rest of the degradation
(:mod:`dtkd_data.realworld_degradation`, from a generator seeded by (seed, iteration, rank)), so that
an iteration's LQ batch does not depend on which loader worker made its items; this dataset keeps
the GT part of ``RealESRGANDataset.__getitem__`` (reading, ``use_hflip`` / ``use_rot``, the 400x400
pad / crop) and returns ``{'gt': (3, S, S) float32 RGB [0, 1], 'gt_path': str}``.

Options (``datasets.train``): ``dataroot_gt``, ``io_backend`` (``disk`` with ``meta_info``, a text
file of GT names relative to ``dataroot_gt``, one a line; or ``lmdb``), ``use_hflip``, ``use_rot``,
``crop_pad_size`` (S, at most BasicSR's 400, default 400; ResShift uses 300: a smaller square is a
further random crop of BasicSR's), and the loader keys of BasicSR.
"""
import os.path as osp
import random

from basicsr.data.realesrgan_dataset import RealESRGANDataset
from basicsr.utils.registry import DATASET_REGISTRY

from dtkd_compat import OptionError

_BASICSR_CROP = 400  # RealESRGANDataset's fixed pad / crop size
# kernel options RealESRGANDataset.__init__ requires; its kernels are dropped here, so the cheapest ones
_UNUSED_KERNEL_OPTIONS = {
    'blur_kernel_size': 21, 'kernel_list': ['iso'], 'kernel_prob': [1], 'blur_sigma': [1, 2], 'betag_range': [1, 2],
    'betap_range': [1, 2], 'sinc_prob': 0, 'blur_kernel_size2': 21, 'kernel_list2': ['iso'], 'kernel_prob2': [1],
    'blur_sigma2': [1, 2], 'betag_range2': [1, 2], 'betap_range2': [1, 2], 'sinc_prob2': 0, 'final_sinc_prob': 0,
}
KEYS = ('name', 'type', 'phase', 'scale', 'dataroot_gt', 'meta_info', 'io_backend', 'use_hflip', 'use_rot',
        'crop_pad_size', 'num_worker_per_gpu', 'batch_size_per_gpu', 'dataset_enlarge_ratio', 'prefetch_mode',
        'num_prefetch_queue', 'pin_memory', 'persistent_workers', 'use_shuffle')


@DATASET_REGISTRY.register()
class RealWorldGTDataset(RealESRGANDataset):
    """GT squares for on-the-fly degradation (see the module docstring)."""

    def __init__(self, opt):
        prefix = f"datasets.{opt.get('phase', 'train')}"
        unknown = sorted(set(opt) - set(KEYS))
        if unknown:
            hint = ' (the degradation options go in the top-level degradation block)' if unknown[0] in (
                _UNUSED_KERNEL_OPTIONS) else ''
            raise OptionError(f'{prefix}.{unknown[0]}: unknown option{hint}')
        backend = opt.get('io_backend')
        if not isinstance(backend, dict) or backend.get('type') not in ('disk', 'lmdb'):
            raise OptionError(f'{prefix}.io_backend.type: expected disk or lmdb, got {backend!r}')
        root = opt.get('dataroot_gt')
        if not isinstance(root, str) or not osp.isdir(osp.expanduser(root)):
            raise OptionError(f'{prefix}.dataroot_gt: folder {root!r} does not exist')
        if backend['type'] == 'disk' and not (isinstance(opt.get('meta_info'), str) and osp.isfile(opt['meta_info'])):
            raise OptionError(f"{prefix}.meta_info: a text file of GT names (relative to dataroot_gt, one a line) "
                              f"is required with io_backend disk, got {opt.get('meta_info')!r}")
        size = opt.get('crop_pad_size', _BASICSR_CROP)
        if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= _BASICSR_CROP:
            raise OptionError(f'{prefix}.crop_pad_size: expected an integer in [1, {_BASICSR_CROP}], got {size!r}')
        self.crop_pad_size = size
        opt = dict(opt, dataroot_gt=osp.expanduser(root), io_backend=dict(backend))
        opt.setdefault('use_hflip', False)
        opt.setdefault('use_rot', False)
        super().__init__({**_UNUSED_KERNEL_OPTIONS, **opt})
        if not self.paths:
            raise OptionError(f'{prefix}: no GT images listed (dataroot_gt {root!r})')

    def __getitem__(self, index):
        item = super().__getitem__(index)
        gt = item['gt']
        s = self.crop_pad_size
        if s < gt.shape[-1]:
            top, left = random.randint(0, gt.shape[-2] - s), random.randint(0, gt.shape[-1] - s)
            gt = gt[:, top:top + s, left:left + s].contiguous()
        return {'gt': gt, 'gt_path': item['gt_path']}
