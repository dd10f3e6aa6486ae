"""Subjects per second of batched adaptation: S subjects adapted in one compiled call (``adapt_subjects``).

    python -m benchmarks.subjects --out runs/subjects.json [--subjects 1,4,16] [--steps 20] [--repeats 3]

The model is the procedural world's base UNet (``configs/base_tiny.py``'s model section, or ``--base-config`` e.g.
``configs/base_tiny.py:smoke``; ``--channels`` overrides its ``block_out_channels``) with Meta-LoRA on the
attention projections (r_d = ``--rank``, r_m = ``--mid-rank``). Weights are random: the cost of a step does not
depend on their values. Each subject has k = ``--shots`` shots and runs ``--steps`` inner steps
(Adam, batch 1, flips), all in one ``lax.scan`` under one ``vmap`` over subjects; the function is jitted once
per S.

Timing excludes compilation (ahead-of-time ``lower().compile()``, timed separately): one warm-up call, then the
median (and best) of ``--repeats`` calls, each waited for with ``block_until_ready``. Subjects/s = S / wall; the
issue's goal is S = 16 at ≥ 6× the subjects/s of S = 1. To explain the scaling, XLA's cost analysis of the compiled
program gives the FLOPs of one inner step (XLA counts a scan body once), hence the achieved GFLOP/s at each S: if S
= 1 already runs near the machine's throughput, batching subjects cannot buy much more. The roofline makes that a
number: with this machine's f32 matmul rate (a 1024² jitted matmul, ``benchmarks.speed``) as the peak, each row
gets the subjects/s it would reach at 100 % of peak, and the goal gets the GFLOP/s it needs (6 × S = 1's
subjects/s × the FLOPs of one subject at the largest S). The machine's load average is recorded (the box is
shared).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.speed import peak_matmul_flops
from metalora import host
from metalora.compiler import jit
from metalora.config_utils import parse_cli
from metalora.lora import LoRAConfig, init_subject_state, inject, split_roles
from metalora.meta import InnerLoopConfig, adapt_subjects, diffusion_example_loss
from metalora.models import base_model as bm
from metalora.train.io import atomic_write_text


def base_model(args: argparse.Namespace) -> bm.BaseModel:
    """The base model of ``--base-config`` (no weights), with ``--channels`` / ``--attention-backend`` applied."""
    model_config = parse_cli(["subjects", f"--config={args.base_config}"], require_workdir=False).config.model
    if args.channels:
        model_config.block_out_channels = tuple(args.channels)
    model_config.attention_backend = args.attention_backend
    return bm.build_base_model(model_config)


def build(args: argparse.Namespace):
    """(graphdef, base, meta, unet, base model) of the LoRA-injected base UNet."""
    model = base_model(args)
    unet = model.unet(bm.init_base_params(model, jax.random.key(0)))
    inject(unet, LoRAConfig(targets="attn", rank=args.rank, mid_rank=args.mid_rank, down_role="meta"),
           key=jax.random.key(1))
    graphdef, base, meta, _ = split_roles(unet)
    return graphdef, base, meta, unet, model


def inputs(unet, model: bm.BaseModel, num_subjects: int, args: argparse.Namespace, seed: int = 0):
    """Fresh heads, shots (photos and caption embeddings of the base's shapes) and keys for S subjects."""
    rng = np.random.default_rng(seed)
    context = (model.tokenizer.max_length, model.config.text_encoder.hidden_size)
    shots = {"images": rng.uniform(-1, 1, (num_subjects, args.shots, *model.sample_shape)).astype(np.float32),
             "context": rng.standard_normal((num_subjects, args.shots, *context), dtype=np.float32)}
    heads = init_subject_state(unet, jax.random.key(seed), num_subjects)
    keys = jax.random.split(jax.random.key(seed + 1), num_subjects)
    return heads, jax.tree.map(jnp.asarray, shots), keys


def make_adapt(graphdef, schedule, config: InnerLoopConfig):
    example_loss = diffusion_example_loss(schedule)

    @jit
    def run(base, meta, heads, shots, keys):
        result = adapt_subjects(example_loss, graphdef, base, meta, heads, shots, keys, config)
        return result.heads, result.losses

    return run


def _flops(compiled) -> float:
    """XLA's FLOP count of the compiled N-step program ≈ the FLOPs of ONE inner step.

    XLA's cost analysis counts a while-loop (scan) body once, not times its trip count (checked: 2- and 8-step
    adaptation programs report the same FLOPs), so this is one step plus the small set-up (Adam init, keys).
    """
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost.get("flops", float("nan")))


