"""Ablation grids of Meta-LoRA on the procedural world (``experiments/ablate.py``).

    python -m experiments.ablate --config configs/ablate_tiny.py:ranks --workdir runs/ablate_ranks
    python -m experiments.ablate --config configs/ablate_tiny.py:algorithms --workdir runs/ablate_algorithms
    python -m experiments.ablate --config configs/ablate_tiny.py:identities --workdir runs/ablate_identities
    python -m experiments.ablate --config configs/ablate_tiny.py:shots --workdir runs/ablate_shots
    python -m experiments.ablate --config configs/ablate_tiny.py:smoke --workdir /tmp/ablate_smoke   # tests

Each cell meta-trains D with ``configs/meta_lora_tiny.py`` (overridden by the grid) and runs the benchmark
(``configs/meta_phd_tiny.py``, Meta-LoRA vs LoRA, held-out loss at every evaluation step, samples at the last).
"""

import ml_collections

from configs import meta_lora_tiny, meta_phd_tiny

GRIDS = {
    "ranks": (("lora.rank", (2, 4, 8)), ("lora.mid_rank", (4, 16))),  # r_d × r_m
    "algorithms": (("meta.algorithm", ("joint", "reptile", "fomaml", "maml")),),
    "identities": (("meta.num_identities", (50, 200, 1000)),),
    "shots": (("protocol.shots", (1, 2, 4)),),
    "smoke": (("lora.rank", (2, 4)),),
}


def get_config(arg: str = "ranks") -> ml_collections.ConfigDict:
    if arg not in GRIDS:
        raise ValueError(f"configs/ablate_tiny.py: unknown grid {arg!r}; choose one of {sorted(GRIDS)}")
    smoke = arg == "smoke"
    c = ml_collections.ConfigDict()
    c.title = f"Ablation: {arg}"
    c.grid = GRIDS[arg]
    c.meta_train = meta_lora_tiny.get_config("smoke" if smoke else "")
    c.benchmark = meta_phd_tiny.get_config("smoke" if smoke else "")
    c.benchmark.methods = ("meta_lora", "lora")
    c.benchmark.sample.at = "final"
    c.benchmark.eval.target_metric = "heldout_loss"
    if not smoke:
        c.meta_train.train.progress = False
        c.benchmark.adapt.eval_steps = (0, 25, 50, 100, 200)
        c.benchmark.adapt.batch_size = 2
    return c
