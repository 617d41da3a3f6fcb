"""``dtkd-infer``: super-resolve an image or a folder of images with a trained student (or the teacher).

    dtkd-infer -i photos/ -o results/ --model net_g_latest.pth          # SwinIR-small x4 (the paper's student)
    dtkd-infer -i photos/ -o results/ -opt options/train_dtkd.yml --model net_g_latest.pth
    dtkd-infer -i photos/ -o results/ --teacher options/teacher/resshift_realsr_x4.yml   # ResShift, slow
    dtkd-infer -i photos/ -o results/ --model net_g_latest.pth --engine openvino         # CPU deployment engine

Images are read with the project's one reader, :func:`dtkd_data.image_io.read_image`, as stored
(inference applies no further policy), and written in kind: grayscale stays single-channel, 16-bit
stays 16-bit, float TIFFs stay float, an alpha channel is kept and up-scaled separately (as
Real-ESRGAN does: by the network on the alpha replicated to three channels, or bicubic with
``--alpha bicubic``). EXIF orientation is applied on reading, for every format; truncated, corrupt
and CMYK files are refused with the reason (as for training), never up-scaled half grey. The network
sees RGB BCHW float in [0, 1], reflect-padded to a multiple of its window size and cropped back
(``dtkd_arch.tiling``); large images are processed in overlapping, blended tiles, and when a forward
pass runs out of memory (CUDA, or the CPU allocator) the image is retried with tiles half as large,
down to the window size. An output that cannot hold the image in the requested format (alpha or 16
bits in a JPEG) is written as PNG instead.

Outputs are written atomically (a hidden temporary file in the output folder, then renamed), so an
interrupted run never leaves a truncated image; existing outputs are skipped unless ``--overwrite``.
An image that cannot be read or processed is reported and the batch goes on; the exit status is
0 when every image was done or skipped, 1 when some failed, 2 for an invalid option.

``--engine onnxruntime|openvino`` (``pip install 'dtkd[deploy]'``) runs the student's ONNX graph on the
CPU instead of PyTorch (``dtkd.engines``): exported from the checkpoint at start-up
(``dtkd.onnx_export``), or ``--onnx FILE`` exported before with ``scripts/export_onnx.py``. Only the
forward pass changes; everything above is the same for every engine.
"""
import argparse
import ctypes
import os
import sys
import tempfile
import time

import cv2
import numpy as np
import torch
from tqdm import tqdm

from dtkd.engines import ENGINES, GraphEngine, engine_precision, require
from dtkd.onnx_export import export_student, graph_info
from dtkd_arch.tiling import forward_padded, tiled_forward
from dtkd_compat import OptionError, atomic_write
from dtkd_data.image_io import BadImageError, read_image
from dtkd_utils.device import autocast, check_precision, pick_device

# The paper's student, SwinIR-small x4 (options/train_dtkd.yml, network_g): what --model alone assumes.
PAPER_STUDENT = {
    'type': 'SwinIRStudent', 'upscale': 4, 'in_chans': 3, 'img_size': 64, 'window_size': 8, 'img_range': 1.,
    'depths': [6, 6, 6, 6], 'embed_dim': 60, 'num_heads': [6, 6, 6, 6], 'mlp_ratio': 2,
    'upsampler': 'pixelshuffledirect', 'resi_connection': '1conv',
}
# Files taken from an input folder (other files are ignored); a single -i file is always tried.
IMAGE_EXTS = ('png', 'jpg', 'jpeg', 'jpe', 'jp2', 'webp', 'avif', 'bmp', 'dib', 'tif', 'tiff', 'pbm', 'pgm',
              'ppm', 'pnm', 'pxm', 'pfm', 'sr', 'ras', 'exr', 'hdr', 'pic', 'gif')
