"""Train the evaluation probes once: identity encoder (FaceSim) + attribute classifiers (prompt alignment).

    python -m experiments.train_probes --config configs/probes.py --workdir /tmp/probes_r32 [--config.key=value]

Writes to the workdir: the checkpoint (``identity_encoder.safetensors``, ``attribute_classifier.safetensors``,
``config.json``), ``metrics.json`` (every number, training curves, wall times) and ``metrics.md``; prints the
Markdown table. With ``publish`` the same checkpoint also goes to ``<probes dir>/<name>`` for ``load_probes(name)``.
"""

from __future__ import annotations

import functools
import pathlib
import time

from metalora.config_utils import run_cli
from metalora.eval import probe_training
from metalora.eval import probes as P


def main(config, workdir: pathlib.Path) -> P.Probes:
    t0 = time.perf_counter()
    probes = probe_training.train_probes(config, log=functools.partial(print, flush=True))
    probes.metrics["timing"]["total"] = time.perf_counter() - t0
    P.save_probes(workdir, probes)
    if config.publish:
        name = config.name or f"r{config.net.resolution}"
        root = pathlib.Path(config.cache_dir) if config.cache_dir else P.default_probes_dir()
        print(f"published to {P.save_probes(root / name, probes)}")
    print(P.metrics_markdown(probes.metrics))
    print(f"wrote {workdir}")
    return probes


if __name__ == "__main__":
    run_cli(main)
