"""Samplers as jitted ``lax.scan`` loops: DDIM (η), DDPM ancestral, and Euler for rectified flow.

Every sampler takes a pure network function ``model_fn(params, x, t, cond) -> prediction``:

* ``params`` — any pytree (e.g. an NNX state); it is a *traced* argument, so sampling with new weights (every eval
  of a training run, EMA weights, LoRA-adapted weights) reuses the compiled program;
* ``x`` — (B, ...) noisy samples, batch axis first, layout is up to the model (we only do elementwise math);
* ``t`` — (B,) timesteps: int32 train timesteps for DDIM/DDPM, float32 ``σ·num_train_timesteps`` for flow;
* ``cond`` — any pytree with batch axis first (text embeddings, attention masks, ...).

Classifier-free guidance follows diffusers: ``uncond`` and ``cond`` are concatenated into one batch of 2B
(uncond first), the model runs once, and ``pred = pred_uncond + g·(pred_cond - pred_uncond)``. Without
``uncond`` the model runs on B examples and ``guidance_scale`` is unused.

Compilation: ``model_fn``, ``num_inference_steps`` and ``return_trajectory`` are static (the timesteps are host
constants derived from them and the schedule's static fields); ``guidance_scale`` and ``eta`` are traced, so
sweeping them never recompiles, and the loop body — hence the model — is traced once per compile. Define
``model_fn`` once (e.g. ``functools.partial(apply_fn, graphdef)`` built at start-up): jit keys static arguments
by identity, so a fresh lambda per call compiles anew.

Randomness is per example: ``keys`` holds one PRNG key per batch row (a "seed"). :func:`initial_noise` draws
x_T from ``fold_in(key, 0)`` and step ``i`` draws its noise from ``fold_in(fold_in(key, 1), i)``, so a seed's
sample does not depend on which other seeds share its batch. Tests pass ``step_noise`` instead, to replay the
exact noise a diffusers run used.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from metalora.compiler import jit
from metalora.diffusion.forward import add_noise, prediction_to_x0_eps
from metalora.diffusion.schedules import FlowMatchSchedule, NoiseSchedule

ModelFn = Callable[[Any, jax.Array, jax.Array, Any], jax.Array]

_INIT_TAG, _STEP_TAG = 0, 1


# ----------------------------------------------------------------------------------------------------------------
# Seeds, batching, guidance
# ----------------------------------------------------------------------------------------------------------------


def initial_noise(keys: jax.Array, sample_shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """x_T ~ N(0, I) of shape (len(keys), *sample_shape): row b is a function of ``keys[b]`` alone."""
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, _INIT_TAG), sample_shape, dtype))(keys)


def _per_example_noise(keys: jax.Array, step: jax.Array, like: jax.Array) -> jax.Array:
    def draw(k):
        return jax.random.normal(jax.random.fold_in(jax.random.fold_in(k, _STEP_TAG), step), like.shape[1:], like.dtype)

    return jax.vmap(draw)(keys)


def repeat_for_seeds(cond: Any, num_seeds: int) -> Any:
    """Repeat every prompt's conditioning ``num_seeds`` times (prompt-major: p0s0, p0s1, ..., p1s0, ...)."""
    return jax.tree.map(lambda c: jnp.repeat(c, num_seeds, axis=0), cond)


def guided_prediction(
    model_fn: ModelFn,
    params: Any,
    x: jax.Array,
    t: jax.Array,
    cond: Any,
    uncond: Any | None,
    guidance_scale: jax.Array,
) -> jax.Array:
    """One network evaluation at scalar timestep ``t``, with classifier-free guidance when ``uncond`` is given."""
    batch = x.shape[0]
    if uncond is None:
        return model_fn(params, x, jnp.full((batch,), t), cond).astype(x.dtype)
    x_in = jnp.concatenate([x, x], axis=0)
    cond_in = jax.tree.map(lambda u, c: jnp.concatenate([u, c], axis=0), uncond, cond)
    out = model_fn(params, x_in, jnp.full((2 * batch,), t), cond_in).astype(x.dtype)
    out_uncond, out_cond = out[:batch], out[batch:]
    return out_uncond + jnp.asarray(guidance_scale, x.dtype) * (out_cond - out_uncond)


