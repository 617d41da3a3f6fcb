"""LPIPS and MUSIQ for BasicSR's validation and test runs, through pyiqa 0.1.16.

Both are registered in BasicSR's ``METRIC_REGISTRY`` and used under ``val.metrics``::

    val:
      metrics:
        psnr:  {type: calculate_psnr, crop_border: 0, test_y_channel: true}
        lpips: {type: calculate_lpips, better: lower}
        musiq: {type: calculate_musiq}

Protocol (the one pyiqa's default ``lpips`` and ``musiq`` metrics use, as ResShift's evaluation
does): whole RGB images scaled to [0, 1]; no colour conversion, no border crop unless
``crop_border`` is set.

- LPIPS: Zhang et al., CVPR 2018, version 0.1 with the AlexNet backbone (pyiqa ``lpips``).
  Lower is better.
- MUSIQ: Ke et al., ICCV 2021, the checkpoint trained on KonIQ-10k (pyiqa ``musiq``), a
  no-reference score on roughly [0, 100]. Higher is better. The ground truth is not used.

Each network is built once per (metric, device, weight files) and reused for every image; it runs
on the GPU where there is one (option ``device`` to choose). For batches of tensors use
:class:`LPIPSMetric` / :class:`MUSIQMetric` directly. Weights are read from local files only
(see :mod:`dtkd_metric.weights`); pyiqa never downloads anything from here.
"""
import contextlib
import os
import pickle
import re
import shutil
import tempfile

import numpy as np
import torch
from basicsr.metrics.metric_util import reorder_image
from basicsr.utils.registry import METRIC_REGISTRY

from dtkd_compat import OptionError
from dtkd_metric.weights import (
    ALEXNET,
    LPIPS_ALEX,
    MUSIQ_KONIQ,
    MissingFileError,
    describe_missing_file,
    weight_path,
)

_NETWORKS = {}


def _default_device(device=None):
    if device is None:
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    return torch.device(device)


def _require_files(metric_name, files):
    """Raise MissingFileError before building anything. ``files``: [(WeightFile, path, from_option)]."""
    problems = [describe_missing_file(metric_name, w, p, o) for w, p, o in files if not os.path.isfile(p)]
    if problems:
        raise MissingFileError(problems)


def _load_state_dict(path, what):
    """Read a state dict without running code from the file.

    pyiqa 0.1.16 itself reads its checkpoints with ``torch.load(weights_only=False)``, which runs
    whatever a pickle names. Here the file is read with ``weights_only=True`` (tensors, containers
    and plain numpy arrays, through :func:`dtkd_arch.checkpoint.safe_torch_load`); a file that names
    anything else is refused (``OptionError``) and nothing from it runs. There is no fallback
    to full unpickling.
    """
    from dtkd_arch.checkpoint import CheckpointFormatError, safe_torch_load

    try:
        state = safe_torch_load(path, what=what)
    except CheckpointFormatError as error:  # pickled code, corrupt or truncated file
        raise OptionError(f'Could not read {what} from {path}: {error}') from None
    if isinstance(state, dict):
        for key in ('params_ema', 'params', 'state_dict'):
            if key in state and isinstance(state[key], dict):
                state = state[key]
                break
    if not isinstance(state, dict):
        raise OptionError(f'{path} does not hold a state dict ({what}); got {type(state).__name__}')
    return {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state.items()}


@contextlib.contextmanager
def _torchvision_sees(weight_file, path):
    """Make torchvision's cached-weights lookup find ``path`` under ``weight_file.name``.

    pyiqa 0.1.16's LPIPS always builds its AlexNet with ``weights='IMAGENET1K_V1'``, which reads
    ``<torch hub dir>/checkpoints/<name>`` (and downloads it when absent). When the file lies
    elsewhere, the hub dir points at a temporary folder holding a link to it while the network
    is built, and is restored right after.
    """
    if os.path.abspath(path) == os.path.abspath(os.path.join(torch.hub.get_dir(), 'checkpoints', weight_file.name)):
        yield
        return
    tmp = tempfile.mkdtemp(prefix='dtkd_hub_')
    previous = getattr(torch.hub, '_hub_dir', None)
    try:
        os.makedirs(os.path.join(tmp, 'checkpoints'))
        link = os.path.join(tmp, 'checkpoints', weight_file.name)
        try:
            os.symlink(os.path.abspath(path), link)
        except OSError:
            shutil.copyfile(path, link)
        torch.hub.set_dir(tmp)
        yield
    finally:
        if hasattr(torch.hub, '_hub_dir'):
            torch.hub._hub_dir = previous
        shutil.rmtree(tmp, ignore_errors=True)


def _check_image_batch(x, name, channels=3):
    if not torch.is_tensor(x) or x.dim() != 4 or x.shape[1] != channels:
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f'{name}: expected a B x {channels} x H x W RGB tensor in [0, 1], got {shape}')
    if not torch.is_floating_point(x):
        raise ValueError(f'{name}: expected a float tensor in [0, 1], got dtype {x.dtype}')


