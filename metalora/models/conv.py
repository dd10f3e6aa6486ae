"""``lax.conv_general_dilated`` with an input gradient XLA:CPU runs fast inside loops.

JAX's transpose rule for a convolution's input gradient convolves the output cotangent with the *reversed* kernel
and swaps the kernel's in/out dimension labels instead of moving data. Inside a ``lax.scan`` / ``while`` body (the
inner loop of every adaptation), XLA:CPU keeps that swapped kernel layout (``b01f_01oi->b01f``) and runs the
convolution on a slow path: a 3×3 (16, 32, 32, 64 → 32) input gradient took ~12× longer in a 4-step scan than the
same gradient outside one (measured 679 ms vs 39 ms for the scan; see ``tests/test_conv.py`` for the check that
the compiled scan now holds canonical ``01io`` kernels). Here the input gradient of a stride-1, undilated,
ungrouped NHWC/HWIO convolution is written out with an explicitly flipped and transposed kernel, which XLA
materialises (a few KB) and then convolves in the canonical layout. Every other convolution is ``lax``'s own.

Pass it to ``nnx.Conv(..., conv_general_dilated=conv_general_dilated)``; values and gradients (second order
included, as second-order MAML needs) equal ``lax``'s to float rounding. A custom VJP has no forward mode:
``jax.jvp`` / ``jax.jacfwd`` through these convolutions raise; use reverse mode (or build the layers with plain
``lax.conv_general_dilated``) for forward-mode derivatives.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

_NHWC = ("NHWC", "HWIO", "NHWC")


def _conv(lhs: jax.Array, rhs: jax.Array, padding: tuple[tuple[int, int], ...]) -> jax.Array:
    return lax.conv_general_dilated(lhs, rhs, (1, 1), padding, dimension_numbers=_NHWC)


_conv_stride1 = jax.custom_vjp(_conv, nondiff_argnums=(2,))


def _forward(lhs, rhs, padding):
    # The primal through the custom-VJP function too: a second-order pass differentiates the forward rule's body,
    # which must then use this rule again rather than lax's.
    return _conv_stride1(lhs, rhs, padding), (lhs, rhs)


def _backward(padding, residuals, g):
    lhs, rhs = residuals
    # Cotangent of the input: a "full" correlation of g with the flipped kernel, in/out channels swapped. It is
    # itself a custom-VJP convolution, so differentiating it again (second-order MAML: the outer gradient runs
    # through the inner loop's backward pass) also gets the canonical layout instead of lax's swapped one.
    flipped = jnp.swapaxes(jnp.flip(rhs, (0, 1)), -1, -2)
    pad = tuple((k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip(rhs.shape[:2], padding))
    d_lhs = _conv_stride1(g, flipped.astype(g.dtype), pad)
    # Cotangent of the kernel: lax's own rule (XLA drops it as dead code when the kernel is frozen).
    _, kernel_vjp = jax.vjp(lambda w: _conv(lhs, w, padding), rhs)
    return d_lhs.astype(lhs.dtype), kernel_vjp(g)[0]


_conv_stride1.defvjp(_forward, _backward)


def _is_simple(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
               feature_group_count, batch_group_count) -> bool:
    ones = lambda v: v is None or all(int(d) == 1 for d in v)
    return (lhs.ndim == 4 and ones(window_strides) and ones(lhs_dilation) and ones(rhs_dilation)
            and feature_group_count == 1 and batch_group_count == 1 and not isinstance(padding, str)
            and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
            == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC))


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int], padding,
                         lhs_dilation: Sequence[int] | None = None, rhs_dilation: Sequence[int] | None = None,
                         dimension_numbers=None, feature_group_count: int = 1, batch_group_count: int = 1,
                         precision=None, preferred_element_type=None, out_sharding=None) -> jax.Array:
    """Drop-in for ``lax.conv_general_dilated`` (same arguments)."""
    if (precision is None and preferred_element_type is None and out_sharding is None
            and _is_simple(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                           feature_group_count, batch_group_count)):
        # (custom_vjp wants JAX arrays: a NumPy input would enter its rule as a non-canonical constant)
        return _conv_stride1(jnp.asarray(lhs), jnp.asarray(rhs), tuple((int(lo), int(hi)) for lo, hi in padding))
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                                    feature_group_count, batch_group_count, precision=precision,
                                    preferred_element_type=preferred_element_type, out_sharding=out_sharding)
