"""AttnDreamBooth-style staged training: recorded cross-attention maps, the attention-map regulariser (closed form),
the staged optimiser (which group trains when, a fresh Adam per stage), and the method's stages on a tiny base."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from metalora.eval import methods as methods_lib
from metalora.meta import InnerLoopConfig, diffusion_example_loss, optimize
from metalora.models import base_model as bm
from metalora.models.unet import UNet2DConditionModel
from metalora.models.unet_blocks import Attention, pop_cross_attention_maps, record_cross_attention
from metalora.train.optim import Stage, staged_optimizer


@pytest.fixture(scope="module")
def tiny():
    return bm.load_base("random:smoke")


def _maps(remat: bool):
    config = bm.tiny_unet_config(block_out_channels=(32, 32), cross_attention_dim=16, norm_num_groups=8)
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    context = jax.random.normal(jax.random.key(1), (2, 7, 16))
    unet = UNet2DConditionModel(config, rngs=nnx.Rngs(0), remat=remat)
    plain = unet(x, jnp.array([10, 500]), context)
    layers = record_cross_attention(unet)
    out = unet(x, jnp.array([10, 500]), context)
    return unet, layers, plain, out, pop_cross_attention_maps(unet), x, context


@pytest.mark.parametrize("remat", [False, True])
def test_recorded_maps_are_the_cross_attention_probabilities(remat):
    unet, layers, plain, out, maps, _x, context = _maps(remat)
    np.testing.assert_array_equal(out, plain)  # recording does not change the prediction
    cross = [m for _, m in nnx.iter_modules(unet) if isinstance(m, Attention) and m.is_cross_attention]
    assert layers == len(cross) == len(maps) > 0
    for m in maps:
        assert m.shape[0] == 2 and m.shape[2] == context.shape[1]
        np.testing.assert_allclose(np.sum(m, axis=-1), 1.0, atol=1e-5)  # a distribution over the prompt's tokens
    assert not jax.tree.leaves(nnx.state(unet, nnx.Intermediate))  # popped


def test_recorded_maps_agree_with_and_without_remat_and_carry_gradients():
    _, _, _, _, plain_maps, _, _ = _maps(remat=False)
    _, _, _, _, remat_maps, _, _ = _maps(remat=True)
    for a, b in zip(plain_maps, remat_maps):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    config = bm.tiny_unet_config(block_out_channels=(32, 32), cross_attention_dim=16, norm_num_groups=8)
    x, context = jax.random.normal(jax.random.key(0), (2, 16, 16, 3)), jax.random.normal(jax.random.key(1), (2, 7, 16))
    grads = []
    for remat in (False, True):
        graphdef, state = nnx.split(UNet2DConditionModel(config, rngs=nnx.Rngs(0), remat=remat))

        def spread(s, graphdef=graphdef):
            unet = nnx.merge(graphdef, s)
            record_cross_attention(unet)
            unet(x, jnp.array([10, 500]), context)
            return sum(jnp.var(m[..., 2]) for m in pop_cross_attention_maps(unet))

        grads.append(jax.grad(spread)(state))
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)  # gradients ~1e-4: f32 reassociation
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads[0]))


def test_a_recorded_map_equals_softmax_of_its_queries_and_keys():
    """One cross-attention layer alone: the map is mean over heads of softmax(q·kᵀ/√d)."""
    from metalora.models.unet_blocks import Precision

    layer = Attention(8, heads=2, dim_head=4, cross_attention_dim=6, precision=Precision(), rngs=nnx.Rngs(3))
    x, context = jax.random.normal(jax.random.key(0), (1, 5, 8)), jax.random.normal(jax.random.key(1), (1, 3, 6))
    record_cross_attention(layer)
    layer(x, context)
    (got,) = pop_cross_attention_maps(layer)
    q = np.asarray(layer.to_q(x)).reshape(1, 5, 2, 4)
    k = np.asarray(layer.to_k(context)).reshape(1, 3, 2, 4)
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / 2.0
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    np.testing.assert_allclose(got, probs.mean(axis=1), rtol=1e-5, atol=1e-6)


def test_regulariser_closed_form_and_stop_gradient_on_the_class_word():
    ids = jnp.asarray([[0, 5, 7, 9], [0, 5, 8, 9]])  # token 7 = new, 9 = class; example 2 lacks the new token
    rng = np.random.default_rng(0)
    maps = [jnp.asarray(rng.dirichlet(np.ones(4), size=(2, 6)), jnp.float32) for _ in range(2)]
    got = methods_lib.attention_map_regularizer(maps, ids, 7, 9, 2.0, 5.0)
    per_layer = []
    for m in maps:
        a, c = np.asarray(m[0, :, 2]), np.asarray(m[0, :, 3])
        term = 2.0 * (a.mean() - c.mean()) ** 2 + 5.0 * (a.var() - c.var()) ** 2
        per_layer.append([term, 0.0])  # the example without the token contributes zero
    np.testing.assert_allclose(got, np.mean(per_layer), rtol=1e-5)
    # identical maps for the two tokens: no penalty
    same = [m.at[:, :, 2].set(m[:, :, 3]) for m in maps]
    assert float(methods_lib.attention_map_regularizer(same, ids, 7, 9, 2.0, 5.0)) == 0.0
    # the class word's column is a target: no gradient flows into it
    grads = jax.grad(lambda ms: methods_lib.attention_map_regularizer(ms, ids, 7, 9, 2.0, 5.0))(maps)
    assert all(float(jnp.abs(g[:, :, 3]).max()) == 0.0 for g in grads)
    assert any(float(jnp.abs(g[0, :, 2]).max()) > 0.0 for g in grads)


def test_staged_optimizer_trains_one_group_per_stage_with_a_fresh_adam():
    params = {"a": jnp.zeros(3), "b": jnp.zeros(2)}
    labels = lambda p: {"a": jax.tree.map(lambda _: "a", p["a"]), "b": jax.tree.map(lambda _: "b", p["b"])}
    tx = staged_optimizer([Stage(2, 0.1, ("a",)), Stage(2, 0.01, ("b",)), Stage(1, 0.001, ("a", "b"))], labels)
    state = tx.init(params)
    grads = {"a": jnp.ones(3), "b": -jnp.ones(2)}
    history = []
    for _ in range(6):
        updates, state = jax.jit(tx.update)(grads, state, params)
        params = optax.apply_updates(params, updates)
        history.append(jax.tree.map(np.asarray, updates))
    # Adam's first step (and every step under a constant gradient) moves each leaf by -lr·sign(g).
    for step, (ua, ub) in enumerate((h["a"], h["b"]) for h in history):
        lr_a, lr_b = [(0.1, 0.0), (0.1, 0.0), (0.0, 0.01), (0.0, 0.01), (0.001, 0.001), (0.001, 0.001)][step]
        np.testing.assert_allclose(ua, -lr_a, rtol=1e-4, err_msg=f"step {step}")
        np.testing.assert_allclose(ub, lr_b, rtol=1e-4, err_msg=f"step {step}")
    with pytest.raises(ValueError):
        Stage(0, 0.1, ("a",))


def test_staged_optimizer_stage_moments_start_fresh():
    """Stage 2 trains a leaf stage 1 also trained: its Adam starts with zero moments, so a changed gradient gives a
    full -lr·sign(g) step at once (a carried-over first moment would damp the reversal)."""
    params = {"w": jnp.zeros(1)}
    labels = lambda p: {"w": jax.tree.map(lambda _: "w", p["w"])}
    tx = staged_optimizer([Stage(3, 0.1, ("w",)), Stage(2, 0.1, ("w",))], labels)
    state = tx.init(params)
    for g in (1.0, 1.0, 1.0):
        _, state = tx.update({"w": jnp.full(1, g)}, state, params)
    updates, _ = tx.update({"w": jnp.full(1, -1.0)}, state, params)
    np.testing.assert_allclose(updates["w"], 0.1, rtol=1e-4)


def _shots(model, params, n=2):
    images = jax.random.uniform(jax.random.key(4), (n, *model.sample_shape), minval=-1.0, maxval=1.0)
    ids = jnp.asarray(model.tokenize(["a photo of sks person"] * n))
    return {"images": images, "input_ids": ids, "context": bm.encode_text(model, params["text_encoder"], ids)}


def _changed(a, b) -> bool:
    return any(bool(jnp.any(x != y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_attn_dreambooth_trains_token_then_cross_attention_then_unet(tiny):
    model, params = tiny
    method = methods_lib.attn_dreambooth_method(
        model, params, model.schedule, stages=[Stage(1, 1e-2, ("token",)), Stage(1, 1e-2, ("cross_attention",)),
                                               Stage(1, 1e-2, ("cross_attention", "unet"))])
    shots = _shots(model, params)
    config = InnerLoopConfig(steps=1, learning_rate=1.0, batch_size=2, flip=False)
    tx = method.optimizer(config)
    start = method.init(jax.random.key(0))
    state, current, after = tx.init(start), start, []
    for i in range(3):
        current, losses, state = optimize(method.loss, current, shots, jax.random.key(1), config, opt_state=state,
                                          start_step=i, optimizer=tx)
        assert np.isfinite(losses).all()
        after.append(current)
    changed = [{g: _changed(a[g], b[g]) for g in ("token", "cross_attention", "unet")}
               for a, b in zip([start, *after], after)]
    assert changed == [{"token": True, "cross_attention": False, "unet": False},
                       {"token": False, "cross_attention": True, "unet": False},
                       {"token": False, "cross_attention": True, "unet": True}]
    # the sampling parameters carry the trained token row and UNet
    sampled = method.sampling_params(after[-1])
    table = methods_lib._token_table(sampled["text_encoder"])
    np.testing.assert_array_equal(table[model.tokenizer.token_to_id("sks")], after[-1]["token"])
    assert _changed(sampled["unet"], params["unet"])
    assert method.trainable_parameters == (sum(x.size for x in jax.tree.leaves(params["unet"]))
                                           + model.config.text_encoder.hidden_size)


def test_attn_dreambooth_starts_at_the_class_word_and_its_loss_adds_the_stage_regulariser(tiny):
    model, params = tiny
    weights = ((0.1, 0.0), (2.0, 5.0))
    method = methods_lib.attn_dreambooth_method(model, params, model.schedule, reg_weights=weights,
                                                stages=[Stage(2, 1e-3, ("token",)), Stage(2, 1e-3, ("unet",))])
    shots, key = _shots(model, params), jax.random.key(2)
    trainable = method.init(jax.random.key(0))
    # held-out loss at init = the base model reading "sks" as "person"
    person = jnp.asarray(model.tokenize(["a photo of person person"] * 2))
    expected = diffusion_example_loss(model.schedule)(
        nnx.merge(model.unet_def, params["unet"]),
        {**shots, "context": bm.encode_text(model, params["text_encoder"], person)}, key)
    np.testing.assert_allclose(method.eval_loss(trainable, shots, key), expected, rtol=1e-5)
    sks, person_id = model.tokenizer.token_to_id("sks"), model.tokenizer.token_to_id("person")
    # the training loss adds the regulariser with the weights of the step's stage
    unet = nnx.merge(*nnx.split(model.unet(params)))
    record_cross_attention(unet)
    from metalora.diffusion import training_inputs

    x_t, t, _ = training_inputs(model.schedule, key, shots["images"])
    context = bm.encode_text(model, params["text_encoder"], person)
    unet(x_t, t, context)
    maps = pop_cross_attention_maps(unet)
    ids = shots["input_ids"]
    for step, (w_mean, w_var) in ((0, weights[0]), (3, weights[1]), (10, weights[1])):
        reg = methods_lib.attention_map_regularizer(maps, ids, sks, person_id, w_mean, w_var)
        got = method.loss(trainable, {**shots, "step": jnp.asarray(step)}, key)
        np.testing.assert_allclose(got, expected + reg, rtol=1e-5, err_msg=f"step {step}")
    assert float(methods_lib.attention_map_regularizer(maps, ids, sks, person_id, 2.0, 5.0)) > 0.0


def test_attn_dreambooth_rejects_mismatched_stages(tiny):
    model, params = tiny
    with pytest.raises(ValueError, match="regulariser"):
        methods_lib.attn_dreambooth_method(model, params, model.schedule, stages=[Stage(1, 1e-3, ("token",))])
    with pytest.raises(ValueError, match="group"):
        methods_lib.attn_dreambooth_method(model, params, model.schedule, stages=[Stage(1, 1e-3, ("text",))],
                                           reg_weights=[(0.0, 0.0)])
