"""The base-model pretraining step with and without ``metalora.host``'s malloc tunables, in alternation.

    python -m benchmarks.host_allocator [--turns 12] [--steps-per-turn 4] [--config configs/base_tiny.py]
                                        [--out runs/host_allocator.json]

Two worker processes build the same jitted pretraining step (the config's model, batch and optimizer, real
batches); one runs with ``GLIBC_TUNABLES`` unset, the other with :data:`metalora.host.MALLOC_TUNABLES`. They take
turns (a token file): each turn runs ``--steps-per-turn`` steps while the other waits idle, so both see the same
machine load (this VM's speed drifts by ±30 % within minutes, which makes back-to-back runs useless for a 10 %
effect). Per worker: median ms/step, minor page faults and system CPU time per step (``getrusage``).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from metalora import host

VARIANTS = ("default", "tuned")


def _worker(args: argparse.Namespace) -> None:
    import jax

    from experiments import pretrain_base as pb
    from metalora.config_utils import parse_cli

    config = parse_cli(["host_allocator", f"--config={args.config}"], require_workdir=False).config
    model = pb.build_model(config)
    state, step = pb.make_state_and_step(config, model)
    data = pb.make_data(config, model.tokenizer)
    batches = [next(data) for _ in range(args.steps_per_turn)]
    key = jax.random.key(1)
    state, _ = jax.block_until_ready(step(state, batches[0], key))  # compile before the first turn
    token, me = pathlib.Path(args.token), args.worker
    token.with_name(f"ready_{me}").write_text("")
    other = VARIANTS[1 - VARIANTS.index(me)]
    seconds, faults, system = [], [], []
    for _ in range(args.turns):
        while token.read_text() != me:
            time.sleep(0.02)
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for batch in batches:
            state, metrics = step(state, batch, key)
            bool(metrics["finite"])  # the training loop's per-step sync
        jax.block_until_ready(state)
        after, n = resource.getrusage(resource.RUSAGE_SELF), len(batches)
        seconds.append((time.perf_counter() - start) / n)
        faults.append((after.ru_minflt - before.ru_minflt) / n)
        system.append((after.ru_stime - before.ru_stime) / n)
        token.write_text(other)
    print(json.dumps({"variant": me, "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
                      "ms_per_step": 1e3 * statistics.median(seconds),
                      "ms_per_step_turns": [round(1e3 * s, 1) for s in seconds],
                      "minor_faults_per_step": statistics.median(faults),
                      "system_ms_per_step": 1e3 * statistics.median(system)}))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/base_tiny.py")
    p.add_argument("--turns", type=int, default=12)
    p.add_argument("--steps-per-turn", type=int, default=4)
    p.add_argument("--out", type=pathlib.Path, default=None)
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--token", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return _worker(args)
    tuned = host.tuned_environment({}, libc="glibc")["GLIBC_TUNABLES"]
    base_env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host.OPT_OUT)}
    envs = {"default": {**base_env, host.OPT_OUT: "0"}, "tuned": {**base_env, "GLIBC_TUNABLES": tuned}}
    with tempfile.TemporaryDirectory() as tmp:
        token = pathlib.Path(tmp) / "turn"
        token.write_text("")  # nobody's turn until both have compiled
        common = ["--config", args.config, "--turns", str(args.turns), "--steps-per-turn", str(args.steps_per_turn),
                  "--token", str(token)]
        procs = {v: subprocess.Popen([sys.executable, "-m", "benchmarks.host_allocator", "--worker", v, *common],
                                     env=envs[v], stdout=subprocess.PIPE, text=True) for v in VARIANTS}
        _wait_until_compiled(procs, token)
        token.write_text(VARIANTS[0])
        rows = [json.loads(procs[v].communicate()[0].strip().splitlines()[-1]) for v in VARIANTS]
    if any(proc.returncode for proc in procs.values()):
        raise RuntimeError(f"a worker failed: {[proc.returncode for proc in procs.values()]}")
    lines = ["| malloc | ms/step (median) | minor faults/step | system ms/step |", "|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['ms_per_step']:.0f} | {r['minor_faults_per_step']:.0f} | "
              f"{r['system_ms_per_step']:.0f} |" for r in rows]
    table = "\n".join(lines)
    print(table)
    payload = {"settings": {k: str(v) for k, v in vars(args).items()}, "tunables": tuned, "rows": rows,
               "table": table, "cpu_count": os.cpu_count()}
    if args.out:
        from metalora.train.io import atomic_write_text

        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps(payload, indent=2))
    return payload


def _wait_until_compiled(procs, token: pathlib.Path) -> None:
    """Both workers compile at once; the first turn starts when both have said they are ready (or one died)."""
    while not all(token.with_name(f"ready_{v}").exists() for v in procs):
        if any(proc.poll() is not None for proc in procs.values()):
            return  # communicate() below reports it
        time.sleep(0.5)


if __name__ == "__main__":
    main()
