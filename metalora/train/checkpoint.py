"""Orbax checkpoints of a run: the train state (arrays), the data-iterator state and run metadata (JSON).

One checkpoint step folder holds three items of an ``args.Composite``:

  state  ``StandardSave`` of ``{"train_state": TrainState (frozen left out unless asked), "base_key": uint32 data}``
  data   ``JsonSave`` of the data iterator's ``get_state()``
  meta   ``JsonSave`` of small run metadata (step, key implementation, user fields)

We use orbax's stable ``CheckpointManager`` (not the experimental v1 ``Checkpointer``, whose default policy
silently drops async saves). Saves are asynchronous: the device→host copy happens before ``save`` returns (orbax's
default synchronous transfer priority), so donating the state on the next step is safe; the disk write finishes
in the background and ``wait_until_finished()`` joins it. Multi-host coordination is orbax's: every process calls
save/restore.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

__all__ = ["abstract_like", "make_checkpoint_manager", "restore_checkpoint", "restore_meta", "save_checkpoint"]

ITEMS = ("state", "data", "meta")


def make_checkpoint_manager(
    directory: str | os.PathLike,
    *,
    max_to_keep: int = 3,
    save_interval_steps: int = 1000,
    async_checkpointing: bool = True,
) -> ocp.CheckpointManager:
    """A CheckpointManager that saves every ``save_interval_steps`` steps (or when forced) and keeps the latest N.

    ``save(step, ..., force=True)`` always saves (final checkpoints, stops). Preemption signals (multi-host TPU/GPU
    schedulers) also trigger a save through orbax's ``PreemptionCheckpointingPolicy``.
    """
    if max_to_keep < 1:
        raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
    if save_interval_steps < 1:
        raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}")
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=ocm.AnySavePolicy(
            [ocm.FixedIntervalPolicy(save_interval_steps), ocm.PreemptionCheckpointingPolicy()]
        ),
        preservation_policy=ocm.LatestN(max_to_keep),
        enable_async_checkpointing=async_checkpointing,
        create=True,
    )
    return ocp.CheckpointManager(pathlib.Path(directory).absolute(), item_names=ITEMS, options=options)


def abstract_like(tree: Any) -> Any:
    """``jax.ShapeDtypeStruct`` leaves (with the arrays' shardings) describing ``tree``: the restore target."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def save_checkpoint(
    manager: ocp.CheckpointManager,
    step: int,
    state_tree: Any,
    data_state: dict,
    meta: dict,
    *,
    force: bool = False,
) -> bool:
    """Save (asynchronously) if the manager's policy says so or ``force``; returns whether a save was started."""
    return manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state_tree),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta),
        ),
        force=force,
    )


def restore_checkpoint(manager: ocp.CheckpointManager, step: int, target: Any) -> tuple[Any, dict, dict]:
    """Restore ``(state_tree, data_state, meta)`` of ``step``; ``target`` gives structure, dtypes and shardings."""
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_like(target)),
            data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore(),
        ),
    )
    return restored["state"], restored["data"], restored["meta"]


def restore_meta(manager: ocp.CheckpointManager, step: int) -> dict:
    """Only the ``meta`` item of ``step`` (cheap: no arrays are read)."""
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
