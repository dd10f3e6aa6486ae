"""``jit``: ``jax.jit`` plus the XLA compiler options this library measured to be faster on the running backend.

Every program the library compiles goes through :func:`jit`, so a backend-specific setting lives here once instead
of in an ``XLA_FLAGS`` environment variable (process-global, read once, easy to forget in a new entry point). The
options are passed per compilation (``jax.jit(..., compiler_options=...)``), so nothing global changes and callers
can still add or override options of their own.

Why each option (measured on the project's 2-core AMD EPYC machine, ``python -m benchmarks.speed``):

* ``xla_cpu_experimental_ynn_fusion_type = INDIVIDUAL_DOT`` (the default also sends convolutions to YNNPACK). XLA's
  own convolution is much faster here: a 3×3 conv over (8, 32, 32, 64 → 64), forward + both gradients, 40-50 ms with
  YNNPACK vs 14.5 ms without (``--sections conv``); the small UNet's forward at batch 16 from ~180 to ~135 ms; the
  LoRA training step 361 → 266-313 ms and DDIM sampling 1.42 → 1.75-1.86 images/s. Dots stay on YNNPACK
  (90-146 GFLOP/s here, on par with torch); 1×1 convolutions measured as fast as the equivalent dot without it.
* ``... + LIBRARY_FUSION_TYPE_REDUCE``: reductions stay on YNNPACK, as in XLA's default (naming the field's values
  replaces the whole default list, and the first version of this option named dots only). Without it XLA's
  tree-reduction rewriter splits every reduction longer than 32 into a ``reduce-window`` of 32 and a second reduce,
  each its own small kernel
  (~840 such kernels a pretraining step: GroupNorm statistics, bias gradients, softmax maxima and sums, norms of
  the optimizer). Measured in alternation in one process (2026-12-01, median of 16 turns of 3 steps): the base
  model's pretraining step 862 → 752 ms (-13 %), DDIM sampling 2.28 → 2.51 images/s, the LoRA step of
  ``benchmarks/speed.py`` unchanged (194 vs 197 ms). Sums change in the last bits (a different order), no less
  precise: over 32768 × 64 f32 values the error against float64 is 7e-5 vs 1e-4 before.
* Not added: ``LIBRARY_FUSION_TYPE_ELTWISE`` and ``LIBRARY_FUSION_TYPE_DOT`` (dots fused with their elementwise
  neighbours). Interleaved in one process (2026-12-02, medians of 10-12 turns): LoRA step 252 / 238 / 250 / 245 ms
  and pretraining step 818 / 804 / 821 / 858 ms for the current list / +ELTWISE / DOT instead of INDIVIDUAL_DOT /
  DOT + ELTWISE, all within the ±10 % turn-to-turn noise of this VM.
* Not added either (2026-12-02, same alternation, 12 / 10 turns): ``xla_cpu_prefer_vector_width=512`` (the host has
  AVX-512) and ``xla_cpu_enable_concurrency_optimized_scheduler=False``: LoRA step 193 / 192 / 192 ms, pretraining
  step 758 / 799 / 755 ms for the current options / 512-bit vectors / the plain scheduler.

The options are resolved lazily, on the first call of a jitted function (so importing the library does not start
a backend), and only for a CPU default backend. If the installed jaxlib rejects them (a renamed experimental flag
in a later release) the library warns once and compiles with XLA's defaults rather than failing.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax

try:  # JAX's own "not inside any trace" test; internal, so optional (see _at_top_level)
    from jax._src.core import trace_state_clean as _trace_state_clean
except ImportError:
    _trace_state_clean = None

CPU_COMPILER_OPTIONS: Mapping[str, str] = {
    # Convolutions go to XLA's own emitter; dots and reductions go to YNNPACK (a repeated field: comma-separated).
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE",
}


def options_supported(options: Mapping[str, Any]) -> bool:
    """Whether this jaxlib compiles a trivial program with ``options`` (unknown names or values raise)."""
    try:
        jax.jit(lambda x: x + 1, compiler_options=dict(options)).lower(1.0).compile()
    except Exception:  # XLA reports a bad name or value as a generic runtime error
        return False
    return True


@functools.cache
def default_compiler_options() -> Mapping[str, Any]:
    """The options :func:`jit` adds for the current default backend (empty where nothing was measured)."""
    if jax.default_backend() != "cpu":
        return {}
    if not options_supported(CPU_COMPILER_OPTIONS):
        warnings.warn(f"this jaxlib rejects the CPU compiler options {dict(CPU_COMPILER_OPTIONS)}; compiling with "
                      "XLA's defaults (slower convolutions on CPU)", RuntimeWarning, stacklevel=2)
        return {}
    return CPU_COMPILER_OPTIONS


def _at_top_level(args: Any) -> bool:
    """Whether a jit called now compiles its own program (True) or is staged into an enclosing trace (False).

    JAX only accepts ``compiler_options`` on a top-level jit; nested in another jit, the outer program's options
    apply anyway. ``trace_state_clean`` is JAX's own test for that (internal, hence the fallback to "no traced
    argument"). Under an eager ``vmap``/``grad`` of a jitted call (not used in this library) both say "nested"
    and that call compiles with XLA's defaults.
    """
    if _trace_state_clean is not None:
        return _trace_state_clean()
    return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(args))


class _LazyJit:
    """A ``jax.jit`` function created on first use, with :func:`default_compiler_options` merged in.

    Two jitted functions share ``fun``: ``top`` (with the options) for calls that compile their own program and
    ``nested`` (without) for calls inside another trace. Calls and every attribute of the jitted function (``lower``,
    ``trace``, ``eval_shape``, ...) are forwarded; attributes come from ``top``.
    """

    def __init__(self, fun: Callable, kwargs: dict[str, Any]):
        functools.update_wrapper(self, fun)
        self._fun = fun
        self._kwargs = kwargs
        self._top = self._nested = None

    @property
    def top(self) -> Any:
        if self._top is None:
            kwargs = dict(self._kwargs)
            options = {**default_compiler_options(), **(kwargs.pop("compiler_options", None) or {})}
            self._top = jax.jit(self._fun, compiler_options=options or None, **kwargs)
        return self._top

    @property
    def nested(self) -> Any:
        if self._nested is None:
            kwargs = {k: v for k, v in self._kwargs.items() if k != "compiler_options"}
            self._nested = jax.jit(self._fun, **kwargs)
        return self._nested

    def __call__(self, *args, **kwargs):
        jitted = self.top if _at_top_level((args, kwargs)) else self.nested
        return jitted(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_fun", "_kwargs", "_top", "_nested"):
            raise AttributeError(name)
        return getattr(self.top, name)


def jit(fun: Callable | None = None, /, **kwargs: Any) -> Any:
    """``jax.jit(fun, **kwargs)`` with :func:`default_compiler_options`; usable as ``@jit`` or
    ``functools.partial(jit, static_argnames=...)``. ``compiler_options`` given here override the defaults."""
    if fun is None:
        return functools.partial(jit, **kwargs)
    return _LazyJit(fun, kwargs)
