"""The paper's path, rehearsed: every command of docs/paper_path.md, taken from the docs and run as written.

docs/paper_path.md lists the steps in order (``| `step` | what | [page](link) |``); each step's commands
are the fenced ``bash`` block preceded by ``<!-- paper-path: <step> -->`` in that page. The rehearsal
builds a small DIV2K / RealSR / ImageNet-Test tree of real photographs (``skimage.data``) under the
documented names, in a temporary folder laid out like the repository root, and runs every block there
with ``bash`` after the substitutions below, and nothing else. The commands run with this test's
virtual environment first on ``PATH`` (so ``python``, ``dtkd-train``, ``dtkd-test`` and
``dtkd-infer`` are the project's) and ``OMP_NUM_THREADS=1``.

Substitutions (the only differences between the docs and what runs):

step           documented                              rehearsed                                why
-------------  --------------------------------------  ---------------------------------------  ----------------------
(layout)       the repository root                     a temporary folder with links scripts,   data and outputs stay
                                                       options, weights to the repository's     out of the checkout
teacher-cache  options/teacher/resshift_realsr_x4.yml  options/demo/resshift_demo_x4.yml        the official weights
teacher-sr                                                                                      are not committed
div2k          --crop-size 480 --step 240              --crop-size 96 --step 96                 192-pixel photographs
seeds          for seed in 1 2;                        for seed in 1;                           two seeds, not three
seeds          ' results/DTKD_test_RealSR_x4_seed2'    (removed)                                idem
figures        --box 200,120,64,64                     --box 40,40,48,48                        128-pixel test images
infer          photos/                                 datasets/ImageNet-Test/lq/               your photographs
(every         dtkd-train ...                          dtkd-train ... --force_yml TRAIN_FORCE   short CPU runs: only
dtkd-train)                                            (train:total_iter=8 with --auto_resume)  lengths, sizes, device
(every         dtkd-test ...                           dtkd-test ... --force_yml num_gpu=0,     the CPU; the LPIPS and
dtkd-test)                                             with options/test/ files also            MUSIQ weights are not
                                                       NO_METRIC_WEIGHTS (evaluation.md's way)  installed

Every substitution must find its text, so a change of the docs cannot silently bypass it. A quick
test (not slow) checks the docs' structure: every step of the table has exactly one marked block,
every marked block is a step, and every substitution applies.
"""
import json
import os
import re
import subprocess
import sys
import time

import cv2
import pytest
import yaml

from conftest import bicubic_down, photo, train_options, write_rgb, write_yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INDEX = os.path.join(REPO, 'docs', 'paper_path.md')
DOC_PAGES = ('README.md', 'datasets/README.md', 'docs')  # where marked blocks may live (docs: every page)
LINKED = ('scripts', 'options', 'weights')  # what the commands name from the repository root

_ROW = re.compile(r'^\|\s*`([a-z0-9-]+)`\s*\|[^|]*\|\s*\[[^\]]*\]\(([^)#\s]+)(?:#([^)\s]*))?\)\s*\|\s*$', re.M)
_BLOCK = re.compile(r'^<!--\s*paper-path:\s*([a-z0-9-]+)\s*-->\s*\n```bash\n(.*?)\n```', re.M | re.S)
_MARKER = re.compile(r'^<!--\s*paper-path:\s*([^>]*?)\s*-->', re.M)

