"""The one driver loop: steps, data, logging, hooks, checkpoints, exact resume and the NaN/Inf guard.

The loop is plain Python around a compiled ``step_fn(state, batch, key) -> (state, metrics)`` (see
``metalora.train.step``); it never looks inside the state beyond ``state.step`` and ``state.frozen``.

Exact resume: a checkpoint at step k holds the train state after k steps, the data iterator's state after k batches
and the base key; the key of step k is ``fold_in(base_key, k)`` inside the step. Restoring all three reproduces the
uninterrupted run bit for bit (on the same hardware and software).

Workdir layout::

    workdir/config.json        the run's config (atomic write, process 0)
    workdir/checkpoints/<step>/{state,data,meta}
    workdir/tensorboard/       tensorboardX event files (process 0)
    workdir/metrics.jsonl      the same scalars as JSON lines (process 0), for plots and reports
    workdir/samples/           PNGs written by hooks (``sample_grid_hook``)
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import pathlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

from metalora.train import checkpoint as ckpt
from metalora.train.io import save_image_grid
from metalora.train.state import TrainState

__all__ = [
    "DataIterator",
    "Hook",
    "NonFiniteError",
    "TrainLoop",
    "sample_grid_hook",
    "train_loop",
]

log = logging.getLogger(__name__)

StepFn = Callable[[TrainState, Any, jax.Array], tuple[TrainState, Mapping[str, jax.Array]]]


@runtime_checkable
class DataIterator(Protocol):
    """A checkpointable iterator of (numpy) batches; ``get_state()`` must be JSON-serialisable."""

    def __next__(self) -> Any: ...

    def get_state(self) -> dict: ...

    def set_state(self, state: dict) -> None: ...


class NonFiniteError(FloatingPointError):
    """A train step produced a non-finite loss or gradient norm; the run stopped without applying it.

    Attributes:
      step: index of the failing step (``state.step`` before it, i.e. the number of good steps done).
      quantities: which of ``"loss"``, ``"grad_norm"`` were non-finite.
      metrics: the failing step's scalar metrics (host floats).
      last_checkpoint: the latest checkpoint step on disk (all pending saves finished), or None.
    """

    def __init__(self, step: int, quantities: Sequence[str], metrics: Mapping[str, float], last_checkpoint: int | None):
        self.step = step
        self.quantities = tuple(quantities)
        self.metrics = dict(metrics)
        self.last_checkpoint = last_checkpoint
        values = ", ".join(f"{q}={metrics.get(q)}" for q in ("loss", "grad_norm"))
        ckpt_msg = (
            f"latest checkpoint: step {last_checkpoint}" if last_checkpoint is not None else "no checkpoint saved"
        )
        super().__init__(
            f"non-finite {' and '.join(self.quantities)} at step {step} ({values}); the update was not applied, the "
            f"state is the last good one (after {step} steps); {ckpt_msg}"
        )


@dataclasses.dataclass(frozen=True)
class Hook:
    """A callback run after every ``every``-th completed step (and after the last step when ``at_end``).

    ``fn(step, state)`` runs on *every* process (it may run sharded computations); it returns None or a dict of
    scalars, which the loop logs under ``name/<key>``. File outputs are the hook's job and should be written on
    process 0 only (``sample_grid_hook`` does).
    """

    every: int
    fn: Callable[[int, TrainState], Mapping[str, float] | None]
    name: str = "eval"
    at_end: bool = True

    def __post_init__(self):
        if self.every < 1:
            raise ValueError(f"Hook {self.name!r}: every must be >= 1, got {self.every}")


def sample_grid_hook(
    sample_fn: Callable[[TrainState, int], np.ndarray],
    samples_dir: str | pathlib.Path,
    every: int,
    *,
    nrow: int = 8,
    prefix: str = "samples",
) -> Hook:
    """Hook that calls ``sample_fn(state, step) -> images (N, H, W, C) in [0, 1]`` and writes
    ``samples_dir/{prefix}_{step:07d}.png`` on process 0 (the sampling itself runs on every process)."""
    samples_dir = pathlib.Path(samples_dir)

    def fn(step: int, state: TrainState) -> None:
        images = np.asarray(jax.device_get(sample_fn(state, step)))
        if jax.process_index() == 0:
            save_image_grid(images, samples_dir / f"{prefix}_{step:07d}.png", nrow=nrow)

    return Hook(every=every, fn=fn, name=prefix)


def _next_fn(data: Any) -> Callable[[], Any]:
    if hasattr(data, "__next__"):
        return data.__next__
    if hasattr(data, "next"):
        return data.next
    raise TypeError(f"data iterator {type(data).__name__} has neither __next__ nor next()")


def _key_to_data(key: jax.Array) -> tuple[jax.Array, str | None]:
    """(uint32 key data, impl name or None for a raw key): orbax stores plain arrays, not typed PRNG keys."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key), str(jax.random.key_impl(key))
    return key, None