# ----------------------------------------------------------------------------------------------------------------
# Single steps (diffusers' ``scheduler.step`` as pure functions; timesteps may be traced scalars)
# ----------------------------------------------------------------------------------------------------------------


def _alpha_bar_or(schedule: NoiseSchedule, timestep: jax.Array, fallback: jax.Array) -> jax.Array:
    """ᾱ at ``timestep``, or ``fallback`` when it is negative (the step past t = 0)."""
    return jnp.where(timestep >= 0, schedule.alphas_cumprod[jnp.maximum(timestep, 0)], fallback)


def _clip_x0(schedule: NoiseSchedule, x0: jax.Array) -> jax.Array:
    if schedule.clip_sample:
        return jnp.clip(x0, -schedule.clip_sample_range, schedule.clip_sample_range)
    return x0


def ddim_prev_timesteps(schedule: NoiseSchedule, num_inference_steps: int) -> np.ndarray:
    """The timestep each DDIM step lands on: ``t - T // n``, exactly as diffusers' ``DDIMScheduler.step``.

    For ``leading`` spacing this is the next listed timestep; for ``trailing``/``linspace`` it can differ from it
    slightly (diffusers' behaviour, kept for parity). Negative means "past t = 0" (ᾱ = final_alpha_cumprod).
    """
    ts = schedule.inference_timesteps(num_inference_steps)
    return ts - schedule.num_train_timesteps // int(num_inference_steps)


def ddpm_prev_timesteps(schedule: NoiseSchedule, num_inference_steps: int) -> np.ndarray:
    """DDPM steps to the next listed timestep, and to -1 (ᾱ = 1) after the last one."""
    ts = schedule.inference_timesteps(num_inference_steps)
    return np.concatenate([ts[1:], [-1]]).astype(np.int64)


