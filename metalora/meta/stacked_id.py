"""PhotoMaker-style tuning-free personalization on the base model: the stacked ID embedding and its UNet LoRA.

``StackedID`` binds a base model, an ``IDEncoder`` graph and a LoRA on the UNet. Its pure functions condition the
base model on a subject's reference photos (``metalora.models.id_encoder`` explains where the stack goes):

* ``embed_references``: reference images → image embeddings (N, image_dim), computed once per subject;
* ``id_contexts``: prompt ids with the trigger word ("a photo of sks person ...") → prompt embeddings of the plain
  prompt ("a photo of a person ...", as the training captions read) with the fused ID tokens in the class word's place
  (at the text encoder's output or input, per ``IDEncoderConfig.inject``);
* ``denoising_loss``: the training objective (a different photo of the same person as the target), also the
  held-out evaluation;
* ``sample``: DDIM + CFG; the first ``start_merge_step`` steps read the plain class prompt (layout first, as in
  PhotoMaker), the rest the ID prompt.

``experiments/train_id_encoder.py`` trains encoder + LoRA on ``meta_train`` identities;
``metalora.eval.methods.stacked_id_method`` evaluates it in the harness.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from metalora.data import world
from metalora.diffusion import ddim_sample, diffusion_loss, initial_noise, loss_weights, training_inputs
from metalora.lora import init_subject_state, merge_roles, merged_params, take_heads
from metalora.meta.personalize import attach_adapters, lora_config
from metalora.models import base_model as bm
from metalora.models.id_encoder import (
    IDEncoder,
    IDEncoderConfig,
    class_embedding,
    drop_token,
    pad_rows,
    place_rows,
    repeat_token,
    stack_id,
)


@dataclasses.dataclass(frozen=True, eq=False)
class StackedID:
    """Static parts (graphs, token ids, frozen UNet base); hashable by identity, so usable as a static jit argument."""

    model: bm.BaseModel
    encoder_def: nnx.GraphDef
    unet_def: nnx.GraphDef  # the UNet with LoRA adapters
    unet_base: nnx.State
    unet_meta: nnx.State  # empty for a two-factor LoRA
    trigger: int
    class_token: int
    pad_id: int
    plain_token: int | None  # the word the trigger stands in for ("a" in "a photo of a person"); None: drop it
    inject: str  # IDEncoderConfig.inject: "output" or "input" of the text encoder

    def extra_rows(self, references: int) -> int:
        """Rows the ID context has beyond the prompt's: N - 1 appended at the output, none at the input."""
        return references - 1 if self.inject == "output" else 0

    def plain_ids(self, input_ids: jax.Array) -> jax.Array:
        """Prompt ids as the encoder was trained on them: the trigger back to the plain word (or dropped)."""
        if self.plain_token is not None:
            return jnp.where(input_ids == self.trigger, self.plain_token, input_ids)
        return jax.vmap(lambda row: drop_token(row, self.trigger, self.pad_id))(input_ids)

    @functools.cached_property
    def merging_unet_fn(self):
        """``_merging_unet`` bound to the base UNet, made once so samplers compile once per system."""
        return functools.partial(_merging_unet, self.model.unet_fn)


