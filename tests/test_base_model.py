"""The composite base model: tokenizer coverage, config checks, loss/gradients, CFG caption dropout, sampling,
checkpoint round trip, and parity of its saved parts with diffusers/transformers (torch)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metalora.data import world
from metalora.diffusion import training_noise
from metalora.models import base_model as bm


@pytest.fixture(scope="module")
def tiny():
    """A very small composite (fast to compile) with random weights."""
    tokenizer = bm.world_tokenizer()
    unet = bm.tiny_unet_config(block_out_channels=(32, 32), cross_attention_dim=32, attention_head_dim=2)
    config = bm.BaseModelConfig.create(unet=unet, text_hidden_size=32, text_layers=1, text_heads=2, tokenizer=tokenizer)
    model = bm.BaseModel(config)
    return model, bm.init_base_params(model, jax.random.key(0))


def _batch(model, n=4, seed=0):
    samples = [world.render_sample(seed, i, 0, model.resolution) for i in range(n)]
    images = np.stack([s.image for s in samples]).astype(np.float32) / 127.5 - 1.0
    return {"images": jnp.asarray(images), "input_ids": jnp.asarray(model.tokenize([s.caption for s in samples]))}


def test_world_tokenizer_covers_every_caption_the_world_writes():
    tok = bm.world_tokenizer()
    rng = np.random.default_rng(0)
    captions = []
    for _ in range(300):
        attrs = {k: v[rng.integers(len(v))] for k, v in world.ATTRIBUTE_CLASSES.items()}
        captions.append(world.make_caption(attrs))
        captions.append(world.make_caption(attrs, identifier="sks"))
    ids = tok.tokenize(captions)
    assert ids.shape == (600, bm.longest_world_caption() + 2)
    for caption, row in zip(captions, ids):
        assert tok.decode(row) == " ".join(caption.replace(",", " ,").split())
    assert tok.token_to_id("sks") not in ids[0::2]  # plain captions never contain the identifier token


def test_config_refuses_mismatched_text_width():
    unet = bm.tiny_unet_config(block_out_channels=(32, 32), cross_attention_dim=64, attention_head_dim=2)
    with pytest.raises(ValueError, match="cross_attention_dim"):
        bm.BaseModelConfig.create(unet=unet, text_hidden_size=32, text_layers=1, text_heads=2)
    with pytest.raises(ValueError, match="resolution=30"):
        bm.BaseModelConfig.create(resolution=30, unet=bm.tiny_unet_config(cross_attention_dim=128))


def test_loss_trains_both_towers(tiny):
    model, params = tiny
    batch = _batch(model)
    (loss, aux), grads = jax.value_and_grad(lambda p: bm.base_loss(model, p, batch, jax.random.key(3)),
                                            has_aux=True)(params)
    assert np.isfinite(loss) and np.isfinite(aux["mse"])
    for tower in ("unet", "text_encoder"):
        norm = float(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads[tower]))))
        assert norm > 0, f"no gradient reaches the {tower}"
    # With every caption dropped the text encoder sees only the empty prompt, but still gets gradients.
    loss_all_dropped, _ = bm.base_loss(model, params, batch, jax.random.key(3), cond_drop_prob=1.0)
    assert not np.isclose(float(loss_all_dropped), float(loss))


def test_loss_matches_its_definition(tiny):
    """min-SNR-weighted v-prediction MSE recomputed from the closed-form forward process."""
    model, params = tiny
    batch = _batch(model)
    key = jax.random.key(7)
    loss, _ = bm.base_loss(model, params, batch, key, cond_drop_prob=0.0, min_snr_gamma=5.0)
    _, k_noise = jax.random.split(key)
    k_t, k_eps = jax.random.split(k_noise)
    x0 = batch["images"]
    t = jax.random.randint(k_t, (x0.shape[0],), 0, model.schedule.num_train_timesteps)
    eps = jax.random.normal(k_eps, x0.shape)
    a = np.asarray(model.schedule.alphas_cumprod)[np.asarray(t)].reshape(-1, 1, 1, 1)
    x_t = np.sqrt(a) * x0 + np.sqrt(1 - a) * eps
    v = np.sqrt(a) * eps - np.sqrt(1 - a) * x0
    pred = bm.denoise(model, params, jnp.asarray(x_t, jnp.float32), t, batch["input_ids"])
    snr = a.reshape(-1) / (1 - a.reshape(-1))
    weights = np.minimum(snr, 5.0) / (snr + 1.0)
    expected = np.mean(weights * np.mean((np.asarray(pred) - v) ** 2, axis=(1, 2, 3)))
    np.testing.assert_allclose(float(loss), expected, rtol=1e-4)


def test_counterfactual_pair_loss(tiny):
    """A partner identical to its photo adds nothing (pair term 0, the same loss as the photos alone); a real
    partner's term is the MSE between the two predictions' and the two targets' differences at one shared t and
    noise, recomputed here from the closed-form forward process."""
    model, params = tiny
    batch = _batch(model)
    key = jax.random.key(5)
    alone, _ = bm.base_loss(model, params, batch, key, cond_drop_prob=0.5, min_snr_gamma=None)
    twin = {**batch, "pair_images": batch["images"], "pair_input_ids": batch["input_ids"]}
    loss, aux = bm.base_loss(model, params, twin, key, cond_drop_prob=0.5, min_snr_gamma=None)
    assert float(aux["pair_mse"]) == 0.0
    np.testing.assert_allclose(float(loss), float(alone), rtol=1e-6)

    other = _batch(model, seed=1)  # other people: only the arithmetic is checked here
    pairs = {**batch, "pair_images": other["images"], "pair_input_ids": other["input_ids"]}
    loss, aux = bm.base_loss(model, params, pairs, key, cond_drop_prob=0.0, min_snr_gamma=None, pair_weight=0.5)
    _, k_noise = jax.random.split(key)
    t, eps = training_noise(model.schedule, k_noise, batch["images"])
    a = np.asarray(model.schedule.alphas_cumprod)[np.asarray(t)].reshape(-1, 1, 1, 1)
    preds, targets = [], []
    for x0, ids in ((batch["images"], batch["input_ids"]), (other["images"], other["input_ids"])):
        x_t = np.sqrt(a) * np.asarray(x0) + np.sqrt(1 - a) * np.asarray(eps)
        targets.append(np.sqrt(a) * np.asarray(eps) - np.sqrt(1 - a) * np.asarray(x0))
        preds.append(np.asarray(bm.denoise(model, params, jnp.asarray(x_t, jnp.float32), t, ids)))
    plain = np.mean([np.mean((p - v) ** 2) for p, v in zip(preds, targets)])
    pair = np.mean(((preds[0] - preds[1]) - (targets[0] - targets[1])) ** 2)
    np.testing.assert_allclose(float(aux["pair_mse"]), pair, rtol=1e-4)
    np.testing.assert_allclose(float(loss), plain + 0.5 * pair, rtol=1e-4)


def test_caption_dropout_uses_the_empty_prompt_at_the_asked_rate(tiny):
    model, _ = tiny
    ids = jnp.asarray(model.tokenize(["a photo of a person, on a blue background"] * 20000))
    out, dropped = bm.drop_captions(model, jax.random.key(0), ids, 0.1)
    assert abs(float(dropped.mean()) - 0.1) < 0.01
    np.testing.assert_array_equal(np.asarray(out)[np.asarray(dropped)], np.broadcast_to(model.empty_ids, (
        int(dropped.sum()), ids.shape[1])))
    np.testing.assert_array_equal(np.asarray(out)[~np.asarray(dropped)], np.asarray(ids)[~np.asarray(dropped)])
    assert model.tokenizer.decode(model.empty_ids) == ""


def test_sample_shape_range_and_independence_of_batch_mates(tiny):
    model, params = tiny
    keys = jax.random.split(jax.random.key(1), 3)
    prompts = ["a photo of a person", "a photo of a person wearing red glasses", "a photo of a person, smiling"]
    three = bm.sample(model, params, prompts, keys, num_inference_steps=3)
    one = bm.sample(model, params, prompts[1:2], keys[1:2], num_inference_steps=3)
    assert three.shape == (3, 32, 32, 3) and three.dtype == np.float32
    assert three.min() >= 0.0 and three.max() <= 1.0
    np.testing.assert_allclose(three[1], one[0], atol=1e-5)
    assert not np.allclose(three[0], three[2])
    with pytest.raises(ValueError, match="one key per prompt"):
        bm.sample(model, params, prompts, keys[:2], num_inference_steps=3)


def test_save_and_load_round_trip(tiny, tmp_path):
    model, params = tiny
    bm.save_base_model(tmp_path / "m", model, params, extra={"seed": 0})
    model2, params2 = bm.load_base_model(tmp_path / "m")
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert model2.config.unet == model.config.unet and model2.tokenizer.tokens == model.tokenizer.tokens
    assert json.loads((tmp_path / "m" / "model_index.json").read_text())["extra"] == {"seed": 0}
    half = bm.save_base_model(tmp_path / "h", model, params, weights_dtype="float16")
    _, params_half = bm.load_base_model(half)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_half), strict=True):
        assert b.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-4)


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model_index\.json"):
        bm.load_base_model(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ValueError, match="StableDiffusionPipeline"):
        bm.load_base_model(tmp_path)


def test_saved_parts_run_in_diffusers_and_transformers(tiny, tmp_path):
    """The UNet and text-encoder folders are real diffusers/transformers checkpoints with the same outputs."""
    torch = pytest.importorskip("torch")
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    model, params = tiny
    path = bm.save_base_model(tmp_path / "m", model, params)
    ids = model.tokenize(["a photo of a person wearing blue glasses, facing left, on a red background"])
    hidden = np.asarray(bm.encode_text(model, params["text_encoder"], ids))
    text_pt = CLIPTextModel.from_pretrained(path / "text_encoder").eval()
    with torch.no_grad():
        hidden_pt = text_pt(torch.from_numpy(ids.astype(np.int64))).last_hidden_state.numpy()
    np.testing.assert_allclose(hidden, hidden_pt, atol=2e-5, rtol=1e-4)

    x = np.asarray(jax.random.normal(jax.random.key(2), (1, 32, 32, 3)))
    t = np.array([417])
    out = np.asarray(bm.apply_unet(model.unet_def, params["unet"], x, t, hidden))
    unet_pt = UNet2DConditionModel.from_pretrained(path / "unet").eval()
    with torch.no_grad():
        out_pt = unet_pt(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t),
                         torch.from_numpy(hidden)).sample.numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(out, out_pt, atol=1e-4, rtol=1e-3)


def test_default_checkpoint_loads_and_draws():
    if not (bm.DEFAULT_BASE_CHECKPOINT / "model_index.json").is_file():
        pytest.skip(f"no pretrained base at {bm.DEFAULT_BASE_CHECKPOINT}")
    model, params = bm.load_base_model()
    assert model.resolution == 32
    images = bm.sample(model, params, ["a photo of a person, on a blue background"], jax.random.key(0)[None],
                       num_inference_steps=2)
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()


def test_sample_cli_writes_a_prompt_by_seed_grid(tiny, tmp_path):
    from PIL import Image

    from experiments import sample as sample_cli

    model, params = tiny
    folder = bm.save_base_model(tmp_path / "m", model, params)
    out = sample_cli.main(["--model", str(folder), "--prompt", "a photo of a person", "--prompt",
                           "a photo of a person, smiling", "--seeds", "3", "--steps", "2", "--out",
                           str(tmp_path / "grid.png")])
    # 2 rows x 3 columns of 32 px tiles with 2 px padding
    assert Image.open(out).size == (3 * 34 + 2, 2 * 34 + 2)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(ValueError, match=r"KandinskyPipeline.*has no loader"):
        sample_cli.load_pipeline(tmp_path / "other")
