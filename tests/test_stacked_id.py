"""PhotoMaker-style stacked ID: prompt surgery in closed form, a fresh LoRA is a no-op, the merge step of sampling,
save/load, the training job at smoke size and the tuning-free method in the harness."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from metalora.eval import methods as methods_lib
from metalora.meta import stacked_id as sid
from metalora.models import base_model as bm
from metalora.models.id_encoder import (
    IDEncoderConfig,
    drop_token,
    load_id_encoder,
    pad_rows,
    place_rows,
    repeat_token,
    save_id_encoder,
    stack_id,
)


def test_drop_token_shifts_left_and_pads():
    ids = jnp.asarray([0, 5, 7, 9, 4, 1, 1])
    np.testing.assert_array_equal(drop_token(ids, 7, 1), [0, 5, 9, 4, 1, 1, 1])
    np.testing.assert_array_equal(drop_token(ids, 3, 1), ids)  # absent: unchanged
    np.testing.assert_array_equal(drop_token(jnp.asarray([7, 7, 2]), 7, 1), [7, 2, 1])  # only the first


def test_stack_id_replaces_the_class_row_and_appends_the_rest():
    context = jnp.arange(12.0).reshape(4, 3)
    ids = jnp.asarray([0, 5, 9, 1])  # class token 9 at row 2
    fused = -jnp.ones((3, 3)) * jnp.arange(1.0, 4.0)[:, None]
    out = stack_id(context, ids, 9, fused)
    expected = np.concatenate([np.asarray(context[:2]), -np.ones((1, 3)), np.asarray(context[3:]),
                               -2 * np.ones((1, 3)), -3 * np.ones((1, 3))])
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(stack_id(context, ids, 9, fused[:1]).shape, (4, 3))  # N = 1: same length
    no_class = stack_id(context, jnp.asarray([0, 5, 6, 1]), 9, fused[:2])
    np.testing.assert_array_equal(no_class[:4], context)  # nothing replaced, N rows appended
    np.testing.assert_array_equal(pad_rows(context, 2)[4:], np.stack([context[-1]] * 2))


def test_repeat_token_shifts_right_and_place_rows_fills_the_copies():
    ids = jnp.asarray([1, 5, 7, 9, 0, 0])
    np.testing.assert_array_equal(repeat_token(ids, 7, 3), [1, 5, 7, 7, 7, 9])
    np.testing.assert_array_equal(repeat_token(ids, 7, 1), ids)
    np.testing.assert_array_equal(repeat_token(ids, 4, 3), ids)  # absent: unchanged
    embeds = jnp.arange(12.0).reshape(6, 2)
    rows = -jnp.ones((2, 2)) * jnp.asarray([[1.0], [2.0]])
    placed = place_rows(embeds, repeat_token(ids, 7, 2), 7, rows)
    np.testing.assert_array_equal(placed[2:4], rows)
    keep = np.asarray([0, 1, 4, 5])
    np.testing.assert_array_equal(placed[keep], embeds[keep])
    np.testing.assert_array_equal(place_rows(embeds, ids, 4, rows), embeds)


@pytest.fixture(scope="module")
def system():
    model, params = bm.load_base("random:smoke")
    config = IDEncoderConfig(text_dim=model.config.text_encoder.hidden_size, channels=(8, 16), image_dim=16,
                             fuse_hidden=32, groups=4)
    s, encoder, lora = sid.build(model, params, config, lora_rank=2, key=jax.random.key(0))
    return model, params, config, s, encoder, lora


def _photos(model, n, caption="a photo of sks person"):
    images = jax.random.uniform(jax.random.key(n), (n, *model.sample_shape), minval=-1.0, maxval=1.0)
    return {"images": images, "input_ids": jnp.asarray(model.tokenize([caption] * n))}


def test_id_context_is_the_class_free_prompt_with_the_fused_token(system):
    model, params, _, s, encoder, _ = system
    refs, batch = _photos(model, 2), _photos(model, 3)
    embeds = sid.embed_references(s, encoder, refs["images"])
    ctx = sid.id_contexts(s, encoder, params["text_encoder"], embeds, batch["input_ids"])
    assert ctx.shape[1] == batch["input_ids"].shape[1] + 1  # 2 references: one extra row
    plain_ids = jnp.asarray(model.tokenize(["a photo of a person"] * 3))
    plain = bm.encode_text(model, params["text_encoder"], plain_ids)
    position = int(np.flatnonzero(np.asarray(plain_ids[0]) == s.class_token)[0])
    keep = [i for i in range(plain.shape[1]) if i != position]
    np.testing.assert_allclose(ctx[:, keep], plain[:, keep], rtol=1e-5, atol=1e-6)
    fuse = nnx.merge(s.encoder_def, encoder).fuse
    fused = fuse(embeds, plain[0, position])
    np.testing.assert_allclose(ctx[0, position], fused[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ctx[0, -1], fused[1], rtol=1e-5, atol=1e-6)


def test_the_trigger_goes_back_to_the_plain_word_or_is_dropped(system):
    model, params, config, s, _, _ = system
    ids = jnp.asarray(model.tokenize(["a photo of sks person, smiling"]))
    np.testing.assert_array_equal(s.plain_ids(ids), model.tokenize(["a photo of a person, smiling"]))
    dropping, _, _ = sid.build(model, params, config, lora_rank=2, key=jax.random.key(0), plain_word=None)
    np.testing.assert_array_equal(dropping.plain_ids(ids), model.tokenize(["a photo of person, smiling"]))


def test_a_fresh_lora_leaves_the_base_unet_unchanged(system):
    model, params, _, s, encoder, lora = system
    merged, base = jax.tree.leaves(sid.unet_params(s, lora)), jax.tree.leaves(params["unet"])
    assert len(merged) == len(base)
    for a, b in zip(merged, base):
        np.testing.assert_array_equal(a, b)
    refs, batch = _photos(model, 1), _photos(model, 2)
    embeds = sid.embed_references(s, encoder, refs["images"])
    key = jax.random.key(3)
    got = sid.denoising_loss(s, encoder, lora, params["text_encoder"], embeds, batch, key)
    from metalora.diffusion import diffusion_loss, training_inputs

    ctx = sid.id_contexts(s, encoder, params["text_encoder"], embeds, batch["input_ids"])
    x_t, t, target = training_inputs(model.schedule, key, batch["images"])
    expected = diffusion_loss(model.unet_fn(params["unet"], x_t, t, ctx), target)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    # the same draws as the other methods' example loss for the same key: held-out losses are paired
    from metalora.meta import diffusion_example_loss

    base_unet = model.unet(params)
    paired = diffusion_example_loss(model.schedule)(base_unet, {"images": batch["images"], "context": ctx}, key)
    np.testing.assert_allclose(got, paired, rtol=1e-6)


def test_sampling_reads_the_plain_prompt_before_the_merge_step(system):
    """All steps before the merge = the base sampler on "a photo of a person" (fresh LoRA)."""
    model, params, _, s, encoder, lora = system
    embeds = sid.embed_references(s, encoder, _photos(model, 1)["images"])
    ids = jnp.asarray(model.tokenize(["a photo of sks person"] * 2))
    keys = jax.random.split(jax.random.key(5), 2)
    kwargs = {"num_inference_steps": 3, "guidance_scale": 2.0}
    never = sid.sample(s, encoder, lora, params["text_encoder"], embeds, ids, keys, start_merge_step=3, **kwargs)
    base = bm.sample_from_ids(model, params, jnp.asarray(model.tokenize(["a photo of a person"] * 2)), keys, **kwargs)
    np.testing.assert_allclose(never, base, atol=1e-5)
    # merged from the start = DDIM + CFG on the ID prompt throughout
    merged = sid.sample(s, encoder, lora, params["text_encoder"], embeds, ids, keys, start_merge_step=0, **kwargs)
    from metalora.diffusion import ddim_sample, initial_noise

    late = sid.id_contexts(s, encoder, params["text_encoder"], embeds, ids)
    empty = bm.encode_text(model, params["text_encoder"], jnp.broadcast_to(jnp.asarray(model.empty_ids), ids.shape))
    x0 = ddim_sample(model.unet_fn, params["unet"], model.schedule, initial_noise(keys, model.sample_shape), late,
                     empty, num_inference_steps=3, guidance_scale=2.0)
    np.testing.assert_allclose(merged, jnp.clip((x0 + 1) / 2, 0, 1), atol=1e-5)


def test_the_merging_unet_switches_context_at_the_merge_timestep():
    def fake_unet(params, x, t, context):  # the context's mean, broadcast: shows which context was read
        return jnp.broadcast_to(jnp.mean(context, axis=(1, 2))[:, None, None, None], x.shape)

    cond = {"early": jnp.zeros((3, 2, 2)), "late": jnp.ones((3, 2, 2)), "merge_t": jnp.full((3,), 500)}
    out = sid._merging_unet(fake_unet, None, jnp.zeros((3, 1, 1, 1)), jnp.asarray([999, 500, 499]), cond)
    np.testing.assert_array_equal(out[:, 0, 0, 0], [0.0, 0.0, 1.0])  # t ≥ merge_t: early; below: late


def test_save_load_round_trip_and_mismatch_names_the_key(system, tmp_path):
    model, params, config, _, encoder, lora = system
    save_id_encoder(tmp_path, encoder, lora, config, {"lora": {"targets": "attn", "rank": 2}})
    enc2, lora2, info = load_id_encoder(tmp_path, encoder, lora)
    assert info["lora"]["rank"] == 2
    for a, b in zip(jax.tree.leaves(enc2) + jax.tree.leaves(lora2), jax.tree.leaves(encoder) + jax.tree.leaves(lora)):
        np.testing.assert_array_equal(a, b)
    other = IDEncoderConfig(text_dim=config.text_dim, channels=(8, 32), image_dim=16, fuse_hidden=32, groups=4)
    _, enc_other, _ = sid.build(model, params, other, lora_rank=2, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"encoder\.image_encoder"):
        load_id_encoder(tmp_path, enc_other, lora)


def test_build_rejects_a_mismatched_text_width(system):
    model, params, config, *_ = system
    with pytest.raises(ValueError, match="text_dim"):
        sid.build(model, params, IDEncoderConfig(text_dim=config.text_dim + 1), key=jax.random.key(0))


def test_training_job_smoke_and_the_method_loads_its_output(tmp_path):
    from configs import id_encoder_tiny
    from experiments import train_id_encoder

    results = train_id_encoder.main(id_encoder_tiny.get_config("smoke"), tmp_path)
    assert results["finished"] and np.isfinite(results["final_metrics"]["train/loss"])
    model, params = bm.load_base("random:smoke")
    method = methods_lib.stacked_id_method(model, params, tmp_path / "id_encoder", start_merge_step=1)
    assert method.tuning_free
    shots = _photos(model, 1)
    embeds = method.init_from_shots(jax.random.key(0), shots)
    assert embeds.shape == (1, id_encoder_tiny.get_config("smoke").encoder.image_dim)
    assert np.isfinite(float(method.eval_loss(embeds, _photos(model, 2), jax.random.key(1))))
    images = method.sample(embeds, shots["input_ids"], jax.random.split(jax.random.key(2), 1), 2, 2.0, None)
    assert images.shape == (1, *model.sample_shape) and float(images.min()) >= 0.0 and float(images.max()) <= 1.0


def test_text_encoder_inputs_embeds_equal_the_token_lookup(system):
    model, params, *_ = system
    ids = jnp.asarray(model.tokenize(["a photo of a person, smiling", "a person"]))
    text = params["text_encoder"]
    np.testing.assert_array_equal(bm.encode_text(model, text, ids, bm.token_embeddings(model, text, ids)),
                                  bm.encode_text(model, text, ids))
    with pytest.raises(ValueError, match="inputs_embeds"):
        bm.encode_text(model, text, ids, bm.token_embeddings(model, text, ids[:, :-1]))


@pytest.fixture(scope="module")
def input_system(system):
    model, params, config, *_ = system
    config = IDEncoderConfig(**{**config.to_dict(), "channels": (8, 16), "inject": "input"})
    s, encoder, lora = sid.build(model, params, config, lora_rank=2, key=jax.random.key(0))
    return s, encoder, lora


def test_input_injection_starts_as_the_plain_prompt_with_the_class_word_repeated(system, input_system):
    """A fresh input-side fuser is class embedding + 0: the ID context is the text encoder on the plain prompt with
    "person" written N times; the context keeps the prompt's length."""
    model, params, *_ = system
    s, encoder, _ = input_system
    text = params["text_encoder"]
    ids = jnp.asarray(model.tokenize(["a photo of sks person, smiling"] * 2))
    for n, plain in ((1, "a photo of a person, smiling"), (2, "a photo of a person person, smiling")):
        embeds = sid.embed_references(s, encoder, _photos(model, n)["images"])
        ctx = sid.id_contexts(s, encoder, text, embeds, ids)
        assert ctx.shape == (*ids.shape, model.config.text_encoder.hidden_size)
        expected = bm.encode_text(model, text, jnp.asarray(model.tokenize([plain] * 2)))
        np.testing.assert_allclose(ctx, expected, rtol=1e-5, atol=1e-6)


