"""Forward process, training targets, parametrisation conversions, min-SNR weights and timestep sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from metalora.diffusion import (
    FlowMatchSchedule,
    NoiseSchedule,
    add_noise,
    diffusion_loss,
    eps_to_x0,
    flow_add_noise,
    flow_target,
    flow_training_inputs,
    flow_velocity_to_x0,
    get_velocity,
    loss_weights,
    min_snr_weights,
    prediction_to_x0_eps,
    sample_flow_sigmas,
    sample_timesteps,
    snr,
    training_inputs,
    training_target,
    v_to_eps,
    v_to_x0,
    x0_eps_to_v,
    x0_to_eps,
)

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def _data(seed=0, shape=(6, 8, 8, 4)):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape, dtype=np.float32), rng.standard_normal(shape, dtype=np.float32)


@pytest.mark.parametrize("cfg", [SD, dict(beta_schedule="squaredcos_cap_v2"), dict(beta_schedule="linear")])
def test_add_noise_and_velocity_match_diffusers(cfg):
    x0, noise = _data()
    t = np.array([0, 1, 250, 500, 998, 999])
    ref = DDPMScheduler(**cfg)
    ours = NoiseSchedule.create(**cfg)
    tt = torch.from_numpy(t)
    ref_noisy = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), tt).numpy()
    ref_v = ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), tt).numpy()
    np.testing.assert_allclose(np.asarray(add_noise(ours, x0, noise, t)), ref_noisy, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(get_velocity(ours, x0, noise, t)), ref_v, rtol=1e-5, atol=1e-5)


def test_training_target_per_prediction_type():
    x0, noise = _data(1)
    t = jnp.array([3, 100, 400, 600, 900, 999])
    for prediction_type, expected in [
        ("epsilon", noise),
        ("sample", x0),
        ("v_prediction", get_velocity(NoiseSchedule.create(**SD), x0, noise, t)),
    ]:
        schedule = NoiseSchedule.create(**SD, prediction_type=prediction_type)
        np.testing.assert_array_equal(np.asarray(training_target(schedule, x0, noise, t)), np.asarray(expected))


def test_conversions_are_mutually_consistent():
    """x_t, x0, ε and v: every parametrisation recovers the others (float64 to test the algebra, not rounding)."""
    with jax.enable_x64():
        rng = np.random.default_rng(2)
        x0, eps = rng.standard_normal((2, 5, 3))
        a = np.array([0.999, 0.7, 0.3, 0.01, 0.0001])[:, None]
        x_t = np.sqrt(a) * x0 + np.sqrt(1 - a) * eps
        v = x0_eps_to_v(x0, eps, a)
        np.testing.assert_allclose(v, np.sqrt(a) * eps - np.sqrt(1 - a) * x0)
        np.testing.assert_allclose(eps_to_x0(eps, x_t, a), x0, atol=1e-9)
        np.testing.assert_allclose(x0_to_eps(x0, x_t, a), eps, atol=1e-9)
        np.testing.assert_allclose(v_to_x0(v, x_t, a), x0, atol=1e-12)
        np.testing.assert_allclose(v_to_eps(v, x_t, a), eps, atol=1e-12)
        for ptype, pred in [("epsilon", eps), ("sample", x0), ("v_prediction", v)]:
            got_x0, got_eps = prediction_to_x0_eps(jnp.asarray(pred), x_t, a, ptype)
            np.testing.assert_allclose(got_x0, x0, atol=1e-9)
            np.testing.assert_allclose(got_eps, eps, atol=1e-9)
    with pytest.raises(ValueError, match="prediction_type"):
        prediction_to_x0_eps(jnp.zeros(3), jnp.zeros(3), 0.5, "flow")


def test_flow_forward_matches_diffusers_scale_noise():
    x0, noise = _data(3, (4, 6))
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref.set_timesteps(10)
    idx = [0, 3, 6, 9]
    timesteps = ref.timesteps[idx]
    ref_noisy = ref.scale_noise(torch.from_numpy(x0), timesteps, torch.from_numpy(noise)).numpy()
    sigmas = ref.sigmas[idx].numpy()
    noisy = flow_add_noise(x0, noise, sigmas)
    np.testing.assert_allclose(np.asarray(noisy), ref_noisy, rtol=1e-6, atol=1e-6)
    v = flow_target(x0, noise)
    np.testing.assert_allclose(np.asarray(flow_velocity_to_x0(v, noisy, sigmas)), x0, atol=1e-5)


def test_min_snr_weights_hand_values():
    s = jnp.array([0.0, 0.5, 1.0, 5.0, 20.0])
    gamma = 5.0
    # eps: min(SNR, γ)/SNR (limit 1 at SNR 0); v: min(SNR, γ)/(SNR+1); x0: min(SNR, γ)
    np.testing.assert_allclose(min_snr_weights(s, gamma, "epsilon"), [1.0, 1.0, 1.0, 1.0, 0.25], rtol=1e-6)
    np.testing.assert_allclose(
        min_snr_weights(s, gamma, "v_prediction"), [0.0, 0.5 / 1.5, 0.5, 5 / 6, 5 / 21], rtol=1e-6
    )
    np.testing.assert_allclose(min_snr_weights(s, gamma, "sample"), [0.0, 0.5, 1.0, 5.0, 5.0], rtol=1e-6)
    with pytest.raises(ValueError, match="prediction_type"):
        min_snr_weights(s, gamma, "flow")


def test_min_snr_weights_equalise_the_three_losses():
    """The same (x0̂ error) gives the same weighted loss whichever quantity the network predicts."""
    schedule = NoiseSchedule.create(**SD, clip_sample=False)
    t = jnp.array([10, 200, 500, 900])
    a = schedule.alphas_cumprod[t][:, None]
    x0, eps = _data(4, (4, 16))
    x_t = jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * eps
    x0_hat = x0 + 0.1  # a fixed error in x0-space
    eps_hat = x0_to_eps(x0_hat, x_t, a)
    losses = {}
    for ptype, pred, target in [
        ("sample", x0_hat, x0),
        ("epsilon", eps_hat, eps),
        ("v_prediction", x0_eps_to_v(x0_hat, eps_hat, a), x0_eps_to_v(x0, eps, a)),
    ]:
        schedule_p = NoiseSchedule.create(**SD, prediction_type=ptype)
        losses[ptype] = diffusion_loss(pred, target, loss_weights(schedule_p, t, 5.0))
    np.testing.assert_allclose(losses["epsilon"], losses["sample"], rtol=1e-3)
    np.testing.assert_allclose(losses["v_prediction"], losses["sample"], rtol=1e-3)


def test_snr_and_loss_weights_defaults():
    schedule = NoiseSchedule.create(**SD)
    t = jnp.array([0, 999])
    a = np.asarray(schedule.alphas_cumprod)[[0, 999]]
    np.testing.assert_allclose(snr(schedule, t), a / (1 - a), rtol=1e-6)
    np.testing.assert_array_equal(loss_weights(schedule, t, None), [1.0, 1.0])
    assert snr(schedule, t)[0] > 1000 > 5.0 > snr(schedule, t)[1]  # both regimes of min(SNR, γ) are exercised


def test_diffusion_loss_hand_values():
    pred = jnp.array([[1.0, 1.0], [0.0, 2.0]])
    target = jnp.zeros((2, 2))
    assert float(diffusion_loss(pred, target)) == pytest.approx((1.0 + 2.0) / 2)
    assert float(diffusion_loss(pred, target, jnp.array([2.0, 0.5]))) == pytest.approx((2.0 * 1.0 + 0.5 * 2.0) / 2)
    assert diffusion_loss(pred.astype(jnp.bfloat16), target).dtype == jnp.float32
    with pytest.raises(ValueError, match="shape"):
        diffusion_loss(pred, jnp.zeros((2, 3)))


def test_sample_timesteps_uniform_and_keyed():
    key = jax.random.key(0)
    t = sample_timesteps(key, 100_000, 1000)
    assert t.dtype == jnp.int32 and int(t.min()) == 0 and int(t.max()) == 999
    counts = np.bincount(np.asarray(t) // 100, minlength=10)
    assert np.all(np.abs(counts - 10_000) < 5 * np.sqrt(10_000))  # uniform within 5σ per decile
    np.testing.assert_array_equal(t, sample_timesteps(key, 100_000, 1000))  # explicit key: reproducible
    assert not np.array_equal(t[:100], sample_timesteps(jax.random.key(1), 100, 1000))


def test_sample_timesteps_high_noise_mixture():
    """Half the draws from [800, 1000): P(t >= 800) = 0.5 + 0.5 · 0.2 = 0.6, uniform within each part; fraction 0 is
    exactly the plain draw (so runs without the option reproduce), bad arguments fail."""
    key = jax.random.key(0)
    t = np.asarray(sample_timesteps(key, 100_000, 1000, high_noise_fraction=0.5, high_noise_start=800))
    assert t.min() == 0 and t.max() == 999
    assert abs(np.mean(t >= 800) - 0.6) < 5 * np.sqrt(0.24 / 100_000)
    high = np.bincount((t[t >= 800] - 800) // 50, minlength=4)  # 4 equal bins of [800, 1000)
    assert np.all(np.abs(high - high.mean()) < 5 * np.sqrt(high.mean()))
    low = np.bincount(t[t < 800] // 200, minlength=4)
    assert np.all(np.abs(low - low.mean()) < 5 * np.sqrt(low.mean()))
    np.testing.assert_array_equal(sample_timesteps(key, 64, 1000, high_noise_fraction=0.0, high_noise_start=800),
                                  sample_timesteps(key, 64, 1000))
    for bad in ({"high_noise_fraction": 1.5}, {"high_noise_fraction": 0.5, "high_noise_start": 1000}):
        with pytest.raises(ValueError, match="high_noise"):
            sample_timesteps(key, 4, 1000, **bad)


def test_sample_flow_sigmas_distributions():
    key = jax.random.key(0)
    plain = FlowMatchSchedule()
    u = np.asarray(sample_flow_sigmas(key, 100_000, plain))
    assert 0 < u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.01
    ln = np.asarray(sample_flow_sigmas(key, 100_000, plain, weighting="logit_normal"))
    logits = np.log(ln / (1 - ln))
    assert abs(logits.mean()) < 0.02 and abs(logits.std() - 1.0) < 0.02
    shifted = np.asarray(sample_flow_sigmas(key, 100_000, FlowMatchSchedule(shift=3.0)))
    np.testing.assert_allclose(shifted, 3 * u / (1 + 2 * u), rtol=1e-5)  # same u, shifted towards noise
    with pytest.raises(ValueError, match="weighting"):
        sample_flow_sigmas(key, 4, plain, weighting="cosmap")


def test_training_inputs_are_consistent_and_keyed():
    schedule = NoiseSchedule.create(**SD, prediction_type="v_prediction")
    x0 = jnp.asarray(_data(5, (8, 4, 4, 3))[0])
    key = jax.random.key(11)
    x_t, t, target = training_inputs(schedule, key, x0)
    assert x_t.shape == target.shape == x0.shape and t.shape == (8,) and t.dtype == jnp.int32
    # Recover the noise from x_t and check the target is the velocity of that same noise.
    a = schedule.alphas_cumprod[t][:, None, None, None]
    noise = (x_t - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)
    np.testing.assert_allclose(target, get_velocity(schedule, x0, noise, t), atol=1e-4)
    again = training_inputs(schedule, key, x0)
    np.testing.assert_array_equal(again[0], x_t)
    assert not np.array_equal(training_inputs(schedule, jax.random.key(12), x0)[0], x_t)

    flow = FlowMatchSchedule(shift=3.0)
    x_s, t_model, v = flow_training_inputs(flow, key, x0, weighting="logit_normal")
    sigmas = t_model / flow.num_train_timesteps
    assert bool(jnp.all((sigmas > 0) & (sigmas < 1)))
    noise = v + x0  # target = noise - x0
    np.testing.assert_allclose(x_s, flow_add_noise(x0, noise, sigmas), atol=1e-5)
