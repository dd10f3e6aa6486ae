"""Merging a subject's adapter into the base weights (fast sampling) and parameter accounting."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from metalora.lora.adapters import iter_adapters
from metalora.lora.inject import remove
from metalora.lora.roles import merge_roles, split_roles
from metalora.lora.subjects import num_subjects


def merge_subject(model: nnx.Module, subject: int) -> None:
    """``W0 ← W0 + s·D·M_i·U_i`` for subject ``subject`` in every adapter, in place.

    Merged adapters skip their low-rank path, so the model computes the same function with no adapter cost.
    ``unmerge`` restores ``W0`` (up to float rounding of the add/subtract).
    """
    adapters = list(iter_adapters(model))
    if not adapters:
        raise ValueError(f"{type(model).__name__} carries no LoRA adapters to merge")
    for path, adapter in adapters:
        if adapter.merged_subject is not None:
            raise ValueError(f"adapter at {path} already has subject {adapter.merged_subject} merged; unmerge first")
    for _, adapter in adapters:
        kernel = adapter.base.kernel
        kernel[...] = kernel[...] + adapter.delta_kernel(subject).astype(kernel.dtype)
        adapter.merged_subject = subject


def merged_params(graphdef: nnx.GraphDef, base: nnx.State, meta: nnx.State, heads: nnx.State,
                  subject: int | None = None) -> nnx.State:
    """Parameters of the *plain* model (adapters removed) with one subject's ``ΔW`` merged into the kernels.

    Pure (it never writes into ``base``), so it can run under ``jit``/``vmap``: e.g. to sample an adapted subject at
    the base model's speed. ``subject`` indexes a subject axis of ``heads``; ``None`` means ``heads`` has none.
    """
    model = merge_roles(graphdef, jax.tree.map(jnp.array, base), meta, heads)  # a copy: merging writes in place
    merge_subject(model, subject)
    remove(model)
    return nnx.state(model, nnx.Param)


def unmerge(model: nnx.Module) -> None:
    """Inverse of ``merge_subject``."""
    for _, adapter in iter_adapters(model):
        if adapter.merged_subject is None:
            continue
        kernel = adapter.base.kernel
        kernel[...] = kernel[...] - adapter.delta_kernel(adapter.merged_subject).astype(kernel.dtype)
        adapter.merged_subject = None


@dataclasses.dataclass(frozen=True)
class ParameterCount:
    """Parameter counts by role (scalars, not bytes).

    ``per_subject`` is what one subject's adaptation trains (``subject_total / num_subjects``), ``meta`` the
    meta-shared Meta-Down parameters, ``base`` the frozen model.
    """

    base: int
    meta: int
    per_subject: int
    num_subjects: int

    @property
    def subject_total(self) -> int:
        return self.per_subject * self.num_subjects


def count_parameters(model: nnx.Module) -> ParameterCount:
    """Counts by role. Works on abstract models too (``nnx.eval_shape``), so SD-scale tables cost nothing."""
    _, base, meta, subject = split_roles(model)

    def total(state, per_leaf=lambda shape: math.prod(shape)):
        return sum(per_leaf(tuple(leaf.shape)) for leaf in jax.tree.leaves(state))
    base_params = total(nnx.filter_state(base, nnx.Param)) if jax.tree.leaves(base) else 0
    if not jax.tree.leaves(subject):
        return ParameterCount(base_params, total(meta), 0, 0)
    return ParameterCount(base=base_params, meta=total(meta),
                          per_subject=total(subject, lambda shape: math.prod(shape[1:])),
                          num_subjects=num_subjects(subject))
