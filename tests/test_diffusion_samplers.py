"""Scheduler steps and full sampling loops vs diffusers (torch, float32), closed-form Gaussian checks, and
compile-once behaviour of the jitted samplers."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

from metalora.diffusion import (
    FlowMatchSchedule,
    NoiseSchedule,
    ddim_prev_timesteps,
    ddim_sample,
    ddim_step,
    ddpm_prev_timesteps,
    ddpm_sample,
    ddpm_step,
    flow_euler_sample,
    flow_euler_step,
    initial_noise,
    repeat_for_seeds,
)

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
TOL = dict(rtol=1e-5, atol=1e-5)
SHAPE = (3, 4, 4, 2)  # (B, H, W, C)

_ddim_step = jax.jit(ddim_step)
_ddpm_step = jax.jit(ddpm_step)


def _randn(rng, shape=SHAPE):
    return rng.standard_normal(shape, dtype=np.float32)


def _t(a):
    return torch.from_numpy(np.ascontiguousarray(a))


# ---------------------------------------------------------------------------------------------------------------
# Single steps
# ---------------------------------------------------------------------------------------------------------------

DDIM_CASES = [
    dict(prediction_type="epsilon", timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False),
    dict(prediction_type="epsilon", timestep_spacing="leading", steps_offset=0, clip_sample=True),
    dict(prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True),
    dict(prediction_type="sample", timestep_spacing="linspace"),
    dict(prediction_type="v_prediction", timestep_spacing="linspace", set_alpha_to_one=False),
]


@pytest.mark.parametrize("eta", [0.0, 0.7, 1.0])
@pytest.mark.parametrize("case", DDIM_CASES, ids=lambda c: f"{c['prediction_type']}-{c['timestep_spacing']}")
def test_ddim_step_matches_diffusers(case, eta):
    cfg = {**SD, "clip_sample": False, **case}
    num_steps = 7
    ref = DDIMScheduler(**cfg)
    ref.set_timesteps(num_steps)
    ours = NoiseSchedule.create(**cfg)
    prevs = ddim_prev_timesteps(ours, num_steps)
    rng = np.random.default_rng(0)
    for i, t in enumerate(ref.timesteps.tolist()):
        x, out, z = _randn(rng), _randn(rng), _randn(rng)
        expected = ref.step(_t(out), t, _t(x), eta=eta, variance_noise=_t(z) if eta > 0 else None)
        prev, x0 = _ddim_step(ours, out, t, prevs[i], x, eta, z if eta > 0 else None)
        tol = TOL
        if eta == 1.0 and float(ours.alphas_cumprod[t]) == 0.0:
            # Zero terminal SNR at η = 1: the direction coefficient is exactly 0, but diffusers computes it as
            # sqrt(1 - ᾱ_prev - std²), which leaves sqrt(float32 rounding) ≈ 2.4e-4. We compute it stably, so
            # check the exact value, and diffusers only to within its cancellation error.
            a_prev = float(ours.alphas_cumprod[prevs[i]])
            exact = np.sqrt(a_prev) * np.asarray(x0) + np.sqrt(1 - a_prev) * z
            np.testing.assert_allclose(np.asarray(prev), exact, **TOL)
            tol = dict(rtol=0, atol=1e-3)
            if not np.isfinite(expected.prev_sample.numpy()).all():
                # The rounding can also go below 0: diffusers then takes sqrt of a negative number and returns NaN
                # (seen with torch 2.13 CPU). Only the exact value above is meaningful at this step.
                tol = None
        if tol is not None:
            np.testing.assert_allclose(np.asarray(prev), expected.prev_sample.numpy(), **tol, err_msg=f"t={t}")
        np.testing.assert_allclose(np.asarray(x0), expected.pred_original_sample.numpy(), **TOL, err_msg=f"t={t}")


@pytest.mark.parametrize(
    ("case", "num_steps"),
    [
        (dict(prediction_type="epsilon", steps_offset=1), 10),
        (dict(prediction_type="epsilon", clip_sample=True), 1000),
        (dict(prediction_type="v_prediction", timestep_spacing="trailing"), 6),
        (dict(prediction_type="sample", timestep_spacing="linspace"), 5),
    ],
    ids=["eps-leading", "eps-clip-full-chain", "v-trailing", "sample-linspace"],
)
def test_ddpm_step_matches_diffusers(case, num_steps):
    cfg = {**SD, "clip_sample": False, **case}
    ref = DDPMScheduler(**cfg)
    ref.set_timesteps(num_steps)
    ours = NoiseSchedule.create(**cfg)
    prevs = ddpm_prev_timesteps(ours, num_steps)
    rng = np.random.default_rng(1)
    timesteps = ref.timesteps.tolist()
    # The full chain has 1000 steps; check its first, last and a spread of middle ones.
    picks = range(len(timesteps)) if len(timesteps) <= 20 else [0, 1, 2, 500, 997, 998, 999]
    for i in picks:
        t = timesteps[i]
        x, out = _randn(rng), _randn(rng)
        # diffusers draws the variance noise itself: replay the same generator to get it.
        expected = ref.step(_t(out), t, _t(x), generator=torch.Generator().manual_seed(i))
        z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(i)).numpy()
        prev, x0 = _ddpm_step(ours, out, t, prevs[i], x, z)
        np.testing.assert_allclose(np.asarray(prev), expected.prev_sample.numpy(), **TOL, err_msg=f"t={t}")
        np.testing.assert_allclose(np.asarray(x0), expected.pred_original_sample.numpy(), **TOL, err_msg=f"t={t}")


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_euler_step_matches_diffusers(shift):
    ref = FlowMatchEulerDiscreteScheduler(shift=shift)
    ref.set_timesteps(8)
    sigmas = FlowMatchSchedule(shift=shift).inference_sigmas(8)
    rng = np.random.default_rng(2)
    x = _randn(rng)
    for i, t in enumerate(ref.timesteps):
        out = _randn(rng)
        expected = ref.step(_t(out), t, _t(x)).prev_sample.numpy()
        x_next = np.asarray(flow_euler_step(jnp.asarray(out), sigmas[i], sigmas[i + 1], jnp.asarray(x)))
        np.testing.assert_allclose(x_next, expected, **TOL, err_msg=f"step {i}")
        x = expected


# ---------------------------------------------------------------------------------------------------------------
# Full loops with classifier-free guidance vs a torch-driven diffusers loop
# ---------------------------------------------------------------------------------------------------------------


def jax_model(params, x, t, cond):
    """A fixed analytic "network": smooth in x and t, depends on the conditioning."""
    scale = jnp.cos(t.astype(jnp.float32) / 1000.0 * (math.pi / 2))[:, None, None, None]
    return params["a"] * x * scale + params["b"] * jnp.tanh(x) + params["c"] * cond[:, None, None, :]


def torch_model(params, x, t, cond):
    scale = torch.cos(t.to(torch.float32) / 1000.0 * (math.pi / 2))[:, None, None, None]
    return params["a"] * x * scale + params["b"] * torch.tanh(x) + params["c"] * cond[:, None, None, :]


PARAMS = {"a": 0.3, "b": 0.2, "c": 0.5}


def _conditioning(rng, batch=SHAPE[0]):
    return rng.standard_normal((batch, SHAPE[-1]), dtype=np.float32), np.zeros((batch, SHAPE[-1]), np.float32)


def _torch_guided(x, t, cond, uncond, guidance_scale):
    """What diffusers pipelines do: one batch [uncond, cond], then pred_u + g·(pred_c - pred_u)."""
    batch = x.shape[0]
    out = torch_model(
        PARAMS, torch.cat([x, x]), t.expand(2 * batch), torch.cat([torch.from_numpy(uncond), torch.from_numpy(cond)])
    )
    out_uncond, out_cond = out.chunk(2)
    return out_uncond + guidance_scale * (out_cond - out_uncond)


def _jax_params():
    return jax.tree.map(jnp.float32, PARAMS)


@pytest.mark.parametrize(
    ("case", "eta"),
    [
        (dict(prediction_type="epsilon", steps_offset=1, set_alpha_to_one=False), 0.0),
        (dict(prediction_type="epsilon", steps_offset=1, set_alpha_to_one=False), 0.8),
        (dict(prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True), 0.0),
        (dict(prediction_type="v_prediction", timestep_spacing="linspace"), 0.5),
    ],
    ids=["eps-eta0", "eps-eta0.8", "v-zero-snr-trailing", "v-linspace-eta0.5"],
)
def test_ddim_loop_matches_diffusers(case, eta):
    cfg = {**SD, "clip_sample": False, **case}
    num_steps, guidance = 12, 7.5
    rng = np.random.default_rng(3)
    noise = _randn(rng)
    step_noise = rng.standard_normal((num_steps, *SHAPE), dtype=np.float32)
    cond, uncond = _conditioning(rng)

    ref = DDIMScheduler(**cfg)
    ref.set_timesteps(num_steps)
    x = torch.from_numpy(noise)
    for i, t in enumerate(ref.timesteps):
        pred = _torch_guided(x, t, cond, uncond, guidance)
        x = ref.step(pred, t, x, eta=eta, variance_noise=_t(step_noise[i]) if eta > 0 else None).prev_sample

    ours = ddim_sample(
        jax_model,
        _jax_params(),
        NoiseSchedule.create(**cfg),
        jnp.asarray(noise),
        jnp.asarray(cond),
        jnp.asarray(uncond),
        num_inference_steps=num_steps,
        guidance_scale=guidance,
        eta=eta,
        step_noise=jnp.asarray(step_noise) if eta > 0 else None,
    )
    np.testing.assert_allclose(np.asarray(ours), x.numpy(), **TOL)


def test_ddpm_loop_matches_diffusers():
    cfg = {**SD, "clip_sample": False, "steps_offset": 1}
    num_steps, guidance = 15, 4.0
    rng = np.random.default_rng(4)
    noise = _randn(rng)
    cond, uncond = _conditioning(rng)

    ref = DDPMScheduler(**cfg)
    ref.set_timesteps(num_steps)
    generator = torch.Generator().manual_seed(0)
    x = torch.from_numpy(noise)
    for t in ref.timesteps:
        x = ref.step(_torch_guided(x, t, cond, uncond, guidance), t, x, generator=generator).prev_sample

    replay = torch.Generator().manual_seed(0)  # diffusers draws one randn per step with t > 0
    step_noise = np.stack(
        [torch.randn(SHAPE, generator=replay).numpy() if t > 0 else np.zeros(SHAPE, np.float32) for t in ref.timesteps]
    )
    ours = ddpm_sample(
        jax_model,
        _jax_params(),
        NoiseSchedule.create(**cfg),
        jnp.asarray(noise),
        jnp.asarray(cond),
        jnp.asarray(uncond),
        num_inference_steps=num_steps,
        guidance_scale=guidance,
        step_noise=jnp.asarray(step_noise),
    )
    np.testing.assert_allclose(np.asarray(ours), x.numpy(), **TOL)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_euler_loop_matches_diffusers(shift):
    num_steps, guidance = 10, 3.5
    rng = np.random.default_rng(5)
    noise = _randn(rng)
    cond, uncond = _conditioning(rng)

    ref = FlowMatchEulerDiscreteScheduler(shift=shift)
    ref.set_timesteps(num_steps)
    x = torch.from_numpy(noise)
    for t in ref.timesteps:
        x = ref.step(_torch_guided(x, t, cond, uncond, guidance), t, x).prev_sample

    ours = flow_euler_sample(
        jax_model,
        _jax_params(),
        FlowMatchSchedule(shift=shift),
        jnp.asarray(noise),
        jnp.asarray(cond),
        jnp.asarray(uncond),
        num_inference_steps=num_steps,
        guidance_scale=guidance,
    )
    np.testing.assert_allclose(np.asarray(ours), x.numpy(), **TOL)


# ---------------------------------------------------------------------------------------------------------------
# Closed form: data ~ N(mu, s²) per dimension, so the Bayes-optimal predictors are analytic
# ---------------------------------------------------------------------------------------------------------------

MU, S = 0.7, 0.4
N_GAUSS = (4096, 4)


def gaussian_model(params, x, t, cond):
    """E[ε | x_t] / E[v | x_t] for Gaussian data: x_t ~ N(√a·mu, a·s² + 1 - a), Cov(ε, x_t) = √(1-a)."""
    del cond
    a = params["alphas_cumprod"][t][:, None]
    var = a * params["s"] ** 2 + 1.0 - a
    centred = x - jnp.sqrt(a) * params["mu"]
    eps = jnp.sqrt(1.0 - a) / var * centred
    if params["prediction"] == "epsilon":
        return eps
    x0 = params["mu"] + jnp.sqrt(a) * params["s"] ** 2 / var * centred
    return jnp.sqrt(a) * eps - jnp.sqrt(1.0 - a) * x0


def _gaussian_start(schedule, first_t, key):
    """x at the first sampling timestep drawn from its true marginal, and the standard normal z behind it.

    The exact probability-flow ODE maps it to mu + s·z, which is what a converged DDIM run must return.
    """
    z = jax.random.normal(key, N_GAUSS)
    a = schedule.alphas_cumprod[first_t]
    return jnp.sqrt(a) * MU + jnp.sqrt(a * S**2 + 1.0 - a) * z, z


def _assert_moments(samples, mean, std, n_sigma=5.0):
    """Sample mean/std equal (mean, std) within n_sigma standard errors of a Gaussian sample."""
    samples = np.asarray(samples).ravel()
    n = samples.size
    assert abs(samples.mean() - mean) < n_sigma * std / math.sqrt(n), (samples.mean(), mean)
    assert abs(samples.std() - std) < n_sigma * std / math.sqrt(2 * n), (samples.std(), std)


def _gaussian_fn(prediction):
    def fn(params, x, t, cond):
        return gaussian_model({**params, "prediction": prediction}, x, t, cond)

    return fn


def _ddim_gaussian_gain(schedule, num_steps):
    """Exact DDIM map for Gaussian data, in float64: with z_t = (x_t - √ᾱ·mu)/√V_t each step is z ← c·z with
    c = (√ᾱ_prev·√ᾱ·s² + √(1-ᾱ_prev)·√(1-ᾱ)) / (√V·√V_prev) ≤ 1 (Cauchy-Schwarz; → 1 as steps shrink)."""
    ac = np.asarray(schedule.alphas_cumprod, np.float64)
    final = float(schedule.final_alpha_cumprod)
    gain = 1.0
    for t, prev in zip(schedule.inference_timesteps(num_steps), ddim_prev_timesteps(schedule, num_steps)):
        a, a_prev = ac[t], (ac[prev] if prev >= 0 else final)
        var, var_prev = a * S**2 + 1 - a, a_prev * S**2 + 1 - a_prev
        gain *= (np.sqrt(a_prev * a) * S**2 + np.sqrt((1 - a_prev) * (1 - a))) / np.sqrt(var * var_prev)
    return gain


@pytest.mark.parametrize(
    "case",
    [
        dict(prediction_type="epsilon"),
        dict(prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True),
    ],
    ids=["eps", "v-zero-snr"],
)
def test_ddim_matches_closed_form_map_on_gaussian_data(case):
    schedule = NoiseSchedule.create(**SD, clip_sample=False, **case)
    num_steps = 50
    params = {"alphas_cumprod": schedule.alphas_cumprod, "mu": MU, "s": S}
    x_start, z = _gaussian_start(schedule, schedule.inference_timesteps(num_steps)[0], jax.random.key(0))
    out = ddim_sample(_gaussian_fn(case["prediction_type"]), params, schedule, x_start, None, num_inference_steps=50)
    gain = _ddim_gaussian_gain(schedule, num_steps)
    assert 0.9 < gain < 0.95  # 50 steps visibly under-disperse, so the check below has teeth
    np.testing.assert_allclose(np.asarray(out), MU + S * gain * np.asarray(z), atol=1e-4)


def test_ddim_many_steps_recovers_gaussian_data():
    schedule = NoiseSchedule.create(**SD, clip_sample=False)
    params = {"alphas_cumprod": schedule.alphas_cumprod, "mu": MU, "s": S}
    x_start, z = _gaussian_start(schedule, schedule.inference_timesteps(1000)[0], jax.random.key(0))
    out = ddim_sample(_gaussian_fn("epsilon"), params, schedule, x_start, None, num_inference_steps=1000)
    # Deterministic DDIM follows the ODE: each sample lands near its own exact image mu + s·z ...
    assert np.abs(np.asarray(out) - (MU + S * np.asarray(z))).max() < 0.015
    _assert_moments(out, MU, S)  # ... so the samples have the data's mean and std


def _ddpm_gaussian_std(schedule, num_steps):
    """Exact std of DDPM (fixed_small) samples for Gaussian data, in float64: the centred sample follows
    y ← k·y + σ·ξ, so its variance follows v ← k²·v + σ² (the mean stays exactly mu)."""
    ac = np.asarray(schedule.alphas_cumprod, np.float64)
    ts = schedule.inference_timesteps(num_steps)
    v = ac[ts[0]] * S**2 + 1 - ac[ts[0]]
    for t, prev in zip(ts, ddpm_prev_timesteps(schedule, num_steps)):
        a, a_prev = ac[t], (ac[prev] if prev >= 0 else 1.0)
        beta = 1 - a / a_prev
        k = np.sqrt(a_prev) * beta / (1 - a) * np.sqrt(a) * S**2 / (a * S**2 + 1 - a) + np.sqrt(1 - beta) * (
            1 - a_prev
        ) / (1 - a)
        v = k * k * v + (max((1 - a_prev) / (1 - a) * beta, 1e-20) if t > 0 else 0.0)
    return math.sqrt(v)


def test_ddpm_matches_closed_form_moments_on_gaussian_data():
    schedule = NoiseSchedule.create(**SD, clip_sample=False)
    num_steps = 250
    params = {"alphas_cumprod": schedule.alphas_cumprod, "mu": MU, "s": S}
    keys = jax.random.split(jax.random.key(1), N_GAUSS[0])
    x_start, _ = _gaussian_start(schedule, schedule.inference_timesteps(num_steps)[0], jax.random.key(2))
    out = ddpm_sample(
        _gaussian_fn("epsilon"), params, schedule, x_start, None, num_inference_steps=num_steps, keys=keys
    )
    expected_std = _ddpm_gaussian_std(schedule, num_steps)
    assert 0.95 * S < expected_std < 0.97 * S  # fixed_small under-disperses at finite steps ...
    assert _ddpm_gaussian_std(schedule, 1000) > 0.985 * S  # ... less so with more steps
    _assert_moments(out, MU, expected_std)


def _flow_gaussian_map(schedule, num_steps):
    """Euler on the exact Gaussian velocity is affine per step, so x_final = gain·z + offset, in float64."""
    sigmas = schedule.inference_sigmas(num_steps).astype(np.float64)
    gain, offset = 1.0, 0.0
    for sigma, sigma_next in itertools.pairwise(sigmas):
        var, mean = (1 - sigma) ** 2 * S**2 + sigma**2, (1 - sigma) * MU
        slope = (sigma - (1 - sigma) * S**2) / var  # v(x) = slope·(x - mean) - mu
        step = sigma_next - sigma
        gain, offset = gain * (1 + step * slope), offset + step * (slope * (offset - mean) - MU)
    return gain, offset


def test_flow_euler_matches_closed_form_map_on_gaussian_data():
    def velocity(params, x, t, cond):
        """E[noise - x0 | x_σ] for x0 ~ N(mu, s²): x_σ ~ N((1-σ)mu, (1-σ)²s² + σ²)."""
        del cond
        sigma = (t / 1000.0)[:, None]
        mean = (1.0 - sigma) * params["mu"]
        var = (1.0 - sigma) ** 2 * params["s"] ** 2 + sigma**2
        x0 = params["mu"] + (1.0 - sigma) * params["s"] ** 2 / var * (x - mean)
        noise = sigma / var * (x - mean)
        return noise - x0

    schedule = FlowMatchSchedule(shift=3.0)
    z = jax.random.normal(jax.random.key(3), N_GAUSS)
    out = flow_euler_sample(velocity, {"mu": MU, "s": S}, schedule, z, None, num_inference_steps=50)
    gain, offset = _flow_gaussian_map(schedule, 50)
    assert offset == pytest.approx(MU) and 0.9 * S < gain < 0.95 * S
    np.testing.assert_allclose(np.asarray(out), offset + gain * np.asarray(z), atol=1e-4)
    assert _flow_gaussian_map(schedule, 1000)[0] == pytest.approx(S, rel=5e-3)  # Euler converges to the data


# ---------------------------------------------------------------------------------------------------------------
# Guidance, seeds, trajectories
# ---------------------------------------------------------------------------------------------------------------


def test_guidance_scale_one_equals_conditional_only():
    """With g = 1 guidance reduces to the conditional branch: catches a swapped [uncond, cond] order."""
    schedule = NoiseSchedule.create(**SD, clip_sample=False)
    rng = np.random.default_rng(6)
    noise = jnp.asarray(_randn(rng))
    cond, uncond = (jnp.asarray(c) for c in _conditioning(rng))
    kwargs = dict(num_inference_steps=8)
    plain = ddim_sample(jax_model, _jax_params(), schedule, noise, cond, **kwargs)
    guided_1 = ddim_sample(jax_model, _jax_params(), schedule, noise, cond, uncond, guidance_scale=1.0, **kwargs)
    guided_0 = ddim_sample(jax_model, _jax_params(), schedule, noise, cond, uncond, guidance_scale=0.0, **kwargs)
    only_uncond = ddim_sample(jax_model, _jax_params(), schedule, noise, uncond, **kwargs)
    np.testing.assert_allclose(guided_1, plain, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(guided_0, only_uncond, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(plain) - np.asarray(only_uncond)).max() > 0.1


def test_seeds_are_independent_of_batch_composition():
    schedule = NoiseSchedule.create(**SD, clip_sample=False)
    keys = jax.random.split(jax.random.key(7), 3)
    noise = initial_noise(keys, SHAPE[1:])
    assert noise.shape == SHAPE
    np.testing.assert_array_equal(initial_noise(keys[1:2], SHAPE[1:])[0], noise[1])
    cond = jnp.asarray(_conditioning(np.random.default_rng(8))[0])
    kwargs = dict(num_inference_steps=6)
    full = ddpm_sample(jax_model, _jax_params(), schedule, noise, cond, keys=keys, **kwargs)
    alone = ddpm_sample(jax_model, _jax_params(), schedule, noise[1:2], cond[1:2], keys=keys[1:2], **kwargs)
    np.testing.assert_allclose(alone[0], full[1], rtol=1e-6, atol=1e-6)
    assert np.abs(np.asarray(full[0]) - np.asarray(full[1])).max() > 0.1
    # DDIM with eta > 0 draws its step noise from the same per-seed keys.
    a = ddim_sample(jax_model, _jax_params(), schedule, noise, cond, eta=1.0, keys=keys, **kwargs)
    b = ddim_sample(jax_model, _jax_params(), schedule, noise, cond, eta=1.0, keys=keys[::-1], **kwargs)
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 0.01


def test_prompt_seed_grid():
    cond = jnp.arange(6.0).reshape(2, 3)  # two prompts
    grid = repeat_for_seeds({"emb": cond}, 3)["emb"]
    np.testing.assert_array_equal(grid, np.repeat(np.asarray(cond), 3, axis=0))
    keys = jax.random.split(jax.random.key(0), 3)
    noise = initial_noise(jnp.tile(keys, 2), (4,))  # the same three seeds for each prompt
    np.testing.assert_array_equal(noise[:3], noise[3:])


def test_return_trajectory():
    schedule = NoiseSchedule.create(**SD, clip_sample=False)
    rng = np.random.default_rng(9)
    noise = jnp.asarray(_randn(rng))
    cond = jnp.asarray(_conditioning(rng)[0])
    final, trajectory = ddim_sample(
        jax_model, _jax_params(), schedule, noise, cond, num_inference_steps=5, return_trajectory=True
    )
    assert trajectory.shape == (5, *SHAPE)
    np.testing.assert_array_equal(trajectory[-1], final)
    without = ddim_sample(jax_model, _jax_params(), schedule, noise, cond, num_inference_steps=5)
    np.testing.assert_allclose(final, without, rtol=1e-6, atol=1e-6)  # another program: equal up to rounding
    t0, prev0 = schedule.inference_timesteps(5)[0], ddim_prev_timesteps(schedule, 5)[0]
    first = ddim_step(schedule, jax_model(_jax_params(), noise, jnp.full((SHAPE[0],), t0), cond), t0, prev0, noise)[0]
    np.testing.assert_allclose(trajectory[0], first, rtol=1e-6, atol=1e-6)  # row i is the sample after step i


def test_bad_arguments_raise():
    schedule = NoiseSchedule.create(**SD)
    noise = jnp.zeros(SHAPE)
    cond = jnp.zeros((SHAPE[0], SHAPE[-1]))
    with pytest.raises(ValueError, match="eta"):
        ddim_sample(jax_model, _jax_params(), schedule, noise, cond, num_inference_steps=4, eta=0.5)
    with pytest.raises(ValueError, match="keys"):
        ddpm_sample(jax_model, _jax_params(), schedule, noise, cond, num_inference_steps=4)
    with pytest.raises(ValueError, match="keys has 2 rows"):
        ddpm_sample(
            jax_model,
            _jax_params(),
            schedule,
            noise,
            cond,
            num_inference_steps=4,
            keys=jax.random.split(jax.random.key(0)),
        )
    with pytest.raises(ValueError, match="step_noise shape"):
        ddpm_sample(jax_model, _jax_params(), schedule, noise, cond, num_inference_steps=4, step_noise=jnp.zeros(SHAPE))


# ---------------------------------------------------------------------------------------------------------------
# Compilation: once per (shapes, num_inference_steps); guidance scale, eta and weights are traced
# ---------------------------------------------------------------------------------------------------------------


def test_samplers_compile_once_per_shape_and_step_count():
    traces = []

    def counting_model(params, x, t, cond):
        traces.append(x.shape)  # runs only while tracing
        return jax_model(params, x, t, cond)

    schedule = NoiseSchedule.create(**SD, clip_sample=False)
    rng = np.random.default_rng(10)
    noise = jnp.asarray(_randn(rng))
    cond, uncond = (jnp.asarray(c) for c in _conditioning(rng))
    keys = jax.random.split(jax.random.key(0), SHAPE[0])

    def run(guidance, eta, params, steps=10):
        return ddim_sample(
            counting_model, params, schedule, noise, cond, uncond,
            num_inference_steps=steps, guidance_scale=guidance, eta=eta, keys=keys,
        )  # fmt: skip

    outs = [run(1.0, 0.0, _jax_params()), run(7.5, 0.0, _jax_params()), run(jnp.float32(3.0), 0.5, _jax_params())]
    outs.append(run(7.5, 0.0, jax.tree.map(lambda p: p * 1.1, _jax_params())))  # new weights, same program
    assert len(traces) == 1, f"the loop body was traced {len(traces)} times (once per step would be 10)"
    assert traces[0] == (2 * SHAPE[0], *SHAPE[1:])  # one batch of 2B for classifier-free guidance
    for a, b in itertools.pairwise(outs):
        assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3  # the traced values really changed the result
    run(7.5, 0.0, _jax_params(), steps=20)
    assert len(traces) == 2  # a new step count is a new program

    flow_traces = []

    def counting_velocity(params, x, t, cond):
        flow_traces.append(1)
        return jax_model(params, x, t, cond)

    for g in (1.0, 2.0, 5.0):
        flow_euler_sample(
            counting_velocity, _jax_params(), FlowMatchSchedule(shift=3.0), noise, cond, uncond,
            num_inference_steps=6, guidance_scale=g,
        )  # fmt: skip
    assert len(flow_traces) == 1
