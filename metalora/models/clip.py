"""CLIP text encoders in Flax NNX, numerically matching transformers' ``CLIPTextModel`` and
``CLIPTextModelWithProjection``.

Stable Diffusion 1.x conditions on the last hidden state of OpenAI's CLIP ViT-L/14 text tower, SD-2.x and
SDXL on the penultimate layer (``hidden_states[-2]``), and SDXL's second encoder (OpenCLIP bigG) additionally
contributes its projected pooled output (``text_embeds``). The same code, sized down by
``small_clip_config``, is the text encoder of metalora's procedural world.

Module attribute paths mirror transformers (``text_model.encoder.layers[3].self_attn.q_proj``), so loading a
checkpoint is the mechanical layout conversion of ``metalora.models.convert``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from metalora.compiler import jit
from metalora.models import convert
from metalora.models.matmul import dot_general

# transformers' ACT2FN names → jax functions. "gelu" is the exact erf form (torch's default), the tanh forms
# are the approximations some configs ask for by name; quick_gelu is OpenAI CLIP's x·σ(1.702x).
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}

# config.json keys that describe training-time or bookkeeping behaviour and do not change the forward pass.
_IGNORED_KEYS = frozenset({
    "architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "_name_or_path",
    "initializer_range", "initializer_factor", "_commit_hash", "_attn_implementation_autoset",
})

# transformers' CLIPTextModel routes pooling through argmax(input_ids) when eos_token_id == 2: configs written
# before transformers PR #24773 carry that wrong id, and the original CLIP pooled at the highest token id
# (its EOS, 49407). Newer configs pool at the first occurrence of the real eos id.
LEGACY_EOS_TOKEN_ID = 2


class UnsupportedConfigError(ValueError):
    """A config field has a value this implementation does not support; the message names the field."""


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The fields of transformers' ``CLIPTextConfig`` that determine the text tower's forward pass."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    dropout: float = 0.0
    pad_token_id: int | None = 1
    bos_token_id: int | None = 49406
    eos_token_id: int | None = 49407

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise UnsupportedConfigError(
                f"CLIPTextConfig.hidden_act={self.hidden_act!r} is not supported (supported: {sorted(ACTIVATIONS)})")
        if self.hidden_size % self.num_attention_heads:
            raise UnsupportedConfigError(
                f"CLIPTextConfig.hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}")
        for name in ("attention_dropout", "dropout"):
            if getattr(self, name):
                raise UnsupportedConfigError(
                    f"CLIPTextConfig.{name}={getattr(self, name)} is not supported: metalora's CLIP has no dropout "
                    "(SD's text encoders are used frozen and the small-world encoder trains without it)")
        if self.eos_token_id is None:
            raise UnsupportedConfigError("CLIPTextConfig.eos_token_id is None: the pooled output needs an EOS token id")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> CLIPTextConfig:
        """Builds the config from a transformers ``config.json`` dict of a ``clip_text_model``.

        Generic ``PretrainedConfig`` keys (generation settings, label maps, ...) that transformers writes into
        older config files are ignored; keys that would change the computation are validated.
        """
        model_type = config.get("model_type", "clip_text_model")
        if model_type != "clip_text_model":
            raise UnsupportedConfigError(
                f"config model_type={model_type!r} is not supported: expected 'clip_text_model' "
                "(the text_encoder/ folder of a diffusers pipeline)")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": "clip_text_model", **dataclasses.asdict(self)}


def small_clip_config(vocab_size: int, max_length: int, *, hidden_size: int = 128, num_hidden_layers: int = 3,
                      num_attention_heads: int = 4, projection_dim: int | None = None,
                      eos_token_id: int = 1, bos_token_id: int = 0, pad_token_id: int = 1) -> CLIPTextConfig:
    """The procedural world's text encoder: CLIP's architecture (and code path) at a few hundred thousand params.

    The default token ids match ``metalora.models.tokenizers.WordTokenizer`` (bos 0, eos 1, pad = eos as in
    CLIP). ``eos_token_id`` must not be 2, which would switch pooling to the legacy argmax rule.
    """
    if eos_token_id == LEGACY_EOS_TOKEN_ID:
        raise UnsupportedConfigError("small_clip_config eos_token_id=2 would select the legacy argmax pooling rule")
    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=4 * hidden_size,
        projection_dim=projection_dim or hidden_size, num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads, max_position_embeddings=max_length, hidden_act="quick_gelu",
        layer_norm_eps=1e-5, pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id)


@struct.dataclass
class CLIPTextOutput:
    """What the text tower returns (a pytree, so it crosses ``jax.jit``).

    ``hidden_states`` has ``num_hidden_layers + 1`` entries: the embeddings, then each layer's output *before*
    ``final_layer_norm`` (transformers' convention; SD-2.x/SDXL take ``hidden_states[-2]``).
    ``text_embeds`` is set only by ``CLIPTextModelWithProjection``.
    """

    last_hidden_state: jax.Array
    pooled_output: jax.Array
    hidden_states: tuple[jax.Array, ...]
    text_embeds: jax.Array | None = None


def _normal(std: float) -> Callable:
    return jax.nn.initializers.normal(stddev=std)


class CLIPTextEmbeddings(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, embedding_init=_normal(0.02), rngs=rngs)
        self.token_embedding = nnx.Embed(config.vocab_size, config.hidden_size, **kw)
        self.position_embedding = nnx.Embed(config.max_position_embeddings, config.hidden_size, **kw)

    def __call__(self, input_ids: jax.Array, inputs_embeds: jax.Array | None = None) -> jax.Array:
        """Token + position embeddings; ``inputs_embeds`` (B, L, D), when given, stands in for the token lookup
        (as in transformers: soft tokens such as a stacked ID embedding)."""
        seq_len = input_ids.shape[-1]
        max_len = self.position_embedding.embedding.shape[0]
        if seq_len > max_len:
            raise ValueError(f"sequence length {seq_len} exceeds max_position_embeddings={max_len}")
        if inputs_embeds is None:
            inputs_embeds = self.token_embedding(input_ids)
        elif inputs_embeds.shape[:-1] != input_ids.shape:
            raise ValueError(f"inputs_embeds {inputs_embeds.shape} does not match input_ids {input_ids.shape}")
        return inputs_embeds + self.position_embedding(jnp.arange(seq_len))


class CLIPAttention(nnx.Module):
    """Multi-head self-attention; softmax in float32 whatever the compute dtype, as transformers does."""

    def __init__(self, config: CLIPTextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.dtype = dtype
        # transformers' init: the residual branches are scaled down with depth.
        in_std = d**-0.5 * (2 * config.num_hidden_layers) ** -0.5
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, dot_general=dot_general)
        self.q_proj = nnx.Linear(d, d, kernel_init=_normal(in_std), **kw)
        self.k_proj = nnx.Linear(d, d, kernel_init=_normal(in_std), **kw)
        self.v_proj = nnx.Linear(d, d, kernel_init=_normal(in_std), **kw)
        self.out_proj = nnx.Linear(d, d, kernel_init=_normal(d**-0.5), **kw)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """``x``: (B, L, D); ``mask``: boolean, broadcastable to (B, 1, L, L), True where attention is allowed."""
        heads = lambda t: t.reshape(*t.shape[:-1], self.num_heads, self.head_dim)
        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (self.head_dim**-0.5)
        scores = jnp.where(mask, scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        return self.out_proj(out.reshape(*x.shape[:-1], -1))


class CLIPMLP(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d = config.hidden_size
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, dot_general=dot_general)
        self.activation = ACTIVATIONS[config.hidden_act]
        self.fc1 = nnx.Linear(d, config.intermediate_size, kernel_init=_normal((2 * d) ** -0.5), **kw)
        self.fc2 = nnx.Linear(config.intermediate_size, d,
                              kernel_init=_normal(d**-0.5 * (2 * config.num_hidden_layers) ** -0.5), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.activation(self.fc1(x)))


def _layer_norm(config: CLIPTextConfig, *, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # Two-pass variance, as torch computes it: E[x²]−E[x]² loses digits on large-mean activations.
    return nnx.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps, use_fast_variance=False,
                         dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class CLIPEncoderLayer(nnx.Module):
    """Pre-LN transformer block: x + attn(LN1(x)), then x + mlp(LN2(x))."""

    def __init__(self, config: CLIPTextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.self_attn = CLIPAttention(config, **kw)
        self.layer_norm1 = _layer_norm(config, **kw)
        self.mlp = CLIPMLP(config, **kw)
        self.layer_norm2 = _layer_norm(config, **kw)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.layers = nnx.List([CLIPEncoderLayer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                                for _ in range(config.num_hidden_layers)])

    def __call__(self, x: jax.Array, mask: jax.Array) -> tuple[jax.Array, ...]:
        hidden_states = [x]
        for layer in self.layers:
            x = layer(x, mask)
            hidden_states.append(x)
        return tuple(hidden_states)


def attention_mask_for(input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    """Causal mask (B or 1, 1, L, L), intersected with a key-padding mask when ``attention_mask`` (B, L) is given.

    SD pipelines pass no padding mask (the padded positions are attended to; the model was trained so); the
    option exists for encoders trained with one.
    """
    seq_len = input_ids.shape[-1]
    mask = jnp.tril(jnp.ones((seq_len, seq_len), dtype=bool))[None, None]
    if attention_mask is not None:
        mask = mask & attention_mask.astype(bool)[:, None, None, :]
    return mask


def pool_eos(last_hidden_state: jax.Array, input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """The hidden state at each sequence's EOS token, by transformers' rule (see ``LEGACY_EOS_TOKEN_ID``).

    Both rules take the *first* maximal position, so a sequence padded with EOS pools at its first EOS.
    """
    if eos_token_id == LEGACY_EOS_TOKEN_ID:
        index = jnp.argmax(input_ids, axis=-1)
    else:
        index = jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1)
    return jnp.take_along_axis(last_hidden_state, index[:, None, None], axis=1)[:, 0]


class CLIPTextTransformer(nnx.Module):
    """Embeddings → causal pre-LN encoder → final LayerNorm → EOS pooling."""

    def __init__(self, config: CLIPTextConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.eos_token_id = config.eos_token_id
        self.embeddings = CLIPTextEmbeddings(config, **kw)
        self.encoder = CLIPEncoder(config, **kw)
        self.final_layer_norm = _layer_norm(config, **kw)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                 inputs_embeds: jax.Array | None = None) -> CLIPTextOutput:
        """``input_ids`` always: they give the padding mask and the EOS position of the pooled output, also when
        ``inputs_embeds`` replaces their token embeddings."""
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {input_ids.shape}")
        hidden_states = self.encoder(self.embeddings(input_ids, inputs_embeds),
                                     attention_mask_for(input_ids, attention_mask))
        last = self.final_layer_norm(hidden_states[-1])
        return CLIPTextOutput(last_hidden_state=last, pooled_output=pool_eos(last, input_ids, self.eos_token_id),
                              hidden_states=hidden_states)


class CLIPTextModel(nnx.Module):
    """transformers' ``CLIPTextModel`` (SD-1.x/2.x text encoder, SDXL's first encoder)."""

    def __init__(self, config: CLIPTextConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.text_model = CLIPTextTransformer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                 inputs_embeds: jax.Array | None = None) -> CLIPTextOutput:
        return self.text_model(input_ids, attention_mask, inputs_embeds=inputs_embeds)


class CLIPTextModelWithProjection(nnx.Module):
    """transformers' ``CLIPTextModelWithProjection`` (SDXL's second encoder): adds ``text_embeds``, the pooled
    output through a bias-free ``text_projection``."""

    def __init__(self, config: CLIPTextConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.text_model = CLIPTextTransformer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.text_projection = nnx.Linear(config.hidden_size, config.projection_dim, use_bias=False,
                                          kernel_init=_normal(config.hidden_size**-0.5), dtype=dtype,
                                          param_dtype=param_dtype, rngs=rngs)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                 inputs_embeds: jax.Array | None = None) -> CLIPTextOutput:
        out = self.text_model(input_ids, attention_mask, inputs_embeds=inputs_embeds)
        return out.replace(text_embeds=self.text_projection(out.pooled_output))


def count_params(model: nnx.Module) -> int:
    """Number of parameter scalars (works on ``nnx.eval_shape`` models too)."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def uninitialized(build: Callable[[], nnx.Module]) -> nnx.Module:
    """Builds a module with zero-filled parameters, skipping the random initialisers (checkpoint loading
    overwrites every parameter, and drawing ~700M normals for OpenCLIP bigG only to discard them is slow)."""
    graphdef, abstract = nnx.split(nnx.eval_shape(build))
    return nnx.merge(graphdef, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract))


