"""Where a compiled step spends its time: a ``jax.profiler`` trace of a few calls, summed per XLA op.

    python -m benchmarks.profile_step [--program lora_step|pretrain_step] [--steps 5] [--top 20]
                                      [--config configs/base_tiny.py] [--out runs/profile_<program>.json]

Programs: ``lora_step`` is the LoRA adaptation step that ``benchmarks/speed.py`` times against diffusers + PEFT (the
same function); ``pretrain_step`` is the base model's pretraining step of ``--config`` on real batches (the step
``experiments/pretrain_base.py`` runs).

How: the step is compiled once and run once, then traced for ``--steps`` calls with a Perfetto trace (plain JSON, so no
profiler plugin is needed to read it). XLA:CPU records one event per executed HLO instruction (thunk), named as
the instruction; each is matched with the compiled HLO text for its opcode, fusion kind and the JAX operation that
produced it (``metadata.op_name``). Times are *exclusive* (a ``while`` loop's own time excludes its body's ops) and
summed over XLA's threads, so "op time" can exceed wall time when two thunks run at once. Four tables: by phase
(forward, backward, outside the gradient: optimizer, EMA, metrics), by category (opcode; fusions by kind, YNNPACK
library calls apart), by JAX operation, and the top instructions.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import re
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping

from metalora import host

# One HLO instruction: `%name = shape opcode(operands), attributes`. The shape may be a tuple with spaces, so the
# opcode is the first lower-case word directly followed by "(" after " = ".
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(?P<name>[\w.\-]+) = .*? (?P<opcode>[a-z][\w\-]*)\(")
_KIND = re.compile(r"\bkind=(k\w+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
# Events of the runtime itself, not of an instruction.
_NOT_AN_OP = ("ThreadpoolListener::", "ThunkExecutor::", "end: ")


def hlo_instructions(hlo_text: str) -> dict[str, dict[str, str]]:
    """instruction name -> {"opcode", "category", "jax_op", "phase"} for every instruction of a compiled module's
    text."""
    table = {}
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, opcode = match["name"], match["opcode"]
        category = opcode
        if opcode == "fusion":
            kind = _KIND.search(line)
            category = "ynnpack library call" if name.startswith("ynn_") else f"fusion ({kind[1] if kind else '?'})"
        op_name = _OP_NAME.search(line)
        # "jit(step)/jvp(...)/transpose(...)/conv_general_dilated" -> the innermost JAX operation
        jax_op = re.sub(r"\[.*$", "", op_name[1].rsplit("/", 1)[-1]) if op_name else "(no metadata)"
        table[name] = {"opcode": opcode, "category": category, "jax_op": jax_op, "phase": _phase(op_name)}
    return table


def _phase(op_name: re.Match | None) -> str:
    """Forward pass, backward pass (JAX's transpose of the linearized forward) or neither (the optimizer, EMA,
    metrics); instructions XLA created itself (layout copies, ...) carry no metadata."""
    if op_name is None:
        return "(no metadata)"
    if "transpose(" in op_name[1]:
        return "backward"
    return "forward" if "jvp(" in op_name[1] else "outside the gradient"


def exclusive_times(events: Iterable[Mapping]) -> list[tuple[str, float]]:
    """(name, exclusive µs) of complete ("X") trace events: each event's duration minus its children's on the same
    thread (events nest when one instruction, such as a ``while``, runs others)."""
    by_thread: dict[tuple, list[Mapping]] = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and "dur" in e:
            by_thread[(e.get("pid"), e.get("tid"))].append(e)
    out = []
    for thread_events in by_thread.values():
        # Parents first: earlier start, then the longer of two that start together.
        thread_events.sort(key=lambda e: (float(e["ts"]), -float(e["dur"])))
        stack: list[list] = []  # [end, name, exclusive]
        for e in thread_events:
            start, dur = float(e["ts"]), float(e["dur"])
            while stack and stack[-1][0] <= start:
                _, name, excl = stack.pop()
                out.append((name, excl))
            if stack:
                stack[-1][2] -= dur
            stack.append([start + dur, e["name"], dur])
        out.extend((name, excl) for _, name, excl in stack)
    return out


def summarize(events: Iterable[Mapping], instructions: Mapping[str, Mapping[str, str]], steps: int,
              top: int) -> dict[str, list[dict]]:
    """Per-step op time (ms) grouped by phase, by category, by JAX operation and by (the ``top``) instructions,
    largest first."""
    groups = {key: collections.Counter() for key in ("phase", "category", "jax_op", "instruction")}
    calls = {key: collections.Counter() for key in groups}
    for name, excl_us in exclusive_times(events):
        if name.startswith(_NOT_AN_OP) or name not in instructions:
            continue  # runtime bookkeeping and Python-side events
        info = instructions[name]
        for key, label in (("phase", info["phase"]), ("category", info["category"]), ("jax_op", info["jax_op"]),
                           ("instruction", f"{name} ({info['category']}, {info['jax_op']})")):
            groups[key][label] += excl_us
            calls[key][label] += 1
    total = sum(groups["category"].values()) or 1.0
    tables = {}
    for key, counter in groups.items():
        rows = [{key: label, "ms_per_step": us / 1e3 / steps, "share": us / total,
                 "calls_per_step": calls[key][label] / steps} for label, us in counter.most_common()]
        tables[key] = rows[:top] if key == "instruction" else rows
    return tables


def _trace_events(trace_dir: pathlib.Path) -> list[Mapping]:
    paths = sorted(trace_dir.rglob("*.trace.json.gz"))
    if not paths:
        raise RuntimeError(f"jax.profiler wrote no Perfetto trace under {trace_dir}")
    data = json.loads(gzip.decompress(paths[-1].read_bytes()))
    return data["traceEvents"] if isinstance(data, dict) else data


def profile(run: Callable[[], None], hlo_text: str, steps: int, top: int) -> dict:
    """Trace ``steps`` calls of ``run`` (already compiled and warmed up) and summarize them against ``hlo_text``."""
    import jax

    instructions = hlo_instructions(hlo_text)
    walls = []
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(steps):
                start = time.perf_counter()
                run()
                walls.append(time.perf_counter() - start)
        events = _trace_events(pathlib.Path(tmp))
    tables = summarize(events, instructions, steps, top)
    op_ms = sum(row["ms_per_step"] for row in tables["category"])
    return {"wall_ms_per_step": 1e3 * statistics.median(walls), "op_ms_per_step": op_ms, **tables}


def _lora_step(args) -> tuple[Callable[[], None], str]:
    import types

    from benchmarks import speed

    shape = types.SimpleNamespace(batch=args.batch, size=args.size, rank=args.rank)
    inputs = speed._lora_inputs(shape)
    step, init, _ = speed._metalora_lora_step(shape, *inputs)
    compiled = step.lower(*init).compile()  # run this executable too: its text is what the trace shows
    return speed._stepper(compiled, init), compiled.as_text()


def _pretrain_step(args) -> tuple[Callable[[], None], str]:
    import jax

    from experiments import pretrain_base
    from metalora.config_utils import parse_cli
    from metalora.train.step import TrainStep

    config = parse_cli(["profile_step", f"--config={args.config}"], require_workdir=False).config
    model = pretrain_base.build_model(config)
    state, step = pretrain_base.make_state_and_step(config, model)
    data = pretrain_base.make_data(config, model.tokenizer)
    batch, key = next(data), jax.random.key(config.seed + 2)
    compiled = step.lower(state, batch, key).compile()  # run this executable too: its text is what the trace shows
    run_step = TrainStep(compiled)  # the step's public (state, batch, key) signature around the executable
    box = [state]

    def run():
        box[0], metrics = run_step(box[0], batch, key)
        jax.block_until_ready(metrics)

    return run, compiled.as_text()


PROGRAMS = {"lora_step": _lora_step, "pretrain_step": _pretrain_step}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--program", choices=sorted(PROGRAMS), default="lora_step")
    parser.add_argument("--steps", type=int, default=5, help="traced calls (after one untraced warm-up call)")
    parser.add_argument("--top", type=int, default=20, help="rows of the per-instruction table")
    parser.add_argument("--config", default="configs/base_tiny.py", help="pretrain_step: the base model's config")
    parser.add_argument("--batch", type=int, default=8, help="lora_step: as benchmarks/speed.py")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--out", default="", help="JSON path (default runs/profile_<program>.json)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1")

    from benchmarks.speed import _table
    from metalora.train.io import atomic_write_text

    run, hlo_text = PROGRAMS[args.program](args)
    run()  # warm up outside the trace
    result = {"program": args.program, "args": vars(args), **profile(run, hlo_text, args.steps, args.top)}
    print(f"{args.program}: wall {result['wall_ms_per_step']:.1f} ms/step (median of {args.steps}), "
          f"op time {result['op_ms_per_step']:.1f} ms/step (summed over XLA's threads)")
    for key in ("phase", "category", "jax_op", "instruction"):
        print(f"\n## by {key}\n\n{_table(result[key])}")
    out = pathlib.Path(args.out or f"runs/profile_{args.program}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    host.reexec_with_malloc_tunables()  # before any work: see metalora/host.py
    main()