def test_input_injection_changes_the_class_word_and_every_later_row_only(system, input_system):
    model, params, *_ = system
    s, encoder, _ = input_system
    text = params["text_encoder"]
    leaves, treedef = jax.tree.flatten(encoder)  # the fuser's last layer away from zero (random: a constant shift
    noise = [0.05 * jax.random.normal(k, x.shape) for k, x in  # of every feature is what LayerNorms remove)
             zip(jax.random.split(jax.random.key(9), len(leaves)), leaves)]
    trained = jax.tree.unflatten(treedef, [x + n for x, n in zip(leaves, noise)])
    embeds = sid.embed_references(s, trained, _photos(model, 1)["images"])
    ids = jnp.asarray(model.tokenize(["a photo of sks person, smiling"]))
    ctx = sid.id_contexts(s, trained, text, embeds, ids)
    plain_ids = s.plain_ids(ids)
    plain = bm.encode_text(model, text, plain_ids)
    position = int(np.flatnonzero(np.asarray(plain_ids[0]) == s.class_token)[0])
    np.testing.assert_allclose(ctx[:, :position], plain[:, :position], rtol=1e-5, atol=1e-6)  # causal encoder
    changed = np.abs(np.asarray(ctx - plain)).max(axis=-1)[0, position:]
    assert (changed > 1e-4).all(), changed
    # gradients reach the encoder through the frozen text encoder
    grads = jax.grad(lambda e: jnp.sum(sid.id_contexts(s, e, text, sid.embed_references(
        s, e, _photos(model, 1)["images"]), ids) ** 2))(trained)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


