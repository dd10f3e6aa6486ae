"""Ablation runner at smoke size: grid keys reach the right sub-configs, cells are resumable, typos fail early."""

import pytest
from safetensors.numpy import load_file

from configs import ablate_tiny
from experiments import ablate


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
