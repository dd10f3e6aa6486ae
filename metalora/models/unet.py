"""Flax NNX implementation of diffusers' ``UNet2DConditionModel`` (SD-1.x, SD-2.x, SDXL).

The model is driven by the same ``config.json`` fields as diffusers (see ``UNetConfig``); values we do not
implement raise ``UnsupportedConfigError`` naming the field, instead of silently building a different network.

Layout: the public call takes and returns **NHWC** (``(B, H, W, C)``) tensors — channels-last is what XLA wants
for convolutions; transpose diffusers' NCHW latents with ``x.transpose(0, 2, 3, 1)``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
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
FIXED_FIELDS: dict[str, tuple] = {
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
IGNORED_FIELDS = {"sample_size"}


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
        result = cls(**parse_diffusers_config(config, kind="UNet", fields={f.name for f in dataclasses.fields(cls)},
                                              fixed=FIXED_FIELDS, ignored=IGNORED_FIELDS,
                                              kept={"addition_embed_type"}))
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


def parse_diffusers_config(config: Mapping[str, Any], *, kind: str, fields: set[str], fixed: Mapping[str, tuple],
                           ignored: set[str] = frozenset(), kept: set[str] = frozenset()) -> dict[str, Any]:
    """Our dataclass kwargs from a diffusers ``config.json`` dict (shared by the UNet and the ControlNet configs).

    ``fixed`` fields must hold one of the listed values (anything else builds a different network, so it is refused
    naming the field); they are dropped unless also ``kept``. Private (``_``-prefixed) and ``ignored`` fields are
    skipped; any other field must be one of ``fields``. Lists become tuples so the config stays hashable.
    """
    kwargs = {}
    for key, value in config.items():
        if key.startswith("_") or key in ignored:
            continue
        if key in fixed:
            if value not in fixed[key]:
                raise UnsupportedConfigError(
                    f"{kind} config field '{key}'={value!r} is not supported (supported: {fixed[key]})")
            if key in kept:
                kwargs[key] = value
            continue
        if key not in fields:
            raise UnsupportedConfigError(f"unknown {kind} config field '{key}'={value!r}")
        kwargs[key] = _freeze(value)
    return kwargs


def _freeze(value):
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


def _per_layer(value, num_layers: int) -> tuple[int, ...]:
    return (value,) * num_layers if isinstance(value, int) else tuple(value)


def block_spec(config: UNetConfig, i: int, num_layers: int, transformer_layers: int | tuple[int, ...],
               output_scale_factor: float) -> BlockSpec:
    """Block ``i``'s settings (heads, cross-attention width, ...) resolved from the config."""
    return BlockSpec(temb_channels=config.time_embed_dim, groups=config.norm_num_groups, eps=config.norm_eps,
                     heads=config.per_block("attention_head_dim")[i],
                     cross_attention_dim=config.per_block("cross_attention_dim")[i],
                     use_linear_projection=config.use_linear_projection, upcast_attention=config.upcast_attention,
                     transformer_layers=_per_layer(transformer_layers, num_layers),
                     output_scale_factor=output_scale_factor)


def build_time_embeddings(config: UNetConfig, p: Precision, rngs: nnx.Rngs
                          ) -> tuple[TimestepEmbedding, TimestepEmbedding | TextTimeEmbedding | None]:
    """``time_embedding`` and ``add_embedding`` (None, SDXL's "text_time" MLP, or the pooled-prompt "text" one).

    Shared by the UNet and the ControlNet, whose encoders must embed time identically for weights to transfer.
    """
    temb = config.time_embed_dim
    time_embedding = TimestepEmbedding(config.block_out_channels[0], temb, precision=p, rngs=rngs)
    if config.addition_embed_type == "text_time":
        add_embedding = TimestepEmbedding(config.projection_class_embeddings_input_dim, temb, precision=p, rngs=rngs)
    elif config.addition_embed_type == "text":
        add_embedding = TextTimeEmbedding(config.per_block("cross_attention_dim")[0], temb,
                                          config.addition_embed_type_num_heads, precision=p, rngs=rngs)
    else:
        add_embedding = None
    return time_embedding, add_embedding


def embed_time(config: UNetConfig, time_embedding: TimestepEmbedding, add_embedding, timesteps: jax.Array | float,
               batch: int, context: jax.Array, added_cond_kwargs: Mapping[str, jax.Array] | None,
               dtype) -> jax.Array:
    """The (B, time_embed_dim) embedding every resnet receives: timestep MLP plus the optional added embedding."""
    t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32).reshape(-1), (batch,))
    t_emb = timestep_embedding(t, config.block_out_channels[0], flip_sin_to_cos=config.flip_sin_to_cos,
                               freq_shift=config.freq_shift)
    emb = time_embedding(t_emb.astype(dtype))
    if config.addition_embed_type == "text":  # a pooled summary of the prompt
        emb = emb + add_embedding(context)
    elif config.addition_embed_type == "text_time":
        emb = emb + _text_time_embedding(config, add_embedding, added_cond_kwargs, batch, dtype)
    return emb