def build(model: bm.BaseModel, params: bm.BaseParams, config: IDEncoderConfig, *, lora_targets: Any = "attn",
          lora_rank: int = 4, key: jax.Array, trigger: str = world.DEFAULT_IDENTIFIER,
          class_word: str = world.CLASS_WORD, plain_word: str | None = "a") -> tuple[StackedID, nnx.State, nnx.State]:
    """``(system, fresh encoder state, fresh LoRA state)``; the LoRA starts as a no-op (its up factor is zero).

    ``plain_word``: the word the trigger replaces in the prompts ("a photo of sks person" is the world's identifier
    form of "a photo of a person", the captions the encoder trains on), so evaluation prompts read as training
    captions; None drops the trigger instead.
    """
    if config.text_dim != model.config.text_encoder.hidden_size:
        raise ValueError(f"IDEncoderConfig.text_dim={config.text_dim} but the base model's text encoder is "
                         f"{model.config.text_encoder.hidden_size} wide")
    for word in (trigger, class_word, *([plain_word] if plain_word else [])):
        if word not in set(model.tokenizer.tokens):
            raise ValueError(f"stacked ID: {word!r} is not a token of the base model's tokenizer")
    k_enc, k_lora, k_heads = jax.random.split(key, 3)
    encoder_def, encoder_state = nnx.split(IDEncoder(config, rngs=nnx.Rngs(k_enc)))
    unet_def, base, meta, heads = attach_adapters(model, params, lora_config("lora", targets=lora_targets,
                                                                             rank=lora_rank), k_lora)
    lora_state = take_heads(init_subject_state(merge_roles(unet_def, base, meta, heads), k_heads, 1), 0)
    tok = model.tokenizer
    system = StackedID(model, encoder_def, unet_def, base, meta, tok.token_to_id(trigger), tok.token_to_id(class_word),
                       tok.pad_token_id, tok.token_to_id(plain_word) if plain_word else None, config.inject)
    return system, encoder_state, lora_state


def embed_references(system: StackedID, encoder_state: nnx.State, images: jax.Array) -> jax.Array:
    """(N, H, W, 3) reference photos in [-1, 1] → (N, image_dim)."""
    return nnx.merge(system.encoder_def, encoder_state).image_encoder(images)


def id_contexts(system: StackedID, encoder_state: nnx.State, text_params: nnx.State, image_embeds: jax.Array,
                input_ids: jax.Array) -> jax.Array:
    """(B, L + extra_rows(N), D) prompt embeddings of the plain prompt with N fused ID tokens for the class word.

    ``inject="output"``: the class word's output row → fused token 0, the rest appended. ``"input"``: the class word
    repeated N times in the ids, its token embeddings → the fused tokens, then the text encoder."""
    ids = system.plain_ids(input_ids)
    fuse = nnx.merge(system.encoder_def, encoder_state).fuse
    if system.inject == "input":
        ids = jax.vmap(lambda i: repeat_token(i, system.class_token, image_embeds.shape[0]))(ids)
        class_row = bm.token_embeddings(system.model, text_params, jnp.asarray(system.class_token))
        fused = fuse(image_embeds, class_row)  # the same N tokens for every prompt
        rows = jax.vmap(lambda e, i: place_rows(e, i, system.class_token, fused))(
            bm.token_embeddings(system.model, text_params, ids), ids)
        return bm.encode_text(system.model, text_params, ids, rows)
    context = bm.encode_text(system.model, text_params, ids)
    fused = jax.vmap(lambda c, i: fuse(image_embeds, class_embedding(c, i, system.class_token)))(context, ids)
    return jax.vmap(lambda c, i, f: stack_id(c, i, system.class_token, f))(context, ids, fused)


def plain_contexts(system: StackedID, text_params: nnx.State, input_ids: jax.Array, extra_rows: int) -> jax.Array:
    """The plain prompt without ID tokens ("a photo of a person ..."), padded to the ID length."""
    ids = system.plain_ids(input_ids)
    return jax.vmap(lambda c: pad_rows(c, extra_rows))(bm.encode_text(system.model, text_params, ids))


def unet_params(system: StackedID, lora_state: nnx.State) -> nnx.State:
    """The UNet's plain parameters with the LoRA merged in (samples at base-model speed)."""
    return merged_params(system.unet_def, system.unet_base, system.unet_meta, lora_state)


