"""The jitted train step and the optimiser factory, against closed forms and a NumPy AdamW reference."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from ml_collections import ConfigDict

from metalora.train import (
    TrainState,
    create_train_state,
    ema_decay_at,
    ema_update,
    make_lr_schedule,
    make_optimizer,
    make_train_step,
)

TARGET = {"w": np.arange(6, dtype=np.float32).reshape(2, 3) / 6.0, "b": np.array([0.5, -1.0, 2.0], np.float32)}


def quad_loss(params, frozen, batch, key):
    """0.5·scale·Σ (p − batch·target)²: gradient = scale·(p − batch·target), known in closed form."""
    s = frozen["scale"]
    loss = sum(0.5 * s * jnp.sum((params[k] - batch["c"] * TARGET[k]) ** 2) for k in params)
    return loss, {}


def init():
    return {"w": jnp.zeros((2, 3)), "b": jnp.ones(3)}


def numpy_adamw(params, grads_seq, *, lr_fn, b1, b2, eps, wd, clip, mask):
    """Reference AdamW (decoupled decay) with global-norm clipping, written out by hand."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, grad_fn in enumerate(grads_seq):
        g = grad_fn(p)
        norm = math.sqrt(sum(float(np.sum(x**2)) for x in g.values()))
        if clip and norm > clip:
            g = {k: x * clip / norm for k, x in g.items()}
        lr = lr_fn(t)
        for k in p:
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
            mhat, vhat = m[k] / (1 - b1 ** (t + 1)), v[k] / (1 - b2 ** (t + 1))
            p[k] = p[k] - lr * (mhat / (np.sqrt(vhat) + eps) + (wd * p[k] if mask[k] else 0.0))
    return p


def test_schedule_is_linear_warmup_then_cosine():
    cfg = ConfigDict({"learning_rate": 2e-3, "warmup_steps": 10, "total_steps": 110, "end_lr_ratio": 0.1})
    sched = make_lr_schedule(cfg)
    peak, end = 2e-3, 2e-4
    for s in [0, 1, 5, 10, 11, 40, 60, 109, 110, 200]:
        if s < 10:
            want = peak * s / 10
        else:
            frac = min(s - 10, 100) / 100
            want = end + (peak - end) * 0.5 * (1 + math.cos(math.pi * frac))
        assert float(sched(s)) == pytest.approx(want, rel=1e-5, abs=1e-9), s


def test_constant_schedule_without_total_steps():
    sched = make_lr_schedule({"learning_rate": 1e-3, "warmup_steps": 4})
    assert [float(sched(s)) for s in (0, 2, 4, 1000)] == pytest.approx([0.0, 5e-4, 1e-3, 1e-3])


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("learning_rte", 1e-3, "unknown field.*learning_rte"),
        ("accumulate_steps", 0, "accumulate_steps must be >= 1"),
        ("warmup_steps", 50, r"warmup_steps \(50\) exceeds total_steps \(10\)"),
    ],
)
def test_optimizer_config_errors_name_the_field(field, value, match):
    cfg = {"learning_rate": 1e-3, "total_steps": 10, field: value}
    with pytest.raises(ValueError, match=match):
        make_optimizer(cfg)


def test_step_matches_numpy_adamw_with_clipping_and_decay_mask():
    cfg = ConfigDict(
        {
            "learning_rate": 0.1,
            "warmup_steps": 2,
            "total_steps": 6,
            "weight_decay": 0.3,
            "grad_clip_norm": 0.5,
            "b1": 0.8,
            "b2": 0.95,
            "eps": 1e-6,
        }
    )
    tx = make_optimizer(cfg)
    sched = make_lr_schedule(cfg)
    frozen = {"scale": jnp.asarray(3.0)}
    state = create_train_state(init(), tx, frozen=frozen)
    step_fn = make_train_step(quad_loss, tx, lr_schedule=sched)
    cs = [1.0, 2.0, -1.0, 0.5, 1.5]
    for t, c in enumerate(cs):
        state, metrics = step_fn(state, {"c": jnp.asarray(c)}, jax.random.key(0))
        assert bool(metrics["finite"]) and float(metrics["learning_rate"]) == pytest.approx(float(sched(t)))
    grads_seq = [lambda p, c=c: {k: 3.0 * (p[k] - c * TARGET[k]) for k in p} for c in cs]
    ref = numpy_adamw(
        {k: np.asarray(v) for k, v in init().items()},
        grads_seq,
        lr_fn=lambda t: float(sched(t)),
        b1=0.8,
        b2=0.95,
        eps=1e-6,
        wd=0.3,
        clip=0.5,
        mask={"w": True, "b": False},  # 1-D bias is not decayed
    )
    for k in ref:
        np.testing.assert_allclose(np.asarray(state.params[k]), ref[k], rtol=2e-5, atol=1e-6)
    assert int(state.step) == len(cs)


