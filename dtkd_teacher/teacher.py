"""ResShift x4 real-world SR as a frozen teacher: RGB BCHW [0, 1] LR in, x4 RGB BCHW [0, 1] out.

The teacher of the DTKD paper is ResShift (Yue et al., NeurIPS 2023; github.com/zsyOAOA/ResShift),
the 15-step real-SR model ``resshift_realsrx4_s15_v1.pth`` with the VQ-f4 autoencoder
``autoencoder_vq_f4.pth``. The same sampler runs the released relatives of that model, which differ
only in weights and schedule: ResShift v3 (the journal version, Yue et al., TPAMI 2024: 4 steps,
``resshift_realsrx4_s4_v3.pth``) and SinSR (Wang et al., CVPR 2024: one x_0 prediction from the last
step of the 15-step process, ``SinSR_v1.pth`` / ``SinSR_v2.pth``); see ``options/teacher/``.
Pre- and post-processing follow the official ``sampler.py`` (``ResShiftSampler.sample_func`` /
``inference``):

1. LR to [-1, 1] (``(x - 0.5) / 0.5``);
2. images larger than ``chop_size`` (LR pixels, either side) are cut into overlapping
   ``chop_size`` patches at ``chop_stride`` (the official ``ImageSpliterTh``): each patch is sampled
   on its own and the overlaps are averaged with equal weights;
3. each patch is reflect-padded at the bottom/right to a multiple of ``pad_multiple`` (official:
   the UNet's ``lq_size``, 64), bicubic up-sampled by 4 (``F.interpolate(mode='bicubic')``),
   encoded, sampled (the UNet also sees the padded LR; a pixel-space teacher, ``autoencoder: ~``,
   works at HR size and sees the up-sampled LR, as ``ResShiftModel`` trains it), decoded, cropped
   back and clamped to [-1, 1];
4. back to [0, 1].

The random draws follow the official order (per patch: prior noise, then one per step). Without a
``generator`` the global RNG is used, so ``torch.manual_seed(s)`` before :meth:`sample` reproduces
the official sampler seeded with ``s``. One generator draws each noise tensor for the whole batch; a
list of generators, one per image, gives every image its own stream in that order (also through the
patches of a chopped image), so a batch of images gives each one what it would get alone, in one
network call per step.
"""
import copy
import os

import torch
import torch.nn.functional as F
from torch import nn

import dtkd_compat  # noqa: F401  (must precede basicsr)
from dtkd_arch.tiling import pad_to_multiple
from dtkd_compat import MissingFileError, OptionError
from dtkd_teacher.diffusion import DIFFUSION_DEFAULTS, ResShiftDiffusion, check_generators
from dtkd_utils.device import PRECISIONS, autocast, check_precision, pick_device
from dtkd_utils.options import load_yaml

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_BLOCKS = ('unet', 'autoencoder', 'diffusion', 'sampler')
# runtime knobs (the ``sampler`` block); defaults are the official inference script's settings for
# real-SR (inference_resshift.py: chop_size 512, stride 512 - 64, padding_offset = lq_size = 64),
# except precision: the official script runs fp16 autocast on the GPU, fp32 is the exact default here.
SAMPLER_DEFAULTS = {
    'steps': None,
    'chop_size': 512,
    'chop_stride': 448,
    'pad_multiple': None,
    'precision': 'fp32',
    'device': 'auto',
}
_DOWNLOAD = 'https://github.com/zsyOAOA/ResShift/releases/download/v2.0/'
_SINSR_DOWNLOAD = 'https://github.com/wyf0912/SinSR/releases/download/v1.0/'
# released files a teacher option file may name: where to download them and which release they are
_RELEASES = {
    'resshift_realsrx4_s15_v1.pth': (_DOWNLOAD, 'ResShift release v2.0, github.com/zsyOAOA/ResShift'),
    'resshift_realsrx4_s15_v2.pth': (_DOWNLOAD, 'ResShift release v2.0, github.com/zsyOAOA/ResShift'),
    'resshift_realsrx4_s4_v3.pth': (_DOWNLOAD, 'ResShift release v2.0, github.com/zsyOAOA/ResShift'),
    'autoencoder_vq_f4.pth': (_DOWNLOAD, 'ResShift release v2.0, github.com/zsyOAOA/ResShift'),
    'SinSR_v1.pth': (_SINSR_DOWNLOAD, 'SinSR release v1.0, github.com/wyf0912/SinSR'),
    'SinSR_v2.pth': (_SINSR_DOWNLOAD, 'SinSR release v1.0, github.com/wyf0912/SinSR'),
}


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def resolve_project_path(path):
    """``path`` as given if it exists, else relative to the project root (where ``weights/`` and
    ``options/`` live), so option files work from any working directory."""
    path = os.path.expanduser(os.fspath(path))
    if os.path.isabs(path) or os.path.isfile(path):
        return path
    alt = os.path.join(_REPO_ROOT, path)
    return alt if os.path.isfile(alt) else path


