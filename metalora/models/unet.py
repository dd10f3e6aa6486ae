"""Flax NNX implementation of diffusers' ``UNet2DConditionModel`` (SD-1.x, SD-2.x, SDXL).

The model is driven by the same ``config.json`` fields as diffusers (see ``UNetConfig``); values we do not
implement raise ``UnsupportedConfigError`` naming the field, instead of silently building a different network.

Layout: the public call takes and returns **NHWC** (``(B, H, W, C)``) tensors — channels-last is what XLA wants
for convolutions; transpose diffusers' NCHW latents with ``x.transpose(0, 2, 3, 1)``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from metalora.models.unet_blocks import (
    BlockSpec,
    DownBlock2D,
    Precision,
    TextTimeEmbedding,
    TimestepEmbedding,
    UNetMidBlock2DCrossAttn,
    UpBlock2D,
    timestep_embedding,
)

_DOWN_TYPES = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}  # type -> has cross-attention
_UP_TYPES = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}


class UnsupportedConfigError(ValueError):
    """A diffusers UNet config asks for something this implementation does not build."""


# Fields whose value must be one of the listed ones (the SD family's values); anything else is refused.
_FIXED_FIELDS: dict[str, tuple] = {
    "act_fn": ("silu",),
    "time_embedding_type": ("positional",),
    "resnet_time_scale_shift": ("default",),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "dual_cross_attention": (False,),
    "only_cross_attention": (False,),
    "mid_block_only_cross_attention": (None, False),
    "attention_type": ("default",),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "class_embeddings_concat": (False,),
    "cross_attention_norm": (None,),
    "resnet_skip_time_act": (False,),
    "downsample_padding": (1,),
    "dropout": (0.0, 0),
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "addition_embed_type": (None, "text", "text_time"),
    "num_attention_heads": (None,),  # diffusers itself refuses it; heads come from `attention_head_dim`
}
# Informational fields that do not change the network.
_IGNORED_FIELDS = {"sample_size"}


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The subset of diffusers' ``UNet2DConditionModel`` config that defines the SD-family networks.

    ``attention_head_dim`` keeps diffusers' historical meaning: it is the **number of heads** per block
    (diffusers issue #2011); each head has ``channels // heads`` dimensions.
    """

    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    mid_block_scale_factor: float = 1.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple[int, ...] = 768
    transformer_layers_per_block: int | tuple = 1
    reverse_transformer_layers_per_block: tuple | None = None
    attention_head_dim: int | tuple[int, ...] = 8
    use_linear_projection: bool = False
    upcast_attention: bool = False
    resnet_out_scale_factor: float = 1.0
    time_embedding_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    addition_embed_type_num_heads: int = 64
    projection_class_embeddings_input_dim: int | None = None

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> UNetConfig:
        """Builds the config from a diffusers ``config.json`` dict, refusing anything we would build wrongly."""
        own = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in config.items():
            if key.startswith("_") or key in _IGNORED_FIELDS:
                continue
            if key in _FIXED_FIELDS:
                if value not in _FIXED_FIELDS[key]:
                    raise UnsupportedConfigError(
                        f"UNet config field '{key}'={value!r} is not supported (supported: {_FIXED_FIELDS[key]})")
                if key == "addition_embed_type":
                    kwargs[key] = value
                continue
            if key not in own:
                raise UnsupportedConfigError(f"unknown UNet config field '{key}'={value!r}")
            kwargs[key] = _freeze(value)
        result = cls(**kwargs)
        result.validate()
        return result

    def validate(self) -> None:
        n = len(self.block_out_channels)
        for field, types, table in (("down_block_types", self.down_block_types, _DOWN_TYPES),
                                    ("up_block_types", self.up_block_types, _UP_TYPES)):
            if len(types) != n:
                raise UnsupportedConfigError(f"'{field}' has {len(types)} entries, block_out_channels has {n}")
            for t in types:
                if t not in table:
                    raise UnsupportedConfigError(f"'{field}' entry '{t}' is not supported (supported: {list(table)})")
        for field in ("layers_per_block", "cross_attention_dim", "attention_head_dim", "transformer_layers_per_block"):
            value = getattr(self, field)
            if not isinstance(value, int) and len(value) != n:
                raise UnsupportedConfigError(f"'{field}' has {len(value)} entries, block_out_channels has {n}")
        for i, (channels, heads) in enumerate(zip(self.block_out_channels, self.per_block("attention_head_dim"),
                                                  strict=True)):
            if channels % heads:
                raise UnsupportedConfigError(f"attention_head_dim[{i}]={heads} heads do not divide {channels} channels")
            if channels % self.norm_num_groups:
                raise UnsupportedConfigError(f"norm_num_groups={self.norm_num_groups} does not divide {channels}")
        if self.addition_embed_type == "text_time" and (self.addition_time_embed_dim is None
                                                        or self.projection_class_embeddings_input_dim is None):
            raise UnsupportedConfigError("addition_embed_type='text_time' needs 'addition_time_embed_dim' and "
                                         "'projection_class_embeddings_input_dim'")
        if self.addition_embed_type == "text":
            dims = set(self.per_block("cross_attention_dim"))
            if len(dims) != 1:
                raise UnsupportedConfigError("addition_embed_type='text' pools the prompt's hidden states: it needs "
                                             f"one cross_attention_dim, got {self.cross_attention_dim}")
            if dims.pop() % self.addition_embed_type_num_heads:
                raise UnsupportedConfigError(f"addition_embed_type_num_heads={self.addition_embed_type_num_heads} "
                                             f"does not divide cross_attention_dim={self.cross_attention_dim}")
        if self.conv_in_kernel % 2 == 0 or self.conv_out_kernel % 2 == 0:
            raise UnsupportedConfigError("conv_in_kernel / conv_out_kernel must be odd")

    def per_block(self, field: str) -> tuple:
        value = getattr(self, field)
        return (value,) * len(self.block_out_channels) if isinstance(value, int) else tuple(value)

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    def to_diffusers(self) -> dict[str, Any]:
        """The config as diffusers writes it (for exporting and for building the torch twin in tests)."""
        out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}
        out["mid_block_type"] = "UNetMidBlock2DCrossAttn"
        return out


