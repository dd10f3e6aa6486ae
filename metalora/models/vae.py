"""Stable Diffusion's KL autoencoder in Flax NNX, numerically matching diffusers' ``AutoencoderKL``.

Images are NHWC in [-1, 1]; latents are NHWC with ``latent_channels`` channels at 1/2^(n_blocks-1) resolution.
Module attribute paths mirror diffusers (``encoder.down_blocks[0].resnets[1].conv1``,
``decoder.mid_block.attentions[0].to_q``), so checkpoints load through ``metalora.models.convert``.

Two blocks differ from the UNet's and are defined here rather than in ``unet_blocks``:

* ``VAEDownsample2D``: the VAE encoder downsamples with ``padding=0`` after an *asymmetric* zero pad of one
  row/column at the bottom/right (diffusers' ``Downsample2D(padding=0)``), not the UNet's symmetric padding=1.
* ``VAEAttention``: the mid-block's spatial self-attention carries its own GroupNorm, biased q/k/v projections
  and a residual connection (diffusers' ``Attention(..., norm_num_groups, residual_connection=True, bias=True)``).
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from metalora.compiler import jit
from metalora.models import convert
from metalora.models.attention import dot_product_attention
from metalora.models.unet_blocks import Precision, ResnetBlock2D, Upsample2D


class UnsupportedConfigError(ValueError):
    """A VAE config field has a value this implementation does not support; the message names the field."""


_SUPPORTED_ACT = ("silu", "swish")
# Keys diffusers writes next to the constructor arguments.
_BOOKKEEPING = ("_class_name", "_diffusers_version", "_name_or_path", "_use_default_values")


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig:
    """diffusers ``AutoencoderKL`` constructor arguments (its ``config.json``)."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, ...] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        n = len(self.block_out_channels)
        for name in ("down_block_types", "up_block_types"):
            want = "DownEncoderBlock2D" if name == "down_block_types" else "UpDecoderBlock2D"
            types = getattr(self, name)
            if len(types) != n:
                raise UnsupportedConfigError(f"AutoencoderKL.{name} has {len(types)} entries but "
                                             f"block_out_channels has {n}")
            bad = [t for t in types if t != want]
            if bad:
                raise UnsupportedConfigError(f"AutoencoderKL.{name} contains {bad[0]!r}; only {want!r} is supported")
        if self.act_fn not in _SUPPORTED_ACT:
            raise UnsupportedConfigError(f"AutoencoderKL.act_fn={self.act_fn!r} is not supported (only silu)")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise UnsupportedConfigError(f"AutoencoderKL.block_out_channels {bad} not divisible by "
                                         f"norm_num_groups={self.norm_num_groups}")
        if (self.latents_mean is None) != (self.latents_std is None):
            raise UnsupportedConfigError("AutoencoderKL.latents_mean and latents_std must be given together")
        for name in ("latents_mean", "latents_std"):
            value = getattr(self, name)
            if value is not None and len(value) != self.latent_channels:
                raise UnsupportedConfigError(f"AutoencoderKL.{name} has {len(value)} entries, expected "
                                             f"latent_channels={self.latent_channels}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> AutoencoderKLConfig:
        """From a diffusers ``config.json``; unknown fields are an error, since they would change the model."""
        class_name = config.get("_class_name", "AutoencoderKL")
        if class_name != "AutoencoderKL":
            raise UnsupportedConfigError(f"config _class_name={class_name!r} is not supported: expected "
                                         "'AutoencoderKL'")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in config if k not in names and k not in _BOOKKEEPING)
        if unknown:
            raise UnsupportedConfigError(f"AutoencoderKL config fields {unknown} are not supported")
        tuples = ("down_block_types", "up_block_types", "block_out_channels", "latents_mean", "latents_std")
        kwargs = {k: (tuple(v) if k in tuples and v is not None else v) for k, v in config.items() if k in names}
        if isinstance(kwargs.get("sample_size"), list):
            kwargs["sample_size"] = tuple(kwargs["sample_size"])
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {"_class_name": "AutoencoderKL", **dataclasses.asdict(self)}


# ------------------------------------------------------------------------------------------------------------
# Latent distribution
# ------------------------------------------------------------------------------------------------------------


