"""ResShift process (dtkd_model/resshift_diffusion.py) against the official code and closed forms.

``tests/data/resshift_sampler_reference.pt`` was produced by running the official ResShift code
(github.com/zsyOAOA/ResShift: models/gaussian_diffusion.py, models/respace.py,
models/script_util.py, sampler.py) on the CPU; it holds tensors and plain lists only. Its schedule
arrays are those of the official real-SR configuration (configs/realsr_swinunet_realesrgan256.yaml,
15 steps) and of its 4-step respacing. The official code cannot build a 1-step process (IndexError
in its clipped posterior variance); the 1-step arrays there are the official formulas applied to the
kept timestep {T-1}.
"""
import math
import os

import numpy as np
import pytest
import torch

from dtkd_teacher.diffusion import (
    OptionError,
    ResShiftDiffusion,
    exponential_sqrt_eta_schedule,
    space_timesteps,
)

REF_PATH = os.path.join(os.path.dirname(__file__), 'data', 'resshift_sampler_reference.pt')
SCHEDULE_NAMES = ('sqrt_etas', 'etas', 'etas_prev', 'alpha', 'posterior_variance', 'posterior_variance_clipped',
                  'posterior_log_variance_clipped', 'posterior_mean_coef1', 'posterior_mean_coef2')
# official configs/realsr_swinunet_realesrgan256.yaml, diffusion.params
REALSR = dict(sf=4, schedule_name='exponential', schedule_kwargs={'power': 0.3}, etas_end=0.99, steps=15,
              min_noise_level=0.04, kappa=2.0, weighted_mse=False, predict_type='xstart', timestep_respacing=None,
              scale_factor=1.0, normalize_input=True, latent_flag=True)


@pytest.fixture(scope='module')
def ref():
    return torch.load(REF_PATH, weights_only=True)


def test_reference_file_is_small():
    assert os.path.getsize(REF_PATH) < 1.5 * 2**20


@pytest.mark.parametrize('steps', [15, 4, 1])
def test_schedule_matches_official(ref, steps):
    d = ResShiftDiffusion.from_options(REALSR, sample_steps=None if steps == 15 else steps)
    assert d.num_timesteps == steps
    for name in SCHEDULE_NAMES:
        np.testing.assert_allclose(getattr(d, name), ref[f'sched_{steps}_{name}'].numpy(), rtol=1e-12, atol=0,
                                   err_msg=name)
    assert d.timestep_map.tolist() == ref[f'sched_{steps}_timestep_map'].tolist()
    if steps > 1:
        np.testing.assert_allclose(d.weight_loss_mse, ref[f'sched_{steps}_weight_loss_mse'].numpy(), rtol=1e-12)


def test_epsilon_loss_weights_match_official(ref):
    d = ResShiftDiffusion.from_options({**REALSR, 'predict_type': 'epsilon'})
    np.testing.assert_allclose(d.weight_loss_mse, ref['sched_15_weight_loss_mse_epsilon'].numpy(), rtol=1e-12)


def test_schedule_closed_form():
    # ResShift paper Eq. (10): sqrt(eta_t) = sqrt(eta_1) * b0^{beta_t}, beta_t = ((t-1)/(T-1))^p (T-1),
    # b0 = exp(log(sqrt(eta_T)/sqrt(eta_1)) / (T-1)), sqrt(eta_1) = min(min_noise_level/kappa, min_noise_level).
    T, p, kappa = 15, 0.3, 2.0
    s1, sT = min(0.04 / kappa, 0.04), 0.99
    expected = [s1 * math.exp(math.log(sT / s1) * (t / (T - 1)) ** p) for t in range(T)]
    got = exponential_sqrt_eta_schedule(T, 0.04, 0.99, kappa, p)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert got[0] == pytest.approx(0.02) and got[-1] == pytest.approx(0.99)
    assert np.all(np.diff(got) > 0)


