"""Where a compiled step spends its time: a ``jax.profiler`` trace of a few calls, summed per XLA op.

    python -m benchmarks.profile_step [--program lora_step|pretrain_step|sampling] [--steps 5] [--top 20]
                                      [--dtype float32|bfloat16]
                                      [--config configs/base_tiny.py] [--out runs/profile_<program>.json]

Programs: ``lora_step`` is the LoRA adaptation step that ``benchmarks/speed.py`` times against diffusers + PEFT (the
same function); ``pretrain_step`` is the base model's pretraining step of ``--config`` on real batches (the step
``experiments/pretrain_base.py`` runs); ``sampling`` is one call of the DDIM + CFG sampler that ``benchmarks/speed.py``
times against the diffusers loop (``--sample-steps`` UNet evaluations on a batch of 2·``--batch``).

How: the step is compiled once and run once, then traced for ``--steps`` calls with a Perfetto trace (plain JSON, so no
profiler plugin is needed to read it). XLA:CPU records one event per executed HLO instruction (thunk), named as
the instruction; each is matched with the compiled HLO text for its opcode, fusion kind and the JAX operation that
produced it (``metadata.op_name``). Times are *exclusive* (a ``while`` loop's own time excludes its body's ops) and
summed over XLA's threads, so "op time" can exceed wall time when two thunks run at once. Op time misses work XLA
runs asynchronously: a convolution's thunk ends when Eigen's threads have its work, not when they finish it. So every
row also has ``idle_after_ms``, the time no instruction ran after that row's instructions (:func:`idle_after`): after
a convolution that is mostly its own work, elsewhere runtime overhead. Four tables, largest op + idle time first: by
phase (forward, backward, outside the gradient: optimizer, EMA, metrics), by category (opcode; fusions by kind,
YNNPACK library calls apart), by JAX operation, and the top instructions.
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
# Instructions whose trace events contain other instructions' events.
_CONTAINERS = ("while", "conditional", "call")


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


def idle_after(events: Iterable[Mapping], instructions: Mapping[str, Mapping[str, str]]) -> list[tuple[str, float]]:
    """(instruction, idle µs) for every stretch of an execution in which no instruction runs on any thread.

    An execution is the span of a ``ThunkExecutor::Execute (wait for completion)`` event; an idle stretch lasts until
    the next instruction starts or the execution ends. Such time is not all runtime overhead: XLA:CPU runs its
    (Eigen) convolutions asynchronously, so a convolution's thunk returns once the work is queued on Eigen's threads
    and the work itself shows up as idle time after it (in the sampler, ~11x the thunk's own time; the trace's
    thread-pool events do not name the instruction they work for). So an idle stretch is charged to the last
    convolution that began in the busy stretch before it (a small op running beside the convolution's thunk often
    ends after it), else to the instruction that ended last. Loops and calls (``while``, ``conditional``, ``call``)
    are not instructions here: their events span their bodies' gaps.
    """
    ops, windows = [], []
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        start, end = float(e["ts"]), float(e["ts"]) + float(e["dur"])
        if e["name"].startswith("ThunkExecutor::Execute (wait for completion)"):
            windows.append((start, end))
        elif e["name"] in instructions and instructions[e["name"]]["opcode"] not in _CONTAINERS:
            ops.append((start, end, e["name"]))
    ops.sort()
    out = []
    for w_start, w_end in sorted(windows):
        inside = [op for op in ops if w_start <= op[0] <= w_end]
        if not inside:
            continue
        covered_end, ended_last, conv = inside[0][1], inside[0][2], None
        for start, end, name in inside:
            if start > covered_end:  # an idle stretch: charge it, then a new busy stretch begins here
                out.append((conv or ended_last, start - covered_end))
                conv = None
            if instructions[name]["opcode"] == "convolution":
                conv = name
            if end >= covered_end:
                covered_end, ended_last = end, name
        if w_end > covered_end:
            out.append((conv or ended_last, w_end - covered_end))
    return out


def summarize(events: Iterable[Mapping], instructions: Mapping[str, Mapping[str, str]], steps: int,
              top: int) -> dict[str, list[dict]]:
    """Per-step op time (ms) and the idle time after those ops (:func:`idle_after`), grouped by phase, by category, by
    JAX operation and by (the ``top``) instructions, largest sum first."""
    events = list(events)
    keys = ("phase", "category", "jax_op", "instruction")
    groups = {key: collections.Counter() for key in keys}
    idle = {key: collections.Counter() for key in keys}
    calls = {key: collections.Counter() for key in keys}

    def labels(name):
        info = instructions[name]
        return (("phase", info["phase"]), ("category", info["category"]), ("jax_op", info["jax_op"]),
                ("instruction", f"{name} ({info['category']}, {info['jax_op']})"))

    for name, excl_us in exclusive_times(events):
        if name.startswith(_NOT_AN_OP) or name not in instructions:
            continue  # runtime bookkeeping and Python-side events
        for key, label in labels(name):
            groups[key][label] += excl_us
            calls[key][label] += 1
    for name, idle_us in idle_after(events, instructions):
        for key, label in labels(name):
            idle[key][label] += idle_us
    total = sum(groups["category"].values()) or 1.0
    tables = {}
    for key, counter in groups.items():
        order = sorted(counter, key=lambda label: -(counter[label] + idle[key][label]))
        rows = [{key: label, "ms_per_step": counter[label] / 1e3 / steps, "share": counter[label] / total,
                 "calls_per_step": calls[key][label] / steps, "idle_after_ms": idle[key][label] / 1e3 / steps}
                for label in order]
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
    idle_ms = sum(row["idle_after_ms"] for row in tables["category"])
    return {"wall_ms_per_step": 1e3 * statistics.median(walls), "op_ms_per_step": op_ms, "idle_ms_per_step": idle_ms,
            "complete": trace_complete(events, instructions, steps), **tables}


def trace_complete(events: Iterable[Mapping], instructions: Mapping[str, Mapping[str, str]], steps: int) -> bool:
    """Whether every instruction ran a multiple of ``steps`` times, as it does in a program without data-dependent
    branches or trip counts. The profiler drops events silently once its buffer is full (seen with 5 calls of the
    25-step sampler, ~125,000 instruction events), which this catches."""
    counts = collections.Counter(e["name"] for e in events
                                 if e.get("ph") == "X" and "dur" in e and e["name"] in instructions)
    return all(count % steps == 0 for count in counts.values())


def _lora_step(args) -> tuple[Callable[[], None], str]:
    import types

    from benchmarks import speed

    shape = types.SimpleNamespace(batch=args.batch, size=args.size, rank=args.rank, dtype=args.dtype)
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


def _sampling(args) -> tuple[Callable[[], None], str]:
    import types

    import jax.numpy as jnp

    from benchmarks import speed

    shape = types.SimpleNamespace(batch=args.batch, size=args.size, dtype=args.dtype)
    noise, cond, uncond = speed._sampling_inputs(shape)
    sample, params = speed._metalora_sampler(speed._sampling_model(shape), args.sample_steps, args.dtype)
    inputs = (params, jnp.asarray(noise.transpose(0, 2, 3, 1)), jnp.asarray(cond), jnp.asarray(uncond))
    compiled = sample.lower(*inputs).compile()  # run this executable too: its text is what the trace shows

    def run():
        compiled(*inputs).block_until_ready()

    return run, compiled.as_text()


PROGRAMS = {"lora_step": _lora_step, "pretrain_step": _pretrain_step, "sampling": _sampling}


def main(argv=None) -> dict:
    from benchmarks import speed  # its programs and their --dtype choices

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--program", choices=sorted(PROGRAMS), default="lora_step")
    parser.add_argument("--steps", type=int, default=5, help="traced calls (after one untraced warm-up call)")
    parser.add_argument("--top", type=int, default=20, help="rows of the per-instruction table")
    parser.add_argument("--config", default="configs/base_tiny.py", help="pretrain_step: the base model's config")
    parser.add_argument("--batch", type=int, default=8, help="lora_step: as benchmarks/speed.py")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--sample-steps", type=int, default=25, help="sampling: DDIM steps, as benchmarks/speed.py")
    parser.add_argument("--dtype", choices=speed.DTYPES, default="float32",
                        help="lora_step, sampling: compute dtype, as benchmarks/speed.py --dtype")
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
          f"op time {result['op_ms_per_step']:.1f} ms/step (summed over XLA's threads), idle between ops "
          f"{result['idle_ms_per_step']:.1f} ms/step (column idle_after_ms: after which ops)")
    if not result["complete"]:
        print(f"WARNING: some instructions ran a number of times that is not a multiple of --steps {args.steps}: the "
              "trace dropped events (its buffer was full) or the program branches on data; trace fewer steps")
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
