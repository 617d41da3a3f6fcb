"""Offline teacher outputs for distillation: run the ResShift teacher once over a training set.

:func:`generate_teacher_outputs` writes the teacher's x``sf`` SR image of every LQ image under the
GT's key, ready for ``PairedTeacherDataset``'s ``dataroot_teacher``: a folder of ``<key>.png`` or a
BasicSR LMDB (``data.mdb`` + ``meta_info.txt``, keys = GT keys).

Guarantees:

* Deterministic per key: the sampler's random draws come from a CPU ``torch.Generator`` seeded from
  ``sha256(f'{seed}:{key}')``. ``batch_size`` N samples up to N consecutive images of equal LQ size
  in one batched ``ResShiftTeacher.sample`` call (one network call per step for the group; a
  different size starts a new group), with one generator per image (a list), each drawing its
  image's noise in the order of a batch of one. The random numbers therefore do not depend on
  batching, interruptions or sharding; only the float arithmetic of a batched network call may
  differ in the last bits from a batch of one, which moves a few 8-bit values by one grey level.
  With ``batch_size`` 1 a resumed or sharded run writes the same bytes as one uninterrupted run on
  the same hardware and thread count.
* Crash-safe and resumable: a folder entry is written to a hidden temporary file and renamed into
  place; an LMDB entry is committed in one transaction with the rest of its sampling group. The
  LMDB's ``meta_info.txt`` is not kept during the run: it is rebuilt from the committed PNG entries
  (their size is read from the PNG header by :func:`dtkd_data.image_io.png_info`) and written
  atomically at the end, so an interrupted LMDB never looks complete to
  ``lmdb_is_complete``/BasicSR, and a rerun only adds the missing keys.
* Settings guard: ``teacher_cache.json`` in the output records the teacher options (without paths),
  the SHA-256 of both checkpoints, the seed and the PNG level; a rerun with other settings is refused
  unless ``overwrite``.
* Sharding: with ``world_size`` > 1 (``torchrun``) rank r takes keys ``[r::world_size]``; all ranks
  write into the same output (LMDB serialises write transactions across processes) and rank 0
  writes ``meta_info.txt`` after a barrier.
* Several samples: ``samples`` K > 1 stores K independent draws of the stochastic teacher per image,
  for confidence from their spread (``ConfidenceDWTKDLoss``'s ``teacher_spread``). Sample 0 is the
  output itself, exactly the single-sample output (same seed, same bytes), so a K = 1 cache stays
  valid and grows by the missing samples. Sample k >= 1 is a store of its own at
  :func:`dtkd_data.paired_teacher_dataset.teacher_sample_path` (``<output>/sample<k>.lmdb`` or
  ``<output>/sample<k>/``) with its own ``teacher_cache.json`` (the settings plus ``sample: k``), drawn
  from :func:`sample_seed`; resume, sharding and batching work per store as above.
"""
import copy
import hashlib
import json
import os
import os.path as osp
import shutil
import time
from dataclasses import dataclass

import lmdb
import numpy as np
import torch

from dtkd_compat import MissingFileError, OptionError, atomic_write, fault_point
from dtkd_data.image_io import BadImageError, image_size, png_info, read_training_image
from dtkd_data.lmdb_tools import LmdbFormatError, check_key, encode_png, list_images, listing, read_meta_info
from dtkd_data.paired_teacher_dataset import teacher_sample_path

RECORD_NAME = 'teacher_cache.json'
FORMAT_VERSION = 1
PNG_LEVEL = 1  # BasicSR's LMDB scripts use 1: fast, and lossless like any PNG level
_TMP_PREFIX = '.dtkd-tmp-'
_REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


# ---------------------------------------------------------------------------------------------- keys / seeds
def key_seed(key, seed):
    """Seed for ``key``: the first 63 bits of ``sha256(f'{seed}:{key}')`` (stable across runs and machines)."""
    digest = hashlib.sha256(f'{int(seed)}:{key}'.encode()).digest()
    return int.from_bytes(digest[:8], 'little') & (2**63 - 1)