EXT_CHOICES = ('auto', 'png', 'jpg', 'webp', 'tif')
# Formats that store each kind of image as it is; anything else falls back to PNG.
_ALPHA_EXTS = ('png', 'webp', 'tif', 'tiff')
_UINT16_EXTS = ('png', 'tif', 'tiff')
_FLOAT_EXTS = ('tif', 'tiff')
# CPU default tile (LR pixels): whole-image attention on a phone photo would need tens of GB, and
# the operating system kills a process that overcommits instead of raising an error that can be caught.
CPU_AUTO_TILE = 512
# BT.601 luma, as cv2.COLOR_RGB2GRAY: how a colour output becomes a grayscale or alpha channel.
_LUMA = (0.299, 0.587, 0.114)


def is_out_of_memory(err):
    """True for an allocation failure: CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError (oneDNN
    reports a failed scratch-pad allocation as a primitive it could not create)."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    msg = str(err)
    return isinstance(err, RuntimeError) and ('out of memory' in msg or "can't allocate memory" in msg
                                              or 'not enough memory' in msg or 'could not create a primitive' in msg)


def _free_cached_memory(device):
    """Give memory freed by a failed pass back before retrying: CUDA's cache, or on the CPU glibc's
    heap (which otherwise keeps the freed pages of a large failed pass and fragments the retry)."""
    if device.type == 'cuda':
        torch.cuda.empty_cache()
        return
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


# --------------------------------------------------------------------------------------------- networks
def student_options(model=None, opt=None):
    """The network options and checkpoint path for ``--model`` / ``-opt``.

    ``--model`` alone: the paper's SwinIR-small x4 (:data:`PAPER_STUDENT`). ``-opt FILE``: that file's
    ``network_g``; the checkpoint is ``--model``, else the file's ``path.pretrain_network_g``, else
    the newest training checkpoint ``experiments/<name>/models/net_g_latest.pth`` when it exists.

    Returns:
        tuple(dict, str, str): network_g, checkpoint path, and the option that named the checkpoint.
    """
    from dtkd_utils.options import load_yaml

    if opt is None:
        if not model:
            raise OptionError('--model: a student checkpoint is required (or -opt with a trained option file, '
                              'or --teacher)')
        network_g, ckpt, key = dict(PAPER_STUDENT), model, '--model'
    else:
        options = load_yaml(opt, key='-opt')
        network_g = options.get('network_g')
        if not isinstance(network_g, dict) or not network_g.get('type'):
            raise OptionError(f"-opt {opt}: network_g: expected a mapping with a type (the student's options)")
        network_g = dict(network_g)
        ckpt, key = model, '--model'
        if not ckpt:
            path = options.get('path') or {}
            ckpt = path.get('pretrain_network_g') if isinstance(path, dict) else None
            key = f'path.pretrain_network_g in {opt}'
        if not ckpt and isinstance(options.get('name'), str):
            latest = os.path.join('experiments', options['name'], 'models', 'net_g_latest.pth')
            if os.path.isfile(latest):
                ckpt, key = latest, f'the latest checkpoint of {opt}'
        if not ckpt:
            raise OptionError(f'--model: no checkpoint given and -opt {opt} has no path.pretrain_network_g '
                              f'(nor experiments/<name>/models/net_g_latest.pth): pass --model PATH')
    ckpt = os.path.expanduser(str(ckpt))
    if not os.path.isfile(ckpt):
        raise OptionError(f"{key}: checkpoint '{ckpt}' does not exist")
    return network_g, ckpt, key


def build_student(network_g, ckpt, key='--model', precision='fp32', device='cpu', source=None):
    """Build ``network_g`` from BasicSR's ARCH_REGISTRY and load ``ckpt`` (``params_ema`` preferred
    over ``params``, strict). ``precision`` sets SwinIRStudent's own autocast; other architectures are
    autocast by :class:`StudentRunner`. Returns the network in eval mode on ``device``."""
    from basicsr.utils.registry import ARCH_REGISTRY

    import dtkd_arch  # noqa: F401  (registers SwinIRStudent and the other architectures)
    from dtkd_arch.checkpoint import CheckpointMismatchError, load_pretrained

    where = f'network_g in {source}' if source else 'network_g'
    params = dict(network_g)
    arch = params.pop('type')
    try:
        cls = ARCH_REGISTRY.get(arch)
    except KeyError:
        raise OptionError(f'{where}: type {arch!r} is not a registered architecture') from None
    if 'precision' in params or arch == 'SwinIRStudent':
        params['precision'] = precision
    try:
        net = cls(**params)
    except (TypeError, ValueError) as err:
        raise OptionError(f'{where}: options do not fit {arch}: {err}') from None
    try:
        load_pretrained(net, ckpt, strict=True, what='student', option_key=key)
    except CheckpointMismatchError as err:
        hint = ('' if source else '\n  --model alone assumes SwinIR-small x4 (options/train_dtkd.yml); for another '
                'network pass the option file it was trained with: -opt FILE')
        raise OptionError(f'{err}{hint}') from None
    return net.eval().requires_grad_(False).to(device)


class StudentRunner:
    """A feed-forward SR network on RGB BCHW [0, 1] tensors, with tiling and the out-of-memory fall-back.

    Args:
        net (callable): (B, C, h, w) -> (B, C, scale*h, scale*w): a PyTorch network, or an engine's forward
            pass (:class:`dtkd.engines.GraphEngine`, which has its own ``precision`` and ``in_chans``).
        scale (int): up-scaling factor.
        multiple (int): inputs are reflect-padded to multiples of this (the window size).
        device (torch.device): where the network runs.
        tile (int): tile side in LR pixels, 0 for whole images.
        tile_pad (int): context around each tile, LR pixels (see ``dtkd_arch.tiling.tiled_forward``).
        precision (str): autocast dtype for networks that do not handle it themselves.
        log (callable): receives one line per fall-back.
    """

    def __init__(self, net, scale, multiple, device, tile=0, tile_pad=16, precision='fp32', log=print):
        self.net, self.scale, self.multiple, self.device = net, scale, max(int(multiple), 1), device
        self.tile, self.tile_pad, self.log = tile, tile_pad, log
        self.in_chans = getattr(net, 'in_chans', None) or getattr(getattr(net, 'conv_first', None), 'in_channels', 3)
        self.precision = 'fp32' if hasattr(net, 'precision') else check_precision(precision, device, '--precision')

    def _forward(self, x):
        with autocast(self.precision, self.device):
            return self.net(x).float()

    def _smaller_tile(self, h, w):
        """The next tile size after an out-of-memory error, or None when tiles cannot shrink further."""
        current = self.tile if self.tile > 0 else max(h, w)
        smaller = (current // 2) // self.multiple * self.multiple
        if smaller < self.multiple or current <= self.multiple:
            return None
        return smaller

    def __call__(self, x):
        """x: (1, C, h, w) float32 in [0, 1] on any device -> (1, C, scale*h, scale*w) float32, same device."""
        h, w = x.shape[-2:]
        x_dev = x.to(self.device)
        while True:
            failed = None
            try:
                with torch.inference_mode():
                    if self.tile > 0:
                        out = tiled_forward(self._forward, x_dev, self.scale, self.tile, self.tile_pad, self.multiple)
                    else:
                        out = forward_padded(self._forward, x_dev, self.multiple, self.scale)
                return out.to(x.device, torch.float32)
            except RuntimeError as err:
                if not is_out_of_memory(err):
                    raise
                failed = str(err).splitlines()[0][:200]
            # out of the except block: the failed pass's tensors are released before the retry
            _free_cached_memory(self.device)
            smaller = self._smaller_tile(h, w)
            what = f'{self.tile}-pixel tiles' if self.tile > 0 else 'the whole image'
            if smaller is None:
                raise BadImageError(f'out of memory with {what} and tiles cannot be smaller than the window '
                                 f'({self.multiple} pixels): {failed}')
            self.log(f'out of memory with {what}; continuing with --tile {smaller}')
            self.tile = smaller


class TeacherRunner:
    """The ResShift teacher (:class:`dtkd_teacher.teacher.ResShiftTeacher`) behind the runner interface.

    Its own chopping (``sampler.chop_size`` / ``chop_stride``) takes the place of tiles; on running out of
    memory the chop size is halved (not below ``pad_multiple``). Every image is sampled with its own
    generator seeded with ``seed``, so an image's result does not depend on the others.
    """

    in_chans = 3

    def __init__(self, teacher, seed=0, log=print):
        self.teacher, self.seed, self.log = teacher, seed, log
        self.scale = int(teacher.diffusion.sf)
        self.device = teacher.device

    def __call__(self, x):
        while True:
            failed = None
            try:
                generator = torch.Generator(device=self.device).manual_seed(self.seed)
                with torch.inference_mode():
                    return self.teacher.sample(x, generator=generator).to(x.device, torch.float32)
            except RuntimeError as err:
                if not is_out_of_memory(err):
                    raise
                failed = str(err).splitlines()[0][:200]
            _free_cached_memory(self.device)
            t = self.teacher
            smaller = (t.chop_size // 2) // t.pad_multiple * t.pad_multiple
            if smaller < t.pad_multiple or smaller >= t.chop_size:
                raise BadImageError(f'out of memory with teacher chops of {t.chop_size} pixels: {failed}')
            overlap = t.chop_size - t.chop_stride
            t.chop_size, t.chop_stride = smaller, max(smaller - overlap, smaller // 2, 1)
            self.log(f'out of memory; continuing with teacher chops of {smaller} pixels')


def build_teacher(path, precision, device, tile=None, tile_pad=16):
    """The teacher of ``--teacher`` (:func:`dtkd_teacher.teacher.build_teacher`), errors naming the flag.
    ``tile`` (LR pixels) replaces ``sampler.chop_size``, with chops overlapping ``2 * tile_pad`` pixels."""
    from dtkd_teacher import teacher

    overrides = {'precision': precision, 'device': str(device)}
    if tile:
        overrides.update(chop_size=tile, chop_stride=max(tile - 2 * tile_pad, 1))
    try:
        return teacher.build_teacher(path, **overrides)
    except OptionError as err:
        raise OptionError(f'--teacher {path}: {err}') from None


def _peak(dtype):
    return {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}.get(np.dtype(dtype), 1.0)


def _to_tensor(channels_hwc, peak):
    """(H, W, C) array, RGB order -> (1, C, H, W) float32 in [0, 1]."""
    arr = np.ascontiguousarray(channels_hwc.transpose(2, 0, 1)).astype(np.float32) / peak
    return torch.from_numpy(arr).unsqueeze(0).clamp_(0, 1)


def _luma(t):
    """(1, 3, H, W) RGB -> (1, 1, H, W)."""
    w = torch.tensor(_LUMA, dtype=t.dtype).view(1, 3, 1, 1)
    return (t * w).sum(1, keepdim=True)


def _run_channels(runner, t):
    """Run ``runner`` on (1, C, H, W) where C is 1 or 3 and the network takes ``runner.in_chans``."""
    c, want = t.shape[1], runner.in_chans
    if c == want:
        return runner(t)
    if c == 1 and want == 3:
        return _luma(runner(t.expand(-1, 3, -1, -1)))
    raise BadImageError(f'a {c}-channel image for a network with {want} input channel(s)')


def _to_array(t, peak, dtype):
    """(C, H, W) float tensor in about [0, 1] -> (H, W, C) array of ``dtype``, channel order kept.

    Works in place on ``t`` and makes one array of the output type: the full-size output of a large
    image should not be copied several times in float."""
    t = t.clamp_(0, 1)
    if dtype != np.float32:
        t = t.mul_(peak).round_()
    return t.permute(1, 2, 0).numpy().astype(dtype)


def upscale_image(img, runner, alpha='network'):
    """Super-resolve an image as :func:`dtkd_data.image_io.read_image` returns it; returns the same kind of array
    (channels, dtype), ``runner.scale`` times larger."""
    peak, dtype = _peak(img.dtype), img.dtype
    color = img[..., :3] if img.ndim == 3 else img[..., None]
    rgb = color[..., ::-1] if color.shape[2] == 3 else color
    with torch.inference_mode():
        out = _to_array(_run_channels(runner, _to_tensor(rgb, peak))[0], peak, dtype)
        if img.ndim == 3 and img.shape[2] == 4:
            out = np.ascontiguousarray(out[..., ::-1])
            a = img[..., 3:4]
            if alpha == 'network':
                a_out = _to_array(_run_channels(runner, _to_tensor(a, peak))[0], peak, dtype)
            else:
                h, w = a.shape[:2]
                a_t = cv2.resize(a[..., 0].astype(np.float32) / peak, (w * runner.scale, h * runner.scale),
                                 interpolation=cv2.INTER_CUBIC)
                a_out = _to_array(torch.from_numpy(a_t)[None], peak, dtype)
            return np.concatenate([out, a_out], axis=2)
    if img.ndim == 2:
        return out[..., 0]
    return np.ascontiguousarray(out[..., ::-1])


def fits(ext, img):
    """Whether format ``ext`` stores ``img`` (channels and depth) without loss of kind."""
    if img.ndim == 3 and img.shape[2] == 4 and ext not in _ALPHA_EXTS:
        return False
    if img.dtype == np.uint16 and ext not in _UINT16_EXTS:
        return False
    if img.dtype == np.float32 and ext not in _FLOAT_EXTS:
        return False
    return True


def encode(img, ext):
    """Encode for ``ext``; float images go to 16-bit where the format has no float (PNG)."""
    if img.dtype == np.float32 and ext not in _FLOAT_EXTS:
        img = np.rint(img.clip(0, 1) * 65535).astype(np.uint16)
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if ext in ('jpg', 'jpeg', 'jpe') else []
    try:
        ok, buf = cv2.imencode('.' + ext, img, params)
    except cv2.error as err:
        raise BadImageError(f'OpenCV cannot write it as {ext}: {err}') from None
    if not ok:
        raise BadImageError(f'OpenCV cannot write it as {ext}')
    return buf


def write_atomic(path, data):
    """Write bytes to ``path`` through a hidden temporary file in the same folder and a rename."""
    try:
        atomic_write(path, data)
    except OSError as err:
        raise BadImageError(f"cannot write '{path}': {err.strerror or err}") from None


# --------------------------------------------------------------------------------------------- batch
def list_inputs(path):
    """An image file, or the image files of a folder (by extension, sorted; hidden files ignored)."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise OptionError(f"-i/--input: '{path}' does not exist")
    files = sorted(os.path.join(path, f) for f in os.listdir(path)
                   if not f.startswith('.') and os.path.splitext(f)[1].lower().lstrip('.') in IMAGE_EXTS
                   and os.path.isfile(os.path.join(path, f)))
    if not files:
        raise OptionError(f"-i/--input: no images in folder '{path}' (looked for {', '.join(IMAGE_EXTS)})")
    return files


