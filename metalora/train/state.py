"""The train state: one pytree that a jitted step maps to its successor."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

__all__ = ["TrainState", "create_train_state"]


@struct.dataclass
class TrainState:
    """Everything a train step reads and writes.

    Attributes:
      step: int32 scalar, the number of completed train-loop steps (also the index of the next step).
      params: the *trainable* parameters only; gradients and optimiser state have this structure.
      opt_state: the optax state of ``params``.
      ema_params: exponential moving average of ``params`` (same structure), or None when EMA is off.
      frozen: parameters the loss reads but never differentiates (the base UNet under LoRA, ``D`` during adaptation).
        The train step passes them to the compiled program as a separate, *non-donated* argument, so the caller's
        arrays stay valid and no copy is made; checkpoints leave them out by default (they are reloaded from where
        they came from, e.g. the base-model checkpoint), see ``TrainLoop(checkpoint_frozen=...)``.

    Subclass (``@struct.dataclass class MyState(TrainState): extra: Any = None``) to carry more fields; the step
    passes unknown fields through unchanged and the checkpoint saves them.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any = None
    frozen: Any = None


def create_train_state(
    params: Any, optimizer: optax.GradientTransformation, *, frozen: Any = None, ema: bool = False
) -> TrainState:
    """Fresh state at step 0: ``optimizer.init(params)`` and, with ``ema=True``, an EMA initialised to ``params``.

    The EMA gets its own copy of the buffers: the step donates the state, and one buffer cannot be donated twice.
    """
    ema_params = jax.tree.map(jnp.copy, params) if ema else None
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        ema_params=ema_params,
        frozen=frozen,
    )