def test_metrics_report_loss_raw_grad_norm_and_aux():
    def loss(params, frozen, batch, key):
        value, _ = quad_loss(params, frozen, batch, key)
        return value, {"half_loss": value / 2}

    tx = make_optimizer({"learning_rate": 0.1, "grad_clip_norm": 1e-3})
    state = create_train_state(init(), tx, frozen={"scale": jnp.asarray(2.0)})
    _, m = make_train_step(loss, tx)(state, {"c": jnp.asarray(1.0)}, jax.random.key(0))
    g = {k: 2.0 * (np.asarray(init()[k]) - TARGET[k]) for k in TARGET}
    want_loss = sum(0.5 * 2.0 * np.sum((np.asarray(init()[k]) - TARGET[k]) ** 2) for k in TARGET)
    assert float(m["loss"]) == pytest.approx(want_loss, rel=1e-6)
    # grad_norm is the norm *before* clipping (clipping at 1e-3 would otherwise cap it)
    assert float(m["grad_norm"]) == pytest.approx(math.sqrt(sum(np.sum(x**2) for x in g.values())), rel=1e-6)
    assert float(m["half_loss"]) == pytest.approx(want_loss / 2, rel=1e-6)
    assert "learning_rate" not in m


def test_step_key_is_fold_in_of_base_key_and_step():
    def loss(params, frozen, batch, key):
        return jnp.sum(params["w"]) * 0.0, {"u": jax.random.uniform(key)}

    tx = optax.sgd(0.1)
    state = create_train_state({"w": jnp.ones(2)}, tx)
    step_fn = make_train_step(loss, tx)
    base = jax.random.key(42)
    for s in range(3):
        state, m = step_fn(state, None, base)
        assert float(m["u"]) == float(jax.random.uniform(jax.random.fold_in(base, s)))


def test_ema_follows_closed_form_recurrence():
    tx = optax.sgd(0.5)
    state = create_train_state(init(), tx, frozen={"scale": jnp.asarray(1.0)}, ema=True)
    step_fn = make_train_step(quad_loss, tx, ema_decay=0.75)
    ema = {k: np.asarray(v, np.float64) for k, v in init().items()}
    for _ in range(4):
        state, _ = step_fn(state, {"c": jnp.asarray(1.0)}, jax.random.key(0))
        ema = {k: 0.75 * ema[k] + 0.25 * np.asarray(state.params[k]) for k in ema}
    for k in ema:
        np.testing.assert_allclose(np.asarray(state.ema_params[k]), ema[k], rtol=1e-6, atol=1e-7)
    # ema_update keeps bf16 storage but averages in f32
    out = ema_update({"a": jnp.ones(2, jnp.bfloat16)}, {"a": jnp.zeros(2, jnp.bfloat16)}, 0.5)
    assert out["a"].dtype == jnp.bfloat16 and float(out["a"][0]) == 0.5


