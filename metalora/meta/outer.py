"""Outer loops: meta-training the shared Meta-Down ``D`` across identities. One code path, four algorithms.

Every algorithm is a ``loss_fn(params, frozen, batch, key) -> (loss, aux)`` for ``metalora.train.make_train_step``,
so checkpoints, exact resume, the NaN guard, logging and sharding come from the one train loop. The gradient of
``loss`` w.r.t. ``params["meta"]`` is the algorithm's meta-gradient:

* ``joint`` (the Meta-LoRA paper's reading) — every meta-train identity owns a Mid/Up head in a table
  ``params["heads"]``; ``D`` and the heads are trained together on batches that mix identities; the heads are
  discarded afterwards. Identities share row ``identity % num_heads``, so the table can be smaller than the
  number of identities (memory at SD scale, see ``head_table_bytes``).
* ``reptile`` — fresh heads per episode, ``inner.steps`` steps adapting heads *and* ``D`` (``train_meta``), then
  ``D`` moves towards the mean adapted ``D``: the pseudo-loss ``½‖D − sg(mean D')‖²`` has exactly that gradient,
  so the outer optimiser's learning rate is Reptile's step size (use SGD for the textbook update).
* ``fomaml`` / ``maml`` — fresh heads adapted on the support shots (``D`` frozen inside), loss on the query shots
  with the adapted heads. ``maml`` differentiates through the scanned inner loop (second order); ``fomaml`` treats
  the adapted heads as constants.

Batches: ``{"identity": (B,) int, "support": shots (B, k, ...), "query": shots (B, q, ...)}`` with shots as in
``metalora.meta.inner`` (``images``, ``context``, optional ``context_flipped``). ``frozen = {"base": base state}``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from metalora.lora.roles import merge_roles
from metalora.lora.subjects import init_subject_state, take_heads
from metalora.meta.inner import ExampleLoss, InnerLoopConfig, adapt

ALGORITHMS = ("joint", "reptile", "fomaml", "maml")


@dataclasses.dataclass(frozen=True)
class MetaConfig:
    """Attributes:
      algorithm: one of ``ALGORITHMS``.
      inner: the inner loop of reptile / (fo)maml (the same function adapts subjects at test time).
      num_heads: joint only — rows of the head table; identity ``i`` trains row ``i % num_heads``.
    """

    algorithm: str = "joint"
    inner: InnerLoopConfig = dataclasses.field(default_factory=lambda: InnerLoopConfig(steps=5))
    num_heads: int = 1000

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"unknown meta algorithm {self.algorithm!r}; choose one of {ALGORITHMS}")
        if self.algorithm == "joint" and self.num_heads < 1:
            raise ValueError("joint meta-training needs num_heads >= 1")


def init_meta_params(graphdef: nnx.GraphDef, base: nnx.State, meta: nnx.State, heads_template: nnx.State,
                     config: MetaConfig, key: jax.Array) -> dict[str, nnx.State]:
    """The trainable parameters of meta-training: ``D`` and, for ``joint``, the head table."""
    if config.algorithm != "joint":
        return {"meta": meta}
    model = merge_roles(graphdef, base, meta, heads_template)
    return {"meta": meta, "heads": init_subject_state(model, key, config.num_heads)}


def make_meta_loss(example_loss: ExampleLoss, graphdef: nnx.GraphDef, heads_template: nnx.State,
                   config: MetaConfig) -> Callable[..., tuple[jax.Array, dict[str, jax.Array]]]:
    """The meta-training objective of ``config.algorithm`` as ``loss_fn(params, frozen, batch, key)``.

    ``heads_template`` is any subject state of the model (it supplies structure for fresh heads).
    """
    algorithm, inner = config.algorithm, config.inner
    if algorithm == "reptile":
        inner = dataclasses.replace(inner, train_meta=True)

    def fresh_heads(base, meta, key, count):
        return init_subject_state(merge_roles(graphdef, base, meta, heads_template), key, count)

    def joint(params, frozen, batch, key):
        base, meta = frozen["base"], params["meta"]
        ids = batch["identity"]
        heads = take_heads(params["heads"], ids % config.num_heads)
        keys = jax.random.split(key, ids.shape[0])

        def one(h, shots, k):
            return example_loss(merge_roles(graphdef, base, meta, h), shots, k)

        losses = jax.vmap(one)(heads, batch["support"], keys)
        return jnp.mean(losses), {"support_loss": jnp.mean(losses)}

    def reptile(params, frozen, batch, key):
        base, meta = frozen["base"], params["meta"]
        count = batch["identity"].shape[0]
        k_init, k_adapt = jax.random.split(key)
        heads = fresh_heads(base, meta, k_init, count)
        adapted = jax.vmap(lambda h, s, k: adapt(example_loss, graphdef, base, meta, h, s, k, inner))(
            heads, batch["support"], jax.random.split(k_adapt, count))
        target = jax.tree.map(lambda d: jnp.mean(d, axis=0), jax.lax.stop_gradient(adapted.meta))
        pseudo = sum(0.5 * jnp.sum(jnp.square(d.astype(jnp.float32) - t.astype(jnp.float32)))
                     for d, t in zip(jax.tree.leaves(meta), jax.tree.leaves(target), strict=True))
        return pseudo, _inner_metrics(adapted.losses)

    def maml(params, frozen, batch, key):
        base, meta = frozen["base"], params["meta"]
        count = batch["identity"].shape[0]
        k_init, k_rest = jax.random.split(key)
        heads = fresh_heads(base, meta, k_init, count)

        def one(h, support, query, k):
            k_adapt, k_query = jax.random.split(k)
            adapted = adapt(example_loss, graphdef, base, meta, h, support, k_adapt, inner)
            final = adapted.heads if algorithm == "maml" else jax.lax.stop_gradient(adapted.heads)
            return example_loss(merge_roles(graphdef, base, meta, final), query, k_query), adapted.losses

        query_losses, inner_losses = jax.vmap(one)(heads, batch["support"], batch["query"],
                                                   jax.random.split(k_rest, count))
        return jnp.mean(query_losses), {"query_loss": jnp.mean(query_losses), **_inner_metrics(inner_losses)}

    return {"joint": joint, "reptile": reptile, "fomaml": maml, "maml": maml}[algorithm]


def _inner_metrics(losses: jax.Array) -> dict[str, jax.Array]:
    """Inner-loop loss at its first and last step, averaged over the episode's identities."""
    if losses.shape[-1] == 0:
        return {}
    return {"inner_loss_first": jnp.mean(losses[:, 0]), "inner_loss_last": jnp.mean(losses[:, -1])}


def head_table_bytes(heads_template: nnx.State, num_heads: int, *, optimizer_slots: int = 2) -> int:
    """Memory of a joint head table of ``num_heads`` rows, with Adam's two moment slots by default.

    ``heads_template`` is a subject state with a leading subject axis; its per-row size is what one identity
    costs. (SD-1.5, attention targets: see the README's memory arithmetic.)
    """
    per_row = sum(x[0].size * x.dtype.itemsize for x in jax.tree.leaves(heads_template))
    return per_row * num_heads * (1 + optimizer_slots)
