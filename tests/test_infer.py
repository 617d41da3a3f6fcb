"""``dtkd-infer`` on real photographs (skimage.data) of every kind: colour JPEG, grayscale scan, RGBA,
16-bit, EXIF-rotated; tiles against whole images; skip / overwrite; unreadable files; option errors.

Image handling is checked exactly with a tiny student whose weights make it a known function: the
first convolution copies the RGB channels into the first features, the body's output convolution is
zero and the up-sampling convolution copies each channel to its 16 sub-pixels, so the network (its
transformer blocks still run) is exactly nearest-neighbour x4 up-scaling.
"""
import os
import re
import sys

import cv2
import numpy as np
import pytest
import skimage.data
import torch

from conftest import TINY_STUDENT, photo, tiny_teacher_options, write_yaml
from dtkd import infer
from dtkd_arch.swinir_student_arch import SwinIRStudent

pytestmark = pytest.mark.usefixtures('one_thread_module')


def tiny_params():
    return {k: v for k, v in TINY_STUDENT.items() if k != 'type'}


def nearest_weights(seed=0):
    """TINY_STUDENT weights (random transformer) that make the network nearest-neighbour x4."""
    torch.manual_seed(seed)
    sd = SwinIRStudent(**tiny_params()).state_dict()
    sd['conv_first.weight'].zero_()
    sd['conv_first.bias'].zero_()
    for c in range(3):
        sd['conv_first.weight'][c, c, 1, 1] = 1
        sd['upsample.0.weight'][c * 16:(c + 1) * 16] = 0
        sd['upsample.0.weight'][c * 16:(c + 1) * 16, c, 1, 1] = 1
    sd['upsample.0.weight'][48:] = 0
    sd['upsample.0.bias'].zero_()
    sd['conv_after_body.weight'].zero_()
    sd['conv_after_body.bias'].zero_()
    return sd


@pytest.fixture(scope='module')
def student(tmp_path_factory):
    """-opt file (network_g = TINY_STUDENT as SwinIRStudent) and checkpoints: 'nearest' has random
    'params' and the nearest-neighbour weights as 'params_ema'; 'random' is a plain random student."""
    root = tmp_path_factory.mktemp('student')
    torch.manual_seed(1)
    random_sd = SwinIRStudent(**tiny_params()).state_dict()
    torch.save({'params': random_sd, 'params_ema': nearest_weights()}, root / 'nearest.pth')
    torch.save({'params': random_sd}, root / 'random.pth')
    opt = write_yaml(root / 'student.yml', {'name': 'tiny', 'network_g': dict(TINY_STUDENT, type='SwinIRStudent')})
    return {'opt': opt, 'nearest': str(root / 'nearest.pth'), 'random': str(root / 'random.pth'), 'root': root,
            'random_sd': random_sd}


