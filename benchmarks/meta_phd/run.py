"""Meta-PHD-style benchmark: every method × test identity × seed, evaluated at a list of adaptation steps.

    python -m benchmarks.meta_phd.run --config configs/meta_phd_tiny.py --workdir runs/meta_phd [--config.key=value]

Writes ``results.json`` (every raw number, config, versions, machine, seeds), ``table.md`` (mean ± 95% CI),
``r_face_sim_vs_steps.png``, ``heldout_loss_vs_steps.png``, ``rfacesim_vs_alignment.png`` and ``grid.png``.
Rerunning the command resumes: finished (method, seed) cells in ``<workdir>/cells/`` are not recomputed.
"""

from __future__ import annotations

import functools
import pathlib

from metalora.config_utils import run_cli
from metalora.eval import benchmark


def main(config, workdir: pathlib.Path):
    return benchmark.run(config, workdir, log=functools.partial(print, flush=True))


if __name__ == "__main__":
    run_cli(main)
