"""Stable Diffusion / SDXL pipelines from a diffusers folder: prompt encoding and 10-step DDIM sampling with CFG
against diffusers' own pipelines (torch, f32) on tiny random models, plus model_index.json errors."""

import dataclasses
import json
import logging
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from _tiny_sd import MAX_LENGTH, SCHEDULE, build_sd, build_sdxl  # tests/ is on sys.path under pytest
from diffusers import DDIMScheduler, StableDiffusionPipeline

from metalora.diffusion import NoiseSchedule, samplers
from metalora.models.pipeline import PipelineConfigError, load_pipeline, per_image_keys, read_model_index, to_uint8

PROMPTS = ["a photo of sks", "photo of a cat, sks"]
NEGATIVE = ["blurry", "ugly photo"]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """The reference pipelines are tiny: single-threaded torch avoids oversubscribing a busy CPU (10× faster)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd") / "pipeline"
    return folder, build_sd(folder)


@pytest.fixture(scope="module")
def sd(sd_folder):
    folder, reference = sd_folder
    return reference, load_pipeline(folder)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl") / "pipeline"
    return build_sdxl(folder), load_pipeline(folder)


def _np(x) -> np.ndarray:
    return np.asarray(x.detach().numpy() if isinstance(x, torch.Tensor) else x)


def _torch_latents(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 4, 16, 16, generator=torch.Generator().manual_seed(seed))


def _nhwc(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.numpy().transpose(0, 2, 3, 1))


# --------------------------------------------------------------------------------------------------------------
# Prompt encoding
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("clip_skip", [None, 1])
@pytest.mark.parametrize("negative", [None, NEGATIVE])
def test_sd_prompt_embeddings_match_diffusers(sd, clip_skip, negative):
    reference, ours = sd
    with torch.no_grad():
        want, want_neg = reference.encode_prompt(PROMPTS, "cpu", 1, True, negative_prompt=negative,
                                                 clip_skip=clip_skip)
    cond, uncond = ours.encode_prompt(PROMPTS, negative, clip_skip=clip_skip)
    assert set(cond) == {"encoder_hidden_states"}
    np.testing.assert_allclose(cond["encoder_hidden_states"], _np(want), atol=1e-4, rtol=0)
    np.testing.assert_allclose(uncond["encoder_hidden_states"], _np(want_neg), atol=1e-4, rtol=0)
    assert ours.encode_prompt(PROMPTS, guidance=False)[1] is None


@pytest.mark.parametrize("clip_skip", [None, 1])
@pytest.mark.parametrize("negative", [None, NEGATIVE])
def test_sdxl_prompt_embeddings_match_diffusers(sdxl, clip_skip, negative):
    reference, ours = sdxl
    assert ours.force_zeros_for_empty_prompt
    with torch.no_grad():
        want, want_neg, pooled, pooled_neg = reference.encode_prompt(
            PROMPTS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True,
            negative_prompt=negative, clip_skip=clip_skip)
    cond, uncond = ours.encode_prompt(PROMPTS, negative, clip_skip=clip_skip)
    assert cond["encoder_hidden_states"].shape == (2, MAX_LENGTH, 16 + 32)
    for key, a, b in (("encoder_hidden_states", want, want_neg), ("text_embeds", pooled, pooled_neg)):
        np.testing.assert_allclose(cond[key], _np(a), atol=1e-4, rtol=0, err_msg=key)
        np.testing.assert_allclose(uncond[key], _np(b), atol=1e-4, rtol=0, err_msg=key)
    if negative is None:  # force_zeros_for_empty_prompt
        assert not np.any(np.asarray(uncond["encoder_hidden_states"])) and not np.any(uncond["text_embeds"])


def test_prompt_argument_errors(sd):
    _, ours = sd
    with pytest.raises(ValueError, match="negative_prompts has 1 entries but prompts has 2"):
        ours.encode_prompt(PROMPTS, ["x"])
    with pytest.raises(TypeError, match="prompts must be strings"):
        ours.encode_prompt(["a", 3])
    # A single string is one prompt; a string negative prompt applies to every prompt.
    single, _ = ours.encode_prompt("a photo of sks", "blurry")
    both, uncond = ours.encode_prompt(PROMPTS, "blurry")
    np.testing.assert_allclose(single["encoder_hidden_states"][0], both["encoder_hidden_states"][0], atol=1e-6)
    np.testing.assert_allclose(uncond["encoder_hidden_states"][0], uncond["encoder_hidden_states"][1], atol=1e-6)


# --------------------------------------------------------------------------------------------------------------
# Sampling parity: 10 DDIM steps, CFG, same initial latents
# --------------------------------------------------------------------------------------------------------------


def test_sd_sampling_matches_diffusers(sd):
    reference, ours = sd
    latents = _torch_latents(2)
    with torch.no_grad():
        want = reference(PROMPTS, num_inference_steps=10, guidance_scale=7.5, latents=latents.clone(),
                         output_type="np").images
    got = ours.sample(PROMPTS, num_inference_steps=10, guidance_scale=7.5, latents=_nhwc(latents))
    assert got.shape == want.shape == (2, 32, 32, 3) and got.dtype == np.float32
    assert want.std() > 0.05  # a non-trivial image, not a saturated one
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)


def test_sd_v_prediction_clip_skip_negative_and_no_guidance_match_diffusers(sd):
    """SD-2.x-like options: v-prediction, trailing spacing, clip_skip, negative prompts; and guidance ≤ 1
    (diffusers then runs the conditional branch only). Same weights, another scheduler on both sides."""
    reference, ours = sd
    schedule = {**SCHEDULE, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}
    reference = StableDiffusionPipeline(**{**reference.components, "scheduler": DDIMScheduler(**schedule)},
                                        requires_safety_checker=False)
    ours = dataclasses.replace(ours, schedule=NoiseSchedule.from_config(reference.scheduler.config))
    assert ours.schedule.prediction_type == "v_prediction"
    latents = _torch_latents(2, seed=1)
    for kwargs in (dict(guidance_scale=5.0, clip_skip=1, negative_prompt=NEGATIVE), dict(guidance_scale=1.0)):
        with torch.no_grad():
            want = reference(PROMPTS, num_inference_steps=10, latents=latents.clone(), output_type="np",
                             **kwargs).images
        negative = kwargs.pop("negative_prompt", None)
        got = ours.sample(PROMPTS, num_inference_steps=10, latents=_nhwc(latents), negative_prompts=negative,
                          **kwargs)
        np.testing.assert_allclose(got, want, atol=1e-3, rtol=0, err_msg=str(kwargs))


def test_sdxl_sampling_matches_diffusers(sdxl):
    """Negative prompts and non-default micro-conditioning (original size, crop) through the added embedding."""
    reference, ours = sdxl
    latents = _torch_latents(2, seed=2)
    micro = dict(original_size=(48, 40), crops_coords_top_left=(4, 2), target_size=(32, 32))
    with torch.no_grad():
        want = reference(PROMPTS, negative_prompt=NEGATIVE, num_inference_steps=10, guidance_scale=6.0,
                         latents=latents.clone(), height=32, width=32, output_type="np", **micro).images
    got = ours.sample(PROMPTS, negative_prompts=NEGATIVE, num_inference_steps=10, guidance_scale=6.0,
                      latents=_nhwc(latents), height=32, width=32, **micro)
    assert want.std() > 0.05
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)


def test_sdxl_zeroed_negative_sampling_matches_diffusers(sdxl):
    reference, ours = sdxl
    latents = _torch_latents(2, seed=3)
    with torch.no_grad():
        want = reference(PROMPTS, num_inference_steps=10, guidance_scale=7.5, latents=latents.clone(),
                         output_type="np").images
    got = ours.sample(PROMPTS, num_inference_steps=10, guidance_scale=7.5, latents=_nhwc(latents))
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)


# --------------------------------------------------------------------------------------------------------------
# Seeds, compilation, outputs
# --------------------------------------------------------------------------------------------------------------


def test_seeds_are_per_image_and_sampler_compiles_once(sd):
    """Everything here has the parity test's shapes (2 images, 10 steps), so it reuses one compiled sampler."""
    _, ours = sd
    pair = ours.sample(PROMPTS, num_inference_steps=10, seed=7)
    compiled = samplers._ddim_loop._cache_size()
    # New seed, guidance scale and weights: the compiled sampler is reused (model_fn is built once).
    other = ours.sample(PROMPTS, num_inference_steps=10, seed=8, guidance_scale=3.0)
    assert np.abs(pair - other).max() > 1e-2
    # Prompt-major order, image i drawn from fold_in(key(seed), i): image 0 does not depend on the rest of the batch.
    same_prompt = ours.sample(PROMPTS[:1], num_inference_steps=10, seed=7, num_images_per_prompt=2)
    np.testing.assert_allclose(same_prompt[0], pair[0], atol=1e-5)
    assert np.abs(same_prompt[0] - same_prompt[1]).max() > 1e-2  # two seeds of one prompt differ
    np.testing.assert_array_equal(ours.sample(PROMPTS, num_inference_steps=10, keys=per_image_keys(7, 2)), pair)
    z = ours.sample(PROMPTS, num_inference_steps=10, seed=7, output="latents")
    assert z.shape == (2, 16, 16, 4)
    np.testing.assert_allclose(ours.decode(z), pair, atol=1e-6)
    zeroed = jax.tree.map(jnp.zeros_like, ours.unet_params())
    with_zero_unet = ours.sample(PROMPTS, num_inference_steps=10, seed=7, output="latents", unet_params=zeroed)
    assert np.abs(with_zero_unet - z).max() > 1e-2
    assert samplers._ddim_loop._cache_size() == compiled