def bench(args: argparse.Namespace) -> dict[str, Any]:
    graphdef, base, meta, unet, model = build(args)
    config = InnerLoopConfig(steps=args.steps, learning_rate=1e-3, batch_size=1, flip=True)
    rows = []
    for s in args.subjects:
        heads, shots, keys = inputs(unet, model, s, args)
        start = time.perf_counter()
        run = make_adapt(graphdef, model.schedule, config).lower(base, meta, heads, shots, keys).compile()  # per S
        compile_s = time.perf_counter() - start
        flops = _flops(run)
        jax.block_until_ready(run(base, meta, heads, shots, keys))  # warm-up
        times = []
        for r in range(args.repeats):
            heads, shots, keys = inputs(unet, model, s, args, seed=r + 1)
            start = time.perf_counter()
            _, losses = jax.block_until_ready(run(base, meta, heads, shots, keys))
            times.append(time.perf_counter() - start)
        assert np.isfinite(np.asarray(losses)).all(), f"S={s}: non-finite adaptation loss"
        wall = statistics.median(times)
        rows.append({"subjects": s, "wall_s": wall, "best_s": min(times), "times_s": times,
                     "compile_s": compile_s, "subjects_per_s": s / wall,
                     "ms_per_step": 1e3 * wall / args.steps, "flops_per_step": flops,
                     "gflops_per_s": flops * args.steps / wall / 1e9})
        print(f"S={s}: median {wall:.2f} s over {args.repeats} runs (compile {compile_s:.1f} s)", flush=True)
    base_rate = rows[0]["subjects_per_s"]
    peak = peak_matmul_flops(args.repeats)
    for row in rows:
        row["speedup_vs_first"] = row["subjects_per_s"] / base_rate
        row["fraction_of_peak"] = row["gflops_per_s"] * 1e9 / peak
        row["subjects_per_s_at_peak"] = peak / subject_flops(row, args.steps)
    return {"rows": rows, "peak_gflops_per_s": peak / 1e9, "goal": goal(rows, args.steps, peak)}


GOAL_SPEEDUP = 6.0  # the goal: S = 16 at ≥ 6× the subjects/s of S = 1


def subject_flops(row: dict[str, Any], steps: int) -> float:
    """FLOPs of adapting one subject (all its inner steps) in that row's program."""
    return row["flops_per_step"] * steps / row["subjects"]


def goal(rows: list[dict[str, Any]], steps: int, peak: float) -> dict[str, Any]:
    """What ``GOAL_SPEEDUP`` × the first row's subjects/s needs at the largest S: GFLOP/s and fraction of peak."""
    largest = rows[-1]
    needed = GOAL_SPEEDUP * rows[0]["subjects_per_s"] * subject_flops(largest, steps)
    return {"subjects": largest["subjects"], "speedup": GOAL_SPEEDUP,
            "subjects_per_s": GOAL_SPEEDUP * rows[0]["subjects_per_s"], "needs_gflops_per_s": needed / 1e9,
            "fraction_of_peak": needed / peak}


def markdown_table(result: dict[str, Any], steps: int) -> str:
    rows, g = result["rows"], result["goal"]
    lines = [f"| S | wall s ({steps} steps) | best s | subjects/s | speed-up vs S={rows[0]['subjects']} | "
             "ms/step | GFLOP/step | GFLOP/s | % of peak | subjects/s at peak |", "|---" * 10 + "|"]
    for r in rows:
        lines.append(f"| {r['subjects']} | {r['wall_s']:.2f} | {r['best_s']:.2f} | {r['subjects_per_s']:.3f} | "
                     f"{r['speedup_vs_first']:.2f}× | {r['ms_per_step']:.1f} | {r['flops_per_step'] / 1e9:.3f} | "
                     f"{r['gflops_per_s']:.1f} | {100 * r['fraction_of_peak']:.0f} % | "
                     f"{r['subjects_per_s_at_peak']:.2f} |")
    lines.append(f"| goal: S={g['subjects']} at {g['speedup']:g}× | | | {g['subjects_per_s']:.3f} | "
                 f"{g['speedup']:g}× | | | {g['needs_gflops_per_s']:.1f} | {100 * g['fraction_of_peak']:.0f} % | |")
    return "\n".join(lines) + f"\n\npeak: {result['peak_gflops_per_s']:.1f} GFLOP/s (f32 1024² matmul on this machine)"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--subjects", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16])
    p.add_argument("--steps", type=int, default=20, help="inner steps N per subject")
    p.add_argument("--shots", type=int, default=1, help="k")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--base-config", default="configs/base_tiny.py", help="config file[:arg] with a model section")
    p.add_argument("--channels", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help="block_out_channels (default: the base config's)")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--mid-rank", type=int, default=16)
    p.add_argument("--attention-backend", default="auto")
    p.add_argument("--out", type=pathlib.Path, default=None)
    return p.parse_args(argv)


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    load_before = os.getloadavg()
    start = time.perf_counter()
    result = bench(args)
    table = markdown_table(result, args.steps)
    print(table)
    payload = {"settings": vars(args) | {"out": str(args.out)}, **result, "table": table,
               "load_average_before": load_before, "load_average_after": os.getloadavg(),
               "cpu_count": os.cpu_count(), "devices": [str(d) for d in jax.devices()][:1],
               "machine": platform.processor() or platform.machine(), "jax": jax.__version__,
               "total_s": time.perf_counter() - start}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps(payload, indent=2))
    return payload


if __name__ == "__main__":
    host.reexec_with_malloc_tunables()  # before any work: see metalora/host.py
    main()