def test_input_injection_samples_and_trains(system, input_system):
    model, params, *_ = system
    s, encoder, lora = input_system
    embeds = sid.embed_references(s, encoder, _photos(model, 2)["images"])
    loss = sid.denoising_loss(s, encoder, lora, params["text_encoder"], embeds, _photos(model, 2), jax.random.key(0),
                              cond_drop_prob=0.5)
    assert np.isfinite(float(loss))
    ids = jnp.asarray(model.tokenize(["a photo of sks person"]))
    images = sid.sample(s, encoder, lora, params["text_encoder"], embeds, ids, jax.random.split(jax.random.key(1), 1),
                        num_inference_steps=2, start_merge_step=1)
    assert images.shape == (1, *model.sample_shape) and np.isfinite(np.asarray(images)).all()


def test_unknown_inject_mode_is_rejected():
    with pytest.raises(ValueError, match="inject"):
        IDEncoderConfig(text_dim=8, inject="middle")


def test_identity_contrastive_loss_in_closed_form():
    refs = jnp.asarray([[1.0, 0.0], [0.0, 2.0]])
    queries = jnp.asarray([[3.0, 0.0], [0.0, 1.0]])  # same directions: cosine 1 on the diagonal, 0 off it
    tau = 0.5
    expected = -np.log(np.exp(1 / tau) / (np.exp(1 / tau) + np.exp(0.0)))
    np.testing.assert_allclose(sid.identity_contrastive_loss(refs, queries, tau), expected, rtol=1e-6)
    swapped = sid.identity_contrastive_loss(refs, queries[::-1], tau)  # every reference paired with the wrong query
    np.testing.assert_allclose(swapped, -np.log(np.exp(0.0) / (np.exp(1 / tau) + 1.0)), rtol=1e-6)


def test_training_with_the_contrastive_term_reports_both_losses(tmp_path):
    from configs import id_encoder_tiny
    from experiments import train_id_encoder

    config = id_encoder_tiny.get_config("smoke")
    config.encoder.inject = "input"
    config.train.contrastive_weight = 0.5
    results = train_id_encoder.main(config, tmp_path)
    metrics = results["final_metrics"]
    np.testing.assert_allclose(metrics["train/loss"], metrics["train/denoising"] + 0.5 * metrics["train/contrastive"],
                               rtol=1e-5)
    info = json.loads((tmp_path / "id_encoder" / "id_encoder.json").read_text())
    assert info["config"]["inject"] == "input"