def test_posterior_is_bayes_rule_of_the_forward_process():
    # q(x_{t-1} | x_0, y) = N(x_0 + eta_{t-1} (y - x_0), k^2 eta_{t-1}) and
    # q(x_t | x_{t-1}) = N(x_{t-1} + alpha_t (y - x_0), k^2 alpha_t): the Gaussian product gives the posterior.
    d = ResShiftDiffusion.from_options(REALSR)
    k = d.kappa
    x0, y, xt = 0.3, -0.7, 0.9
    for t in range(1, d.num_timesteps):
        e_prev, a = d.etas[t - 1], d.etas[t] - d.etas[t - 1]
        v1, v2 = k**2 * e_prev, k**2 * a
        m1, obs = x0 + e_prev * (y - x0), xt - a * (y - x0)
        var = v1 * v2 / (v1 + v2)
        mean = (m1 * v2 + obs * v1) / (v1 + v2)
        assert d.posterior_variance[t] == pytest.approx(var, rel=1e-10)
        assert d.posterior_mean_coef1[t] * xt + d.posterior_mean_coef2[t] * x0 == pytest.approx(mean, rel=1e-10)
    assert d.posterior_mean_coef1[0] == 0 and d.posterior_mean_coef2[0] == 1 and d.posterior_variance[0] == 0


def test_space_timesteps():
    # official models/respace.py: {int(T / n * i) for i < n}
    assert space_timesteps(15, 15) == list(range(15))
    assert space_timesteps(15, 4) == [0, 3, 7, 11]
    assert space_timesteps(15, 5) == [0, 3, 6, 9, 12]
    assert space_timesteps(15, 1) == [14]
    with pytest.raises(OptionError, match='timestep_respacing'):
        space_timesteps(15, 16)


def test_forward_process_and_helpers_match_official(ref):
    d = ResShiftDiffusion.from_options(REALSR)
    x0, y, noise, t = ref['q_x0'], ref['q_y'], ref['q_noise'], ref['q_t']
    xt = d.q_sample(x0, y, t, noise)
    torch.testing.assert_close(xt, ref['q_sample'], rtol=0, atol=1e-6)
    torch.testing.assert_close(d.scale_input(xt, t), ref['q_scale_input'], rtol=0, atol=1e-6)
    torch.testing.assert_close(d.prior_sample(y, noise), ref['q_prior'], rtol=0, atol=1e-6)
    mean, _, logvar = d.q_posterior_mean_variance(x0, xt, t)
    torch.testing.assert_close(mean, ref['q_post_mean'], rtol=0, atol=1e-6)
    torch.testing.assert_close(logvar, ref['q_post_logvar'], rtol=0, atol=1e-5)
    for ptype, key in (('epsilon', 'q_pred_from_eps'), ('epsilon_scale', 'q_pred_from_eps_scale')):
        de = ResShiftDiffusion.from_options({**REALSR, 'predict_type': ptype})
        torch.testing.assert_close(de.predict_xstart(noise, xt, y, t), ref[key], rtol=0, atol=1e-5)
    dn = ResShiftDiffusion.from_options({**REALSR, 'latent_flag': False})
    torch.testing.assert_close(dn.scale_input(xt, t), ref['q_scale_input_nonlatent'], rtol=0, atol=1e-6)


