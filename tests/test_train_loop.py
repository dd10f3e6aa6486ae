"""TrainLoop: exact resume, NaN/Inf guard, checkpoints kept, workdir layout, logging and hooks (toy MLP, CPU)."""

import json
import pathlib
import struct

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict

from metalora.train import (
    Hook,
    NonFiniteError,
    TrainLoop,
    create_train_state,
    make_lr_schedule,
    make_optimizer,
    make_train_step,
    read_metrics_jsonl,
    sample_grid_hook,
    train_loop,
)

TOTAL = 20


class ToyData:
    """Deterministic regression batches: batch i depends only on (seed, i); optionally NaN at batch ``nan_at``."""

    def __init__(self, seed: int = 0, batch: int = 8, nan_at: int | None = None):
        self.seed, self.batch, self.nan_at, self.index = seed, batch, nan_at, 0

    def __next__(self):
        rng = np.random.default_rng([self.seed, self.index])
        x = rng.normal(size=(self.batch, 3)).astype(np.float32)
        y = (np.sin(x).sum(-1, keepdims=True) + 0.1 * rng.normal(size=(self.batch, 1))).astype(np.float32)
        if self.index == self.nan_at:
            y[0, 0] = np.nan
        self.index += 1
        return {"x": x, "y": y}

    def get_state(self) -> dict:
        return {"index": self.index}

    def set_state(self, state: dict) -> None:
        self.index = int(state["index"])


def init_params(key):
    k1, k2 = jax.random.split(key)
    return {
        "w1": jax.random.normal(k1, (3, 16)) * 0.5,
        "b1": jnp.zeros(16),
        "w2": jax.random.normal(k2, (16, 1)) * 0.25,
        "b2": jnp.zeros(1),
    }


def loss_fn(params, frozen, batch, key):
    # Input noise drawn from the step key: a resume that got the RNG wrong would diverge.
    x = batch["x"] + 0.05 * jax.random.normal(key, batch["x"].shape)
    h = jnp.tanh(x @ params["w1"] + params["b1"]) * frozen["gain"]
    pred = h @ params["w2"] + params["b2"]
    loss = jnp.mean((pred - batch["y"]) ** 2)
    return loss, {"mae": jnp.mean(jnp.abs(pred - batch["y"]))}


OPT = ConfigDict(
    {"learning_rate": 3e-2, "warmup_steps": 3, "total_steps": TOTAL, "weight_decay": 1e-3, "grad_clip_norm": 1.0}
)


def make_loop(workdir, *, data=None, hooks=(), checkpoint_every=5, max_to_keep=2, seed=0, **kw):
    tx = make_optimizer(OPT)
    state = create_train_state(init_params(jax.random.key(1)), tx, frozen={"gain": jnp.asarray(1.5)}, ema=True)
    step_fn = make_train_step(loss_fn, tx, ema_decay=0.9, lr_schedule=make_lr_schedule(OPT))
    return TrainLoop(
        workdir=workdir,
        step_fn=step_fn,
        state=state,
        data=data if data is not None else ToyData(),
        total_steps=TOTAL,
        key=jax.random.key(seed),
        config=ConfigDict({"optimizer": OPT, "seed": seed}),
        log_every=4,
        checkpoint_every=checkpoint_every,
        max_to_keep=max_to_keep,
        hooks=hooks,
        progress=False,
        **kw,
    )


