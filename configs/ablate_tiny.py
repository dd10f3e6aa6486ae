"""Ablation grids of Meta-LoRA on the procedural world (``experiments/ablate.py``).

    python -m experiments.ablate --config configs/ablate_tiny.py:ranks --workdir runs/ablate_ranks
    python -m experiments.ablate --config configs/ablate_tiny.py:algorithms --workdir runs/ablate_algorithms
    python -m experiments.ablate --config configs/ablate_tiny.py:identities --workdir runs/ablate_identities
    python -m experiments.ablate --config configs/ablate_tiny.py:shots --workdir runs/ablate_shots
    python -m experiments.ablate --config configs/ablate_tiny.py:stacked_id_merge --workdir runs/ablate_merge
    python -m experiments.ablate --config configs/ablate_tiny.py:smoke --workdir /tmp/ablate_smoke   # tests

Each cell meta-trains D with ``configs/meta_lora_tiny.py`` (overridden by the grid; cells whose meta-training
settings are equal, e.g. every cell of ``shots``, share one D) and runs the benchmark (``configs/meta_phd_tiny.py``,
Meta-LoRA vs LoRA, held-out loss at every evaluation step, samples at the last), one seed.
A grid over a tuning-free method's sampling (``stacked_id_merge``) meta-trains nothing and keeps the default
benchmark's settings, so its default cell is the shipped one (``assets/default_benchmark``), copied, not recomputed.
"""

import ml_collections

from configs import meta_lora_tiny, meta_phd_tiny

GRIDS = {
    "ranks": (("lora.rank", (2, 4, 8)), ("lora.mid_rank", (4, 16))),  # r_d × r_m
    "algorithms": (("meta.algorithm", ("joint", "reptile", "fomaml", "maml")),),
    # meta_train has 1000 identities; at 400 joint steps × 8 identities each head is visited 3200 / N times.
    "identities": (("meta.num_identities", (25, 100, 400, 1000)),),
    "shots": (("protocol.shots", (1, 2, 4)),),
    # How many of the 25 DDIM steps read the plain class prompt before the fused ID tokens (PhotoMaker: 10 of 50).
    "stacked_id_merge": (("method.stacked_id.start_merge_step", (0, 2, 5, 10)),),
    "smoke": (("lora.rank", (2, 4)),),
}
# Grids over the settings of methods that need no Meta-Down: the methods they run.
DEFAULT_BENCHMARK_GRIDS = {"stacked_id_merge": ("stacked_id",)}
# The cell that the table's paired columns subtract (the default setting), per grid; none for the others.
REFERENCES = {"stacked_id_merge": (("method.stacked_id.start_merge_step", 5),),
              "identities": (("meta.num_identities", 100),),
              "shots": (("protocol.shots", 1),)}


def get_config(arg: str = "ranks") -> ml_collections.ConfigDict:
    if arg not in GRIDS:
        raise ValueError(f"configs/ablate_tiny.py: unknown grid {arg!r}; choose one of {sorted(GRIDS)}")
    smoke = arg == "smoke"
    c = ml_collections.ConfigDict()
    c.title = f"Ablation: {arg}"
    c.grid = GRIDS[arg]
    c.reference = REFERENCES.get(arg, ())
    c.meta_train = meta_lora_tiny.get_config("smoke" if smoke else "")
    c.benchmark = meta_phd_tiny.get_config("smoke" if smoke else "")
    if arg in DEFAULT_BENCHMARK_GRIDS:
        c.benchmark.methods = DEFAULT_BENCHMARK_GRIDS[arg]
        c.benchmark.reuse_cells_from = ("assets/default_benchmark",)
        return c
    c.benchmark.methods = ("meta_lora", "lora")
    if arg == "shots":
        # By default the protocol holds out the photos that are not references and asks for attributes the
        # references do not show, so each k would score other photos and prompts; hold out as for the largest k
        # instead, so the cells pair per identity (k = 1 then scores other photos than the default benchmark).
        c.benchmark.protocol.max_shots = max(dict(GRIDS[arg])["protocol.shots"])
    c.benchmark.sample.at = "final"
    c.benchmark.eval.target_metric = "heldout_loss"
    if not smoke:
        c.meta_train.train.progress = False
        c.benchmark.adapt.eval_steps = (0, 25, 50, 100, 200)
        c.benchmark.adapt.batch_size = 2
        # One seed, as every shipped grid table (docs/results.md): 8 identities × 1 seed × ~4 min per method.
        c.benchmark.seeds = (0,)
    return c
