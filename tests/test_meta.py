"""Inner and outer loops of Meta-LoRA on small problems with checkable answers."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from metalora.lora import LoRAConfig, inject, split_roles
from metalora.meta import InnerLoopConfig, MetaConfig, adapt, adapt_subjects, init_meta_params, make_meta_loss


class TinyNet(nnx.Module):
    def __init__(self, rngs, dtype=jnp.float32):
        self.proj = nnx.Linear(4, 8, rngs=rngs, param_dtype=dtype)
        self.out = nnx.Linear(8, 4, rngs=rngs, param_dtype=dtype)

    def __call__(self, x):
        return self.out(jnp.tanh(self.proj(x)))


def regression_loss(model, batch, key):
    """Inputs in ``images``, targets in ``context``; the key adds input noise so randomness is exercised."""
    x = batch["images"] + 0.01 * jax.random.normal(key, batch["images"].shape, batch["images"].dtype)
    return jnp.mean((model(x) - batch["context"]) ** 2)


def tiny_lora(subjects=1, dtype=jnp.float32, down_role="meta"):
    model = TinyNet(nnx.Rngs(0), dtype)
    inject(model, LoRAConfig(targets=["proj", "out"], rank=2, mid_rank=3, down_role=down_role,
                             num_subjects=subjects), key=jax.random.key(1))
    return split_roles(model)


def shots(seed, count=4, dtype=np.float32):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((count, 4)).astype(dtype)
    return {"images": jnp.asarray(x), "context": jnp.asarray(np.sin(x * (1 + seed)) + seed * 0.1)}


INNER = InnerLoopConfig(steps=30, learning_rate=3e-2, flip=False, batch_size=2)


def test_adaptation_trains_heads_only():
    graphdef, base, meta, subject = tiny_lora()
    heads = jax.tree.map(lambda a: a[0], subject)
    meta_before = jax.tree.map(np.array, meta)
    result = jax.jit(lambda h, s, k: adapt(regression_loss, graphdef, base, meta, h, s, k, INNER))(
        heads, shots(0), jax.random.key(0))
    for before, after in zip(jax.tree.leaves(meta_before), jax.tree.leaves(result.meta), strict=True):
        np.testing.assert_array_equal(before, after)  # D bit-identical
    assert all(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(heads), jax.tree.leaves(result.heads),
                                                          strict=True))
    losses = np.asarray(result.losses)
    assert losses.shape == (INNER.steps,) and losses[-5:].mean() < 0.5 * losses[:5].mean()


def test_many_subjects_in_one_call_equal_one_at_a_time():
    graphdef, base, meta, subject = tiny_lora(subjects=3)
    all_shots = jax.tree.map(lambda *xs: jnp.stack(xs), *(shots(s) for s in range(3)))
    keys = jax.random.split(jax.random.key(3), 3)
    together = jax.jit(lambda: adapt_subjects(regression_loss, graphdef, base, meta, subject, all_shots, keys,
                                              INNER))()
    for s in range(3):
        alone = adapt(regression_loss, graphdef, base, meta, jax.tree.map(lambda a, i=s: a[i], subject),
                      jax.tree.map(lambda a, i=s: a[i], all_shots), keys[s], INNER)
        for a, b in zip(jax.tree.leaves(alone.heads), jax.tree.leaves(together.heads), strict=True):
            np.testing.assert_allclose(a, b[s], rtol=1e-5, atol=1e-6)


def test_chunked_adaptation_equals_one_run():
    graphdef, base, meta, subject = tiny_lora()
    heads = jax.tree.map(lambda a: a[0], subject)
    key = jax.random.key(9)
    whole = adapt(regression_loss, graphdef, base, meta, heads, shots(1), key, INNER)
    half = dataclasses.replace(INNER, steps=INNER.steps // 2)
    first = adapt(regression_loss, graphdef, base, meta, heads, shots(1), key, half)
    second = adapt(regression_loss, graphdef, base, meta, first.heads, shots(1), key, half,
                   opt_state=first.opt_state, start_step=half.steps)
    np.testing.assert_array_equal(np.concatenate([first.losses, second.losses]), whole.losses)
    for a, b in zip(jax.tree.leaves(second.heads), jax.tree.leaves(whole.heads), strict=True):
        np.testing.assert_array_equal(a, b)


def episode(count=3, k=3, q=2):
    support = jax.tree.map(lambda *xs: jnp.stack(xs), *(shots(s, k) for s in range(count)))
    query = jax.tree.map(lambda *xs: jnp.stack(xs), *(shots(s, q) for s in range(count)))
    return {"identity": jnp.arange(count), "support": support, "query": query}


EPISODIC_INNER = InnerLoopConfig(steps=3, learning_rate=0.1, optimizer="sgd", flip=False)


def meta_setup(algorithm, inner=EPISODIC_INNER, dtype=jnp.float32):
    graphdef, base, meta, subject = tiny_lora(dtype=dtype)
    config = MetaConfig(algorithm=algorithm, inner=inner, num_heads=5)
    params = init_meta_params(graphdef, base, meta, subject, config, jax.random.key(4))
    return make_meta_loss(regression_loss, graphdef, subject, config), params, {"base": base}


def test_maml_meta_gradient_matches_finite_differences():
    with jax.enable_x64(True):
        loss_fn, params, frozen = meta_setup("maml", dtype=jnp.float64)
        batch = jax.tree.map(lambda a: a.astype(jnp.float64) if a.dtype == jnp.float32 else a,
                             episode())
        key = jax.random.key(5)
        f = lambda p: loss_fn(p, frozen, batch, key)[0]
        grads = jax.grad(f)(params)
        direction = jax.tree.map(lambda a: jax.random.normal(jax.random.key(6), a.shape, a.dtype), params)
        eps = 1e-5
        shift = lambda sign: jax.tree.map(lambda p, d: p + sign * eps * d, params, direction)
        numeric = (f(shift(1)) - f(shift(-1))) / (2 * eps)
        analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction),
                                                        strict=True))
        np.testing.assert_allclose(analytic, numeric, rtol=1e-6)

        # First-order MAML drops the second-order term: a different, non-zero gradient on the same problem.
        fo_loss, _, _ = meta_setup("fomaml", dtype=jnp.float64)
        fo = jax.grad(lambda p: fo_loss(p, frozen, batch, key)[0])(params)
        fo_dot = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(fo), jax.tree.leaves(direction), strict=True))
        assert abs(fo_dot) > 0 and abs(fo_dot - analytic) > 1e-6 * abs(analytic)


def test_reptile_gradient_points_to_the_mean_adapted_down():
    inner = InnerLoopConfig(steps=4, learning_rate=0.05, optimizer="sgd", flip=False)
    loss_fn, params, frozen = meta_setup("reptile", inner)
    batch = episode()
    grads = jax.grad(lambda p: loss_fn(p, frozen, batch, jax.random.key(7))[0])(params)
    # Recompute the adapted D's by hand with the same keys the loss uses.
    graphdef, base, meta, subject = tiny_lora()
    from metalora.lora import init_subject_state, merge_roles

    k_init, k_adapt = jax.random.split(jax.random.key(7))
    heads = init_subject_state(merge_roles(graphdef, base, meta, subject), k_init, 3)
    keys = jax.random.split(k_adapt, 3)
    trained = dataclasses.replace(inner, train_meta=True)
    adapted = [adapt(regression_loss, graphdef, base, meta, jax.tree.map(lambda a, i=i: a[i], heads),
                     jax.tree.map(lambda a, i=i: a[i], batch["support"]), keys[i], trained).meta for i in range(3)]
    mean_adapted = jax.tree.map(lambda *xs: sum(xs) / 3, *adapted)
    expected = jax.tree.map(lambda d, t: d - t, meta, mean_adapted)
    for g, e in zip(jax.tree.leaves(grads["meta"]), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-7)
        assert np.abs(e).max() > 0


def test_joint_trains_the_rows_of_the_batch_identities():
    loss_fn, params, frozen = meta_setup("joint")
    batch = episode()
    batch["identity"] = jnp.array([1, 7, 3])  # 7 % 5 = 2: rows 1, 2, 3 are used, rows 0 and 4 are not
    params["heads"] = jax.tree.map(lambda a: a + 0.1, params["heads"])  # non-zero Up: every factor gets gradient
    grads = jax.grad(lambda p: loss_fn(p, frozen, batch, jax.random.key(8))[0])(params)
    for g in jax.tree.leaves(grads["heads"]):
        norms = np.abs(np.asarray(g)).reshape(5, -1).sum(-1)
        assert (norms[[1, 2, 3]] > 0).all() and (norms[[0, 4]] == 0).all()
    assert all(np.abs(g).max() > 0 for g in jax.tree.leaves(grads["meta"]))


def test_unknown_algorithm_is_refused():
    with pytest.raises(ValueError, match="unknown meta algorithm"):
        MetaConfig(algorithm="protonet")
