"""metalora.train — the one training loop of the project (pretraining, meta-training, adaptation, baselines).

Pieces, from the inside out:

* ``TrainState`` / ``create_train_state``: the pytree a step maps to its successor (trainable ``params``,
  ``opt_state``, optional ``ema_params``, a non-differentiated ``frozen`` part).
* ``make_optimizer`` / ``make_lr_schedule``: AdamW + warm-up/cosine + clipping (+ accumulation) from a config.
* ``make_train_step``: the jitted, donated ``step_fn(state, batch, key) -> (state, metrics)`` for a
  ``loss_fn(params, frozen, batch, key)``, with EMA and a no-update-on-NaN guarantee.
* ``TrainLoop`` / ``train_loop``: the Python driver: data, logging, hooks, orbax checkpoints, exact resume,
  ``NonFiniteError``.
* ``save_image_grid`` / ``plot_curves``: atomic PNG outputs.
"""

from metalora.train.checkpoint import make_checkpoint_manager, restore_checkpoint, save_checkpoint
from metalora.train.io import (
    atomic_write_bytes,
    atomic_write_text,
    make_image_grid,
    plot_curves,
    read_metrics_jsonl,
    save_image_grid,
)
from metalora.train.loop import (
    DataIterator,
    Hook,
    NonFiniteError,
    TrainLoop,
    run_training_job,
    sample_grid_hook,
    train_loop,
)
from metalora.train.optim import OPTIMIZER_DEFAULTS, make_lr_schedule, make_optimizer, ndim_decay_mask
from metalora.train.state import TrainState, create_train_state
from metalora.train.step import TrainStep, ema_decay_at, ema_update, make_train_step

__all__ = [
    "OPTIMIZER_DEFAULTS",
    "DataIterator",
    "Hook",
    "NonFiniteError",
    "TrainLoop",
    "TrainState",
    "TrainStep",
    "atomic_write_bytes",
    "atomic_write_text",
    "create_train_state",
    "ema_decay_at",
    "ema_update",
    "make_checkpoint_manager",
    "make_image_grid",
    "make_lr_schedule",
    "make_optimizer",
    "make_train_step",
    "ndim_decay_mask",
    "plot_curves",
    "read_metrics_jsonl",
    "restore_checkpoint",
    "run_training_job",
    "sample_grid_hook",
    "save_checkpoint",
    "save_image_grid",
    "train_loop",
]