def run(argv, capsys):
    """Call the CLI in this process; returns (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as exc:
        infer.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def up(img):
    return np.repeat(np.repeat(img, 4, axis=0), 4, axis=1)


@pytest.fixture(scope='module')
def photos(tmp_path_factory):
    """One image of every kind, cut small from skimage.data photographs."""
    root = tmp_path_factory.mktemp('photos')
    imgs = {
        'phone.jpg': cv2.cvtColor(photo('chelsea')[100:140, 150:206], cv2.COLOR_RGB2BGR),  # colour JPEG
        'scan.png': skimage.data.page()[60:96, 100:150],  # grayscale scan, 2-D
        'icon.png': cv2.cvtColor(skimage.data.logo()[180:220, 160:204], cv2.COLOR_RGBA2BGRA),
        'deep.png': cv2.cvtColor(photo('astronaut')[200:236, 220:260], cv2.COLOR_RGB2BGR).astype(np.uint16) * 257
        + np.arange(40, dtype=np.uint16)[None, :, None],  # 16-bit with values 8 bits cannot hold
        'gray16.tif': (skimage.data.camera()[100:130, 200:230].astype(np.uint16) * 256 + 77),
    }
    for name, img in imgs.items():
        assert cv2.imwrite(str(root / name), img)
    return root, imgs


def test_every_kind_of_image_keeps_its_kind(student, photos, tmp_path, capsys):
    root, imgs = photos
    code, out, err = run(['-i', root, '-o', tmp_path, '-opt', student['opt'], '--model', student['nearest']], capsys)
    assert code == 0, err
    assert 'dtkd-infer: 5 done, ' in out and 'skipped' not in out and 'failed' not in out
    for name, img in imgs.items():
        stem, ext = os.path.splitext(name)
        res = cv2.imread(str(tmp_path / f'{stem}_x4{ext}'), cv2.IMREAD_UNCHANGED)
        assert res is not None, name
        assert res.dtype == img.dtype and res.ndim == img.ndim, name
        assert res.shape == up(img).shape, name
        if ext == '.jpg':  # lossy on both sides: nearest up-scaling of the decoded input, re-encoded
            decoded = cv2.imread(str(root / name), cv2.IMREAD_UNCHANGED)
            assert np.abs(res.astype(float) - up(decoded)).mean() < 3
        else:  # params_ema (nearest) was loaded, not params (random): exact up to one quantisation step
            assert np.abs(res.astype(np.int64) - up(img)).max() <= 1, name
    assert not [f for f in os.listdir(tmp_path) if f.startswith('.')]  # no temporary files left


def test_alpha_bicubic_and_jpg_falls_back_to_png(student, photos, tmp_path, capsys):
    root, imgs = photos
    code, out, err = run(['-i', root / 'icon.png', '-o', tmp_path, '-opt', student['opt'], '--model',
                          student['nearest'], '--alpha', 'bicubic', '--ext', 'jpg', '--suffix', ''], capsys)
    assert code == 0, err
    assert 'written as PNG' in err
    res = cv2.imread(str(tmp_path / 'icon.png'), cv2.IMREAD_UNCHANGED)
    a = imgs['icon.png'][..., 3].astype(np.float32) / 255
    expected = np.rint(cv2.resize(a, (a.shape[1] * 4, a.shape[0] * 4), interpolation=cv2.INTER_CUBIC).clip(0, 1) * 255)
    assert np.abs(res[..., 3].astype(float) - expected).max() <= 1
    assert np.abs(res[..., :3].astype(int) - up(imgs['icon.png'][..., :3])).max() <= 1


def test_exif_orientation_is_applied(student, tmp_path, capsys):
    from PIL import Image

    img = photo('coffee')[100:124, 200:240]  # 24 x 40
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    (tmp_path / 'in').mkdir()
    Image.fromarray(img).save(tmp_path / 'in' / 'rot.jpg', exif=exif.tobytes(), quality=95)
    code, _, err = run(['-i', tmp_path / 'in', '-o', tmp_path / 'out', '-opt', student['opt'], '--model',
                        student['nearest']], capsys)
    assert code == 0, err
    assert cv2.imread(str(tmp_path / 'out' / 'rot_x4.jpg')).shape == (160, 96, 3)


def test_model_alone_is_the_paper_student_and_matches_pytorch(tmp_path, capsys):
    torch.manual_seed(3)
    net = SwinIRStudent(**{k: v for k, v in infer.PAPER_STUDENT.items() if k != 'type'}).eval()
    torch.save({'params': net.state_dict()}, tmp_path / 'paper.pth')
    img = photo('rocket')[200:219, 300:323]  # 19 x 23: padded to the window inside
    cv2.imwrite(str(tmp_path / 'r.png'), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    code, _, err = run(['-i', tmp_path / 'r.png', '-o', tmp_path / 'o', '--model', tmp_path / 'paper.pth'], capsys)
    assert code == 0, err
    with torch.no_grad():
        ref = net(torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255)[0].clamp(0, 1)
    ref = np.rint(ref.permute(1, 2, 0).numpy() * 255)
    res = cv2.cvtColor(cv2.imread(str(tmp_path / 'o' / 'r_x4.png')), cv2.COLOR_BGR2RGB)
    assert np.abs(res - ref).max() <= 1


def test_tiles_match_the_whole_image(student, tmp_path, capsys):
    """A random student (attention reaches beyond any tile) on a 96 x 120 photo: 32-pixel tiles with
    16 pixels of context against the whole image. Tolerance: one 8-bit step anywhere, 0.01 on average
    (measured: max 1, mean 1.2e-4); tiles without context are visibly worse."""
    img = cv2.cvtColor(photo('astronaut')[40:136, 180:300], cv2.COLOR_RGB2BGR)
    cv2.imwrite(str(tmp_path / 'a.png'), img)
    outs = {}
    for tag, tile in (('whole', 0), ('tiled', 32)):
        code, _, err = run(['-i', tmp_path / 'a.png', '-o', tmp_path / tag, '-opt', student['opt'], '--model',
                            student['random'], '--tile', tile, '--tile-pad', 16], capsys)
        assert code == 0, err
        outs[tag] = cv2.imread(str(tmp_path / tag / 'a_x4.png')).astype(np.int64)
    diff = np.abs(outs['tiled'] - outs['whole'])
    assert diff.max() <= 1 and diff.mean() < 0.01
    assert np.abs(outs['whole'] - up(img)).mean() > 10  # the random network is far from the identity

    net = SwinIRStudent(**tiny_params()).eval()
    net.load_state_dict(student['random_sd'])
    x = torch.from_numpy(img[..., ::-1].copy()).permute(2, 0, 1)[None].float() / 255
    cpu = torch.device('cpu')
    whole = infer.StudentRunner(net, 4, 8, cpu, tile=0)(x)
    with_context = (infer.StudentRunner(net, 4, 8, cpu, tile=32, tile_pad=16)(x) - whole).abs()
    no_context = (infer.StudentRunner(net, 4, 8, cpu, tile=32, tile_pad=0)(x) - whole).abs()
    assert with_context.max() < 2e-3
    assert no_context.mean() > 10 * with_context.mean()


def test_existing_outputs_are_skipped_unless_overwrite(student, photos, tmp_path, capsys):
    root, _ = photos
    args = ['-i', root, '-o', tmp_path, '-opt', student['opt'], '--model', student['nearest']]
    assert run(args, capsys)[0] == 0
    target = tmp_path / 'scan_x4.png'
    target.write_bytes(b'stale')
    code, out, _ = run(args, capsys)
    assert code == 0 and '0 done, 5 skipped' in out and 'failed' not in out
    assert target.read_bytes() == b'stale'
    code, out, _ = run(args + ['--overwrite'], capsys)
    assert code == 0 and 'dtkd-infer: 5 done, ' in out and 'skipped' not in out
    assert cv2.imread(str(target), cv2.IMREAD_UNCHANGED).shape == (144, 200)


def test_unreadable_images_are_reported_and_the_batch_goes_on(student, tmp_path, capsys):
    (tmp_path / 'in').mkdir()
    cv2.imwrite(str(tmp_path / 'in' / 'a.png'), photo('coffee')[:20, :24])
    (tmp_path / 'in' / 'broken.jpg').write_bytes(b'\xff\xd8 not really a jpeg')
    (tmp_path / 'in' / 'empty.png').write_bytes(b'')
    ok, jpg = cv2.imencode('.jpg', photo('chelsea')[:32, :32])
    (tmp_path / 'in' / 'cut.jpg').write_bytes(jpg.tobytes()[:len(jpg) // 2])  # OpenCV alone fills it with grey
    (tmp_path / 'in' / 'notes.txt').write_text('not an image, ignored')
    code, out, err = run(['-i', tmp_path / 'in', '-o', tmp_path / 'out', '-opt', student['opt'], '--model',
                          student['nearest']], capsys)
    assert code == 1
    assert 'dtkd-infer: 1 done, 3 failed' in out
    # the reader's reason, the file named once per line
    assert f"failed: {tmp_path / 'in' / 'broken.jpg'}: has a damaged JPEG header" in out
    assert f"failed: {tmp_path / 'in' / 'empty.png'}: is empty (0 bytes)" in out
    assert f"failed: {tmp_path / 'in' / 'cut.jpg'}: is truncated" in out
    assert 'notes.txt' not in out + err and '[ERROR' not in err
    assert os.listdir(tmp_path / 'out') == ['a_x4.png']


def test_teacher_runs_instead_of_a_student(tmp_path, capsys):
    from dtkd_teacher.teacher import ResShiftTeacher

    teacher_yml = write_yaml(tmp_path / 'teacher.yml', tiny_teacher_options(tmp_path, seed=123, steps=2))
    img = photo('chelsea')[120:136, 200:216]
    cv2.imwrite(str(tmp_path / 'c.png'), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    code, _, err = run(['-i', tmp_path / 'c.png', '-o', tmp_path / 'o', '--teacher', teacher_yml, '--seed', 5], capsys)
    assert code == 0, err
    teacher = ResShiftTeacher.from_options(teacher_yml, device='cpu')
    lq = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    ref = teacher.sample(lq, generator=torch.Generator().manual_seed(5))[0].clamp(0, 1).permute(1, 2, 0).numpy()
    res = cv2.cvtColor(cv2.imread(str(tmp_path / 'o' / 'c_x4.png')), cv2.COLOR_BGR2RGB)
    assert np.abs(res - np.rint(ref * 255)).max() <= 1


@pytest.mark.parametrize('extra,match', [
    (['--model', 'missing.pth'], "--model: checkpoint 'missing.pth' does not exist"),
    ([], '--model: a student checkpoint is required'),
    (['--model', '{nearest}', '--teacher', 'x.yml'], 'do not combine it with --model'),
    (['-opt', 'nope.yml', '--model', '{nearest}'], "-opt: option file 'nope.yml' does not exist"),
    (['--model', '{nearest}', '--device', 'tpu'], '--device'),
    (['--model', '{nearest}', '--device', 'cpu', '--precision', 'fp16'], '--precision fp16'),
    (['--model', '{nearest}', '--tile', '-3'], '--tile'),
    (['--model', '{nearest}'], '-opt FILE'),  # a tiny checkpoint is not the paper's SwinIR-small
    (['--teacher', 'missing_teacher.yml'], '--teacher missing_teacher.yml'),
    (['--model', '{nearest}', '-i', 'no_such_dir'], "-i/--input: 'no_such_dir' does not exist"),
])
def test_option_errors_name_the_flag(student, photos, tmp_path, capsys, extra, match):
    root, _ = photos
    extra = [a.format(nearest=student['nearest']) for a in extra]
    code, out, err = run(['-i', root, '-o', tmp_path / 'o'] + extra, capsys)  # a later -i wins
    assert code == 2
    assert err.startswith('error: ') and match in err
    assert 'Traceback' not in err


# Runs in a child process: measures its address space after start-up, caps it with RLIMIT_AS at that
# plus a budget, then runs ``python -m dtkd.infer`` (runpy) with the remaining arguments.
_LIMITED = """
import resource, runpy, sys
import torch
import dtkd_arch, dtkd.infer, basicsr.archs.swinir_arch  # noqa: F401  (start-up imports outside the budget)
# oneDNN creates (and JIT-compiles) a primitive for every new convolution shape: under a tight address-space
# limit that allocation fails at every tile size, which would measure oneDNN, not the tile fall-back
torch.backends.mkldnn.enabled = False
size = next(int(line.split()[1]) * 1024 for line in open('/proc/self/status') if line.startswith('VmSize'))
resource.setrlimit(resource.RLIMIT_AS, (size + int(sys.argv[1]) * 2**20, resource.RLIM_INFINITY))
sys.argv = ['dtkd-infer'] + sys.argv[2:]
runpy.run_module('dtkd.infer', run_name='__main__', alter_sys=True)
"""


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='RLIMIT_AS and /proc/self/status are Linux')
def test_out_of_memory_falls_back_to_smaller_tiles(tmp_path):
    """A real allocation failure: the child process may grow its address space by only 200 MiB.
    Whole-image inference of a 256 x 256 photo with a wider student (embed_dim 48, MLP ratio 4) needs
    about 340 MiB more, so PyTorch's CPU allocator raises; the CLI retries with tiles half as large
    until they fit (about 140 MiB measured with 64- and 32-pixel tiles) and writes the image. The
    result is then compared with the same tiles run in this process without a limit."""
    from conftest import run_cli

    wide = dict(TINY_STUDENT, type='SwinIRStudent', embed_dim=48, num_heads=[6], mlp_ratio=4)
    torch.manual_seed(0)
    net = SwinIRStudent(**{k: v for k, v in wide.items() if k != 'type'}).eval()
    torch.save({'params': net.state_dict()}, tmp_path / 'wide.pth')
    opt = write_yaml(tmp_path / 'wide.yml', {'network_g': wide})
    img = cv2.cvtColor(photo('astronaut')[0:256, 128:384], cv2.COLOR_RGB2BGR)
    (tmp_path / 'in').mkdir()
    cv2.imwrite(str(tmp_path / 'in' / 'big.png'), img)
    res = run_cli(['-c', _LIMITED, '200', '-i', str(tmp_path / 'in'), '-o', str(tmp_path / 'out'), '-opt', opt,
                   '--model', str(tmp_path / 'wide.pth'), '--tile', '0'], cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr[-2000:]
    assert 'out of memory with the whole image; continuing with --tile 128' in res.stderr
    tiles = [int(m) for m in re.findall(r'continuing with --tile (\d+)', res.stderr)]
    assert tiles == sorted(tiles, reverse=True) and tiles[-1] >= 8
    assert 'dtkd-infer: 1 done, ' in res.stdout and 'skipped' not in res.stdout and 'failed' not in res.stdout
    out = cv2.imread(str(tmp_path / 'out' / 'big_x4.png')).astype(np.int64)
    ref = infer.upscale_image(img, infer.StudentRunner(net, 4, 8, torch.device('cpu'), tile=tiles[-1], tile_pad=16))
    assert np.abs(out - ref).max() <= 1