def _load_options(path_or_dict):
    if isinstance(path_or_dict, dict):
        return copy.deepcopy(path_or_dict), '<dict>'
    path = resolve_project_path(path_or_dict)
    return load_yaml(path, key='teacher options (e.g. options/teacher/resshift_realsr_x4.yml)'), path


_MISSING = object()
_CHECKPOINTS = {'unet': ('ResShift UNet', 'resshift_realsrx4_s15_v1.pth'),
                'autoencoder': ('ResShift VQ autoencoder', 'autoencoder_vq_f4.pth')}


def checkpoint_path(ckpt, name, what, default_ckpt):
    """The file of option ``<name>.ckpt`` (as given, else relative to the project root), which must exist;
    errors name the option, where it was looked for and where the released file is."""
    if ckpt is _MISSING:
        raise OptionError(f'{name}.ckpt: required: path of {default_ckpt} (download: {_DOWNLOAD}{default_ckpt})')
    if ckpt is None or ckpt == '':
        raise OptionError(f'{name}.ckpt: a checkpoint path is required (the teacher is never run with '
                          f'random weights); the released file is {_DOWNLOAD}{default_ckpt}')
    path = resolve_project_path(ckpt)
    if not os.path.isfile(path):
        where = f"{what} checkpoint '{ckpt}' not found (option {name}.ckpt, also looked in {_REPO_ROOT})"
        base = os.path.basename(path)
        if base not in _RELEASES:
            raise MissingFileError(where)
        url, release = _RELEASES[base]
        raise MissingFileError(f'{where}: download {url}{base} ({release}) into weights/ or set {name}.ckpt '
                               'to its path')
    return path


def check_checkpoints(path_or_dict):
    """Check, without building anything, that the checkpoints a teacher option file names exist
    (networks that need none, such as the demo's space-to-depth first stage, may leave ``ckpt`` out)."""
    from basicsr.utils.registry import ARCH_REGISTRY

    import dtkd_arch  # noqa: F401  (registers the project's architectures)

    opt, _ = _load_options(path_or_dict)
    for name, (what, default_ckpt) in _CHECKPOINTS.items():
        block = opt.get(name)
        if not isinstance(block, dict):
            continue
        try:
            cls = ARCH_REGISTRY.get(block.get('type'))
        except KeyError:
            raise OptionError(f"{name}.type: no architecture named {block.get('type')!r} is registered") from None
        if not getattr(cls, 'needs_checkpoint', True) and block.get('ckpt') is None:
            continue
        checkpoint_path(block.get('ckpt', _MISSING), name, what, default_ckpt)


def _build_network(block, name, load=True):
    """Build ``block['type']`` (``name``: 'unet' or 'autoencoder') from basicsr's ARCH_REGISTRY with the
    remaining keys and load ``ckpt``; with ``load`` false the network keeps its initialisation."""
    from basicsr.utils import get_root_logger
    from basicsr.utils.registry import ARCH_REGISTRY

    import dtkd_arch  # noqa: F401  (registers the project's architectures)
    from dtkd_arch.checkpoint import describe_mismatch, load_pretrained, load_state_dict_file

    if not isinstance(block, dict):
        raise OptionError(f'{name}: expected a mapping with type, ckpt and the network options')
    params = dict(block)
    arch = params.pop('type', None)
    if not arch:
        raise OptionError(f'{name}.type: required (e.g. ResShiftUNet / VQAutoencoder)')
    try:
        cls = ARCH_REGISTRY.get(arch)
    except KeyError as err:
        raise OptionError(f'{name}.type: no architecture named {arch!r} is registered') from err
    if not load or (not getattr(cls, 'needs_checkpoint', True) and params.get('ckpt') is None):
        params.pop('ckpt', None)
        try:
            return cls(**params)  # random weights, or a network without weights (e.g. SpaceToDepthAutoencoder)
        except (TypeError, ValueError) as err:
            raise OptionError(f'{name}: options do not fit {arch}: {err}') from err
    what, default_ckpt = _CHECKPOINTS[name]
    path = checkpoint_path(params.pop('ckpt', None) if 'ckpt' in params else _MISSING, name, what, default_ckpt)
    try:
        net = cls(**params)
    except TypeError as err:
        raise OptionError(f'{name}: options do not fit {arch}: {err}') from err
    # as the official loader (utils/util_net.py: reload_model): every network key must be in the file,
    # extra keys in the file are ignored
    state = load_state_dict_file(path, what=what, option_key=f'{name}.ckpt')
    missing, unexpected, shapes = describe_mismatch(net.state_dict(), state)
    if missing or shapes:
        load_pretrained(net, path, strict=True, what=what, option_key=f'{name}.ckpt')  # raises, listing all
    if unexpected:
        get_root_logger().warning(f"{what} checkpoint '{path}': ignoring {len(unexpected)} keys the network does "
                                  f'not have (first: {unexpected[:3]})')
        state = {k: v for k, v in state.items() if k not in set(unexpected)}
    net.load_state_dict(state, strict=True)
    return net


