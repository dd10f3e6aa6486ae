"""The generic jitted train step: ``step_fn(state, batch, key) -> (state, metrics)``.

Contract used by every job (pretraining, meta-training, adaptation, baselines):

* ``key`` is the run's *base* key; the step derives its own key as ``jax.random.fold_in(key, state.step)``. The
  randomness of step k therefore depends only on (base key, k): a resumed run draws exactly the noise an
  uninterrupted one would, with no RNG state to carry.
* ``loss_fn(params, frozen, batch, key) -> (loss, aux_metrics)`` with a scalar loss and a dict of scalar metrics.
  Only ``params`` (= ``state.params``) is differentiated.
* ``metrics`` holds ``loss``, ``grad_norm`` (global L2 norm of the raw gradient, before clipping),
  ``learning_rate`` (when a schedule is given), ``finite`` (``isfinite(loss) & isfinite(grad_norm)``) and the aux
  metrics.
* A non-finite step applies *no* update: the returned state equals the input state (step count included), so the
  caller holds the last good state when it sees ``finite == False``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from metalora.compiler import jit
from metalora.train.state import TrainState

__all__ = ["RESERVED_METRICS", "TrainStep", "ema_update", "make_train_step"]

RESERVED_METRICS = ("loss", "grad_norm", "learning_rate", "finite")

LossFn = Callable[[Any, Any, Any, jax.Array], tuple[jax.Array, Mapping[str, jax.Array]]]


def ema_update(ema_params: Any, params: Any, decay: float | jax.Array) -> Any:
    """``decay·ema + (1 − decay)·params`` leafwise, computed in float32 and stored in the EMA's dtype."""

    def one(e, p):
        e32 = e.astype(jnp.float32)
        return (e32 + (1.0 - decay) * (p.astype(jnp.float32) - e32)).astype(e.dtype)

    return jax.tree.map(one, ema_params, params)


def ema_decay_at(decay: float, num_updates: jax.Array) -> jax.Array:
    """EMA warm-up: ``min(decay, (1 + n) / (10 + n))`` after ``n`` applied updates (TF's ``ExponentialMovingAverage``
    with ``num_updates``), so the first averages follow the weights instead of staying near the random init."""
    n = jnp.asarray(num_updates, jnp.float32)
    return jnp.minimum(jnp.float32(decay), (1.0 + n) / (10.0 + n))


def _updates_before(state_step: jax.Array, new_opt_state: Any) -> jax.Array:
    """How many optimiser updates were applied before this step's (micro-steps of an accumulation count as one)."""
    if isinstance(new_opt_state, optax.MultiStepsState):
        return jnp.maximum(new_opt_state.gradient_step - 1, 0)  # already counts the update this step applied
    return state_step


def _applied_update(opt_state: Any) -> jax.Array:
    """Whether the optimiser changed the parameters on this step (False on non-final accumulation micro-steps)."""
    if isinstance(opt_state, optax.MultiStepsState):
        return opt_state.mini_step == 0  # reset to 0 right after the k-th micro-step applied the averaged update
    return jnp.asarray(True)


def _select(pred: jax.Array, on_true: Any, on_false: Any) -> Any:
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


