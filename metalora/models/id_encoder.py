"""A PhotoMaker-style stacked ID embedding: reference photos → identity embeddings fused into the prompt.

Tuning-free personalization (Li et al., 2024, "PhotoMaker"): an image encoder embeds each reference photo, an MLP
fuses each image embedding with the class word's text embedding (residual + LayerNorm), and the N fused embeddings
take the class word's place in the prompt embedding that every cross-attention layer reads. Trained once on many
identities (reference set → a different photo of the same person); at test time there is no optimisation.

Where the stack goes: the prompt is written with a trigger word before the class word ("a photo of sks person ...").
The trigger goes back to the word it stands for ("a photo of a person ...", the training captions' form; or it is
dropped, the ids shifting left). Then, per ``IDEncoderConfig.inject``:

* ``"output"`` (PhotoMaker): the text encoder runs, the class word's row of its output becomes fused embedding 0 and
  embeddings 1..N-1 are appended as extra rows. Appending is equivalent to inserting them next to the class word
  because cross-attention keys carry no positions (the text encoder has already run); it keeps every prompt's layout
  fixed for any N. For classifier-free guidance the unconditional context is padded to the same length with copies
  of its last (padding) row. The fusion is residual + LayerNorm, in the space of the encoder's final LayerNorm.
* ``"input"``: the class word is repeated N times in the ids (later ids shift right; the last N - 1, padding for
  any prompt shorter than the context, fall off) and its N token embeddings are replaced by the fused embeddings
  *before* the text encoder, as textual inversion's learned word enters it. The causal encoder carries the identity
  into every later row, so a UNet whose cross-attention ignores the class word's own row (it is the same in every
  caption a base model trained on) still sees it. The fusion is the class word's token embedding plus a
  zero-initialised MLP (no LayerNorm: token embeddings are not normalised), so a fresh encoder leaves the prompt
  exactly as written.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from metalora.models.unet_blocks import Precision

F32 = Precision()  # the encoder is small: float32, default attention backend (it has no attention)
INJECT_MODES = ("output", "input")


@dataclasses.dataclass(frozen=True)
class IDEncoderConfig:
    """Sizes of the image encoder (strided 3×3 convs, GroupNorm, SiLU, mean pool) and the fusion MLP."""

    text_dim: int  # width of the text encoder's hidden states (the context the UNet reads)
    channels: tuple[int, ...] = (32, 64, 128)
    image_dim: int = 128
    fuse_hidden: int = 256
    groups: int = 8
    inject: str = "output"  # where the fused ID tokens enter the prompt: "output" or "input" of the text encoder

    def __post_init__(self):
        if self.inject not in INJECT_MODES:
            raise ValueError(f"IDEncoderConfig.inject={self.inject!r}; use one of {INJECT_MODES}")

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IDEncoderConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"IDEncoderConfig: unknown field(s) {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


class ImageEncoder(nnx.Module):
    """Images (N, H, W, 3) in [-1, 1] → (N, image_dim)."""

    def __init__(self, config: IDEncoderConfig, *, rngs: nnx.Rngs, precision: Precision = F32):
        chans = (3, *config.channels)
        self.convs = nnx.List([precision.conv(a, b, 3, stride=2, rngs=rngs) for a, b in itertools.pairwise(chans)])
        self.norms = nnx.List([precision.group_norm(c, config.groups, 1e-5, rngs=rngs) for c in config.channels])
        self.proj = precision.linear(config.channels[-1], config.image_dim, rngs=rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        x = images
        for conv, norm in zip(self.convs, self.norms):
            x = nnx.silu(norm(conv(x)))
        return self.proj(jnp.mean(x, axis=(1, 2)))


class FuseModule(nnx.Module):
    """(image embedding, class-word embedding) → the fused ID token: LayerNorm(class + MLP([image, class])) for
    ``inject="output"``; class + MLP([image, class]) with the MLP's last layer starting at zero for ``"input"``."""

    def __init__(self, config: IDEncoderConfig, *, rngs: nnx.Rngs, precision: Precision = F32):
        at_input = config.inject == "input"
        self.mlp1 = precision.linear(config.image_dim + config.text_dim, config.fuse_hidden, rngs=rngs)
        self.mlp2 = precision.linear(config.fuse_hidden, config.text_dim, rngs=rngs, zero_init=at_input)
        self.layer_norm = None if at_input else precision.layer_norm(config.text_dim, 1e-5, rngs=rngs)

    def __call__(self, image_embeds: jax.Array, class_embed: jax.Array) -> jax.Array:
        class_embed = jnp.broadcast_to(class_embed, (*image_embeds.shape[:-1], class_embed.shape[-1]))
        hidden = nnx.gelu(self.mlp1(jnp.concatenate([image_embeds, class_embed], axis=-1)))
        fused = class_embed + self.mlp2(hidden)
        return fused if self.layer_norm is None else self.layer_norm(fused)