def planned_ext(path, ext):
    """The output format before the image is read: ``ext``, or for auto the input's (PNG if OpenCV cannot
    write that)."""
    if ext != 'auto':
        return ext
    in_ext = os.path.splitext(path)[1].lower().lstrip('.')
    return in_ext if in_ext and in_ext not in ('gif', 'pic') and cv2.haveImageWriter('x.' + in_ext) else 'png'


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog='dtkd-infer', description='Super-resolve an image or a folder of images with a trained DTKD student '
        '(SwinIR-small x4 by default) or with the ResShift teacher.')
    p.add_argument('-i', '--input', required=True, help='image file or folder of images')
    p.add_argument('-o', '--output', required=True, help='output folder (created if missing)')
    p.add_argument('--model', help='student checkpoint (.pth; params_ema preferred over params). Alone, it is '
                   "taken to be the paper's SwinIR-small x4")
    p.add_argument('-opt', '--opt', dest='opt', help="trained option file: its network_g (and, without --model, "
                   'its path.pretrain_network_g)')
    p.add_argument('--teacher', help='teacher option file (e.g. options/teacher/resshift_realsr_x4.yml): run '
                   'ResShift instead of a student (slow)')
    p.add_argument('--tile', type=int, default=None, help=f'tile side in LR pixels, 0 = whole image (default: '
                   f'whole image on CUDA, {CPU_AUTO_TILE} on the CPU; halved automatically when memory runs out)')
    p.add_argument('--tile-pad', type=int, default=16, help='context around each tile, LR pixels (default 16)')
    p.add_argument('--precision', choices=('fp32', 'bf16', 'fp16'), default=None,
                   help='fp32, bf16 (CPUs with AMX/AVX512-BF16, GPUs) or fp16 (CUDA). Default: fp32; with --engine '
                   'openvino, bf16 on CPUs with AMX or AVX512-BF16')
    p.add_argument('--engine', choices=ENGINES, default='torch',
                   help="what runs the student: torch (default), or its ONNX graph in onnxruntime or openvino on the "
                   "CPU (pip install 'dtkd[deploy]')")
    p.add_argument('--onnx', help='with --engine onnxruntime|openvino: a graph written by scripts/export_onnx.py, '
                   'instead of --model/-opt (default: the student exported at start-up)')
    p.add_argument('--device', default='auto', help='auto (default: CUDA if available), cpu, cuda, cuda:<i>')
    p.add_argument('--suffix', default=None, help='added to each output name (default _x<scale>)')
    p.add_argument('--ext', choices=EXT_CHOICES, default='auto',
                   help="output format; auto keeps the input's (default). Alpha or 16-bit images that the "
                   'format cannot hold are written as PNG')
    p.add_argument('--alpha', choices=('network', 'bicubic'), default='network',
                   help='how an alpha channel is up-scaled (default: the network; the teacher always uses bicubic)')
    p.add_argument('--overwrite', action='store_true', help='redo images whose output exists')
    p.add_argument('--seed', type=int, default=0, help='teacher sampling seed, the same for every image (default 0)')
    return p.parse_args(argv)


