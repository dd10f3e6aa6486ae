"""metalora.compiler.jit: jax.jit with the measured CPU compiler options, resolved lazily."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metalora import compiler
from metalora.compiler import jit


def _conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _conv_inputs():
    """A first-level UNet ResNet conv at batch 8 (XLA's cost model keeps tiny convs off the library)."""
    rng = np.random.default_rng(0)
    return (jnp.asarray(rng.standard_normal((8, 32, 32, 32), dtype=np.float32)),
            jnp.asarray(rng.standard_normal((3, 3, 32, 32), dtype=np.float32) / 17))


def _library_conv_fusions(compiled_text: str) -> int:
    """Convolutions XLA handed to a library fusion (kind=kCustom) instead of its own emitter."""
    return len(re.findall(r"kind=kCustom[^\n]*conv_general_dilated", compiled_text))


def test_cpu_defaults_are_supported_and_used():
    assert jax.default_backend() == "cpu"
    assert compiler.options_supported(compiler.CPU_COMPILER_OPTIONS)
    assert compiler.default_compiler_options() == compiler.CPU_COMPILER_OPTIONS


def test_bad_options_are_detected():
    assert not compiler.options_supported({"xla_cpu_experimental_ynn_fusion_type": "NOT_A_FUSION_TYPE"})
    assert not compiler.options_supported({"xla_no_such_option": "1"})


def test_convolutions_leave_the_library_fusion():
    x, w = _conv_inputs()
    grad = jax.grad(lambda x, w: jnp.sum(_conv(x, w) ** 2), argnums=(0, 1))
    plain = jax.jit(grad).lower(x, w).compile().as_text()
    ours = jit(grad).lower(x, w).compile().as_text()
    if _library_conv_fusions(plain) == 0:
        pytest.skip("this jaxlib does not send convolutions to a library fusion by default")
    assert _library_conv_fusions(ours) == 0


def test_reductions_stay_on_the_library():
    # Naming the fusion types replaces XLA's default list; without REDUCE every long reduction becomes a
    # reduce-window of 32 plus a second reduce (two small kernels), measured 13 % of the pretraining step.
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4096, 64), dtype=np.float32))
    text = jit(lambda a: a.sum(0)).lower(x).compile().as_text()
    assert "reduce-window" not in text
    assert re.search(r"kind=kCustom[^\n]*reduce_sum", text)
    np.testing.assert_allclose(jit(lambda a: a.sum(0))(x), np.asarray(x, np.float64).sum(0), rtol=0, atol=2e-4)


def test_values_and_gradients_match_plain_jit():
    x, w = _conv_inputs()
    loss = lambda x, w: jnp.sum(jnp.tanh(_conv(x, w)) ** 2)
    for fn in (_conv, jax.grad(loss, argnums=(0, 1))):
        for ours, plain in zip(jax.tree.leaves(jit(fn)(x, w)), jax.tree.leaves(jax.jit(fn)(x, w)), strict=True):
            # Another convolution algorithm: f32 sums in another order, so agreement to f32 rounding of the scale.
            np.testing.assert_allclose(ours, plain, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(plain))))


def test_jit_arguments_pass_through():
    calls = []

    @functools.partial(jit, static_argnames=("power",))
    def f(x, power):
        calls.append(power)  # runs at trace time only
        return x**power

    assert f.__name__ == "f"
    x = jnp.arange(3.0)
    np.testing.assert_array_equal(f(x, power=2), x**2)
    np.testing.assert_array_equal(f(x, power=2), x**2)
    np.testing.assert_array_equal(f(x, power=3), x**3)
    assert calls == [2, 3]  # one trace per static value: the jitted function is created once and cached
    assert "stablehlo" in f.lower(x, power=2).as_text()  # attributes of the jitted function are forwarded

    donated = jit(lambda a: a + 1, donate_argnums=0)
    a = jnp.ones(4)
    donated(a)
    assert a.is_deleted()


def test_caller_options_override_the_defaults():
    f = jit(lambda x: x * 2, compiler_options={"xla_cpu_experimental_ynn_fusion_type": "NOT_A_FUSION_TYPE"})
    with pytest.raises(Exception, match="xla_cpu_experimental_ynn_fusion_type"):
        f(jnp.ones(2))


def test_rejected_defaults_fall_back_with_a_warning(monkeypatch):
    compiler.default_compiler_options.cache_clear()
    monkeypatch.setattr(compiler, "CPU_COMPILER_OPTIONS", {"xla_no_such_option": "1"})
    try:
        with pytest.warns(RuntimeWarning, match="rejects the CPU compiler options"):
            assert compiler.default_compiler_options() == {}
        np.testing.assert_array_equal(jit(lambda x: x + 1)(jnp.zeros(2)), jnp.ones(2))
    finally:
        compiler.default_compiler_options.cache_clear()


def test_nested_calls_compile_under_the_outer_jit():
    inner = jit(lambda x: jnp.sin(x) * 2)
    outer_ours = jit(lambda x: inner(x) + 1)
    outer_plain = jax.jit(lambda x: inner(x) + 1)
    x = jnp.linspace(0.0, 1.0, 5)
    expected = jnp.sin(x) * 2 + 1
    np.testing.assert_allclose(outer_ours(x), expected, rtol=1e-6)
    np.testing.assert_allclose(outer_plain(x), expected, rtol=1e-6)
    np.testing.assert_allclose(jax.vmap(inner)(x), jnp.sin(x) * 2, rtol=1e-6)
    np.testing.assert_allclose(jax.grad(lambda x: jnp.sum(inner(x)))(x), 2 * jnp.cos(x), rtol=1e-6)
