"""Stable Diffusion (1.x / 2.x) and SDXL text-to-image pipelines assembled from a diffusers folder, in JAX.

``load_pipeline(path)`` reads ``model_index.json`` and builds our NNX UNet, CLIP text encoder(s), VAE,
transformers tokenizer(s) and the noise schedule from the folder's safetensors and configs (no torch).
``Pipeline.sample(prompts, ...)`` then runs what diffusers' ``StableDiffusionPipeline`` /
``StableDiffusionXLPipeline.__call__`` runs, with DDIM as the sampler:

1. prompt encoding (``encode_prompt``), reproducing diffusers' choices exactly, quirks included:

   * SD-1.x/2.x: the encoder's last hidden state (after ``final_layer_norm``); with ``clip_skip=k``,
     ``final_layer_norm(hidden_states[-(k + 1)])``. The *negative* prompt ignores ``clip_skip`` (diffusers does).
   * SDXL: ``hidden_states[-2]`` (penultimate, no final norm; ``[-(k + 2)]`` with ``clip_skip=k``) of both
     encoders concatenated on the feature axis; the pooled ``text_embeds`` of the projection encoder; with no
     negative prompt and ``force_zeros_for_empty_prompt`` the unconditional inputs are zeros, not "" encoded.
2. SDXL micro-conditioning ``time_ids = (orig_h, orig_w, crop_top, crop_left, target_h, target_w)``, the same
   for the conditional and unconditional halves;
3. DDIM from x_T (``metalora.diffusion.ddim_sample``) with classifier-free guidance on a concatenated
   [uncond; cond] batch whenever ``guidance_scale > 1``;
4. VAE decoding of the unscaled latents, mapped from [-1, 1] to [0, 1] and clipped.

The UNet is evaluated through one ``model_fn(params, x, t, cond)`` per pipeline (a ``functools.partial`` over
its graph definition), so every ``sample`` call with the same shapes reuses the compiled sampler, and
``params`` may be any state of the same structure (EMA weights, LoRA-merged weights). ``cond`` is a dict:
``encoder_hidden_states`` (B, L, D), and for SDXL ``text_embeds`` (B, P) and ``time_ids`` (B, 6).

The sampler is always DDIM on the schedule of the folder's ``scheduler_config.json`` (diffusers'
``DDIMScheduler.from_config(pipe.scheduler.config)``), whichever scheduler class the folder names; its
sampling-only options (PNDM's ``skip_prk_steps``, Euler's sigma options at neutral values) do not matter.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from metalora.compiler import jit
from metalora.diffusion import NoiseSchedule, ddim_sample, initial_noise, load_scheduler_config, repeat_for_seeds
from metalora.models import convert
from metalora.models.clip import CLIPTextModel, CLIPTextModelWithProjection, load_clip_text_model
from metalora.models.loading import load_unet
from metalora.models.tokenizers import HFCLIPTokenizer
from metalora.models.unet import UNet2DConditionModel, added_conditions, sdxl_time_ids
from metalora.models.vae import AutoencoderKL, decode_to_unit_range, latent_cache, load_vae

log = logging.getLogger(__name__)

SD = "StableDiffusionPipeline"
SDXL = "StableDiffusionXLPipeline"

_TOKENIZER_CLASSES = ("CLIPTokenizer", "CLIPTokenizerFast")
# component name -> the classes we build for it, per pipeline class.
_COMPONENTS: dict[str, dict[str, tuple[str, ...]]] = {
    SD: {
        "unet": ("UNet2DConditionModel",),
        "vae": ("AutoencoderKL",),
        "text_encoder": ("CLIPTextModel",),
        "tokenizer": _TOKENIZER_CLASSES,
        "scheduler": (),  # any discrete scheduler: its config is validated field by field
    },
    SDXL: {
        "unet": ("UNet2DConditionModel",),
        "vae": ("AutoencoderKL",),
        "text_encoder": ("CLIPTextModel",),
        "text_encoder_2": ("CLIPTextModelWithProjection",),
        "tokenizer": _TOKENIZER_CLASSES,
        "tokenizer_2": _TOKENIZER_CLASSES,
        "scheduler": (),
    },
}
# Components that do not take part in text-to-image sampling: skipped (and logged) when present.
_SKIPPED = {
    "safety_checker": "the NSFW image classifier is not part of sampling",
    "feature_extractor": "it only prepares images for the safety checker / IP-adapter",
    "image_encoder": "IP-adapter image prompts are not supported",
}


class PipelineConfigError(ValueError):
    """A pipeline folder asks for something we do not build; the message names the file, component and class."""


# ------------------------------------------------------------------------------------------------------------
# Pure functions (jitted; graph definitions are static, weights traced)
# ------------------------------------------------------------------------------------------------------------


def unet_apply(graphdef: nnx.GraphDef, params: nnx.State, x: jax.Array, t: jax.Array,
               cond: Mapping[str, jax.Array]) -> jax.Array:
    """The sampler's ``model_fn``: NHWC latents, (B,) timesteps and a cond dict → the UNet's prediction."""
    unet = nnx.merge(graphdef, params)
    return unet(x, t, cond["encoder_hidden_states"], added_cond_kwargs=added_conditions(cond))


@functools.partial(jit, static_argnames=("graphdef", "layer", "final_norm"))
def _text_features(state: nnx.State, input_ids: jax.Array, *, graphdef: nnx.GraphDef, layer: int | None,
                   final_norm: bool) -> tuple[jax.Array, jax.Array]:
    """(hidden states fed to the UNet, pooled output): ``last_hidden_state`` when ``layer`` is None, else
    ``hidden_states[layer]``, optionally through ``final_layer_norm``. Pooled is ``text_embeds`` when the
    encoder has a projection."""
    encoder = nnx.merge(graphdef, state)
    out = encoder(input_ids)
    if layer is None:
        hidden = out.last_hidden_state
    else:
        hidden = out.hidden_states[layer]
        if final_norm:
            hidden = encoder.text_model.final_layer_norm(hidden)
    pooled = out.text_embeds if out.text_embeds is not None else out.pooled_output
    return hidden, pooled


@functools.partial(jit, static_argnames=("graphdef",))
def _decode_to_unit_range(state: nnx.State, latents: jax.Array, *, graphdef: nnx.GraphDef) -> jax.Array:
    """Scaled latents → images in [0, 1] (diffusers' ``VaeImageProcessor.postprocess`` denormalisation)."""
    return decode_to_unit_range(nnx.merge(graphdef, state), latents)


def to_uint8(images: np.ndarray | jax.Array) -> np.ndarray:
    """Float images in [0, 1] → uint8 [0, 255], rounding as diffusers' ``numpy_to_pil`` does."""
    return np.round(np.clip(np.asarray(images, np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)


def per_image_keys(seed: int, num_images: int) -> jax.Array:
    """One PRNG key per image, ``fold_in(key(seed), i)``: image i's noise does not depend on the batch size."""
    base = jax.random.key(int(seed))
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(num_images))


def _as_list(texts: str | Sequence[str], name: str) -> list[str]:
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise ValueError(f"{name} is empty")
    bad = [t for t in texts if not isinstance(t, str)]
    if bad:
        raise TypeError(f"{name} must be strings, got {type(bad[0]).__name__}: {bad[0]!r}")
    return texts


# ------------------------------------------------------------------------------------------------------------
# The pipeline
# ------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Pipeline:
    """The models of a Stable Diffusion folder and the functions that sample with them.

    Attributes:
      pipeline_class: ``"StableDiffusionPipeline"`` or ``"StableDiffusionXLPipeline"``.
      unet, vae: our NNX models.
      text_encoders, tokenizers: one (SD) or two (SDXL) of each, in diffusers' order.
      schedule: the training noise schedule (DDIM samples on it).
      default_size: (height, width) in pixels when ``sample`` is given none (UNet ``sample_size`` × VAE factor).
      force_zeros_for_empty_prompt: SDXL's pipeline option (``model_index.json``).
      skipped_components: names of folder components not built (safety checker, ...).
    """

    pipeline_class: str
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoders: tuple[CLIPTextModel | CLIPTextModelWithProjection, ...]
    tokenizers: tuple[HFCLIPTokenizer, ...]
    schedule: NoiseSchedule
    default_size: tuple[int, int]
    force_zeros_for_empty_prompt: bool = False
    skipped_components: tuple[str, ...] = ()
    model_fn: Any = dataclasses.field(init=False, repr=False)

    def __post_init__(self):
        if self.pipeline_class not in _COMPONENTS:
            raise PipelineConfigError(f"pipeline_class={self.pipeline_class!r}; supported: {sorted(_COMPONENTS)}")
        if len(self.text_encoders) != len(self.tokenizers):
            raise ValueError(f"{len(self.text_encoders)} text encoders but {len(self.tokenizers)} tokenizers")
        # Built once: jit keys the sampler's static model_fn by identity, so every call reuses the compile.
        object.__setattr__(self, "model_fn", functools.partial(unet_apply, nnx.graphdef(self.unet)))

    @property
    def is_xl(self) -> bool:
        return self.pipeline_class == SDXL

    @property
    def vae_scale_factor(self) -> int:
        return self.vae.config.downsample_factor

    @property
    def latent_channels(self) -> int:
        return self.unet.config.in_channels

    def unet_params(self) -> nnx.State:
        """The UNet's current state: what ``model_fn`` takes as ``params`` (replace it with same-structured
        weights, e.g. EMA or LoRA-merged, to sample them without recompiling)."""
        return nnx.state(self.unet)

    # -- text -------------------------------------------------------------------------------------------------

    def _encode(self, texts: list[str], clip_skip: int | None) -> dict[str, jax.Array]:
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders, strict=True):
            if self.is_xl:  # SDXL always counts from the penultimate layer and applies no final norm
                layer, final_norm = -((clip_skip or 0) + 2), False
            else:
                layer, final_norm = (None if clip_skip is None else -(clip_skip + 1)), True
            h, p = _text_features(nnx.state(encoder), jnp.asarray(tokenizer.tokenize(texts)),
                                  graphdef=nnx.graphdef(encoder), layer=layer, final_norm=final_norm)
            hidden.append(h)
            # diffusers keeps the first 2-D first output, i.e. the projection encoder's text_embeds.
            if pooled is None and isinstance(encoder, CLIPTextModelWithProjection):
                pooled = p
        cond = {"encoder_hidden_states": jnp.concatenate(hidden, axis=-1)}
        if self.is_xl:
            cond["text_embeds"] = pooled
        return cond

    def encode_prompt(self, prompts: str | Sequence[str], negative_prompts: str | Sequence[str] | None = None, *,
                      guidance: bool = True, clip_skip: int | None = None
                      ) -> tuple[dict[str, jax.Array], dict[str, jax.Array] | None]:
        """diffusers' ``encode_prompt`` (one image per prompt): returns (cond, uncond) dicts with
        ``encoder_hidden_states`` (B, L, D) and, for SDXL, pooled ``text_embeds`` (B, P); ``uncond`` is None
        without ``guidance``. ``time_ids`` are size-dependent: see ``time_ids``.

        A string negative prompt applies to every prompt; a list must match ``prompts`` in length.
        """
        prompts = _as_list(prompts, "prompts")
        if clip_skip is not None and clip_skip < 0:
            raise ValueError(f"clip_skip must be ≥ 0, got {clip_skip}")
        cond = self._encode(prompts, clip_skip)
        if not guidance:
            return cond, None
        if negative_prompts is None and self.is_xl and self.force_zeros_for_empty_prompt:
            return cond, jax.tree.map(jnp.zeros_like, cond)
        if negative_prompts is None:
            negatives = [""] * len(prompts)
        elif isinstance(negative_prompts, str):
            negatives = [negative_prompts] * len(prompts)
        else:
            negatives = _as_list(negative_prompts, "negative_prompts")
            if len(negatives) != len(prompts):
                raise ValueError(f"negative_prompts has {len(negatives)} entries but prompts has {len(prompts)}")
        # diffusers encodes the negative prompt without clip_skip, for SD and SDXL alike.
        return cond, self._encode(negatives, None)

    def time_ids(self, batch: int, *, original_size: tuple[int, int], target_size: tuple[int, int],
                 crops_coords_top_left: tuple[int, int] = (0, 0), dtype=jnp.float32) -> jax.Array:
        """SDXL micro-conditioning (B, 6): (orig_h, orig_w, crop_top, crop_left, target_h, target_w)."""
        return sdxl_time_ids(batch, original_size=original_size, target_size=target_size,
                             crops_coords_top_left=crops_coords_top_left, dtype=dtype)

    # -- images -----------------------------------------------------------------------------------------------

    def decode(self, latents: jax.Array) -> np.ndarray:
        """Scaled latents (B, h, w, C) → float32 images (B, H, W, 3) in [0, 1]."""
        return np.asarray(_decode_to_unit_range(nnx.state(self.vae), jnp.asarray(latents),
                                                graphdef=nnx.graphdef(self.vae)))

    def sample(self, prompts: str | Sequence[str], *, negative_prompts: str | Sequence[str] | None = None,
               num_inference_steps: int = 25, guidance_scale: float = 7.5, eta: float = 0.0,
               num_images_per_prompt: int = 1, seed: int = 0, keys: jax.Array | None = None,
               latents: jax.Array | np.ndarray | None = None, height: int | None = None, width: int | None = None,
               clip_skip: int | None = None, original_size: tuple[int, int] | None = None,
               crops_coords_top_left: tuple[int, int] = (0, 0), target_size: tuple[int, int] | None = None,
               unet_params: nnx.State | None = None, output: str = "images") -> np.ndarray:
        """Text-to-image with DDIM, as diffusers' pipelines with a ``DDIMScheduler``.

        Images are ordered prompt-major (p0 s0, p0 s1, ..., p1 s0, ...), ``len(prompts) * num_images_per_prompt``
        of them. Randomness: image i starts from ``initial_noise(keys[i])`` with ``keys`` defaulting to
        ``per_image_keys(seed, n)``; ``latents`` (n, h, w, C) NHWC overrides the starting noise (diffusers'
        ``latents=`` in NCHW, transposed). ``eta > 0`` draws the per-step noise from ``keys``.

        Args:
          original_size / target_size / crops_coords_top_left: SDXL micro-conditioning; sizes default to
            (height, width).
          unet_params: weights to sample with instead of the UNet's own (same structure, e.g. EMA / merged LoRA).
          output: ``"images"`` → float32 (n, H, W, 3) in [0, 1] (``to_uint8`` for PNGs); ``"latents"`` → the
            final scaled latents (n, h, w, C) without decoding.
        """
        if output not in ("images", "latents"):
            raise ValueError(f"output must be 'images' or 'latents', got {output!r}")
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be ≥ 1, got {num_images_per_prompt}")
        prompts = _as_list(prompts, "prompts")
        height, width = height or self.default_size[0], width or self.default_size[1]
        f = self.vae_scale_factor
        if height % f or width % f:
            raise ValueError(f"height={height} and width={width} must be multiples of the VAE factor {f}")
        n = len(prompts) * num_images_per_prompt
        guidance = float(guidance_scale) > 1.0  # diffusers' do_classifier_free_guidance
        cond, uncond = self.encode_prompt(prompts, negative_prompts, guidance=guidance, clip_skip=clip_skip)
        if self.is_xl:
            # float32 whatever the compute dtype: bfloat16 cannot hold sizes like 1016 exactly.
            ids = self.time_ids(len(prompts), original_size=tuple(original_size or (height, width)),
                                target_size=tuple(target_size or (height, width)),
                                crops_coords_top_left=tuple(crops_coords_top_left))
            cond = {**cond, "time_ids": ids}
            uncond = None if uncond is None else {**uncond, "time_ids": ids}
        cond = repeat_for_seeds(cond, num_images_per_prompt)
        uncond = None if uncond is None else repeat_for_seeds(uncond, num_images_per_prompt)

        if keys is None:
            keys = per_image_keys(seed, n)
        elif jnp.shape(keys)[0] != n:
            raise ValueError(f"keys has {jnp.shape(keys)[0]} rows but {n} images are sampled")
        shape = (height // f, width // f, self.latent_channels)
        if latents is None:
            noise = initial_noise(keys, shape)  # DDIM's init_noise_sigma is 1
        else:
            noise = jnp.asarray(latents, jnp.float32)
            if noise.shape != (n, *shape):
                raise ValueError(f"latents has shape {noise.shape}, expected (n, h, w, C) = {(n, *shape)} (NHWC)")
        params = self.unet_params() if unet_params is None else unet_params
        x0 = ddim_sample(self.model_fn, params, self.schedule, noise, cond, uncond,
                         num_inference_steps=int(num_inference_steps), guidance_scale=guidance_scale, eta=eta,
                         keys=keys)
        if output == "latents":
            return np.asarray(x0)
        return self.decode(x0)

    def cache_training_inputs(self, images: np.ndarray, captions: Sequence[str], *, key: jax.Array | None = None,
                              batch_size: int = 16) -> dict[str, np.ndarray]:
        """Everything a train step needs besides the UNet, computed once (``vae.latent_cache`` + ``encode_prompt``).

        Args:
          images: (N, H, W, 3) uint8, or float in [-1, 1].
          captions: N strings.
          key: sample each latent from the VAE posterior (one ``fold_in`` per image) instead of taking its mean.

        Returns:
          float32 numpy arrays with leading axis N: ``latents`` (scaled, NHWC) and the cond dict's entries
          (``encoder_hidden_states``; for SDXL also ``text_embeds`` and ``time_ids`` = full image, no crop).
        """
        captions = _as_list(captions, "captions")
        if len(captions) != len(images):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        out = {"latents": latent_cache(self.vae, images, key=key, batch_size=batch_size)}
        padded = captions + [""] * (-len(captions) % batch_size)  # one batch shape, one compile
        chunks = [self.encode_prompt(padded[i:i + batch_size], guidance=False)[0]
                  for i in range(0, len(padded), batch_size)]
        for name in chunks[0]:
            out[name] = np.concatenate([np.asarray(c[name], np.float32) for c in chunks])[:len(captions)]
        if self.is_xl:
            size = tuple(np.shape(images)[1:3])
            out["time_ids"] = np.asarray(self.time_ids(len(captions), original_size=size, target_size=size))
        return out

    def with_unet(self, unet: UNet2DConditionModel) -> Pipeline:
        """The same pipeline around another UNet (e.g. one with LoRA adapters); builds a new ``model_fn``."""
        return dataclasses.replace(self, unet=unet)


# ------------------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------------------


def read_model_index(path: str | pathlib.Path) -> tuple[str, dict[str, str], dict[str, Any], tuple[str, ...]]:
    """Checks ``model_index.json`` against what we build.

    Returns (pipeline class, {component: class} to build, pipeline options, skipped component names).
    Components listed as ``[null, null]`` are absent. Unknown or unsupported components raise
    ``PipelineConfigError`` naming the component and its class.
    """
    index_path = pathlib.Path(path) / "model_index.json"
    if not index_path.is_file():
        raise FileNotFoundError(f"{index_path} not found: expected a diffusers pipeline folder")
    try:
        index = json.loads(index_path.read_text())
    except json.JSONDecodeError as err:
        raise PipelineConfigError(f"{index_path}: not valid JSON ({err})") from None
    pipeline_class = index.get("_class_name")
    if pipeline_class not in _COMPONENTS:
        raise PipelineConfigError(f"{index_path}: _class_name={pipeline_class!r} is not supported; supported "
                                  f"pipelines: {sorted(_COMPONENTS)}")
    wanted = _COMPONENTS[pipeline_class]
    components, options, skipped = {}, {}, []
    for name, value in index.items():
        if name.startswith("_"):
            continue
        if not (isinstance(value, list) and len(value) == 2):
            options[name] = value  # pipeline config, e.g. requires_safety_checker, force_zeros_for_empty_prompt
            continue
        library, class_name = value
        if class_name is None:
            continue
        if name in _SKIPPED:
            log.info("%s: skipping component %r (%s): %s", index_path, name, class_name, _SKIPPED[name])
            skipped.append(name)
            continue
        if name not in wanted:
            raise PipelineConfigError(f"{index_path}: component {name!r} ({library}.{class_name}) is not part of "
                                      f"{pipeline_class} as metalora builds it (components: {sorted(wanted)})")
        allowed = wanted[name]
        if allowed and class_name not in allowed:
            raise PipelineConfigError(f"{index_path}: component {name!r} has class {class_name!r}, which metalora "
                                      f"does not build (supported: {list(allowed)})")
        if name == "scheduler" and "FlowMatch" in class_name:
            raise PipelineConfigError(f"{index_path}: component 'scheduler' has class {class_name!r}: a "
                                      "flow-matching schedule does not fit a Stable Diffusion UNet pipeline")
        components[name] = class_name
    missing = sorted(set(wanted) - set(components))
    if missing:
        raise PipelineConfigError(f"{index_path}: {pipeline_class} needs components {missing}, which are absent")
    return pipeline_class, components, options, tuple(skipped)


def _load_tokenizer(folder: pathlib.Path) -> HFCLIPTokenizer:
    """SD folders ship ``vocab.json``/``merges.txt``; transformers ≥ 5 saves only ``tokenizer.json``."""
    if (folder / "vocab.json").is_file():
        return HFCLIPTokenizer.from_folder(folder)
    if not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{folder} is not a CLIP tokenizer folder: no vocab.json/merges.txt or tokenizer.json")
    from transformers import CLIPTokenizer  # deferred: slow to import, only needed here

    return HFCLIPTokenizer(CLIPTokenizer.from_pretrained(str(folder)))


def _default_size(unet_folder: pathlib.Path, vae_factor: int) -> tuple[int, int]:
    sample_size = convert.load_config(unet_folder).get("sample_size", 64)
    h, w = (sample_size, sample_size) if isinstance(sample_size, int) else tuple(sample_size)
    return int(h) * vae_factor, int(w) * vae_factor


def _check_compatible(path: pathlib.Path, pipeline_class: str, unet: UNet2DConditionModel,
                      encoders: Sequence[nnx.Module], tokenizers: Sequence[HFCLIPTokenizer], vae: AutoencoderKL,
                      names: Sequence[str]) -> None:
    """Shape contracts between the components, checked at load time so a mismatch names the config fields."""
    config = unet.config
    text_dim = sum(e.config.hidden_size for e in encoders)
    cross = set(config.per_block("cross_attention_dim"))
    if cross != {text_dim}:
        raise PipelineConfigError(
            f"{path}: unet cross_attention_dim={config.cross_attention_dim} but the text encoders "
            f"({', '.join(names)}) give hidden size {text_dim}")
    for name, encoder, tokenizer in zip(names, encoders, tokenizers, strict=True):
        if tokenizer.max_length > encoder.config.max_position_embeddings:
            raise PipelineConfigError(
                f"{path}: tokenizer of {name} pads to {tokenizer.max_length} tokens but {name} has "
                f"max_position_embeddings={encoder.config.max_position_embeddings}")
    if vae.config.latent_channels != config.in_channels or config.out_channels != config.in_channels:
        raise PipelineConfigError(
            f"{path}: vae latent_channels={vae.config.latent_channels} but unet in_channels={config.in_channels}, "
            f"out_channels={config.out_channels}")
    is_xl_unet = config.addition_embed_type == "text_time"
    if is_xl_unet != (pipeline_class == SDXL):
        raise PipelineConfigError(
            f"{path}: {pipeline_class} with a unet whose addition_embed_type={config.addition_embed_type!r}")
    if is_xl_unet:
        projection = encoders[-1].config.projection_dim
        expected = 6 * config.addition_time_embed_dim + projection
        if config.projection_class_embeddings_input_dim != expected:
            raise PipelineConfigError(
                f"{path}: unet projection_class_embeddings_input_dim={config.projection_class_embeddings_input_dim}"
                f" but 6 × addition_time_embed_dim ({config.addition_time_embed_dim}) + text_encoder_2 "
                f"projection_dim ({projection}) = {expected}")


def load_pipeline(path: str | pathlib.Path, *, dtype=jnp.float32, param_dtype=jnp.float32,
                  attention_backend: str = "auto") -> Pipeline:
    """Builds a ``Pipeline`` from a diffusers ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` folder.

    Only safetensors are read. ``dtype`` is the compute dtype of UNet and text encoders (the VAE is kept in
    float32 when its config says ``force_upcast``, as diffusers does); ``param_dtype`` the storage dtype.
    """
    path = pathlib.Path(path)
    pipeline_class, components, options, skipped = read_model_index(path)
    unet = load_unet(path / "unet", dtype=dtype, param_dtype=param_dtype, attention_backend=attention_backend)
    vae = load_vae(path / "vae", dtype=dtype, param_dtype=param_dtype, attention_backend=attention_backend)
    names = ("text_encoder", "text_encoder_2") if pipeline_class == SDXL else ("text_encoder",)
    encoders = tuple(load_clip_text_model(path / name, dtype=dtype, param_dtype=param_dtype,
                                          with_projection=components[name] == "CLIPTextModelWithProjection")
                     for name in names)
    tokenizers = tuple(_load_tokenizer(path / name.replace("text_encoder", "tokenizer")) for name in names)
    _check_compatible(path, pipeline_class, unet, encoders, tokenizers, vae, names)
    scheduler_file = path / "scheduler" / "scheduler_config.json"
    schedule = NoiseSchedule.from_config(load_scheduler_config(scheduler_file),
                                         source=f"{scheduler_file} ({components['scheduler']})")
    return Pipeline(
        pipeline_class=pipeline_class, unet=unet, vae=vae, text_encoders=encoders, tokenizers=tokenizers,
        schedule=schedule, default_size=_default_size(path / "unet", vae.config.downsample_factor),
        # diffusers' SDXL default is True; SD pipelines have no such option.
        force_zeros_for_empty_prompt=bool(options.get("force_zeros_for_empty_prompt", pipeline_class == SDXL)),
        skipped_components=skipped)


__all__ = [
    "SD",
    "SDXL",
    "Pipeline",
    "PipelineConfigError",
    "load_pipeline",
    "per_image_keys",
    "read_model_index",
    "to_uint8",
    "unet_apply",
]
