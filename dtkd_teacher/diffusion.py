"""ResShift residual-shifting diffusion: schedule, forward process and sampling loop.

ResShift (Yue et al., "ResShift: Efficient Diffusion Model for Image Super-resolution by Residual
Shifting", NeurIPS 2023; official code github.com/zsyOAOA/ResShift) moves the latent of the HR image
``x_0`` towards the latent of the (bicubic up-sampled) LR image ``y`` in ``T`` steps:

    q(x_t | x_0, y) = N(x_0 + eta_t (y - x_0), kappa^2 eta_t I),     eta_1 < ... < eta_T ~ 1

so sampling starts next to ``y`` (``x_T = y + kappa sqrt(eta_T) eps``) instead of pure noise.

This module holds only the process (schedule, ``q_sample``, posterior, ``p_sample`` loop); the
networks are passed in. Every formula follows the official ``models/gaussian_diffusion.py``,
``models/respace.py`` and ``models/script_util.py``; the random draws follow the official
``p_sample_loop`` order (prior noise, then one noise tensor per step, the last one masked), so with
the same seed the results are the same. A list of generators, one per batch element, gives each
element its own stream in that order, so a batch gives each image what it would get alone.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

from dtkd_compat import OptionError

PREDICT_TYPES = ('xstart', 'epsilon', 'epsilon_scale', 'residual')
SCHEDULES = ('exponential',)

# official `diffusion.params` keys (configs/*.yaml of the official code) and their defaults
# (models/script_util.py: create_gaussian_diffusion)
DIFFUSION_DEFAULTS = {
    'sf': 4,
    'schedule_name': None,
    'schedule_kwargs': None,
    'etas_end': 0.99,
    'steps': 1000,
    'min_noise_level': 0.01,
    'kappa': 1.0,
    'weighted_mse': False,
    'predict_type': 'xstart',
    'timestep_respacing': None,
    'scale_factor': None,
    'normalize_input': None,
    'latent_flag': True,
}
_REQUIRED = ('schedule_name', 'normalize_input')


def exponential_sqrt_eta_schedule(steps, min_noise_level, etas_end=0.99, kappa=1.0, power=0.3):
    """The official 'exponential' schedule of sqrt(eta_t), t = 0 .. steps-1 (ResShift paper, Eq. 10).

    sqrt(eta_1) = min(min_noise_level / kappa, min_noise_level), sqrt(eta_T) = etas_end, and
    sqrt(eta_t) = sqrt(eta_1) * b^{beta_t} with b = (etas_end / sqrt(eta_1))^{1/(T-1)} and
    beta_t = ((t-1)/(T-1))^power * (T-1).

    Args:
        steps (int): T >= 2 (the official formula divides by T-1).
        min_noise_level (float), etas_end (float), kappa (float), power (float): official names.

    Returns:
        np.ndarray: float64, shape (T,), increasing.
    """
    if int(steps) != steps or steps < 2:
        raise OptionError(f"diffusion.steps: expected an integer >= 2, got {steps!r}")
    steps = int(steps)
    etas_start = min(min_noise_level / kappa, min_noise_level)
    increaser = math.exp(1 / (steps - 1) * math.log(etas_end / etas_start))
    base = np.ones([steps]) * increaser
    power_timestep = np.linspace(0, 1, steps, endpoint=True) ** power
    power_timestep *= steps - 1
    return np.power(base, power_timestep) * etas_start


def space_timesteps(num_timesteps, sample_steps):
    """Original timesteps kept when sampling with ``sample_steps`` < ``num_timesteps`` steps.

    For ``sample_steps >= 2`` this is the official ``models/respace.py: space_timesteps``:
    ``{int(T / n * i) for i < n}`` (which starts below T-1, e.g. 15 -> 4 gives [0, 3, 7, 11]).
    The official code cannot build a one-step process (an IndexError in its clipped posterior
    variance); here one step means one x_0 prediction from the prior at the last trained timestep
    T-1, i.e. ``[T-1]``, the usual one-step use of a ResShift model.

    Returns:
        list[int]: sorted original timesteps.
    """
    if int(sample_steps) != sample_steps or not 1 <= sample_steps <= num_timesteps:
        raise OptionError(
            f'diffusion.timestep_respacing: expected an integer in [1, {num_timesteps}], got {sample_steps!r}')
    sample_steps = int(sample_steps)
    if sample_steps == 1:
        return [num_timesteps - 1]
    return sorted({int((num_timesteps / sample_steps) * x) for x in range(sample_steps)})


def _is_generator_list(generator):
    return isinstance(generator, (list, tuple))


def check_generators(generator, batch, where='sample'):
    """Check a ``generator`` argument for a batch of ``batch``: None, one ``torch.Generator``, or a
    list/tuple of exactly ``batch`` generators (one per batch element). Returns it unchanged."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if not _is_generator_list(generator):
        raise TypeError(f'{where}: generator must be None, a torch.Generator or a list of them, '
                        f'got {type(generator).__name__}')
    if len(generator) != batch:
        raise ValueError(f'{where}: {len(generator)} generators for a batch of {batch} (one per image)')
    bad = [type(g).__name__ for g in generator if not isinstance(g, torch.Generator)]
    if bad:
        raise TypeError(f'{where}: every element of the generator list must be a torch.Generator, got {bad[0]}')
    return generator


