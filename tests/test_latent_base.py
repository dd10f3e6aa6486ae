"""A diffusers Stable Diffusion folder as the personalization base: VAE latents in, decoded images out, parity
with diffusers' VAE and with our SD pipeline's sampler, and meta-train → adapt → export on it (tiny random SD)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metalora.models import base_model as bm

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from _tiny_sd import build_sd, build_sdxl  # noqa: E402  (tests/ is on sys.path under pytest)


def _tiny_folder(tmp_path_factory, build):
    """(folder, diffusers pipeline, our (model, params)) of a tiny random pipeline written by ``build``."""
    folder = tmp_path_factory.mktemp("pipeline") / "pipeline"
    pipe = build(folder)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny references: one thread avoids oversubscribing a 2-core machine
    yield folder, pipe, bm.load_base(str(folder))
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    yield from _tiny_folder(tmp_path_factory, build_sd)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    yield from _tiny_folder(tmp_path_factory, build_sdxl)


def _nchw(x) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())


def _nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


def test_a_stable_diffusion_folder_loads_as_a_latent_base(sd):
    _, pipe, (model, params) = sd
    assert model.latent and set(params) == {"unet", "text_encoder", "vae"}
    assert model.sample_shape == (16, 16, 4) and model.image_resolution == 32
    np.testing.assert_array_equal(model.tokenize(["a photo of sks"]),
                                  pipe.tokenizer(["a photo of sks"], padding="max_length", truncation=True,
                                                 max_length=pipe.tokenizer.model_max_length,
                                                 return_tensors="np")["input_ids"])
    ids = model.tokenize(["a photo of sks", ""])
    with torch.no_grad():
        hidden = pipe.text_encoder(torch.from_numpy(ids.astype(np.int64))).last_hidden_state.numpy()
    np.testing.assert_allclose(bm.encode_text(model, params["text_encoder"], ids), hidden, atol=1e-5)


def test_images_to_latents_and_back_match_diffusers(sd):
    _, pipe, (model, params) = sd
    photos = jax.random.uniform(jax.random.key(0), (2, 3, 32, 32, 3), minval=-1.0, maxval=1.0)  # any leading axes
    latents = bm.encode_images(model, params, photos)
    assert latents.shape == (2, 3, *model.sample_shape)
    scale = pipe.vae.config.scaling_factor
    with torch.no_grad():
        expected = pipe.vae.encode(_nchw(photos.reshape(6, 32, 32, 3))).latent_dist.mode() * scale
        decoded = (pipe.vae.decode(expected / scale).sample / 2 + 0.5).clamp(0, 1)
    np.testing.assert_allclose(latents.reshape(6, *model.sample_shape), _nhwc(expected), atol=1e-4)
    images = bm.decode_images(model, params, jnp.asarray(_nhwc(expected)))
    assert images.shape == (6, 32, 32, 3)
    np.testing.assert_allclose(images, _nhwc(decoded), atol=1e-4)


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_base_sampler_on_latents_equals_the_pipeline(kind, request):
    """``bm.sample_from_ids`` (DDIM + CFG, VAE decode) = ``Pipeline.sample`` from the same keys, which is itself
    held to diffusers' pipelines in test_pipeline.py; SDXL with its zeroed unconditional branch
    (force_zeros_for_empty_prompt, diffusers' default)."""
    from metalora.models.pipeline import load_pipeline

    folder, _, (model, params) = request.getfixturevalue(kind)
    assert model.config.zero_uncond == (kind == "sdxl")
    prompts = ["a photo of sks", "photo of a cat, sks"]
    keys = jax.random.split(jax.random.key(3), 2)
    ours = bm.sample_from_ids(model, params, jnp.asarray(model.tokenize(prompts)), keys, num_inference_steps=4,
                              guidance_scale=2.5)
    reference = load_pipeline(folder).sample(prompts, keys=keys, num_inference_steps=4, guidance_scale=2.5)
    assert ours.shape == (2, 32, 32, 3)
    np.testing.assert_allclose(ours, reference, atol=1e-5)


@pytest.mark.parametrize("kind, config_name, config_arg, pipeline_class", [
    ("sd", "meta_lora_tiny", "smoke", "StableDiffusionPipeline"),
    ("sdxl", "meta_lora_sdxl", "tiny", "StableDiffusionXLPipeline"),  # configs/meta_lora_sdxl.py at test size
])
def test_meta_train_and_adapt_on_a_stable_diffusion_folder(kind, config_name, config_arg, pipeline_class, tmp_path,
                                                           request):
    """The procedural world's photos (32 px) as VAE latents: D meta-trained, two subjects adapted (for SDXL the
    held-out loss reads the added conditions), their LoRAs exported in the diffusers format and loaded by diffusers'
    own pipeline."""
    import importlib

    from PIL import Image

    from experiments import adapt, meta_train

    folder, _, _ = request.getfixturevalue(kind)
    config = importlib.import_module(f"configs.{config_name}").get_config(config_arg)
    config.base.path = str(folder)
    trained = meta_train.main(config, tmp_path)
    assert trained["finished"] and np.isfinite(trained["final_metrics"]["train/loss"])
    adapted = adapt.main(config, tmp_path)
    assert np.isfinite(adapted["heldout_loss_after"]).all() and len(adapted["exports"]) == 2
    grid = np.asarray(Image.open(adapted["samples"]))
    assert grid.shape[0] >= 2 * 32  # two subjects' rows of 32 px images (pixels, not 16 px latents)
    pipe = getattr(diffusers, pipeline_class).from_pretrained(str(folder), **(
        {"safety_checker": None} if kind == "sd" else {}))
    pipe.load_lora_weights(adapted["exports"][0])  # the subject's LoRA loads into the real pipeline
    assert any("lora" in name for name, _ in pipe.unet.named_parameters())


def test_an_sdxl_folder_conditions_its_unet_as_diffusers_does(sdxl):
    """Both encoders' penultimate hidden states side by side, the second's pooled projection (diffusers'
    ``encode_prompt``) and the size ids of an uncropped square photo; ``denoise`` = diffusers' UNet on them."""
    _, pipe, (model, params) = sdxl
    assert model.xl and model.latent and set(params["text_encoder"]) == {"text_encoder", "text_encoder_2"}
    prompts = ["a photo of sks", "photo of a cat, sks"]
    ids = jnp.asarray(model.tokenize(prompts))
    assert ids.shape == (2, pipe.tokenizer.model_max_length + pipe.tokenizer_2.model_max_length)
    cond = bm.encode_prompt(model, params["text_encoder"], ids)
    with torch.no_grad():
        hidden, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    np.testing.assert_allclose(cond["context"], hidden.numpy(), atol=1e-5)
    np.testing.assert_allclose(cond["text_embeds"], pooled.numpy(), atol=1e-5)
    np.testing.assert_array_equal(cond["time_ids"], [[32, 32, 0, 0, 32, 32]] * 2)  # 16² latents × VAE factor 2

    x = jax.random.normal(jax.random.key(0), (2, *model.sample_shape))
    t = jnp.asarray([10, 700])
    with torch.no_grad():
        expected = pipe.unet(_nchw(x), torch.from_numpy(np.array(t)), hidden,
                             added_cond_kwargs={"text_embeds": pooled,
                                                "time_ids": torch.from_numpy(np.array(cond["time_ids"]))}).sample
    np.testing.assert_allclose(bm.denoise(model, params, x, t, ids), _nhwc(expected), atol=1e-4)


def test_token_methods_refuse_an_sdxl_base_by_name(sdxl):
    from metalora.eval import methods as methods_lib
    from metalora.meta import diffusion_example_loss

    _, _, (model, params) = sdxl
    with pytest.raises(ValueError, match="an SDXL base has two"):
        methods_lib.textual_inversion_method(model, params, diffusion_example_loss(model.schedule))
    with pytest.raises(ValueError, match="an SDXL base has two"):
        bm.encode_text(model, params["text_encoder"], jnp.asarray(model.tokenize(["a"])),
                       inputs_embeds=jnp.zeros((1, model.tokenizer.max_length, 16)))


def test_pixel_only_jobs_refuse_a_latent_base_by_name(sd):
    folder, _, _ = sd
    with pytest.raises(ValueError, match="the benchmark harness runs on pixel-space bases"):
        bm.load_pixel_base(str(folder), job="the benchmark harness")


def test_latent_shots_need_the_vae(sd):
    from metalora.meta.personalize import encode_shots

    _, _, (model, params) = sd
    shots = {"images": jnp.zeros((1, 32, 32, 3)), "input_ids": jnp.asarray(model.tokenize(["a photo of sks"]))}
    with pytest.raises(ValueError, match="vae_params"):
        encode_shots(model, params["text_encoder"], shots)
    encoded = encode_shots(model, params["text_encoder"], shots, params["vae"])
    assert encoded["images"].shape == (1, *model.sample_shape)


@pytest.mark.parametrize("kind, compute_dtype, remat", [("sd", "float32", False), ("sd", "bfloat16", True),
                                                         # ~3 min alone (7 beside a benchmark): slow suite
                                                         pytest.param("sdxl", "float32", False,
                                                                      marks=pytest.mark.slow)])
def test_the_benchmark_harness_runs_on_a_stable_diffusion_folder(kind, compute_dtype, remat, tmp_path, monkeypatch,
                                                                  request):
    """Shots and held-out photos go to the UNet as VAE latents (SDXL: with its pooled embedding and size ids, the
    DreamBooth prior set too), judges and grids see the photos, samples are decoded; the methods that need photos or
    one-token words refuse by name. Also with the full-scale settings (bf16 UNet activations, rematerialised
    blocks): the harness builds its base from ``config.base`` as meta-training does."""
    from PIL import Image

    from configs import meta_phd_tiny
    from metalora.data import builders
    from metalora.eval import benchmark
    from metalora.eval import harness as H
    from metalora.eval import methods as methods_lib
    from metalora.meta.inner import diffusion_example_loss
    from metalora.meta.personalize import attach_adapters, lora_config, save_meta_down

    folder, _, (model, params) = request.getfixturevalue(kind)
    config = meta_phd_tiny.get_config("smoke")
    config.base.path = str(folder)
    builder = builders.prepare(builders.track_builder(config.data, resolution=model.image_resolution))
    tests = benchmark.choose_tests(config, builders.data_source(builder, "test", decode_images=False))
    subjects = H.load_subjects(model, params["text_encoder"], builders.data_source(builder, "test"), tests,
                               max_heldout=2, vae_params=params["vae"])
    assert subjects.shots["images"].shape == (2, 1, *model.sample_shape)  # latents for the UNet
    assert subjects.shot_photos.shape == (2, 1, 32, 32, 3) and subjects.heldout_photos.shape == (2, 2, 32, 32, 3)
    np.testing.assert_allclose(subjects.heldout["images"], bm.encode_images(model, params, subjects.heldout_photos),
                               atol=1e-5)

    _, _, meta, _ = attach_adapters(model, params, lora_config("meta_lora", rank=4, mid_rank=4), jax.random.key(3))
    save_meta_down(tmp_path / "meta_down", meta, {"test": True})
    config.methods = ("meta_lora", "dreambooth")  # dreambooth with prior images: base samples, VAE-encoded
    config.sample.at = "final"
    config.method.meta_lora.meta_down = str(tmp_path / "meta_down")
    config.probes = "r32"  # the tiny SD draws 32 px images, the probes' size
    config.base.compute_dtype, config.base.remat = compute_dtype, remat
    loaded, load_base = [], bm.load_base
    monkeypatch.setattr(bm, "load_base", lambda *a, **k: loaded.append(load_base(*a, **k)) or loaded[-1])
    out = benchmark.run(config, tmp_path / "bench", log=lambda s: None)
    assert [(m.compute_dtype, m.remat) for m, _ in loaded] == [(compute_dtype, remat)]
    records = out["records"]
    assert {r["method"] for r in records} == set(config.methods)
    assert all(np.isfinite(r["heldout_loss"]) for r in records)
    final = [r for r in records if r["step"] == max(config.adapt.eval_steps)]
    assert len(final) == 4 and all(np.isfinite(r["r_face_sim"]) and "prompt_alignment" in r for r in final)
    first = tests[0].identity
    at_start = {r["method"]: r["heldout_loss"] for r in records if r["step"] == 0 and r["identity"] == first}
    # Every method starts as the base: to 1e-6 in float32; in bf16 the adapter-injected graphs round differently
    # (1e-5 of 1.22 measured).
    tolerance = 1e-6 if compute_dtype == "float32" else 1e-3 * min(at_start.values())
    assert max(at_start.values()) - min(at_start.values()) < tolerance
    grid = np.asarray(Image.open(out["plots"]["grid"]))
    assert grid.shape[1] >= 32 * (2 + 2)  # reference, held-out photo, one sample per prompt: 32 px, not 16 px latents

    if kind == "sdxl":
        assert {"text_embeds", "time_ids"} <= set(subjects.shots) and {"text_embeds", "time_ids"} <= set(
            subjects.heldout)
        return  # its token-method refusals: test_token_methods_refuse_an_sdxl_base_by_name
    loss = diffusion_example_loss(model.schedule)
    with pytest.raises(ValueError, match="'person' is 6 tokens"):  # the tiny BPE vocabulary spells it in pieces
        methods_lib.textual_inversion_method(model, params, loss)
    with pytest.raises(ValueError, match="stacked_id runs on pixel-space bases"):
        methods_lib.stacked_id_method(model, params, tmp_path)


def test_the_sd15_config_runs_meta_train_and_adapt_in_bf16_with_remat(sd, tmp_path):
    """configs/meta_lora_sd15.py at its test size: the full-scale settings (bf16 UNet activations, rematerialised
    blocks, a pool of joint heads, min-SNR) on a tiny SD folder; parameters and the saved D stay float32."""
    from safetensors.numpy import load_file

    from configs import meta_lora_sd15
    from experiments import adapt, meta_train
    from metalora.meta.personalize import META_DOWN_FILE

    folder, _, _ = sd
    config = meta_lora_sd15.get_config("tiny")
    config.base.path = str(folder)
    model, params = meta_train.load_base(config)
    assert (model.compute_dtype, model.remat) == ("bfloat16", True)
    assert model.unet(params).dtype == jnp.bfloat16
    assert {x.dtype for x in jax.tree.leaves(params["unet"])} == {jnp.dtype(jnp.float32)}
    trained = meta_train.main(config, tmp_path)
    assert trained["finished"] and np.isfinite(trained["final_metrics"]["train/loss"])
    saved = load_file(f"{trained['meta_down']}/{META_DOWN_FILE}")
    assert saved and {x.dtype for x in saved.values()} == {np.dtype(np.float32)}
    adapted = adapt.main(config, tmp_path)
    assert np.isfinite(adapted["heldout_loss_after"]).all() and len(adapted["exports"]) == 2


@pytest.mark.parametrize("name, counts, heads, gigabytes", [
    ("sd15", (859_520_964, 397_824, 1_605_632), 64, 1.23),
    # ~90 s to trace the abstract 2.6 B-parameter UNet with 560 adapters on 2 cores: in the slow suite
    pytest.param("sdxl", (2_567_463_684, 3_143_680, 10_685_440), 16, 2.05, marks=pytest.mark.slow),
])
def test_the_full_scale_configs_head_table_arithmetic(name, counts, heads, gigabytes):
    """The numbers in configs/meta_lora_sd15.py's and meta_lora_sdxl.py's docstrings, recounted on the abstract
    UNets: base, D and one identity's head; the pool of heads in float32 with Adam's two moments."""
    import importlib

    from flax import nnx

    from configs.sd_unets import UNETS
    from experiments.meta_train import adapter_config
    from metalora.lora import inject, split_roles
    from metalora.models.unet import UNet2DConditionModel, UNetConfig

    config = importlib.import_module(f"configs.meta_lora_{name}").get_config("")

    def build():
        unet = UNet2DConditionModel(UNetConfig.from_diffusers(UNETS[name]), rngs=nnx.Rngs(0))
        inject(unet, adapter_config(config), key=jax.random.key(0))
        return unet

    _, base, meta, head = split_roles(nnx.eval_shape(build))
    count = lambda state: sum(x.size for x in jax.tree.leaves(state))
    assert (count(base), count(meta), count(head)) == counts
    assert config.meta.num_heads == heads and round(heads * 12 * count(head) / 1e9, 2) == gigabytes
