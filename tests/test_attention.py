"""Attention backends agree with the textbook formula, forward and backward (the blocked VJP is hand-written)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metalora.models.attention import dot_product_attention, pick_tiles, resolve_backend


def reference(q, k, v):
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", probs, v)


def qkv(lq, lk, seed=0, heads=3, dim=8):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((2, lq, heads, dim)).astype(np.float32)
    k = rng.standard_normal((2, lk, heads, dim)).astype(np.float32) * 2.0  # peaked softmax
    v = rng.standard_normal((2, lk, heads, dim)).astype(np.float32)
    return q, k, v


@pytest.mark.parametrize("backend", ["blocked", "einsum", "xla"])
@pytest.mark.parametrize("lq, lk", [(64, 64), (96, 7), (10, 33)])
def test_forward_matches_reference(backend, lq, lk):
    q, k, v = qkv(lq, lk)
    out = dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), backend=backend, block_q=32)
    np.testing.assert_allclose(out, reference(q, k, v), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("lq, lk, block", [(64, 64, 16), (96, 7, 32), (10, 33, 4)])
def test_blocked_vjp_matches_autodiff_of_einsum(lq, lk, block):
    q, k, v = map(jnp.asarray, qkv(lq, lk, seed=1))
    cotangent = jnp.asarray(np.random.default_rng(2).standard_normal(q.shape).astype(np.float32))

    def vjp(backend):
        out, pullback = jax.vjp(lambda *a: dot_product_attention(*a, backend=backend, block_q=block), q, k, v)
        return (out, *pullback(cotangent))

    for ours, theirs in zip(vjp("blocked"), vjp("einsum"), strict=True):
        np.testing.assert_allclose(ours, theirs, atol=2e-5, rtol=1e-4)


# tile_bytes picks the tiling: 1 → one head × block_q queries per tile (a loop over heads and query blocks),
# 1 << 30 → every head in one tile (one query block), in between several heads and several query blocks.
@pytest.mark.parametrize("tile_bytes", [1, 3 * 16 * 64 * 4, 1 << 30])
def test_blocked_tilings_agree_with_einsum_forward_and_backward(tile_bytes):
    q, k, v = map(jnp.asarray, qkv(64, 64, seed=3))
    cotangent = jnp.asarray(np.random.default_rng(4).standard_normal(q.shape).astype(np.float32))
    heads, block = pick_tiles(2 * 3, 64, 64, block_q=16, tile_bytes=tile_bytes)
    assert block == 16 and heads == {1: 1, 3 * 16 * 64 * 4: 3, 1 << 30: 6}[tile_bytes]

    def vjp(backend):
        f = lambda *a: dot_product_attention(*a, backend=backend, block_q=16, tile_bytes=tile_bytes)
        out, pullback = jax.vjp(f, q, k, v)
        return (out, *pullback(cotangent))

    for ours, theirs in zip(vjp("blocked"), vjp("einsum"), strict=True):
        np.testing.assert_allclose(ours, theirs, atol=2e-5, rtol=1e-4)


def test_pick_tiles():
    assert pick_tiles(32, 256, 256) == (4, 256)  # 4 heads × 256 × 256 f32 = 1 MiB
    assert pick_tiles(16, 4096, 4096) == (1, 256)  # one head's block is already 4 MiB: one head per tile
    assert pick_tiles(6, 96, 7, block_q=64) == (6, 48)  # largest divisor of 96 up to 64; everything fits
    assert pick_tiles(7, 10, 33, block_q=4, tile_bytes=2 * 4 * 33 * 4) == (1, 2)  # 7 has no divisor 2


def test_blocked_second_order_gradients_match_einsum():
    """Second-order MAML differentiates through the custom VJP's backward pass: grad of a grad must be right."""
    def inner_then_outer(backend):
        q, k, v = (jnp.asarray(x, jnp.float64) for x in qkv(32, 32, seed=5, heads=2, dim=4))
        loss = lambda q, k, v: jnp.sum(jnp.sin(dot_product_attention(q, k, v, backend=backend, block_q=8,
                                                                     tile_bytes=2 * 8 * 32 * 8)))
        adapted = lambda q, k, v: loss(q - 0.1 * jax.grad(loss)(q, k, v), k, v)  # one inner step on q
        return jax.grad(adapted, argnums=(0, 1, 2))(q, k, v)

    with jax.enable_x64():
        for ours, theirs in zip(inner_then_outer("blocked"), inner_then_outer("einsum"), strict=True):
            np.testing.assert_allclose(ours, theirs, atol=1e-10, rtol=1e-9)


def test_blocked_under_vmap_equals_per_example():
    q, k, v = map(jnp.asarray, qkv(32, 16, seed=6))
    f = lambda q, k, v: dot_product_attention(q[None], k[None], v[None], backend="blocked", block_q=8)[0]
    g = lambda q, k, v: jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=(0, 1, 2))(q, k, v)
    batched = jax.vmap(g)(q, k, v)
    for i in range(q.shape[0]):
        for ours, single in zip(batched, g(q[i], k[i], v[i]), strict=True):
            np.testing.assert_allclose(ours[i], single, atol=1e-6, rtol=1e-6)


def test_blocked_handles_bf16_with_f32_statistics():
    q, k, v = qkv(64, 64)
    out = dot_product_attention(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)), backend="blocked")
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), reference(q, k, v), atol=3e-2)


def test_backend_resolution():
    assert resolve_backend("auto") == ("blocked" if jax.default_backend() == "cpu" else "xla")
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_backend("flash3")


def _leading_axis_dots(hlo: str) -> list[str]:
    """The compiled batched (rank-3, batch dim 0) dots whose left operand is contracted on an axis other than its
    last: the layout XLA:CPU runs on its slow path (see ``_tile_backward``)."""
    import re

    dots = re.findall(r"dot\([^)]*\), lhs_batch_dims=\{0\}, lhs_contracting_dims=\{(\d+)\}", hlo)
    assert dots, "no batched dots found: the HLO text format changed, fix the pattern"
    return [d for d in dots if d != "2"]


@pytest.mark.parametrize("lk", [256, 33])
def test_blocked_backward_compiles_to_last_axis_dots(lk):
    """At the tiny UNet's shapes (batch 32, 4 heads, 16×16 queries; self- and cross-attention) every compiled dot
    contracts its left operand's last axis. A transpose of dQᵀ inside the tile was folded back into its dot by XLA,
    which then contracted dS's leading axis (3 such dots were 5 % of a pretraining step)."""
    from metalora.compiler import jit

    q = jnp.zeros((32, 256, 4, 8))
    k = v = jnp.zeros((32, lk, 4, 8))
    grad = jit(jax.grad(lambda q, k, v: jnp.sum(dot_product_attention(q, k, v, backend="blocked") ** 2),
                        argnums=(0, 1, 2)))
    assert _leading_axis_dots(grad.lower(q, k, v).compile().as_text()) == []