def _data_to_key(data: jax.Array, impl: str | None) -> jax.Array:
    return data if impl is None else jax.random.wrap_key_data(data, impl=impl)


class TrainLoop:
    """Drives ``step_fn`` from ``state.step`` to ``total_steps``; resumes from ``workdir/checkpoints`` if present.

    Args:
      workdir: output folder (layout in the module docstring).
      step_fn: ``(state, batch, key) -> (state, metrics)``; metrics must contain ``loss`` and ``finite`` (and
        usually ``grad_norm``), as ``make_train_step`` returns. The state is donated.
      state: initial ``TrainState`` (step 0 for a fresh run). Replaced by the checkpoint when one exists; its
        ``frozen`` part is kept (reattached) unless ``checkpoint_frozen``.
      data: checkpointable iterator (``DataIterator``); restored with ``set_state`` on resume.
      total_steps: the run's length; also the end of LR schedules, so keep it fixed across resumes.
      key: the base PRNG key (raw uint32[2] or typed); on resume the checkpointed key is used.
      config: the run's config (ConfigDict or mapping) written to ``workdir/config.json``.
      log_every: TensorBoard/metrics.jsonl/tqdm interval in steps; logged values are means over the interval.
      checkpoint_every: periodic checkpoint interval; the final step (or a ``run(stop_at=...)``) always saves.
      max_to_keep: number of checkpoints kept (latest N).
      hooks: ``Hook``s run after steps (eval, sample grids).
      checkpoint_frozen: also checkpoint ``state.frozen`` (off by default: it never changes and is big).
      async_checkpointing: write checkpoints in the background.
      progress: show a tqdm bar on process 0.
      prepare_batch: applied to every batch from ``data`` before the step, e.g. ``jax.device_put`` onto a mesh or
        ``jax.make_array_from_process_local_data`` for multi-host runs; default: pass the numpy batch as is.
    """

    def __init__(
        self,
        *,
        workdir: str | pathlib.Path,
        step_fn: StepFn,
        state: TrainState,
        data: DataIterator,
        total_steps: int,
        key: jax.Array,
        config: Any = None,
        log_every: int = 50,
        checkpoint_every: int = 1000,
        max_to_keep: int = 3,
        hooks: Sequence[Hook] = (),
        checkpoint_frozen: bool = False,
        async_checkpointing: bool = True,
        progress: bool = True,
        prepare_batch: Callable[[Any], Any] | None = None,
    ):
        if total_steps < 0:
            raise ValueError(f"total_steps must be >= 0, got {total_steps}")
        if log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {log_every}")
        for method in ("get_state", "set_state"):
            if not callable(getattr(data, method, None)):
                raise TypeError(f"data iterator {type(data).__name__} has no {method}(); it cannot be checkpointed")
        self.workdir = pathlib.Path(workdir)
        self.step_fn = step_fn
        self.state = state
        self.data = data
        next_raw = _next_fn(data)
        self._next = next_raw if prepare_batch is None else (lambda: prepare_batch(next_raw()))
        self.total_steps = int(total_steps)
        self.key = key
        self.log_every = int(log_every)
        self.hooks = tuple(hooks)
        self.checkpoint_every = int(checkpoint_every)
        self.checkpoint_frozen = checkpoint_frozen
        self.progress = progress
        self.is_main = jax.process_index() == 0
        self.last_metrics: dict[str, float] = {}

        self.checkpoint_dir = self.workdir / "checkpoints"
        self.samples_dir = self.workdir / "samples"
        if self.is_main:
            self.workdir.mkdir(parents=True, exist_ok=True)
            self.samples_dir.mkdir(exist_ok=True)
            if config is not None:
                from metalora.config_utils import save_config

                save_config(config, self.workdir / "config.json")
        self.manager = ckpt.make_checkpoint_manager(
            self.checkpoint_dir,
            max_to_keep=max_to_keep,
            save_interval_steps=checkpoint_every,
            async_checkpointing=async_checkpointing,
        )
        self._writer = None
        self.restored_step = self._maybe_restore()

    # ---------------------------------------------------------------- checkpoints
    def _checkpoint_tree(self) -> dict[str, Any]:
        state = self.state if self.checkpoint_frozen else self.state.replace(frozen=None)
        return {"train_state": state, "base_key": _key_to_data(self.key)[0]}

    def _maybe_restore(self) -> int | None:
        step = self.manager.latest_step()
        if step is None:
            return None
        frozen = self.state.frozen
        where = self.checkpoint_dir / str(step)
        saved_frozen = ckpt.restore_meta(self.manager, step).get("checkpoint_frozen", False)
        if saved_frozen != self.checkpoint_frozen:
            raise ValueError(
                f"checkpoint {where} was saved with checkpoint_frozen={saved_frozen} but this loop has "
                f"checkpoint_frozen={self.checkpoint_frozen}; use the same setting to resume"
            )
        try:
            tree, data_state, meta = ckpt.restore_checkpoint(self.manager, step, self._checkpoint_tree())
        except ValueError as e:
            raise ValueError(f"checkpoint {where} does not match the train state passed to TrainLoop: {e}") from e
        restored_key = _data_to_key(tree["base_key"], meta.get("key_impl"))
        if not np.array_equal(np.asarray(_key_to_data(self.key)[0]), np.asarray(tree["base_key"])):
            log.warning("resuming with the checkpointed base key, not the one passed in (seed changed?)")
        state = tree["train_state"]
        self.state = state if self.checkpoint_frozen else state.replace(frozen=frozen)
        self.key = restored_key
        self.data.set_state(data_state)
        if int(self.state.step) != step:
            raise RuntimeError(f"checkpoint {where} holds state.step={int(self.state.step)}")
        log.info("resumed from %s at step %d", self.checkpoint_dir, step)
        return step

    def _save(self, step: int, data_state: dict, force: bool) -> bool:
        # Cheap pre-check on the host (the manager's full policy walk costs ~0.5 ms): interval, forced, or a
        # preemption sync point (orbax's multi-host signal; False without a distributed runtime).
        if not (force or step % self.checkpoint_every == 0 or self.manager.reached_preemption(step)):
            return False
        meta = {
            "step": step,
            "total_steps": self.total_steps,
            "key_impl": _key_to_data(self.key)[1],
            "checkpoint_frozen": self.checkpoint_frozen,
            "time": time.time(),
        }
        return ckpt.save_checkpoint(self.manager, step, self._checkpoint_tree(), data_state, meta, force=force)

    # ---------------------------------------------------------------- logging
    @property
    def writer(self):
        if self._writer is None and self.is_main:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(logdir=str(self.workdir / "tensorboard"))
        return self._writer

    def _log(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.is_main:
            return
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()
        record = {"step": step, **{k: (v if math.isfinite(v) else str(v)) for k, v in scalars.items()}}
        with open(self.workdir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    @staticmethod
    def _mean_metrics(pending: list[Mapping[str, Any]]) -> dict[str, float]:
        host = jax.device_get(pending)
        keys = [k for k in host[0] if k != "finite"]
        return {f"train/{k}": float(np.mean([np.asarray(m[k], np.float64) for m in host])) for k in keys}

    # ---------------------------------------------------------------- the loop
    def run(self, stop_at: int | None = None) -> TrainState:
        """Run to ``total_steps`` (or stop after step ``stop_at``, saving a checkpoint there, as on preemption).

        Raises:
          NonFiniteError: a step's loss or gradient norm was NaN/Inf. ``self.state`` is the last good state and
            no checkpoint of the failing step is written; pending saves are finished first.
        """
        end = self.total_steps if stop_at is None else min(int(stop_at), self.total_steps)
        start = int(self.state.step)
        try:
            if start < end:
                self._run(start, end)
        finally:
            self.manager.wait_until_finished()
        return self.state

    def _run(self, start: int, end: int) -> None:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=self.total_steps, initial=start, disable=not (self.progress and self.is_main), dynamic_ncols=True
        )
        pending: list[Mapping[str, Any]] = []
        t_last, s_last = time.perf_counter(), start
        try:
            batch = self._next()
            for s in range(start, end):
                data_state = copy.deepcopy(self.data.get_state())  # after the batches of steps 0..s
                self.state, metrics = self.step_fn(self.state, batch, self.key)
                # Fetch the next batch while the device runs step s (jax dispatch is asynchronous).
                batch = self._next() if s + 1 < end else None
                if not bool(metrics["finite"]):  # the only per-step host sync
                    self._raise_nonfinite(s, metrics)
                step = s + 1
                pending.append(metrics)
                bar.update(1)
                if step % self.log_every == 0 or step == end:
                    scalars = self._mean_metrics(pending)
                    now = time.perf_counter()
                    scalars["train/steps_per_sec"] = (step - s_last) / max(now - t_last, 1e-9)
                    t_last, s_last, pending = now, step, []
                    self.last_metrics = scalars
                    self._log(step, scalars)
                    bar.set_postfix(loss=f"{scalars['train/loss']:.4g}")
                self._save(step, data_state, force=step == end)
                for hook in self.hooks:
                    if step % hook.every == 0 or (hook.at_end and step == self.total_steps):
                        out = hook.fn(step, self.state)
                        if out:
                            self._log(step, {f"{hook.name}/{k}": float(v) for k, v in out.items()})
        finally:
            bar.close()

    def _raise_nonfinite(self, s: int, metrics: Mapping[str, Any]) -> None:
        host = {k: float(np.asarray(v)) for k, v in jax.device_get(dict(metrics)).items() if np.ndim(v) == 0}
        bad = [q for q in ("loss", "grad_norm") if q in host and not math.isfinite(host[q])]
        self.manager.wait_until_finished()  # the last good checkpoint is complete on disk before we report it
        err = NonFiniteError(s, bad or ["metrics"], host, self.manager.latest_step())
        log.error("%s", err)
        raise err

    def close(self) -> None:
        """Finish pending checkpoint writes and close the TensorBoard writer."""
        self.manager.wait_until_finished()
        self.manager.close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> TrainLoop:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def train_loop(stop_at: int | None = None, **kwargs: Any) -> TrainState:
    """``TrainLoop(**kwargs).run(stop_at)`` with the manager and writer closed afterwards; returns the final state."""
    with TrainLoop(**kwargs) as loop:
        return loop.run(stop_at)


def run_training_job(train: Any, *, workdir: str | pathlib.Path, step_fn, state: TrainState, data: DataIterator,
                     key: jax.Array, config: Any, hooks: Sequence[Hook] = ()) -> tuple[TrainState, dict[str, Any]]:
    """A job's train section run to the end or to ``train.stop_at`` (resuming from the latest checkpoint).

    ``train`` needs ``steps``, ``log_every``, ``checkpoint_every``, ``progress`` and ``stop_at`` (0 = none). Returns the
    final state and the fields every job's ``results.json`` starts with: ``start_step``, ``step``, ``total_steps``,
    ``wall_time_s`` (this invocation, compilation included), ``wall_time_s_total`` (summed over the invocations of a
    resumed run that wrote ``<workdir>/results.json``: rerunning a finished job must not replace its measured time
    with the seconds of a no-op resume), ``final_metrics`` and ``finished``.
    """
    start = time.perf_counter()
    with TrainLoop(workdir=workdir, step_fn=step_fn, state=state, data=data, total_steps=train.steps, key=key,
                   config=config, log_every=train.log_every, checkpoint_every=train.checkpoint_every,
                   hooks=hooks, progress=train.progress) as loop:
        first = int(loop.state.step)
        state = loop.run(stop_at=train.stop_at or None)
        metrics = dict(loop.last_metrics)
    last = int(state.step)
    wall = time.perf_counter() - start
    return state, {"start_step": first, "step": last, "total_steps": train.steps, "wall_time_s": wall,
                   "wall_time_s_total": wall + _earlier_wall_time(workdir, first), "final_metrics": metrics,
                   "finished": last == train.steps}


def _earlier_wall_time(workdir: str | pathlib.Path, start_step: int) -> float:
    """Seconds the earlier invocations of a resumed run recorded in ``<workdir>/results.json`` (0 for a fresh run)."""
    path = pathlib.Path(workdir) / "results.json"
    if start_step == 0 or not path.is_file():
        return 0.0
    earlier = json.loads(path.read_text())
    return float(earlier.get("wall_time_s_total", earlier.get("wall_time_s", 0.0)))