def sample_seed(key, seed, sample=0):
    """Seed of teacher sample ``sample`` of ``key``: :func:`key_seed` for sample 0 (the single-sample
    cache's seed), ``key_seed(f'{key}/sample{k}', seed)`` for sample k ('/' is in no key)."""
    return key_seed(key if sample == 0 else f'{key}/sample{int(sample)}', seed)


def key_generator(key, seed, sample=0):
    """CPU ``torch.Generator`` for ``key`` (and teacher ``sample``). The teacher draws on it and moves the
    noise to its device, so the noise (not necessarily the network arithmetic) is the same on every device."""
    return torch.Generator(device='cpu').manual_seed(sample_seed(key, seed, sample))


# ---------------------------------------------------------------------------------------------- images
def bgr_to_tensor(img):
    """float32 HWC BGR in [0, 1] (:func:`dtkd_data.image_io.as_training`) -> (1, 3, H, W) float32 RGB."""
    rgb = np.ascontiguousarray(img[..., ::-1])
    return torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0)


def tensor_to_bgr_uint8(t):
    """(3, H, W) RGB in [0, 1] -> uint8 HWC BGR, rounded half to even (``torch.round``), clipped."""
    img = t.detach().float().clamp(0, 1).mul(255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return np.ascontiguousarray(img[..., ::-1])


def is_lmdb_path(path):
    return path.rstrip('/').endswith('.lmdb')


class ImageSource:
    """Images of a folder (key = file stem) or of a BasicSR LMDB (key = LMDB key).

    Args:
        path (str): folder or ``.lmdb`` folder.
        what (str): how errors name it (e.g. '--input').
    """

    def __init__(self, path, what):
        self.path, self.what = path, what
        self._env = None
        if is_lmdb_path(path):
            self.kind = 'lmdb'
            if not osp.isdir(path):
                raise MissingFileError(f'{what}: LMDB {path} does not exist.')
            try:
                sizes = read_meta_info(path)
            except LmdbFormatError as err:
                raise OptionError(f'{what}: {err}') from err
            self.sizes = {k: v[:2] for k, v in sizes.items()}
            self.files = {}
        else:
            self.kind = 'folder'
            try:
                names = list_images(path, what)
            except FileNotFoundError as err:
                raise MissingFileError(str(err)) from err
            self.files, dupes = {}, []
            for name in names:
                stem = osp.splitext(name)[0]
                if stem in self.files:
                    dupes.append(f'{self.files[stem]} / {name}')
                self.files[stem] = name
            if dupes:
                raise OptionError(f'{what}: {path} holds several images with the same name stem: '
                                        f'{listing(dupes)}')
            self.sizes = None

    def keys(self):
        return list(self.sizes) if self.kind == 'lmdb' else list(self.files)

    def describe(self, key):
        return f'{self.path}/{self.files[key]}' if self.kind == 'folder' else f'key {key!r} of {self.path}'

    def size(self, key):
        """(h, w) from the image header (folder) or ``meta_info.txt`` (LMDB)."""
        if self.kind == 'lmdb':
            return self.sizes[key]
        try:
            return image_size(osp.join(self.path, self.files[key]))
        except BadImageError as err:
            raise BadImageError(err.reason, f'{self.what}: image {err.name}') from None

    def read(self, key):
        """float32 HWC BGR in [0, 1], read as ``PairedTeacherDataset`` reads its LQ images
        (:func:`dtkd_data.image_io.read_training_image`: gray expanded, 16 bits kept, EXIF orientation
        applied; truncated, CMYK and transparent images refused, naming the image)."""
        if self.kind == 'folder':
            return read_training_image(osp.join(self.path, self.files[key]), f'{self.what}: image '
                                       f'{osp.join(self.path, self.files[key])}')
        if self._env is None:
            self._env = lmdb.open(self.path, readonly=True, lock=False, readahead=False, meminit=False)
        with self._env.begin(write=False) as txn:
            buf = txn.get(key.encode('ascii'))
        if buf is None:
            raise OptionError(f'{self.what}: {self.describe(key)} is listed in meta_info.txt but not stored.')
        return read_training_image(buf, f'{self.what}: {self.describe(key)}')

    def close(self):
        if self._env is not None:
            self._env.close()
            self._env = None


@dataclass
class Job:
    """One image: output ``key`` (the GT's), ``lq_key`` in the input, LQ size and expected SR size."""
    key: str
    lq_key: str
    lq_hw: tuple
    out_hw: tuple


def _tmpl_inverse(tmpl, stem):
    """Key ``k`` with ``tmpl.format(k) == stem``, or None."""
    prefix, _, suffix = tmpl.partition('{}')
    if len(stem) > len(prefix) + len(suffix) and stem.startswith(prefix) and stem.endswith(suffix):
        return stem[len(prefix):len(stem) - len(suffix)]
    return None


def plan_jobs(lq_source, gt_source=None, filename_tmpl='{}', scale=4, check_keys=False):
    """Pair keys and check sizes (image headers only): the list of :class:`Job`, sorted by key.

    With ``gt_source`` the keys are the GT's and the LQ of key k is ``filename_tmpl.format(k)``
    (BasicSR's ``PairedImageDataset`` rule); every GT must be exactly ``scale`` x its LQ, because the
    teacher's output (``scale`` x LQ) is stored at GT size. Without GT the key is the LQ name with
    the template removed.
    """
    if not isinstance(filename_tmpl, str) or filename_tmpl.count('{}') != 1:
        raise OptionError(f"--filename-tmpl: expected a template with one '{{}}', got {filename_tmpl!r}")
    lq_keys = set(lq_source.keys())
    pairs = []
    if gt_source is not None:
        missing = []
        for key in gt_source.keys():
            lq_key = filename_tmpl.format(key)
            if lq_key not in lq_keys:
                missing.append(f'{lq_key} (for GT {key})')
            pairs.append((key, lq_key))
        if missing:
            raise OptionError(f'--input {lq_source.path}: {len(missing)} of {len(pairs)} GT images of '
                                    f'--gt {gt_source.path} have no LQ image (--filename-tmpl {filename_tmpl!r}): '
                                    f'{listing(missing)}')
    else:
        bad = []
        for lq_key in lq_source.keys():
            key = lq_key if filename_tmpl == '{}' else _tmpl_inverse(filename_tmpl, lq_key)
            if key is None:
                bad.append(lq_key)
            pairs.append((key, lq_key))
        if bad:
            raise OptionError(f'--input {lq_source.path}: {len(bad)} LQ names do not match --filename-tmpl '
                                    f'{filename_tmpl!r}: {listing(bad)}')
    if check_keys:
        for key, _ in pairs:
            try:
                check_key(key)
            except ValueError as err:
                raise OptionError(f'--output (LMDB): {err}') from err
    jobs, wrong = [], []
    for key, lq_key in sorted(pairs):
        lh, lw = lq_source.size(lq_key)
        out_hw = (lh * scale, lw * scale)
        if gt_source is not None:
            gt_hw = tuple(gt_source.size(key))
            if gt_hw != out_hw:
                wrong.append(f'{key} (GT {gt_hw[0]}x{gt_hw[1]}, LQ {lh}x{lw})')
        jobs.append(Job(key, lq_key, (lh, lw), out_hw))
    if wrong:
        raise OptionError(f'--gt {gt_source.path}: {len(wrong)} GT images are not {scale}x their LQ image, '
                                f'so the teacher output cannot be stored at GT size: {listing(wrong)}')
    return jobs


# ---------------------------------------------------------------------------------------------- settings
def load_teacher_options(opt_path, steps=None, precision=None, device=None):
    """The teacher option dict (``yaml.safe_load``) with the command-line overrides put into ``sampler``."""
    if isinstance(opt_path, dict):
        opt = copy.deepcopy(opt_path)
    else:
        if not osp.isfile(opt_path):
            raise MissingFileError(f'-opt: teacher option file {opt_path} does not exist '
                                           '(e.g. options/teacher/resshift_realsr_x4.yml)')
        from dtkd_utils.options import load_yaml

        opt = load_yaml(opt_path, key='-opt')  # safe loader: python tags are refused, nothing runs
    sampler = opt.get('sampler') or {}
    if not isinstance(sampler, dict):
        raise OptionError('sampler: expected a mapping')
    sampler = dict(sampler)
    for name, value in (('steps', steps), ('precision', precision), ('device', device)):
        if value is not None:
            sampler[name] = value
    opt['sampler'] = sampler
    return opt


def resolve_ckpt(path):
    """As ``ResShiftTeacher``: the path if it exists, else relative to the project root."""
    path = osp.expanduser(os.fspath(path))
    if osp.isabs(path) or osp.isfile(path):
        return path
    alt = osp.join(_REPO_ROOT, path)
    return alt if osp.isfile(alt) else path


def file_sha256(path, chunk=1 << 22):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(chunk), b''):
            h.update(block)
    return h.hexdigest()


