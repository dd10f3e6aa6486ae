"""Ablation runner: a grid over config keys; each cell meta-trains its ``D`` (if a method needs one) and runs the
benchmark harness over its seeds. Resumable at every level: finished meta-trainings and (method, seed) cells are
reused, so rerunning the command after an interruption only computes what is missing.

    python -m experiments.ablate --config configs/ablate_tiny.py:ranks --workdir runs/ablate_ranks

``config.grid`` is a tuple of ``(dotted key, values)``. A key is applied to every sub-config that has it:
``config.meta_train`` (``configs/meta_lora_tiny.py``) and/or ``config.benchmark`` (``configs/meta_phd_tiny.py``);
e.g. ``lora.rank`` changes both, ``meta.algorithm`` only the meta-training, ``protocol.shots`` only the benchmark.
Writes ``ablation.md`` (one row per cell and method), ``ablation.json`` and, for one-key grids, a plot per metric.
With ``config.reference`` (one cell's ``(key, value)`` pairs) the table adds each method's paired difference from
that cell at the final step: within an identity and seed, so the spread between identities cancels.
"""

from __future__ import annotations

import copy
import functools
import itertools
import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from experiments import meta_train
from metalora.config_utils import config_to_dict, run_cli
from metalora.eval import benchmark
from metalora.eval import harness as H
from metalora.train.io import atomic_write_text, plot_curves

METRICS = ("r_face_sim", "face_sim", "prompt_alignment", "pose_copying", "diversity", "heldout_loss")
PAIRED_METRICS = ("r_face_sim", "prompt_alignment", "diversity", "heldout_loss")


def _has(config: ml_collections.ConfigDict, key: str) -> bool:
    node = config
    for part in key.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return False
        node = node[part]
    return True