class LPIPSMetric:
    """LPIPS v0.1 with AlexNet (pyiqa's ``lpips``), built from local weight files.

    Args:
        device: torch device; default the GPU where there is one, else the CPU.
        weights_path: LPIPS linear layers; default ``<torch hub dir>/pyiqa/LPIPS_v0.1_alex-df73285e.pth``.
        backbone_path: AlexNet ImageNet weights; default
            ``<torch hub dir>/checkpoints/alexnet-owt-7be5be79.pth``.

    Call with ``(sr, gt)``: RGB tensors B x 3 x H x W, float in [0, 1], same shape. Returns the
    per-image distances, shape (B,), float32 on the CPU (0 for identical images, lower is better).
    """

    def __init__(self, device=None, weights_path=None, backbone_path=None, metric_name='lpips'):
        self.device = _default_device(device)
        opt = {'weights_path': weights_path, 'backbone_path': backbone_path}
        self.weights_path = weight_path(LPIPS_ALEX, opt)
        self.backbone_path = weight_path(ALEXNET, opt)
        _require_files(metric_name, [(LPIPS_ALEX, self.weights_path, bool(weights_path)),
                                     (ALEXNET, self.backbone_path, bool(backbone_path))])
        from pyiqa.archs.lpips_arch import LPIPS

        # torchvision reads the backbone with full unpickling (weights_only=False); check it first,
        # so that a backbone file carrying pickled code is refused before torchvision opens it.
        _load_state_dict(self.backbone_path, ALEXNET.what)
        try:
            with _torchvision_sees(ALEXNET, self.backbone_path):
                net = LPIPS(pretrained=False, net='alex', version='0.1')
        except (RuntimeError, pickle.UnpicklingError, EOFError) as error:
            raise OptionError(f'Could not load the AlexNet backbone from {self.backbone_path}: {error}') from None
        state = _load_state_dict(self.weights_path, LPIPS_ALEX.what)
        result = net.load_state_dict(state, strict=False)
        # The LPIPS file holds only the linear layers; the backbone and the fixed scaling come from elsewhere.
        # ``lins.<i>`` aliases ``lin<i>`` (same modules); files carry either spelling.
        loaded = {re.sub(r'^lins\.(\d+)\.', r'lin\1.', k) for k in state}
        missing = [k for k in result.missing_keys if not k.startswith(('net.', 'scaling_layer.'))
                   and re.sub(r'^lins\.(\d+)\.', r'lin\1.', k) not in loaded]
        if missing or result.unexpected_keys:
            raise OptionError(f'{self.weights_path} is not an LPIPS v0.1 AlexNet linear-layer file: '
                                   f'missing keys {missing}, unexpected keys {result.unexpected_keys}')
        self.net = net.to(self.device).eval()

    @torch.inference_mode()
    def __call__(self, sr, gt):
        _check_image_batch(sr, 'LPIPS input')
        _check_image_batch(gt, 'LPIPS reference')
        if sr.shape != gt.shape:
            raise ValueError(f'LPIPS: image and reference differ in shape: {tuple(sr.shape)} vs {tuple(gt.shape)}')
        out = self.net(sr.to(self.device, torch.float32), gt.to(self.device, torch.float32), normalize=True)
        return out.reshape(-1).float().cpu()


class MUSIQMetric:
    """MUSIQ trained on KonIQ-10k (pyiqa's ``musiq``), built from a local checkpoint.

    Args:
        device: torch device; default the GPU where there is one, else the CPU.
        weights_path: default ``<torch hub dir>/pyiqa/musiq_koniq_ckpt-e95806b9.pth``.

    Call with ``img``: RGB tensor B x 3 x H x W, float in [0, 1]. Returns the per-image quality
    scores, shape (B,), float32 on the CPU (about 0 to 100, higher is better).
    """

    def __init__(self, device=None, weights_path=None, metric_name='musiq'):
        self.device = _default_device(device)
        self.weights_path = weight_path(MUSIQ_KONIQ, {'weights_path': weights_path})
        _require_files(metric_name, [(MUSIQ_KONIQ, self.weights_path, bool(weights_path))])
        from pyiqa.archs.musiq_arch import MUSIQ

        # pyiqa's 'musiq' = MUSIQ(pretrained='koniq10k'): one output (the MOS), default multi-scale setting.
        net = MUSIQ(pretrained=False, num_class=1)
        state = _load_state_dict(self.weights_path, MUSIQ_KONIQ.what)
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise OptionError(f'{self.weights_path} is not a MUSIQ KonIQ checkpoint: {error}') from None
        self.net = net.to(self.device).eval()

    @torch.inference_mode()
    def __call__(self, img):
        _check_image_batch(img, 'MUSIQ input')
        out = self.net(img.to(self.device, torch.float32))
        return out.reshape(-1).float().cpu()


def _cache_key(kind, device, *paths):
    return (kind, str(device)) + tuple(os.path.realpath(p) for p in paths)