def assert_states_equal(a, b):
    leaves_a, tree_a = jax.tree.flatten(a.replace(frozen=None))
    leaves_b, tree_b = jax.tree.flatten(b.replace(frozen=None))
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b, strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y)), (x, y)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted reference run 0..20."""
    workdir = tmp_path_factory.mktemp("straight")
    with make_loop(workdir) as loop:
        state = loop.run()
        return workdir, jax.device_get(state), loop.last_metrics


def test_uninterrupted_run_trains(straight):
    workdir, state, last = straight
    assert int(state.step) == TOTAL
    first = read_metrics_jsonl(workdir / "metrics.jsonl")["train/loss"][1]
    assert last["train/loss"] < first[0], "loss did not decrease on a learnable toy problem"


def test_resume_after_stop_is_bit_identical(straight, tmp_path):
    _, ref, _ = straight
    with make_loop(tmp_path) as loop:
        stopped = loop.run(stop_at=10)
        assert int(stopped.step) == 10
        assert loop.manager.latest_step() == 10
    # A new loop object with a fresh initial state and a fresh iterator: everything must come from the checkpoint.
    with make_loop(tmp_path, data=ToyData()) as loop:
        assert loop.restored_step == 10 and loop.data.index == 10
        resumed = jax.device_get(loop.run())
    assert_states_equal(resumed, ref)


def test_resume_after_crash_uses_last_periodic_checkpoint(straight, tmp_path):
    _, ref, _ = straight

    def crash(step, state):
        raise KeyboardInterrupt(f"simulated kill at {step}")

    with make_loop(tmp_path, hooks=[Hook(every=12, fn=crash)]) as loop:
        with pytest.raises(KeyboardInterrupt):
            loop.run()
        assert loop.manager.latest_step() == 10  # saved at 5 and 10; the kill at 12 writes nothing
    with make_loop(tmp_path) as loop:
        assert loop.restored_step == 10
        resumed = jax.device_get(loop.run())
    assert_states_equal(resumed, ref)


def test_changing_the_seed_changes_the_run(straight, tmp_path):
    """Guards the resume test against vacuity: the RNG does influence the trajectory."""
    _, ref, _ = straight
    with make_loop(tmp_path, seed=123) as loop:
        other = jax.device_get(loop.run())
    assert not np.array_equal(other.params["w1"], ref.params["w1"])


def test_checkpoints_kept_and_workdir_layout(straight):
    workdir, _, _ = straight
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [15, 20]  # every 5 steps, latest 2 kept
    assert json.loads((workdir / "config.json").read_text())["optimizer"]["learning_rate"] == 3e-2
    assert any(p.name.startswith("events.out.tfevents") for p in (workdir / "tensorboard").iterdir())
    assert (workdir / "samples").is_dir()
    curves = read_metrics_jsonl(workdir / "metrics.jsonl")
    steps_logged, lr = curves["train/learning_rate"]
    assert list(steps_logged) == [4, 8, 12, 16, 20]
    # Logged values are means over the interval: the LR of steps 0..3 under 3 warm-up steps.
    sched = make_lr_schedule(OPT)
    np.testing.assert_allclose(lr[0], np.mean([float(sched(s)) for s in range(4)]), rtol=1e-6)
    assert set(curves) >= {"train/loss", "train/grad_norm", "train/mae", "train/steps_per_sec"}


def read_tb_scalars(logdir: pathlib.Path, tag: str) -> list[tuple[int, float]]:
    """Scalars of ``tag`` from TFRecord event files (u64 length, u32 crc, payload, u32 crc per record)."""
    from tensorboardX.proto import event_pb2

    out = []
    for path in sorted(logdir.glob("events.out.tfevents*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            out += [(event.step, v.simple_value) for v in event.summary.value if v.tag == tag]
    return out


def test_tensorboard_events_hold_the_scalars(straight):
    workdir, _, _ = straight
    events = read_tb_scalars(workdir / "tensorboard", "train/loss")
    assert [step for step, _ in events] == [4, 8, 12, 16, 20]
    expected = read_metrics_jsonl(workdir / "metrics.jsonl")["train/loss"][1]
    np.testing.assert_allclose([v for _, v in events], expected, rtol=1e-6)


def test_nan_stops_run_and_keeps_last_good_checkpoint(tmp_path):
    k = 7
    with make_loop(tmp_path, data=ToyData(nan_at=k)) as loop:
        with pytest.raises(NonFiniteError, match=rf"non-finite loss and grad_norm at step {k}") as info:
            loop.run()
        err = info.value
        assert err.step == k and err.quantities == ("loss", "grad_norm") and err.last_checkpoint == 5
        # The in-memory state is the last good one: k steps done, finite parameters.
        assert int(loop.state.step) == k
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(loop.state.params))
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [5]
    # The checkpoint on disk restores to finite parameters at a step <= k.
    with make_loop(tmp_path, data=ToyData()) as loop:
        assert loop.restored_step is not None and loop.restored_step <= k
        for leaf in jax.tree.leaves((loop.state.params, loop.state.ema_params, loop.state.opt_state)):
            assert np.isfinite(np.asarray(leaf)).all()


def test_hooks_run_at_intervals_and_write_sample_grid(tmp_path):
    calls = []

    def eval_fn(step, state):
        calls.append(step)
        return {"param_norm": float(optax.tree.norm(state.params))}

    def sample_fn(state, step):
        return np.full((3, 4, 4, 3), 0.5, np.float32)

    with make_loop(tmp_path, checkpoint_every=100) as loop:
        loop.hooks = (Hook(every=8, fn=eval_fn, name="eval"), sample_grid_hook(sample_fn, loop.samples_dir, every=10))
        loop.run()
    assert calls == [8, 16, 20]  # every 8 and at the end
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["samples_0000010.png", "samples_0000020.png"]
    assert list(read_metrics_jsonl(tmp_path / "metrics.jsonl")["eval/param_norm"][0]) == [8, 16, 20]
    # checkpoint_every=100 > total: only the final checkpoint exists.
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["20"]


def test_finished_run_is_a_noop_on_restart(straight, tmp_path):
    with make_loop(tmp_path, checkpoint_every=100) as loop:
        loop.run()
    with make_loop(tmp_path, checkpoint_every=100) as loop:
        assert loop.restored_step == TOTAL
        before = jax.device_get(loop.state)
        after = jax.device_get(loop.run())
    assert_states_equal(before, after)


def test_train_loop_function_and_frozen_kept(tmp_path):
    tx = make_optimizer(OPT)
    frozen = {"gain": jnp.asarray(1.5)}
    state = create_train_state(init_params(jax.random.key(1)), tx, frozen=frozen)
    final = train_loop(
        workdir=tmp_path,
        step_fn=make_train_step(loss_fn, tx),
        state=state,
        data=ToyData(),
        total_steps=3,
        key=jax.random.PRNGKey(0),  # raw uint32 keys work as well as typed ones
        progress=False,
    )
    assert int(final.step) == 3 and final.ema_params is None
    assert final.frozen is frozen  # never donated, never checkpointed, reattached as is
    assert float(frozen["gain"]) == 1.5


def test_bad_data_iterator_is_rejected(tmp_path):
    with pytest.raises(TypeError, match="get_state"):
        make_loop(tmp_path, data=iter([{"x": 1}]))


def test_checkpoint_frozen_restores_the_saved_frozen_part(tmp_path):
    with make_loop(tmp_path, checkpoint_frozen=True) as loop:
        loop.run(stop_at=4)
    with make_loop(tmp_path, checkpoint_frozen=True) as loop:
        loop.state = loop.state.replace(frozen={"gain": jnp.asarray(9.0)})
        loop.restored_step = loop._maybe_restore()
        assert loop.restored_step == 4 and float(loop.state.frozen["gain"]) == 1.5
    with pytest.raises(ValueError, match="saved with checkpoint_frozen=True but this loop has checkpoint_frozen=False"):
        make_loop(tmp_path)


def test_restoring_into_a_different_model_names_the_checkpoint(tmp_path):
    with make_loop(tmp_path) as loop:
        loop.run(stop_at=2)
    tx = make_optimizer(OPT)
    other = create_train_state({"w": jnp.zeros((3, 3))}, tx, frozen={"gain": jnp.asarray(1.5)}, ema=True)
    with pytest.raises(ValueError, match=r"checkpoint .*checkpoints/2 does not match the train state"):
        TrainLoop(workdir=tmp_path, step_fn=None, state=other, data=ToyData(), total_steps=TOTAL, key=jax.random.key(0))