def test_q_sample_closed_form_and_targets():
    d = ResShiftDiffusion.from_options(REALSR)
    g = torch.Generator().manual_seed(0)
    x0, y, n = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
    t = torch.tensor([2, 14])
    xt = d.q_sample(x0, y, t, n)
    for i in range(2):
        eta = d.etas[t[i]]
        expected = x0[i] + eta * (y[i] - x0[i]) + d.kappa * math.sqrt(eta) * n[i]
        torch.testing.assert_close(xt[i], expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(d.training_target(x0, y, t, n), x0)
    loss = d.training_loss(x0 + 0.5, x0, y, t, n)
    torch.testing.assert_close(loss, torch.full((2,), 0.25))
    dr = ResShiftDiffusion.from_options({**REALSR, 'predict_type': 'residual'})
    torch.testing.assert_close(dr.training_target(x0, y, t, n), y - x0)
    torch.testing.assert_close(dr.predict_xstart(y - x0, xt, y, t), x0)
    de = ResShiftDiffusion.from_options({**REALSR, 'predict_type': 'epsilon'})
    torch.testing.assert_close(de.predict_xstart(n, xt, y, t), x0, rtol=1e-4, atol=1e-4)
    dw = ResShiftDiffusion.from_options({**REALSR, 'weighted_mse': True})
    w = dw.weight_loss_mse[t.numpy()]
    torch.testing.assert_close(dw.training_loss(x0 + 0.5, x0, y, t, n), torch.tensor(0.25 * w, dtype=torch.float32))


class StubModel:
    """Deterministic, input-dependent stand-in for the UNet; records the timesteps it sees."""

    def __init__(self):
        self.seen = []

    def __call__(self, x, timesteps, lq=None):
        self.seen.append(timesteps.tolist())
        return torch.tanh(0.7 * x + 0.01 * timesteps.float().view(-1, 1, 1, 1)) + 0.1 * lq


def _manual_loop(d, z_y, lq, draws, model):
    """The reverse process written out from the closed forms with numpy coefficients."""
    T = d.num_timesteps
    etas = d.etas
    x = z_y + d.kappa * math.sqrt(etas[-1]) * draws[0]
    for k, i in enumerate(reversed(range(T))):
        t_orig = torch.full((z_y.shape[0],), int(d.timestep_map[i]))
        x0 = model(x / math.sqrt(etas[i] * d.kappa**2 + 1), t_orig, lq=lq)
        e_prev = etas[i - 1] if i > 0 else 0.0
        mean = e_prev / etas[i] * x + (etas[i] - e_prev) / etas[i] * x0
        if i > 0:
            var = d.kappa**2 * e_prev / etas[i] * (etas[i] - e_prev)
            x = mean + math.sqrt(var) * draws[k + 1]
        else:
            x = mean
    return x


@pytest.mark.parametrize('steps', [15, 4, 1])
def test_sampling_loop_random_draw_order(steps):
    d = ResShiftDiffusion.from_options(REALSR, sample_steps=None if steps == 15 else steps)
    g = torch.Generator().manual_seed(3)
    z_y = torch.randn(2, 3, 5, 6, generator=g)
    lq = torch.randn(2, 3, 5, 6, generator=g)
    model = StubModel()
    torch.manual_seed(11)
    got = d.sample_latent(model, z_y, model_kwargs={'lq': lq})
    # official order: prior noise, then one draw per step (the last one masked)
    torch.manual_seed(11)
    draws = [torch.randn_like(z_y) for _ in range(steps + 1)]
    expected = _manual_loop(d, z_y, lq, draws, StubModel())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert [s[0] for s in model.seen] == list(reversed(d.timestep_map.tolist()))
    if steps == 1:
        assert model.seen == [[14, 14]]
    # the global RNG advanced by exactly steps + 1 draws
    torch.manual_seed(11)
    for _ in range(steps + 1):
        torch.randn_like(z_y)
    after = torch.rand(1)
    torch.manual_seed(11)
    d.sample_latent(StubModel(), z_y, model_kwargs={'lq': lq})
    assert torch.equal(torch.rand(1), after)


def test_generator_matches_global_seed_and_is_deterministic():
    d = ResShiftDiffusion.from_options(REALSR, sample_steps=4)
    z_y = torch.randn(1, 3, 4, 4)
    torch.manual_seed(5)
    a = d.sample_latent(StubModel(), z_y, model_kwargs={'lq': z_y})
    b = d.sample_latent(StubModel(), z_y, generator=torch.Generator().manual_seed(5), model_kwargs={'lq': z_y})
    c = d.sample_latent(StubModel(), z_y, generator=torch.Generator().manual_seed(5), model_kwargs={'lq': z_y})
    e = d.sample_latent(StubModel(), z_y, generator=torch.Generator().manual_seed(6), model_kwargs={'lq': z_y})
    assert torch.equal(a, b) and torch.equal(b, c)
    assert not torch.allclose(b, e)


@pytest.mark.parametrize('steps', [15, 4, 1])
def test_generator_list_gives_each_element_its_own_stream(steps):
    # one generator per batch element: element i draws prior noise, then one tensor per step, each of
    # the element's shape, from generator i; the batch equals the elements sampled on their own
    d = ResShiftDiffusion.from_options(REALSR, sample_steps=None if steps == 15 else steps)
    g = torch.Generator().manual_seed(3)
    z_y = torch.randn(3, 3, 5, 6, generator=g)
    lq = torch.randn(3, 3, 5, 6, generator=g)
    seeds = (21, 22, 23)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    model = StubModel()
    got = d.sample_latent(model, z_y, generator=gens, model_kwargs={'lq': lq})
    assert len(model.seen) == steps and all(len(ts) == 3 for ts in model.seen)  # one call per step
    # the closed-form loop with per-element draws in the official order
    streams = [torch.Generator().manual_seed(s) for s in seeds]
    draws = [torch.cat([torch.randn(1, 3, 5, 6, generator=s) for s in streams]) for _ in range(steps + 1)]
    torch.testing.assert_close(got, _manual_loop(d, z_y, lq, draws, StubModel()), rtol=1e-5, atol=1e-5)
    # each generator advanced by exactly steps + 1 draws of one element
    for gen, s in zip(gens, streams):
        assert torch.equal(gen.get_state(), s.get_state())
    # element i alone with generator i (a single generator or a list of one: the same draws)
    for i, s in enumerate(seeds):
        alone = d.sample_latent(StubModel(), z_y[i:i + 1], generator=torch.Generator().manual_seed(s),
                                model_kwargs={'lq': lq[i:i + 1]})
        as_list = d.sample_latent(StubModel(), z_y[i:i + 1], generator=[torch.Generator().manual_seed(s)],
                                  model_kwargs={'lq': lq[i:i + 1]})
        assert torch.equal(alone, as_list)
        torch.testing.assert_close(got[i:i + 1], alone, rtol=0, atol=1e-6)
    # the pixel-space loop (bicubic x4 first) takes a list too
    out = d.p_sample_loop(z_y[:2], StubModel(), generator=[torch.Generator().manual_seed(s) for s in seeds[:2]],
                          model_kwargs={'lq': torch.zeros(2, 3, 20, 24)})
    assert out.shape == (2, 3, 20, 24)


def test_generator_list_must_match_the_batch():
    d = ResShiftDiffusion.from_options(REALSR, sample_steps=2)
    z_y = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match='3 generators for a batch of 2'):
        d.sample_latent(StubModel(), z_y, generator=[torch.Generator() for _ in range(3)], model_kwargs={'lq': z_y})
    with pytest.raises(TypeError, match='torch.Generator'):
        d.sample_latent(StubModel(), z_y, generator=[torch.Generator(), 5], model_kwargs={'lq': z_y})
    with pytest.raises(TypeError, match='generator must be'):
        d.sample_latent(StubModel(), z_y, generator=5, model_kwargs={'lq': z_y})
    t = torch.ones(2, dtype=torch.long)
    with pytest.raises(ValueError, match='1 generators for a batch of 2'):
        d.p_sample(StubModel(), z_y, z_y, t, generator=[torch.Generator()], model_kwargs={'lq': z_y})