def ddim_step(
    schedule: NoiseSchedule,
    model_output: jax.Array,
    timestep: jax.Array,
    prev_timestep: jax.Array,
    sample: jax.Array,
    eta: float | jax.Array = 0.0,
    variance_noise: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """One DDIM update x_t → x_{prev} (Song et al. 2021, eq. 12); returns (prev_sample, pred_original_sample).

    ``eta`` scales the posterior noise: 0 is the deterministic DDIM ODE step, 1 matches DDPM's variance. With
    ``variance_noise=None`` no noise is added, which is only correct for ``eta == 0``.
    """
    a_t = schedule.alphas_cumprod[timestep]
    a_prev = _alpha_bar_or(schedule, prev_timestep, schedule.final_alpha_cumprod)
    x0, eps = prediction_to_x0_eps(model_output, sample, a_t, schedule.prediction_type)
    x0 = _clip_x0(schedule, x0)
    variance = (1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)
    std = eta * jnp.sqrt(variance)
    # The direction coefficient is sqrt(1 - ᾱ_prev - std²). Written that way (as diffusers does) it cancels
    # catastrophically when ᾱ_t → 0 and η = 1 (zero-terminal-SNR schedules), leaving sqrt(rounding) ≈ 2e-4 or a
    # NaN. Expanding std² gives a sum of non-negative terms for η ≤ 1 instead:
    #   1 - ᾱ_prev - std² = (1 - ᾱ_prev)·[(1 - η²) + η²·ᾱ_t(1 - ᾱ_prev) / (ᾱ_prev(1 - ᾱ_t))].
    eta2 = jnp.square(eta)
    bracket = (1.0 - eta2) + eta2 * a_t * (1.0 - a_prev) / (a_prev * (1.0 - a_t))
    direction = jnp.sqrt(jnp.maximum((1.0 - a_prev) * bracket, 0.0)) * eps
    prev_sample = jnp.sqrt(a_prev) * x0 + direction
    if variance_noise is not None:
        prev_sample = prev_sample + std * variance_noise
    return prev_sample.astype(sample.dtype), x0


def ddpm_step(
    schedule: NoiseSchedule,
    model_output: jax.Array,
    timestep: jax.Array,
    prev_timestep: jax.Array,
    sample: jax.Array,
    variance_noise: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """One ancestral step from the posterior q(x_prev | x_t, x0̂) with ``fixed_small`` variance (as SD).

    Returns (prev_sample, pred_original_sample). Noise is added for every ``timestep > 0`` (diffusers' rule).
    """
    a_t = schedule.alphas_cumprod[timestep]
    a_prev = _alpha_bar_or(schedule, prev_timestep, jnp.ones((), a_t.dtype))
    x0, _ = prediction_to_x0_eps(model_output, sample, a_t, schedule.prediction_type)
    x0 = _clip_x0(schedule, x0)
    alpha_t = a_t / a_prev  # the one-step alpha between the two (possibly strided) timesteps
    beta_t = 1.0 - alpha_t
    mean = (jnp.sqrt(a_prev) * beta_t / (1.0 - a_t)) * x0 + (jnp.sqrt(alpha_t) * (1.0 - a_prev) / (1.0 - a_t)) * sample
    variance = jnp.maximum((1.0 - a_prev) / (1.0 - a_t) * beta_t, 1e-20)
    noise_scale = jnp.where(timestep > 0, jnp.sqrt(variance), 0.0)
    return (mean + noise_scale * variance_noise).astype(sample.dtype), x0


def flow_euler_step(model_output: jax.Array, sigma: jax.Array, sigma_next: jax.Array, sample: jax.Array) -> jax.Array:
    """One Euler step of the flow ODE dx/dσ = v from σ to σ_next (< σ)."""
    return (sample + (sigma_next - sigma) * model_output).astype(sample.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Sampling loops
# ----------------------------------------------------------------------------------------------------------------


def _check_batch(name: str, noise: jax.Array, keys: jax.Array | None, step_noise: jax.Array | None, n: int) -> None:
    if keys is not None and jnp.shape(keys)[0] != noise.shape[0]:
        raise ValueError(f"{name}: keys has {jnp.shape(keys)[0]} rows but noise has batch {noise.shape[0]}")
    if step_noise is not None and tuple(step_noise.shape) != (n, *noise.shape):
        raise ValueError(f"{name}: step_noise shape {tuple(step_noise.shape)} != (num_inference_steps, *noise.shape)")


def _step_noise(keys, step_noise_i, step, x):
    if step_noise_i is not None:
        return step_noise_i.astype(x.dtype)
    if keys is not None:
        return _per_example_noise(keys, step, x)
    return None


def _scan(body, x, xs, return_trajectory: bool):
    def wrapped(carry, inputs):
        new = body(carry, inputs)
        return new, (new if return_trajectory else None)

    final, trajectory = jax.lax.scan(wrapped, x, xs)
    return (final, trajectory) if return_trajectory else final


@functools.partial(jit, static_argnames=("model_fn", "num_inference_steps", "return_trajectory", "start_step"))
def _ddim_loop(
    model_fn, params, schedule, noise, cond, uncond, guidance_scale, eta, keys, step_noise, known=None,
    *, num_inference_steps, return_trajectory, start_step=0,
):  # fmt: skip
    ts = schedule.inference_timesteps(num_inference_steps)[start_step:]
    prevs = ddim_prev_timesteps(schedule, num_inference_steps)[start_step:]

    def body(x, inputs):
        i, t, t_prev, z = inputs
        pred = guided_prediction(model_fn, params, x, t, cond, uncond, guidance_scale)
        x = ddim_step(schedule, pred, t, t_prev, x, eta, _step_noise(keys, z, i, x))[0]
        if known is not None:  # the kept region follows the known image's own noisy path (RePaint-style)
            a_prev = _alpha_bar_or(schedule, t_prev, schedule.final_alpha_cumprod)
            on_path = jnp.sqrt(a_prev) * known["x0"] + jnp.sqrt(1.0 - a_prev) * known["noise"]
            x = known["keep"] * on_path.astype(x.dtype) + (1.0 - known["keep"]) * x
        return x

    steps = jnp.arange(start_step, num_inference_steps)
    xs = (steps, jnp.asarray(ts, jnp.int32), jnp.asarray(prevs, jnp.int32), step_noise)
    return _scan(body, noise, xs, return_trajectory)


def ddim_sample(
    model_fn: ModelFn,
    params: Any,
    schedule: NoiseSchedule,
    noise: jax.Array,
    cond: Any,
    uncond: Any | None = None,
    *,
    num_inference_steps: int,
    guidance_scale: float | jax.Array = 1.0,
    eta: float | jax.Array = 0.0,
    keys: jax.Array | None = None,
    step_noise: jax.Array | None = None,
    return_trajectory: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """DDIM sampling from x_T = ``noise`` (B, ...) with the schedule's spacing/offset/``set_alpha_to_one``.

    ``eta > 0`` needs per-example ``keys`` (B,) or explicit ``step_noise`` (num_inference_steps, B, ...).
    Returns x_0, or (x_0, trajectory) with the sample after every step, shape (num_inference_steps, B, ...).
    """
    _check_batch("ddim_sample", noise, keys, step_noise, num_inference_steps)
    if keys is None and step_noise is None and not (isinstance(eta, int | float) and eta == 0):
        raise ValueError("ddim_sample: eta may be > 0, so pass keys (one per example) or step_noise")
    return _ddim_loop(
        model_fn, params, schedule, noise, cond, uncond,
        jnp.asarray(guidance_scale, jnp.float32), jnp.asarray(eta, jnp.float32), keys, step_noise,
        num_inference_steps=num_inference_steps, return_trajectory=return_trajectory,
    )  # fmt: skip


def edit_start_step(num_inference_steps: int, strength: float) -> int:
    """The DDIM step an edit of ``strength`` starts from: the last ``round(strength · n)`` steps are run."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    return int(num_inference_steps) - round(float(strength) * int(num_inference_steps))


def ddim_edit(
    model_fn: ModelFn,
    params: Any,
    schedule: NoiseSchedule,
    image: jax.Array,
    noise: jax.Array,
    cond: Any,
    uncond: Any | None = None,
    *,
    num_inference_steps: int,
    strength: float,
    guidance_scale: float | jax.Array = 1.0,
    eta: float | jax.Array = 0.0,
    keys: jax.Array | None = None,
    keep_mask: jax.Array | None = None,
) -> jax.Array:
    """Re-draw ``image`` (x_0, B × ...): SDEdit (Meng et al. 2022) with DDIM, optionally keeping a region.

    The image is noised with ``noise`` to the timestep from which the last ``round(strength · n)`` of the
    ``num_inference_steps`` DDIM steps remain (``strength`` 1 = from pure noise, 0 = unchanged) and denoised from
    there. With ``keep_mask`` (broadcastable to the image, 1 = keep), after every step the kept region is set to
    the image noised to that step's timestep with the same ``noise``, and the result is exactly ``image`` there
    (RePaint's known-region replacement, deterministic): the model only draws the rest, in context.
    """
    start = edit_start_step(num_inference_steps, strength)
    if start == num_inference_steps:
        return image
    _check_batch("ddim_edit", noise, keys, None, num_inference_steps)
    if keys is None and not (isinstance(eta, int | float) and eta == 0):
        raise ValueError("ddim_edit: eta may be > 0, so pass keys (one per example)")
    t_start = jnp.full((image.shape[0],), schedule.inference_timesteps(num_inference_steps)[start], jnp.int32)
    x_start = add_noise(schedule, image.astype(noise.dtype), noise, t_start)
    known = None
    if keep_mask is not None:
        keep = jnp.broadcast_to(jnp.asarray(keep_mask, noise.dtype), image.shape)
        known = {"x0": image.astype(noise.dtype), "noise": noise, "keep": keep}
    x0 = _ddim_loop(
        model_fn, params, schedule, x_start, cond, uncond,
        jnp.asarray(guidance_scale, jnp.float32), jnp.asarray(eta, jnp.float32), keys, None, known,
        num_inference_steps=num_inference_steps, return_trajectory=False, start_step=start,
    )  # fmt: skip
    return x0 if known is None else known["keep"] * known["x0"] + (1.0 - known["keep"]) * x0


@functools.partial(jit, static_argnames=("model_fn", "num_inference_steps", "return_trajectory"))
def _ddpm_loop(
    model_fn, params, schedule, noise, cond, uncond, guidance_scale, keys, step_noise,
    *, num_inference_steps, return_trajectory,
):  # fmt: skip
    ts = schedule.inference_timesteps(num_inference_steps)
    prevs = ddpm_prev_timesteps(schedule, num_inference_steps)

    def body(x, inputs):
        i, t, t_prev, z = inputs
        pred = guided_prediction(model_fn, params, x, t, cond, uncond, guidance_scale)
        return ddpm_step(schedule, pred, t, t_prev, x, _step_noise(keys, z, i, x))[0]

    xs = (jnp.arange(num_inference_steps), jnp.asarray(ts, jnp.int32), jnp.asarray(prevs, jnp.int32), step_noise)
    return _scan(body, noise, xs, return_trajectory)


def ddpm_sample(
    model_fn: ModelFn,
    params: Any,
    schedule: NoiseSchedule,
    noise: jax.Array,
    cond: Any,
    uncond: Any | None = None,
    *,
    num_inference_steps: int,
    guidance_scale: float | jax.Array = 1.0,
    keys: jax.Array | None = None,
    step_noise: jax.Array | None = None,
    return_trajectory: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """DDPM ancestral sampling (``fixed_small`` variance); needs ``keys`` (B,) or ``step_noise``."""
    _check_batch("ddpm_sample", noise, keys, step_noise, num_inference_steps)
    if keys is None and step_noise is None:
        raise ValueError("ddpm_sample: ancestral sampling is stochastic; pass keys (one per example) or step_noise")
    return _ddpm_loop(
        model_fn, params, schedule, noise, cond, uncond, jnp.asarray(guidance_scale, jnp.float32), keys, step_noise,
        num_inference_steps=num_inference_steps, return_trajectory=return_trajectory,
    )  # fmt: skip


@functools.partial(jit, static_argnames=("model_fn", "num_inference_steps", "mu", "return_trajectory"))
def _flow_euler_loop(
    model_fn, params, schedule, noise, cond, uncond, guidance_scale, *, num_inference_steps, mu, return_trajectory
):
    sigmas = schedule.inference_sigmas(num_inference_steps, mu)

    def body(x, inputs):
        sigma, sigma_next = inputs
        t = sigma * schedule.num_train_timesteps
        pred = guided_prediction(model_fn, params, x, t, cond, uncond, guidance_scale)
        return flow_euler_step(pred, sigma, sigma_next, x)

    xs = (jnp.asarray(sigmas[:-1]), jnp.asarray(sigmas[1:]))
    return _scan(body, noise, xs, return_trajectory)


def flow_euler_sample(
    model_fn: ModelFn,
    params: Any,
    schedule: FlowMatchSchedule,
    noise: jax.Array,
    cond: Any,
    uncond: Any | None = None,
    *,
    num_inference_steps: int,
    guidance_scale: float | jax.Array = 1.0,
    mu: float | None = None,
    return_trajectory: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Euler integration of a rectified-flow model from σ = 1 (``noise``) to σ = 0.

    The model predicts the velocity ``noise - x0`` and is called with ``t = σ·num_train_timesteps`` (float32).
    ``mu`` is the resolution shift for ``use_dynamic_shifting`` schedules (static: one compile per value).
    """
    return _flow_euler_loop(
        model_fn, params, schedule, noise, cond, uncond, jnp.asarray(guidance_scale, jnp.float32),
        num_inference_steps=num_inference_steps, mu=None if mu is None else float(mu),
        return_trajectory=return_trajectory,
    )  # fmt: skip
