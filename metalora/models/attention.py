"""Scaled dot-product attention with pluggable backends.

All backends take ``q`` (B, Lq, H, D) and ``k``, ``v`` (B, Lk, H, D) — the layout of
``jax.nn.dot_product_attention`` — and return (B, Lq, H, D).

Backends:

* ``"xla"``: ``jax.nn.dot_product_attention`` with XLA's implementation (the portable default on GPU/TPU).
* ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")``, the fused kernel on NVIDIA GPUs (bf16/f16).
* ``"einsum"``: the textbook einsum → softmax → einsum (reference; materialises every score).
* ``"blocked"``: memory-efficient attention for CPU. Queries are processed in tiles of a few heads × a query block
  (:func:`pick_tiles`) so the score tile stays in cache, and the backward pass is a custom VJP that *recomputes*
  each tile from the saved log-sum-exp instead of storing the (Lq, Lk) probabilities (the flash-attention recipe).
  On a 2-core CPU the UNet's self-attention is the step's hot spot, and autodiff through a plain softmax keeps and
  re-reads every probability; recomputation is cheaper than that memory traffic.
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
                          upcast: bool = False, block_q: int = 256, tile_bytes: int = 1 << 20) -> jax.Array:
    """softmax(q·kᵀ/√D)·v per head. ``upcast`` computes q·kᵀ in float32 (diffusers' ``upcast_attention``).

    ``block_q`` and ``tile_bytes`` size the blocked backend's tiles (see :func:`pick_tiles`)."""
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
    heads_per_tile, block = pick_tiles(b * h, lq, lk, block_q=block_q, tile_bytes=tile_bytes)
    out = blocked_attention(fold(q, lq), fold(k, lk), fold(v, lk), scale, heads_per_tile, block)
    return out.reshape(b, h, lq, d).transpose(0, 2, 1, 3)


def _einsum_attention(q, k, v, scale, upcast):
    compute = _acc(q.dtype) if upcast else q.dtype
    scores = jnp.einsum("bqhd,bkhd->bhqk", q.astype(compute), k.astype(compute)) * scale
    probs = jax.nn.softmax(scores.astype(_acc(scores.dtype)), axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def _largest_divisor(n: int, at_most: int) -> int:
    """Largest divisor of ``n`` not above ``at_most`` (at least 1)."""
    for size in range(max(1, min(at_most, n)), 0, -1):
        if n % size == 0:
            return size
    return 1


def pick_tiles(heads: int, lq: int, lk: int, *, block_q: int = 256, tile_bytes: int = 1 << 20) -> tuple[int, int]:
    """(heads per tile, queries per tile) of the blocked backend for ``heads`` problems of (lq × lk) scores.

    Queries come in blocks of up to ``block_q`` (a divisor of lq); as many heads share a tile as fit its f32 score
    block in ``tile_bytes``. Measured on the 2-core CPU (``benchmarks/speed.py --sections attention`` and the
    UNet shapes): 1 MiB tiles were the fastest or within noise of it from 256 to 4096 tokens: small problems
    (the tiny UNet's 256 tokens × 32 heads) run as a few batched tiles instead of 32 tiny per-head loops
    (gradient 21 → 17 ms), large ones stay one head × 256 queries per tile, where the score block stays in cache.
    Under ``vmap`` (many subjects at once) the sizes are per example: each tile is batched over the mapped axis.
    """
    block = _largest_divisor(lq, block_q)
    return _largest_divisor(heads, tile_bytes // (4 * block * lk)), block


# ----------------------------------------------------------------------------------------------------------------
# Blocked attention with a recomputing custom VJP. Shapes: q (N, Lq, D), k/v (N, Lk, D); N = batch × heads.
# Tiles are (hc heads, bq queries) against all keys; a tile's scores are (hc, bq, Lk). The 1/√D scale is folded
# into the exponent (exp(scale·(s − max s))), where XLA fuses it, instead of a separate pass over the scores.
# ----------------------------------------------------------------------------------------------------------------


def _to_tiles(x, hc: int, bq: int):
    """(N, L, ...) → (N/hc, L/bq, hc, bq, ...): head chunks outermost, then query blocks."""
    n, length, rest = x.shape[0], x.shape[1], x.shape[2:]
    return x.reshape(n // hc, hc, length // bq, bq, *rest).swapaxes(1, 2)


def _from_tiles(x):
    chunks, blocks, hc, bq = x.shape[:4]
    return x.swapaxes(1, 2).reshape(chunks * hc, blocks * bq, *x.shape[4:])


def _loop(fn, xs):
    """``lax.map(fn, xs)``, without a loop when there is one iteration (XLA keeps a 1-trip while as a loop)."""
    if jax.tree.leaves(xs)[0].shape[0] == 1:
        return jax.tree.map(lambda y: y[None], fn(jax.tree.map(lambda x: x[0], xs)))
    return jax.lax.map(fn, xs)


def _acc(dtype) -> jnp.dtype:
    """Accumulation dtype: float32 for half-precision inputs (softmax statistics), the input's own if wider."""
    return jnp.promote_types(dtype, jnp.float32)


def _tile_forward(q_tile, k, v, scale):
    """One tile: output and the per-row log-sum-exp (of the scaled scores) needed to recompute probabilities."""
    s = jnp.einsum("hqd,hkd->hqk", q_tile, k, preferred_element_type=_acc(q_tile.dtype))
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(scale * (s - m))
    denom = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("hqk,hkd->hqd", p.astype(v.dtype), v, preferred_element_type=_acc(q_tile.dtype)) / denom
    return out.astype(q_tile.dtype), (scale * m + jnp.log(denom))[..., 0]


def _forward(q, k, v, scale, hc, bq):
    n = q.shape[0]
    chunk = lambda x: x.reshape(n // hc, hc, *x.shape[1:])

    def per_chunk(args):
        q_tiles, k_c, v_c = args
        return _loop(lambda t: _tile_forward(t, k_c, v_c, scale), q_tiles)

    out, lse = _loop(per_chunk, (_to_tiles(q, hc, bq), chunk(k), chunk(v)))
    return _from_tiles(out), _from_tiles(lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def blocked_attention(q, k, v, scale: float, heads_per_tile: int, block_q: int):
    return _forward(q, k, v, scale, heads_per_tile, block_q)[0]


def _blocked_fwd(q, k, v, scale, hc, bq):
    out, lse = _forward(q, k, v, scale, hc, bq)
    return out, (q, k, v, out, lse)


def _tile_backward(carry, xs, k, k_t, v, scale):
    """One tile of the backward pass, computed in (keys × queries) orientation.

    XLA:CPU runs a dot that contracts its left operand's *leading* axis (Pᵀ·dO, dSᵀ·Q in the textbook order) on a
    slow path (3-4× a plain matmul here). Recomputing the transposed scores Sᵀ = K·Qᵀ makes dV = Pᵀ·dO and
    dK = dSᵀ·Q plain matmuls, and dQᵀ = Kᵀ·dSᵀ is one too given Kᵀ, a small (D × Lk) copy made once per chunk.
    dQᵀ leaves the tile as it is and is transposed once after the loop: a transpose inside the tile is folded back
    into the dot by XLA, which then contracts dSᵀ's leading axis on the slow path (a 16×16 self-attention's
    forward + backward at batch 32: 62 → 46 ms).
    """
    dk, dv = carry
    q_t, do_t, lse_t, delta_t = xs
    s_t = jnp.einsum("hkd,hqd->hkq", k, q_t, preferred_element_type=_acc(q_t.dtype))
    p_t = jnp.exp(scale * s_t - lse_t[:, None, :])
    dv = dv + jnp.einsum("hkq,hqd->hkd", p_t.astype(do_t.dtype), do_t, preferred_element_type=_acc(q_t.dtype))
    dp_t = jnp.einsum("hkd,hqd->hkq", v, do_t, preferred_element_type=_acc(q_t.dtype))
    # delta_i = Σ_j P_ij dP_ij = rowsum(dO ∘ O): the softmax-backward correction, computed once per row.
    ds_t = (p_t * (dp_t - delta_t[:, None, :])).astype(q_t.dtype)
    dk = dk + jnp.einsum("hkq,hqd->hkd", ds_t, q_t, preferred_element_type=_acc(q_t.dtype))
    dq_t = jnp.einsum("hdk,hkq->hdq", k_t, ds_t, preferred_element_type=_acc(q_t.dtype))
    return (dk, dv), dq_t


def _blocked_bwd(scale, hc, bq, residuals, d_out):
    q, k, v, out, lse = residuals
    n = q.shape[0]
    acc = _acc(q.dtype)
    delta = jnp.sum(d_out.astype(acc) * out.astype(acc), axis=-1)
    chunk = lambda x: x.reshape(n // hc, hc, *x.shape[1:])

    def per_chunk(args):
        q_c, do_c, lse_c, delta_c, k_c, v_c = args
        # A materialised Kᵀ: without the barrier XLA folds the transpose back into the dot's dimension numbers.
        k_t = jax.lax.optimization_barrier(jnp.swapaxes(k_c, 1, 2))
        tile = functools.partial(_tile_backward, k=k_c, k_t=k_t, v=v_c, scale=scale)
        zeros = jnp.zeros(k_c.shape, acc)
        if q_c.shape[0] == 1:
            (dk, dv), dq = tile((zeros, zeros), jax.tree.map(lambda x: x[0], (q_c, do_c, lse_c, delta_c)))
            return dq[None], dk, dv
        (dk, dv), dq = jax.lax.scan(tile, (zeros, zeros), (q_c, do_c, lse_c, delta_c))
        return dq, dk, dv

    tiles = lambda x: _to_tiles(x, hc, bq)
    dq, dk, dv = _loop(per_chunk, (tiles(q), tiles(d_out), tiles(lse), tiles(delta), chunk(k), chunk(v)))
    # The scale of S = scale·Q·Kᵀ, applied to the small gradients instead of every dS.
    dq = _from_tiles(dq.swapaxes(-1, -2)) * scale
    dk = dk.reshape(k.shape) * scale
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.reshape(v.shape).astype(v.dtype)


blocked_attention.defvjp(_blocked_fwd, _blocked_bwd)
