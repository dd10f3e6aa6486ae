"""Full-scale Meta-LoRA steps without a GPU: lower and compile (never run) SD-scale steps on 8 simulated devices.

    python -m benchmarks.compile_sd --out runs/compile_sd.json                  # SD-1.5, mesh subject 8
    python -m benchmarks.compile_sd --mesh 4x2 --shard-base --out runs/compile_sd_fsdp.json
    python -m benchmarks.compile_sd --unet sdxl --out runs/compile_sdxl.json

The UNet of ``configs/sd_unets.py`` is built abstractly (``nnx.eval_shape``: no weights are allocated), Meta-LoRA
adapters are injected (targets ``--targets``, ranks ``--rank`` = r_d and ``--mid-rank`` = r_m), and three
programs are lowered from ``jax.ShapeDtypeStruct`` inputs carrying their shardings from ``metalora.sharding``
and compiled for the CPU backend:

* ``meta/joint``, ``meta/fomaml`` — the meta-train step (``make_train_step`` over ``make_meta_loss``, AdamW on
  ``D`` and, for joint, the head table), one episode of ``--identities`` identities;
* ``adapt`` — ``adapt_subjects`` for ``--identities`` subjects, ``--adapt-steps`` inner steps in one scan.

Documented default batch: 8 identities × 1 support shot (+ 1 query shot for fomaml) of 64×64×4 latents
(SD-1.5 at 512 px), text context 77×768, bf16 compute with f32 parameters, rematerialised UNet blocks. Each
device holds one identity on the ``subject`` axis.

Per-device numbers come from XLA: ``compiled.memory_analysis()`` (argument, output, aliased, temporary and
generated-code bytes of the partitioned per-device program) and ``compiled.cost_analysis()`` (FLOPs and bytes
accessed). Caveats: these are the XLA *CPU* backend's buffers and fusion decisions (a GPU build differs, notably
in attention); XLA's cost analysis counts a ``while`` loop body once, so scanned inner loops report the FLOPs of
one inner step plus the rest — the defaults use one inner step so the FLOPs are those of the whole program.
"""

from __future__ import annotations

import os

# Must precede the first jax import: the simulated devices are fixed when the CPU client starts.
_DEVICES = int(os.environ.get("METALORA_COMPILE_DEVICES", "8"))
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           f" --xla_force_host_platform_device_count={_DEVICES}").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402
from collections.abc import Mapping  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from configs.sd_unets import UNETS  # noqa: E402
from metalora.compiler import jit  # noqa: E402
from metalora.diffusion import NoiseSchedule  # noqa: E402
from metalora.lora import LoRAConfig, init_subject_state, inject, merge_roles, split_roles  # noqa: E402
from metalora.meta import (  # noqa: E402
    InnerLoopConfig,
    MetaConfig,
    adapt_subjects,
    diffusion_example_loss,
    init_meta_params,
    make_meta_loss,
)
from metalora.models.base_model import COMPUTE_DTYPES  # noqa: E402
from metalora.models.unet import UNet2DConditionModel, UNetConfig  # noqa: E402
from metalora.sharding import (  # noqa: E402
    ShardingRules,
    batch_sharding,
    make_mesh,
    replicated,
    state_shardings,
)
from metalora.train import create_train_state, make_optimizer, make_train_step  # noqa: E402
from metalora.train.io import atomic_write_text  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Problem:
    """The abstract model and the shapes of one episode."""

    unet: str
    graphdef: nnx.GraphDef
    base: nnx.State
    meta: nnx.State
    subject: nnx.State  # one-head template (leading subject axis of 1)
    latent: tuple[int, int, int]
    context: tuple[int, int]
    num_adapters: int
    # SDXL's added conditions per example (pooled text embedding, size/crop ids): shots carry them as inputs, as
    # ``metalora.meta.personalize.encode_shots`` makes them from an SDXL base, and the library's loss reads them.
    added: Mapping[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)