@pytest.mark.parametrize("accumulate", [1, 2])
def test_ema_warmup_follows_its_decay_schedule(accumulate):
    """With warm-up the n-th applied update (0-based) averages with decay min(0.75, (1 + n) / (10 + n)); micro-steps of
    an accumulation leave the EMA alone and count once."""
    tx = optax.sgd(0.5) if accumulate == 1 else optax.MultiSteps(optax.sgd(0.5), every_k_schedule=accumulate)
    state = create_train_state(init(), tx, frozen={"scale": jnp.asarray(1.0)}, ema=True)
    step_fn = make_train_step(quad_loss, tx, ema_decay=0.75, ema_warmup=True)
    ema = {k: np.asarray(v, np.float64) for k, v in init().items()}
    for micro in range(6 * accumulate):
        state, _ = step_fn(state, {"c": jnp.asarray(1.0)}, jax.random.key(0))
        if (micro + 1) % accumulate == 0:
            n = micro // accumulate
            decay = min(0.75, (1 + n) / (10 + n))
            ema = {k: decay * ema[k] + (1 - decay) * np.asarray(state.params[k]) for k in ema}
    for k in ema:
        np.testing.assert_allclose(np.asarray(state.ema_params[k]), ema[k], rtol=1e-5, atol=1e-6)
    assert float(ema_decay_at(0.75, 0)) == pytest.approx(0.1) and float(ema_decay_at(0.75, 100)) == 0.75


def test_ema_requires_ema_state():
    tx = optax.sgd(0.5)
    state = create_train_state(init(), tx, frozen={"scale": jnp.asarray(1.0)})
    with pytest.raises(ValueError, match="ema=True"):
        make_train_step(quad_loss, tx, ema_decay=0.9)(state, {"c": jnp.asarray(1.0)}, jax.random.key(0))


@pytest.mark.parametrize("bad", ["loss", "grad"])
def test_non_finite_step_applies_no_update(bad):
    def loss(params, frozen, batch, key):
        value, _ = quad_loss(params, frozen, batch, key)
        if bad == "loss":
            return value * batch["poison"], {}
        # finite loss (+0), non-finite gradient: sqrt'(0) = inf (cond: the untaken branch contributes no 0·inf)
        w00 = params["w"][0, 0]
        kink = lambda p: jnp.sqrt(jnp.abs(p - jax.lax.stop_gradient(p)))
        return value + jax.lax.cond(batch["poison"] > 0, kink, jnp.zeros_like, w00), {}

    tx = make_optimizer({"learning_rate": 0.1, "weight_decay": 0.1})
    state = create_train_state(init(), tx, frozen={"scale": jnp.asarray(1.0)}, ema=True)
    step_fn = make_train_step(loss, tx, ema_decay=0.5)
    state, _ = step_fn(
        state, {"c": jnp.asarray(1.0), "poison": jnp.asarray(1.0 if bad == "loss" else 0.0)}, jax.random.key(0)
    )
    before = jax.device_get(state.replace(frozen=None))
    poison = jnp.asarray(np.nan if bad == "loss" else 1.0)
    state, m = step_fn(state, {"c": jnp.asarray(1.0), "poison": poison}, jax.random.key(0))
    assert not bool(m["finite"])
    assert math.isfinite(float(m["loss"])) == (bad == "grad")
    assert not math.isfinite(float(m["grad_norm"]))
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(state.replace(frozen=None))), strict=True):
        assert np.array_equal(x, y)
    assert int(state.step) == 1


def test_accumulation_equals_one_step_on_the_mean_gradient_and_gates_ema():
    base_cfg = {"learning_rate": 0.1, "warmup_steps": 2, "total_steps": 8, "grad_clip_norm": 0.7}
    frozen = {"scale": jnp.asarray(2.0)}
    tx2 = make_optimizer({**base_cfg, "accumulate_steps": 2})
    state = create_train_state(init(), tx2, frozen=frozen, ema=True)
    step2 = make_train_step(
        quad_loss, tx2, ema_decay=0.5, lr_schedule=make_lr_schedule({**base_cfg, "accumulate_steps": 2})
    )
    lrs = []
    for t, c in enumerate([1.0, 3.0, -1.0, 2.0]):
        state, m = step2(state, {"c": jnp.asarray(c)}, jax.random.key(0))
        lrs.append(float(m["learning_rate"]))
        if t == 0:  # first micro-step: no update, EMA untouched
            np.testing.assert_array_equal(np.asarray(state.params["w"]), np.zeros((2, 3)))
            np.testing.assert_array_equal(np.asarray(state.ema_params["w"]), np.zeros((2, 3)))
    sched = make_lr_schedule(base_cfg)
    assert lrs == pytest.approx([float(sched(0)), float(sched(0)), float(sched(2)), float(sched(2))])
    # Reference: no accumulation, two updates on the mean gradient of each pair, LR of the pair's first step.
    tx1 = make_optimizer({**base_cfg, "warmup_steps": 1, "total_steps": 4})  # update u at loop step 2u
    ref = create_train_state(init(), tx1, frozen=frozen)
    step1 = make_train_step(quad_loss, tx1)
    for c in (2.0, 0.5):  # mean of (1, 3) and (-1, 2): the gradient is linear in c
        ref, _ = step1(ref, {"c": jnp.asarray(c)}, jax.random.key(0))
    for k in TARGET:
        np.testing.assert_allclose(np.asarray(state.params[k]), np.asarray(ref.params[k]), rtol=1e-5, atol=1e-7)


