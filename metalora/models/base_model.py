"""The procedural world's text-to-image base model: the stand-in for Stable Diffusion.

It is SD's recipe at toy scale, through the same code paths: our ``UNet2DConditionModel`` (a small config, pixel
space 32×32×3 instead of VAE latents), a small CLIP text transformer (``metalora.models.clip``), a word-level
tokenizer over the caption grammar with reserved identifier tokens (``sks`` ...), and a DDIM-compatible noise
schedule. The text encoder is trained jointly with the UNet during base pretraining and frozen afterwards, as SD's
CLIP is frozen under personalization.

The model is split the JAX way:

* ``BaseModel`` is the *static* half (graph definitions, tokenizer, schedule, resolution). It is hashable by
  identity and used as a static jit argument; its ``unet_fn`` is created once so samplers compile once.
* ``BaseParams = {"unet": nnx.State, "text_encoder": nnx.State}`` is the weights pytree.

Pure functions on top: ``encode_text``, ``denoise``, ``base_loss`` (the pretraining loss, with caption dropout
for classifier-free guidance) and ``sample`` / ``sample_from_ids`` (DDIM with CFG).

On disk a base model is a diffusers-style pipeline folder, so our SD loaders read its parts::

    model_index.json                    {"_class_name": "MetaloraBaseModel", "format": ..., "resolution": 32, ...}
    unet/config.json                    diffusers UNet2DConditionModel config
    unet/diffusion_pytorch_model.safetensors
    text_encoder/config.json            transformers CLIPTextModel config
    text_encoder/model.safetensors
    tokenizer/word_tokenizer.json       ``WordTokenizer`` vocabulary (ids must not shift)
    scheduler/scheduler_config.json     diffusers DDIMScheduler config
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from metalora.compiler import jit
from metalora.data import world
from metalora.diffusion import (
    NoiseSchedule,
    add_noise,
    ddim_sample,
    diffusion_loss,
    initial_noise,
    loss_weights,
    per_example_mse,
    training_noise,
    training_target,
)
from metalora.models import convert
from metalora.models.clip import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    load_clip_text_model,
    small_clip_config,
)
from metalora.models.loading import load_unet
from metalora.models.tokenizers import DEFAULT_RARE_TOKENS, TokenizerPair, WordTokenizer
from metalora.models.unet import UNet2DConditionModel, UNetConfig, added_conditions, sdxl_time_ids
from metalora.models.vae import AutoencoderKL, AutoencoderKLConfig, decode_to_unit_range, scaled_mean_latents
from metalora.train.io import atomic_write_bytes, atomic_write_text

__all__ = [
    "BASE_FORMAT",
    "DEFAULT_BASE_CHECKPOINT",
    "BaseModel",
    "BaseModelConfig",
    "BaseParams",
    "apply_unet",
    "base_loss",
    "decode_images",
    "denoise",
    "encode_images",
    "encode_prompt",
    "encode_text",
    "init_base_params",
    "load_base_model",
    "load_pixel_base",
    "load_stable_diffusion_base",
    "micro_conditioning",
    "sample",
    "sample_from_ids",
    "save_base_model",
    "tiny_unet_config",
    "to_unit_images",
    "token_embeddings",
    "unconditional_prompt",
    "world_tokenizer",
]

BASE_FORMAT = "metalora.BaseModel/1"
MODEL_INDEX = "model_index.json"
TOKENIZER_FILE = "tokenizer/word_tokenizer.json"
# The reproducible pretrained base kept in the repository (see its README for the command that made it).
DEFAULT_BASE_CHECKPOINT = pathlib.Path(__file__).resolve().parents[2] / "assets" / "base_tiny"

BaseParams = dict[str, Any]  # {"unet": nnx.State, "text_encoder": nnx.State[, "vae": nnx.State]}


# ----------------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------------


# The caption grammar's words plus the comma between its phrases (a token of its own).
WORLD_VOCABULARY = (*world.CAPTION_VOCABULARY, ",")


@functools.cache
def longest_world_caption() -> int:
    """Tokens (words and commas) of the longest caption ``world.make_caption`` can write, over every attribute
    combination (about 12k); the identifier form ``sks person`` has as many tokens as ``a person``."""
    import itertools

    unbounded = WordTokenizer(WORLD_VOCABULARY, max_length=1024)
    names = list(world.ATTRIBUTE_CLASSES)
    return max(len(unbounded.encode(world.make_caption(dict(zip(names, combo))))) - 2  # minus BOS/EOS
               for combo in itertools.product(*world.ATTRIBUTE_CLASSES.values()))


def world_tokenizer(max_length: int | None = None, rare_tokens: Sequence[str] = DEFAULT_RARE_TOKENS) -> WordTokenizer:
    """Word tokenizer over every caption the world can write (its words plus the comma between phrases).

    ``max_length=None``: the longest caption plus BOS/EOS, so no caption is ever cut or refused.
    """
    if max_length is None:
        max_length = longest_world_caption() + 2
    return WordTokenizer(WORLD_VOCABULARY, max_length=max_length, rare_tokens=rare_tokens)


def tiny_unet_config(
    *,
    block_out_channels: Sequence[int] = (32, 64, 64),
    layers_per_block: int = 1,
    cross_attention_dim: int = 128,
    attention_head_dim: int = 4,
    in_channels: int = 3,
    norm_num_groups: int = 32,
    pooled_text_heads: int = 0,
) -> UNetConfig:
    """SD's UNet at toy size for pixel-space images.

    No attention at full resolution (the first block is a plain ``DownBlock2D``/``UpBlock2D``): at 32×32 that would
    be 1024 tokens, while the lower levels (16×16 = 256, 8×8 = 64 tokens) and the mid block carry the cross-attention
    to the prompt at a fraction of the cost. ``cross_attention_dim`` must equal the text encoder's width.

    ``pooled_text_heads > 0`` also adds an attention-pooled summary of the prompt to the time embedding (diffusers'
    ``addition_embed_type="text"``, as in DeepFloyd IF / unCLIP), so every ResNet sees the prompt.
    """
    n = len(block_out_channels)
    if n < 2:
        raise ValueError(f"tiny_unet_config: block_out_channels needs >= 2 levels, got {tuple(block_out_channels)}")
    config = UNetConfig(
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=tuple(block_out_channels),
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        layers_per_block=layers_per_block,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=attention_head_dim,
        norm_num_groups=norm_num_groups,
        **({"addition_embed_type": "text", "addition_embed_type_num_heads": pooled_text_heads}
           if pooled_text_heads else {}),
    )
    config.validate()
    return config


@dataclasses.dataclass(frozen=True)
class BaseModelConfig:
    """Everything that defines the composite model (no weights). JSON round trip via ``to_dict``/``from_dict``."""

    resolution: int  # the UNet's sample size: pixels, or latents when there is a VAE
    unet: UNetConfig
    text_encoder: CLIPTextConfig
    tokenizer: Mapping[str, Any]  # WordTokenizer.to_dict(); {} when the model brings its own (a CLIP tokenizer)
    scheduler: Mapping[str, Any]  # NoiseSchedule.to_config()
    vae: AutoencoderKLConfig | None = None  # a latent-space model (Stable Diffusion); None: the UNet draws pixels
    # SDXL: the second text encoder (with projection: its pooled output is the UNet's ``text_embeds``); the UNet
    # attends to both encoders' hidden states side by side and reads micro-conditioning ``time_ids``.
    text_encoder_2: CLIPTextConfig | None = None
    zero_uncond: bool = False  # SDXL's force_zeros_for_empty_prompt: the unconditional branch is all zeros

    def __post_init__(self):
        text_width = self.text_encoder.hidden_size + (self.text_encoder_2.hidden_size if self.xl else 0)
        if self.unet.per_block("cross_attention_dim")[0] != text_width:
            raise ValueError(
                f"BaseModelConfig: unet.cross_attention_dim={self.unet.cross_attention_dim} must equal the text "
                f"encoders' hidden size ({text_width}; the UNet attends to their hidden states)"
            )
        if self.xl != (self.unet.addition_embed_type == "text_time"):
            raise ValueError("BaseModelConfig: a second text encoder goes with an SDXL UNet (addition_embed_type="
                             f"'text_time') and only with one; got addition_embed_type="
                             f"{self.unet.addition_embed_type!r} and {'a' if self.xl else 'no'} second text encoder")
        if self.unet.in_channels != self.unet.out_channels:
            raise ValueError("BaseModelConfig: the UNet must predict in its input space (in_channels == "
                             f"out_channels), got {self.unet.in_channels} → {self.unet.out_channels}")
        if self.vae is not None and self.vae.latent_channels != self.unet.in_channels:
            raise ValueError(f"BaseModelConfig: the VAE has {self.vae.latent_channels} latent channels but the UNet "
                             f"takes {self.unet.in_channels}")
        factor = 2 ** (len(self.unet.block_out_channels) - 1)
        if self.resolution % factor:
            raise ValueError(f"BaseModelConfig: resolution={self.resolution} is not divisible by {factor}, the UNet's "
                             "total downsampling")
        vocab = len(self.tokenizer.get("tokens", ()))
        if vocab and vocab != self.text_encoder.vocab_size:
            raise ValueError(f"BaseModelConfig: tokenizer has {vocab} tokens but text_encoder.vocab_size="
                             f"{self.text_encoder.vocab_size}")

    @property
    def xl(self) -> bool:
        return self.text_encoder_2 is not None

    @classmethod
    def create(cls, *, resolution: int = 32, unet: UNetConfig | None = None, text_hidden_size: int = 128,
               text_layers: int = 3, text_heads: int = 4, tokenizer: WordTokenizer | None = None,
               scheduler: Mapping[str, Any] | None = None) -> BaseModelConfig:
        """The small-world model: ``tiny_unet_config`` + ``small_clip_config`` sized to the tokenizer."""
        tokenizer = tokenizer or world_tokenizer()
        text = small_clip_config(tokenizer.vocab_size, tokenizer.max_length, hidden_size=text_hidden_size,
                                 num_hidden_layers=text_layers, num_attention_heads=text_heads,
                                 eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)
        unet = unet or tiny_unet_config(cross_attention_dim=text_hidden_size)
        scheduler = dict(scheduler) if scheduler is not None else default_scheduler_config()
        NoiseSchedule.from_config(scheduler)  # validate now, naming the bad field
        return cls(resolution=resolution, unet=unet, text_encoder=text, tokenizer=tokenizer.to_dict(),
                   scheduler=scheduler)


def default_scheduler_config() -> dict[str, Any]:
    """Cosine ᾱ (improved DDPM; the linear schedule wastes steps on nearly-clean 32 px images) with v-prediction,
    which stays well conditioned at both ends of the schedule."""
    return NoiseSchedule.create(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                                timestep_spacing="trailing", clip_sample=True).to_config()


# ----------------------------------------------------------------------------------------------------------------
# The static half
# ----------------------------------------------------------------------------------------------------------------


COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _build_unet(config: UNetConfig, key: jax.Array, attention_backend: str, compute_dtype: str = "float32",
                remat: bool = False) -> UNet2DConditionModel:
    return UNet2DConditionModel(config, rngs=nnx.Rngs(key), attention_backend=attention_backend,
                                dtype=COMPUTE_DTYPES[compute_dtype], param_dtype=jnp.float32, remat=remat)


def _build_text(config: CLIPTextConfig, key: jax.Array) -> CLIPTextModel:
    return CLIPTextModel(config, rngs=nnx.Rngs(key))


class BaseModel:
    """Graph definitions, tokenizer and schedule of a base model; weights are a separate ``BaseParams`` pytree.

    Hashable by identity: pass it as a static argument to ``jax.jit`` (build it once per run).
    """

    def __init__(self, config: BaseModelConfig, *, attention_backend: str = "auto", tokenizer: Any = None,
                 compute_dtype: str = "float32", remat: bool = False):
        """``tokenizer``: the model's own (``HFCLIPTokenizer`` of a Stable Diffusion folder); None builds the
        ``WordTokenizer`` of ``config.tokenizer``. ``compute_dtype`` (a ``COMPUTE_DTYPES`` name) is the UNet's
        activation dtype, its parameters stay float32; ``remat`` recomputes each UNet block's activations in the
        backward pass (full-scale training memory). The text encoder and VAE are frozen and run in float32."""
        if compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype {compute_dtype!r}: choose one of {sorted(COMPUTE_DTYPES)}")
        self.config = config
        self.compute_dtype, self.remat = compute_dtype, bool(remat)
        self.resolution = int(config.resolution)
        self.channels = int(config.unet.in_channels)
        self.tokenizer = tokenizer if tokenizer is not None else WordTokenizer.from_dict(dict(config.tokenizer))
        self.schedule = NoiseSchedule.from_config(config.scheduler, source="BaseModelConfig.scheduler")
        key = jax.random.key(0)
        self.unet_def = nnx.graphdef(nnx.eval_shape(
            lambda: _build_unet(config.unet, key, attention_backend, compute_dtype, remat)))
        self.text_def = nnx.graphdef(nnx.eval_shape(lambda: _build_text(config.text_encoder, key)))
        self.text_def_2 = None if config.text_encoder_2 is None else nnx.graphdef(nnx.eval_shape(
            lambda: CLIPTextModelWithProjection(config.text_encoder_2, rngs=nnx.Rngs(key))))
        self.vae_def = (None if config.vae is None else nnx.graphdef(nnx.eval_shape(
            lambda: AutoencoderKL(config.vae, attention_backend=attention_backend, rngs=nnx.Rngs(0)))))
        self.attention_backend = attention_backend
        # A sampler's model_fn is a static jit argument keyed by identity: make it once, here.
        self.unet_fn = functools.partial(apply_unet, self.unet_def)
        self.empty_ids = self.tokenizer.tokenize([""])[0]

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """What the UNet denoises: (H, W, C) pixels, or latents for a model with a VAE."""
        return (self.resolution, self.resolution, self.channels)

    @property
    def latent(self) -> bool:
        return self.vae_def is not None

    @property
    def xl(self) -> bool:
        """An SDXL base: two text encoders (``params["text_encoder"]`` holds both), pooled text and size ids."""
        return self.config.xl

    @property
    def image_resolution(self) -> int:
        """Side of the images the model is trained on and draws (the VAE's factor times ``resolution``)."""
        return self.resolution * (self.config.vae.downsample_factor if self.latent else 1)

    def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
        return self.tokenizer.tokenize(prompts)

    def unet(self, params: BaseParams) -> UNet2DConditionModel:
        """The UNet as an NNX module (e.g. to attach LoRA adapters to it)."""
        return nnx.merge(self.unet_def, params["unet"])

    def text_encoder(self, params: BaseParams) -> CLIPTextModel:
        if self.xl:
            raise ValueError("an SDXL base has two text encoders: params['text_encoder'] holds 'text_encoder' and "
                             "'text_encoder_2'")
        return nnx.merge(self.text_def, params["text_encoder"])

    def __repr__(self) -> str:
        u = self.config.unet
        return (f"BaseModel(resolution={self.resolution}, unet.block_out_channels={u.block_out_channels}, "
                f"text.hidden_size={self.config.text_encoder.hidden_size}, vocab={self.tokenizer.vocab_size})")


def init_base_params(model: BaseModel, key: jax.Array) -> BaseParams:
    """Fresh random weights (the initialisers of the UNet and CLIP modules)."""
    k_unet, k_text = jax.random.split(key)
    unet = _build_unet(model.config.unet, k_unet, model.attention_backend, model.compute_dtype, model.remat)
    text = _build_text(model.config.text_encoder, k_text)
    return {"unet": nnx.state(unet, nnx.Param), "text_encoder": nnx.state(text, nnx.Param)}


# ----------------------------------------------------------------------------------------------------------------
# Pure functions
# ----------------------------------------------------------------------------------------------------------------


def apply_unet(unet_def: nnx.GraphDef, unet_params: Any, x: jax.Array, t: jax.Array,
               context: jax.Array | Mapping[str, jax.Array]) -> jax.Array:
    """The UNet's prediction for NHWC ``x`` at timesteps ``t`` (a ModelFn once ``unet_def`` is bound). ``context``:
    text hidden states (B, L, D), or an ``encode_prompt`` dict (its ``context`` plus SDXL's added conditions)."""
    unet = nnx.merge(unet_def, unet_params)
    if isinstance(context, Mapping):
        return unet(x, t, context["context"], added_conditions(context))
    return unet(x, t, context)


def encode_text(model: BaseModel, text_params: Any, input_ids: jax.Array,
                inputs_embeds: jax.Array | None = None) -> jax.Array:
    """(B, L, D) prompt embeddings: the CLIP tower's ``last_hidden_state``, as SD-1.x conditions its UNet (SDXL:
    both towers' penultimate hidden states side by side, see ``encode_prompt``). ``inputs_embeds`` (B, L, D_token)
    replaces the token lookup (soft tokens; see ``token_embeddings``; one text encoder only)."""
    if model.xl:
        if inputs_embeds is not None:
            raise ValueError("encode_text: soft tokens (inputs_embeds) need one text encoder; an SDXL base has two")
        return _xl_text_features(model, text_params, input_ids)[0]
    tower = nnx.merge(model.text_def, text_params)
    return tower(jnp.asarray(input_ids, jnp.int32), inputs_embeds=inputs_embeds).last_hidden_state


def _xl_text_features(model: BaseModel, text_params: Any, input_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """SDXL's prompt features as its pipeline computes them: the penultimate hidden states of both encoders (no
    final norm) concatenated along features, and the second encoder's projected pooled output."""
    first, second = model.tokenizer.split(jnp.asarray(input_ids, jnp.int32))
    one = nnx.merge(model.text_def, text_params["text_encoder"])(first)
    two = nnx.merge(model.text_def_2, text_params["text_encoder_2"])(second)
    return jnp.concatenate([one.hidden_states[-2], two.hidden_states[-2]], axis=-1), two.text_embeds


def micro_conditioning(model: BaseModel, batch: int) -> jax.Array:
    """SDXL's ``time_ids`` (B, 6) for the base's own square images, uncropped: (H, W, 0, 0, H, W), what diffusers'
    SDXL pipeline passes by default and its training scripts record for an uncropped photo of that size."""
    size = (model.image_resolution, model.image_resolution)
    return sdxl_time_ids(batch, original_size=size, target_size=size)


def encode_prompt(model: BaseModel, text_params: Any, input_ids: jax.Array) -> dict[str, jax.Array]:
    """Everything the UNet reads of a prompt, as a dict: ``context`` (B, L, D) and, for an SDXL base, the added
    conditions ``text_embeds`` (B, P) and ``time_ids`` (B, 6) (``micro_conditioning``)."""
    if not model.xl:
        return {"context": encode_text(model, text_params, input_ids)}
    hidden, pooled = _xl_text_features(model, text_params, input_ids)
    return {"context": hidden, "text_embeds": pooled, "time_ids": micro_conditioning(model, hidden.shape[0])}


def unconditional_prompt(model: BaseModel, text_params: Any, batch: int) -> dict[str, jax.Array]:
    """The classifier-free guidance branch: the empty prompt encoded, or all zeros (size ids kept) for an SDXL
    base saved with ``force_zeros_for_empty_prompt``, as its pipeline does."""
    empty = jnp.broadcast_to(jnp.asarray(model.empty_ids)[None], (batch, model.empty_ids.shape[-1]))
    cond = encode_prompt(model, text_params, empty)
    if model.config.zero_uncond:
        return {k: v if k == "time_ids" else jnp.zeros_like(v) for k, v in cond.items()}
    return cond


def token_embeddings(model: BaseModel, text_params: Any, input_ids: jax.Array) -> jax.Array:
    """(..., D) rows of the text encoder's token table: what ``encode_text`` feeds its first layer for these ids."""
    return model.text_encoder({"text_encoder": text_params}).text_model.embeddings.token_embedding(
        jnp.asarray(input_ids, jnp.int32))


def denoise(model: BaseModel, params: BaseParams, x_t: jax.Array, t: jax.Array, input_ids: jax.Array) -> jax.Array:
    """Prediction (per the schedule's ``prediction_type``) for noisy images and token ids, text encoded inside."""
    return apply_unet(model.unet_def, params["unet"], x_t, t, encode_prompt(model, params["text_encoder"], input_ids))


def drop_captions(model: BaseModel, key: jax.Array, input_ids: jax.Array, prob: float) -> tuple[jax.Array, jax.Array]:
    """Replace each caption by the empty prompt with probability ``prob`` (classifier-free guidance training);
    returns (ids, dropped mask)."""
    dropped = jax.random.bernoulli(key, prob, (input_ids.shape[0],))
    return empty_where(model, dropped, input_ids), dropped


def empty_where(model: BaseModel, dropped: jax.Array, input_ids: jax.Array) -> jax.Array:
    """``input_ids`` with the rows where ``dropped`` (B,) is True replaced by the empty prompt."""
    return jnp.where(dropped[:, None], jnp.asarray(model.empty_ids)[None], input_ids)


def base_loss(
    model: BaseModel,
    params: BaseParams,
    batch: Mapping[str, jax.Array],
    key: jax.Array,
    *,
    cond_drop_prob: float = 0.1,
    min_snr_gamma: float | None = 5.0,
    high_noise_fraction: float = 0.0,
    high_noise_start: int = 0,
    pair_weight: float = 1.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Pretraining loss of the composite: text encoder and UNet both differentiated.

    ``batch``: ``images`` (B, H, W, C) float in [-1, 1] and ``input_ids`` (B, L) int. Returns the min-SNR-γ weighted
    loss and ``{"mse": unweighted MSE}``. ``high_noise_*``: the timestep mixture of ``sample_timesteps``.

    With counterfactual partners (``pair_images``, ``pair_input_ids``: each photo re-rendered with one attribute
    changed, ``metalora.data.episodes``), both images of a pair get the same t, noise and caption dropout; the loss
    is the weighted loss over all 2B images plus ``pair_weight`` × the MSE between the difference of the two
    predictions and the difference of the two targets, with the same weights (``{"pair_mse": ...}`` reports it).
    """
    images = jnp.asarray(batch["images"], jnp.float32)
    if images.shape[1:] != model.sample_shape:
        raise ValueError(f"base_loss: images have shape {images.shape[1:]} per example, the model draws "
                         f"{model.sample_shape}")
    paired = "pair_images" in batch
    k_drop, k_noise = jax.random.split(key)
    input_ids, dropped = drop_captions(model, k_drop, jnp.asarray(batch["input_ids"], jnp.int32), cond_drop_prob)
    t, noise = training_noise(model.schedule, k_noise, images, high_noise_fraction=high_noise_fraction,
                              high_noise_start=high_noise_start)
    if paired:  # the partners go after the photos, with the photos' t, noise and dropped captions
        images = jnp.concatenate([images, jnp.asarray(batch["pair_images"], jnp.float32)])
        pair_ids = empty_where(model, dropped, jnp.asarray(batch["pair_input_ids"], jnp.int32))
        input_ids, t, noise = (jnp.concatenate([a, b]) for a, b in ((input_ids, pair_ids), (t, t), (noise, noise)))
    x_t, target = add_noise(model.schedule, images, noise, t), training_target(model.schedule, images, noise, t)
    pred = denoise(model, params, x_t, t, input_ids)
    weights = loss_weights(model.schedule, t, min_snr_gamma)
    loss = diffusion_loss(pred, target, weights)
    metrics = {"mse": jnp.mean(per_example_mse(pred, target))}
    if paired:
        half = images.shape[0] // 2
        delta_pred, delta_target = pred[:half] - pred[half:], target[:half] - target[half:]
        pair_loss = diffusion_loss(delta_pred, delta_target, weights[:half])
        loss = loss + pair_weight * pair_loss
        metrics["pair_mse"] = jnp.mean(per_example_mse(delta_pred, delta_target))
    return loss, metrics


def to_unit_images(x: jax.Array) -> jax.Array:
    """Model-space images in [-1, 1] → [0, 1], clipped (what samplers return)."""
    return jnp.clip((x + 1.0) / 2.0, 0.0, 1.0)


def encode_images(model: BaseModel, params: BaseParams, images: jax.Array) -> jax.Array:
    """Photos (..., H, W, 3) in [-1, 1] → what the UNet denoises: the photos themselves for a pixel model; the
    scaled VAE posterior *mean* for a latent one (deterministic, so a batch's latents can be cached and resumed
    runs see the same data; diffusers' scripts draw a posterior sample instead)."""
    if not model.latent:
        return images
    latents = scaled_mean_latents(nnx.merge(model.vae_def, params["vae"]),
                                  jnp.reshape(images, (-1, *images.shape[-3:])))
    return jnp.reshape(latents, (*images.shape[:-3], *latents.shape[1:]))


def decode_images(model: BaseModel, params: BaseParams, x: jax.Array) -> jax.Array:
    """The sampler's output (B, h, w, C) → images (B, H, W, 3) in [0, 1]: through the VAE's decoder when there is
    one (as diffusers' pipelines decode), clipped either way."""
    if not model.latent:
        return to_unit_images(x)
    return decode_to_unit_range(nnx.merge(model.vae_def, params["vae"]), x)


@functools.partial(jit, static_argnames=("model", "num_inference_steps"))
def sample_from_ids(
    model: BaseModel,
    params: BaseParams,
    input_ids: jax.Array,
    keys: jax.Array,
    *,
    num_inference_steps: int = 50,
    guidance_scale: float | jax.Array = 3.0,
    eta: float | jax.Array = 0.0,
) -> jax.Array:
    """DDIM with classifier-free guidance; one image per row of ``input_ids`` (B, L) and key in ``keys`` (B,).

    Returns images (B, H, W, C) in [0, 1] (decoded by the VAE for a latent model: ``params`` then holds ``"vae"``).
    Image b depends only on (prompt b, key b), so adding prompts to a batch does not change the other images.
    """
    cond = encode_prompt(model, params["text_encoder"], input_ids)
    uncond = unconditional_prompt(model, params["text_encoder"], input_ids.shape[0])
    noise = initial_noise(keys, model.sample_shape)
    x0 = ddim_sample(model.unet_fn, params["unet"], model.schedule, noise, cond, uncond,
                     num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, eta=eta, keys=keys)
    return decode_images(model, params, x0)


def sample(
    model: BaseModel,
    params: BaseParams,
    prompts: Sequence[str],
    keys: jax.Array,
    *,
    num_inference_steps: int = 50,
    guidance_scale: float = 3.0,
    eta: float = 0.0,
) -> np.ndarray:
    """Images (B, H, W, C) float32 in [0, 1] for ``prompts``, one key per prompt (``jax.random.split(key, B)``)."""
    if len(prompts) != keys.shape[0]:
        raise ValueError(f"sample: {len(prompts)} prompts but {keys.shape[0]} keys; pass one key per prompt")
    ids = jnp.asarray(model.tokenize(prompts))
    out = sample_from_ids(model, params, ids, keys, num_inference_steps=num_inference_steps,
                          guidance_scale=guidance_scale, eta=eta)
    return np.asarray(out)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: a diffusers-style pipeline folder
# ----------------------------------------------------------------------------------------------------------------


def _save_safetensors(path: pathlib.Path, tensors: Mapping[str, np.ndarray], dtype: str) -> None:
    from safetensors.numpy import save

    data = save({k: np.asarray(v).astype(dtype) for k, v in tensors.items()}, metadata={"format": "pt"})
    atomic_write_bytes(path, data)


def save_base_model(
    path: str | pathlib.Path,
    model: BaseModel,
    params: BaseParams,
    *,
    weights_dtype: str = "float32",
    extra: Mapping[str, Any] | None = None,
) -> pathlib.Path:
    """Write the model as a pipeline folder (layout in the module docstring); every file is written atomically.

    ``weights_dtype="float16"`` halves the files (SD checkpoints are commonly shipped so); loading casts back to
    float32. ``extra`` (JSON-able: training command, seed, metrics...) is recorded in ``model_index.json``.
    """
    if weights_dtype not in ("float32", "float16"):
        raise ValueError(f"save_base_model: weights_dtype={weights_dtype!r}; choose 'float32' or 'float16'")
    path = pathlib.Path(path)
    cfg = model.config
    unet_cfg = {"_class_name": "UNet2DConditionModel", **cfg.unet.to_diffusers(), "sample_size": cfg.resolution}
    text_cfg = {**cfg.text_encoder.to_dict(), "architectures": ["CLIPTextModel"]}
    atomic_write_text(path / "unet" / "config.json", json.dumps(unet_cfg, indent=2) + "\n")
    _save_safetensors(path / "unet" / "diffusion_pytorch_model.safetensors",
                      convert.export_torch_state(model.unet(params)), weights_dtype)
    atomic_write_text(path / "text_encoder" / "config.json", json.dumps(text_cfg, indent=2) + "\n")
    _save_safetensors(path / "text_encoder" / "model.safetensors",
                      convert.export_torch_state(model.text_encoder(params)), weights_dtype)
    atomic_write_text(path / TOKENIZER_FILE, json.dumps(dict(cfg.tokenizer), indent=1) + "\n")
    atomic_write_text(path / "scheduler" / "scheduler_config.json", json.dumps(dict(cfg.scheduler), indent=2) + "\n")
    index = {"_class_name": "MetaloraBaseModel", "format": BASE_FORMAT, "resolution": cfg.resolution,
             "unet": ["metalora", "UNet2DConditionModel"], "text_encoder": ["metalora", "CLIPTextModel"],
             "tokenizer": ["metalora", "WordTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"],
             "weights_dtype": weights_dtype,
             **({"extra": dict(extra)} if extra else {})}
    atomic_write_text(path / MODEL_INDEX, json.dumps(index, indent=2) + "\n")  # last: marks the folder complete
    return path


def read_model_index(path: str | pathlib.Path) -> dict[str, Any]:
    """``model_index.json`` of a base-model folder, checked to be ours."""
    path = pathlib.Path(path)
    index_path = path / MODEL_INDEX
    if not index_path.is_file():
        raise FileNotFoundError(f"{path} is not a base-model folder: {index_path} is missing")
    try:
        index = json.loads(index_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{index_path}: not valid JSON ({e})") from None
    if index.get("format") != BASE_FORMAT:
        raise ValueError(f"{index_path}: format={index.get('format')!r}, expected {BASE_FORMAT!r} (a diffusers "
                         f"_class_name={index.get('_class_name')!r} folder is not a metalora base model)")
    return index


def load_base_model(
    path: str | pathlib.Path | None = None, *, attention_backend: str = "auto", compute_dtype: str = "float32",
    remat: bool = False,
) -> tuple[BaseModel, BaseParams]:
    """Load ``(model, params)`` from a folder written by ``save_base_model`` (default: the pretrained
    ``assets/base_tiny`` kept in the repository). Only safetensors and JSON are read. ``compute_dtype`` and
    ``remat``: see ``BaseModel``."""
    path = pathlib.Path(path) if path is not None else DEFAULT_BASE_CHECKPOINT
    if _diffusers_class(path) is not None:
        return load_stable_diffusion_base(path, attention_backend=attention_backend, compute_dtype=compute_dtype,
                                          remat=remat)
    index = read_model_index(path)
    unet_cfg = UNetConfig.from_diffusers(convert.load_config(path / "unet"))
    text_cfg = CLIPTextConfig.from_dict(convert.load_config(path / "text_encoder"))
    tok_path = path / TOKENIZER_FILE
    tokenizer = WordTokenizer.load(tok_path)
    scheduler = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    config = BaseModelConfig(resolution=int(index["resolution"]), unet=unet_cfg, text_encoder=text_cfg,
                             tokenizer=tokenizer.to_dict(), scheduler=scheduler)
    model = BaseModel(config, attention_backend=attention_backend, compute_dtype=compute_dtype, remat=remat)
    unet = load_unet(path / "unet", attention_backend=attention_backend)
    text = load_clip_text_model(path / "text_encoder", with_projection=False)
    return model, {"unet": nnx.state(unet, nnx.Param), "text_encoder": nnx.state(text, nnx.Param)}


def _diffusers_class(path: pathlib.Path) -> str | None:
    """The ``_class_name`` of a diffusers pipeline folder's ``model_index.json`` (None: not one, or ours)."""
    try:
        index = json.loads((path / MODEL_INDEX).read_text())
    except (OSError, json.JSONDecodeError):
        return None  # read_model_index reports it
    return None if index.get("format") == BASE_FORMAT else index.get("_class_name")


def load_stable_diffusion_base(path: str | pathlib.Path, *, attention_backend: str = "auto",
                               compute_dtype: str = "float32", remat: bool = False) -> tuple[BaseModel, BaseParams]:
    """A diffusers ``StableDiffusionPipeline`` (SD-1.x/2.x) or ``StableDiffusionXLPipeline`` folder as a
    personalization base: its UNet, text encoder(s), tokenizer(s), scheduler and VAE; the UNet works in the VAE's
    scaled latent space (``encode_images`` / ``decode_images``). SD conditions on the CLIP tower's last hidden
    state; SDXL on both towers' penultimate hidden states, the second's pooled projection and size ids
    (``encode_prompt``), with ``params["text_encoder"] = {"text_encoder": ..., "text_encoder_2": ...}``. Only
    safetensors are read."""
    from metalora.models.pipeline import SDXL, load_pipeline

    pipe = load_pipeline(path, attention_backend=attention_backend)  # reads and cross-checks every component
    xl = pipe.pipeline_class == SDXL
    if pipe.unet.config.addition_embed_type and not xl:  # (class embeddings are refused by UNetConfig itself)
        raise ValueError(f"{path}/unet: added conditioning (addition_embed_type="
                         f"{pipe.unet.config.addition_embed_type!r}) is not supported for a personalization base")
    height, width = pipe.default_size
    if height != width:
        raise ValueError(f"{path}/unet: sample size {height}×{width} px; a personalization base is square")
    vae = pipe.vae
    if xl:
        (text, text_2), tokenizer = pipe.text_encoders, TokenizerPair(*pipe.tokenizers)
        text_params = {"text_encoder": nnx.state(text, nnx.Param), "text_encoder_2": nnx.state(text_2, nnx.Param)}
    else:
        (text,), (tokenizer,), text_2 = pipe.text_encoders, pipe.tokenizers, None
        text_params = nnx.state(text, nnx.Param)
    config = BaseModelConfig(resolution=height // pipe.vae_scale_factor, unet=pipe.unet.config,
                             text_encoder=text.config, tokenizer={}, scheduler=pipe.schedule.to_config(),
                             vae=vae.config, text_encoder_2=None if text_2 is None else text_2.config,
                             zero_uncond=xl and pipe.force_zeros_for_empty_prompt)
    model = BaseModel(config, attention_backend=attention_backend, tokenizer=tokenizer, compute_dtype=compute_dtype,
                      remat=remat)
    return model, {"unet": nnx.state(pipe.unet, nnx.Param), "text_encoder": text_params,
                   "vae": nnx.state(vae, nnx.Param)}


# ----------------------------------------------------------------------------------------------------------------
# From a job config
# ----------------------------------------------------------------------------------------------------------------


def build_base_model(m: Any, *, compute_dtype: str = "float32", remat: bool = False) -> BaseModel:
    """The composite model a ``config.model`` section of ``configs/base_tiny.py`` describes (no weights)."""
    tokenizer = world_tokenizer(max_length=m.max_length or None)
    unet = tiny_unet_config(block_out_channels=tuple(m.block_out_channels), layers_per_block=m.layers_per_block,
                            cross_attention_dim=m.text_hidden_size, attention_head_dim=m.attention_head_dim,
                            norm_num_groups=m.norm_num_groups, pooled_text_heads=m.get("pooled_text_heads", 0))
    scheduler = default_scheduler_config() | {"beta_schedule": m.beta_schedule, "prediction_type": m.prediction_type}
    model_config = BaseModelConfig.create(resolution=m.resolution, unet=unet, text_hidden_size=m.text_hidden_size,
                                          text_layers=m.text_layers, text_heads=m.text_heads, tokenizer=tokenizer,
                                          scheduler=scheduler)
    return BaseModel(model_config, attention_backend=m.attention_backend, compute_dtype=compute_dtype, remat=remat)


def load_pixel_base(path: str, *, attention_backend: str = "auto", job: str) -> tuple[BaseModel, BaseParams]:
    """``load_base`` for the jobs that work on pixel-space bases only; a latent (Stable Diffusion) folder gets an
    error naming ``job`` instead of a shape error deep inside it."""
    model, params = load_base(path, attention_backend=attention_backend)
    if model.latent:
        raise ValueError(f"{job} runs on pixel-space bases (the world's / LFW's); {path} is a latent Stable "
                         "Diffusion folder: use experiments/meta_train.py and experiments/adapt.py with it")
    return model, params


def load_base(path: str = "", *, attention_backend: str = "auto", compute_dtype: str = "float32",
              remat: bool = False) -> tuple[BaseModel, BaseParams]:
    """The frozen base of a personalization job: ``""`` = the shipped checkpoint, a pipeline folder, or
    ``random:<arg>`` = untrained weights of ``configs/base_tiny.py:<arg>`` (tests and smoke runs).
    ``compute_dtype`` / ``remat``: the UNet's activation dtype and block rematerialisation (``BaseModel``)."""
    if path.startswith("random:"):
        from configs import base_tiny  # the config of record for the tiny base lives with the other configs

        base_config = base_tiny.get_config(path.split(":", 1)[1])
        base_config.model.attention_backend = attention_backend
        model = build_base_model(base_config.model, compute_dtype=compute_dtype, remat=remat)
        return model, init_base_params(model, jax.random.key(base_config.seed))
    return load_base_model(path or None, attention_backend=attention_backend, compute_dtype=compute_dtype,
                           remat=remat)