def test_pixel_space_loop_clips_x0():
    d = ResShiftDiffusion.from_options({**REALSR, 'sf': 2}, sample_steps=2)
    y = torch.rand(1, 3, 4, 4) * 2 - 1

    def big(x, t, lq=None):
        return 5 * torch.ones_like(x)

    out = d.p_sample_loop(y, big, autoencoder=None, generator=torch.Generator().manual_seed(0),
                          model_kwargs={'lq': y})
    assert out.shape == (1, 3, 8, 8)
    # last step returns the clipped x0 prediction exactly
    torch.testing.assert_close(out, torch.ones_like(out))


@pytest.mark.parametrize('change, key', [
    ({'foo': 1}, 'diffusion.foo'),
    ({'predict_type': 'v'}, 'diffusion.predict_type'),
    ({'schedule_name': 'ldm'}, 'diffusion.schedule_name'),
    ({'schedule_kwargs': {}}, 'diffusion.schedule_kwargs'),
    ({'kappa': -1}, 'diffusion.kappa'),
    ({'etas_end': 1.5}, 'diffusion.etas_end'),
    ({'steps': 1}, 'diffusion.steps'),
    ({'timestep_respacing': 16}, 'diffusion.timestep_respacing'),
    ({'timestep_respacing': 0}, 'diffusion.timestep_respacing'),
    ({'normalize_input': None}, 'diffusion.normalize_input'),
])
def test_bad_options_name_the_key(change, key):
    with pytest.raises(OptionError, match=key.replace('.', r'\.')):
        ResShiftDiffusion.from_options({**REALSR, **change})


def test_bad_sampling_override_names_key():
    with pytest.raises(OptionError, match=r'sampler\.steps'):
        ResShiftDiffusion.from_options(REALSR, sample_steps=20, steps_key='sampler.steps')
