"""Optimiser construction from a config: AdamW, linear warm-up + cosine decay, clipping, accumulation.

Config fields (an ``ml_collections.ConfigDict`` or any mapping; defaults in ``OPTIMIZER_DEFAULTS``):

  learning_rate          peak learning rate (after warm-up)
  warmup_steps           linear warm-up from 0 to ``learning_rate`` (train-loop steps)
  total_steps            cosine horizon including warm-up (train-loop steps); 0/None = constant after warm-up
  end_lr_ratio           final learning rate as a fraction of the peak
  b1, b2, eps            Adam moments
  weight_decay           decoupled (AdamW) weight decay
  weight_decay_exclude_1d  do not decay 1-D leaves (biases, norm scales) — the usual practice for transformers/UNets
  grad_clip_norm         global-norm clipping threshold; 0/None disables
  accumulate_steps       gradient accumulation over k train-loop steps (``optax.MultiSteps``); 1 disables

All step counts are *train-loop* steps, also under accumulation, so a config reads the same with or without it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

__all__ = ["OPTIMIZER_DEFAULTS", "Stage", "accumulate_steps", "make_lr_schedule", "make_optimizer", "ndim_decay_mask",
           "stage_index", "staged_optimizer"]

OPTIMIZER_DEFAULTS: dict[str, Any] = {
    "learning_rate": 1e-4,
    "warmup_steps": 0,
    "total_steps": 0,
    "end_lr_ratio": 0.0,
    "b1": 0.9,
    "b2": 0.999,
    "eps": 1e-8,
    "weight_decay": 0.0,
    "weight_decay_exclude_1d": True,
    "grad_clip_norm": 1.0,
    "accumulate_steps": 1,
}


def _field(config: Any, name: str) -> Any:
    """Read ``name`` from a ConfigDict/mapping/object, falling back to ``OPTIMIZER_DEFAULTS``."""
    value = config.get(name, None) if hasattr(config, "get") else getattr(config, name, None)
    return OPTIMIZER_DEFAULTS[name] if value is None else value


def _validate(config: Any) -> None:
    known = set(OPTIMIZER_DEFAULTS)
    keys = set(config.keys()) if hasattr(config, "keys") else set()
    unknown = keys - known
    if unknown:
        raise ValueError(f"optimizer config: unknown field(s) {sorted(unknown)}; known fields are {sorted(known)}")
    for name in ("warmup_steps", "total_steps"):
        if int(_field(config, name)) < 0:
            raise ValueError(f"optimizer config: {name} must be >= 0, got {_field(config, name)}")
    if int(_field(config, "accumulate_steps")) < 1:
        raise ValueError(f"optimizer config: accumulate_steps must be >= 1, got {_field(config, 'accumulate_steps')}")
    total, warmup = int(_field(config, "total_steps")), int(_field(config, "warmup_steps"))
    if total and warmup > total:
        raise ValueError(f"optimizer config: warmup_steps ({warmup}) exceeds total_steps ({total})")


def accumulate_steps(config: Any) -> int:
    """Number of train-loop steps whose gradients are averaged into one optimiser update."""
    return int(_field(config, "accumulate_steps"))


def _loop_schedule(config: Any) -> optax.Schedule:
    """The learning rate as a function of the train-loop step (before accounting for accumulation)."""
    peak = float(_field(config, "learning_rate"))
    warmup, total = int(_field(config, "warmup_steps")), int(_field(config, "total_steps"))
    if not total:
        if not warmup:
            return optax.constant_schedule(peak)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)], boundaries=[warmup]
        )
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak,
        warmup_steps=warmup,
        decay_steps=total,
        end_value=peak * float(_field(config, "end_lr_ratio")),
    )


def make_lr_schedule(config: Any) -> optax.Schedule:
    """Learning rate in effect at a given train-loop step (what the train step logs).

    Under accumulation over k steps the update applied at loop step ``s`` uses the rate of step ``s - s % k``: the
    first micro-step of its window (``make_optimizer`` evaluates the schedule at ``update_index * k``).
    """
    base = _loop_schedule(config)
    k = accumulate_steps(config)
    if k == 1:
        return base
    return lambda step: base((jnp.asarray(step) // k) * k)


def ndim_decay_mask(params: Any) -> Any:
    """Weight-decay mask: True for leaves with ndim > 1 (kernels, embeddings, LoRA factors), False for 1-D/scalars."""
    return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


def make_optimizer(
    config: Any, *, weight_decay_mask: Any | Callable[[Any], Any] | None = None
) -> optax.GradientTransformation:
    """AdamW with linear warm-up + cosine decay, global-norm clipping and optional accumulation.

    Args:
      config: optimiser fields (see the module docstring); unknown fields raise ``ValueError`` naming them.
      weight_decay_mask: a pytree of bools (or a function params -> pytree of bools) saying which leaves decay.
        Overrides ``weight_decay_exclude_1d``.

    Returns:
      An ``optax.GradientTransformation``. With ``accumulate_steps > 1`` it is ``optax.MultiSteps(...)``'s
      transformation: its state is an ``optax.MultiStepsState`` and parameters change every k-th step only
      (``make_train_step`` uses that to update the EMA only on real updates).
    """
    _validate(config)
    k = accumulate_steps(config)
    base = _loop_schedule(config)
    # The inner optimiser's count is the update index u; its window starts at loop step u·k.
    schedule = base if k == 1 else (lambda u: base(u * k))
    mask = weight_decay_mask
    if mask is None and bool(_field(config, "weight_decay_exclude_1d")):
        mask = ndim_decay_mask
    parts = []
    clip = _field(config, "grad_clip_norm")
    if clip:
        parts.append(optax.clip_by_global_norm(float(clip)))
    parts.append(
        optax.adamw(
            learning_rate=schedule,
            b1=float(_field(config, "b1")),
            b2=float(_field(config, "b2")),
            eps=float(_field(config, "eps")),
            weight_decay=float(_field(config, "weight_decay")),
            mask=mask,
        )
    )
    tx = optax.chain(*parts) if len(parts) > 1 else parts[0]
    if k > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=k).gradient_transformation()
    return tx


# ----------------------------------------------------------------------------------------------------------------
# Staged training: consecutive stages that train different parameter groups at different learning rates
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Stage:
    """``steps`` optimiser steps of Adam at ``learning_rate`` on the parameter groups named in ``groups``."""

    steps: int
    learning_rate: float
    groups: tuple[str, ...]

    def __post_init__(self):
        if self.steps < 1 or self.learning_rate < 0 or not self.groups:
            raise ValueError(f"invalid training stage {self}: needs steps >= 1, learning_rate >= 0 and >= 1 group")


class StagedState(NamedTuple):
    count: jax.Array  # optimiser steps taken so far (all stages)
    stages: tuple[Any, ...]  # one optimiser state per stage


def stage_index(stages: Sequence[Stage], step: jax.Array | int) -> jax.Array:
    """Index of the stage that step ``step`` (0-based) belongs to; past the last stage, the last stage."""
    boundaries = jnp.cumsum(jnp.asarray([s.steps for s in stages]))[:-1]
    return jnp.searchsorted(boundaries, step, side="right")


def staged_optimizer(stages: Sequence[Stage], labels: Callable[[Any], Any]) -> optax.GradientTransformation:
    """Stage 0 for ``stages[0].steps`` updates, then stage 1, ...; the last stage continues past its length.

    ``labels(params)`` gives each leaf its group name. A stage's leaves outside its ``groups`` get zero updates, and
    every stage has its own Adam moments, kept only for the leaves it trains: as if a fresh optimiser were built
    per stage (staged recipes such as AttnDreamBooth do that), without the moments of a frozen full model.

    The active stage is chosen with ``lax.switch`` on the step count, so one compiled step serves every stage (under
    ``vmap`` over subjects the switch becomes a select and every stage's Adam runs; the updates are the same).
    """
    stages = tuple(stages)
    if not stages:
        raise ValueError("staged_optimizer: no stages")

    def stage_tx(stage: Stage) -> optax.GradientTransformation:
        def train_or_freeze(params):
            return jax.tree.map(lambda g: "train" if g in stage.groups else "freeze", labels(params))
        return optax.multi_transform({"train": optax.adam(stage.learning_rate), "freeze": optax.set_to_zero()},
                                     train_or_freeze)

    txs = tuple(stage_tx(s) for s in stages)

    def init(params):
        return StagedState(jnp.zeros([], jnp.int32), tuple(tx.init(params) for tx in txs))

    def update(grads, state, params=None):
        index = stage_index(stages, state.count)

        def branch(i):
            def run(grads, inner, params):
                updates, new = txs[i].update(grads, inner[i], params)
                return updates, (*inner[:i], new, *inner[i + 1:])
            return run

        updates, inner = jax.lax.switch(index, [branch(i) for i in range(len(txs))], grads, state.stages, params)
        return updates, StagedState(state.count + 1, inner)

    return optax.GradientTransformation(init, update)