def get_lpips_metric(device=None, weights_path=None, backbone_path=None, metric_name='lpips'):
    """The shared :class:`LPIPSMetric` for these weights and device (built on first use)."""
    device = _default_device(device)
    opt = {'weights_path': weights_path, 'backbone_path': backbone_path}
    key = _cache_key('lpips', device, weight_path(LPIPS_ALEX, opt), weight_path(ALEXNET, opt))
    if key not in _NETWORKS:
        _NETWORKS[key] = LPIPSMetric(device, weights_path, backbone_path, metric_name=metric_name)
    return _NETWORKS[key]


def get_musiq_metric(device=None, weights_path=None, metric_name='musiq'):
    """The shared :class:`MUSIQMetric` for this checkpoint and device (built on first use)."""
    device = _default_device(device)
    key = _cache_key('musiq', device, weight_path(MUSIQ_KONIQ, {'weights_path': weights_path}))
    if key not in _NETWORKS:
        _NETWORKS[key] = MUSIQMetric(device, weights_path, metric_name=metric_name)
    return _NETWORKS[key]


def clear_metric_networks():
    """Drop the shared networks (frees their memory; the next call builds them again)."""
    _NETWORKS.clear()


def image_to_tensor(img, input_order='HWC', crop_border=0, name='image'):
    """BasicSR's metric image convention -> RGB tensor 1 x 3 x H x W in [0, 1].

    Args:
        img: numpy array as BasicSR's SRModel passes to metrics: BGR, HWC (or CHW with
            ``input_order='CHW'``), uint8 in [0, 255], uint16 in [0, 65535] or float in [0, 255]
            (the range ``calculate_psnr`` assumes). Gray images are repeated to three channels.
        crop_border: pixels dropped on each edge, as in ``calculate_psnr``.
    """
    if not isinstance(img, np.ndarray):
        raise ValueError(f'{name}: expected a numpy image (H x W x C, BGR), got {type(img).__name__}')
    img = reorder_image(img, input_order=input_order)
    if img.ndim != 3 or img.shape[2] not in (1, 3):
        raise ValueError(f'{name}: expected H x W x 3 (BGR) or H x W x 1, got shape {img.shape}')
    if crop_border:
        img = img[crop_border:-crop_border, crop_border:-crop_border, ...]
    if img.shape[0] == 0 or img.shape[1] == 0:
        raise ValueError(f'{name}: nothing left after crop_border={crop_border}')
    if img.dtype == np.uint8:
        scaled = img.astype(np.float32) / 255.0
    elif img.dtype == np.uint16:
        scaled = img.astype(np.float32) / 65535.0
    elif np.issubdtype(img.dtype, np.floating):
        scaled = img.astype(np.float32) / 255.0
    else:
        raise ValueError(f'{name}: unsupported dtype {img.dtype} (expected uint8, uint16 or float in [0, 255])')
    if scaled.shape[2] == 1:
        scaled = np.repeat(scaled, 3, axis=2)
    rgb = np.ascontiguousarray(np.clip(scaled[:, :, ::-1], 0.0, 1.0))
    return torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0)


@METRIC_REGISTRY.register()
def calculate_lpips(img, img2, crop_border=0, input_order='HWC', weights_path=None, backbone_path=None, device=None,
                    **kwargs):
    """LPIPS (AlexNet, v0.1) between a result and its ground truth, BasicSR metric signature.

    Args:
        img, img2: result and ground truth, BGR numpy images (see :func:`image_to_tensor`).
        crop_border: pixels dropped on each edge before measuring (default 0).
        weights_path, backbone_path: LPIPS linear layers / AlexNet files (default: the caches).
        device: where the network runs (default the GPU where there is one).
        **kwargs: other option keys (``better``, ``optional``, ...) are ignored.

    Returns:
        float, the distance (lower is better).
    """
    sr = image_to_tensor(img, input_order, crop_border, 'calculate_lpips img')
    gt = image_to_tensor(img2, input_order, crop_border, 'calculate_lpips img2')
    if sr.shape != gt.shape:
        raise ValueError(f'calculate_lpips: result and ground truth differ in size: {tuple(sr.shape[2:])} vs '
                         f'{tuple(gt.shape[2:])}')
    return float(get_lpips_metric(device, weights_path, backbone_path)(sr, gt)[0])


@METRIC_REGISTRY.register()
def calculate_musiq(img, img2=None, crop_border=0, input_order='HWC', weights_path=None, device=None, **kwargs):
    """MUSIQ (KonIQ-10k) of a result, BasicSR metric signature; no reference needed.

    Args:
        img: result, BGR numpy image (see :func:`image_to_tensor`).
        img2: ignored (BasicSR passes the ground truth when there is one).
        crop_border: pixels dropped on each edge before measuring (default 0).
        weights_path: MUSIQ checkpoint (default: the pyiqa cache).
        device: where the network runs (default the GPU where there is one).
        **kwargs: other option keys (``better``, ``optional``, ...) are ignored.

    Returns:
        float, the quality score (higher is better).
    """
    x = image_to_tensor(img, input_order, crop_border, 'calculate_musiq img')
    return float(get_musiq_metric(device, weights_path)(x)[0])