class IDEncoder(nnx.Module):
    def __init__(self, config: IDEncoderConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.image_encoder = ImageEncoder(config, rngs=rngs)
        self.fuse = FuseModule(config, rngs=rngs)


# ----------------------------------------------------------------------------------------------------------------
# Prompt surgery (pure functions on one prompt; vmap for batches)
# ----------------------------------------------------------------------------------------------------------------


def drop_token(input_ids: jax.Array, token: int, pad_id: int) -> jax.Array:
    """(L,) ids without the first occurrence of ``token`` (the rest shift left, ``pad_id`` fills the end)."""
    length = input_ids.shape[-1]
    hit = input_ids == token
    first = jnp.where(jnp.any(hit), jnp.argmax(hit), length)
    source = jnp.arange(length) + (jnp.arange(length) >= first)
    return jnp.where(source < length, input_ids[jnp.minimum(source, length - 1)], pad_id)


def stack_id(context: jax.Array, input_ids: jax.Array, class_token: int, fused: jax.Array) -> jax.Array:
    """(L + N - 1, D): ``context`` (L, D) with the class word's row replaced by ``fused[0]`` and ``fused[1:]``
    appended. ``input_ids`` (L,) must already be without the trigger; a prompt without the class word is returned
    with the N rows appended only (nothing replaced)."""
    hit = input_ids == class_token
    first = jnp.argmax(hit)
    replace = (jnp.arange(context.shape[0]) == first) & jnp.any(hit)
    replaced = jnp.where(replace[:, None], fused[0].astype(context.dtype), context)
    return jnp.concatenate([replaced, fused[1:].astype(context.dtype)], axis=0)


def repeat_token(input_ids: jax.Array, token: int, count: int) -> jax.Array:
    """(L,) ids with the first occurrence of ``token`` repeated ``count`` times; later ids shift right and the last
    ``count - 1`` fall off (padding, for a prompt shorter than L). Without ``token`` the ids are returned as given."""
    length = input_ids.shape[-1]
    hit = input_ids == token
    first = jnp.where(jnp.any(hit), jnp.argmax(hit), length)
    position = jnp.arange(length)
    source = jnp.where(position < first, position, jnp.maximum(position - (count - 1), first))
    return input_ids[source]


def place_rows(embeds: jax.Array, input_ids: jax.Array, token: int, rows: jax.Array) -> jax.Array:
    """(L, D): ``embeds`` with the rows of the first ``len(rows)`` positions from ``token``'s first occurrence
    replaced by ``rows`` (after ``repeat_token``, its N copies); unchanged when ``token`` is absent."""
    hit = input_ids == token
    offset = jnp.arange(embeds.shape[0]) - jnp.argmax(hit)
    inside = (offset >= 0) & (offset < rows.shape[0]) & jnp.any(hit)
    picked = rows[jnp.clip(offset, 0, rows.shape[0] - 1)].astype(embeds.dtype)
    return jnp.where(inside[:, None], picked, embeds)


def class_embedding(context: jax.Array, input_ids: jax.Array, class_token: int) -> jax.Array:
    """(D,): the class word's row of the prompt embedding (the first occurrence; row 0 if absent)."""
    return context[jnp.argmax(input_ids == class_token)]


def pad_rows(context: jax.Array, extra: int) -> jax.Array:
    """(L + extra, D): ``context`` with its last row repeated ``extra`` times (the unconditional prompt's padding)."""
    return jnp.concatenate([context, jnp.repeat(context[-1:], extra, axis=0)], axis=0) if extra else context


# ----------------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------------

WEIGHTS = "id_encoder.safetensors"
CONFIG = "id_encoder.json"


def save_id_encoder(folder: str | pathlib.Path, encoder_state: nnx.State, lora_state: nnx.State,
                    config: IDEncoderConfig, info: dict[str, Any]) -> pathlib.Path:
    """Writes the encoder and the UNet LoRA trained with it (one safetensors file, keys = paths) and their config."""
    from metalora.train.io import atomic_write_text, save_states

    folder = pathlib.Path(folder)
    save_states(folder / WEIGHTS, {"encoder": encoder_state, "lora": lora_state}, "metalora-id-encoder")
    atomic_write_text(folder / CONFIG, json.dumps({"config": config.to_dict(), **info}, indent=2, default=str) + "\n")
    return folder


def read_id_encoder_info(folder: str | pathlib.Path) -> dict[str, Any]:
    """The JSON written next to the weights: ``config`` (IDEncoderConfig), ``lora`` (targets, rank), provenance."""
    path = pathlib.Path(folder) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: point at the output folder of experiments/train_id_encoder.py")
    return json.loads(path.read_text())


def load_id_encoder(folder: str | pathlib.Path, encoder_template: nnx.State,
                    lora_template: nnx.State) -> tuple[nnx.State, nnx.State, dict[str, Any]]:
    """Reads what ``save_id_encoder`` wrote into the given templates (errors name every mismatched key)."""
    from metalora.train.io import load_states

    info = read_id_encoder_info(folder)
    states = load_states(pathlib.Path(folder) / WEIGHTS, {"encoder": encoder_template, "lora": lora_template},
                         "the ID encoder / LoRA built from its config")
    return states["encoder"], states["lora"], info