DEMO_TEACHER = 'options/demo/resshift_demo_x4.yml'
# (step, documented text, rehearsed text): see the module docstring for the reasons.
SUBSTITUTIONS = [
    ('teacher-cache', 'options/teacher/resshift_realsr_x4.yml', DEMO_TEACHER),
    ('teacher-sr', 'options/teacher/resshift_realsr_x4.yml', DEMO_TEACHER),
    ('div2k', '--crop-size 480 --step 240', '--crop-size 96 --step 96'),
    ('seeds', 'for seed in 1 2;', 'for seed in 1;'),
    ('seeds', ' results/DTKD_test_RealSR_x4_seed2', ''),
    ('figures', '--box 200,120,64,64', '--box 40,40,48,48'),
    ('infer', 'photos/', 'datasets/ImageNet-Test/lq/'),
]
ITERS, RESUMED_ITERS = 4, 8
TRAIN_FORCE = [  # appended to every dtkd-train: lengths, sizes and the device, nothing else
    'num_gpu=0', f'train:total_iter={ITERS}', 'datasets:train:gt_size=64', 'datasets:train:batch_size_per_gpu=2',
    'datasets:train:num_worker_per_gpu=0', f'val:val_freq={ITERS}', f'logger:save_checkpoint_freq={ITERS}',
    'logger:print_freq=2',
]
TEST_FORCE = ['num_gpu=0']
NO_METRIC_WEIGHTS = ['val:metrics:lpips:optional=true', 'val:metrics:musiq:optional=true']

DTKD = 'DTKD_SwinIRs_x4_DWT_L2_121_lin2'
KD_L1 = 'DTKD_SwinIRs_x4_KD_L1_lin2'


# ------------------------------------------------------------------------------------------- the docs
def index_steps():
    """[(step, page path, anchor)] in the order of docs/paper_path.md's table."""
    with open(INDEX, encoding='utf-8') as f:
        rows = _ROW.findall(f.read())
    return [(step, os.path.normpath(os.path.join(os.path.dirname(INDEX), link)), anchor) for step, link, anchor in rows]


def doc_pages():
    pages = []
    for entry in DOC_PAGES:
        path = os.path.join(REPO, entry)
        if os.path.isdir(path):
            pages += sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith('.md'))
        else:
            pages.append(path)
    return pages


def marked_blocks(page):
    """[(step, block text)] of a page, in page order."""
    with open(page, encoding='utf-8') as f:
        return _BLOCK.findall(f.read())


def slug(heading):
    """GitHub's anchor of a heading."""
    return re.sub(r'[^\w\- ]', '', heading.strip().lower()).replace(' ', '-')


def logical_lines(text):
    """Lines with backslash continuations joined."""
    return text.replace('\\\n', ' ').split('\n')


def strip_comment(line):
    return re.sub(r'\s+#\s.*$', '', line)


def with_force(line, entries):
    """``line`` (a command, maybe a trailing comment) with ``--force_yml <entries>`` appended."""
    return f'{strip_comment(line).rstrip()} --force_yml {" ".join(entries)}'


def rehearsed(step, text):
    """The block as the rehearsal runs it: the substitutions of the table, force entries appended."""
    for where, old, new in SUBSTITUTIONS:
        if where == step:
            assert old in text, f'paper-path step {step}: the documented text {old!r} is gone; update SUBSTITUTIONS'
            text = text.replace(old, new)
    lines = []
    for line in logical_lines(text):
        command = line.strip()
        if command.startswith('dtkd-train '):
            iters = RESUMED_ITERS if '--auto_resume' in command else ITERS
            line = with_force(line, [e if not e.startswith('train:total_iter=') else f'train:total_iter={iters}'
                                     for e in TRAIN_FORCE])
        elif command.startswith('dtkd-test '):
            opt = command.split('-opt', 1)[1].split()[0]
            line = with_force(line, TEST_FORCE + (NO_METRIC_WEIGHTS if opt.startswith('options/test/') else []))
        lines.append(line)
    return '\n'.join(lines)