def _text_time_embedding(config: UNetConfig, add_embedding: TimestepEmbedding, added_cond_kwargs, batch: int,
                         dtype) -> jax.Array:
    if not added_cond_kwargs or "text_embeds" not in added_cond_kwargs or "time_ids" not in added_cond_kwargs:
        raise ValueError("this model uses addition_embed_type='text_time' (SDXL): pass "
                         "added_cond_kwargs={'text_embeds': (B, D), 'time_ids': (B, 6)}")
    text_embeds = added_cond_kwargs["text_embeds"]
    time_ids = jnp.asarray(added_cond_kwargs["time_ids"]).reshape(-1)
    time_embeds = timestep_embedding(time_ids, config.addition_time_embed_dim, flip_sin_to_cos=config.flip_sin_to_cos,
                                     freq_shift=config.freq_shift).reshape(batch, -1)
    return add_embedding(jnp.concatenate([text_embeds, time_embeds], axis=-1).astype(dtype))


def build_down_blocks(config: UNetConfig, p: Precision, rngs: nnx.Rngs) -> nnx.List:
    """The encoder's down blocks (shared with the ControlNet, which copies them from the UNet)."""
    channels = config.block_out_channels
    layers = config.per_block("layers_per_block")
    t_layers = config.per_block("transformer_layers_per_block")
    return nnx.List([
        DownBlock2D(channels[max(i - 1, 0)], channels[i], num_layers=layers[i], add_downsample=i < len(channels) - 1,
                    cross_attention=_DOWN_TYPES[block_type],
                    spec=block_spec(config, i, layers[i], t_layers[i], config.resnet_out_scale_factor),
                    precision=p, rngs=rngs)
        for i, block_type in enumerate(config.down_block_types)])


def build_mid_block(config: UNetConfig, p: Precision, rngs: nnx.Rngs) -> UNetMidBlock2DCrossAttn:
    n = len(config.block_out_channels)
    t_layers = config.per_block("transformer_layers_per_block")
    return UNetMidBlock2DCrossAttn(config.block_out_channels[-1],
                                   spec=block_spec(config, n - 1, 1, t_layers[-1], config.mid_block_scale_factor),
                                   precision=p, rngs=rngs)


def run_down_blocks(down_blocks: nnx.List, x: jax.Array, emb: jax.Array, context: jax.Array
                    ) -> tuple[jax.Array, list[jax.Array]]:
    """Runs the down path after ``conv_in``; returns the lowest-resolution features and every skip connection in
    diffusers' order: conv_in's output, then each resnet(+attention) output, then each downsampler output."""
    skips = [x]
    for block in down_blocks:
        x, block_skips = block(x, emb, context)
        skips.extend(block_skips)
    return x, skips


