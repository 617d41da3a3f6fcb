"""Offline teacher outputs (dtkd_teacher.cache, scripts/generate_teacher_outputs.py).

A tiny ResShift teacher (tests/data/options/tiny_teacher.yml) with seeded random weights saved to
real checkpoint files; LQ images are x4 bicubic reductions of photographs from skimage.data.
Expected bytes are computed independently: the key's seed from hashlib, one ``sample`` call per
image, quantisation with numpy. With ``batch_size`` > 1, images of equal LQ size are sampled in one
batched call, each with its own generator: the same noise, but the batched network arithmetic may
differ in the last float bits, so a few 8-bit values may differ by one grey level (bounded below).
"""
import copy
import hashlib
import importlib.util
import json
import os
import signal
import socket

import cv2
import lmdb
import numpy as np
import pytest
import torch
import yaml

import dtkd_arch  # noqa: F401  (registers the architectures)
import dtkd_data  # noqa: F401  (registers the datasets)
from conftest import REPO, bicubic_down, photo, run_cli, tiny_teacher_options, write_rgb, write_yaml
from dtkd_compat import OptionError
from dtkd_data.image_io import png_info
from dtkd_data.lmdb_tools import read_meta_info, write_image_lmdb
from dtkd_data.paired_teacher_dataset import PairedTeacherDataset
from dtkd_teacher.cache import Job, generate_teacher_outputs, group_jobs, key_seed

SCRIPT = os.path.join(REPO, 'scripts', 'generate_teacher_outputs.py')
STEPS = 2
# (key, photo, top, left, GT h, GT w): LQ 16x16, 16x16 and 12x20
IMAGES = [('img0', 'astronaut', 100, 180, 64, 64), ('img1', 'coffee', 150, 200, 64, 64),
          ('img2', 'chelsea', 80, 200, 48, 80)]
# batched vs one-image sampling: 8-bit values that may differ (by one grey level at most) over the
# 36,096 values of the three images; measured 3 (img0 1, img1 2, img2 sampled alone 0) on one thread of an
# 'Intel(R) Xeon(R) Processor' (AVX-512) with torch 2.14
MAX_OFF_BY_ONE = 12


pytestmark = pytest.mark.usefixtures('one_thread_module')


@pytest.fixture(scope='module')
def teacher_opt(tmp_path_factory):
    """Tiny teacher option file whose ckpt keys point at seeded random weights."""
    root = tmp_path_factory.mktemp('tiny_teacher')
    return write_yaml(root / 'tiny_teacher.yml', tiny_teacher_options(root, seed=123, steps=STEPS))


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    """GT / LQ folders (LQ named '<key>x4') and LMDBs (shared keys)."""
    root = tmp_path_factory.mktemp('cache_data')
    gts, lqs = {}, {}
    for key, name, top, left, h, w in IMAGES:
        gt = photo(name)[top:top + h, left:left + w]
        lq = bicubic_down(gt, 4)
        write_rgb(str(root / 'gt' / f'{key}.png'), gt)
        write_rgb(str(root / 'lq' / f'{key}x4.png'), lq)
        gts[key], lqs[key] = gt[..., ::-1].copy(), lq[..., ::-1].copy()
    write_image_lmdb(str(root / 'gt.lmdb'), sorted(gts.items()))
    write_image_lmdb(str(root / 'lq.lmdb'), sorted(lqs.items()))
    return root, lqs


