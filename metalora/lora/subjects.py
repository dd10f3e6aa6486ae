"""Subjects are an axis: running many subjects' heads in one compiled call, and fresh heads.

Subject factors (``SubjectParam``) carry a leading subject axis ``S``. An adapter computes with one subject's
factors, so a model with ``S`` heads runs through ``jax.vmap`` over the subject state while base and meta
state are broadcast (``in_axes=None``). Under that vmap only the adapter matmuls see a batched operand; base
matmuls and convolutions are ``x @ W`` with an unbatched ``W``, which JAX batches by folding the subject axis
into the example axis — one matmul/conv for all subjects, never a per-subject copy of ``W``.

Two layouts:
* ``apply_subjects``: batch laid out ``(S, b, ...)``, subject ``s`` uses head ``s``.
* ``apply_indexed``: batch ``(B, ...)`` with a subject index per example; heads are gathered by index
  (``(B, ...)`` copies of the small factors) and the same vmap runs over examples.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from metalora.lora.adapters import iter_adapters
from metalora.lora.roles import SubjectParam, merge_roles, split_roles


def num_subjects(subject: nnx.State) -> int:
    """The size of the leading subject axis of a subject state."""
    sizes = {leaf.shape[0] for leaf in jax.tree.leaves(subject)}
    if len(sizes) != 1:
        raise ValueError(f"subject state leaves disagree on the subject axis: sizes {sorted(sizes)}")
    return sizes.pop()


def take_heads(subject: nnx.State, index: int | jax.Array) -> nnx.State:
    """Subject state indexed along the subject axis (an int drops the axis; an index array gathers)."""
    return jax.tree.map(lambda a: jnp.take(a, index, axis=0), subject)


def take_subject(model: nnx.Module, subject: int) -> nnx.Module:
    """A model whose heads are subject ``subject``'s (no subject axis), for direct calls (sampling, debugging).

    It shares the base and meta *variables* with ``model`` (no copies): in-place changes to them, such as
    ``merge_subject``, show in both. Its subject factors are new variables; ``model`` is unchanged.
    """
    graphdef, base, meta, heads = split_roles(model)
    return merge_roles(graphdef, base, meta, take_heads(heads, subject))


def apply_subjects(fn: Callable[..., Any], graphdef: nnx.GraphDef, base: nnx.State, meta: nnx.State,
                   subject: nnx.State, *args: Any) -> Any:
    """``fn(model_s, *args_s)`` for every subject ``s``, vmapped; args and outputs have a leading ``S`` axis.

    Pure: differentiate w.r.t. ``subject`` (inner loop) or ``meta`` (outer loop) by wrapping this call.
    """
    def one(heads, *xs):
        return fn(merge_roles(graphdef, base, meta, heads), *xs)
    # NumPy inputs become JAX arrays first: vmap would carry them as raw ndarrays into custom-VJP rules (the UNet's
    # convolutions), which JAX refuses as non-canonical constants.
    return jax.vmap(one)(subject, *jax.tree.map(jnp.asarray, args))


def apply_indexed(fn: Callable[..., Any], graphdef: nnx.GraphDef, base: nnx.State, meta: nnx.State,
                  subject: nnx.State, subject_ids: jax.Array, *args: Any) -> Any:
    """Runs a batch that mixes subjects: example ``i`` of ``args`` (leading axis ``B``) uses head ``subject_ids[i]``.

    ``fn(model, *args)`` must take and return arrays with a leading batch axis (as a model forward does); it
    is applied per example with batch size 1 and the outputs are concatenated back to ``(B, ...)``.
    """
    heads = take_heads(subject, subject_ids)
    one_each = jax.tree.map(lambda a: a[:, None], args)
    out = apply_subjects(fn, graphdef, base, meta, heads, *one_each)
    return jax.tree.map(lambda o: o.reshape((o.shape[0] * o.shape[1], *o.shape[2:])), out)


def init_subject_state(model: nnx.Module, key: jax.Array, num_subjects: int) -> nnx.State:
    """Fresh subject state for ``num_subjects`` heads, initialised like injection (``U = 0``: no-op heads).

    Pure in ``key`` (the model only supplies structure and adapter configs), so it can run inside ``jit``,
    e.g. after ``merge_roles`` of traced states. Adapter ``i`` draws from ``fold_in(key, i)``.
    """
    fresh = {}
    for i, (path, adapter) in enumerate(iter_adapters(model)):
        factors = adapter.fresh_subject_factors(jax.random.fold_in(key, i), num_subjects,
                                                dtype=adapter.base.param_dtype)
        fresh.update({(*path, name): value for name, value in factors.items()})
    template = nnx.to_flat_state(nnx.state(model, SubjectParam))
    missing = sorted(set(fresh) ^ {path for path, _ in template})
    assert not missing, f"subject factors without an initialiser (or vice versa): {missing}"
    return nnx.from_flat_state([(path, variable.copy(fresh[path])) for path, variable in template])


def reinit_subjects(model: nnx.Module, subject: nnx.State, key: jax.Array, reset: jax.Array) -> nnx.State:
    """Head pool reassignment: heads where ``reset`` (bool, shape ``(S,)``) is true are re-initialised."""
    fresh = init_subject_state(model, key, num_subjects(subject))

    def pick(new, old):
        mask = reset.reshape((-1,) + (1,) * (old.ndim - 1))
        return jnp.where(mask, new, old)
    return jax.tree.map(pick, fresh, subject)
