"""Building blocks of the Stable-Diffusion UNet, in Flax NNX, laid out like diffusers.

Attribute names and nesting mirror diffusers' ``torch.nn`` modules one to one (``resnets[0].conv1``,
``attentions[0].transformer_blocks[0].attn2.to_k``, ``attn1.to_out[0]``, ``ff.net[0].proj``), so a diffusers
state-dict key *is* our module path plus the tensor name; ``metalora.models.convert`` relies on that, and so do
LoRA targeting and export. Every trainable layer is a plain ``nnx.Linear`` / ``nnx.Conv`` / norm and is always
called through its attribute (``self.to_q(x)``), which is what lets LoRA wrap layers in place.

Tensors are NHWC inside (channels last: XLA's preferred convolution layout on CPU and TPU).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from metalora.models.attention import dot_product_attention
from metalora.models.conv import conv_general_dilated
from metalora.models.convert import register_layout
from metalora.models.matmul import dot_general


class ChannelsLastGroupNorm(nnx.GroupNorm):
    """``nnx.GroupNorm`` (same parameters, same two-pass statistics in float32) computed as XLA:CPU likes it.

    Flax reduces a (B, ..., G, C/G) view over its spatial and within-group axes at once, a strided reduction that
    XLA:CPU runs far slower than torch's GroupNorm (13× on a 16×32×32×32 batch, idle 2-core machine: a hot spot of
    the small UNet's sampling). Here every reduction is over the contiguous spatial axis first, (B, N, C) → (B, C),
    and then over the few channels of a group, (B, G, C/G) → (B, G): forward 2.14 → 1.16 ms and gradient 6.4 → 1.4 ms
    at that shape (``benchmarks/speed.py --sections groupnorm``; torch's forward is still 0.16 ms). Those numbers are
    with XLA:CPU's default options; compiled by ``metalora.compiler.jit`` (as everything in the library is) flax's
    layout is no longer slow and the two measure the same (0.55-0.87 ms forward, 1.3-3.0 ms gradient, within the
    machine's noise), so this class is now a no-cost equivalent kept for jobs compiled with plain ``jax.jit``."""

    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
        if mask is not None:
            return super().__call__(x, mask=mask)
        batch, channels, groups = x.shape[0], x.shape[-1], self.num_groups
        per_group = channels // groups
        flat = x.reshape(batch, -1, channels).astype(jnp.float32)
        count = flat.shape[1] * per_group

        def group_mean(per_channel_sum):  # (B, C) sums over positions → (B, C) group means, broadcast back
            return jnp.repeat(per_channel_sum.reshape(batch, groups, per_group).sum(-1) / count, per_group, axis=-1)

        centred = flat - group_mean(flat.sum(axis=1))[:, None]
        inv_std = jax.lax.rsqrt(group_mean(jnp.sum(centred * centred, axis=1)) + self.epsilon)
        scale = inv_std * self.scale[...].astype(jnp.float32) if self.scale is not None else inv_std
        y = centred * scale[:, None]
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.reshape(x.shape).astype(self.dtype or x.dtype)


@dataclasses.dataclass(frozen=True)
class Precision:
    """Compute dtype, parameter dtype, attention backend and rematerialisation, shared by every block."""

    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attention_backend: str = "auto"
    remat: bool = False

    def linear(self, d_in: int, d_out: int, *, rngs: nnx.Rngs, use_bias: bool = True,
               zero_init: bool = False) -> nnx.Linear:
        init = {"kernel_init": nnx.initializers.zeros_init()} if zero_init else {}
        return nnx.Linear(d_in, d_out, use_bias=use_bias, dtype=self.dtype, param_dtype=self.param_dtype, rngs=rngs,
                          dot_general=dot_general, **init)

    def conv(self, c_in: int, c_out: int, kernel: int, *, rngs: nnx.Rngs, stride: int = 1,
             padding: int | None = None, zero_init: bool = False) -> nnx.Conv:
        """A square conv; ``zero_init`` starts it at exactly zero (ControlNet's "zero convolutions")."""
        pad = (kernel - 1) // 2 if padding is None else padding
        init = {"kernel_init": nnx.initializers.zeros_init()} if zero_init else {}
        return nnx.Conv(c_in, c_out, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                        dtype=self.dtype, param_dtype=self.param_dtype, rngs=rngs,
                        conv_general_dilated=conv_general_dilated, **init)

    def group_norm(self, channels: int, groups: int, eps: float, *, rngs: nnx.Rngs) -> nnx.GroupNorm:
        # Exact two-pass variance: the one-pass E[x²]-E[x]² form loses precision in low-variance channels.
        return ChannelsLastGroupNorm(channels, num_groups=groups, epsilon=eps, use_fast_variance=False,
                                     dtype=self.dtype, param_dtype=self.param_dtype, rngs=rngs)

    def layer_norm(self, dim: int, eps: float, *, rngs: nnx.Rngs) -> nnx.LayerNorm:
        return nnx.LayerNorm(dim, epsilon=eps, use_fast_variance=False, dtype=self.dtype,
                             param_dtype=self.param_dtype, rngs=rngs)


def call_maybe_remat(module: nnx.Module, remat: bool, *args):
    """Calls ``module(*args)``; with ``remat`` its activations are recomputed in the backward pass.

    Done with ``jax.checkpoint`` on the split state rather than a lifted NNX transform, so it behaves the
    same in graph and tree mode and composes with jit/vmap/grad applied to the whole model. Cross-attention maps
    recorded inside (``record_cross_attention``) are returned from the checkpointed call and put back on ``module``.
    """
    if not remat:
        return module(*args)
    graphdef, state = nnx.split(module)

    def run(s, *a):
        inner = nnx.merge(graphdef, s)
        return inner(*a), nnx.state(inner, CrossAttentionMap)

    out, maps = jax.checkpoint(run)(state, *args)
    nnx.update(module, maps)
    return out


def timestep_embedding(timesteps: jax.Array, dim: int, *, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding of (possibly fractional) timesteps, as diffusers' ``get_timestep_embedding``."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    angles = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nnx.Module):
    """linear_1 → SiLU → linear_2."""

    def __init__(self, d_in: int, d_out: int, *, precision: Precision, rngs: nnx.Rngs):
        self.linear_1 = precision.linear(d_in, d_out, rngs=rngs)
        self.linear_2 = precision.linear(d_out, d_out, rngs=rngs)

    def __call__(self, x):
        return self.linear_2(nnx.silu(self.linear_1(x)))


class AttentionPooling(nnx.Module):
    """Multi-head attention pooling of a token sequence into one vector (diffusers' ``AttentionPooling``, from
    DeepFloyd IF). The query is the sequence mean plus a learned offset; it attends over [itself, the tokens]."""

    def __init__(self, dim: int, heads: int, *, precision: Precision, rngs: nnx.Rngs):
        if dim % heads:
            raise ValueError(f"AttentionPooling: {heads} heads do not divide width {dim}")
        self.heads = heads
        self.attention_backend = precision.attention_backend
        self.positional_embedding = nnx.Param(
            jax.random.normal(rngs.params(), (1, dim), precision.param_dtype) / math.sqrt(dim))
        self.k_proj = precision.linear(dim, dim, rngs=rngs)
        self.q_proj = precision.linear(dim, dim, rngs=rngs)
        self.v_proj = precision.linear(dim, dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        batch, _, dim = x.shape
        query = jnp.mean(x, axis=1, keepdims=True) + self.positional_embedding[...].astype(x.dtype)
        tokens = jnp.concatenate([query, x], axis=1)

        def heads(y):
            return y.reshape(batch, y.shape[1], self.heads, dim // self.heads)

        q, k, v = heads(self.q_proj(query)), heads(self.k_proj(tokens)), heads(self.v_proj(tokens))
        return dot_product_attention(q, k, v, backend=self.attention_backend).reshape(batch, dim)


# Its one raw parameter has the same name and layout as in torch (the projections are plain Linears).
register_layout(AttentionPooling, {"positional_embedding": ("positional_embedding", lambda w: w, lambda w: w)})


class TextTimeEmbedding(nnx.Module):
    """diffusers' ``addition_embed_type="text"``: LayerNorm → attention pooling of the prompt's hidden states →
    Linear → LayerNorm, added to the time embedding: every ResNet sees a global summary of the prompt. (On the tiny
    base it did not by itself make a frozen random text tower readable; training the tower did, see
    configs/base_tiny.py.)"""

    def __init__(self, encoder_dim: int, time_embed_dim: int, heads: int, *, precision: Precision,
                 rngs: nnx.Rngs):
        self.norm1 = precision.layer_norm(encoder_dim, 1e-5, rngs=rngs)
        self.pool = AttentionPooling(encoder_dim, heads, precision=precision, rngs=rngs)
        self.proj = precision.linear(encoder_dim, time_embed_dim, rngs=rngs)
        self.norm2 = precision.layer_norm(time_embed_dim, 1e-5, rngs=rngs)

    def __call__(self, hidden_states: jax.Array) -> jax.Array:
        return self.norm2(self.proj(self.pool(self.norm1(hidden_states))))


class ResnetBlock2D(nnx.Module):
    """GroupNorm → SiLU → conv → (+ time embedding) → GroupNorm → SiLU → conv, plus a (1×1 conv) shortcut."""

    def __init__(self, c_in: int, c_out: int, *, temb_channels: int | None, groups: int, eps: float,
                 output_scale_factor: float = 1.0, precision: Precision, rngs: nnx.Rngs):
        self.norm1 = precision.group_norm(c_in, groups, eps, rngs=rngs)
        self.conv1 = precision.conv(c_in, c_out, 3, rngs=rngs)
        self.time_emb_proj = precision.linear(temb_channels, c_out, rngs=rngs) if temb_channels else None
        self.norm2 = precision.group_norm(c_out, groups, eps, rngs=rngs)
        self.dropout = nnx.Dropout(0.0)
        self.conv2 = precision.conv(c_out, c_out, 3, rngs=rngs)
        self.conv_shortcut = precision.conv(c_in, c_out, 1, rngs=rngs) if c_in != c_out else None
        self.output_scale_factor = output_scale_factor

    def __call__(self, x, temb=None):
        h = self.conv1(nnx.silu(self.norm1(x)))
        if self.time_emb_proj is not None and temb is not None:
            h = h + self.time_emb_proj(nnx.silu(temb))[:, None, None, :]
        h = self.conv2(nnx.silu(self.norm2(h)))
        shortcut = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        out = shortcut + h
        return out if self.output_scale_factor == 1.0 else out / self.output_scale_factor


class CrossAttentionMap(nnx.Intermediate):
    """Head-averaged attention probabilities (B, Lq, Lk) of a cross-attention layer, kept while it records
    (``record_cross_attention``); e.g. AttnDreamBooth's attention-map regulariser reads them. The layer stores them
    itself rather than through ``Module.sow``, which flax deprecates outside ``nnx.capture``; and ``nnx.capture``
    breaks ``nnx.split`` of modules holding an ``nnx.List`` (mixed int/str keys), which the remat path needs."""


class Attention(nnx.Module):
    """Multi-head attention with diffusers' projections ``to_q``, ``to_k``, ``to_v``, ``to_out[0]``.

    ``is_cross_attention``: keys/values come from the text (``attn2``), a typed way to select these layers. With
    ``record_maps`` set (``record_cross_attention``) the layer also keeps its head-averaged probabilities as a
    ``CrossAttentionMap``; they are recomputed from q and k in float32 (cheap: Lk is the prompt length), so the fused
    attention backends stay as they are.
    """

    def __init__(self, query_dim: int, *, heads: int, dim_head: int, cross_attention_dim: int | None = None,
                 upcast_attention: bool = False, precision: Precision, rngs: nnx.Rngs):
        inner = heads * dim_head
        context_dim = cross_attention_dim or query_dim
        self.heads = heads
        self.is_cross_attention = cross_attention_dim is not None
        self.record_maps = False
        self.upcast_attention = upcast_attention
        self.backend = precision.attention_backend
        self.to_q = precision.linear(query_dim, inner, use_bias=False, rngs=rngs)
        self.to_k = precision.linear(context_dim, inner, use_bias=False, rngs=rngs)
        self.to_v = precision.linear(context_dim, inner, use_bias=False, rngs=rngs)
        self.to_out = nnx.List([precision.linear(inner, query_dim, rngs=rngs), nnx.Dropout(0.0)])

    def __call__(self, x, context=None):
        context = x if context is None else context
        split_heads = lambda t: t.reshape(*t.shape[:-1], self.heads, t.shape[-1] // self.heads)
        q, k, v = split_heads(self.to_q(x)), split_heads(self.to_k(context)), split_heads(self.to_v(context))
        out = dot_product_attention(q, k, v, backend=self.backend, upcast=self.upcast_attention)
        if self.record_maps:
            scores = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32))
            probs = jax.nn.softmax(scores / math.sqrt(q.shape[-1]), axis=-1)
            # Stored as the layer's own variable (popped by ``pop_cross_attention_maps``); a tuple in case the layer is
            # called more than once per forward pass.
            recorded = self.recorded_maps.get_value() if hasattr(self, "recorded_maps") else ()
            self.recorded_maps = CrossAttentionMap((*recorded, jnp.mean(probs, axis=1)))
        return self.to_out[0](out.reshape(*out.shape[:-2], -1))


def record_cross_attention(model: nnx.Module) -> int:
    """Makes every cross-attention layer of ``model`` record its maps (in place); returns how many there are.

    Use it on a module merged for one forward pass, then collect the maps with ``pop_cross_attention_maps``.
    """
    layers = [m for _, m in nnx.iter_modules(model) if isinstance(m, Attention) and m.is_cross_attention]
    for layer in layers:
        layer.record_maps = True
    return len(layers)


def pop_cross_attention_maps(model: nnx.Module) -> list[jax.Array]:
    """The maps recorded since ``record_cross_attention``, removed from ``model``: one (B, Lq, Lk) array per
    cross-attention call, in path order."""
    return list(jax.tree.leaves(nnx.pop(model, CrossAttentionMap)))


class GEGLU(nnx.Module):
    """proj → split into (value, gate) → value · GELU(gate) (exact GELU, as diffusers)."""

    def __init__(self, d_in: int, d_out: int, *, precision: Precision, rngs: nnx.Rngs):
        self.proj = precision.linear(d_in, 2 * d_out, rngs=rngs)

    def __call__(self, x):
        value, gate = jnp.split(self.proj(x), 2, axis=-1)
        return value * jax.nn.gelu(gate, approximate=False)


class FeedForward(nnx.Module):
    """``net = [GEGLU, Dropout, Linear]`` — indices match diffusers' ``ff.net.0.proj`` / ``ff.net.2``."""

    def __init__(self, dim: int, *, mult: int = 4, precision: Precision, rngs: nnx.Rngs):
        inner = dim * mult
        self.net = nnx.List([GEGLU(dim, inner, precision=precision, rngs=rngs), nnx.Dropout(0.0),
                             precision.linear(inner, dim, rngs=rngs)])

    def __call__(self, x):
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nnx.Module):
    """Pre-LN self-attention, cross-attention on the text, GEGLU feed-forward; each with a residual."""

    def __init__(self, dim: int, *, heads: int, dim_head: int, cross_attention_dim: int, upcast_attention: bool,
                 precision: Precision, rngs: nnx.Rngs):
        self.norm1 = precision.layer_norm(dim, 1e-5, rngs=rngs)
        self.attn1 = Attention(dim, heads=heads, dim_head=dim_head, upcast_attention=upcast_attention,
                               precision=precision, rngs=rngs)
        self.norm2 = precision.layer_norm(dim, 1e-5, rngs=rngs)
        self.attn2 = Attention(dim, heads=heads, dim_head=dim_head, cross_attention_dim=cross_attention_dim,
                               upcast_attention=upcast_attention, precision=precision, rngs=rngs)
        self.norm3 = precision.layer_norm(dim, 1e-5, rngs=rngs)
        self.ff = FeedForward(dim, precision=precision, rngs=rngs)

    def __call__(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nnx.Module):
    """GroupNorm → proj_in (1×1 conv, or linear with ``use_linear_projection``) → transformer blocks → proj_out."""

    def __init__(self, channels: int, *, heads: int, num_layers: int, cross_attention_dim: int, groups: int,
                 use_linear_projection: bool, upcast_attention: bool, precision: Precision, rngs: nnx.Rngs):
        dim_head = channels // heads
        self.use_linear_projection = use_linear_projection
        self.remat = precision.remat
        self.norm = precision.group_norm(channels, groups, 1e-6, rngs=rngs)
        make_proj = (lambda: precision.linear(channels, channels, rngs=rngs)) if use_linear_projection else (
            lambda: precision.conv(channels, channels, 1, rngs=rngs))
        self.proj_in = make_proj()
        self.transformer_blocks = nnx.List([
            BasicTransformerBlock(channels, heads=heads, dim_head=dim_head, cross_attention_dim=cross_attention_dim,
                                  upcast_attention=upcast_attention, precision=precision, rngs=rngs)
            for _ in range(num_layers)])
        self.proj_out = make_proj()

    def __call__(self, x, context):
        b, h, w, c = x.shape
        residual = x
        # A 1×1 conv on NHWC is the same contraction as a linear layer on the flattened tokens; both paths
        # are kept so parameters load with their original layouts.
        tokens = self.norm(x)
        tokens = (self.proj_in(tokens.reshape(b, h * w, c)) if self.use_linear_projection
                  else self.proj_in(tokens).reshape(b, h * w, c))
        for block in self.transformer_blocks:
            tokens = call_maybe_remat(block, self.remat, tokens, context)
        out = (self.proj_out(tokens).reshape(b, h, w, c) if self.use_linear_projection
               else self.proj_out(tokens.reshape(b, h, w, c)))
        return out + residual


class Downsample2D(nnx.Module):
    def __init__(self, channels: int, *, precision: Precision, rngs: nnx.Rngs):
        self.conv = precision.conv(channels, channels, 3, stride=2, padding=1, rngs=rngs)

    def __call__(self, x):
        return self.conv(x)


class Upsample2D(nnx.Module):
    def __init__(self, channels: int, *, precision: Precision, rngs: nnx.Rngs):
        self.conv = precision.conv(channels, channels, 3, rngs=rngs)

    def __call__(self, x, output_size: tuple[int, int] | None = None):
        # Nearest-neighbour ×2 (or to the skip connection's size when the input size was odd).
        if output_size is None:
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        else:
            h, w = x.shape[1:3]
            rows = (jnp.arange(output_size[0]) * h) // output_size[0]
            cols = (jnp.arange(output_size[1]) * w) // output_size[1]
            x = x[:, rows][:, :, cols]
        return self.conv(x)


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """Everything a down/mid/up block needs from the UNet config, resolved per block."""

    temb_channels: int
    groups: int
    eps: float
    heads: int
    cross_attention_dim: int
    use_linear_projection: bool
    upcast_attention: bool
    transformer_layers: tuple[int, ...]  # per resnet/attention pair
    output_scale_factor: float = 1.0


def _transformer(channels: int, spec: BlockSpec, layers: int, precision: Precision, rngs: nnx.Rngs):
    return Transformer2DModel(channels, heads=spec.heads, num_layers=layers,
                              cross_attention_dim=spec.cross_attention_dim, groups=spec.groups,
                              use_linear_projection=spec.use_linear_projection,
                              upcast_attention=spec.upcast_attention, precision=precision, rngs=rngs)


def _resnet(c_in: int, c_out: int, spec: BlockSpec, precision: Precision, rngs: nnx.Rngs) -> ResnetBlock2D:
    return ResnetBlock2D(c_in, c_out, temb_channels=spec.temb_channels, groups=spec.groups, eps=spec.eps,
                         output_scale_factor=spec.output_scale_factor, precision=precision, rngs=rngs)


class DownBlock2D(nnx.Module):
    """``num_layers`` resnets (each followed by a transformer when ``cross_attention``), then a stride-2 conv."""

    def __init__(self, c_in: int, c_out: int, *, num_layers: int, add_downsample: bool, cross_attention: bool,
                 spec: BlockSpec, precision: Precision, rngs: nnx.Rngs):
        self.remat = precision.remat
        self.resnets = nnx.List([_resnet(c_in if i == 0 else c_out, c_out, spec, precision, rngs)
                                 for i in range(num_layers)])
        self.attentions = nnx.List([_transformer(c_out, spec, spec.transformer_layers[i], precision, rngs)
                                    for i in range(num_layers)]) if cross_attention else None
        self.downsamplers = nnx.List([Downsample2D(c_out, precision=precision, rngs=rngs)]) if add_downsample else None

    def __call__(self, x, temb, context):
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = call_maybe_remat(resnet, self.remat, x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UpBlock2D(nnx.Module):
    """``num_layers`` resnets on [x, skip] concatenations (each followed by a transformer), then ×2 upsampling."""

    def __init__(self, c_in: int, c_prev: int, c_out: int, *, num_layers: int, add_upsample: bool,
                 cross_attention: bool, spec: BlockSpec, precision: Precision, rngs: nnx.Rngs):
        self.remat = precision.remat

        def resnet_in(i):
            skip = c_in if i == num_layers - 1 else c_out
            return (c_prev if i == 0 else c_out) + skip

        self.resnets = nnx.List([_resnet(resnet_in(i), c_out, spec, precision, rngs) for i in range(num_layers)])
        self.attentions = nnx.List([_transformer(c_out, spec, spec.transformer_layers[i], precision, rngs)
                                    for i in range(num_layers)]) if cross_attention else None
        self.upsamplers = nnx.List([Upsample2D(c_out, precision=precision, rngs=rngs)]) if add_upsample else None

    def __call__(self, x, skips, temb, context, upsample_size=None):
        for i, resnet in enumerate(self.resnets):
            x = jnp.concatenate([x, skips[-1 - i]], axis=-1)
            x = call_maybe_remat(resnet, self.remat, x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x


class UNetMidBlock2DCrossAttn(nnx.Module):
    """resnet, then (transformer, resnet) pairs."""

    def __init__(self, channels: int, *, spec: BlockSpec, precision: Precision, rngs: nnx.Rngs):
        self.remat = precision.remat
        n = len(spec.transformer_layers)
        self.attentions = nnx.List([_transformer(channels, spec, spec.transformer_layers[i], precision, rngs)
                                    for i in range(n)])
        self.resnets = nnx.List([_resnet(channels, channels, spec, precision, rngs) for _ in range(n + 1)])

    def __call__(self, x, temb, context):
        x = call_maybe_remat(self.resnets[0], self.remat, x, temb)
        for attention, resnet in zip(self.attentions, self.resnets[1:], strict=True):
            x = call_maybe_remat(resnet, self.remat, attention(x, context), temb)
        return x
