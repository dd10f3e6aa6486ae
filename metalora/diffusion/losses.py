"""Diffusion training loss, min-SNR-γ weighting, and timestep sampling (all with explicit PRNG keys)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from metalora.diffusion.forward import add_noise, flow_add_noise, flow_target, training_target
from metalora.diffusion.schedules import FlowMatchSchedule, NoiseSchedule


def snr(schedule: NoiseSchedule, timesteps: jax.Array) -> jax.Array:
    """SNR(t) = ᾱ_t / (1 - ᾱ_t) at integer timesteps."""
    a = schedule.alphas_cumprod[jnp.asarray(timesteps)]
    return a / (1.0 - a)


def min_snr_weights(snr_t: jax.Array, gamma: float, prediction_type: str) -> jax.Array:
    """Per-example loss weights of Min-SNR-γ (Hang et al. 2023), expressed for each parametrisation.

    The paper's weight on the x0-space loss is ``min(SNR, γ)``. An ε-space MSE equals SNR × the x0-space MSE and
    a v-space MSE equals (SNR + 1) × it, so the same x0-space weighting becomes ``min(SNR, γ)/SNR`` for epsilon
    and ``min(SNR, γ)/(SNR + 1)`` for v-prediction. At SNR = 0 (zero-terminal-SNR schedules) the epsilon weight
    is its limit 1 rather than 0/0.
    """
    clipped = jnp.minimum(snr_t, gamma)
    if prediction_type == "epsilon":
        safe = jnp.where(snr_t > 0, snr_t, 1.0)
        return jnp.where(snr_t > 0, clipped / safe, 1.0)
    if prediction_type == "v_prediction":
        return clipped / (snr_t + 1.0)
    if prediction_type == "sample":
        return clipped
    raise ValueError(f"prediction_type={prediction_type!r} has no min-SNR weighting")


def loss_weights(schedule: NoiseSchedule, timesteps: jax.Array, min_snr_gamma: float | None) -> jax.Array:
    """Min-SNR-γ weights for a batch of timesteps, or ones when ``min_snr_gamma`` is None (plain MSE)."""
    timesteps = jnp.asarray(timesteps)
    if min_snr_gamma is None:
        return jnp.ones(timesteps.shape, jnp.float32)
    return min_snr_weights(snr(schedule, timesteps), min_snr_gamma, schedule.prediction_type)


def per_example_mse(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Mean squared error over every non-batch axis, in float32 (bf16 activations still give an f32 loss)."""
    diff = pred.astype(jnp.float32) - target.astype(jnp.float32)
    return jnp.mean(jnp.square(diff), axis=tuple(range(1, diff.ndim)))


