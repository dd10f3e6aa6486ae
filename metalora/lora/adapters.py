"""Layered LoRA adapters for Linear and Conv layers: ``h = W0·x + s·U(M(D·x))``.

Shapes (per subject; subject factors are stored with a leading subject axis ``S``):

=============  ==========================  ==============================
factor         Linear                      Conv (kernel ``kh×kw``)
=============  ==========================  ==============================
``lora_down``  D ``(in, r_d)``             D ``(kh, kw, in, r_d)`` (HWIO)
``lora_mid``   M ``(r_d, r_m)``            M ``(r_d, r_m)``
``lora_up``    U ``(r_up, out)``           U ``(r_up, out)``
=============  ==========================  ==============================

``r_up`` is ``r_m`` when the Mid factor is on and ``r_d`` when it is off (plain two-factor LoRA, ``B·A``).

**Conv.** ``D`` is a convolution with the base layer's kernel size, strides, padding and dilations (in → r_d).
``M`` and ``U`` are 1×1 convolutions, i.e. matmuls over the channel axis, which is how they are computed and
stored (as matrices). Because a 1×1 stride-1 convolution commutes with the spatial structure,
``conv(x, D)·M·U == conv(x, D·M·U)``, so the adapter merges into the base kernel exactly.

**Scale.** ``s = alpha / r`` (rsLoRA: ``alpha / sqrt(r)``) with ``r = r_up``, the input dimension of the Up
factor. This is PEFT's rule for two-factor LoRA (``r`` = rank), and for three factors it is the dimension the
trained Up factor sums over, which is what the ``1/r`` normalises: with ``U`` initialised at zero, one
gradient step on ``U`` changes the output by a sum of ``r_up`` terms. ``alpha=None`` means ``alpha = r``
(``s = 1``). Export bakes ``s`` into the two-factor ``B`` and writes ``alpha = r_d``, so loaders apply scale 1.

**Init.** ``D``: PEFT's default ``variance_scaling(1/3, "fan_in", "uniform")`` (= uniform ±1/sqrt(fan_in), the
kaiming-uniform init of ``nn.Linear`` with a=√5) or ``"gaussian"`` (normal, std ``1/r_d``, PEFT's
``init_lora_weights="gaussian"``). ``M``: (semi-)orthogonal, so ``M·D·x`` keeps the scale of ``D·x`` and the Up
factor sees a well-conditioned input from the first step. ``U``: zeros, so the adapter is an exact no-op at init.

Why ``M`` and ``U`` must not both start at zero: ``∂L/∂U = s·g·(M·D·x)ᵀ`` vanishes when ``M = 0`` and
``∂L/∂M = s·Uᵀ·g·(D·x)ᵀ`` vanishes when ``U = 0``; with both zero every adapter gradient (``D``'s too) is zero,
a saddle that gradient descent never leaves. One zero factor (``U``) gives the no-op; the other must be random.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn.linear import canonicalize_padding

from metalora.lora.roles import MetaDownParam, SubjectParam
from metalora.models.matmul import token_matmul

DownInit = Literal["kaiming_uniform", "gaussian"]


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """What to adapt and how.

    Attributes:
      targets: a preset name (``"attn"``, ``"attn_ff"``, ``"all_linear"``, ``"all_linear_conv"``, see
        ``metalora.lora.inject.TARGET_PRESETS``) or a sequence of regexes, each matched (``re.fullmatch``)
        against the dotted diffusers module path, e.g. ``r".*attn2\\.to_(k|v)"``.
      rank: ``r_d``, the rank of the down factor (Meta-Down ``D``, or LoRA's ``A``).
      mid_rank: ``r_m``; ``None`` switches the Mid factor off (plain two-factor LoRA ``s·B·A``).
      alpha: scale numerator; ``None`` means ``alpha = r_up`` (``s = 1``).
      rslora: ``s = alpha / sqrt(r_up)`` instead of ``alpha / r_up``.
      down_role: ``"meta"`` — ``D`` is a ``MetaDownParam`` shared by all subjects (Meta-LoRA);
        ``"subject"`` — ``D`` is a ``SubjectParam`` with the subject axis, trained per subject (LoRA baseline).
      down_init: ``"kaiming_uniform"`` (PEFT default) or ``"gaussian"``.
      num_subjects: size ``S`` of the leading subject axis of subject factors.
    """

    targets: str | Sequence[str] = "attn"
    rank: int = 4
    mid_rank: int | None = None
    alpha: float | None = None
    rslora: bool = False
    down_role: Literal["meta", "subject"] = "subject"
    down_init: DownInit = "kaiming_uniform"
    num_subjects: int = 1

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoRAConfig.rank must be ≥ 1, got {self.rank}")
        if self.mid_rank is not None and self.mid_rank < 1:
            raise ValueError(f"LoRAConfig.mid_rank must be ≥ 1 or None, got {self.mid_rank}")
        if self.down_role not in ("meta", "subject"):
            raise ValueError(f"LoRAConfig.down_role must be 'meta' or 'subject', got {self.down_role!r}")
        if self.down_init not in ("kaiming_uniform", "gaussian"):
            raise ValueError(f"LoRAConfig.down_init must be 'kaiming_uniform' or 'gaussian', got {self.down_init!r}")
        if self.num_subjects < 1:
            raise ValueError(f"LoRAConfig.num_subjects must be ≥ 1, got {self.num_subjects}")

    @property
    def up_rank(self) -> int:
        """``r_up``: the input dimension of the Up factor (``r_m`` with Mid, else ``r_d``)."""
        return self.rank if self.mid_rank is None else self.mid_rank

    @property
    def scale(self) -> float:
        """``s = alpha / r_up`` (rsLoRA: ``alpha / sqrt(r_up)``)."""
        r = self.up_rank
        alpha = r if self.alpha is None else self.alpha
        return alpha / math.sqrt(r) if self.rslora else alpha / r


def init_down(key: jax.Array, shape: tuple[int, ...], method: DownInit, rank: int, dtype=jnp.float32) -> jax.Array:
    """Down factor ``D`` of shape ``(..., in, r_d)`` (fan-in = product of all but the last axis)."""
    if method == "kaiming_uniform":
        # PEFT's default: nn.init.kaiming_uniform_(a=sqrt(5)) == uniform(±1/sqrt(fan_in)).
        return nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")(key, shape, dtype)
    return jax.random.normal(key, shape, dtype) / rank


def init_mid(key: jax.Array, shape: tuple[int, int], dtype=jnp.float32) -> jax.Array:
    """Mid factor ``M``: (semi-)orthogonal, preserving the scale of ``D·x``."""
    return nnx.initializers.orthogonal()(key, shape, dtype)


def _stack_init(init, key: jax.Array, num_subjects: int) -> jax.Array:
    """Independent draws for each subject: ``init(key_s)`` stacked along a leading axis."""
    return jax.vmap(init)(jax.random.split(key, num_subjects))


class LoRAAdapter(nnx.Module):
    """Common part of the Linear and Conv adapters: factors, roles, scale, merge state.

    ``base`` is the wrapped frozen layer; the adapter is called exactly like it. Subject factors must be per
    subject when called (no subject axis): run models whose heads carry the subject axis through
    ``metalora.lora.subjects`` (vmap over subjects) or take one subject with ``take_subject``.
    """

    kind: str = ""

    def __init__(self, base: nnx.Module, config: LoRAConfig, key: jax.Array, down_shape: tuple[int, ...],
                 out_features: int):
        self.base = base
        self.rank = config.rank
        self.mid_rank = config.mid_rank
        self.scale = config.scale
        self.down_role = config.down_role
        self.down_init = config.down_init
        self.down_shape = down_shape  # per-subject shape of D; M and U shapes follow from the ranks
        self.out_features = out_features
        self.merged_subject: int | None = None
        param_dtype = base.param_dtype
        fresh = self.fresh_subject_factors(key, config.num_subjects, dtype=param_dtype)
        if config.down_role == "meta":
            self.lora_down = MetaDownParam(init_down(jax.random.fold_in(key, 7), down_shape, config.down_init,
                                                     config.rank, param_dtype))
        else:
            self.lora_down = SubjectParam(fresh["lora_down"])
        self.lora_mid = SubjectParam(fresh["lora_mid"]) if config.mid_rank is not None else None
        self.lora_up = SubjectParam(fresh["lora_up"])

    # ----------------------------------------------------------------------------------------------- factors
    def fresh_subject_factors(self, key: jax.Array, num_subjects: int, dtype=jnp.float32) -> dict[str, jax.Array]:
        """New subject factors for ``num_subjects`` heads (leading axis), initialised as at construction.

        A pure function of ``key``: used both at construction and to re-initialise heads in a head pool.
        """
        k_down, k_mid = jax.random.split(key)
        out = {}
        if self.down_role == "subject":
            out["lora_down"] = _stack_init(lambda k: init_down(k, self.down_shape, self.down_init, self.rank, dtype),
                                           k_down, num_subjects)
        if self.mid_rank is not None:
            out["lora_mid"] = _stack_init(lambda k: init_mid(k, (self.rank, self.mid_rank), dtype), k_mid,
                                          num_subjects)
        up_rank = self.rank if self.mid_rank is None else self.mid_rank
        out["lora_up"] = jnp.zeros((num_subjects, up_rank, self.out_features), dtype)
        return out

    def _per_subject(self, name: str, variable: nnx.Variable, ndim: int) -> jax.Array:
        value = variable[...]
        if value.ndim == ndim + 1:
            raise ValueError(
                f"{type(self).__name__}.{name} has a leading subject axis of size {value.shape[0]} (shape "
                f"{value.shape}); call the model through metalora.lora.subjects (apply_subjects / apply_indexed) "
                "or take one subject with metalora.lora.take_subject")
        if value.ndim != ndim:
            raise ValueError(f"{type(self).__name__}.{name} has shape {value.shape}; expected {ndim} dims")
        return value

    def factors(self, subject: int | None = None) -> tuple[jax.Array, jax.Array | None, jax.Array]:
        """``(D, M or None, U)`` for one subject: ``subject`` indexes the subject axis; ``None`` expects none."""
        def get(name, variable, ndim, has_subject_axis):
            if variable is None:
                return None
            if subject is not None and has_subject_axis:
                return variable[...][subject]
            return self._per_subject(name, variable, ndim)
        down = get("lora_down", self.lora_down, len(self.down_shape), self.down_role == "subject")
        mid = get("lora_mid", self.lora_mid, 2, True)
        up = get("lora_up", self.lora_up, 2, True)
        return down, mid, up

    def delta_kernel(self, subject: int | None = None) -> jax.Array:
        """``ΔW = s·D·M·U`` in the base kernel's layout (Linear ``(in, out)``; Conv ``(kh, kw, in, out)``)."""
        down, mid, up = self.factors(subject)
        mu = up if mid is None else mid @ up  # (r_d, out)
        return self.scale * jnp.tensordot(down, mu, axes=1)

    # ----------------------------------------------------------------------------------------------- forward
    def _down(self, x: jax.Array, down: jax.Array) -> jax.Array:
        raise NotImplementedError

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.base(x)
        if self.merged_subject is not None:  # ΔW already lives in the base kernel
            return y
        down, mid, up = self.factors()
        dtype = self.base.dtype or jnp.result_type(x, down)
        x, down, up = x.astype(dtype), down.astype(dtype), up.astype(dtype)
        h = self._down(x, down)
        if mid is not None:
            h = token_matmul(h, mid.astype(dtype))
        return y + (self.scale * token_matmul(h, up)).astype(y.dtype)


class LoRALinear(LoRAAdapter):
    """Adapter around an ``nnx.Linear``."""

    kind = "linear"

    def __init__(self, base: nnx.Linear, config: LoRAConfig, *, key: jax.Array):
        super().__init__(base, config, key, (base.in_features, config.rank), base.out_features)

    def _down(self, x, down):
        return token_matmul(x, down)


def _channels_last_dimension_numbers(ndim: int) -> jax.lax.ConvDimensionNumbers:
    spatial = tuple(range(1, ndim - 1))
    lhs = (0, ndim - 1, *spatial)
    rhs = (ndim - 1, ndim - 2, *tuple(range(ndim - 2)))
    return jax.lax.ConvDimensionNumbers(lhs, rhs, lhs)


class LoRAConv(LoRAAdapter):
    """Adapter around an ``nnx.Conv``: ``D`` uses the base geometry, ``M`` and ``U`` are 1×1 (channel matmuls)."""

    kind = "conv"

    def __init__(self, base: nnx.Conv, config: LoRAConfig, *, key: jax.Array):
        if base.feature_group_count != 1:
            raise ValueError(f"LoRAConv: grouped convolutions (feature_group_count={base.feature_group_count}) "
                             "are not supported")
        if base.mask is not None:
            raise ValueError("LoRAConv: masked convolutions are not supported")
        padding = canonicalize_padding(base.padding, len(base.kernel_size))
        if isinstance(padding, str) and padding not in ("SAME", "VALID"):
            raise ValueError(f"LoRAConv: padding {padding!r} is not supported (use SAME, VALID or explicit pads)")
        super().__init__(base, config, key, (*base.kernel_size, base.in_features, config.rank), base.out_features)

    def _down(self, x, down):
        base = self.base
        n = len(base.kernel_size)

        def per_axis(v):
            return (v,) * n if isinstance(v, int) or v is None else tuple(v)

        batch_shape = x.shape[: x.ndim - n - 1]
        flat = x.reshape((-1, *x.shape[x.ndim - n - 1:]))
        h = jax.lax.conv_general_dilated(
            flat, down, per_axis(base.strides or 1), canonicalize_padding(base.padding, n),
            lhs_dilation=per_axis(base.input_dilation or 1), rhs_dilation=per_axis(base.kernel_dilation or 1),
            dimension_numbers=_channels_last_dimension_numbers(flat.ndim), precision=base.precision)
        return h.reshape((*batch_shape, *h.shape[1:]))


ADAPTER_TYPES: dict[type, type[LoRAAdapter]] = {nnx.Linear: LoRALinear, nnx.Conv: LoRAConv}


def iter_adapters(model: nnx.Module):
    """``(path, adapter)`` for every LoRA adapter in ``model``, in graph order."""
    for path, module in nnx.iter_modules(model):
        if isinstance(module, LoRAAdapter):
            yield path, module