def test_paper_path_docs_are_consistent():
    """Quick: the table names each step once, each step has one marked block in its page, every marked
    block is a step, the table's anchors exist, and every substitution applies."""
    steps = index_steps()
    names = [s for s, _, _ in steps]
    assert len(names) >= 10 and len(set(names)) == len(names), names
    found = {}
    for page in doc_pages():
        with open(page, encoding='utf-8') as f:
            text = f.read()
        markers = _MARKER.findall(text)
        blocks = marked_blocks(page)
        assert len(markers) == len(blocks), f'{page}: a paper-path marker not directly followed by a ```bash block'
        for step, _ in blocks:
            assert step not in found, f'paper-path step {step} marked twice ({found[step]} and {page})'
            found[step] = page
    assert sorted(found) == sorted(names), f'marked blocks {sorted(found)} != steps of docs/paper_path.md {names}'
    for step, page, anchor in steps:
        assert found[step] == page, f'step {step}: the table links {page}, the block is in {found[step]}'
        with open(page, encoding='utf-8') as f:
            headings = {slug(h) for h in re.findall(r'^#+ (.*)$', f.read(), re.M)}
        assert not anchor or anchor in headings, f'step {step}: no heading #{anchor} in {page}'
    blocks = {step: text for page in set(found.values()) for step, text in marked_blocks(page)}
    for step in names:
        rehearsed(step, blocks[step])  # asserts that each substitution finds its text


def test_repeated_force_yml_flags_add_up(tiny_pairs, tmp_path):
    """Quick: a second --force_yml adds its entries (the missing-weights hint says to add one to the command;
    argparse's default would silently drop the first flag's overrides, e.g. the checkpoint to test)."""
    from dtkd.launch import parse_options

    yml = write_yaml(tmp_path / 'twice.yml', train_options(tiny_pairs, 'twice'))
    opt, _ = parse_options(str(tmp_path), is_train=True, argv=['-opt', yml, '--force_yml', 'name=first',
                                                               'train:total_iter=3', '--force_yml',
                                                               'val:metrics:psnr:optional=true'])
    assert opt['name'] == 'first' and opt['train']['total_iter'] == 3
    assert opt['val']['metrics']['psnr']['optional'] is True


# -------------------------------------------------------------------------------------- the data tree
def fit(name, height, width):
    """A photograph centre-cropped to the aspect height:width and resized (area) to that size."""
    img = photo(name)
    h, w = img.shape[:2]
    if h * width > w * height:
        ch, cw = w * height // width, w
    else:
        ch, cw = h, h * width // height
    y, x = (h - ch) // 2, (w - cw) // 2
    return cv2.resize(img[y:y + ch, x:x + cw], (width, height), interpolation=cv2.INTER_AREA)


def build_tree(work):
    """The downloads, small: DIV2K HR + bicubic LR, RealSR V3 (Canon, Nikon), ImageNet-Test gt/lq."""
    d = os.path.join(work, 'datasets')
    for i, (name, h, w) in enumerate((('astronaut', 192, 192), ('rocket', 144, 192), ('coffee', 192, 144)), 1):
        hr = fit(name, h, w)
        write_rgb(f'{d}/DIV2K/DIV2K_train_HR/{i:04d}.png', hr)
        write_rgb(f'{d}/DIV2K/DIV2K_train_LR_bicubic/X4/{i:04d}x4.png', bicubic_down(hr, 4))
    for cam, names in (('Canon', ('chelsea', 'hubble_deep_field')), ('Nikon', ('camera', 'coins'))):
        for i, name in enumerate(names, 1):
            hr = fit(name, 130, 129) if i == 2 else fit(name, 128, 128)  # Canon/Nikon_002: not exactly 4x
            write_rgb(f'{d}/RealSR/{cam}/Test/4/{cam}_{i:03d}_HR.png', hr)
            write_rgb(f'{d}/RealSR/{cam}/Test/4/{cam}_{i:03d}_LR4.png', bicubic_down(hr[:128, :128], 4))
    for name in ('immunohistochemistry', 'gravel'):
        hr = fit(name, 128, 128)
        write_rgb(f'{d}/ImageNet-Test/gt/{name}.png', hr)
        write_rgb(f'{d}/ImageNet-Test/lq/{name}.png', bicubic_down(hr, 4))
    for name in LINKED:
        os.symlink(os.path.join(REPO, name), os.path.join(work, name))


