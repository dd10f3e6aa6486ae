"""The forward (noising) process, training targets, and conversions between the three parametrisations.

With ``a = ᾱ_t`` the discrete process is ``x_t = √a·x0 + √(1-a)·ε``. A network may predict

* ``epsilon`` — the noise ε;
* ``sample`` — the clean sample x0;
* ``v_prediction`` — the velocity ``v = √a·ε - √(1-a)·x0`` (Salimans & Ho 2022), well-conditioned at both ends.

Any one of them together with x_t determines the other two, which is what the samplers and the loss weighting
rely on. Per-example scalars (ᾱ_t, σ) are broadcast against samples of any rank: batch axis first.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from metalora.diffusion.schedules import NoiseSchedule


def _bcast(per_example: jax.Array, like: jax.Array) -> jax.Array:
    """Reshape a (B,) or scalar per-example quantity to broadcast against ``like`` of shape (B, ...)."""
    per_example = jnp.asarray(per_example)
    return per_example.reshape(per_example.shape + (1,) * (like.ndim - per_example.ndim))


def alpha_bar_at(schedule: NoiseSchedule, timesteps: jax.Array) -> jax.Array:
    """ᾱ at integer timesteps (any shape)."""
    return schedule.alphas_cumprod[jnp.asarray(timesteps)]


def add_noise(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, timesteps: jax.Array) -> jax.Array:
    """Sample q(x_t | x0): ``√ᾱ_t·x0 + √(1-ᾱ_t)·noise`` (diffusers' ``add_noise``)."""
    a = _bcast(alpha_bar_at(schedule, timesteps), x0).astype(x0.dtype)
    return jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * noise


def get_velocity(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, timesteps: jax.Array) -> jax.Array:
    """The v-prediction target ``√ᾱ_t·noise - √(1-ᾱ_t)·x0`` (diffusers' ``get_velocity``)."""
    a = _bcast(alpha_bar_at(schedule, timesteps), x0).astype(x0.dtype)
    return jnp.sqrt(a) * noise - jnp.sqrt(1.0 - a) * x0


def training_target(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, timesteps: jax.Array) -> jax.Array:
    """What the network should output at (x_t, t) for the schedule's ``prediction_type``."""
    if schedule.prediction_type == "epsilon":
        return noise
    if schedule.prediction_type == "v_prediction":
        return get_velocity(schedule, x0, noise, timesteps)
    if schedule.prediction_type == "sample":
        return x0
    raise ValueError(f"prediction_type={schedule.prediction_type!r} is not supported")


# ----------------------------------------------------------------------------------------------------------------
# Conversions between parametrisations; ``alpha_bar`` is ᾱ_t broadcastable against x_t.
# ----------------------------------------------------------------------------------------------------------------


def eps_to_x0(eps: jax.Array, x_t: jax.Array, alpha_bar: jax.Array) -> jax.Array:
    return (x_t - jnp.sqrt(1.0 - alpha_bar) * eps) / jnp.sqrt(alpha_bar)


def x0_to_eps(x0: jax.Array, x_t: jax.Array, alpha_bar: jax.Array) -> jax.Array:
    return (x_t - jnp.sqrt(alpha_bar) * x0) / jnp.sqrt(1.0 - alpha_bar)


def v_to_x0(v: jax.Array, x_t: jax.Array, alpha_bar: jax.Array) -> jax.Array:
    return jnp.sqrt(alpha_bar) * x_t - jnp.sqrt(1.0 - alpha_bar) * v


def v_to_eps(v: jax.Array, x_t: jax.Array, alpha_bar: jax.Array) -> jax.Array:
    return jnp.sqrt(alpha_bar) * v + jnp.sqrt(1.0 - alpha_bar) * x_t


def x0_eps_to_v(x0: jax.Array, eps: jax.Array, alpha_bar: jax.Array) -> jax.Array:
    return jnp.sqrt(alpha_bar) * eps - jnp.sqrt(1.0 - alpha_bar) * x0


def prediction_to_x0_eps(
    prediction: jax.Array, x_t: jax.Array, alpha_bar: jax.Array, prediction_type: str
) -> tuple[jax.Array, jax.Array]:
    """(x0̂, ε̂) implied by a network output, using diffusers' formulas (the samplers' common first step)."""
    if prediction_type == "epsilon":
        return eps_to_x0(prediction, x_t, alpha_bar), prediction
    if prediction_type == "sample":
        return prediction, x0_to_eps(prediction, x_t, alpha_bar)
    if prediction_type == "v_prediction":
        return v_to_x0(prediction, x_t, alpha_bar), v_to_eps(prediction, x_t, alpha_bar)
    raise ValueError(f"prediction_type={prediction_type!r} is not supported")


# ----------------------------------------------------------------------------------------------------------------
# Rectified flow
# ----------------------------------------------------------------------------------------------------------------


def flow_add_noise(x0: jax.Array, noise: jax.Array, sigmas: jax.Array) -> jax.Array:
    """Rectified-flow interpolation ``(1-σ)·x0 + σ·noise`` (diffusers' ``scale_noise``), σ per example."""
    s = _bcast(sigmas, x0).astype(x0.dtype)
    return (1.0 - s) * x0 + s * noise


def flow_target(x0: jax.Array, noise: jax.Array) -> jax.Array:
    """The velocity dx_σ/dσ = noise - x0 that a flow-matching network regresses."""
    return noise - x0


def flow_velocity_to_x0(velocity: jax.Array, x_sigma: jax.Array, sigmas: jax.Array) -> jax.Array:
    """x0̂ = x_σ - σ·v̂ (the clean-sample estimate of a flow model, e.g. for previews or x0-space losses)."""
    return x_sigma - _bcast(sigmas, x_sigma) * velocity