def _check_args(args):
    if args.engine != 'torch':
        require(args.engine)  # first: a missing package is reported before any other work
        if args.teacher:
            raise OptionError(f'--engine {args.engine}: runs a student; the teacher runs with --engine torch')
        if args.device not in ('auto', 'cpu'):
            raise OptionError(f'--engine {args.engine}: runs on the CPU; use --device cpu (or --engine torch '
                              f'for {args.device})')
        args.precision = engine_precision(args.engine, args.precision)
        if args.onnx and (args.model or args.opt):
            raise OptionError('--onnx: the graph replaces the checkpoint; do not combine it with --model/-opt')
        if args.onnx:
            graph_info(args.onnx)  # a missing or foreign file is an option error, before the engine sees it
    elif args.onnx:
        raise OptionError('--onnx: runs with --engine onnxruntime or --engine openvino')
    args.precision = args.precision or 'fp32'
    if args.teacher and (args.model or args.opt):
        raise OptionError('--teacher: runs the teacher instead of a student; do not combine it with --model/-opt')
    if args.tile is not None and args.tile < 0:
        raise OptionError(f'--tile: expected 0 (whole image) or a positive number of LR pixels, got {args.tile}')
    if args.tile_pad < 0:
        raise OptionError(f'--tile-pad: expected >= 0, got {args.tile_pad}')
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise OptionError(f"-o/--output: '{args.output}' exists and is not a folder")


