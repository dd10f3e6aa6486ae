"""``x @ w`` for activations against a weight matrix, with a weight gradient XLA:CPU runs as a plain matmul.

The weight gradient of ``y = x @ w`` is ``xᵀ·g``: it contracts the token axis (batch × positions), which leads both
``x`` (tokens, k) and ``g`` (tokens, n). XLA:CPU compiles that dot itself instead of handing it to YNNPACK, and
first transposes ``g`` to (n, tokens). Measured in the LoRA training step (``benchmarks/profile_step.py --program
lora_step``, 2026-12-02): a rank-4 factor's gradient over 2,048 tokens took 0.45 ms, against 0.03 ms for the same
product with ``g`` as (tokens, n) and 0.13 ms for the plain (k, tokens) × (tokens, n) matmul used here, transpose
included; the step held 112 such dots (~14 ms), and the transposes of ``g`` around them. The custom VJP below
materialises ``xᵀ`` (a barrier keeps XLA from folding the transpose back into the dot's dimension numbers) so the
gradient is that plain matmul. Values and gradients, second order included, are ``x @ w``'s.

Pass :func:`dot_general` to ``nnx.Linear(..., dot_general=dot_general)``; LoRA factors call :func:`token_matmul`.
"""

from __future__ import annotations

import jax
from jax import lax


@jax.custom_vjp
def token_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x @ w`` for ``x`` (..., k) and ``w`` (k, n)."""
    return x @ w


def _forward(x, w):
    return x @ w, (x, w)


def _backward(residuals, g):
    x, w = residuals
    x_t = lax.optimization_barrier(x.reshape(-1, x.shape[-1]).T)
    # (A barrier differentiates to a barrier on the cotangent, so second-order MAML can differentiate this rule.)
    return g @ w.T, x_t @ g.reshape(-1, g.shape[-1])


token_matmul.defvjp(_forward, _backward)


def dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers, precision=None, preferred_element_type=None,
                out_sharding=None) -> jax.Array:
    """Drop-in for ``lax.dot_general`` (same arguments): :func:`token_matmul` for a Linear layer's contraction of
    the last axis against a matrix's first, ``lax``'s own for anything else."""
    linear = (((lhs.ndim - 1,), (0,)), ((), ()))
    # Equal dtypes only: a custom VJP must return each cotangent in its primal's dtype, and the rule's xᵀ·g would
    # come out in the promoted one.
    if (rhs.ndim == 2 and lhs.dtype == rhs.dtype and precision is None and preferred_element_type is None
            and out_sharding is None and _canonical(dimension_numbers) == linear):
        return token_matmul(lhs, rhs)
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type, out_sharding=out_sharding)


def _canonical(dimension_numbers):
    (lc, rc), (lb, rb) = dimension_numbers
    return (tuple(lc), tuple(rc)), (tuple(lb), tuple(rb))
