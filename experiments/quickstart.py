"""The whole mission in one command: world → base model → Meta-Down → adapt one held-out identity from one photo
with Meta-LoRA and with LoRA → samples, metrics, plots → a diffusers-loadable LoRA file.

    python -m experiments.quickstart [--config configs/quickstart.py[:smoke]] [--workdir runs/quickstart]

Prints a table (FaceSim, R-FaceSim, prompt alignment, held-out loss per method) and the results folder, which holds
``table.md``, ``results.json``, ``grid.png`` (per method: reference | held-out photo | one sample per prompt),
``r_face_sim_vs_steps.png``, ``heldout_loss_vs_steps.png`` and ``exports/<method>/seed0/subject_<id>/``.
"""

from __future__ import annotations

import functools
import os
import pathlib
import sys

from configs import meta_lora_tiny
from metalora import host
from metalora.config_utils import run_cli
from metalora.eval import benchmark

DEFAULT_CONFIG = "configs/quickstart.py"
DEFAULT_WORKDIR = "runs/quickstart"


def meta_train_config(config):
    """``configs/meta_lora_tiny.py`` with the quickstart's base, data and adapter shapes, for ``meta_train_steps``."""
    smoke = config.data.synth_config == "smoke"
    m = meta_lora_tiny.get_config("smoke" if smoke else "")
    m.base.path, m.base.attention_backend = config.base.path, config.base.attention_backend
    m.data.synth_config, m.data.data_dir = config.data.synth_config, config.data.data_dir
    m.lora.targets, m.lora.rank, m.lora.mid_rank = config.lora.targets, config.lora.rank, config.lora.mid_rank
    m.lora.alpha = config.lora.alpha
    m.train.steps = config.meta_train_steps
    m.train.progress = True
    return m


def main(config, workdir: pathlib.Path):
    log = functools.partial(print, flush=True)
    workdir = pathlib.Path(workdir)
    if config.meta_train_steps > 0:
        from experiments import meta_train

        log(f"[1/3] meta-training D for {config.meta_train_steps} steps → {workdir / 'meta' / 'meta_down'}")
        meta_train.main(meta_train_config(config), workdir / "meta")
        config.method.meta_lora.meta_down = str(workdir / "meta" / "meta_down")
    else:
        log(f"[1/3] Meta-Down: the shipped prior {config.method.meta_lora.meta_down} (re-create it with "
            "`python -m experiments.meta_train --config configs/meta_lora_tiny.py --workdir DIR`, or pass "
            "--config.meta_train_steps=N to meta-train one here)")
    log("[2/3] adapting the held-out identity with " + " and ".join(config.methods) + ", evaluating at steps "
        + ", ".join(map(str, config.adapt.eval_steps)))
    out = benchmark.run(config, workdir, log=log)
    log("[3/3] exported LoRA files (diffusers `load_lora_weights` format):")
    for files in out["exports"].values():
        for f in files:
            log(f"  {f}")
    log(f"\nresults folder: {workdir.resolve()}  (table.md, grid.png, r_face_sim_vs_steps.png)")
    return out


def cli(argv: list[str]) -> None:
    """Defaults for --config/--workdir; a user's mistake (missing file, bad value) is one line, not a traceback."""
    if not any(a == "--config" or a.startswith("--config=") for a in argv):
        argv = ["--config", DEFAULT_CONFIG, *argv]
    if not any(a == "--workdir" or a.startswith("--workdir=") for a in argv):
        argv = [*argv, "--workdir", DEFAULT_WORKDIR]
    try:
        run_cli(main, [sys.argv[0], *argv])
    except (FileNotFoundError, ValueError, KeyError) as e:
        if os.environ.get("METALORA_DEBUG"):
            raise
        print(f"error: {e}  (METALORA_DEBUG=1 shows the traceback)", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    host.reexec_with_malloc_tunables()  # before any work: see metalora/host.py
    cli(sys.argv[1:])