@struct.dataclass
class DiagonalGaussian:
    """The encoder's posterior N(mean, exp(logvar)) per latent element (diffusers' DiagonalGaussianDistribution)."""

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> DiagonalGaussian:
        """Splits the encoder's 2·latent channels (last axis) and clips logvar to [-30, 20] as diffusers does."""
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean=mean, logvar=jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    def sample(self, key: jax.Array) -> jax.Array:
        noise = jax.random.normal(key, self.mean.shape, dtype=jnp.float32).astype(self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> jax.Array:
        return self.mean

    def kl(self) -> jax.Array:
        """KL(q ‖ N(0, I)) summed over all but the batch axis."""
        kl = 0.5 * (jnp.square(self.mean) + jnp.exp(self.logvar) - 1.0 - self.logvar)
        return jnp.sum(kl.astype(jnp.float32), axis=tuple(range(1, kl.ndim)))


# ------------------------------------------------------------------------------------------------------------
# Blocks
# ------------------------------------------------------------------------------------------------------------


class VAEDownsample2D(nnx.Module):
    """Zero-pad one row/column at the bottom/right, then a stride-2 3×3 conv with no padding."""

    def __init__(self, channels: int, *, precision: Precision, rngs: nnx.Rngs):
        self.conv = nnx.Conv(channels, channels, (3, 3), strides=(2, 2), padding=((0, 1), (0, 1)),
                             dtype=precision.dtype, param_dtype=precision.param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class VAEAttention(nnx.Module):
    """GroupNorm → multi-head self-attention over the H·W positions (biased q/k/v) → to_out[0] → + residual."""

    def __init__(self, channels: int, *, heads: int, groups: int, eps: float, precision: Precision,
                 rngs: nnx.Rngs):
        if channels % heads:
            raise UnsupportedConfigError(f"attention channels {channels} not divisible by heads={heads}")
        self.heads = heads
        self.backend = precision.attention_backend
        self.group_norm = precision.group_norm(channels, groups, eps, rngs=rngs)
        self.to_q = precision.linear(channels, channels, rngs=rngs)
        self.to_k = precision.linear(channels, channels, rngs=rngs)
        self.to_v = precision.linear(channels, channels, rngs=rngs)
        self.to_out = nnx.List([precision.linear(channels, channels, rngs=rngs)])

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        tokens = self.group_norm(x).reshape(b, h * w, c)
        split = lambda t: t.reshape(b, h * w, self.heads, c // self.heads)
        q, k, v = split(self.to_q(tokens)), split(self.to_k(tokens)), split(self.to_v(tokens))
        # diffusers builds this block with upcast_softmax=True; our backends keep softmax statistics in f32.
        out = dot_product_attention(q, k, v, backend=self.backend, upcast=True)
        return self.to_out[0](out.reshape(b, h * w, c)).reshape(b, h, w, c) + x


class UNetMidBlock2D(nnx.Module):
    """resnet → (attention → resnet)."""

    def __init__(self, channels: int, *, groups: int, add_attention: bool, precision: Precision, rngs: nnx.Rngs):
        res = lambda: ResnetBlock2D(channels, channels, temb_channels=None, groups=groups, eps=1e-6,
                                    precision=precision, rngs=rngs)
        self.resnets = nnx.List([res(), res()])
        # diffusers passes attention_head_dim = channels: a single head over all channels.
        self.attentions = nnx.List([VAEAttention(channels, heads=1, groups=groups, eps=1e-6, precision=precision,
                                                 rngs=rngs)] if add_attention else [])

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class DownEncoderBlock2D(nnx.Module):
    def __init__(self, c_in: int, c_out: int, *, num_layers: int, groups: int, add_downsample: bool,
                 precision: Precision, rngs: nnx.Rngs):
        self.resnets = nnx.List([
            ResnetBlock2D(c_in if i == 0 else c_out, c_out, temb_channels=None, groups=groups, eps=1e-6,
                          precision=precision, rngs=rngs) for i in range(num_layers)])
        self.downsamplers = (nnx.List([VAEDownsample2D(c_out, precision=precision, rngs=rngs)])
                             if add_downsample else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock2D(nnx.Module):
    def __init__(self, c_in: int, c_out: int, *, num_layers: int, groups: int, add_upsample: bool,
                 precision: Precision, rngs: nnx.Rngs):
        self.resnets = nnx.List([
            ResnetBlock2D(c_in if i == 0 else c_out, c_out, temb_channels=None, groups=groups, eps=1e-6,
                          precision=precision, rngs=rngs) for i in range(num_layers)])
        self.upsamplers = nnx.List([Upsample2D(c_out, precision=precision, rngs=rngs)]) if add_upsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class Encoder(nnx.Module):
    def __init__(self, config: AutoencoderKLConfig, *, precision: Precision, rngs: nnx.Rngs):
        channels, groups = config.block_out_channels, config.norm_num_groups
        self.conv_in = precision.conv(config.in_channels, channels[0], 3, rngs=rngs)
        self.down_blocks = nnx.List([
            DownEncoderBlock2D(channels[max(i - 1, 0)], c, num_layers=config.layers_per_block, groups=groups,
                               add_downsample=i < len(channels) - 1, precision=precision, rngs=rngs)
            for i, c in enumerate(channels)])
        self.mid_block = UNetMidBlock2D(channels[-1], groups=groups, add_attention=config.mid_block_add_attention,
                                        precision=precision, rngs=rngs)
        self.conv_norm_out = precision.group_norm(channels[-1], groups, 1e-6, rngs=rngs)
        self.conv_out = precision.conv(channels[-1], 2 * config.latent_channels, 3, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    def __init__(self, config: AutoencoderKLConfig, *, precision: Precision, rngs: nnx.Rngs):
        rev, groups = tuple(reversed(config.block_out_channels)), config.norm_num_groups
        self.conv_in = precision.conv(config.latent_channels, rev[0], 3, rngs=rngs)
        self.mid_block = UNetMidBlock2D(rev[0], groups=groups, add_attention=config.mid_block_add_attention,
                                        precision=precision, rngs=rngs)
        self.up_blocks = nnx.List([
            UpDecoderBlock2D(rev[max(i - 1, 0)], c, num_layers=config.layers_per_block + 1, groups=groups,
                             add_upsample=i < len(rev) - 1, precision=precision, rngs=rngs)
            for i, c in enumerate(rev)])
        self.conv_norm_out = precision.group_norm(rev[-1], groups, 1e-6, rngs=rngs)
        self.conv_out = precision.conv(rev[-1], config.out_channels, 3, rngs=rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
    """diffusers' ``AutoencoderKL``: ``encode`` gives the latent posterior, ``decode`` maps (unscaled) latents
    back to images. Diffusion models see ``scale_latents(config, z)``; see ``latent_cache``."""

    def __init__(self, config: AutoencoderKLConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 attention_backend: str = "auto", rngs: nnx.Rngs):
        self.config = config
        precision = Precision(dtype=dtype, param_dtype=param_dtype, attention_backend=attention_backend)
        moments = 2 * config.latent_channels
        self.encoder = Encoder(config, precision=precision, rngs=rngs)
        self.decoder = Decoder(config, precision=precision, rngs=rngs)
        self.quant_conv = precision.conv(moments, moments, 1, rngs=rngs) if config.use_quant_conv else None
        self.post_quant_conv = (precision.conv(config.latent_channels, config.latent_channels, 1, rngs=rngs)
                                if config.use_post_quant_conv else None)

    def encode(self, x: jax.Array) -> DiagonalGaussian:
        """(B, H, W, in_channels) in [-1, 1] → posterior over (B, H/f, W/f, latent_channels)."""
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian.from_moments(moments)

    def decode(self, z: jax.Array) -> jax.Array:
        """Unscaled latents (B, h, w, latent_channels) → images (B, h·f, w·f, out_channels), nominally [-1, 1]."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """Reconstruction through the posterior's sample (with ``key``) or mode (without)."""
        posterior = self.encode(x)
        return self.decode(posterior.mode() if key is None else posterior.sample(key))


# ------------------------------------------------------------------------------------------------------------
# Latent scaling (the convention of diffusers' pipelines) and caching
# ------------------------------------------------------------------------------------------------------------


def scale_latents(config: AutoencoderKLConfig, z: jax.Array) -> jax.Array:
    """VAE latents → the diffusion model's latent space (unit variance by construction of scaling_factor).

    ``(z − latents_mean)·s/latents_std`` when per-channel statistics are configured, else ``(z − shift)·s``.
    """
    if config.latents_mean is not None:
        mean = jnp.asarray(config.latents_mean, z.dtype)
        std = jnp.asarray(config.latents_std, z.dtype)
        return (z - mean) * config.scaling_factor / std
    return (z - (config.shift_factor or 0.0)) * config.scaling_factor


def unscale_latents(config: AutoencoderKLConfig, latents: jax.Array) -> jax.Array:
    """Inverse of ``scale_latents`` (what a pipeline does before ``decode``)."""
    if config.latents_mean is not None:
        mean = jnp.asarray(config.latents_mean, latents.dtype)
        std = jnp.asarray(config.latents_std, latents.dtype)
        return latents * std / config.scaling_factor + mean
    return latents / config.scaling_factor + (config.shift_factor or 0.0)


def scaled_mean_latents(vae: AutoencoderKL, images: jax.Array) -> jax.Array:
    """Images (B, H, W, C) in [-1, 1] → the diffusion model's latents: the scaled posterior mean (not jitted)."""
    return scale_latents(vae.config, vae.encode(images).mode())


def decode_to_unit_range(vae: AutoencoderKL, latents: jax.Array) -> jax.Array:
    """The diffusion model's (scaled) latents → images in [0, 1], float32 (diffusers' ``VaeImageProcessor``
    denormalisation: decode the unscaled latents, ``x / 2 + 0.5``, clip); not jitted."""
    images = vae.decode(unscale_latents(vae.config, latents.astype(jnp.float32)))
    return jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)


def encode(vae: AutoencoderKL, x: jax.Array) -> DiagonalGaussian:
    """Jitted ``vae.encode`` (split → pure function → merge)."""
    graphdef, state = nnx.split(vae)
    return _encode(graphdef, state, jnp.asarray(x))


def decode(vae: AutoencoderKL, z: jax.Array) -> jax.Array:
    """Jitted ``vae.decode`` of unscaled latents."""
    graphdef, state = nnx.split(vae)
    return _decode(graphdef, state, jnp.asarray(z))


@functools.partial(jit, static_argnums=0)
def _encode(graphdef, state, x):
    return nnx.merge(graphdef, state).encode(x)


@functools.partial(jit, static_argnums=0)
def _decode(graphdef, state, z):
    return nnx.merge(graphdef, state).decode(z)


@functools.partial(jit, static_argnums=0)
def _scaled_mean_latents(graphdef, state, x):
    return scaled_mean_latents(nnx.merge(graphdef, state), x)


@functools.partial(jit, static_argnums=0)
def _scaled_sampled_latents(graphdef, state, x, keys):
    """Each image gets its own key, so a latent does not depend on which batch it was computed in."""
    vae = nnx.merge(graphdef, state)
    posterior = vae.encode(x)
    noise = jax.vmap(lambda k: jax.random.normal(k, posterior.mean.shape[1:], jnp.float32))(keys)
    return scale_latents(vae.config, posterior.mean + posterior.std * noise.astype(posterior.mean.dtype))


def images_to_model_range(images: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] → float32 [-1, 1]; float input is taken to be in [-1, 1] already (and checked)."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 127.5 - 1.0
    if not np.issubdtype(images.dtype, np.floating):
        raise TypeError(f"images must be uint8 or float in [-1, 1], got dtype {images.dtype}")
    lo, hi = float(images.min(initial=0.0)), float(images.max(initial=0.0))
    if lo < -1.001 or hi > 1.001:
        raise ValueError(f"float images must lie in [-1, 1] (the VAE's input range), got [{lo:.3g}, {hi:.3g}]")
    return images.astype(np.float32)


def latent_cache(vae: AutoencoderKL, images: np.ndarray, *, key: jax.Array | None = None,
                 batch_size: int = 16) -> np.ndarray:
    """Precomputes *scaled* latents for a stack of images, so a train step runs only the diffusion model.

    Args:
      images: (N, H, W, C), uint8 or float in [-1, 1]; H and W multiples of the VAE's downsample factor.
      key: with a key, each image's latent is a posterior sample (what diffusers' training scripts use,
        ``latent_dist.sample()``), one independent draw per image via ``fold_in(key, index)``; without,
        the posterior mean.
      batch_size: images per jitted call; the last batch is padded so every call has one shape (one compile).

    Returns:
      float32 (N, H/f, W/f, latent_channels), already multiplied by ``scaling_factor`` (and shifted).
    """
    images = images_to_model_range(images)
    if images.ndim != 4 or images.shape[-1] != vae.config.in_channels:
        raise ValueError(f"images must be (N, H, W, {vae.config.in_channels}), got {images.shape}")
    f = vae.config.downsample_factor
    if images.shape[1] % f or images.shape[2] % f:
        raise ValueError(f"image size {images.shape[1:3]} is not a multiple of the VAE downsample factor {f}")
    graphdef, state = nnx.split(vae)
    n = len(images)
    chunks: list[np.ndarray] = []
    for start in range(0, n, batch_size):
        batch = images[start:start + batch_size]
        valid = len(batch)
        if valid < batch_size:
            batch = np.concatenate([batch, np.zeros((batch_size - valid, *batch.shape[1:]), batch.dtype)])
        if key is None:
            latents = _scaled_mean_latents(graphdef, state, jnp.asarray(batch))
        else:
            keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(start, start + batch_size))
            latents = _scaled_sampled_latents(graphdef, state, jnp.asarray(batch), keys)
        chunks.append(np.asarray(latents, dtype=np.float32)[:valid])
    if not chunks:
        return np.zeros((0, images.shape[1] // f, images.shape[2] // f, vae.config.latent_channels), np.float32)
    return np.concatenate(chunks)


# ------------------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------------------

# Checkpoints written before diffusers 0.14 name the mid-block attention's projections differently.
_LEGACY_ATTENTION_NAMES = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}


def _rename_legacy_attention(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for key, value in tensors.items():
        if ".attentions." in key:
            for old, new in _LEGACY_ATTENTION_NAMES.items():
                key = key.replace(old, new)
        out[key] = value
    return out


def _uninitialized(build) -> nnx.Module:
    """Zero-filled parameters without running the initialisers (loading overwrites all of them)."""
    graphdef, abstract = nnx.split(nnx.eval_shape(build))
    return nnx.merge(graphdef, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract))


def load_vae(path: str | pathlib.Path, *, dtype=jnp.float32, param_dtype=jnp.float32,
             attention_backend: str = "auto") -> AutoencoderKL:
    """Loads a diffusers ``AutoencoderKL`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors``,
    or sharded), or the ``vae/`` subfolder of a pipeline folder.

    With ``force_upcast`` set in the config (SD/SDXL VAEs overflow in float16), a float16 compute dtype is
    raised to float32, as diffusers' pipelines do; parameters keep ``param_dtype``.
    """
    folder = pathlib.Path(path)
    if not (folder / "config.json").is_file() and (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"
    config = AutoencoderKLConfig.from_dict(convert.load_config(folder))
    if config.force_upcast and jnp.dtype(dtype) == jnp.float16:
        dtype = jnp.float32
    tensors = _rename_legacy_attention(convert.load_safetensors(folder, "diffusion_pytorch_model"))
    model = _uninitialized(lambda: AutoencoderKL(config, dtype=dtype, param_dtype=param_dtype,
                                                 attention_backend=attention_backend, rngs=nnx.Rngs(0)))
    convert.assign_torch_state(model, tensors)
    return model


def vae_from_config(config: AutoencoderKLConfig | Mapping[str, Any], *, seed: int = 0, dtype=jnp.float32,
                    param_dtype=jnp.float32) -> AutoencoderKL:
    """A randomly initialised VAE (tests, training a VAE from scratch)."""
    if not isinstance(config, AutoencoderKLConfig):
        config = AutoencoderKLConfig.from_dict(config)
    return AutoencoderKL(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(seed))


__all__: Sequence[str] = (
    "AutoencoderKL", "AutoencoderKLConfig", "DiagonalGaussian", "UnsupportedConfigError", "decode",
    "decode_to_unit_range", "encode", "images_to_model_range", "latent_cache", "load_vae", "scale_latents",
    "scaled_mean_latents", "unscale_latents", "vae_from_config",
)