def _freeze(value):
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


def _per_layer(value, num_layers: int) -> tuple[int, ...]:
    return (value,) * num_layers if isinstance(value, int) else tuple(value)


class UNet2DConditionModel(nnx.Module):
    """The SD UNet. ``model(sample_nhwc, timesteps, encoder_hidden_states, added_cond_kwargs=None)``."""

    def __init__(self, config: UNetConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 attention_backend: str = "auto", remat: bool = False):
        config.validate()
        self.config = config
        p = Precision(dtype=dtype, param_dtype=param_dtype, attention_backend=attention_backend, remat=remat)
        self.dtype = dtype
        channels = config.block_out_channels
        n = len(channels)
        layers = config.per_block("layers_per_block")
        heads = config.per_block("attention_head_dim")
        cross_dims = config.per_block("cross_attention_dim")
        t_layers = config.per_block("transformer_layers_per_block")
        temb = config.time_embed_dim

        def spec(i: int, num_layers: int, transformer_layers, scale: float) -> BlockSpec:
            return BlockSpec(temb_channels=temb, groups=config.norm_num_groups, eps=config.norm_eps, heads=heads[i],
                             cross_attention_dim=cross_dims[i], use_linear_projection=config.use_linear_projection,
                             upcast_attention=config.upcast_attention,
                             transformer_layers=_per_layer(transformer_layers, num_layers), output_scale_factor=scale)

        self.conv_in = p.conv(config.in_channels, channels[0], config.conv_in_kernel, rngs=rngs)
        self.time_embedding = TimestepEmbedding(channels[0], temb, precision=p, rngs=rngs)
        if config.addition_embed_type == "text_time":
            self.add_embedding = TimestepEmbedding(config.projection_class_embeddings_input_dim, temb, precision=p,
                                                   rngs=rngs)
        elif config.addition_embed_type == "text":
            self.add_embedding = TextTimeEmbedding(cross_dims[0], temb, config.addition_embed_type_num_heads,
                                                   precision=p, rngs=rngs)
        else:
            self.add_embedding = None

        down = []
        for i, block_type in enumerate(config.down_block_types):
            c_in = channels[max(i - 1, 0)]
            down.append(DownBlock2D(c_in, channels[i], num_layers=layers[i], add_downsample=i < n - 1,
                                    cross_attention=_DOWN_TYPES[block_type],
                                    spec=spec(i, layers[i], t_layers[i], config.resnet_out_scale_factor),
                                    precision=p, rngs=rngs))
        self.down_blocks = nnx.List(down)

        self.mid_block = UNetMidBlock2DCrossAttn(channels[-1], spec=spec(n - 1, 1, t_layers[-1],
                                                                         config.mid_block_scale_factor),
                                                 precision=p, rngs=rngs)

        rev_channels = channels[::-1]
        rev_t_layers = (config.reverse_transformer_layers_per_block if config.reverse_transformer_layers_per_block
                        is not None else t_layers[::-1])
        up = []
        for i, block_type in enumerate(config.up_block_types):
            j = n - 1 - i  # the down block this up block mirrors
            num_layers = layers[::-1][i] + 1
            up_spec = spec(j, num_layers, rev_t_layers[i], config.resnet_out_scale_factor)
            up.append(UpBlock2D(rev_channels[min(i + 1, n - 1)], rev_channels[max(i - 1, 0)], rev_channels[i],
                                num_layers=num_layers, add_upsample=i < n - 1, cross_attention=_UP_TYPES[block_type],
                                spec=up_spec, precision=p, rngs=rngs))
        self.up_blocks = nnx.List(up)

        self.conv_norm_out = p.group_norm(channels[0], config.norm_num_groups, config.norm_eps, rngs=rngs)
        self.conv_out = p.conv(channels[0], config.out_channels, config.conv_out_kernel, rngs=rngs)

    def __call__(self, sample: jax.Array, timesteps: jax.Array | float, encoder_hidden_states: jax.Array,
                 added_cond_kwargs: Mapping[str, jax.Array] | None = None) -> jax.Array:
        """Predicts the diffusion target for NHWC ``sample`` at ``timesteps`` given text ``encoder_hidden_states``.

        ``added_cond_kwargs`` (SDXL): ``text_embeds`` (B, pooled dim) and ``time_ids`` (B, 6) micro-conditioning.
        """
        config = self.config
        batch = sample.shape[0]
        x = sample.astype(self.dtype)
        if config.center_input_sample:
            x = 2 * x - 1.0
        context = encoder_hidden_states.astype(self.dtype)

        t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32).reshape(-1), (batch,))
        t_emb = timestep_embedding(t, config.block_out_channels[0], flip_sin_to_cos=config.flip_sin_to_cos,
                                   freq_shift=config.freq_shift)
        emb = self.time_embedding(t_emb.astype(self.dtype))
        if config.addition_embed_type == "text":  # a pooled summary of the prompt
            emb = emb + self.add_embedding(context)
        elif config.addition_embed_type == "text_time":
            emb = emb + self._text_time_embedding(added_cond_kwargs, batch)

        # Odd spatial sizes: upsample to each skip connection's exact size rather than ×2.
        factor = 2 ** (len(config.block_out_channels) - 1)
        forward_upsample_size = any(s % factor for s in x.shape[1:3])

        x = self.conv_in(x)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, emb, context)
            skips.extend(block_skips)
        x = self.mid_block(x, emb, context)
        for i, block in enumerate(self.up_blocks):
            count = len(block.resnets)
            block_skips, skips = skips[-count:], skips[:-count]
            upsample_size = skips[-1].shape[1:3] if (forward_upsample_size and i < len(self.up_blocks) - 1) else None
            x = block(x, block_skips, emb, context, upsample_size)
        return self.conv_out(nnx.silu(self.conv_norm_out(x)))

    def _text_time_embedding(self, added_cond_kwargs, batch: int) -> jax.Array:
        if not added_cond_kwargs or "text_embeds" not in added_cond_kwargs or "time_ids" not in added_cond_kwargs:
            raise ValueError("this UNet uses addition_embed_type='text_time' (SDXL): pass "
                             "added_cond_kwargs={'text_embeds': (B, D), 'time_ids': (B, 6)}")
        text_embeds = added_cond_kwargs["text_embeds"]
        time_ids = jnp.asarray(added_cond_kwargs["time_ids"]).reshape(-1)
        time_embeds = timestep_embedding(time_ids, self.config.addition_time_embed_dim,
                                         flip_sin_to_cos=self.config.flip_sin_to_cos,
                                         freq_shift=self.config.freq_shift).reshape(batch, -1)
        return self.add_embedding(jnp.concatenate([text_embeds, time_embeds], axis=-1).astype(self.dtype))


def count_params(model_or_state: Any) -> int:
    """Number of scalar parameters of a model or state (works on abstract ``nnx.eval_shape`` models too)."""
    state = nnx.state(model_or_state, nnx.Param) if isinstance(model_or_state, nnx.Module) else model_or_state
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(state))