def denoising_loss(system: StackedID, encoder_state: nnx.State, lora_state: nnx.State, text_params: nnx.State,
                   image_embeds: jax.Array, batch: Mapping[str, jax.Array], key: jax.Array, *,
                   cond_drop_prob: float = 0.0, min_snr_gamma: float | None = None) -> jax.Array:
    """Denoising loss of ``batch`` (``images`` (b, H, W, 3), ``input_ids`` (b, L) with the trigger) conditioned on
    the ID tokens of ``image_embeds``. ``cond_drop_prob``: each example's prompt becomes the (padded) empty prompt
    with this probability, so the LoRA keeps the unconditional branch that guidance needs.

    Noise and timesteps are drawn from ``key`` exactly as ``diffusion_example_loss`` draws them, so a held-out loss
    is paired with the other methods' (same draws for the same key: common random numbers)."""
    k_drop = jax.random.fold_in(key, 1)
    context = id_contexts(system, encoder_state, text_params, image_embeds, batch["input_ids"])
    if cond_drop_prob > 0:
        empty = jnp.broadcast_to(jnp.asarray(system.model.empty_ids)[None], batch["input_ids"].shape)
        uncond = plain_contexts(system, text_params, empty, system.extra_rows(image_embeds.shape[0]))
        dropped = jax.random.bernoulli(k_drop, cond_drop_prob, (context.shape[0],))
        context = jnp.where(dropped[:, None, None], uncond, context)
    unet = merge_roles(system.unet_def, system.unet_base, system.unet_meta, lora_state)
    x_t, t, target = training_inputs(system.model.schedule, key, batch["images"])
    return diffusion_loss(unet(x_t, t, context), target, loss_weights(system.model.schedule, t, min_snr_gamma))


def identity_contrastive_loss(reference_embeds: jax.Array, query_embeds: jax.Array,
                              temperature: float = 0.1) -> jax.Array:
    """Symmetric InfoNCE between (B, d) image embeddings of B *different* identities: reference b should be
    nearest (cosine) to query b, a different photo of the same person, among the B queries, and vice versa.

    An auxiliary objective for an image encoder trained from scratch: the denoising loss alone barely tells
    identities apart (the face is a small part of the pixels), while PhotoMaker starts from a contrastively
    pretrained CLIP image encoder. It uses only the training set's identity labels, not the evaluation's FaceSim."""
    def unit(x):
        return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-6)

    logits = unit(reference_embeds) @ unit(query_embeds).T / temperature
    ref_to_query = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=1)))
    query_to_ref = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=0)))
    return (ref_to_query + query_to_ref) / 2


def _merging_unet(unet_fn, params, x, t, cond):
    """The UNet on ``cond["early"]`` while t ≥ ``cond["merge_t"]``, on ``cond["late"]`` afterwards."""
    early = (t >= cond["merge_t"])[:, None, None]
    return unet_fn(params, x, t, jnp.where(early, cond["early"], cond["late"]))


def sample(system: StackedID, encoder_state: nnx.State, lora_state: nnx.State, text_params: nnx.State,
           image_embeds: jax.Array, input_ids: jax.Array, keys: jax.Array, *, num_inference_steps: int = 25,
           guidance_scale: float = 3.0, start_merge_step: int = 0) -> jax.Array:
    """Images (B, H, W, 3) in [0, 1] for prompts with the trigger; DDIM + CFG. Steps before ``start_merge_step`` use
    the plain class prompt (no ID tokens), so the layout forms before the identity is injected (PhotoMaker)."""
    model = system.model
    extra = system.extra_rows(image_embeds.shape[0])
    late = id_contexts(system, encoder_state, text_params, image_embeds, input_ids)
    early = plain_contexts(system, text_params, input_ids, extra)
    empty = plain_contexts(system, text_params, jnp.broadcast_to(jnp.asarray(model.empty_ids)[None], input_ids.shape),
                           extra)
    timesteps = model.schedule.inference_timesteps(num_inference_steps)
    # t ≥ merge_t exactly for the first start_merge_step steps (timesteps decrease); with 0 no timestep reaches it
    never = model.schedule.num_train_timesteps
    merge_t = jnp.asarray(timesteps[start_merge_step - 1] if start_merge_step > 0 else never, jnp.int32)
    merge_t = jnp.broadcast_to(merge_t, (input_ids.shape[0],))
    cond = {"early": early, "late": late, "merge_t": merge_t}
    uncond = {"early": empty, "late": empty, "merge_t": merge_t}
    x0 = ddim_sample(system.merging_unet_fn, unet_params(system, lora_state), model.schedule,
                     initial_noise(keys, model.sample_shape), cond, uncond, num_inference_steps=num_inference_steps,
                     guidance_scale=guidance_scale, keys=keys)
    return bm.to_unit_images(x0)