class ResShiftTeacher(nn.Module):
    """Frozen ResShift sampler.

    Args:
        unet (nn.Module): denoiser ``unet(x, timesteps, lq=...)`` (``ResShiftUNet``).
        autoencoder (nn.Module | None): first stage with ``encode``/``decode`` (``VQAutoencoder``);
            None samples in pixel space.
        diffusion (dict): official ``diffusion.params`` (see ``resshift_diffusion.DIFFUSION_DEFAULTS``).
        steps (int | None): sampling steps (respacing of the trained ``diffusion.steps``); None keeps
            ``diffusion.timestep_respacing`` (None: all trained steps, 15 for the released model).
        chop_size (int): LR patch side above which the image is chopped (official default 512).
        chop_stride (int): LR stride between patches, 1 <= chop_stride <= chop_size (official 448).
        pad_multiple (int | None): LR sides are reflect-padded to multiples of this; None takes the
            UNet's ``lq_size`` if it has one, else 64 (the official inference script's rule).
        precision (str): 'fp32', 'bf16' (autocast) or 'fp16' (autocast, CUDA only).
        device (str | torch.device): 'auto' (CUDA if available), 'cpu', 'cuda', 'cuda:1', ...
        cond_lq (bool | None): pass the LR image to the UNet (official ``model.params.cond_lq``);
            None reads ``unet.cond_lq`` (default True).
    """

    def __init__(self, unet, autoencoder, diffusion, steps=None, chop_size=512, chop_stride=448, pad_multiple=None,
                 precision='fp32', device='auto', cond_lq=None):
        super().__init__()
        if not isinstance(diffusion, dict):
            raise OptionError(f'diffusion: expected a mapping of the official diffusion options, '
                                     f'got {type(diffusion).__name__}')
        self.diffusion_opt = dict(diffusion)
        self.unet = unet
        self.autoencoder = autoencoder
        self.cond_lq = bool(getattr(unet, 'cond_lq', True) if cond_lq is None else cond_lq)
        if pad_multiple is None:
            pad_multiple = getattr(unet, 'lq_size', None) or 64
        for key, value in (('chop_size', chop_size), ('chop_stride', chop_stride), ('pad_multiple', pad_multiple)):
            if not _is_int(value) or value < 1:
                raise OptionError(f'sampler.{key}: expected a positive integer, got {value!r}')
        if chop_stride > chop_size:
            raise OptionError(f'sampler.chop_stride: expected <= sampler.chop_size ({chop_size}), '
                                     f'got {chop_stride}')
        self.chop_size, self.chop_stride, self.pad_multiple = chop_size, chop_stride, pad_multiple
        self.device = self._pick_device(device)
        self.precision = self._check_precision(precision, self.device)
        self.set_steps(steps)
        for p in self.parameters():
            p.requires_grad_(False)
        super().to(self.device)
        self.eval()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_options(cls, path_or_dict, random_weights=False, **overrides):
        """Build from a YAML file or dict with blocks ``unet``, ``autoencoder``, ``diffusion`` and an
        optional ``sampler`` block; keyword ``overrides`` (``steps``, ``chop_size``, ``chop_stride``,
        ``pad_multiple``, ``precision``, ``device``) replace ``sampler`` values. With ``random_weights``
        the networks keep their initialisation and the ``ckpt`` keys are not read.

        The files are read with ``yaml.safe_load`` (no code execution). Missing checkpoints raise
        FileNotFoundError naming the file, the option key and the download address.
        """
        opt, source = _load_options(path_or_dict)
        unknown = sorted(set(opt) - set(_BLOCKS))
        if unknown:
            raise OptionError(f'{unknown[0]}: unknown block in {source} (expected {", ".join(_BLOCKS)})')
        for block in _BLOCKS[:3]:
            if block not in opt:
                raise OptionError(f'{block}: required block is missing in {source}')
        sampler = opt.get('sampler') or {}
        if not isinstance(sampler, dict):
            raise OptionError(f'sampler: expected a mapping, got {type(sampler).__name__}')
        bad = sorted(set(sampler) - set(SAMPLER_DEFAULTS))
        if bad:
            raise OptionError(f'sampler.{bad[0]}: unknown option (known: {", ".join(SAMPLER_DEFAULTS)})')
        bad = sorted(set(overrides) - set(SAMPLER_DEFAULTS))
        if bad:
            raise TypeError(f'ResShiftTeacher.from_options: unknown override {bad[0]!r} '
                            f'(known: {", ".join(SAMPLER_DEFAULTS)})')
        sampler = {**SAMPLER_DEFAULTS, **sampler, **{k: v for k, v in overrides.items() if v is not None}}
        diffusion = opt['diffusion']
        # fail on diffusion / sampler options before the (slow) network construction
        ResShiftDiffusion.from_options(diffusion, sample_steps=sampler['steps'], steps_key='sampler.steps')
        device = cls._pick_device(sampler['device'])
        cls._check_precision(sampler['precision'], device)
        unet_block = opt['unet']
        if isinstance(unet_block, dict) and 'cond_lq' in unet_block:
            cond_lq = unet_block['cond_lq']
        else:
            cond_lq = None
        unet = _build_network(unet_block, 'unet', load=not random_weights)
        autoencoder = None
        if opt['autoencoder'] is not None:
            autoencoder = _build_network(opt['autoencoder'], 'autoencoder', load=not random_weights)
        pad_multiple = sampler['pad_multiple']
        if pad_multiple is None and isinstance(unet_block, dict):
            pad_multiple = unet_block.get('lq_size', 64)
        return cls(unet, autoencoder, diffusion, steps=sampler['steps'], chop_size=sampler['chop_size'],
                   chop_stride=sampler['chop_stride'], pad_multiple=pad_multiple, precision=sampler['precision'],
                   device=device, cond_lq=cond_lq)

    @staticmethod
    def _pick_device(device):
        return pick_device(device, option='sampler.device')

    @staticmethod
    def _check_precision(precision, device):
        return check_precision(precision, device, 'sampler.precision')

    def set_steps(self, steps=None):
        """Sample with ``steps`` steps (respaced, as the official ``timestep_respacing``); None: the
        configured number. 1 is the one-step variant (one x_0 prediction from the prior at T-1)."""
        self.diffusion = ResShiftDiffusion.from_options(self.diffusion_opt, sample_steps=steps,
                                                        steps_key='sampler.steps')
        self.steps = self.diffusion.num_timesteps
        return self

    def train(self, mode=True):
        """The teacher stays in eval mode (frozen)."""
        return super().train(False)

    # ------------------------------------------------------------------ sampling
    def _sample_patch(self, y0, generator):
        """(B, 3, h, w) in [-1, 1] -> (B, 3, sf*h, sf*w) in [-1, 1] (official ``sample_func``)."""
        ori_h, ori_w = y0.shape[-2:]
        y0, _ = pad_to_multiple(y0, self.pad_multiple)
        kwargs = None
        if self.cond_lq:
            # latent space: the UNet sees the LR image; pixel space: it works at HR size and sees the LR
            # image bicubic up-sampled (the same F.interpolate call that gives the prior mean z_y)
            cond = y0 if self.autoencoder is not None else F.interpolate(y0, scale_factor=self.diffusion.sf,
                                                                         mode='bicubic')
            kwargs = {'lq': cond}
        with autocast(self.precision, self.device):
            out = self.diffusion.p_sample_loop(y0, self.unet, self.autoencoder, generator=generator,
                                               model_kwargs=kwargs)
        sf = self.diffusion.sf
        out = out.float()[..., :ori_h * sf, :ori_w * sf]
        return out.clamp_(-1.0, 1.0)

    def _starts(self, length):
        """Patch starts along one side (official ``ImageSpliterTh.extract_starts``)."""
        if length <= self.chop_size:
            return [0]
        starts = []
        for s in range(0, length, self.chop_stride):
            s = min(s, length - self.chop_size)
            if s not in starts:
                starts.append(s)
        return starts

    @torch.no_grad()
    def sample(self, lq, generator=None):
        """Super-resolve ``lq``.

        Args:
            lq (Tensor): (B, 3, H, W) RGB in [0, 1] (any float dtype/device; moved to the teacher's device).
            generator (torch.Generator | list | None): random source; None uses the global RNG (then
                ``torch.manual_seed(s)`` before the call reproduces the official sampler with seed s);
                one generator draws each noise tensor for the whole batch; a list of B generators (any
                device; CPU ones give the same noise everywhere) gives image i its own stream, drawn
                in the order a batch of one draws it (per patch when chopped: prior noise, then one
                per step), so ``sample(lq, [g0, g1])`` equals ``cat(sample(lq[:1], g0),
                sample(lq[1:], g1))`` up to the float arithmetic of the batched network calls.

        Returns:
            Tensor: (B, 3, sf*H, sf*W) float32 RGB in [0, 1], on the teacher's (the UNet's) device.
        """
        if not torch.is_tensor(lq) or lq.dim() != 4 or lq.shape[1] != 3:
            shape = tuple(lq.shape) if torch.is_tensor(lq) else type(lq).__name__
            raise ValueError(f'ResShiftTeacher.sample: expected an RGB tensor (B, 3, H, W) in [0, 1], got {shape}')
        if not lq.is_floating_point():
            raise ValueError(f'ResShiftTeacher.sample: expected a float tensor in [0, 1], got {lq.dtype}')
        if lq.numel() == 0:
            raise ValueError(f'ResShiftTeacher.sample: empty input {tuple(lq.shape)}')
        lo, hi = float(lq.min()), float(lq.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(f'ResShiftTeacher.sample: expected values in [0, 1], got [{lo:.4g}, {hi:.4g}]')
        # follow the networks if the teacher was moved with .to() after construction
        self.device = next(self.unet.parameters()).device
        self._check_precision(self.precision, self.device)
        y = (lq.to(self.device, torch.float32) - 0.5) / 0.5
        b, _, h, w = y.shape
        check_generators(generator, b, 'ResShiftTeacher.sample')
        sf = self.diffusion.sf
        if h > self.chop_size or w > self.chop_size:
            # equal-weight average of overlapping patch results, as the official ImageSpliterTh; the
            # patches are sampled one after another, so per-image generators draw patch by patch in
            # the order of a batch of one
            acc = torch.zeros(b, 3, h * sf, w * sf, device=self.device)
            count = torch.zeros(1, 1, h * sf, w * sf, device=self.device)
            for hs in self._starts(h):
                for ws in self._starts(w):
                    patch = y[..., hs:hs + self.chop_size, ws:ws + self.chop_size]
                    out = self._sample_patch(patch, generator)
                    acc[..., hs * sf:hs * sf + out.shape[-2], ws * sf:ws * sf + out.shape[-1]] += out
                    count[..., hs * sf:hs * sf + out.shape[-2], ws * sf:ws * sf + out.shape[-1]] += 1
            out = acc / count
        else:
            out = self._sample_patch(y, generator)
        return out * 0.5 + 0.5

    def forward(self, lq, generator=None):
        """Same as :meth:`sample`."""
        return self.sample(lq, generator=generator)


def build_teacher(opt, random_weights=False, seed=0, **overrides):
    """The one way to build a :class:`ResShiftTeacher`: from an option file or dict.

    ``overrides`` replace ``sampler`` values (see :meth:`ResShiftTeacher.from_options`). With
    ``random_weights`` the networks keep their (seeded) initialisation and the ``ckpt`` keys are ignored
    (benchmarks without the release files).
    """
    if random_weights:
        torch.manual_seed(seed)
    return ResShiftTeacher.from_options(opt, random_weights=random_weights, **overrides)

__all__ = ['build_teacher', 'ResShiftTeacher', 'SAMPLER_DEFAULTS', 'PRECISIONS', 'DIFFUSION_DEFAULTS']