def build_engine(args, log):
    """The student's graph in ``args.engine`` (:class:`dtkd.engines.GraphEngine`): ``--onnx``, or the
    checkpoint of ``--model``/``-opt`` exported to a temporary file (removed once the engine has loaded it)."""
    if args.onnx:
        return GraphEngine(args.onnx, args.engine, args.precision)
    network_g, ckpt, key = student_options(args.model, args.opt)
    net = build_student(network_g, ckpt, key=key, source=args.opt)
    start = time.time()
    with tempfile.TemporaryDirectory(prefix='dtkd-onnx-') as folder:
        path = os.path.join(folder, 'student.onnx')
        export_student(network_g, net.state_dict(), path, checkpoint=ckpt)
        engine = GraphEngine(path, args.engine, args.precision)
    log(f'{args.engine} {args.precision}: student exported to ONNX and loaded in {time.time() - start:.1f} s '
        '(export once with scripts/export_onnx.py and pass --onnx FILE to save this)')
    return engine


def build_runner(args, device, log):
    if args.teacher:
        teacher = build_teacher(args.teacher, args.precision, device, tile=args.tile, tile_pad=args.tile_pad)
        return TeacherRunner(teacher, seed=args.seed, log=log)
    tile = args.tile if args.tile is not None else (0 if device.type == 'cuda' else CPU_AUTO_TILE)
    if args.engine != 'torch':
        net = build_engine(args, log)
        return StudentRunner(net, net.scale, net.multiple, device, tile=tile, tile_pad=args.tile_pad, log=log)
    network_g, ckpt, key = student_options(args.model, args.opt)
    net = build_student(network_g, ckpt, key=key, precision=args.precision, device=device, source=args.opt)
    scale = int(network_g.get('upscale', getattr(net, 'upscale', 1)) if network_g.get('upsampler', 'x') else 1)
    multiple = getattr(net, 'pad_multiple', None) or network_g.get('window_size') or 1
    return StudentRunner(net, scale, multiple, device, tile=tile, tile_pad=args.tile_pad, precision=args.precision,
                         log=log)