def test_state_is_donated_but_frozen_is_not():
    tx = optax.sgd(0.1)
    frozen = {"scale": jnp.asarray(1.0)}
    state = create_train_state(init(), tx, frozen=frozen, ema=True)
    old_w = state.params["w"]
    new, _ = make_train_step(quad_loss, tx, ema_decay=0.9)(state, {"c": jnp.asarray(1.0)}, jax.random.key(0))
    assert old_w.is_deleted()
    assert not frozen["scale"].is_deleted() and new.frozen is frozen
    _, _ = make_train_step(quad_loss, tx, donate=False)(new, {"c": jnp.asarray(1.0)}, jax.random.key(0))
    assert not new.params["w"].is_deleted()


def test_bad_loss_fn_outputs_are_named():
    tx = optax.sgd(0.1)
    state = create_train_state(init(), tx, frozen={"scale": jnp.asarray(1.0)})

    def reserved(params, frozen, batch, key):
        return quad_loss(params, frozen, batch, key)[0], {"loss": 1.0}

    def vector(params, frozen, batch, key):
        return params["b"], {}

    with pytest.raises(ValueError, match="reserved names"):
        make_train_step(reserved, tx, donate=False)(state, {"c": jnp.asarray(1.0)}, jax.random.key(0))
    with pytest.raises(ValueError, match="scalar loss"):
        make_train_step(vector, tx, donate=False)(state, {"c": jnp.asarray(1.0)}, jax.random.key(0))


def test_shardings_pass_through_to_jit():
    if jax.device_count() < 8:
        pytest.skip("needs 8 (simulated) devices")
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    repl, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

    def loss(params, frozen, batch, key):
        pred = batch["x"] @ params["w"] * frozen["scale"]
        return jnp.mean((pred - batch["y"]) ** 2), {}

    tx = make_optimizer({"learning_rate": 0.05})
    params = lambda: {"w": jnp.ones((4, 2))}  # fresh buffers per state: states are donated
    batch = {"x": jnp.arange(64.0).reshape(16, 4) / 64, "y": jnp.ones((16, 2))}
    frozen = {"scale": jnp.asarray(0.5)}
    ref, ref_m = make_train_step(loss, tx)(create_train_state(params(), tx, frozen=frozen), batch, jax.random.key(0))

    state_sh = TrainState(step=repl, params=repl, opt_state=repl, ema_params=None, frozen=repl)
    step_fn = make_train_step(
        loss, tx, in_shardings=(state_sh, {"x": rows, "y": rows}, repl), out_shardings=(state_sh, repl)
    )
    state = jax.device_put(create_train_state(params(), tx, frozen=frozen), repl)
    sharded_batch = jax.device_put(batch, rows)
    hlo = step_fn.lower(state, sharded_batch, jax.random.key(0)).as_text()
    assert "mhlo.sharding" in hlo or "sdy.sharding" in hlo
    new, m = step_fn(state, sharded_batch, jax.random.key(0))
    assert new.params["w"].sharding == repl and new.opt_state[1][0].mu["w"].sharding == repl
    np.testing.assert_allclose(np.asarray(new.params["w"]), np.asarray(ref.params["w"]), rtol=1e-6)
    assert float(m["loss"]) == pytest.approx(float(ref_m["loss"]), rel=1e-6)