def cache_settings(opt, seed, sample=0):
    """What defines the cached bytes: teacher options without file paths and device, checkpoint
    hashes, seed, PNG level (and, for sample k >= 1 of a multi-sample cache, ``sample: k``). Raises
    when a checkpoint is missing (before any long work)."""
    clean = copy.deepcopy(opt)
    checkpoints = {}
    for block in ('unet', 'autoencoder'):
        part = clean.get(block)
        if isinstance(part, dict) and part.get('ckpt'):
            path = resolve_ckpt(part.pop('ckpt'))
            if not osp.isfile(path):
                raise MissingFileError(f'{block}.ckpt: checkpoint {path} does not exist '
                                               f'(see the teacher option file for the download address)')
            checkpoints[block] = file_sha256(path)
    sampler = clean.get('sampler') or {}
    sampler.pop('device', None)
    blob = json.dumps(clean, sort_keys=True, default=str)
    extra = {'sample': int(sample)} if sample else {}  # sample 0: the single-sample record, unchanged
    return {
        **extra,
        'format': FORMAT_VERSION,
        'seed': int(seed),
        'png_compress_level': PNG_LEVEL,
        'teacher_options_sha256': hashlib.sha256(blob.encode('utf-8')).hexdigest(),
        'checkpoints_sha256': checkpoints,
        'teacher_options': json.loads(blob),
    }


