"""metalora.models.conv: lax's convolution with an explicitly written input gradient (equal values and gradients;
canonical kernel layout inside a scanned gradient, where lax's transpose rule leaves XLA:CPU a slow swapped one)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from metalora.compiler import jit
from metalora.models.conv import conv_general_dilated

NHWC = ("NHWC", "HWIO", "NHWC")


def _loss(conv, strides, padding):
    def loss(x, w):
        dn = lax.conv_dimension_numbers(x.shape, w.shape, NHWC)
        return jnp.sum(jnp.sin(conv(x, w, strides, padding, None, None, dn)))
    return loss


@pytest.mark.parametrize("kernel, strides, padding", [
    (3, (1, 1), ((1, 1), (1, 1))), (1, (1, 1), ((0, 0), (0, 0))), (3, (1, 1), ((0, 1), (2, 0))),
    (3, (2, 2), ((1, 1), (1, 1))),  # strided: lax's own path
])
def test_values_and_gradients_equal_lax(kernel, strides, padding):
    x = jax.random.normal(jax.random.key(0), (2, 7, 9, 4))
    w = jax.random.normal(jax.random.key(1), (kernel, kernel, 4, 5))
    ours, theirs = _loss(conv_general_dilated, strides, padding), _loss(lax.conv_general_dilated, strides, padding)
    np.testing.assert_allclose(ours(x, w), theirs(x, w), rtol=1e-6)
    for a, b in zip(jax.grad(ours, (0, 1))(x, w), jax.grad(theirs, (0, 1))(x, w), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    uses_custom_rule = "custom_vjp" in str(jax.make_jaxpr(ours)(x, w))
    assert uses_custom_rule == (strides == (1, 1))


def test_second_order_gradients_equal_lax():
    """Second-order MAML differentiates through an inner gradient step: reverse-over-reverse through the rule."""
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
    w = jax.random.normal(jax.random.key(1), (3, 3, 3, 4))

    def outer(conv):
        inner = _loss(conv, (1, 1), ((1, 1), (1, 1)))
        return lambda w: inner(x - 0.1 * jax.grad(inner)(x, w), w)

    np.testing.assert_allclose(jax.grad(outer(conv_general_dilated))(w), jax.grad(outer(lax.conv_general_dilated))(w),
                               rtol=1e-5, atol=1e-5)


def _scanned_gradient_kernels(conv, second_order: bool = False) -> list[str]:
    """dim_labels of the convolutions XLA compiles for a 3-step scan of input-gradient steps (and, with
    ``second_order``, for the gradient of the scan's result: what second-order MAML's outer step compiles)."""
    loss = _loss(conv, (1, 1), ((1, 1), (1, 1)))

    def run(x, w):
        return lax.scan(lambda c, _: (c - 1e-3 * jax.grad(loss)(c, w), None), x, None, length=3)[0]

    outer = lambda x, w: jax.grad(lambda x: jnp.sum(run(x, w) ** 2))(x)
    x, w = jnp.ones((2, 8, 8, 16)), jnp.ones((3, 3, 16, 8))
    hlo = jit(outer if second_order else run).lower(x, w).compile().as_text()
    return [line.split("dim_labels=")[1].split(",")[0] for line in hlo.splitlines() if " convolution(" in line]


@pytest.mark.parametrize("second_order", [False, True])
def test_a_scanned_input_gradient_keeps_the_canonical_kernel_layout(second_order):
    assert any("_01oi->" in d for d in _scanned_gradient_kernels(lax.conv_general_dilated, second_order))  # slow
    ours = _scanned_gradient_kernels(conv_general_dilated, second_order)
    assert ours and not any("_01oi->" in d for d in ours)


def test_nnx_conv_takes_it():
    conv = nnx.Conv(4, 5, (3, 3), padding=((1, 1), (1, 1)), rngs=nnx.Rngs(0),
                    conv_general_dilated=conv_general_dilated)
    reference = nnx.Conv(4, 5, (3, 3), padding=((1, 1), (1, 1)), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (1, 6, 6, 4))
    np.testing.assert_allclose(conv(x), reference(x), rtol=1e-6, atol=1e-6)
