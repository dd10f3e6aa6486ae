"""Scaled dot-product attention with pluggable backends.

All backends take ``q`` (B, Lq, H, D) and ``k``, ``v`` (B, Lk, H, D) — the layout of
``jax.nn.dot_product_attention`` — and return (B, Lq, H, D).

Backends:

* ``"xla"``: ``jax.nn.dot_product_attention`` with XLA's implementation (the portable default on GPU/TPU).
* ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")``, the fused kernel on NVIDIA GPUs (bf16/f16).
* ``"einsum"``: the textbook einsum → softmax → einsum (reference; materialises every score).
* ``"blocked"``: memory-efficient attention for CPU. Queries are processed one (head, query-block) at a time so
  the score tile stays in cache, and the backward pass is a custom VJP that *recomputes* each tile from the saved
  log-sum-exp instead of storing the (Lq, Lk) probabilities (the flash-attention recipe). On a 2-core CPU the
  UNet's self-attention at 32×32 latents (1024 tokens) is the step's hot spot, and autodiff through a plain
  softmax keeps and re-reads every probability; recomputation is cheaper than that memory traffic.
* ``"auto"``: ``"blocked"`` on CPU, ``"xla"`` elsewhere.

Softmax statistics are always accumulated in float32, whatever the compute dtype (``upcast_attention`` in
diffusers is therefore implied for the blocked backend, and applied explicitly for the others).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

BACKENDS = ("auto", "xla", "cudnn", "einsum", "blocked")


def resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend '{backend}'; choose one of {BACKENDS}")
    if backend == "auto":
        return "blocked" if jax.default_backend() == "cpu" else "xla"
    return backend


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, backend: str = "auto",
                          upcast: bool = False, block_q: int = 256) -> jax.Array:
    """softmax(q·kᵀ/√D)·v per head. ``upcast`` computes q·kᵀ in float32 (diffusers' ``upcast_attention``)."""
    backend = resolve_backend(backend)
    scale = 1.0 / math.sqrt(q.shape[-1])
    if backend == "einsum":
        return _einsum_attention(q, k, v, scale, upcast)
    if backend in ("xla", "cudnn"):
        if upcast and q.dtype != jnp.float32:
            out = jax.nn.dot_product_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                                               scale=scale, implementation="xla")
            return out.astype(q.dtype)
        return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=backend)
    # blocked: fold (B, H) into one axis of independent problems, (N, L, D).
    b, lq, h, d = q.shape
    lk = k.shape[1]
    fold = lambda x, length: x.transpose(0, 2, 1, 3).reshape(b * h, length, d)
    out = blocked_attention(fold(q, lq), fold(k, lk), fold(v, lk), scale, _pick_block(lq, block_q))
    return out.reshape(b, h, lq, d).transpose(0, 2, 1, 3)


def _einsum_attention(q, k, v, scale, upcast):
    compute = jnp.float32 if upcast else q.dtype
    scores = jnp.einsum("bqhd,bkhd->bhqk", q.astype(compute), k.astype(compute)) * scale
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def _pick_block(length: int, preferred: int) -> int:
    """Largest divisor of ``length`` not above ``preferred`` (token counts are products of small powers of 2)."""
    for size in range(min(preferred, length), 0, -1):
        if length % size == 0:
            return size
    return length


# ----------------------------------------------------------------------------------------------------------------
# Blocked attention with a recomputing custom VJP. Shapes: q (N, Lq, D), k/v (N, Lk, D); N = batch × heads.
# ----------------------------------------------------------------------------------------------------------------


def _tile_forward(q_tile, k, v, scale):
    """One (head, query-block) tile: output and the per-row log-sum-exp needed to recompute probabilities."""
    s = jnp.dot(q_tile, k.T, preferred_element_type=jnp.float32) * scale
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - m)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32) / denom
    return out.astype(q_tile.dtype), (m + jnp.log(denom))[:, 0]


def _forward(q, k, v, scale, block_q):
    n, lq, d = q.shape
    tiles = q.reshape(n, lq // block_q, block_q, d)

    def per_head(args):
        q_tiles, k_h, v_h = args
        return jax.lax.map(lambda t: _tile_forward(t, k_h, v_h, scale), q_tiles)

    out, lse = jax.lax.map(per_head, (tiles, k, v))
    return out.reshape(n, lq, d), lse.reshape(n, lq)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def blocked_attention(q, k, v, scale: float, block_q: int):
    return _forward(q, k, v, scale, block_q)[0]


def _blocked_fwd(q, k, v, scale, block_q):
    out, lse = _forward(q, k, v, scale, block_q)
    return out, (q, k, v, out, lse)


def _blocked_bwd(scale, block_q, residuals, d_out):
    q, k, v, out, lse = residuals
    n, lq, d = q.shape
    nb = lq // block_q
    # delta_i = Σ_j P_ij dP_ij = rowsum(dO ∘ O): the softmax-backward correction, computed once per row.
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    split = lambda x: x.reshape(n, nb, block_q, *x.shape[2:])

    def per_head(args):
        q_h, k_h, v_h, do_h, lse_h, delta_h = args

        def tile(carry, xs):
            dk, dv = carry
            q_t, do_t, lse_t, delta_t = xs
            s = jnp.dot(q_t, k_h.T, preferred_element_type=jnp.float32) * scale
            p = jnp.exp(s - lse_t[:, None])
            dv = dv + jnp.dot(p.T.astype(do_t.dtype), do_t, preferred_element_type=jnp.float32)
            dp = jnp.dot(do_t, v_h.T, preferred_element_type=jnp.float32)
            ds = p * (dp - delta_t[:, None]) * scale
            dq_t = jnp.dot(ds.astype(k_h.dtype), k_h, preferred_element_type=jnp.float32)
            dk = dk + jnp.dot(ds.T.astype(q_t.dtype), q_t, preferred_element_type=jnp.float32)
            return (dk, dv), dq_t

        zeros = jnp.zeros(k_h.shape, jnp.float32)
        (dk, dv), dq = jax.lax.scan(tile, (zeros, zeros), (q_h, do_h, lse_h, delta_h))
        return dq.reshape(lq, d), dk, dv

    dq, dk, dv = jax.lax.map(per_head, (split(q), k, v, split(d_out), split(lse), split(delta)))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


blocked_attention.defvjp(_blocked_fwd, _blocked_bwd)
