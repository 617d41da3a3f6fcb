"""ResShiftModel: train or fine-tune the ResShift denoiser with BasicSR's training runner.

ResShift (Yue et al., "ResShift: Efficient Diffusion Model for Image Super-resolution by Residual
Shifting", NeurIPS 2023; github.com/zsyOAOA/ResShift) is trained as the official ``trainer.py``
(``TrainerDifIR.training_step``) and ``models/gaussian_diffusion.py`` (``training_losses``) do:

1. images to [-1, 1]; ``z_0 = E(x_HR) * scale_factor`` and ``z_y = E(bicubic_sf(y_LR)) * scale_factor``
   with the frozen first-stage autoencoder ``E`` (pixel space: ``E`` is the identity);
2. ``t ~ U{0, ..., T-1}`` per sample, ``eps ~ N(0, I)``, ``z_t = z_0 + eta_t (z_y - z_0) + kappa sqrt(eta_t) eps``;
3. ``loss = mean_b || f(scale_input(z_t), t, lq) - target ||^2`` with ``target = z_0`` for
   ``predict_type: xstart`` (the released models), per-sample mean over C, H, W, multiplied by the
   KL-derived weights when ``diffusion.weighted_mse`` is true.

The network sees the LR image in [-1, 1] (official ``model_kwargs = {'lq': lq}``). In latent space
(VQ-f4 autoencoder, x4) the LR image has the latent's size, as the official models use it. In pixel
space the network works at HR size and the official UNet cannot take a smaller conditioning image,
so there it sees the bicubic up-sampled LR (``z_y``) and needs ``lq_size == image_size``.

Options (besides BasicSR's usual ``datasets``, ``train``, ``val``, ``logger``, ``path``):

- ``network_g``: ``type: ResShiftUNet`` plus the official ``model.params``;
- ``autoencoder``: ``{type: VQAutoencoder, ckpt: <path>, <official autoencoder.params>}``, or ``~``
  for pixel space (the key is required so that pixel space is never chosen by omission);
- ``diffusion``: the official ``diffusion.params`` (``dtkd_teacher.diffusion``);
- ``path.pretrain_network_g``: fine-tune from a checkpoint; the released ``resshift_realsrx4_s15_v1.pth``
  (a bare state dict) loads as well as BasicSR's ``{'params': ..., 'params_ema': ...}`` files;
- ``train.optim_g.type``: ``Adam`` or ``AdamW`` (the official trainer uses AdamW);
  ``train.ema_decay``: the official ``ema_rate`` (0.999); the EMA weights are saved as ``params_ema``
  and used for validation (official ``use_ema_val``);
- ``val``: ``steps`` (sampling steps, default all trained steps), ``seed`` (the validation noise is
  drawn from a generator with this seed, default 0, so the metrics of different iterations are
  comparable), ``pad_multiple`` (LR pixels; default the smallest multiple the networks accept),
  ``chop_size`` / ``chop_stride`` (as the teacher sampler). Samples come from
  :class:`dtkd_teacher.teacher.ResShiftTeacher`, the sampler the trained model is later used with.

The saved ``net_g_<iter>.pth`` (``params`` and, with EMA, ``params_ema``) is a teacher checkpoint:
``unet.ckpt`` of a teacher option file loads it (its loader prefers ``params_ema``). A pixel-space
model additionally needs its sampler to pass the up-sampled LR image (:class:`_UpsampledLQ` here).
"""
from collections import OrderedDict

import torch
from basicsr.archs import build_network
from basicsr.models.sr_model import SRModel
from basicsr.utils import get_root_logger
from basicsr.utils.registry import ARCH_REGISTRY, MODEL_REGISTRY
from torch.nn.parallel import DistributedDataParallel

from dtkd_arch.checkpoint import (
    CheckpointFormatError,
    CheckpointMismatchError,
    describe_mismatch,
    load_pretrained,
    load_state_dict_file,
    safe_torch_load,
)
from dtkd_compat import OptionError
from dtkd_model.dtkd_model import DTKDModel
from dtkd_model.safe_training import SafeTrainingMixin, max_nonfinite_steps
from dtkd_teacher.diffusion import ResShiftDiffusion

OPTIMIZERS = {'Adam': torch.optim.Adam, 'AdamW': torch.optim.AdamW}