def diffusion_loss(pred: jax.Array, target: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """Scalar loss: batch mean of ``weights[b] · mean((pred[b] - target[b])²)``; ``weights=None`` means 1."""
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {pred.shape} != target shape {target.shape}")
    mse = per_example_mse(pred, target)
    if weights is not None:
        mse = mse * jnp.asarray(weights, jnp.float32).reshape(mse.shape)
    return jnp.mean(mse)


def sample_timesteps(key: jax.Array, batch_size: int, num_train_timesteps: int, *, high_noise_fraction: float = 0.0,
                     high_noise_start: int = 0) -> jax.Array:
    """Integer timesteps in [0, T), shape (batch_size,), int32: uniform, or with ``high_noise_fraction`` > 0 a mixture
    that draws each timestep from [``high_noise_start``, T) with that probability and from [0, T) otherwise.

    Why a mixture: a caption only changes the best prediction where the noisy image no longer shows what it says.
    In the procedural world that is t ≳ 800-900, and an attribute's share of the pixel variance there bounds its
    share of the loss (pose 0.17 %, hat 4.3 %, background 59 %: ``benchmarks/base_quality.py``), so uniform sampling
    spends few steps on exactly the words that are learned last. The mixture changes the objective's weighting over
    t (as SD3's logit-normal does for flows); the default (0) draws exactly what plain uniform sampling drew.
    """
    if high_noise_fraction == 0.0:
        return jax.random.randint(key, (batch_size,), 0, num_train_timesteps, dtype=jnp.int32)
    if not 0.0 < high_noise_fraction <= 1.0 or not 0 <= high_noise_start < num_train_timesteps:
        raise ValueError(f"sample_timesteps: high_noise_fraction must be in [0, 1] and high_noise_start in "
                         f"[0, {num_train_timesteps}), got {high_noise_fraction} and {high_noise_start}")
    k_uniform, k_high, k_pick = jax.random.split(key, 3)
    uniform = jax.random.randint(k_uniform, (batch_size,), 0, num_train_timesteps, dtype=jnp.int32)
    high = jax.random.randint(k_high, (batch_size,), high_noise_start, num_train_timesteps, dtype=jnp.int32)
    return jnp.where(jax.random.bernoulli(k_pick, high_noise_fraction, (batch_size,)), high, uniform)


def sample_flow_sigmas(
    key: jax.Array,
    batch_size: int,
    schedule: FlowMatchSchedule,
    *,
    weighting: str = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mu: float | None = None,
) -> jax.Array:
    """Training σ ∈ (0, 1) for rectified flow, shape (batch_size,), float32.

    ``weighting='uniform'`` draws u ~ U(0, 1); ``'logit_normal'`` draws u = sigmoid(N(logit_mean, logit_std²)),
    SD3's default, which concentrates training on mid-range σ. The schedule's shift is then applied to u, so
    training sees the same σ distribution the shifted sampler visits. This is the continuous version of
    diffusers' training scripts (which round u to one of T discrete σ).
    """
    if weighting == "uniform":
        # Open interval: σ = 0 or 1 carries no learning signal and breaks the dynamic-shift formula at 0.
        u = jax.random.uniform(key, (batch_size,), jnp.float32, minval=1e-5, maxval=1.0)
    elif weighting == "logit_normal":
        u = jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(key, (batch_size,), jnp.float32))
    else:
        raise ValueError(f"weighting={weighting!r} is not supported; choose 'uniform' or 'logit_normal'")
    return schedule.shift_sigmas(u, mu).astype(jnp.float32)


def training_noise(schedule: NoiseSchedule, key: jax.Array, x0: jax.Array,
                   **timestep_kwargs) -> tuple[jax.Array, jax.Array]:
    """(t, noise) for a batch of clean samples ``x0``: t uniform unless ``timestep_kwargs`` say otherwise (see
    :func:`sample_timesteps`), Gaussian noise of ``x0``'s shape, both from ``key``."""
    k_t, k_noise = jax.random.split(key)
    t = sample_timesteps(k_t, x0.shape[0], schedule.num_train_timesteps, **timestep_kwargs)
    return t, jax.random.normal(k_noise, x0.shape, x0.dtype)


def training_inputs(schedule: NoiseSchedule, key: jax.Array, x0: jax.Array,
                    **timestep_kwargs) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One draw of (x_t, t, target) for a batch of clean samples (t and noise from :func:`training_noise`)."""
    t, noise = training_noise(schedule, key, x0, **timestep_kwargs)
    return add_noise(schedule, x0, noise, t), t, training_target(schedule, x0, noise, t)


def flow_training_inputs(
    schedule: FlowMatchSchedule, key: jax.Array, x0: jax.Array, **sigma_kwargs
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Rectified-flow (x_σ, t = σ·num_train_timesteps, target = noise - x0); ``sigma_kwargs`` go to
    :func:`sample_flow_sigmas` (weighting, logit_mean, logit_std, mu)."""
    k_sigma, k_noise = jax.random.split(key)
    sigmas = sample_flow_sigmas(k_sigma, x0.shape[0], schedule, **sigma_kwargs)
    noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
    return flow_add_noise(x0, noise, sigmas), sigmas * schedule.num_train_timesteps, flow_target(x0, noise)