def _settings_differ(old, new):
    keys = ('format', 'seed', 'sample', 'png_compress_level', 'teacher_options_sha256', 'checkpoints_sha256')
    return [k for k in keys if old.get(k) != new.get(k)]


# ---------------------------------------------------------------------------------------------- outputs
class FolderOutput:
    """``<folder>/<key>.png``; each file appears by an atomic rename of a fully written temp file."""

    kind = 'folder'

    def __init__(self, path):
        self.path = path

    def exists(self):
        return osp.isdir(self.path) and bool(os.listdir(self.path))

    def prepare(self):
        """Create the folder and drop temporaries that a killed run left behind (rank 0 only)."""
        os.makedirs(self.path, exist_ok=True)
        for name in os.listdir(self.path):
            if name.startswith(_TMP_PREFIX):
                os.remove(osp.join(self.path, name))

    def open(self, map_size=None):
        pass

    def done_keys(self):
        return {name[:-4] for name in os.listdir(self.path) if name.endswith('.png') and not name.startswith('.')}

    def put_many(self, items):
        for key, png in items:
            atomic_write(osp.join(self.path, f'{key}.png'), png, tmp_prefix=_TMP_PREFIX)

    def finalize(self, keys):
        missing = sorted(set(keys) - self.done_keys())
        if missing:
            raise RuntimeError(f'{self.path}: {len(missing)} teacher images missing after the run: {listing(missing)}')

    def close(self):
        pass


