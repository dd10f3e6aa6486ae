"""One meta-train step on a device mesh, run the same way by one process with 8 devices and by N processes.

``tests/test_multiprocess.py`` computes ``run_meta_step`` in the test process (8 simulated CPU devices, one
process) and starts this file as a script in two processes on 127.0.0.1 (4 simulated devices each, gloo CPU
collectives), which join one 8-device mesh through ``metalora.sharding.initialize_distributed``. Each process
builds the same initial state (deterministic init), feeds only its own rows of the global batch through
``global_batch``, and runs the jitted ``make_train_step`` with shardings from ``state_shardings``. Process 0
gathers the results and writes them as ``.npz`` (atomically: tmp file + rename).

Problems (``PROBLEMS``): ``mlp`` — a two-layer MLP with Meta-LoRA on both layers and a regression loss (cheap:
what the default test suite runs); ``unet`` — a tiny LoRA UNet with ``diffusion_example_loss`` (the real task).

The script reads its settings from the command line only; it must be started with ``XLA_FLAGS`` already set in
its environment (jax reads it at import).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import PartitionSpec

from metalora.diffusion import NoiseSchedule
from metalora.lora import LoRAConfig, inject, split_roles
from metalora.meta import InnerLoopConfig, MetaConfig, diffusion_example_loss, init_meta_params, make_meta_loss
from metalora.models.unet import UNet2DConditionModel, UNetConfig
from metalora.sharding import (
    DistributedConfig,
    batch_sharding,
    global_batch,
    initialize_distributed,
    make_mesh,
    replicated,
    state_shardings,
)
from metalora.train import create_train_state, make_train_step

PROBLEMS = ("mlp", "unet")
ALGORITHMS = ("joint", "fomaml")
IDENTITIES = 8  # global batch: one identity per device of the 8-device mesh
LEARNING_RATE = 0.5  # plain SGD, so the change of D is exactly -LEARNING_RATE × the meta-gradient

SHOT_SHAPES = {"mlp": {"images": (6,), "context": (6,)}, "unet": {"images": (8, 8, 3), "context": (5, 16)}}
TINY_UNET = UNetConfig(block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=16, attention_head_dim=2,
                       norm_num_groups=8, in_channels=3, out_channels=3,
                       down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


class TinyMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.proj = nnx.Linear(6, 16, rngs=rngs)
        self.out = nnx.Linear(16, 6, rngs=rngs)

    def __call__(self, x):
        return self.out(jnp.tanh(self.proj(x)))


def regression_loss(model, batch, key):
    """Inputs in ``images``, targets in ``context``; the key perturbs the inputs so the step's key matters."""
    x = batch["images"] + 0.05 * jax.random.normal(key, batch["images"].shape, batch["images"].dtype)
    return jnp.mean((model(x) - batch["context"]) ** 2)


def _model_and_task(problem: str):
    """(LoRA-injected model, example loss); shots have the shapes ``SHOT_SHAPES[problem]``."""
    if problem == "mlp":
        model = TinyMLP(nnx.Rngs(0))
        inject(model, LoRAConfig(targets=["proj", "out"], rank=2, mid_rank=3, down_role="meta"),
               key=jax.random.key(1))
        return model, regression_loss
    if problem == "unet":
        model = UNet2DConditionModel(TINY_UNET, rngs=nnx.Rngs(0))
        inject(model, LoRAConfig(targets="attn", rank=4, mid_rank=4, down_role="meta"), key=jax.random.key(1))
        return model, diffusion_example_loss(NoiseSchedule.create())
    raise ValueError(f"unknown problem {problem!r}; choose one of {PROBLEMS}")


def global_batch_numpy(problem: str, shots: int = 2) -> dict:
    """The whole meta-batch on the host (every process can build it; each feeds only its own rows)."""
    shapes = SHOT_SHAPES[problem]
    rng = np.random.default_rng(42)

    def shots_of(count):
        return {name: rng.standard_normal((IDENTITIES, count, *shape)).astype(np.float32)
                for name, shape in shapes.items()}

    return {"identity": np.arange(IDENTITIES, dtype=np.int32) * 3 + 1,  # joint: rows (3i+1) % 8, a permutation
            "support": shots_of(shots), "query": shots_of(shots)}


def local_rows(mesh: jax.sharding.Mesh, rows: int) -> slice:
    """The contiguous range of batch rows held by this process's devices under ``batch_sharding``.

    ``global_batch`` expects each process to pass exactly these rows; asserting contiguity catches a mesh whose
    device order interleaves processes (then no single slice is this process's share).
    """
    index_map = batch_sharding(mesh).addressable_devices_indices_map((rows,))
    starts = sorted({idx[0].indices(rows)[0] for idx in index_map.values()})
    stops = sorted({idx[0].indices(rows)[1] for idx in index_map.values()})
    if any(b != a for a, b in zip(stops[:-1], starts[1:])):
        raise RuntimeError(f"process {jax.process_index()} holds non-contiguous batch rows {list(zip(starts, stops))}")
    return slice(starts[0], stops[-1])


def _global_tree(local: dict, mesh) -> dict:
    """``global_batch`` on a nested meta-batch (it takes one flat mapping of arrays at a time)."""
    return {name: global_batch(value, mesh) if isinstance(value, dict) else global_batch({name: value}, mesh)[name]
            for name, value in local.items()}


