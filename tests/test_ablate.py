"""Ablation runner at smoke size: grid keys reach the right sub-configs, cells are resumable, typos fail early."""

import json
import pathlib

import pytest
from safetensors.numpy import load_file

from configs import ablate_tiny, meta_phd_tiny
from experiments import ablate
from metalora.eval import benchmark

SHIPPED_CELLS = pathlib.Path(__file__).resolve().parents[1] / "assets" / "default_benchmark" / "cells"


def smoke_config():
    config = ablate_tiny.get_config("smoke")
    config.benchmark.methods = ("meta_lora",)  # one method keeps it short; the grid still meta-trains per cell
    return config


def test_grid_keys_reach_every_sub_config_that_has_them():
    config = smoke_config()
    mt, bc = ablate.cell_configs(config, {"lora.rank": 8, "meta.algorithm": "reptile", "protocol.shots": 2})
    assert mt.lora.rank == bc.lora.rank == 8
    assert mt.meta.algorithm == "reptile" and bc.protocol.shots == 2
    assert config.meta_train.lora.rank != 8  # the template is not modified
    with pytest.raises(KeyError, match="no_such"):
        ablate.cell_configs(config, {"lora.no_such": 1})
    assert ablate.cells((("a", (1, 2)), ("b", ("x", "y")))) == [
        {"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 2, "b": "x"}, {"a": 2, "b": "y"}]


def test_the_shots_grid_holds_out_the_same_photos_in_every_cell():
    config = ablate_tiny.get_config("shots")
    shots = dict(config.grid)["protocol.shots"]
    assert config.benchmark.protocol.max_shots == max(shots)
    assert dict(config.reference)["protocol.shots"] in shots
    assert meta_phd_tiny.get_config().protocol.max_shots == 0  # the default benchmark keeps its own protocol


def test_ablation_smoke_runs_and_resumes(tmp_path, capsys):
    config = smoke_config()
    out = ablate.main(config, tmp_path)
    assert [r["cell"]["lora.rank"] for r in out["rows"]] == [2, 4]
    table = (tmp_path / "ablation.md").read_text()
    assert table.count("| meta_lora |") == 2
    for rank in (2, 4):  # each cell meta-trained its own D at its own rank
        d = load_file(str(tmp_path / f"lora.rank={rank}" / "meta" / "meta_down" / "meta_down.safetensors"))
        assert d and all(rank in v.shape for v in d.values())
    capsys.readouterr()
    again = ablate.main(config, tmp_path)
    assert capsys.readouterr().out.count("done earlier") == 2
    assert again["rows"] == out["rows"]


def test_cells_with_the_same_meta_training_share_one_d(tmp_path, capsys):
    config = ablate_tiny.get_config("smoke")
    config.grid = (("protocol.shots", (1, 2)),)  # a benchmark-only key: both cells need the same D
    config.benchmark.methods = ("meta_lora",)
    config.reference = (("protocol.shots", 1),)
    config.benchmark.protocol.max_shots = 2  # as the shipped shots grid: both cells score the same held-out photos
    out = ablate.main(config, tmp_path)
    log = capsys.readouterr().out
    assert log.count("meta-training D") == 1
    assert "[protocol.shots=2] using the D of protocol.shots=1" in log
    assert not (tmp_path / "protocol.shots=2" / "meta").exists()
    results = json.loads((tmp_path / "protocol.shots=2" / "benchmark" / "results.json").read_text())
    assert results["config"]["method"]["meta_lora"]["meta_down"] == str(tmp_path / "protocol.shots=1" / "meta" /
                                                                         "meta_down")
    assert [r["cell"]["protocol.shots"] for r in out["rows"]] == [1, 2]
    # Paired against the reference cell: itself exactly zero, and a plot of the difference per grid value.
    assert out["rows"][0]["paired"]["heldout_loss"][:2] == (0.0, 0.0)
    assert out["rows"][1]["paired"]["heldout_loss"][0] != 0.0
    assert pathlib.Path(out["plots"]["paired_heldout_loss"]).exists()


def test_a_method_the_grid_does_not_touch_runs_once(tmp_path, capsys):
    config = ablate_tiny.get_config("smoke")
    config.grid = (("lora.mid_rank", (2, 4)),)  # r_m: plain LoRA has no Mid factor
    config.benchmark.methods = ("lora",)
    out = ablate.main(config, tmp_path)
    log = capsys.readouterr().out
    assert "meta-training" not in log  # no method here needs a D
    assert log.count("reusing lora seed 0") == 1 and log.count("done earlier") == 1
    first, second = out["rows"]
    assert {k: v for k, v in first.items() if k != "cell"} == {k: v for k, v in second.items() if k != "cell"}


def test_best_change_is_the_paired_change_at_the_best_later_step():
    change = {"step": [0, 25, 50, 100], "mean": [0.0, -3e-4, -5e-4, -2e-4], "ci": [0.0, 1e-4, 2e-4, 3e-4],
              "n": [8, 8, 8, 8]}
    assert ablate.best_change(change, "heldout_loss") == (-5e-4, 2e-4, 8, 50)
    assert ablate.best_change(change, "r_face_sim") == (-2e-4, 3e-4, 8, 100)  # higher is better: the least negative
    assert ablate.best_change({"step": [0], "mean": [0.0], "ci": [0.0], "n": [8]}, "heldout_loss") is None
    assert ablate.best_change(None, "heldout_loss") is None
    rows = [{"cell": {"lora.rank": 2}, "method": "meta_lora", "trainable_parameters": 1234,
             "heldout_loss": (0.0853, 0.0112, 8), "heldout_loss_best_change": (-5e-4, 2e-4, 8, 50)}]
    table = ablate.markdown((("lora.rank", (2,)),), rows)
    assert "| 2 | meta_lora | 1,234 | 0.0853 ± 0.0112 | -0.00050 ± 0.00020 (50) | – |" in table
    rows[0]["paired"] = {"heldout_loss": (-1.2e-4, 3.4e-4, 8), "r_face_sim": (0.0123, 0.045, 8)}
    table = ablate.markdown((("lora.rank", (2,)),), rows)  # a loss's paired difference keeps its small digits
    assert "| r_face_sim − reference (paired) | heldout_loss − reference (paired) |" in table
    assert "| +0.012 ± 0.045 | -0.00012 ± 0.00034 |" in table


def test_the_stacked_id_merge_grid_reuses_the_shipped_default_benchmark_cells():
    """The grid keeps the default benchmark's settings: its default value's cell has the fingerprint of the shipped
    ``stacked_id`` cells (so they are copied), the other values change it, and no meta-training is asked for."""
    config = ablate_tiny.get_config("stacked_id_merge")
    key, values = config.grid[0]
    assert config.benchmark.methods == ("stacked_id",) and 5 in values
    default = meta_phd_tiny.get_config()
    assert default.method.stacked_id.start_merge_step == 5
    shipped = {json.loads(p.read_text())["fingerprint"] for p in SHIPPED_CELLS.glob("stacked_id__seed*.json")}
    prints = {}
    for value in values:
        _, bc = ablate.cell_configs(config, {key: value})
        prints[value] = benchmark.config_fingerprint(bc, "stacked_id")
    assert prints[5] == benchmark.config_fingerprint(default, "stacked_id")
    assert shipped == {prints[5]}
    assert len(set(prints.values())) == len(values)


def test_shipped_default_benchmark_cells_match_the_default_config():
    """``assets/default_benchmark`` claims to hold cells of the default benchmark: after a change to a setting that
    changes a method's numbers, its shipped cells would be silently recomputed, so recompute and ship them anew (or
    say in its README which are stale)."""
    default = meta_phd_tiny.get_config()
    cells = sorted(SHIPPED_CELLS.glob("*.json"))
    assert cells
    for path in cells:
        cell = json.loads(path.read_text())
        assert cell["variant"] in default.methods, path.name
        assert cell["fingerprint"] == benchmark.config_fingerprint(default, cell["variant"]), path.name
        assert path.with_suffix(".npz").exists(), path.name


def test_paired_difference_pairs_identity_and_seed_at_the_final_step_and_averages_seeds_first():
    def rec(identity, seed, step, value, method="m"):
        return {"method": method, "identity": identity, "seed": seed, "step": step, "r_face_sim": value}

    reference = [rec(1, 0, 0, 0.10), rec(1, 1, 0, 0.30), rec(2, 0, 0, 0.50), rec(2, 1, 0, 0.70),
                 rec(1, 0, 0, 9.0, method="other")]
    records = [rec(1, 0, 0, 5.0), rec(1, 0, 25, 0.20), rec(1, 1, 25, 0.60),  # identity 1: +0.1, +0.3 → +0.2
               rec(2, 0, 25, 0.90), rec(2, 1, 25, 0.90),  # identity 2: +0.4, +0.2 → +0.3
               rec(3, 0, 25, 1.0)]  # no reference partner: left out
    mean, ci, n = ablate.paired_difference(records, reference, "m", "r_face_sim")
    assert n == 2 and mean == pytest.approx(0.25)
    # t(0.975, 1) · sd / √n, where the sample sd of (0.2, 0.3) is 0.1 / √2
    assert ci == pytest.approx(12.7062 * 0.05, rel=1e-4)
    assert ablate.paired_difference(records, reference, "absent", "r_face_sim") is None

    cells = ablate.cells((("a", (1, 2)), ("b", ("x", "y"))))
    assert ablate.reference_index(cells, (("a", 2), ("b", "x"))) == 2
    assert ablate.reference_index(cells, ()) is None
    with pytest.raises(KeyError, match="names no cell"):
        ablate.reference_index(cells, (("a", 3),))
