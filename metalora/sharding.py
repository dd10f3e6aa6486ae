"""Device meshes, partition rules by parameter role, global batches and multi-host start-up.

The mesh has two named axes:

* ``subject`` — identities (and their examples) are split along it: per-subject LoRA heads (``SubjectParam``,
  leading subject axis) and the batch's subject axis live on it, so each device adapts its own subjects.
* ``fsdp`` — optional parameter sharding of the large frozen base weights (SD-scale memory); 1 by default.

Roles map to placements (``ShardingRules``): subject heads split along ``subject``; the Meta-Down ``D``
replicated (its gradient is a sum over subjects, which XLA reduces across the ``subject`` axis); base weights
replicated, or sharded over ``fsdp`` along their largest divisible dimension when ``shard_base``.

Steps are ``jax.jit`` with these shardings as ``in_shardings``/``out_shardings`` (what ``pjit`` became); XLA's
SPMD partitioner inserts the collectives. Multi-host: ``initialize_distributed`` before anything touches
devices, then build the same mesh over ``jax.devices()`` (all processes' devices) and feed each process's share
of the batch with ``global_batch``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from metalora.lora.roles import MetaDownParam, SubjectParam

SUBJECT_AXIS = "subject"
FSDP_AXIS = "fsdp"


def make_mesh(subject: int | None = None, fsdp: int = 1, *, devices=None) -> Mesh:
    """A ``(subject, fsdp)`` mesh over ``devices`` (default: every device of every process).

    ``subject=None`` uses all devices not taken by ``fsdp``. Axes are ``AxisType.Auto``: shardings are stated at
    the jit boundary and XLA propagates them (jax 0.10's ``make_mesh`` default, Explicit, would instead require
    sharding annotations on every contraction).
    """
    devices = list(jax.devices() if devices is None else devices)
    if subject is None:
        if len(devices) % fsdp:
            raise ValueError(f"fsdp={fsdp} does not divide the {len(devices)} devices")
        subject = len(devices) // fsdp
    if subject * fsdp != len(devices):
        raise ValueError(f"mesh subject={subject} × fsdp={fsdp} needs {subject * fsdp} devices, have {len(devices)}")
    return jax.make_mesh((subject, fsdp), (SUBJECT_AXIS, FSDP_AXIS), axis_types=(AxisType.Auto, AxisType.Auto),
                         devices=devices)


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """How each parameter role is placed on the mesh."""

    shard_base: bool = False  # FSDP-shard frozen base weights over the fsdp axis
    min_shard_size: int = 2**16  # smaller base tensors stay replicated: sharding them costs more than it saves


def partition_spec(variable: nnx.Variable, mesh: Mesh, rules: ShardingRules = ShardingRules()) -> PartitionSpec:
    """The placement of one variable, decided by its role type and shape."""
    shape = tuple(np.shape(variable.get_value()))
    if isinstance(variable, SubjectParam):
        if shape and shape[0] % mesh.shape[SUBJECT_AXIS] == 0:
            return PartitionSpec(SUBJECT_AXIS)
        return PartitionSpec()  # too few subjects to split: every device holds all heads
    if isinstance(variable, MetaDownParam) or not isinstance(variable, nnx.Param):
        return PartitionSpec()
    fsdp = mesh.shape[FSDP_AXIS]
    if rules.shard_base and fsdp > 1 and int(np.prod(shape)) >= rules.min_shard_size:
        for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
            if shape[dim] % fsdp == 0:
                return PartitionSpec(*([None] * dim), FSDP_AXIS)
    return PartitionSpec()


def state_shardings(state: nnx.State, mesh: Mesh, rules: ShardingRules = ShardingRules()) -> nnx.State:
    """A pytree of ``NamedSharding`` with the structure of ``state`` (for ``jax.jit`` in/out shardings)."""
    return jax.tree.map(lambda v: v.replace(NamedSharding(mesh, partition_spec(v, mesh, rules))), state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_state(state: nnx.State, mesh: Mesh, rules: ShardingRules = ShardingRules()) -> nnx.State:
    """Places ``state`` on the mesh according to the rules."""
    return jax.device_put(state, state_shardings(state, mesh, rules))


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Leading (subject or example) axis split over ``subject``, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(SUBJECT_AXIS, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def global_batch(local: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each process's share of a batch (leading axis = this process's rows) into global arrays.

    Single-process it is a sharded ``device_put``; multi-host, process ``p`` passes rows ``p·n .. (p+1)·n`` of the
    global batch and ``jax.make_array_from_process_local_data`` stitches them without any host seeing it all.
    """
    out = {}
    for name, value in local.items():
        value = np.asarray(value)
        out[name] = jax.make_array_from_process_local_data(batch_sharding(mesh, value.ndim), value)
    return out


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Multi-host settings; unset fields fall back to ``METALORA_*`` environment variables."""

    coordinator_address: str | None = None  # "host:port" of process 0
    num_processes: int | None = None
    process_id: int | None = None
    cpu_collectives: str = "gloo"  # CPU-only multi-process runs need gloo (or mpi) collectives

    @classmethod
    def from_env(cls, **overrides: Any) -> DistributedConfig:
        env = os.environ
        values = {
            "coordinator_address": env.get("METALORA_COORDINATOR"),
            "num_processes": int(env["METALORA_NUM_PROCESSES"]) if "METALORA_NUM_PROCESSES" in env else None,
            "process_id": int(env["METALORA_PROCESS_ID"]) if "METALORA_PROCESS_ID" in env else None,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def initialize_distributed(config: DistributedConfig | None = None) -> bool:
    """Starts ``jax.distributed`` when a coordinator is configured; returns whether this is a multi-process run.

    Must run before the first use of ``jax.devices()``. A single-process run (no coordinator) is a no-op, so
    every entry point can call it unconditionally.
    """
    config = config or DistributedConfig.from_env()
    if config.coordinator_address is None:
        return False
    if config.num_processes is None or config.process_id is None:
        raise ValueError("multi-host run: set num_processes and process_id (or METALORA_NUM_PROCESSES / "
                         "METALORA_PROCESS_ID) along with the coordinator address")
    if config.cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", config.cpu_collectives)
    jax.distributed.initialize(coordinator_address=config.coordinator_address, num_processes=config.num_processes,
                               process_id=config.process_id)
    return True