# ----------------------------------------------------------------------------------------- the checks
def meta(work, lmdb):
    from dtkd_data.lmdb_tools import read_meta_info

    return read_meta_info(os.path.join(work, 'datasets', lmdb))


def saved_options(work, name, file_name):
    with open(os.path.join(work, 'experiments', name, file_name), encoding='utf-8') as f:
        return yaml.safe_load(f)


def summary(work, run):
    with open(os.path.join(work, 'results', run, 'summary.json'), encoding='utf-8') as f:
        return json.load(f)['results']


def image_shape(path):
    img = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    assert img is not None, f'{path} is missing or unreadable'
    return img.shape


def check_div2k(work, out):
    gt, lq = meta(work, 'DIV2K/DIV2K_train_HR_sub.lmdb'), meta(work, 'DIV2K/DIV2K_train_LR_bicubic_X4_sub.lmdb')
    assert list(gt) == list(lq) == [f'{i:04d}_s{j:03d}' for i in (1, 2, 3) for j in (1, 2, 3, 4)]
    assert set(gt.values()) == {(96, 96, 3)} and set(lq.values()) == {(24, 24, 3)}


def check_realsr(work, out):
    for cam in ('Canon', 'Nikon'):
        gt, lq = meta(work, f'RealSR/{cam}_x4_test_gt.lmdb'), meta(work, f'RealSR/{cam}_x4_test_lq.lmdb')
        assert list(gt) == list(lq) == [f'{cam}_001', f'{cam}_002']
        assert set(gt.values()) == {(128, 128, 3)} and set(lq.values()) == {(32, 32, 3)}  # 130x129 cropped


def check_imagenet_test(work, out):
    assert list(meta(work, 'ImageNet-Test/gt.lmdb')) == ['gravel', 'immunohistochemistry']
    assert set(meta(work, 'ImageNet-Test/lq.lmdb').values()) == {(32, 32, 3)}


def check_teacher_cache(work, out):
    assert meta(work, 'DIV2K/DIV2K_train_ResShift_X4_sub.lmdb') == meta(work, 'DIV2K/DIV2K_train_HR_sub.lmdb')


def check_train(work, out):
    from dtkd.launch import apply_force_yml
    from dtkd_utils.options import load_yaml

    for name, source in ((DTKD, 'options/train_dtkd.yml'), (KD_L1, 'options/ablation/train_kd_l1.yml')):
        assert os.path.isfile(os.path.join(work, 'experiments', name, 'models', f'net_g_{ITERS}.pth'))
        expected = load_yaml(os.path.join(REPO, source))
        apply_force_yml(expected, TRAIN_FORCE)
        # the saved option file is the effective one: the paper's file with only the overrides applied
        assert saved_options(work, name, os.path.basename(source)) == expected


def check_resume(work, out):
    assert re.search(rf'Resuming training from epoch: \d+, iter: {ITERS}\b', out), out[-3000:]
    assert os.path.isfile(os.path.join(work, 'experiments', DTKD, 'models', f'net_g_{RESUMED_ITERS}.pth'))
    assert saved_options(work, DTKD, 'train_dtkd.yml')['train']['total_iter'] == RESUMED_ITERS


def check_test(work, out):
    dtkd, kd_l1, saved = summary(work, 'DTKD_test_RealSR_x4'), summary(work, 'DTKD_test_RealSR_x4_KD_L1'), \
        summary(work, DTKD)
    for result in (dtkd, kd_l1):
        assert sorted(result) == ['RealSR_Canon', 'RealSR_Nikon']
        assert all(sorted(metrics) == ['psnr', 'ssim'] for metrics in result.values()), result  # LPIPS/MUSIQ skipped
    assert 'lpips' in out and 'musiq' in out  # the warnings naming the skipped metrics
    assert sorted(saved) == ['RealSR_Canon']  # the training file's validation set
    # the saved options test the run's latest checkpoint, the one the test file loads by default
    assert saved['RealSR_Canon']['psnr'] == pytest.approx(dtkd['RealSR_Canon']['psnr'], abs=1e-6)
    assert dtkd['RealSR_Canon']['psnr'] != pytest.approx(kd_l1['RealSR_Canon']['psnr'], abs=1e-6)
    for run, cam in (('DTKD_test_RealSR_x4', 'Canon'), ('DTKD_test_RealSR_x4_KD_L1', 'Nikon')):
        sr = os.path.join(work, 'results', run, 'visualization', f'RealSR_{cam}', f'{cam}_002_{run}.png')
        assert image_shape(sr) == (128, 128, 3)


