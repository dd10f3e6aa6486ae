"""Flax NNX implementation of diffusers' ``ControlNetModel`` (SD-1.x/2.x and SDXL ControlNets).

A ControlNet is a trainable copy of the UNet's encoder (``conv_in``, time embeddings, down blocks, mid block) that also
sees a conditioning image (edges, depth, pose, ...) through a small conv stack, and emits one residual per UNet skip
connection plus one for the mid block. Every residual passes through a zero-initialised 1×1 conv ("zero convolution"),
so a fresh ControlNet leaves the UNet unchanged; the UNet adds them with ``down_block_additional_residuals`` /
``mid_block_additional_residual``.

The encoder is built by the same helpers as ``UNet2DConditionModel`` (``build_down_blocks`` etc.), so attribute paths
match diffusers' state-dict keys and ``controlnet_from_unet`` can copy a UNet's weights one to one. Tensors are NHWC,
the conditioning image included: ``(B, H·f, W·f, conditioning_channels)`` with ``f = 2**(len(
conditioning_embedding_out_channels) - 1)`` (8 for the published ControlNets: the image is at pixel resolution).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from metalora.models.unet import (
    FIXED_FIELDS,
    IGNORED_FIELDS,
    UNet2DConditionModel,
    UNetConfig,
    UnsupportedConfigError,
    build_down_blocks,
    build_mid_block,
    build_time_embeddings,
    down_residual_channels,
    embed_time,
    parse_diffusers_config,
    run_down_blocks,
)
from metalora.models.unet_blocks import Precision

# The UNet's fixed-value fields that a ControlNet config also carries (same meaning, same supported values).
_CONTROLNET_FIXED_FIELDS = {key: FIXED_FIELDS[key] for key in (
    "act_fn", "resnet_time_scale_shift", "class_embed_type", "num_class_embeds", "encoder_hid_dim",
    "encoder_hid_dim_type", "only_cross_attention", "downsample_padding", "mid_block_type", "num_attention_heads",
    "addition_embed_type")}
# The up block that mirrors each down block: only used to give the encoder's UNetConfig a valid decoder description.
_MIRROR = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}
_CHANNEL_ORDERS = ("rgb", "bgr")


@dataclasses.dataclass(frozen=True)
class ControlNetConfig:
    """diffusers' ``ControlNetModel`` config: the UNet-encoder fields plus the conditioning-image fields.

    Unlike the UNet, diffusers' ControlNet takes one ``layers_per_block`` and one ``cross_attention_dim`` for all
    blocks (its zero-conv list is built from the int), so tuples are refused rather than building something diffusers
    cannot load. The encoder itself is described by ``unet_config`` (validated by ``UNetConfig``'s own rules).
    """

    in_channels: int = 4
    conditioning_channels: int = 3
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    mid_block_scale_factor: float = 1.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    transformer_layers_per_block: int | tuple[int, ...] = 1
    attention_head_dim: int | tuple[int, ...] = 8
    use_linear_projection: bool = False
    upcast_attention: bool = False
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    addition_embed_type_num_heads: int = 64
    projection_class_embeddings_input_dim: int | None = None
    controlnet_conditioning_channel_order: str = "rgb"
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    global_pool_conditions: bool = False

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> ControlNetConfig:
        """Builds the config from a diffusers ``config.json`` dict, refusing anything we would build wrongly."""
        result = cls(**parse_diffusers_config(config, kind="ControlNet",
                                              fields={f.name for f in dataclasses.fields(cls)},
                                              fixed=_CONTROLNET_FIXED_FIELDS, ignored=IGNORED_FIELDS,
                                              kept={"addition_embed_type"}))
        result.validate()
        return result

    def validate(self) -> None:
        for field in ("layers_per_block", "cross_attention_dim"):
            if not isinstance(getattr(self, field), int):
                raise UnsupportedConfigError(f"ControlNet config field '{field}'={getattr(self, field)!r}: diffusers' "
                                             "ControlNetModel takes one int for every block")
        if self.controlnet_conditioning_channel_order not in _CHANNEL_ORDERS:
            raise UnsupportedConfigError(f"ControlNet config field 'controlnet_conditioning_channel_order'="
                                         f"{self.controlnet_conditioning_channel_order!r} is not supported "
                                         f"(supported: {_CHANNEL_ORDERS})")
        if not self.conditioning_embedding_out_channels:
            raise UnsupportedConfigError("ControlNet config field 'conditioning_embedding_out_channels' must list at "
                                         "least one channel count")
        self.unet_config.validate()

    @property
    def unet_config(self) -> UNetConfig:
        """The encoder as a ``UNetConfig`` (up blocks mirrored so the UNet's validation applies; never built)."""
        return UNetConfig(
            in_channels=self.in_channels, out_channels=self.in_channels, flip_sin_to_cos=self.flip_sin_to_cos,
            freq_shift=self.freq_shift, down_block_types=self.down_block_types,
            up_block_types=tuple(_MIRROR.get(t, t) for t in self.down_block_types[::-1]),
            block_out_channels=self.block_out_channels, layers_per_block=self.layers_per_block,
            mid_block_scale_factor=self.mid_block_scale_factor, norm_num_groups=self.norm_num_groups,
            norm_eps=self.norm_eps, cross_attention_dim=self.cross_attention_dim,
            transformer_layers_per_block=self.transformer_layers_per_block,
            attention_head_dim=self.attention_head_dim, use_linear_projection=self.use_linear_projection,
            upcast_attention=self.upcast_attention, addition_embed_type=self.addition_embed_type,
            addition_time_embed_dim=self.addition_time_embed_dim,
            addition_embed_type_num_heads=self.addition_embed_type_num_heads,
            projection_class_embeddings_input_dim=self.projection_class_embeddings_input_dim)

    @property
    def conditioning_downscale(self) -> int:
        """How much smaller than the conditioning image the latent sample is (8 for the published ControlNets)."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

    def to_diffusers(self) -> dict[str, Any]:
        """The config as diffusers writes it (for exporting and for building the torch twin in tests)."""
        out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}
        out["mid_block_type"] = "UNetMidBlock2DCrossAttn"
        return out


class ControlNetConditioningEmbedding(nnx.Module):
    """Conditioning image → features at the latent resolution, added to ``conv_in``'s output.

    ``conv_in`` (3×3), then per level a 3×3 conv and a stride-2 3×3 conv (``blocks[2i]``, ``blocks[2i+1]``), each
    followed by SiLU; ``conv_out`` (3×3) is zero-initialised so the image has no effect before training.
    """

    def __init__(self, conditioning_channels: int, embedding_channels: int, block_out_channels: tuple[int, ...], *,
                 precision: Precision, rngs: nnx.Rngs):
        self.conv_in = precision.conv(conditioning_channels, block_out_channels[0], 3, rngs=rngs)
        blocks = []
        for c_in, c_out in itertools.pairwise(block_out_channels):
            blocks.append(precision.conv(c_in, c_in, 3, rngs=rngs))
            blocks.append(precision.conv(c_in, c_out, 3, stride=2, padding=1, rngs=rngs))
        self.blocks = nnx.List(blocks)
        self.conv_out = precision.conv(block_out_channels[-1], embedding_channels, 3, zero_init=True, rngs=rngs)

    def __call__(self, conditioning: jax.Array) -> jax.Array:
        x = nnx.silu(self.conv_in(conditioning))
        for conv in self.blocks:
            x = nnx.silu(conv(x))
        return self.conv_out(x)


class ControlNetModel(nnx.Module):
    """``model(sample_nhwc, timesteps, encoder_hidden_states, controlnet_cond_nhwc) -> (down residuals, mid residual)``.

    Feed the result to ``UNet2DConditionModel(..., down_block_additional_residuals=down,
    mid_block_additional_residual=mid)``.
    """

    def __init__(self, config: ControlNetConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 attention_backend: str = "auto", remat: bool = False):
        config.validate()
        self.config = config
        self.dtype = dtype
        encoder = config.unet_config
        p = Precision(dtype=dtype, param_dtype=param_dtype, attention_backend=attention_backend, remat=remat)
        channels = config.block_out_channels

        self.conv_in = p.conv(config.in_channels, channels[0], encoder.conv_in_kernel, rngs=rngs)
        self.time_embedding, self.add_embedding = build_time_embeddings(encoder, p, rngs)
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            config.conditioning_channels, channels[0], config.conditioning_embedding_out_channels, precision=p,
            rngs=rngs)
        self.down_blocks = build_down_blocks(encoder, p, rngs)
        # One zero conv per skip connection, in the order ``run_down_blocks`` returns them (diffusers' order).
        self.controlnet_down_blocks = nnx.List([p.conv(c, c, 1, zero_init=True, rngs=rngs)
                                                for c in down_residual_channels(encoder)])
        self.mid_block = build_mid_block(encoder, p, rngs)
        self.controlnet_mid_block = p.conv(channels[-1], channels[-1], 1, zero_init=True, rngs=rngs)

    def __call__(self, sample: jax.Array, timesteps: jax.Array | float, encoder_hidden_states: jax.Array,
                 controlnet_cond: jax.Array, conditioning_scale: float | jax.Array = 1.0,
                 added_cond_kwargs: Mapping[str, jax.Array] | None = None, *,
                 guess_mode: bool = False) -> tuple[tuple[jax.Array, ...], jax.Array]:
        """The residuals for NHWC ``sample`` given the NHWC conditioning image ``controlnet_cond``.

        Every residual is multiplied by ``conditioning_scale``. ``guess_mode`` (diffusers'): scales the residuals
        geometrically from 0.1 (highest resolution) to 1.0 (mid block), for prompt-free control. With
        ``global_pool_conditions`` each residual is averaged over space, (B, 1, 1, C), and broadcast by the UNet.
        """
        config = self.config
        encoder = config.unet_config
        batch = sample.shape[0]
        x = sample.astype(self.dtype)
        context = encoder_hidden_states.astype(self.dtype)
        emb = embed_time(encoder, self.time_embedding, self.add_embedding, timesteps, batch, context,
                         added_cond_kwargs, self.dtype)

        cond = controlnet_cond.astype(self.dtype)
        if config.controlnet_conditioning_channel_order == "bgr":  # as diffusers: reverse the channel axis
            cond = cond[..., ::-1]
        x = self.conv_in(x)
        cond = self.controlnet_cond_embedding(cond)
        if cond.shape != x.shape:
            raise ValueError(f"controlnet_cond {tuple(controlnet_cond.shape)} embeds to {tuple(cond.shape)}, the "
                             f"sample to {tuple(x.shape)}: the conditioning image must be "
                             f"{config.conditioning_downscale}× the sample's height and width (NHWC)")
        x, skips = run_down_blocks(self.down_blocks, x + cond, emb, context)
        x = self.mid_block(x, emb, context)

        down = [conv(skip) for conv, skip in zip(self.controlnet_down_blocks, skips, strict=True)]
        mid = self.controlnet_mid_block(x)
        down, mid = _scale_residuals(down, mid, conditioning_scale,
                                     guess_mode=guess_mode and not config.global_pool_conditions)
        if config.global_pool_conditions:
            down = [jnp.mean(r, axis=(1, 2), keepdims=True) for r in down]
            mid = jnp.mean(mid, axis=(1, 2), keepdims=True)
        return tuple(down), mid


def _scale_residuals(down: list[jax.Array], mid: jax.Array, conditioning_scale, *, guess_mode: bool
                     ) -> tuple[list[jax.Array], jax.Array]:
    if not guess_mode:
        return [r * conditioning_scale for r in down], mid * conditioning_scale
    # Guess mode: 10**-1 … 10**0 over the skips then the mid block, so coarse features dominate.
    scales = [10.0 ** (-1.0 + i / len(down)) * conditioning_scale for i in range(len(down) + 1)]
    return [r * s for r, s in zip(down, scales[:-1], strict=True)], mid * scales[-1]


def controlnet_config_from_unet(unet_config: UNetConfig, *, conditioning_channels: int = 3,
                                conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256),
                                controlnet_conditioning_channel_order: str = "rgb",
                                global_pool_conditions: bool = False) -> ControlNetConfig:
    """The ControlNet whose encoder has the UNet's exact architecture (what diffusers' ``from_unet`` configures)."""
    # diffusers' ControlNet always uses a 3×3 conv_in, 4×block_out_channels[0] time embedding and unscaled resnets.
    for field, value, expected in (("conv_in_kernel", unet_config.conv_in_kernel, 3),
                                   ("time_embedding_dim", unet_config.time_embedding_dim,
                                    (None, unet_config.time_embed_dim)),
                                   ("resnet_out_scale_factor", unet_config.resnet_out_scale_factor, 1.0)):
        if value not in (expected if isinstance(expected, tuple) else (expected,)):
            raise UnsupportedConfigError(f"UNet config field '{field}'={value!r} has no ControlNet counterpart "
                                         f"(diffusers' ControlNetModel fixes it to {expected!r})")
    shared = {f.name for f in dataclasses.fields(ControlNetConfig)} & {f.name for f in dataclasses.fields(UNetConfig)}
    config = ControlNetConfig(**{name: getattr(unet_config, name) for name in shared},
                              conditioning_channels=conditioning_channels,
                              conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels),
                              controlnet_conditioning_channel_order=controlnet_conditioning_channel_order,
                              global_pool_conditions=global_pool_conditions)
    config.validate()
    return config


def controlnet_from_unet(unet: UNet2DConditionModel, *, conditioning_channels: int = 3,
                         conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256),
                         controlnet_conditioning_channel_order: str = "rgb", global_pool_conditions: bool = False,
                         load_weights_from_unet: bool = True, rngs: nnx.Rngs | None = None,
                         attention_backend: str = "auto", remat: bool = False) -> ControlNetModel:
    """A ControlNet initialised from ``unet`` (diffusers' ``ControlNetModel.from_unet``): the encoder's weights
    copied, the conditioning stack random, every zero conv zero — so it starts as a no-op on the UNet.

    Copies the plain parameters of ``conv_in``, ``time_embedding``, ``add_embedding``, ``down_blocks`` and
    ``mid_block``; merge LoRA adapters into the UNet first. Compute and parameter dtypes follow the UNet's.
    """
    config = controlnet_config_from_unet(
        unet.config, conditioning_channels=conditioning_channels,
        conditioning_embedding_out_channels=conditioning_embedding_out_channels,
        controlnet_conditioning_channel_order=controlnet_conditioning_channel_order,
        global_pool_conditions=global_pool_conditions)
    controlnet = ControlNetModel(config, rngs=rngs or nnx.Rngs(0), dtype=unet.dtype,
                                 param_dtype=unet.conv_in.kernel.dtype, attention_backend=attention_backend,
                                 remat=remat)
    if load_weights_from_unet:
        for name in ("conv_in", "time_embedding", "add_embedding", "down_blocks", "mid_block"):
            if getattr(unet, name) is not None:
                # Copies, so that donating one model's buffers (e.g. in a jitted train step) leaves the other intact.
                state = jax.tree.map(jnp.copy, nnx.state(getattr(unet, name), nnx.Param))
                nnx.update(getattr(controlnet, name), state)
    return controlnet