def build_problem(args: argparse.Namespace, name: str) -> Problem:
    config = UNetConfig.from_diffusers(UNETS[name])
    compute = COMPUTE_DTYPES[args.dtype]
    lora = LoRAConfig(targets=args.targets, rank=args.rank, mid_rank=args.mid_rank, down_role="meta")
    paths: list[str] = []

    def build():
        model = UNet2DConditionModel(config, rngs=nnx.Rngs(0), dtype=compute, param_dtype=jnp.float32,
                                     attention_backend=args.attention_backend, remat=args.remat)
        paths.extend(inject(model, lora, key=jax.random.key(1)))
        return model

    graphdef, base, meta, subject = split_roles(nnx.eval_shape(build))
    latent_size = args.latent_size or UNETS[name]["sample_size"]
    cross_dim = config.cross_attention_dim if isinstance(config.cross_attention_dim, int) else \
        config.cross_attention_dim[0]
    added = {}
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        added = {"text_embeds": (pooled,), "time_ids": (6,)}
    return Problem(name, graphdef, base, meta, subject, (latent_size, latent_size, config.in_channels),
                   (args.context_len, cross_dim), len(paths), added)


def _abstract(tree: Any, shardings: Any) -> Any:
    """``ShapeDtypeStruct`` leaves that carry their shardings (what ``lower`` needs instead of arrays)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _shots(problem: Problem, identities: int, count: int, mesh) -> dict[str, jax.ShapeDtypeStruct]:
    shapes = {"images": (identities, count, *problem.latent), "context": (identities, count, *problem.context),
              **{name: (identities, count, *shape) for name, shape in problem.added.items()}}
    return {k: jax.ShapeDtypeStruct(s, jnp.float32, sharding=batch_sharding(mesh, len(s))) for k, s in shapes.items()}


def _key(mesh) -> jax.ShapeDtypeStruct:
    key = jax.eval_shape(lambda: jax.random.key(0))
    return jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated(mesh))


def _analyse(lowered: Any, seconds_lower: float) -> dict[str, Any]:
    start = time.perf_counter()
    compiled = lowered.compile()
    seconds_compile = time.perf_counter() - start
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return {
        "argument_bytes": int(mem.argument_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
        "alias_bytes": int(mem.alias_size_in_bytes),
        "temp_bytes": int(mem.temp_size_in_bytes),
        "generated_code_bytes": int(mem.generated_code_size_in_bytes),
        # Live at peak, roughly: arguments + outputs not aliased to (donated) arguments + temporaries.
        "total_bytes": int(mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                           + mem.temp_size_in_bytes),
        "flops": float(cost.get("flops", float("nan"))),
        "bytes_accessed": float(cost.get("bytes accessed", float("nan"))),
        "lower_s": round(seconds_lower, 1),
        "compile_s": round(seconds_compile, 1),
    }


def compile_meta_step(problem: Problem, algorithm: str, args: argparse.Namespace, mesh,
                      rules: ShardingRules) -> dict[str, Any]:
    """Lower and compile ``make_train_step(make_meta_loss(...))`` for one episode."""
    config = MetaConfig(algorithm=algorithm, num_heads=args.num_heads,
                        inner=InnerLoopConfig(steps=args.inner_steps, learning_rate=1e-3, flip=True))
    optimizer = make_optimizer({"learning_rate": 1e-4, "weight_decay": 1e-2})
    g, base, meta, subject = problem.graphdef, problem.base, problem.meta, problem.subject
    params = jax.eval_shape(lambda b, m, s, k: init_meta_params(g, b, m, s, config, k), base, meta, subject,
                            jax.random.key(0))
    state = jax.eval_shape(lambda p: create_train_state(p, optimizer), params).replace(frozen={"base": base})

    params_sh = state_shardings(params, mesh, rules)
    state_sh = state.replace(
        step=replicated(mesh), params=params_sh,
        # Adam's moments are placed like their parameters; counters replicated.
        opt_state=optax.tree_map_params(optimizer, lambda _, s: s, state.opt_state, params_sh,
                                        transform_non_params=lambda _: replicated(mesh)),
        frozen={"base": state_shardings(base, mesh, rules)})
    batch = {"identity": jax.ShapeDtypeStruct((args.identities,), jnp.int32, sharding=batch_sharding(mesh)),
             "support": _shots(problem, args.identities, args.shots, mesh),
             "query": _shots(problem, args.identities, args.query, mesh)}
    batch_sh = jax.tree.map(lambda x: x.sharding, batch)
    loss_fn = make_meta_loss(diffusion_example_loss(NoiseSchedule.create()), g, subject, config)
    step = make_train_step(loss_fn, optimizer, in_shardings=(state_sh, batch_sh, replicated(mesh)),
                           out_shardings=(state_sh, replicated(mesh)))
    start = time.perf_counter()
    lowered = step.lower(_abstract(state, state_sh), batch, _key(mesh))
    return _analyse(lowered, time.perf_counter() - start)


def compile_adapt_step(problem: Problem, args: argparse.Namespace, mesh, rules: ShardingRules) -> dict[str, Any]:
    """Lower and compile ``adapt_subjects`` for ``--identities`` subjects (heads split over the subject axis)."""
    g, base, meta, subject = problem.graphdef, problem.base, problem.meta, problem.subject
    inner = InnerLoopConfig(steps=args.adapt_steps, learning_rate=1e-3, flip=True)
    heads = jax.eval_shape(lambda b, m, s, k: init_subject_state(merge_roles(g, b, m, s), k, args.identities),
                           base, meta, subject, jax.random.key(0))
    heads_sh = state_shardings(heads, mesh, rules)
    base_sh, meta_sh = state_shardings(base, mesh, rules), state_shardings(meta, mesh, rules)
    keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), args.identities))
    keys = jax.ShapeDtypeStruct(keys.shape, keys.dtype, sharding=batch_sharding(mesh))
    shots = _shots(problem, args.identities, args.shots, mesh)
    example_loss = diffusion_example_loss(NoiseSchedule.create())

    def run(base, meta, heads, shots, keys):
        result = adapt_subjects(example_loss, g, base, meta, heads, shots, keys, inner)
        return result.heads, result.losses

    jitted = jit(run, in_shardings=(base_sh, meta_sh, heads_sh, jax.tree.map(lambda x: x.sharding, shots),
                                    keys.sharding),
                 out_shardings=(heads_sh, batch_sharding(mesh, 2)), donate_argnums=(2,))
    start = time.perf_counter()
    lowered = jitted.lower(_abstract(base, base_sh), _abstract(meta, meta_sh), _abstract(heads, heads_sh), shots,
                           keys)
    return _analyse(lowered, time.perf_counter() - start)


def _param_bytes(state: nnx.State) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def markdown_table(rows: list[Mapping[str, Any]]) -> str:
    head = ("| model | mesh | program | args MiB | out MiB | alias MiB | temp MiB | code MiB | total MiB | "
            "GFLOP/device | compile s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['unet']} | {r['mesh']} | {r['program']} | {r['error']} |" + " |" * 7)
            continue
        lines.append(f"| {r['unet']} | {r['mesh']} | {r['program']} | {_mib(r['argument_bytes'])} | "
                     f"{_mib(r['output_bytes'])} | {_mib(r['alias_bytes'])} | {_mib(r['temp_bytes'])} | "
                     f"{_mib(r['generated_code_bytes'])} | {_mib(r['total_bytes'])} | {r['flops'] / 1e9:,.1f} | "
                     f"{r['compile_s']} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--unet", default="sd15", help="comma-separated names from configs/sd_unets.py (sd15, sd21, sdxl)")
    p.add_argument("--programs", default="meta/joint,meta/fomaml,adapt")
    p.add_argument("--mesh", default="8x1", help="SUBJECTxFSDP, e.g. 8x1 or 4x2")
    p.add_argument("--shard-base", action="store_true", help="FSDP-shard the frozen base weights over fsdp")
    p.add_argument("--targets", default="attn")
    p.add_argument("--rank", type=int, default=4, help="r_d (Meta-Down)")
    p.add_argument("--mid-rank", type=int, default=16, help="r_m (Mid/Up)")
    p.add_argument("--identities", type=int, default=8, help="identities per episode (= subjects adapted at once)")
    p.add_argument("--shots", type=int, default=1, help="support shots per identity")
    p.add_argument("--query", type=int, default=1, help="query shots per identity (fomaml)")
    p.add_argument("--inner-steps", type=int, default=1, help="fomaml inner steps (scan)")
    p.add_argument("--adapt-steps", type=int, default=1, help="adaptation steps (scan)")
    p.add_argument("--num-heads", type=int, default=64, help="joint: rows of the head table")
    p.add_argument("--latent-size", type=int, default=0, help="latent side (0 = the config's sample_size)")
    p.add_argument("--context-len", type=int, default=77)
    p.add_argument("--dtype", choices=sorted(COMPUTE_DTYPES), default="bfloat16", help="compute dtype (params are f32)")
    p.add_argument("--no-remat", dest="remat", action="store_false")
    p.add_argument("--attention-backend", default="auto")
    p.add_argument("--out", type=pathlib.Path, default=None, help="JSON results")
    return p.parse_args(argv)


def main(argv=None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    subject_axis, fsdp = (int(x) for x in args.mesh.lower().split("x"))
    mesh = make_mesh(subject=subject_axis, fsdp=fsdp)
    rules = ShardingRules(shard_base=args.shard_base)
    rows = []
    for name in args.unet.split(","):
        if name not in UNETS:
            raise SystemExit(f"--unet: unknown UNet {name!r}; configs/sd_unets.py has {sorted(UNETS)}")
        start = time.perf_counter()
        problem = build_problem(args, name)
        info = {"unet": name, "mesh": args.mesh + (" fsdp-base" if args.shard_base else ""),
                "base_param_bytes": _param_bytes(problem.base), "meta_param_bytes": _param_bytes(problem.meta),
                "head_param_bytes": _param_bytes(problem.subject), "adapters": problem.num_adapters,
                "latent": problem.latent, "context": problem.context, "build_s": round(time.perf_counter() - start, 1)}
        print(f"{name}: base {_mib(info['base_param_bytes'])} MiB f32, D {_mib(info['meta_param_bytes'])} MiB, "
              f"one head {_mib(info['head_param_bytes'])} MiB, {problem.num_adapters} adapters", flush=True)
        for program in args.programs.split(","):
            print(f"  lowering and compiling {program} ...", flush=True)
            start = time.perf_counter()
            try:
                if program.startswith("meta/"):
                    result = compile_meta_step(problem, program.split("/", 1)[1], args, mesh, rules)
                elif program == "adapt":
                    result = compile_adapt_step(problem, args, mesh, rules)
                else:
                    raise SystemExit(f"--programs: unknown program {program!r} (meta/<algorithm> or adapt)")
            except (MemoryError, RuntimeError) as e:  # e.g. XLA out of host memory: record and go on
                result = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
            result.update(info, program=program, wall_s=round(time.perf_counter() - start, 1),
                          peak_rss_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2))
            rows.append(result)
            print(f"    done in {result['wall_s']} s (process peak RSS {result['peak_rss_gib']} GiB)", flush=True)
            if args.out:
                _write(args, rows)
    table = markdown_table(rows)
    print(table)
    return rows


def _write(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    """The JSON so far (rewritten after every program: a full run takes a long time on a shared CPU)."""
    payload = {"settings": vars(args) | {"out": str(args.out)}, "devices": jax.device_count(),
               "jax": jax.__version__, "machine": platform.processor() or platform.machine(),
               "load_average": os.getloadavg(), "results": rows, "table": markdown_table(rows)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(payload, indent=2, default=str))


if __name__ == "__main__":
    main()