def expected_sr(teacher, lq_bgr, key, seed):
    """Independent reference: hashlib seed, one image per sample call, numpy quantisation -> BGR uint8."""
    seed_k = int.from_bytes(hashlib.sha256(f'{seed}:{key}'.encode()).digest()[:8], 'little') & (2**63 - 1)
    lq = torch.from_numpy(lq_bgr[..., ::-1].astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    sr = teacher.sample(lq, generator=torch.Generator().manual_seed(seed_k))[0].numpy()
    img = np.clip(np.round(np.clip(sr, 0, 1) * 255.0), 0, 255).astype(np.uint8).transpose(1, 2, 0)
    return img[..., ::-1]


def png_diff(got, ref):
    """(number of 8-bit values that differ, largest difference) of two decoded images of one shape."""
    assert got.shape == ref.shape and got.dtype == ref.dtype == np.uint8
    diff = np.abs(got.astype(np.int16) - ref.astype(np.int16))
    return int((diff > 0).sum()), int(diff.max())


def assert_batched_equals_reference(entries, reference):
    """``entries`` ({key: PNG bytes}) equal the batch-1 reference up to MAX_OFF_BY_ONE values off by one."""
    off = 0
    for key, png in entries.items():
        got = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
        count, worst = png_diff(got, cv2.imread(os.path.join(reference, f'{key}.png'), cv2.IMREAD_UNCHANGED))
        assert worst <= 1, f'{key}: a value differs by {worst} grey levels from the batch-1 output'
        off += count
    assert off <= MAX_OFF_BY_ONE, f'{off} values differ (by one) from the batch-1 output'
    return off


def lmdb_entries(path):
    env = lmdb.open(path, readonly=True, lock=False)
    with env.begin() as txn:
        entries = {k.decode(): bytes(v) for k, v in txn.cursor()}
    env.close()
    return entries


def folder_entries(path):
    return {n: open(os.path.join(path, n), 'rb').read() for n in sorted(os.listdir(path)) if n.endswith('.png')}


@pytest.fixture(scope='module')
def reference(teacher_opt, data, tmp_path_factory):
    """One uninterrupted in-process run into a folder (LQ names via filename_tmpl)."""
    root, _ = data
    out = str(tmp_path_factory.mktemp('ref') / 'teacher')
    stats = generate_teacher_outputs(teacher_opt, str(root / 'lq'), out, gt_path=str(root / 'gt'),
                                     filename_tmpl='{}x4', seed=7, progress=False)
    assert stats['written'] == 3 and stats['total'] == 3
    return out


def test_folder_cache_equals_per_key_sampling_and_feeds_the_dataset(teacher_opt, data, reference):
    from dtkd_teacher.teacher import ResShiftTeacher

    root, lqs = data
    assert sorted(os.listdir(reference)) == ['img0.png', 'img1.png', 'img2.png', 'teacher_cache.json']
    teacher = ResShiftTeacher.from_options(teacher_opt)
    # keys sampled in another order than the run's, each alone: the bytes depend on the key only
    for key in ('img2', 'img0'):
        stored = cv2.imread(os.path.join(reference, f'{key}.png'), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(stored, expected_sr(teacher, lqs[key], key, seed=7))
    assert key_seed('img0', 7) != key_seed('img1', 7)
    img0, img1 = (cv2.imread(os.path.join(reference, f'img{i}.png')) for i in (0, 1))
    assert not np.array_equal(img0, img1)

    ds = PairedTeacherDataset({'phase': 'val', 'scale': 4, 'io_backend': {'type': 'disk'}, 'filename_tmpl': '{}x4',
                               'dataroot_gt': str(root / 'gt'), 'dataroot_lq': str(root / 'lq'),
                               'dataroot_teacher': reference})
    assert len(ds) == 3
    item = ds[2]
    assert item['teacher'].shape == item['gt'].shape == (3, 48, 80)
    stored = cv2.imread(os.path.join(reference, 'img2.png'))[..., ::-1].astype(np.float32) / 255.0
    np.testing.assert_allclose(item['teacher'].numpy().transpose(1, 2, 0), stored, atol=1e-6)


def test_group_jobs_batches_consecutive_equal_sizes():
    sizes = [(16, 16), (16, 16), (16, 16), (12, 20), (16, 16), (16, 16), (12, 20)]
    jobs = [Job(f'k{i}', f'k{i}', hw, (4 * hw[0], 4 * hw[1])) for i, hw in enumerate(sizes)]

    def keys(batch_size, pairs=None):
        return [[j.key for _, j in group] for group in group_jobs(pairs or [(0, j) for j in jobs], batch_size)]

    assert keys(1) == [[j.key] for j in jobs]
    assert keys(2) == [['k0', 'k1'], ['k2'], ['k3'], ['k4', 'k5'], ['k6']]
    assert keys(32) == [['k0', 'k1', 'k2'], ['k3'], ['k4', 'k5'], ['k6']]  # order kept, never re-sorted
    assert group_jobs([], 4) == []
    # different teacher samples never share a group (each group goes to one sample's output)
    assert keys(32, [(0, jobs[0]), (0, jobs[1]), (1, jobs[0]), (1, jobs[1])]) == [['k0', 'k1'], ['k0', 'k1']]


def test_lmdb_cache_from_lmdb_batched_matches_folder_and_feeds_the_dataset(teacher_opt, data, reference, tmp_path,
                                                                          monkeypatch):
    from dtkd_teacher.teacher import ResShiftTeacher

    root, _ = data
    out = str(tmp_path / 'teacher.lmdb')
    calls = []
    sample = ResShiftTeacher.sample

    def spy(self, lq, generator=None):
        calls.append((tuple(lq.shape), len(generator)))
        return sample(self, lq, generator=generator)

    monkeypatch.setattr(ResShiftTeacher, 'sample', spy)
    # LQ and GT LMDBs share keys; batch_size 3 over LQ sizes 16x16, 16x16, 12x20: the two 16x16 images
    # are sampled in one call (and committed in one transaction), the 12x20 one starts a new group
    stats = generate_teacher_outputs(teacher_opt, str(root / 'lq.lmdb'), out, gt_path=str(root / 'gt.lmdb'),
                                     seed=7, batch_size=3, progress=False)
    assert stats['written'] == 3
    assert calls == [((2, 3, 16, 16), 2), ((1, 3, 12, 20), 1)]
    entries = lmdb_entries(out)
    assert sorted(entries) == ['img0', 'img1', 'img2']
    assert_batched_equals_reference(entries, reference)
    # img2 was sampled alone: bit for bit the batch-1 output
    assert entries['img2'] == open(os.path.join(reference, 'img2.png'), 'rb').read()
    for key, png in entries.items():
        ref = cv2.imread(os.path.join(reference, f'{key}.png'), cv2.IMREAD_UNCHANGED)
        info = png_info(png)  # the PNG header parser the cache builds meta_info.txt with
        assert (info.h, info.w, info.channels) == ref.shape
    with open(os.path.join(out, 'meta_info.txt')) as f:
        assert f.read() == 'img0.png (64,64,3) 1\nimg1.png (64,64,3) 1\nimg2.png (48,80,3) 1\n'
    assert read_meta_info(out) == {'img0': (64, 64, 3), 'img1': (64, 64, 3), 'img2': (48, 80, 3)}

    # a rerun skips everything (the batch size is not a setting of the cache); a rerun with other settings
    # is refused before any work, whatever the batch size
    again = generate_teacher_outputs(teacher_opt, str(root / 'lq.lmdb'), out, gt_path=str(root / 'gt.lmdb'),
                                     seed=7, batch_size=2, progress=False)
    assert again['written'] == 0 and again['skipped'] == 3
    with pytest.raises(OptionError, match='seed'):
        generate_teacher_outputs(teacher_opt, str(root / 'lq.lmdb'), out, gt_path=str(root / 'gt.lmdb'), seed=8,
                                 batch_size=3, progress=False)
    with pytest.raises(OptionError, match='teacher_options_sha256'):
        generate_teacher_outputs(teacher_opt, str(root / 'lq.lmdb'), out, gt_path=str(root / 'gt.lmdb'), seed=7,
                                 steps=1, batch_size=3, progress=False)
    assert entries == lmdb_entries(out)
    assert len(calls) == 2

    ds = PairedTeacherDataset({'phase': 'train', 'scale': 4, 'gt_size': 32, 'io_backend': {'type': 'lmdb'},
                               'dataroot_gt': str(root / 'gt.lmdb'), 'dataroot_lq': str(root / 'lq.lmdb'),
                               'dataroot_teacher': out})
    item = ds[1]
    assert item['teacher'].shape == item['gt'].shape == (3, 32, 32) and item['lq'].shape == (3, 8, 8)


@pytest.mark.parametrize('batch_size, first_group', [(1, ['img0']), (3, ['img0', 'img1'])])
def test_sigkill_then_resume_equals_uninterrupted_run(teacher_opt, data, reference, tmp_path, batch_size,
                                                      first_group):
    root, _ = data
    out = str(tmp_path / 'killed.lmdb')
    args = [SCRIPT, '-opt', teacher_opt, '--input', str(root / 'lq'), '--gt', str(root / 'gt'),
            '--filename-tmpl', '{}x4', '--output', out, '--seed', '7', '--no-progress',
            '--batch-size', str(batch_size)]
    # the process kills itself right after its first committed transaction (a named fault point of the
    # cache): one entry at batch 1, the group of the two 16x16 images at batch 3
    result = run_cli(args, cwd=REPO, env_extra={'DTKD_FAULT_INJECT': 'teacher_cache.committed@1'})
    assert result.returncode == -signal.SIGKILL, result.stderr
    entries = lmdb_entries(out)
    assert list(entries) == first_group, 'the run was not killed after its first transaction'
    # not complete: meta_info.txt is written only at the end
    assert not os.path.exists(os.path.join(out, 'meta_info.txt'))

    result = run_cli(args, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert 'already present' in result.stdout
    resumed = lmdb_entries(out)
    assert resumed.keys() == {'img0', 'img1', 'img2'}
    assert {k: resumed[k] for k in first_group} == entries  # the committed group is kept as it was
    if batch_size == 1:
        assert resumed == {k: open(os.path.join(reference, f'{k}.png'), 'rb').read() for k in resumed}
    else:
        assert_batched_equals_reference(resumed, reference)
    assert read_meta_info(out)['img2'] == (48, 80, 3)


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_under_torchrun_equal_one(teacher_opt, data, reference, tmp_path):
    root, _ = data
    out = str(tmp_path / 'sharded')
    result = run_cli(['-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={_free_port()}', SCRIPT,
                      '-opt', teacher_opt, '--input', str(root / 'lq'), '--gt', str(root / 'gt'),
                      '--filename-tmpl', '{}x4', '--output', out, '--seed', '7', '--no-progress',
                      '--batch-size', '2'], cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    # rank 0 takes img0 (16x16) and img2 (12x20), rank 1 img1: every group holds one image (sizes
    # differ), so the bytes are those of the batch-1 run
    assert folder_entries(out) == folder_entries(reference)


def test_clear_errors_before_work(teacher_opt, data, tmp_path):
    root, _ = data
    with pytest.raises(FileNotFoundError, match='nowhere'):
        generate_teacher_outputs(teacher_opt, str(tmp_path / 'nowhere'), str(tmp_path / 'o'), progress=False)
    with pytest.raises(OptionError, match=r"img0 \(for GT img0\)"):
        generate_teacher_outputs(teacher_opt, str(root / 'lq'), str(tmp_path / 'o'), gt_path=str(root / 'gt'),
                                 progress=False)
    bad = tmp_path / 'bad_lq'
    bad.mkdir()
    (bad / 'broken.png').write_bytes(b'not an image')
    with pytest.raises(OptionError, match='broken.png'):
        generate_teacher_outputs(teacher_opt, str(bad), str(tmp_path / 'o'), progress=False)
    # GT that is not 4x the LQ
    small_gt = tmp_path / 'small_gt'
    write_rgb(str(small_gt / 'img0.png'), np.zeros((60, 64, 3), np.uint8))
    with pytest.raises(OptionError, match=r'img0 \(GT 60x64, LQ 16x16\)'):
        generate_teacher_outputs(teacher_opt, str(root / 'lq'), str(tmp_path / 'o'), gt_path=str(small_gt),
                                 filename_tmpl='{}x4', progress=False)
    # missing checkpoint, named with its option key
    with open(teacher_opt) as f:
        opt = yaml.safe_load(f)
    broken = copy.deepcopy(opt)
    broken['unet']['ckpt'] = str(tmp_path / 'missing.pth')
    with pytest.raises(FileNotFoundError, match='unet.ckpt'):
        generate_teacher_outputs(broken, str(root / 'lq'), str(tmp_path / 'o'), progress=False)
    # a foreign folder is not resumed into
    foreign = tmp_path / 'foreign'
    foreign.mkdir()
    (foreign / 'x.png').write_bytes(b'')
    with pytest.raises(OptionError, match='teacher_cache.json'):
        generate_teacher_outputs(teacher_opt, str(root / 'lq'), str(foreign), filename_tmpl='{}x4', progress=False)
    assert not any(p.name.startswith('o') for p in tmp_path.iterdir())



def test_cli_prints_one_line_errors(teacher_opt, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location('_generate_teacher_outputs', SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(['-opt', teacher_opt, '--input', str(tmp_path / 'nowhere'), '--output',
                        str(tmp_path / 'o'), '--no-progress']) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: --input') and 'nowhere' in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------- K samples
def expected_sample(teacher, lq_bgr, key, seed, k):
    """Sample k >= 1 of ``key``, independently: the hashlib seed of f'{seed}:{key}/sample{k}'."""
    return expected_sr(teacher, lq_bgr, f'{key}/sample{k}', seed) if k else expected_sr(teacher, lq_bgr, key, seed)


@pytest.fixture(scope='module')
def three_samples(teacher_opt, data, tmp_path_factory):
    """An uninterrupted K = 3 run into a folder, seed 7 (the reference's settings)."""
    root, _ = data
    out = str(tmp_path_factory.mktemp('samples') / 'teacher')
    stats = generate_teacher_outputs(teacher_opt, str(root / 'lq'), out, gt_path=str(root / 'gt'),
                                     filename_tmpl='{}x4', seed=7, progress=False, samples=3)
    assert stats['written'] == 9 and stats['samples'] == 3
    return out


def test_sample_0_is_the_single_sample_cache_and_the_samples_differ(teacher_opt, data, reference, three_samples):
    from dtkd_teacher.teacher import ResShiftTeacher

    root, lqs = data
    assert folder_entries(three_samples) == folder_entries(reference)  # byte for byte
    assert sorted(os.listdir(three_samples)) == ['img0.png', 'img1.png', 'img2.png', 'sample1', 'sample2',
                                                 'teacher_cache.json']
    teacher = ResShiftTeacher.from_options(teacher_opt)
    for k in (1, 2):
        store = os.path.join(three_samples, f'sample{k}')
        record = yaml.safe_load(open(os.path.join(store, 'teacher_cache.json')))
        assert record['sample'] == k and record['seed'] == 7
        stored = cv2.imread(os.path.join(store, 'img1.png'), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(stored, expected_sample(teacher, lqs['img1'], 'img1', 7, k))
    images = [cv2.imread(os.path.join(three_samples, *([f'sample{k}'] if k else []), 'img0.png')).astype(int)
              for k in range(3)]
    for a in range(3):
        for b in range(a + 1, 3):
            assert np.abs(images[a] - images[b]).mean() > 0.5, (a, b)  # different draws, not rounding
    # the single-sample record is unchanged: a K = 1 cache extends to K samples
    assert open(os.path.join(three_samples, 'teacher_cache.json')).read() == \
        open(os.path.join(reference, 'teacher_cache.json')).read()


def test_a_single_sample_cache_grows_and_an_interrupted_run_resumes(teacher_opt, data, reference, three_samples,
                                                                    tmp_path):
    import shutil

    root, _ = data
    out = str(tmp_path / 'teacher')
    shutil.copytree(reference, out)  # a K = 1 cache made before
    args = dict(gt_path=str(root / 'gt'), filename_tmpl='{}x4', seed=7, progress=False, samples=3)
    first = generate_teacher_outputs(teacher_opt, str(root / 'lq'), out, limit=4, **args)  # then "killed"
    assert first['written'] == 4 and first['skipped'] == 3
    second = generate_teacher_outputs(teacher_opt, str(root / 'lq'), out, **args)
    assert second['written'] == 2 and second['skipped'] == 7
    for k in range(3):
        sub = [f'sample{k}'] if k else []
        assert folder_entries(os.path.join(out, *sub)) == folder_entries(os.path.join(three_samples, *sub))


def test_sharded_samples_equal_one_process(teacher_opt, data, three_samples, tmp_path):
    import threading

    root, _ = data
    out = str(tmp_path / 'sharded')
    barrier = threading.Barrier(2)
    errors = []

    def shard(rank):
        try:
            generate_teacher_outputs(teacher_opt, str(root / 'lq'), out, gt_path=str(root / 'gt'),
                                     filename_tmpl='{}x4', seed=7, progress=False, samples=3, rank=rank,
                                     world_size=2, barrier=lambda: barrier.wait(timeout=120))
        except Exception as err:  # noqa: BLE001  (reported below)
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=shard, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for k in range(3):
        sub = [f'sample{k}'] if k else []
        assert folder_entries(os.path.join(out, *sub)) == folder_entries(os.path.join(three_samples, *sub))


def test_lmdb_samples_feed_the_dataset_with_one_crop(teacher_opt, data, tmp_path):
    root, _ = data
    out = str(tmp_path / 'teacher.lmdb')
    generate_teacher_outputs(teacher_opt, str(root / 'lq.lmdb'), out, gt_path=str(root / 'gt.lmdb'), seed=7,
                             progress=False, samples=2, batch_size=2)
    assert sorted(read_meta_info(os.path.join(out, 'sample1.lmdb'))) == ['img0', 'img1', 'img2']
    opt = {'phase': 'train', 'scale': 4, 'io_backend': {'type': 'lmdb'}, 'gt_size': 32, 'use_hflip': True,
           'use_rot': True, 'dataroot_gt': str(root / 'gt.lmdb'), 'dataroot_lq': str(root / 'lq.lmdb'),
           'dataroot_teacher': out, 'teacher_samples': 2}
    stored = {k: cv2.imdecode(np.frombuffer(v, np.uint8), cv2.IMREAD_COLOR)
              for k, v in lmdb_entries(os.path.join(out, 'sample1.lmdb')).items()}
    teacher_full = cv2.imdecode(np.frombuffer(lmdb_entries(out)['img0'], np.uint8), cv2.IMREAD_COLOR)
    ds = PairedTeacherDataset(opt)  # its reader keeps the LMDBs open from here on
    np.random.seed(3)
    item = ds[0]
    assert item['teacher_samples'].shape == (2, 3, 32, 32)
    torch.testing.assert_close(item['teacher_samples'][0], item['teacher'], atol=0, rtol=0)
    # sample 1's patch is a window of the stored sample 1 under the same crop and flip/rotation as the
    # teacher's: find the teacher patch in the stored teacher image by the same transform
    patch_t = (item['teacher'].numpy().transpose(1, 2, 0)[..., ::-1] * 255).round().astype(np.uint8)
    patch_s = (item['teacher_samples'][1].numpy().transpose(1, 2, 0)[..., ::-1] * 255).round().astype(np.uint8)
    found = False
    for flip in (None, 0, 1, -1):
        for rot in range(4):
            t_img, s_img = teacher_full, stored['img0']
            if flip is not None:
                t_img, s_img = cv2.flip(t_img, flip), cv2.flip(s_img, flip)
            t_img, s_img = np.rot90(t_img, rot), np.rot90(s_img, rot)
            h, w = t_img.shape[:2]
            for y in range(0, h - 31, 4):
                for x in range(0, w - 31, 4):
                    if np.array_equal(t_img[y:y + 32, x:x + 32], patch_t):
                        found = found or np.array_equal(s_img[y:y + 32, x:x + 32], patch_s)
    assert found


def test_missing_samples_and_foreign_sample_stores_are_refused(teacher_opt, data, tmp_path):
    root, _ = data
    out = str(tmp_path / 'teacher.lmdb')
    generate_teacher_outputs(teacher_opt, str(root / 'lq.lmdb'), out, gt_path=str(root / 'gt.lmdb'), seed=7,
                             progress=False, samples=2)
    opt = {'phase': 'train', 'scale': 4, 'io_backend': {'type': 'lmdb'}, 'gt_size': 32,
           'dataroot_gt': str(root / 'gt.lmdb'), 'dataroot_lq': str(root / 'lq.lmdb'),
           'dataroot_teacher': out, 'teacher_samples': 3}
    with pytest.raises(OptionError, match=r'datasets\.train\.teacher_samples=3.*sample 2.*sample2\.lmdb.*--samples 3'):
        PairedTeacherDataset(opt)
    with pytest.raises(OptionError, match=r'teacher_samples: expected an integer >= 2'):
        PairedTeacherDataset(dict(opt, teacher_samples=1))
    with pytest.raises(OptionError, match='--samples'):
        generate_teacher_outputs(teacher_opt, str(root / 'lq.lmdb'), out, seed=7, samples=0)
    # a sample store whose record says it is another sample (or made with other settings) is refused
    record = os.path.join(out, 'sample1.lmdb', 'teacher_cache.json')
    rec = json.load(open(record))
    rec['sample'] = 2
    open(record, 'w').write(json.dumps(rec))
    with pytest.raises(OptionError, match=r'sample1\.lmdb was made with other settings \(differing: sample'):
        generate_teacher_outputs(teacher_opt, str(root / 'lq.lmdb'), out, gt_path=str(root / 'gt.lmdb'), seed=7,
                                 progress=False, samples=2)