def test_sample_argument_errors(sd):
    _, ours = sd
    with pytest.raises(ValueError, match="NHWC"):
        ours.sample(PROMPTS, latents=np.zeros((2, 4, 16, 16), np.float32))
    with pytest.raises(ValueError, match="multiples of the VAE factor 2"):
        ours.sample(PROMPTS, height=33)
    with pytest.raises(ValueError, match="keys has 3 rows but 2 images"):
        ours.sample(PROMPTS, keys=per_image_keys(0, 3))


def test_to_uint8_rounds_like_diffusers():
    images = np.array([0.0, 0.5, 1.0, 1.2, -0.1, 0.499 / 255], np.float32)
    np.testing.assert_array_equal(to_uint8(images), [0, 128, 255, 255, 0, 0])
    assert to_uint8(images).dtype == np.uint8


def test_cache_training_inputs_match_diffusers(sdxl):
    """Latents (posterior mean × scaling_factor) and text conditioning, precomputed in padded batches."""
    reference, ours = sdxl
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 24, 3), dtype=np.uint8)
    captions = [*PROMPTS, "sks"]
    cache = ours.cache_training_inputs(images, captions, batch_size=2)
    with torch.no_grad():
        x = torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0)
        latents = reference.vae.encode(x).latent_dist.mean * reference.vae.config.scaling_factor
        hidden, _, pooled, _ = reference.encode_prompt(captions, device="cpu", do_classifier_free_guidance=False)
    assert sorted(cache) == ["encoder_hidden_states", "latents", "text_embeds", "time_ids"]
    np.testing.assert_allclose(cache["latents"], _nhwc(latents), atol=1e-4, rtol=0)
    np.testing.assert_allclose(cache["encoder_hidden_states"], _np(hidden), atol=1e-4, rtol=0)
    np.testing.assert_allclose(cache["text_embeds"], _np(pooled), atol=1e-4, rtol=0)
    np.testing.assert_array_equal(cache["time_ids"], [[32, 24, 0, 0, 32, 24]] * 3)
    with pytest.raises(ValueError, match="3 images but 2 captions"):
        ours.cache_training_inputs(images, PROMPTS)