def _draw_noise(shape, like, generator):
    """Standard normal noise of ``shape`` with ``like``'s dtype/device.

    Without a generator this is ``torch.randn_like`` on the global RNG (the official draws). A
    generator living on another device draws there and the result is moved, so a CPU generator
    gives the same noise on every device. A list of generators (one per batch element) draws element
    i's ``shape[1:]`` noise from generator i, in list order: element i gets exactly the noise a batch
    of one would get from that generator, whatever its batch-mates.
    """
    if generator is None:
        return torch.randn(shape, dtype=like.dtype, device=like.device)
    if _is_generator_list(generator):
        check_generators(generator, shape[0], '_draw_noise')
        parts = [torch.randn((1, *shape[1:]), generator=g, dtype=like.dtype, device=g.device) for g in generator]
        if len({p.device for p in parts}) > 1:
            parts = [p.to(like.device) for p in parts]
        return torch.cat(parts).to(like.device)  # one host-to-device copy for CPU generators
    noise = torch.randn(shape, generator=generator, dtype=like.dtype, device=generator.device)
    return noise.to(like.device)


class ResShiftDiffusion:
    """The ResShift process for T (possibly respaced) steps.

    Args:
        sqrt_etas (array): float64 (T_full,), sqrt(eta_t) of the trained process.
        kappa (float): noise scale kappa.
        predict_type (str): what the network outputs: 'xstart' (x_0, the official real-SR model),
            'epsilon', 'epsilon_scale' (kappa sqrt(eta_t) eps) or 'residual' (y - x_0).
        sf (int): LR -> HR scale; the LR image is bicubic up-sampled by ``sf`` before encoding.
        scale_factor (float | None): latent scale (latent = encode(x) * scale_factor); None = 1.
        normalize_input (bool): divide the network input x_t by its expected std (official).
        latent_flag (bool): normalisation rule for latent (True) or pixel space (False).
        weighted_mse (bool): weight the training MSE with the KL-derived weights.
        sample_steps (int | None): respace to this many steps (official ``timestep_respacing``).

    Schedule arrays (float64 numpy, length ``num_timesteps``) carry the official names:
    ``sqrt_etas, etas, etas_prev, alpha, posterior_variance, posterior_variance_clipped,
    posterior_log_variance_clipped, posterior_mean_coef1, posterior_mean_coef2, weight_loss_mse``;
    ``timestep_map`` gives the original timestep of each (respaced) index, which the network sees.
    """

    def __init__(self, sqrt_etas, kappa, predict_type='xstart', sf=4, scale_factor=None, normalize_input=True,
                 latent_flag=True, weighted_mse=False, sample_steps=None):
        if predict_type not in PREDICT_TYPES:
            raise OptionError(f'diffusion.predict_type: expected one of {PREDICT_TYPES}, got {predict_type!r}')
        full = np.asarray(sqrt_etas, dtype=np.float64)
        if full.ndim != 1 or not ((full**2 > 0).all() and (full**2 <= 1).all()):
            raise OptionError('diffusion: etas must be a 1-D schedule in (0, 1]')
        if not kappa > 0:
            raise OptionError(f'diffusion.kappa: expected > 0, got {kappa!r}')
        self.kappa = float(kappa)
        self.predict_type = predict_type
        self.sf = int(sf)
        self.scale_factor = 1.0 if scale_factor is None else float(scale_factor)
        self.normalize_input = bool(normalize_input)
        self.latent_flag = bool(latent_flag)
        self.weighted_mse = bool(weighted_mse)
        self.num_train_timesteps = len(full)

        steps = len(full) if sample_steps is None else sample_steps
        kept = space_timesteps(len(full), steps)
        self.timestep_map = torch.tensor(kept, dtype=torch.long)
        self.sqrt_etas = full[kept]
        self.etas = self.sqrt_etas**2
        self.num_timesteps = len(kept)
        self.etas_prev = np.append(0.0, self.etas[:-1])
        self.alpha = self.etas - self.etas_prev

        # posterior q(x_{t-1} | x_t, x_0) = N(coef1 x_t + coef2 x_0, kappa^2 eta_{t-1} / eta_t * alpha_t)
        self.posterior_variance = kappa**2 * self.etas_prev / self.etas * self.alpha
        if self.num_timesteps > 1:
            # the variance is 0 at t = 0 (never used: no noise is added there); clip as the official code
            self.posterior_variance_clipped = np.append(self.posterior_variance[1], self.posterior_variance[1:])
            self.posterior_log_variance_clipped = np.log(self.posterior_variance_clipped)
        else:
            self.posterior_variance_clipped = self.posterior_variance.copy()
            self.posterior_log_variance_clipped = np.zeros(1)
        self.posterior_mean_coef1 = self.etas_prev / self.etas
        self.posterior_mean_coef2 = self.alpha / self.etas

        if self.num_timesteps > 1:
            if predict_type in ('xstart', 'residual'):
                self.weight_loss_mse = 0.5 / self.posterior_variance_clipped * (self.alpha / self.etas)**2
            else:
                self.weight_loss_mse = 0.5 / self.posterior_variance_clipped * (
                    kappa * self.alpha / ((1 - self.etas) * self.sqrt_etas))**2
        else:
            self.weight_loss_mse = np.ones(1)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_options(cls, opt, sample_steps=None, prefix='diffusion', steps_key='steps'):
        """Build from the official ``diffusion.params`` dict.

        Args:
            opt (dict): keys of ``DIFFUSION_DEFAULTS`` (``schedule_name`` and ``normalize_input`` required).
            sample_steps (int | None): overrides ``timestep_respacing`` when given.
            prefix (str): option path used in error messages.
            steps_key (str): option name of ``sample_steps`` for error messages.
        """
        if not isinstance(opt, dict):
            raise OptionError(f'{prefix}: expected a mapping of options, got {type(opt).__name__}')
        unknown = sorted(set(opt) - set(DIFFUSION_DEFAULTS))
        if unknown:
            raise OptionError(
                f'{prefix}.{unknown[0]}: unknown option (known: {", ".join(DIFFUSION_DEFAULTS)})')
        for key in _REQUIRED:
            if opt.get(key) is None:
                raise OptionError(f'{prefix}.{key}: required option is missing')
        o = {**DIFFUSION_DEFAULTS, **opt}
        if o['schedule_name'] not in SCHEDULES:
            raise OptionError(
                f"{prefix}.schedule_name: expected one of {SCHEDULES}, got {o['schedule_name']!r} (the official "
                "'ldm' schedule reads a .mat file and is not used by the released models)")
        skw = o['schedule_kwargs'] or {}
        if not isinstance(skw, dict) or set(skw) - {'power'} or 'power' not in skw:
            raise OptionError(f'{prefix}.schedule_kwargs: expected {{power: <float>}}, got {skw!r}')
        for key in ('etas_end', 'min_noise_level', 'kappa'):
            if not isinstance(o[key], (int, float)) or isinstance(o[key], bool) or not o[key] > 0:
                raise OptionError(f'{prefix}.{key}: expected a positive number, got {o[key]!r}')
        if not o['etas_end'] <= 1:
            raise OptionError(f"{prefix}.etas_end: expected <= 1, got {o['etas_end']!r}")
        if not isinstance(o['sf'], int) or o['sf'] < 1:
            raise OptionError(f"{prefix}.sf: expected a positive integer, got {o['sf']!r}")
        if o['predict_type'] not in PREDICT_TYPES:
            raise OptionError(
                f"{prefix}.predict_type: expected one of {PREDICT_TYPES}, got {o['predict_type']!r}")
        if not isinstance(o['steps'], int) or isinstance(o['steps'], bool) or o['steps'] < 2:
            raise OptionError(f"{prefix}.steps: expected an integer >= 2, got {o['steps']!r}")
        steps = o['timestep_respacing'] if sample_steps is None else sample_steps
        key = f'{prefix}.timestep_respacing' if sample_steps is None else steps_key
        if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool)
                                  or not 1 <= steps <= o['steps']):
            raise OptionError(f"{key}: expected an integer in [1, {prefix}.steps = {o['steps']}], "
                                       f'got {steps!r}')
        sqrt_etas = exponential_sqrt_eta_schedule(o['steps'], o['min_noise_level'], o['etas_end'], o['kappa'],
                                                  skw['power'])
        return cls(sqrt_etas, o['kappa'], predict_type=o['predict_type'], sf=o['sf'], scale_factor=o['scale_factor'],
                   normalize_input=o['normalize_input'], latent_flag=o['latent_flag'],
                   weighted_mse=o['weighted_mse'], sample_steps=steps)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _extract(arr, t, shape):
        """arr[t] as float32 broadcastable to ``shape`` (official ``_extract_into_tensor``)."""
        res = torch.from_numpy(np.asarray(arr)).to(device=t.device)[t].float()
        while res.dim() < len(shape):
            res = res[..., None]
        return res.expand(shape)

    def model_timesteps(self, t):
        """Original (trained) timesteps the network sees for respaced indices ``t`` (B,) long."""
        return self.timestep_map.to(device=t.device, dtype=t.dtype)[t]

    def scale_input(self, x_t, t):
        """Network input: x_t divided by its expected scale (official ``_scale_input``)."""
        if not self.normalize_input:
            return x_t
        if self.latent_flag:
            std = torch.sqrt(self._extract(self.etas, t, x_t.shape) * self.kappa**2 + 1)
            return x_t / std
        inputs_max = self._extract(self.sqrt_etas, t, x_t.shape) * self.kappa * 3 + 1
        return x_t / inputs_max

    # ------------------------------------------------------------------ forward process / training
    def q_sample(self, x_start, y, t, noise):
        """Sample x_t ~ q(x_t | x_0, y) = x_0 + eta_t (y - x_0) + kappa sqrt(eta_t) noise.

        Args:
            x_start (Tensor): (B, C, H, W) latent of the HR image.
            y (Tensor): (B, C, H, W) latent of the up-sampled LR image.
            t (Tensor): (B,) long, indices into this (possibly respaced) process.
            noise (Tensor): standard normal noise of x_start's shape.
        """
        if noise.shape != x_start.shape:
            raise ValueError(f'q_sample: noise shape {tuple(noise.shape)} != x_start shape {tuple(x_start.shape)}')
        return (self._extract(self.etas, t, x_start.shape) * (y - x_start) + x_start
                + self._extract(self.sqrt_etas * self.kappa, t, x_start.shape) * noise)

    def training_target(self, x_start, y, t, noise):
        """Regression target of the network for ``predict_type`` (official ``training_losses``)."""
        if self.predict_type == 'xstart':
            return x_start
        if self.predict_type == 'residual':
            return y - x_start
        if self.predict_type == 'epsilon':
            return noise
        return noise * self.kappa * self._extract(self.sqrt_etas, t, noise.shape)

    def training_loss(self, model_output, x_start, y, t, noise):
        """Per-sample loss (B,) as the official ``training_losses(...)[0]['mse']``."""
        target = self.training_target(x_start, y, t, noise)
        mse = ((target - model_output)**2).mean(dim=list(range(1, target.dim())))
        if self.predict_type == 'epsilon_scale':
            mse = mse / (self.kappa**2 * self._extract(self.etas, t, t.shape))
        if self.weighted_mse:
            mse = mse * self._extract(self.weight_loss_mse, t, t.shape)
        return mse

    def predict_xstart(self, model_output, x_t, y, t):
        """x_0 implied by the network output for ``predict_type``."""
        if self.predict_type == 'xstart':
            return model_output
        if self.predict_type == 'residual':
            return y - model_output
        if self.predict_type == 'epsilon':
            return (x_t - self._extract(self.sqrt_etas, t, x_t.shape) * self.kappa * model_output
                    - self._extract(self.etas, t, x_t.shape) * y) / self._extract(1 - self.etas, t, x_t.shape)
        return (x_t - model_output - self._extract(self.etas, t, x_t.shape) * y) / self._extract(
            1 - self.etas, t, x_t.shape)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = (self._extract(self.posterior_mean_coef1, t, x_t.shape) * x_t
                + self._extract(self.posterior_mean_coef2, t, x_t.shape) * x_start)
        return (mean, self._extract(self.posterior_variance, t, x_t.shape),
                self._extract(self.posterior_log_variance_clipped, t, x_t.shape))

    # ------------------------------------------------------------------ sampling
    def prior_sample(self, y, noise):
        """x_T = y + kappa sqrt(eta_T) noise (the start of the reverse process)."""
        t = torch.full((y.shape[0],), self.num_timesteps - 1, device=y.device, dtype=torch.long)
        return y + self._extract(self.kappa * self.sqrt_etas, t, y.shape) * noise

    def p_mean_variance(self, model, x_t, y, t, clip_denoised=False, model_kwargs=None):
        """Network call and posterior for one reverse step.

        Args:
            model (callable): ``model(x, timesteps, **model_kwargs)`` with the original timesteps.
            t (Tensor): (B,) long indices into this process.
        Returns:
            dict: 'mean', 'variance', 'log_variance', 'pred_xstart'.
        """
        out = model(self.scale_input(x_t, t), self.model_timesteps(t), **(model_kwargs or {}))
        out = out.to(x_t.dtype)
        pred_xstart = self.predict_xstart(out, x_t, y, t)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        return {'mean': mean, 'variance': self._extract(self.posterior_variance, t, x_t.shape),
                'log_variance': self._extract(self.posterior_log_variance_clipped, t, x_t.shape),
                'pred_xstart': pred_xstart}

    def p_sample(self, model, x_t, y, t, generator=None, noise=None, clip_denoised=False, model_kwargs=None):
        """x_{t-1} ~ p(x_{t-1} | x_t) for (B,) indices ``t``.

        The noise is drawn after the network call (official order) unless given; it is drawn but
        masked where t == 0, as in the official code, so the random stream stays aligned.
        ``generator``: None (global RNG), one ``torch.Generator`` for the whole batch, or a list with
        one generator per batch element (see :meth:`sample_latent`).
        """
        out = self.p_mean_variance(model, x_t, y, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        if noise is None:
            noise = _draw_noise(x_t.shape, x_t, generator)
        nonzero_mask = (t != 0).float().view(-1, *([1] * (x_t.dim() - 1)))
        sample = out['mean'] + nonzero_mask * torch.exp(0.5 * out['log_variance']) * noise
        return {'sample': sample, 'pred_xstart': out['pred_xstart'], 'mean': out['mean']}

    def sample_latent(self, model, z_y, generator=None, clip_denoised=False, model_kwargs=None, callback=None):
        """Run the reverse process from the prior around ``z_y`` and return the final latent.

        Random draws, in order: the prior noise, then one noise tensor per step (also at the last
        step, where it is masked), each of ``z_y``'s shape: the official ``p_sample_loop`` order.

        Args:
            model (callable): network, ``model(x, timesteps, **model_kwargs)``.
            z_y (Tensor): (B, C, h, w) latent of the up-sampled LR image.
            generator (torch.Generator | list | None): None uses the global RNG (as the official code);
                one generator draws each noise tensor for the whole batch at once; a list of B
                generators gives batch element i its own stream (prior noise, then one draw per
                step, each of shape ``z_y.shape[1:]``), so element i's result is that of a batch of
                one sampled with generator i, up to the float arithmetic of the batched network call.
            callback (callable | None): called as ``callback(step_index, out_dict)`` after each step.
        Returns:
            Tensor: (B, C, h, w) final latent x_0.
        """
        check_generators(generator, z_y.shape[0], 'sample_latent')
        x = self.prior_sample(z_y, _draw_noise(z_y.shape, z_y, generator))
        for i in reversed(range(self.num_timesteps)):
            t = torch.full((z_y.shape[0],), i, device=z_y.device, dtype=torch.long)
            with torch.no_grad():
                out = self.p_sample(model, x, z_y, t, generator=generator, clip_denoised=clip_denoised,
                                    model_kwargs=model_kwargs)
            x = out['sample']
            if callback is not None:
                callback(i, out)
        return x

    def encode_first_stage(self, y, autoencoder, up_sample=False):
        """Latent of ``y`` (B, 3, H, W) in [-1, 1]: bicubic x``sf`` first when ``up_sample``, then
        ``autoencoder.encode(y) * scale_factor``; without an autoencoder the (up-sampled) image itself."""
        if up_sample and self.sf != 1:
            y = F.interpolate(y, scale_factor=self.sf, mode='bicubic')
        if autoencoder is None:
            return y
        with torch.no_grad():
            z = autoencoder.encode(y) * self.scale_factor
        return z.to(y.dtype)

    def decode_first_stage(self, z, autoencoder):
        """Image in about [-1, 1] from latent ``z``: ``autoencoder.decode(z / scale_factor)``."""
        if autoencoder is None:
            return z
        with torch.no_grad():
            out = autoencoder.decode(1 / self.scale_factor * z)
        return out.to(z.dtype)

    def p_sample_loop(self, y, model, autoencoder=None, generator=None, model_kwargs=None, clip_denoised=None):
        """LR image ``y`` (B, 3, h, w) in [-1, 1] -> sample (B, 3, h*sf, w*sf), not clamped.

        ``clip_denoised`` defaults to the official choice: clip x_0 to [-1, 1] only in pixel space.
        ``generator``: None, one generator, or one per batch element (see :meth:`sample_latent`).
        """
        if clip_denoised is None:
            clip_denoised = autoencoder is None
        z_y = self.encode_first_stage(y, autoencoder, up_sample=True).float()
        z = self.sample_latent(model, z_y, generator=generator, clip_denoised=clip_denoised,
                               model_kwargs=model_kwargs)
        return self.decode_first_stage(z, autoencoder)