class LmdbOutput:
    """BasicSR LMDB; entries commit one transaction per group; ``meta_info.txt`` is rebuilt at the end.

    Several processes may write at once (LMDB serialises write transactions with its lock file).
    """

    kind = 'lmdb'

    def __init__(self, path):
        self.path = path.rstrip('/')
        self.env = None

    def exists(self):
        return osp.isdir(self.path) and bool(os.listdir(self.path))

    def prepare(self):
        """Create the LMDB if needed and drop ``meta_info.txt``, so that until this run ends the output
        is not taken for a complete LMDB (rank 0 only)."""
        os.makedirs(self.path, exist_ok=True)
        for name in os.listdir(self.path):
            if name.startswith(_TMP_PREFIX):
                os.remove(osp.join(self.path, name))
        meta = osp.join(self.path, 'meta_info.txt')
        if osp.exists(meta):
            os.remove(meta)
        if not osp.isfile(osp.join(self.path, 'data.mdb')):
            lmdb.open(self.path, map_size=1 << 20).close()

    def open(self, map_size):
        self.env = lmdb.open(self.path, map_size=map_size, readahead=False, meminit=False)

    def done_keys(self):
        with self.env.begin(write=False) as txn:
            return {k.decode('ascii') for k in txn.cursor().iternext(keys=True, values=False)}

    def put_many(self, items):
        with self.env.begin(write=True) as txn:
            for key, png in items:
                txn.put(key.encode('ascii'), png)
            fault_point('teacher_cache.before_commit')  # crash tests only (dtkd_compat.fault_point)
        fault_point('teacher_cache.committed')

    def finalize(self, keys):
        """Check every key is stored and write ``meta_info.txt`` (sorted, BasicSR format) atomically."""
        lines = []
        with self.env.begin(write=False) as txn:
            for k, v in txn.cursor():
                key = k.decode('ascii')
                try:
                    info = png_info(v)
                except BadImageError as err:
                    raise RuntimeError(f'{self.path}: entry {key!r} {err}') from err
                h, w, c = info.h, info.w, info.channels
                lines.append(f'{key}.png ({h},{w},{c}) {PNG_LEVEL}\n')
            stored = {k.decode('ascii') for k in txn.cursor().iternext(keys=True, values=False)}
        missing = sorted(set(keys) - stored)
        if missing:
            raise RuntimeError(f'{self.path}: {len(missing)} teacher images missing after the run: {listing(missing)}')
        self.env.sync(True)
        atomic_write(osp.join(self.path, 'meta_info.txt'), ''.join(lines).encode('ascii'), tmp_prefix=_TMP_PREFIX)

    def close(self):
        if self.env is not None:
            self.env.close()
            self.env = None


def make_output(path):
    return LmdbOutput(path) if is_lmdb_path(path) else FolderOutput(path)


def _map_size(jobs):
    """Upper bound for the LMDB map: uncompressed PNG size (rows of 3 w + 1 bytes) plus page slack, x2.
    The file itself grows only with the data."""
    total = sum(h * (3 * w + 1) + 8192 for h, w in (j.out_hw for j in jobs))
    size = 2 * total + (64 << 20)
    return (size + (1 << 20) - 1) // (1 << 20) * (1 << 20)