# --------------------------------------------------------------------------------------------------------------
# model_index.json errors
# --------------------------------------------------------------------------------------------------------------


def _index_folder(tmp_path, source: pathlib.Path, **changes) -> pathlib.Path:
    index = json.loads((source / "model_index.json").read_text())
    index.update(changes)
    folder = tmp_path / "edited"
    folder.mkdir(exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


@pytest.mark.parametrize("changes, message", [
    (dict(unet=["diffusers", "UNet2DModel"]), r"component 'unet' has class 'UNet2DModel'"),
    (dict(vae=["diffusers", "AutoencoderTiny"]), r"component 'vae' has class 'AutoencoderTiny'"),
    (dict(text_encoder=["transformers", "T5EncoderModel"]), r"component 'text_encoder' has class 'T5EncoderModel'"),
    (dict(controlnet=["diffusers", "ControlNetModel"]), r"component 'controlnet' \(diffusers.ControlNetModel\)"),
    (dict(scheduler=["diffusers", "FlowMatchEulerDiscreteScheduler"]), r"'scheduler'.*flow-matching"),
    (dict(_class_name="StableDiffusion3Pipeline"), r"_class_name='StableDiffusion3Pipeline' is not supported"),
    (dict(vae=[None, None]), r"needs components \['vae'\]"),
])
def test_bad_model_index_names_component_and_class(tmp_path, sd_folder, changes, message):
    folder = _index_folder(tmp_path, sd_folder[0], **changes)
    with pytest.raises(PipelineConfigError, match=message):
        load_pipeline(folder)


def test_safety_checker_is_skipped_with_a_note(tmp_path, sd_folder, caplog):
    folder = _index_folder(tmp_path, sd_folder[0], safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
                           feature_extractor=["transformers", "CLIPImageProcessor"], requires_safety_checker=True)
    with caplog.at_level(logging.INFO, logger="metalora.models.pipeline"):
        pipeline_class, components, options, skipped = read_model_index(folder)
    assert pipeline_class == "StableDiffusionPipeline" and options["requires_safety_checker"] is True
    assert set(skipped) == {"feature_extractor", "safety_checker"}
    assert "skipping component 'safety_checker' (StableDiffusionSafetyChecker)" in caplog.text
    assert components == {"scheduler": "DDIMScheduler", "text_encoder": "CLIPTextModel",
                          "tokenizer": "CLIPTokenizer", "unet": "UNet2DConditionModel", "vae": "AutoencoderKL"}


def test_component_shape_contracts_are_checked(tmp_path, sd_folder):
    folder = tmp_path / "mismatch"
    shutil.copytree(sd_folder[0], folder)
    config_path = folder / "tokenizer" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["model_max_length"] = 2 * MAX_LENGTH  # longer than the encoder's position table
    config_path.write_text(json.dumps(config))
    with pytest.raises(PipelineConfigError, match="pads to 32 tokens but text_encoder has max_position_embeddings=16"):
        load_pipeline(folder)


def test_missing_model_index(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model_index\.json"):
        load_pipeline(tmp_path)


def test_sampling_cli_draws_a_diffusers_folder(sd_folder, sd, tmp_path):
    """``experiments.sample`` on a Stable Diffusion folder writes the images the pipeline draws."""
    from PIL import Image

    from experiments import sample as sample_cli

    out = sample_cli.main(["--model", str(sd_folder[0]), "--prompt", "a photo of a cat", "--seeds", "2", "--steps", "2",
                           "--guidance", "3.0", "--out", str(tmp_path / "grid.png")])
    grid = np.asarray(Image.open(out))
    keys = jax.random.split(jax.random.key(0), 2)
    expected = to_uint8(sd[1].sample(["a photo of a cat"] * 2, keys=keys, num_inference_steps=2, guidance_scale=3.0))
    h, w = expected.shape[1:3]
    assert grid.shape[0] >= h and grid.shape[1] >= 2 * w
    tiles = [grid[y:y + h, x:x + w] for y in range(grid.shape[0] - h + 1) for x in range(grid.shape[1] - w + 1)
             if np.array_equal(grid[y:y + h, x:x + w], expected[0])]
    assert tiles, "the first image of the pipeline is not in the CLI's grid"