def _place(tree, shardings):
    """Global arrays from a host value every process holds in full: each process fills only its own shards.

    (``jax.device_put`` onto a multi-process sharding would first all-gather every leaf to check that the
    processes agree; here agreement holds by construction — deterministic init from fixed keys.)
    """
    def one(value, sharding):
        value = np.asarray(value)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])
    return jax.tree.map(one, tree, shardings)


def _gather(tree, mesh):
    """Host copies of (possibly non-fully-addressable) global arrays, on every process.

    One jitted identity with replicated outputs gathers the whole tree in a single program (a per-leaf
    ``process_allgather`` would compile and rendezvous once per leaf); replicated arrays are then read locally.
    """
    tree = jax.jit(lambda t: t, out_shardings=replicated(mesh))(tree)
    return jax.tree.map(np.asarray, tree)


def run_meta_step(problem: str, algorithm: str, mesh: jax.sharding.Mesh) -> dict[str, np.ndarray]:
    """One sharded meta-train step; returns loss, grad norm, the change of ``D`` (and, for joint, of the heads).

    ``D`` changes by ``-LEARNING_RATE × meta-gradient`` (SGD), so comparing the changes compares gradients.
    """
    model, example_loss = _model_and_task(problem)
    graphdef, base, meta, subject = split_roles(model)
    config = MetaConfig(algorithm=algorithm, num_heads=IDENTITIES,
                        inner=InnerLoopConfig(steps=2, learning_rate=1e-2, flip=False))
    params = init_meta_params(graphdef, base, meta, subject, config, jax.random.key(2))
    if algorithm == "joint":  # non-zero Up factors, so every factor of the table receives a gradient
        params["heads"] = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(3), a.shape),
                                       params["heads"])
    optimizer = optax.sgd(LEARNING_RATE)
    state = create_train_state(params, optimizer, frozen={"base": base})
    before = jax.tree.map(np.asarray, params)

    state_sh = state.replace(
        step=replicated(mesh), params=state_shardings(params, mesh),
        opt_state=jax.tree.map(lambda _: replicated(mesh), state.opt_state),
        frozen={"base": state_shardings(base, mesh)})
    batch_np = global_batch_numpy(problem)
    batch_sh = jax.tree.map(lambda a: batch_sharding(mesh, a.ndim), batch_np)
    step_fn = make_train_step(make_meta_loss(example_loss, graphdef, subject, config), optimizer,
                              in_shardings=(state_sh, batch_sh, replicated(mesh)),
                              out_shardings=(state_sh, replicated(mesh)))

    state = _place(state, state_sh)
    rows = local_rows(mesh, IDENTITIES)
    batch = _global_tree(jax.tree.map(lambda a: a[rows], batch_np), mesh)
    key = _place(jax.random.key_data(jax.random.key(7)), replicated(mesh))  # raw uint32 key: a plain array
    # Compile before the first collective and meet at a coordination-service barrier: the two processes share two
    # cores, their compile times differ by more than gloo's fixed 30 s context-initialisation wait, and the first one
    # to reach the step's collectives would otherwise time out waiting for the other.
    step_fn.lower(state, batch, key).compile()
    _barrier(f"compiled {problem} {algorithm}")
    new_state, metrics = step_fn(state, batch, key)

    head_spec = [leaf.sharding.spec for leaf in jax.tree.leaves(new_state.params.get("heads", {}))]
    after, metrics = _gather((new_state.params, metrics), mesh)
    out = {"loss": metrics["loss"], "grad_norm": metrics["grad_norm"], "finite": metrics["finite"],
           "num_devices": np.asarray(mesh.devices.size),
           "head_specs_on_subject": np.asarray(all(s == PartitionSpec("subject") for s in head_spec))}
    for role in after:
        flat_after = jax.tree.leaves(after[role])
        flat_before = jax.tree.leaves(before[role])
        for i, (a, b) in enumerate(zip(flat_after, flat_before, strict=True)):
            out[f"delta_{role}_{i}"] = a - b
    return out


def _barrier(name: str, timeout_s: int = 900) -> None:
    """Waits until every process reached ``name`` (the distributed client's barrier, not a device collective); a
    no-op in a single-process run (the test's in-process reference)."""
    from jax._src import distributed  # the coordination-service client has no public accessor

    client = distributed.global_state.client
    if client is not None:
        client.wait_at_barrier(name, timeout_in_ms=timeout_s * 1000)


def _save_npz(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coordinator", required=True, help="host:port of process 0")
    parser.add_argument("--num-processes", type=int, required=True)
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--problem", choices=PROBLEMS, required=True)
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS))
    parser.add_argument("--out", type=pathlib.Path, required=True, help="folder; process 0 writes <algorithm>.npz")
    parser.add_argument("--cache-dir", default=None, help="JAX persistent compilation cache (as the test suite's)")
    args = parser.parse_args(argv)
    if args.cache_dir:
        jax.config.update("jax_compilation_cache_dir", args.cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

    initialize_distributed(DistributedConfig(coordinator_address=args.coordinator,
                                             num_processes=args.num_processes, process_id=args.process_id))
    mesh = make_mesh(subject=jax.device_count())
    print(f"process {jax.process_index()}/{jax.process_count()}: {jax.local_device_count()} local of "
          f"{jax.device_count()} devices", file=sys.stderr, flush=True)
    for algorithm in args.algorithms.split(","):
        start = time.perf_counter()
        result = run_meta_step(args.problem, algorithm, mesh)
        if jax.process_index() == 0:
            _save_npz(args.out / f"{algorithm}.npz", result)
        print(f"process {jax.process_index()}: {algorithm} step done in {time.perf_counter() - start:.1f} s",
              file=sys.stderr, flush=True)
    jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