# ---------------------------------------------------------------------------------------------- driver
def check_or_init_output(output, settings, overwrite=False):
    """Rank 0: make the output resumable with ``settings`` or refuse. Returns 'new' or 'resume'."""
    record_path = osp.join(output.path, RECORD_NAME)
    if output.exists():
        if overwrite:
            shutil.rmtree(output.path)
        elif not osp.isfile(record_path):
            raise OptionError(f'--output {output.path} exists but has no {RECORD_NAME}: it was not made by '
                                     'generate_teacher_outputs; choose another output or pass --overwrite to '
                                     'replace it')
        else:
            with open(record_path, encoding='utf-8') as f:
                old = json.load(f)
            diff = _settings_differ(old, settings)
            if diff:
                raise OptionError(f'--output {output.path} was made with other settings (differing: '
                                         f'{", ".join(diff)}; see {record_path}); use the same teacher options, '
                                         'checkpoints and --seed to resume, or pass --overwrite to start again')
            output.prepare()
            return 'resume'
    output.prepare()
    atomic_write(record_path, json.dumps(settings, indent=2, sort_keys=True).encode('utf-8'), tmp_prefix=_TMP_PREFIX)
    return 'new'


def generate_teacher_outputs(teacher_opt, input_path, output_path, gt_path=None, filename_tmpl='{}', seed=0,
                             steps=None, precision=None, device=None, batch_size=1, overwrite=False, rank=0,
                             world_size=1, barrier=None, progress=True, limit=None, samples=1):
    """Write the teacher's SR of every input image under the GT key into ``output_path``.

    Args:
        teacher_opt (str | dict): teacher option file (``options/teacher/resshift_realsr_x4.yml``) or dict.
        input_path (str): LQ folder or ``.lmdb``.
        output_path (str): folder, or ``.lmdb`` for a BasicSR LMDB.
        gt_path (str | None): GT folder or ``.lmdb`` giving the keys (LQ name = ``filename_tmpl`` of key).
        seed (int): base seed; image ``key`` uses :func:`key_seed` (key, seed).
        steps, precision, device: overrides of the teacher's ``sampler`` block (None keeps the file's).
        batch_size (int): up to this many consecutive images of equal LQ size are sampled in one batched
            call (one network call per step) and committed in one transaction; a different LQ size
            starts a new group. The noise of every image comes from its own generator, so only the
            last bits of the float arithmetic depend on it.
        overwrite (bool): delete an output made with other settings instead of refusing.
        rank, world_size (int): this process's shard: keys ``[rank::world_size]``.
        barrier (callable | None): synchronises ranks (``torch.distributed.barrier``); required if world_size > 1.
        limit (int | None): stop after this many new images in this process (for testing / partial runs).
        samples (int): K teacher samples per image (module docstring): sample 0 in ``output_path``,
            sample k in :func:`teacher_sample_path` (output_path, k).

    Returns:
        dict: ``written`` (new images by this process, all samples), ``skipped`` (already present),
        ``total`` keys, ``samples``, ``seconds``.
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise OptionError(f'--batch-size: expected a positive integer, got {batch_size!r}')
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise OptionError(f'--samples: expected a positive integer, got {samples!r}')
    if world_size > 1 and barrier is None:
        raise ValueError('generate_teacher_outputs: a barrier is needed with world_size > 1')
    sync = barrier or (lambda: None)
    opt = load_teacher_options(teacher_opt, steps=steps, precision=precision, device=device)
    diffusion = opt.get('diffusion')
    scale = diffusion.get('sf', 4) if isinstance(diffusion, dict) else 4
    outputs = [make_output(teacher_sample_path(output_path, k)) for k in range(samples)]
    output = outputs[0]
    lq_source = ImageSource(input_path, '--input')
    gt_source = ImageSource(gt_path, '--gt') if gt_path is not None else None
    if osp.abspath(output.path) in {osp.abspath(input_path.rstrip('/'))} | (
            {osp.abspath(gt_path.rstrip('/'))} if gt_path else set()):
        raise OptionError(f'--output {output.path} must differ from --input and --gt')
    jobs = plan_jobs(lq_source, gt_source, filename_tmpl, scale, check_keys=output.kind == 'lmdb')
    settings = [cache_settings(opt, seed, k) for k in range(samples)]

    if rank == 0:
        # sample 0 first: --overwrite of the output removes the sample stores inside it too
        for out, rec in zip(outputs, settings):
            check_or_init_output(out, rec, overwrite)
    sync()
    if rank != 0:
        for out, rec in zip(outputs, settings):
            with open(osp.join(out.path, RECORD_NAME), encoding='utf-8') as f:
                if _settings_differ(json.load(f), rec):
                    raise OptionError(f'rank {rank}: settings differ from those rank 0 recorded in {out.path}')
    mine = jobs[rank::world_size]
    todo, skipped = [], 0
    for k, out in enumerate(outputs):
        out.open(_map_size(jobs))
        done = out.done_keys()
        skipped += sum(j.key in done for j in mine)
        todo += [(k, j) for j in mine if j.key not in done]
    if limit is not None:
        todo = todo[:limit]
    stats = {'written': 0, 'skipped': skipped, 'total': len(jobs), 'samples': samples, 'seconds': 0.0}
    start = time.time()
    try:
        if todo:
            from dtkd_teacher.teacher import build_teacher

            teacher = build_teacher(opt)
            _run(teacher, todo, lq_source, outputs, seed, batch_size, stats, progress and rank == 0,
                 desc=f'teacher SR [rank {rank}/{world_size}]' if world_size > 1 else 'teacher SR')
        sync()
        if rank == 0 and limit is None:
            for out in outputs:
                out.finalize([j.key for j in jobs])
        sync()
    finally:
        for out in outputs:
            out.close()
        lq_source.close()
    stats['seconds'] = time.time() - start
    return stats


def group_jobs(jobs, batch_size):
    """Consecutive ``(sample, Job)`` pairs in groups of at most ``batch_size`` with the same sample and
    LQ size (a pair of another sample or size starts a new group), in order: each group is one batched
    ``teacher.sample`` call, stored in one sample's output."""
    groups = []
    for sample, job in jobs:
        head = groups[-1][0] if groups else None
        if head and len(groups[-1]) < batch_size and (head[0], tuple(head[1].lq_hw)) == (sample, tuple(job.lq_hw)):
            groups[-1].append((sample, job))
        else:
            groups.append([(sample, job)])
    return groups


