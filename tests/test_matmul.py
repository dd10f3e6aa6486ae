"""metalora.models.matmul: ``x @ w`` with a weight gradient XLA:CPU runs as a plain matmul."""

import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from metalora.models.matmul import dot_general, token_matmul


def test_token_matmul_equals_a_plain_matmul_to_second_order_and_under_vmap():
    """The custom VJP (a materialised xᵀ for the weight gradient) changes where XLA runs the gradient, not its
    value: first and second derivatives (second-order MAML differentiates the inner loop's gradient) and a vmapped
    subject axis agree with ``x @ w``."""
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x, w = jax.random.normal(kx, (2, 3, 5, 8)), jax.random.normal(kw, (8, 4))
    probe = jax.random.normal(kg, (2, 3, 5, 4))

    def loss(matmul):
        return lambda x, w: jnp.sum(jnp.tanh(matmul(x, w)) * probe)

    plain, ours = loss(lambda x, w: x @ w), loss(token_matmul)
    np.testing.assert_allclose(token_matmul(x, w), x @ w, rtol=1e-6)
    for a, b in zip(jax.grad(ours, (0, 1))(x, w), jax.grad(plain, (0, 1))(x, w)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # second order: the gradient of a function of the factor's gradient (as MAML's outer step takes it)
    second = lambda f: jax.grad(lambda w: jnp.sum(jnp.sin(jax.grad(f, 1)(x, w))), argnums=0)(w)
    np.testing.assert_allclose(second(ours), second(plain), rtol=1e-5, atol=1e-6)
    # a subject axis on the factor, as apply_subjects maps it
    ws = jnp.stack([w, 2 * w])
    per_subject = lambda f: jax.vmap(jax.grad(f, 1), in_axes=(None, 0))(x, ws)
    np.testing.assert_allclose(per_subject(ours), per_subject(plain), rtol=1e-5, atol=1e-6)


def test_token_matmul_factor_gradient_compiles_to_a_plain_matmul():
    """Without the materialised xᵀ, XLA:CPU compiles the factor gradient as a dot contracting both operands' leading
    (token) axis, which it runs itself, ~4-15× slower than the plain matmul this asks for."""
    x, w = jnp.ones((8, 256, 64)), jnp.ones((64, 4))
    grad_w = lambda matmul: jax.jit(jax.grad(lambda w: jnp.sum(jnp.sin(matmul(x, w))))).lower(w).compile().as_text()
    leading = re.compile(r"dot\(.*lhs_contracting_dims=\{0\}")
    assert leading.search(grad_w(lambda x, w: x @ w))  # the pattern this works around (if XLA stops, revisit)
    assert not leading.search(grad_w(token_matmul))


def test_linear_layers_with_the_drop_in_equal_plain_ones():
    """``nnx.Linear(..., dot_general=dot_general)``: the same outputs and kernel gradients as the default layer
    (same weights), and any other contraction goes to ``lax.dot_general`` unchanged."""
    ours = nnx.Linear(8, 6, dot_general=dot_general, rngs=nnx.Rngs(0))
    plain = nnx.Linear(8, 6, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (3, 5, 8))
    np.testing.assert_array_equal(ours(x), plain(x))
    grads = [nnx.grad(lambda m: jnp.sum(jnp.sin(m(x))))(m) for m in (ours, plain)]
    np.testing.assert_allclose(grads[0]["kernel"][...], grads[1]["kernel"][...], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grads[0]["bias"][...], grads[1]["bias"][...], rtol=1e-6)
    a, b = jnp.ones((4, 3)), jnp.ones((4, 2))
    np.testing.assert_array_equal(dot_general(a, b, (((0,), (0,)), ((), ()))), jnp.full((3, 2), 4.0))