def _set(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
        node = node[part]
    node[leaf] = value  # ml_collections type-checks the assignment against the field


def cells(grid: Sequence[tuple[str, Sequence[Any]]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, as ``{key: value}`` (the first key varies slowest)."""
    keys = [k for k, _ in grid]
    return [dict(zip(keys, combo)) for combo in itertools.product(*(tuple(v) for _, v in grid))]


def cell_configs(config: ml_collections.ConfigDict, cell: Mapping[str, Any]):
    """(meta-train config, benchmark config) of one cell; a key that neither has is an error (typo guard)."""
    mt, bc = copy.deepcopy(config.meta_train), copy.deepcopy(config.benchmark)
    for key, value in cell.items():
        targets = [c for c in (mt, bc) if _has(c, key)]
        if not targets:
            raise KeyError(f"config.grid key {key!r} is in neither config.meta_train nor config.benchmark")
        for c in targets:
            _set(c, key, value)
    return mt, bc


def cell_name(cell: Mapping[str, Any]) -> str:
    return "__".join(f"{k}={v}" for k, v in cell.items()).replace("/", "_").replace(" ", "") or "default"


def run_cell(config, cell: Mapping[str, Any], workdir: pathlib.Path, log,
             earlier: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """Meta-train the cell's ``D`` (if a method needs one) and run its benchmark. What an ``earlier`` grid cell
    computed with the same settings is reused, not recomputed: its ``D`` (e.g. in a shots sweep) and a method's
    (method, seed) cells (e.g. plain LoRA's in an r_m sweep)."""
    mt, bc = cell_configs(config, cell)
    folder = workdir / cell_name(cell)
    if "meta_lora" in bc.methods:
        # A grid over benchmark-only keys (e.g. protocol.shots) meta-trains the same D in every cell: train it
        # once, in the first cell that has it.
        same = [c for c in earlier if config_to_dict(cell_configs(config, c)[0]) == config_to_dict(mt)]
        meta_folder = (workdir / cell_name(same[0]) if same else folder) / "meta"
        if same:
            log(f"[{cell_name(cell)}] using the D of {cell_name(same[0])} (same meta-training settings)")
        else:
            log(f"[{cell_name(cell)}] meta-training D ({mt.meta.algorithm}, {mt.train.steps} steps)")
            meta_train.main(mt, meta_folder)
        bc.method.meta_lora.meta_down = str(meta_folder / "meta_down")
    sources = [workdir / cell_name(c) / "benchmark" for c in earlier]
    for reused in benchmark.reuse_cells(bc, sources, folder / "benchmark"):
        log(f"[{cell_name(cell)}] reusing {reused} (same settings)")
    log(f"[{cell_name(cell)}] benchmark")
    return benchmark.run(bc, folder / "benchmark", log=log)


def best_change(change: Mapping[str, Sequence[float]] | None, metric: str) -> tuple[float, float, int, int] | None:
    """(mean, 95% CI, n, step) of a method's paired change since step 0 at its best later step (lowest for a loss),
    or None without a later step. Paired per identity, so the spread between identities cancels: at the final step
    alone a held-out loss's interval is ~10× wider than the differences a grid looks for."""
    if not change or len(change["step"]) < 2:
        return None
    later = range(1, len(change["step"]))
    pick = max if H.HIGHER_IS_BETTER[metric] else min
    i = pick(later, key=lambda j: change["mean"][j])
    return change["mean"][i], change["ci"][i], change["n"][i], change["step"][i]


def _final_records(records: Sequence[Mapping[str, Any]], method: str, metric: str) -> list[Mapping[str, Any]]:
    """``method``'s records holding ``metric`` at its last evaluated step."""
    scored = [r for r in records if r["method"] == method and metric in r]
    last = max((r["step"] for r in scored), default=None)
    return [r for r in scored if r["step"] == last]


def paired_difference(records: Sequence[Mapping[str, Any]], reference: Sequence[Mapping[str, Any]], method: str,
                      metric: str) -> tuple[float, float, int] | None:
    """(mean, 95% CI, n identities) of ``method``'s final ``metric`` minus the reference run's, paired per (identity,
    seed) and averaged over each identity's seeds: the benchmark's own pairing (``H.difference_from``,
    ``H.seed_means``), with the reference run's final records as the reference method at the same step.
    None without common cells."""
    mine = _final_records(records, method, metric)
    if not mine:
        return None
    step = mine[0]["step"]
    ref = [dict(r, method="<reference>", step=step) for r in _final_records(reference, method, metric)]
    per_identity = H.seed_means(H.difference_from([*mine, *ref], metric, "<reference>"), metric)
    if not per_identity:
        return None
    return H.mean_ci([r[metric] for r in per_identity])


def summarize(grid_cells: Sequence[Mapping[str, Any]], results: Sequence[Mapping[str, Any]],
              reference: Mapping[str, Any] | None = None) -> list[dict]:
    """One row per (grid cell, method): final-step metrics, the best held-out loss change, steps to target and, with
    a ``reference`` result, the paired differences from it."""
    rows = []
    for cell, result in zip(grid_cells, results):
        summary = result["summary"]
        for method, final in summary["final"].items():
            row = {"cell": dict(cell), "method": method, "trainable_parameters":
                   result["methods"][method]["trainable_parameters"]}
            row |= {m: final[m] for m in METRICS if m in final}
            if reference is not None:
                paired = {m: paired_difference(result["records"], reference["records"], method, m)
                          for m in PAIRED_METRICS}
                row["paired"] = {m: v for m, v in paired.items() if v is not None}
            change = best_change(summary.get("change_from_start", {}).get("heldout_loss", {}).get(method),
                                 "heldout_loss")
            if change is not None:
                row["heldout_loss_best_change"] = change
            if "target" in summary:
                row["steps_to_target"] = summary["target"]["steps"].get(method)
            rows.append(row)
    return rows


def markdown(grid: Sequence[tuple[str, Sequence[Any]]], rows: Sequence[Mapping[str, Any]]) -> str:
    keys = [k for k, _ in grid]
    metrics = [m for m in METRICS if any(m in r for r in rows)]
    paired = [m for m in PAIRED_METRICS if any(m in r.get("paired", {}) for r in rows)]
    header = [*keys, "method", "trainable params", *metrics, *(f"{m} − reference (paired)" for m in paired),
              "best held-out loss change (step)", "steps to target"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells_ = [str(r["cell"][k]) for k in keys] + [r["method"], f"{r['trainable_parameters']:,}"]
        cells_ += [H.format_cell(tuple(r[m])) if m in r else "–" for m in metrics]
        cells_ += [_signed(r["paired"][m], 5 if m == "heldout_loss" else 3) if m in r.get("paired", {}) else "–"
                   for m in paired]
        change = r.get("heldout_loss_best_change")
        cells_.append(f"{H.format_cell(tuple(change[:3]))} ({change[3]})" if change else "–")
        cells_.append(str(r.get("steps_to_target", "–")))
        lines.append("| " + " | ".join(cells_) + " |")
    return "\n".join(lines) + "\n"


def _signed(value: Sequence[float], decimals: int = 3) -> str:
    mean, ci = value[0], value[1]
    return f"{mean:+.{decimals}f} ± {ci:.{decimals}f}"


def reference_index(grid_cells: Sequence[Mapping[str, Any]], reference: Sequence[tuple[str, Any]]) -> int | None:
    """Index of the grid cell named by ``reference`` (``(key, value)`` pairs); None for no reference."""
    if not reference:
        return None
    wanted = {k: v for k, v in reference}
    for i, cell in enumerate(grid_cells):
        if all(k in cell and cell[k] == v for k, v in wanted.items()):
            return i
    raise KeyError(f"config.reference {wanted} names no cell of the grid {[cell_name(c) for c in grid_cells]}")


def _plots(grid_key: tuple[str, Sequence[Any]], rows: Sequence[Mapping[str, Any]], workdir: pathlib.Path,
           reference: str | None) -> dict[str, str]:
    """One plot per metric of a one-key grid, each method's mean ± 95% CI against the key's values; with a
    ``reference`` cell also each paired difference from it (``ablation_paired_<metric>.png``), where the spread
    between identities cancels."""
    key, values = grid_key
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    x = list(values) if numeric else list(range(len(values)))
    panels = [(m, f"ablation_{m}.png", m, f"{m} vs {key}", lambda r, m=m: r.get(m)) for m in METRICS]
    panels += [(f"paired_{m}", f"ablation_paired_{m}.png", f"{m} − reference", f"{m} − ({reference}), paired",
                lambda r, m=m: r.get("paired", {}).get(m)) for m in PAIRED_METRICS if reference]
    plots = {}
    for name, filename, ylabel, title, value in panels:
        curves, bands = {}, {}
        for method in dict.fromkeys(r["method"] for r in rows):
            pts = [value(r) for r in rows if r["method"] == method]
            if len(pts) != len(values) or any(p is None for p in pts):
                continue
            means, cis = np.array([p[0] for p in pts]), np.nan_to_num([p[1] for p in pts])
            curves[method], bands[method] = (x, means), (means - cis, means + cis)
        if curves:
            plots[name] = str(plot_curves(curves, workdir / filename, xlabel=key, ylabel=ylabel, bands=bands,
                                          title=title,
                                          categories=None if numeric else [str(v) for v in values]))
    return plots


def main(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict[str, Any]:
    log = functools.partial(print, flush=True)
    workdir = pathlib.Path(workdir)
    grid = [(k, tuple(v)) for k, v in config.grid]
    grid_cells = cells(grid)
    for cell in grid_cells:  # fail on a typo before hours of compute
        cell_configs(config, cell)
    ref = reference_index(grid_cells, [tuple(pair) for pair in config.get("reference", ())])
    results = [run_cell(config, cell, workdir, log, grid_cells[:i]) for i, cell in enumerate(grid_cells)]
    rows = summarize(grid_cells, results, None if ref is None else results[ref])
    table = (f"# {config.title}\n\nMean ± 95% CI over identities (each identity's seeds averaged first) at the "
             "final adaptation step; the best held-out loss change is paired per identity (since step 0), at the "
             "step where its mean is lowest.")
    if ref is not None:
        table += (f" The reference of the paired columns is the cell {cell_name(grid_cells[ref])}: the same method's "
                  "value there, subtracted within each identity and seed.")
    table += "\n\n"
    table += markdown(grid, rows)
    atomic_write_text(workdir / "ablation.md", table)
    out = {"config": config_to_dict(config), "grid": grid, "rows": rows}
    if len(grid) == 1:
        out["plots"] = _plots(grid[0], rows, workdir, reference=None if ref is None else cell_name(grid_cells[ref]))
    atomic_write_text(workdir / "ablation.json", json.dumps(out, indent=1, default=str) + "\n")
    log(table)
    return out


if __name__ == "__main__":
    run_cli(main)