def _run(teacher, todo, lq_source, outputs, seed, batch_size, stats, show, desc):
    """Sample the ``(sample, Job)`` pairs of ``todo`` and store each in ``outputs[sample]``."""
    from tqdm import tqdm

    bar = tqdm(total=len(todo), unit='img', desc=desc, disable=not show, dynamic_ncols=True)
    try:
        for group in group_jobs(todo, batch_size):
            k = group[0][0]
            lqs = []
            for _, job in group:
                img = lq_source.read(job.lq_key)
                if img.shape[:2] != tuple(job.lq_hw):
                    raise OptionError(f'--input: {lq_source.describe(job.lq_key)} decodes to '
                                            f'{img.shape[0]}x{img.shape[1]}, its header said {job.lq_hw}')
                lqs.append(bgr_to_tensor(img))
            # one network call per step for the whole group; each image draws from its own generator
            srs = teacher.sample(torch.cat(lqs), generator=[key_generator(job.key, seed, k) for _, job in group])
            pending = []
            for (_, job), sr in zip(group, srs):
                if tuple(sr.shape[-2:]) != tuple(job.out_hw):
                    raise RuntimeError(f'teacher output for {job.key} is {tuple(sr.shape[-2:])}, '
                                       f'expected {job.out_hw}')
                png, _ = encode_png(tensor_to_bgr_uint8(sr), PNG_LEVEL)
                pending.append((job.key, png))
            outputs[k].put_many(pending)  # one transaction per group
            stats['written'] += len(pending)
            bar.update(len(pending))
    finally:
        bar.close()
