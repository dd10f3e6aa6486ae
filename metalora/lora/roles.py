"""Parameter roles as types.

A layered adapter computes ``h = W0·x + s·U(M(D·x))``. The three kinds of parameters are trained by different
loops, so they are different *types* of ``nnx.Param``:

* ``nnx.Param`` — the frozen base model ``W0`` (role ``"base"``).
* ``MetaDownParam`` — the Meta-Down ``D`` shared by every subject and learned by the meta-loop (role ``"meta"``).
* ``SubjectParam`` — per-subject factors with a leading subject axis: Mid ``M`` and Up ``U`` for Meta-LoRA; for
  plain LoRA also the down factor ``A`` (role ``"subject"``).

Training code selects a role with a filter from ``role_filter`` (or the types directly) and never matches names.
``nnx.split(model, MetaDownParam, SubjectParam, ...)`` gives the meta, subject and base states; the subclasses
come before the catch-all because nnx assigns each variable to the first filter that accepts it.
"""

from __future__ import annotations

from typing import Literal

from flax import nnx


class MetaDownParam(nnx.Param):
    """The Meta-Down factor ``D``: shared across subjects, frozen while a subject adapts."""


class SubjectParam(nnx.Param):
    """A subject factor (Mid ``M``, Up ``U``, or a plain LoRA's down ``A``); carries a leading subject axis."""


Role = Literal["base", "meta", "subject"]
ROLES: tuple[Role, ...] = ("base", "meta", "subject")

# Base = every nnx.Param that is not an adapter factor. Non-Param state (e.g. rng counters of a Dropout built
# with rngs) is not a trainable role; ``split_roles`` puts it with the base state so nothing is dropped.
BASE = nnx.All(nnx.Param, nnx.Not(nnx.Any(MetaDownParam, SubjectParam)))
META = MetaDownParam
SUBJECT = SubjectParam


def role_filter(*roles: Role) -> nnx.filterlib.Filter:
    """An nnx filter accepting the parameters of the given roles, e.g. ``role_filter("subject")``.

    Use it for optimisers (``nnx.Optimizer(model, tx, wrt=role_filter("subject"))``), ``nnx.state`` and
    ``nnx.grad(..., argnums=nnx.DiffState(0, role_filter(...)))``-style selections.
    """
    if not roles:
        raise ValueError(f"role_filter needs at least one role out of {ROLES}")
    unknown = [r for r in roles if r not in ROLES]
    if unknown:
        raise ValueError(f"unknown parameter role(s) {unknown}; roles are {ROLES}")
    table = {"base": BASE, "meta": META, "subject": SUBJECT}
    filters = tuple(table[r] for r in roles)
    return filters[0] if len(filters) == 1 else nnx.Any(*filters)


def split_roles(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State, nnx.State]:
    """``(graphdef, base, meta, subject)``: the model's state separated by role (base holds any non-Param state)."""
    graphdef, meta, subject, base = nnx.split(model, MetaDownParam, SubjectParam, ...)
    return graphdef, base, meta, subject


def merge_roles(graphdef: nnx.GraphDef, base: nnx.State, meta: nnx.State, subject: nnx.State) -> nnx.Module:
    """Inverse of ``split_roles``."""
    return nnx.merge(graphdef, base, meta, subject)