class TrainStep:
    """A compiled train step with the public signature ``(state, batch, key) -> (state, metrics)``.

    ``state.frozen`` is split off and passed as its own jit argument so that only the rest of the state is donated.
    ``jitted`` is the underlying ``jax.jit`` function ``(state_without_frozen, frozen, batch, key)``; ``lower``
    mirrors the public signature for AOT compilation from abstract shapes (``jax.ShapeDtypeStruct`` leaves).
    """

    def __init__(self, jitted: Any):
        self.jitted = jitted

    def __call__(self, state: TrainState, batch: Any, key: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
        frozen = state.frozen
        new_state, metrics = self.jitted(state.replace(frozen=None), frozen, batch, key)
        return new_state.replace(frozen=frozen), metrics

    def lower(self, state: TrainState, batch: Any, key: Any) -> Any:
        return self.jitted.lower(state.replace(frozen=None), state.frozen, batch, key)


def _split_state_sharding(state_sharding: Any) -> tuple[Any, Any]:
    """(sharding of the donated part, sharding of ``frozen``) from a TrainState of shardings or one sharding."""
    if isinstance(state_sharding, TrainState):
        return state_sharding.replace(frozen=None), state_sharding.frozen
    return state_sharding, state_sharding


def make_train_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    ema_decay: float | None = None,
    *,
    ema_warmup: bool = False,
    lr_schedule: optax.Schedule | None = None,
    in_shardings: tuple[Any, Any, Any] | None = None,
    out_shardings: tuple[Any, Any] | None = None,
    donate: bool = True,
) -> TrainStep:
    """Build the jitted train step for ``loss_fn`` and ``optimizer``.

    Args:
      loss_fn: ``(params, frozen, batch, key) -> (scalar loss, dict of scalar aux metrics)``.
      optimizer: e.g. ``make_optimizer(config)``; ``state.opt_state`` must be its state.
      ema_decay: if set, ``state.ema_params`` is updated inside the step after every applied update
        (``ema ← decay·ema + (1−decay)·params``; skipped on accumulation micro-steps). Requires a state created with
        ``ema=True``.
      ema_warmup: use ``ema_decay_at(ema_decay, n)`` after ``n`` applied updates instead of the constant decay.
      lr_schedule: learning rate as a function of ``state.step``, only reported (``make_lr_schedule(config)``).
      in_shardings: optional ``(state, batch, key)`` shardings passed through to ``jax.jit``; the state entry is a
        ``TrainState`` of shardings (its ``frozen`` field shards ``frozen``) or one sharding for the whole state.
      out_shardings: optional ``(state, metrics)`` shardings, same conventions.
      donate: donate the (non-frozen) state's buffers; the input state is invalid after the call.

    Returns:
      A ``TrainStep``: ``step_fn(state, batch, key) -> (state, metrics)``.
    """

    def checked_loss(params, frozen, batch, key):
        loss, aux = loss_fn(params, frozen, batch, key)
        if jnp.shape(loss) != ():
            raise ValueError(f"loss_fn must return a scalar loss, got shape {jnp.shape(loss)}")
        clash = set(aux) & set(RESERVED_METRICS)
        if clash:
            raise ValueError(f"loss_fn aux metrics use reserved names {sorted(clash)}; rename them")
        return loss, aux

    def step(state: TrainState, frozen: Any, batch: Any, key: jax.Array):
        if ema_decay is not None and state.ema_params is None:
            raise ValueError(
                "make_train_step(ema_decay=...) needs a state with ema_params (create_train_state(ema=True))"
            )
        step_key = jax.random.fold_in(key, state.step)
        (loss, aux), grads = jax.value_and_grad(checked_loss, has_aux=True)(state.params, frozen, batch, step_key)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema_params = state.ema_params
        if ema_decay is not None:
            decay = ema_decay_at(ema_decay, _updates_before(state.step, opt_state)) if ema_warmup else ema_decay
            ema_params = _select(_applied_update(opt_state), ema_update(ema_params, params, decay), ema_params)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        candidate = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema_params)
        # Select, not branch: both states exist anyway, and `where` keeps the donated buffers' aliasing simple.
        new_state = _select(finite, candidate, state)
        metrics = {"loss": loss.astype(jnp.float32), "grad_norm": grad_norm.astype(jnp.float32), "finite": finite}
        if lr_schedule is not None:
            metrics["learning_rate"] = jnp.asarray(lr_schedule(state.step), jnp.float32)
        metrics.update({k: jnp.asarray(v) for k, v in aux.items()})
        return new_state, metrics

    jit_kwargs: dict[str, Any] = {}
    if in_shardings is not None:
        state_sh, batch_sh, key_sh = in_shardings
        donated_sh, frozen_sh = _split_state_sharding(state_sh)
        jit_kwargs["in_shardings"] = (donated_sh, frozen_sh, batch_sh, key_sh)
    if out_shardings is not None:
        state_sh, metrics_sh = out_shardings
        jit_kwargs["out_shardings"] = (_split_state_sharding(state_sh)[0], metrics_sh)
    jitted = jit(step, donate_argnums=(0,) if donate else (), **jit_kwargs)
    return TrainStep(jitted)
