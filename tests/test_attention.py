"""Attention backends agree with the textbook formula, forward and backward (the blocked VJP is hand-written)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metalora.models.attention import dot_product_attention, resolve_backend


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


def test_blocked_handles_bf16_with_f32_statistics():
    q, k, v = qkv(64, 64)
    out = dot_product_attention(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)), backend="blocked")
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), reference(q, k, v), atol=3e-2)


def test_backend_resolution():
    assert resolve_backend("auto") == ("blocked" if jax.default_backend() == "cpu" else "xla")
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_backend("flash3")