def down_residual_channels(config: UNetConfig) -> tuple[int, ...]:
    """Channels of each skip connection ``run_down_blocks`` returns, in order (one ControlNet zero conv each)."""
    channels = config.block_out_channels
    out = [channels[0]]
    for i, layers in enumerate(config.per_block("layers_per_block")):
        out += [channels[i]] * layers + ([channels[i]] if i < len(channels) - 1 else [])
    return tuple(out)


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

        self.conv_in = p.conv(config.in_channels, channels[0], config.conv_in_kernel, rngs=rngs)
        self.time_embedding, self.add_embedding = build_time_embeddings(config, p, rngs)
        self.down_blocks = build_down_blocks(config, p, rngs)
        self.mid_block = build_mid_block(config, p, rngs)

        rev_channels = channels[::-1]
        rev_t_layers = (config.reverse_transformer_layers_per_block if config.reverse_transformer_layers_per_block
                        is not None else config.per_block("transformer_layers_per_block")[::-1])
        up = []
        for i, block_type in enumerate(config.up_block_types):
            j = n - 1 - i  # the down block this up block mirrors
            num_layers = layers[::-1][i] + 1
            up_spec = block_spec(config, j, num_layers, rev_t_layers[i], config.resnet_out_scale_factor)
            up.append(UpBlock2D(rev_channels[min(i + 1, n - 1)], rev_channels[max(i - 1, 0)], rev_channels[i],
                                num_layers=num_layers, add_upsample=i < n - 1, cross_attention=_UP_TYPES[block_type],
                                spec=up_spec, precision=p, rngs=rngs))
        self.up_blocks = nnx.List(up)

        self.conv_norm_out = p.group_norm(channels[0], config.norm_num_groups, config.norm_eps, rngs=rngs)
        self.conv_out = p.conv(channels[0], config.out_channels, config.conv_out_kernel, rngs=rngs)

    def __call__(self, sample: jax.Array, timesteps: jax.Array | float, encoder_hidden_states: jax.Array,
                 added_cond_kwargs: Mapping[str, jax.Array] | None = None, *,
                 down_block_additional_residuals: Sequence[jax.Array] | None = None,
                 mid_block_additional_residual: jax.Array | None = None) -> jax.Array:
        """Predicts the diffusion target for NHWC ``sample`` at ``timesteps`` given text ``encoder_hidden_states``.

        ``added_cond_kwargs`` (SDXL): ``text_embeds`` (B, pooled dim) and ``time_ids`` (B, 6) micro-conditioning.
        ``down_block_additional_residuals`` / ``mid_block_additional_residual`` (NHWC, e.g. a ControlNet's output):
        added to every skip connection before the up path and to the mid block's output, as diffusers does. Both or
        neither: diffusers reads down residuals alone as a (deprecated) T2I-Adapter input, which we do not build.
        """
        config = self.config
        batch = sample.shape[0]
        x = sample.astype(self.dtype)
        if config.center_input_sample:
            x = 2 * x - 1.0
        context = encoder_hidden_states.astype(self.dtype)
        emb = embed_time(config, self.time_embedding, self.add_embedding, timesteps, batch, context,
                         added_cond_kwargs, self.dtype)

        # Odd spatial sizes: upsample to each skip connection's exact size rather than ×2.
        factor = 2 ** (len(config.block_out_channels) - 1)
        forward_upsample_size = any(s % factor for s in x.shape[1:3])

        x, skips = run_down_blocks(self.down_blocks, self.conv_in(x), emb, context)
        x = self.mid_block(x, emb, context)
        if down_block_additional_residuals is not None or mid_block_additional_residual is not None:
            skips, x = self._add_residuals(skips, x, down_block_additional_residuals, mid_block_additional_residual)
        for i, block in enumerate(self.up_blocks):
            count = len(block.resnets)
            block_skips, skips = skips[-count:], skips[:-count]
            upsample_size = skips[-1].shape[1:3] if (forward_upsample_size and i < len(self.up_blocks) - 1) else None
            x = block(x, block_skips, emb, context, upsample_size)
        return self.conv_out(nnx.silu(self.conv_norm_out(x)))

    def _add_residuals(self, skips: list[jax.Array], mid: jax.Array, down_residuals, mid_residual
                       ) -> tuple[list[jax.Array], jax.Array]:
        if down_residuals is None or mid_residual is None:
            raise ValueError("pass both down_block_additional_residuals and mid_block_additional_residual (a "
                             "ControlNet's two outputs); down residuals alone (T2I-Adapter) are not supported")
        if len(down_residuals) != len(skips):
            raise ValueError(f"down_block_additional_residuals has {len(down_residuals)} entries, this UNet has "
                             f"{len(skips)} skip connections (channels {down_residual_channels(self.config)})")
        skips = [s + r.astype(s.dtype) for s, r in zip(skips, down_residuals, strict=True)]
        return skips, mid + mid_residual.astype(mid.dtype)


ADDED_CONDITIONS = ("text_embeds", "time_ids")


def added_conditions(cond: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ``added_cond_kwargs`` in a conditioning dict (SDXL's pooled ``text_embeds`` and size/crop ``time_ids``),
    or None when it holds neither: what ``UNet2DConditionModel.__call__`` takes next to the hidden states."""
    return {k: cond[k] for k in ADDED_CONDITIONS if k in cond} or None


def sdxl_time_ids(batch: int, *, original_size: tuple[int, int], target_size: tuple[int, int],
                  crops_coords_top_left: tuple[int, int] = (0, 0), dtype: Any = jnp.float32) -> jax.Array:
    """SDXL's micro-conditioning ``time_ids`` (B, 6): (orig_h, orig_w, crop_top, crop_left, target_h, target_w),
    each pair an (h, w) in pixels, the same row for the whole batch."""
    row = [*original_size, *crops_coords_top_left, *target_size]
    if len(row) != 6:
        raise ValueError("original_size, crops_coords_top_left and target_size must each be (h, w) pairs")
    return jnp.tile(jnp.asarray([row], dtype), (batch, 1))


def count_params(model_or_state: Any) -> int:
    """Number of scalar parameters of a model or state (works on abstract ``nnx.eval_shape`` models too)."""
    state = nnx.state(model_or_state, nnx.Param) if isinstance(model_or_state, nnx.Module) else model_or_state
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(state))