_ARCHITECTURES = {"CLIPTextModel": CLIPTextModel, "CLIPTextModelWithProjection": CLIPTextModelWithProjection}


def load_clip_text_model(folder: str | pathlib.Path, *, dtype=jnp.float32, param_dtype=jnp.float32,
                         with_projection: bool | None = None) -> CLIPTextModel | CLIPTextModelWithProjection:
    """Loads a transformers CLIP text encoder folder (``config.json`` + ``model.safetensors``, or sharded).

    The class comes from ``config.json``'s ``architectures`` unless ``with_projection`` says otherwise. Both
    key layouts are accepted: ``text_model.``-prefixed (transformers 4, every SD checkpoint) and the
    unprefixed ``CLIPTextModel`` layout transformers 5 writes.
    """
    folder = pathlib.Path(folder)
    raw = convert.load_config(folder)
    config = CLIPTextConfig.from_dict(raw)
    if with_projection is None:
        archs = [a for a in raw.get("architectures") or ["CLIPTextModel"] if a in _ARCHITECTURES]
        if not archs:
            raise UnsupportedConfigError(
                f"{folder / 'config.json'}: architectures={raw.get('architectures')} names none of "
                f"{sorted(_ARCHITECTURES)}")
        cls = _ARCHITECTURES[archs[0]]
    else:
        cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    tensors = convert.load_safetensors(folder, "model")
    if not any(k.startswith("text_model.") for k in tensors):
        tensors = {f"text_model.{k}": v for k, v in tensors.items()}
    model = uninitialized(lambda: cls(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
    # position_ids is a non-persistent torch buffer, but transformers < 4.31 saved it.
    convert.assign_torch_state(model, tensors, ignore_unexpected=lambda k: k.endswith("embeddings.position_ids"))
    return model


def encode_text(model: nnx.Module, input_ids: np.ndarray | jax.Array) -> CLIPTextOutput:
    """Runs a text encoder once under ``jax.jit`` through split → pure function → merge (e.g. to cache prompt
    embeddings so a train step runs only the UNet)."""
    graphdef, state = nnx.split(model)
    return _apply(graphdef, state, jnp.asarray(input_ids, dtype=jnp.int32))


@functools.partial(jit, static_argnums=0)
def _apply(graphdef: nnx.GraphDef, state: nnx.State, input_ids: jax.Array) -> CLIPTextOutput:
    return nnx.merge(graphdef, state)(input_ids)