def check_seeds(work, out):
    with open(os.path.join(work, 'results', 'aggregate', 'aggregate.json'), encoding='utf-8') as f:
        aggregate = json.load(f)
    psnr = aggregate['results']['RealSR_Canon']['psnr']
    assert psnr['n'] == 2 and psnr['std'] > 0, psnr  # two different seeds
    with open(os.path.join(work, 'results', 'aggregate', 'aggregate.md'), encoding='utf-8') as f:
        assert '| RealSR_Nikon | Student | DWT |' in f.read()  # the labels the test runs recorded


def check_teacher_sr(work, out):
    for key in ('Canon_001', 'Canon_002'):
        assert image_shape(os.path.join(work, 'results', 'teacher_RealSR_Canon', f'{key}.png')) == (128, 128, 3)


def check_figures(work, out):
    with open(os.path.join(work, 'figures', 'band_discrepancy.json'), encoding='utf-8') as f:
        band = json.load(f)
    assert band['images'] == ['Canon_001', 'Canon_002'] and sorted(band['mean']) == ['DWT KD', 'L1 KD']
    for png in ('band_discrepancy.png', 'qualitative_grid.png'):
        assert len(image_shape(os.path.join(work, 'figures', png))) == 3


def check_infer(work, out):
    for name in ('gravel', 'immunohistochemistry'):
        assert image_shape(os.path.join(work, 'results', 'photos_x4', f'{name}_x4.png')) == (128, 128, 3)


def check_onnx(work, out):
    assert os.path.getsize(os.path.join(work, 'student_x4.onnx')) > 1 << 20
    assert 'max abs difference' in out


CHECKS = {
    'div2k': check_div2k, 'realsr': check_realsr, 'imagenet-test': check_imagenet_test,
    'teacher-cache': check_teacher_cache, 'train': check_train, 'resume': check_resume, 'test': check_test,
    'seeds': check_seeds, 'teacher-sr': check_teacher_sr, 'figures': check_figures, 'infer': check_infer,
    'onnx': check_onnx,
}


# ------------------------------------------------------------------------------------------ rehearsal
@pytest.mark.slow
def test_paper_path(tmp_path):
    work = str(tmp_path / 'root')
    os.makedirs(work)
    build_tree(work)
    env = dict(os.environ)
    env['PATH'] = os.path.dirname(sys.executable) + os.pathsep + env.get('PATH', '')
    env['OMP_NUM_THREADS'] = '1'
    env.pop('PYTHONPATH', None)  # as a user's shell: the installed project, nothing borrowed from pytest
    blocks = {}
    for page in doc_pages():
        blocks.update(marked_blocks(page))
    timings = []
    for step, _, _ in index_steps():
        script = rehearsed(step, blocks[step])
        start = time.time()
        proc = subprocess.run(['bash', '-c', 'set -euo pipefail\n' + script], cwd=work, env=env,
                              capture_output=True, text=True, timeout=600)
        timings.append(f'{step} {time.time() - start:.0f}s')
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, (f'paper-path step {step} failed (exit {proc.returncode}); it ran:\n{script}\n'
                                      f'--- output (end) ---\n{out[-6000:]}')
        if step in CHECKS:
            CHECKS[step](work, out)
    print('paper path:', ', '.join(timings))