def load_network_state(path, param_key='params'):
    """The state dict to load from ``path`` for BasicSR's ``param_key``.

    BasicSR files hold ``{'params': ..., 'params_ema': ...}``: ``param_key`` is taken, falling back
    to ``'params'`` (as BasicSR does when ``params_ema`` is absent). Any other layout (the released
    ResShift files are bare state dicts) is read by :func:`dtkd_arch.checkpoint.load_state_dict_file`.
    ``module.`` / ``_orig_mod.`` prefixes are removed.

    Returns:
        tuple(dict[str, Tensor], str): the state dict and the key it came from ('<file>' for the whole file).
    """
    raw = safe_torch_load(path, what='network checkpoint', option_key='path.pretrain_network_g')
    if isinstance(raw, dict) and param_key is not None:
        for key in (param_key, 'params'):
            if isinstance(raw.get(key), dict):
                state = {}
                for k, v in raw[key].items():
                    for prefix in ('module.', '_orig_mod.'):
                        if k.startswith(prefix):
                            k = k[len(prefix):]
                    state[k] = v
                return state, key
    return load_state_dict_file(path), '<file>'


@MODEL_REGISTRY.register()
class ResShiftModel(SafeTrainingMixin, SRModel):
    """Trains ``net_g`` (ResShiftUNet) with ResShift's objective; validation samples with the teacher sampler."""

    def __init__(self, opt):
        self._check_options(opt)
        self.diffusion = ResShiftDiffusion.from_options(opt['diffusion'])
        device = torch.device('cuda' if opt.get('num_gpu', 0) != 0 else 'cpu')
        self.autoencoder = self._build_autoencoder(opt['autoencoder'], device)
        self.log_dict = OrderedDict()
        if isinstance(opt.get('val'), dict):
            opt['val'].setdefault('suffix', None)  # SRModel's test-mode validation reads it
        super().__init__(opt)

    # ------------------------------------------------------------------ set-up
    @staticmethod
    def _check_options(opt):
        if 'diffusion' not in opt or not isinstance(opt['diffusion'], dict):
            raise OptionError('diffusion: required block with the official diffusion.params '
                                      '(schedule_name, steps, kappa, ...; see options/teacher/resshift_realsr_x4.yml)')
        try:
            ResShiftDiffusion.from_options(opt['diffusion'])
        except OptionError as err:
            raise OptionError(str(err)) from None
        sf = opt['diffusion'].get('sf', 4)
        if 'scale' in opt and opt['scale'] != sf:
            raise OptionError(f"diffusion.sf ({sf}) must equal scale ({opt['scale']})")
        if 'autoencoder' not in opt:
            raise OptionError('autoencoder: required: a VQAutoencoder block with ckpt (latent space, as the '
                                      'released models) or ~ for pixel space')
        net = opt.get('network_g') or {}
        if net.get('type') != 'ResShiftUNet':
            raise OptionError(f"network_g.type: ResShiftModel trains a ResShiftUNet, got {net.get('type')!r}")
        if not net.get('cond_lq', True):
            raise OptionError('network_g.cond_lq: must be true (every ResShift SR model is LR-conditioned)')
        if opt['autoencoder'] is None and net.get('lq_size', 256) != net.get('image_size'):
            raise OptionError(
                f"network_g.lq_size: in pixel space (autoencoder: ~) the network is conditioned on the up-sampled LR "
                f"image, so lq_size must equal image_size ({net.get('image_size')}), got {net.get('lq_size', 256)}")
        train = opt.get('train') or {}
        if opt.get('is_train'):
            max_nonfinite_steps(train)
        optim = train.get('optim_g') or {}
        if opt.get('is_train') and optim.get('type') not in OPTIMIZERS:
            raise OptionError(f"train.optim_g.type: expected one of {sorted(OPTIMIZERS)}, "
                                      f"got {optim.get('type')!r}")
        gt_size = ((opt.get('datasets') or {}).get('train') or {}).get('gt_size')
        if opt.get('is_train') and gt_size is not None:
            down = _autoencoder_downscale(opt['autoencoder'])
            mult = _unet_multiple(net)
            if gt_size % down or (gt_size // down) % mult:
                raise OptionError(
                    f'datasets.train.gt_size: {gt_size} gives a {gt_size / down:g}-pixel network input, which must be '
                    f'a multiple of {mult} (window_size * 2^(len(channel_mult) - 1)); the autoencoder divides by '
                    f'{down}')

    @staticmethod
    def _build_autoencoder(block, device):
        if block is None:
            return None
        if not isinstance(block, dict):
            raise OptionError('autoencoder: expected a mapping {type: VQAutoencoder, ckpt: ..., ...} or ~')
        params = dict(block)
        arch = params.pop('type', None)
        ckpt = params.pop('ckpt', None)
        if not arch:
            raise OptionError('autoencoder.type: required (VQAutoencoder)')
        try:
            cls = ARCH_REGISTRY.get(arch)
        except KeyError:
            raise OptionError(f'autoencoder.type: no architecture named {arch!r} is registered') from None
        needs_ckpt = getattr(cls, 'needs_checkpoint', True)
        if not ckpt and needs_ckpt:
            raise OptionError('autoencoder.ckpt: required: the frozen first stage the latents are defined by '
                                      '(the released file is autoencoder_vq_f4.pth, ResShift release v2.0)')
        try:
            ae = cls(**params)
        except (TypeError, KeyError, ValueError) as err:
            raise OptionError(f'autoencoder: options do not fit {arch}: {err}') from None
        if not needs_ckpt and not ckpt:  # a first stage without weights (SpaceToDepthAutoencoder)
            return ae.eval().to(device)
        try:
            load_pretrained(ae, ckpt, strict=True, what='ResShift autoencoder', option_key='autoencoder.ckpt')
        except FileNotFoundError as err:
            raise OptionError(str(err)) from None
        except (CheckpointMismatchError, CheckpointFormatError) as err:
            raise OptionError(str(err)) from None
        ae.eval().requires_grad_(False)
        return ae.to(device)

    def model_to_device(self, net):
        # BasicSR passes device_ids=[current CUDA device] to DDP, which fails on a CPU process group.
        if self.opt['dist'] and self.device.type == 'cpu':
            net = net.to(self.device)
            return DistributedDataParallel(net, find_unused_parameters=self.opt.get('find_unused_parameters', False))
        return super().model_to_device(net)

    def load_network(self, net, load_path, strict=True, param_key='params'):
        """BasicSR's ``load_network`` for BasicSR files and bare state dicts (the released ResShift files);
        mismatches raise an error listing the differing keys and shapes."""
        net = self.get_bare_model(net)
        state, key = load_network_state(load_path, param_key)
        missing, unexpected, shapes = describe_mismatch(net.state_dict(), state)
        if shapes or (strict and (missing or unexpected)):
            lines = [f"checkpoint '{load_path}' ({key}) does not fit network_g ({type(net).__name__}):"]
            for title, items in (('missing', missing), ('unexpected', unexpected), ('shape differences', shapes)):
                if items:
                    more = ' ...' if len(items) > 8 else ''
                    lines.append(f'  {len(items)} {title}: ' + ', '.join(items[:8]) + more)
            raise OptionError('\n'.join(lines))
        get_root_logger().info(f'Loading {type(net).__name__} model from {load_path}, with param key: [{key}].')
        net.load_state_dict(state, strict=strict)

    def get_optimizer(self, optim_type, params, lr, **kwargs):
        if optim_type not in OPTIMIZERS:
            raise OptionError(f'train.optim_g.type: expected one of {sorted(OPTIMIZERS)}, got {optim_type!r}')
        return OPTIMIZERS[optim_type](params, lr, **kwargs)

    def init_training_settings(self):
        self.net_g.train()
        train_opt = self.opt['train']
        self.ema_decay = train_opt.get('ema_decay', 0)
        if self.ema_decay > 0:
            get_root_logger().info(f'Use Exponential Moving Average with decay: {self.ema_decay}')
            self.net_g_ema = build_network(self.opt['network_g']).to(self.device)
            load_path = self.opt['path'].get('pretrain_network_g')
            if load_path is not None:
                self.load_network(self.net_g_ema, load_path, self.opt['path'].get('strict_load_g', True), 'params_ema')
            else:
                self.model_ema(0)
            self.net_g_ema.eval()
        self.setup_optimizers()
        self.setup_schedulers()

    # ------------------------------------------------------------------ training
    def _condition(self, lq_m11, z_y):
        """The LR conditioning the network sees: the LR image (latent space) or its up-sampled version (pixel)."""
        return z_y if self.autoencoder is None else lq_m11

    def diffusion_inputs(self, lq, gt, t=None, noise=None):
        """Latents, timesteps and noise of one training step (official ``training_losses``).

        Args:
            lq (Tensor): (B, 3, h, w) LR in [0, 1]. gt (Tensor): (B, 3, sf*h, sf*w) HR in [0, 1].
            t (Tensor | None): (B,) long step indices in [0, T); drawn uniformly when None.
            noise (Tensor | None): standard normal noise of z_0's shape; drawn when None.

        Returns:
            dict with z_start, z_y, z_t, t, noise, cond (the network's ``lq`` argument).
        """
        if gt.shape[-2:] != (lq.shape[-2] * self.diffusion.sf, lq.shape[-1] * self.diffusion.sf):
            raise ValueError(f'ResShiftModel: GT {tuple(gt.shape[-2:])} is not {self.diffusion.sf} x LQ '
                             f'{tuple(lq.shape[-2:])}')
        lq_m11, gt_m11 = lq * 2 - 1, gt * 2 - 1
        z_y = self.diffusion.encode_first_stage(lq_m11, self.autoencoder, up_sample=True)
        z_start = self.diffusion.encode_first_stage(gt_m11, self.autoencoder, up_sample=False)
        if t is None:
            t = torch.randint(0, self.diffusion.num_timesteps, (gt.shape[0],), device=gt.device)
        if noise is None:
            noise = torch.randn_like(z_start)
        z_t = self.diffusion.q_sample(z_start, z_y, t, noise)
        return {'z_start': z_start, 'z_y': z_y, 'z_t': z_t, 't': t, 'noise': noise,
                'cond': self._condition(lq_m11, z_y)}

    def diffusion_loss(self, net, inputs):
        """Per-sample loss (B,) of ``net`` on ``diffusion_inputs`` (official ``training_losses(...)['mse']``)."""
        d = self.diffusion
        out = net(d.scale_input(inputs['z_t'], inputs['t']), d.model_timesteps(inputs['t']), lq=inputs['cond'])
        return d.training_loss(out, inputs['z_start'], inputs['z_y'], inputs['t'], inputs['noise'])

    def optimize_parameters(self, current_iter):
        self.optimizer_g.zero_grad(set_to_none=True)
        inputs = self.diffusion_inputs(self.lq, self.gt)
        losses = self.diffusion_loss(self.net_g, inputs)
        loss = losses.mean()
        loss.backward()
        loss_dict = OrderedDict(l_mse=loss.detach())
        stepped = self.finite_step(loss, loss_dict, current_iter)
        if stepped:
            self.optimizer_g.step()

        self.log_dict = self.reduce_loss_dict(loss_dict)
        if stepped and self.ema_decay > 0:
            self.model_ema(decay=self.ema_decay)

    # ------------------------------------------------------------------ sampling
    def _pad_multiple(self):
        val = self.opt.get('val') or {}
        if val.get('pad_multiple') is not None:
            return int(val['pad_multiple'])
        down = _autoencoder_downscale(self.opt['autoencoder'])
        mult = _unet_multiple(self.opt['network_g'])
        sf = self.diffusion.sf
        k = 1
        while (k * sf) % down or (k * sf // down) % mult:
            k += 1
        return k

    def sample(self, lq, net=None, generator=None):
        """Super-resolve ``lq`` (B, 3, h, w) in [0, 1] with the ResShift sampler; returns (B, 3, sf*h, sf*w) in [0, 1].

        Uses ``net`` (default: the EMA network if any, else ``net_g``) inside
        :class:`~dtkd_teacher.teacher.ResShiftTeacher` with ``val.steps`` steps.
        """
        from dtkd_teacher.teacher import SAMPLER_DEFAULTS, ResShiftTeacher

        if net is None:
            net = self.net_g_ema if hasattr(self, 'net_g_ema') else self.net_g
        net = self.get_bare_model(net)
        val = self.opt.get('val') or {}
        flags = [p.requires_grad for p in net.parameters()]
        was_training = net.training
        try:
            sampler = ResShiftTeacher(net, self.autoencoder, self.opt['diffusion'], steps=val.get('steps'),
                                      chop_size=val.get('chop_size', SAMPLER_DEFAULTS['chop_size']),
                                      chop_stride=val.get('chop_stride', SAMPLER_DEFAULTS['chop_stride']),
                                      pad_multiple=self._pad_multiple(), device=self.device, cond_lq=True)
            out = sampler.sample(lq, generator=generator)
        finally:
            # the sampler freezes what it wraps; hand the network back as it was
            for p, flag in zip(net.parameters(), flags):
                p.requires_grad_(flag)
            net.train(was_training)
        return out

    # validation records per-image metrics and, in test runs (``dtkd-test``), writes the same summary
    # files as DTKDModel, so teacher and students are reported side by side
    nondist_validation = DTKDModel.nondist_validation
    _results_recorder = DTKDModel._results_recorder
    _kd_label = DTKDModel._kd_label

    def test(self):
        seed = int((self.opt.get('val') or {}).get('seed', 0))
        generator = torch.Generator(device='cpu').manual_seed(seed)
        self.output = self.sample(self.lq, generator=generator).to(self.lq.dtype)

    def get_current_visuals(self):
        out_dict = OrderedDict(lq=self.lq.detach().cpu(), result=self.output.detach().cpu())
        if hasattr(self, 'gt'):
            out_dict['gt'] = self.gt.detach().cpu()
        return out_dict


def _autoencoder_downscale(block):
    """Spatial factor of the autoencoder block (2^(levels-1)); 1 in pixel space."""
    if not block:
        return 1
    if block.get('type') == 'SpaceToDepthAutoencoder':
        return int(block.get('factor', 4))
    ch_mult = (block.get('ddconfig') or {}).get('ch_mult', [1])
    return 2 ** (len(ch_mult) - 1)


def _unet_multiple(net_opt):
    """Side multiple the UNet's input needs: window_size * 2^(levels-1)."""
    window = int(net_opt.get('window_size', 8))
    levels = len(net_opt.get('channel_mult', (1, 2, 4, 8)))
    return window * 2 ** (levels - 1)


__all__ = ['ResShiftModel', 'OptionError', 'load_network_state', 'OPTIMIZERS']