def infer(args):
    """Process every input; returns the exit status (0: all done or skipped, 1: some failed)."""
    _check_args(args)
    device = pick_device('cpu' if args.engine != 'torch' else args.device)
    if args.precision == 'fp16' and device.type != 'cuda':
        raise OptionError(f"--precision fp16: needs a CUDA device (this run uses {device.type}); use bf16 or fp32")
    inputs = list_inputs(args.input)
    runner = build_runner(args, device, log=lambda msg: tqdm.write(msg, file=sys.stderr))
    suffix = f'_x{runner.scale}' if args.suffix is None else args.suffix
    os.makedirs(args.output, exist_ok=True)

    done = skipped = 0
    failures = []
    start = time.time()
    bar = tqdm(inputs, unit='img', file=sys.stderr, dynamic_ncols=True, desc='dtkd-infer')
    for path in bar:
        stem = os.path.splitext(os.path.basename(path))[0]
        ext = planned_ext(path, args.ext)
        target = os.path.join(args.output, f'{stem}{suffix}.{ext}')
        fallback = os.path.join(args.output, f'{stem}{suffix}.png')
        if os.path.realpath(target) == os.path.realpath(path) or os.path.realpath(fallback) == os.path.realpath(path):
            failures.append((path, 'the output would replace the input; choose another -o or --suffix'))
            tqdm.write(f'failed: {path}: {failures[-1][1]}', file=sys.stderr)
            continue
        if not args.overwrite and (os.path.exists(target) or os.path.exists(fallback)):
            skipped += 1
            continue
        bar.set_postfix_str(os.path.basename(path))
        try:
            img = read_image(path)
            out = upscale_image(img, runner, alpha='bicubic' if args.teacher else args.alpha)
            if not fits(ext, out):
                tqdm.write(f'note: {path}: {ext} cannot hold this image (alpha / 16-bit / float); written as PNG',
                           file=sys.stderr)
                ext, target = 'png', fallback
            write_atomic(target, encode(out, ext).tobytes())
            done += 1
        except BadImageError as err:
            failures.append((path, err.reason if err.name == path else str(err)))
            tqdm.write(f'failed: {path}: {failures[-1][1]}', file=sys.stderr)
    bar.close()
    elapsed = time.time() - start
    parts = [f'{done} done']
    if skipped:
        parts.append(f'{skipped} skipped (output exists; --overwrite redoes them)')
    if failures:
        parts.append(f'{len(failures)} failed')
    print(f'dtkd-infer: {", ".join(parts)}, {elapsed:.1f} s -> {args.output}')
    for path, reason in failures:
        print(f'  failed: {path}: {reason}')
    return 1 if failures else 0


def main(argv=None):
    args = parse_args(argv)
    try:
        status = infer(args)
    except OptionError as err:
        print(f'error: {err}', file=sys.stderr)
        raise SystemExit(2) from None
    raise SystemExit(status)


if __name__ == '__main__':
    main()
