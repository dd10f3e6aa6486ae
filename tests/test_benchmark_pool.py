"""Pooling finished benchmark runs over disjoint identities (``metalora.eval.benchmark.pool``)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks.meta_phd import pool as pool_cli
from metalora.eval import benchmark
from metalora.eval import harness as H

METHODS = ("meta_lora@lr=0.0003", "lora@lr=0.0003", "lora@lr=0.001")
STEPS = (0, 25, 50)


def _config(identities, lr=3e-4, seeds=(0, 1)):
    return {"protocol": {"identities": list(identities), "num_identities": len(identities), "shots": 1},
            "eval": {"reference_method": "lora", "target_metric": "heldout_loss"},
            "report": {"title": "study"}, "seeds": list(seeds), "methods": ["meta_lora", "lora"],
            "adapt": {"learning_rate": lr}}


def _run(tmp_path, name, identities, seed, **config_kwargs):
    """A finished run's results.json: held-out losses with an identity level, a per-method trend and noise."""
    rng = np.random.default_rng(seed)
    records = []
    for method_index, method in enumerate(METHODS):
        for identity in identities:
            level = rng.uniform(0.05, 0.15)
            for s in (0, 1):
                for step in STEPS:
                    loss = level - 1e-5 * step * (method_index + 1) + rng.normal(0, 1e-4)
                    records.append({"method": method, "identity": identity, "seed": s, "step": step,
                                    "heldout_loss": loss})
    info = {m: {"trainable_parameters": 1000 * (i + 1), "learning_rate": 3e-4, "seconds_per_step_all_subjects":
                [0.4, 0.5], "cell_seconds": [10.0, 11.0]} for i, m in enumerate(METHODS)}
    for i in info.values():
        i["frechet_to_heldout"] = float(seed)  # a number of one run's samples: not the pooled run's
    workdir = tmp_path / name
    workdir.mkdir()
    results = {"config": _config(identities, **config_kwargs), "identities": list(identities), "methods": info,
               "records": records}
    (workdir / "results.json").write_text(json.dumps(results))
    return workdir, records


def test_pool_equals_one_run_over_all_identities(tmp_path):
    a, records_a = _run(tmp_path, "a", (1100, 1101, 1102), seed=0)
    b, records_b = _run(tmp_path, "b", (1108, 1109), seed=1)
    out = tmp_path / "pooled"
    pooled = pool_cli.main([str(a), str(b), "--out", str(out)])

    records = records_a + records_b
    reference = benchmark._reference_variant(records, "lora", "heldout_loss")
    expected = H.aggregate(records, reference_method=reference, target_metric="heldout_loss")
    assert pooled["summary"]["vs_reference"]["method"] == reference
    for key in ("curves", "change_from_start"):
        got, want = pooled["summary"][key]["heldout_loss"], expected[key]["heldout_loss"]
        for method in METHODS:
            np.testing.assert_allclose(got[method]["mean"], want[method]["mean"])
            np.testing.assert_allclose(got[method]["ci"], want[method]["ci"])
            assert got[method]["n"] == [5] * len(STEPS)  # intervals over the 5 identities, seeds averaged
    assert pooled["summary"]["target"] == expected["target"]
    assert pooled["sources"] == [{"workdir": str(a), "identities": [1100, 1101, 1102]},
                                 {"workdir": str(b), "identities": [1108, 1109]}]
    assert "identities" not in pooled["config"]["protocol"] and pooled["config"]["protocol"]["shots"] == 1
    assert sorted(pooled["identities"]) == [1100, 1101, 1102, 1108, 1109]
    assert pooled["methods"][METHODS[0]]["cell_seconds"] == [10.0, 11.0, 10.0, 11.0]
    assert pooled["methods"][METHODS[1]]["trainable_parameters"] == 2000
    assert "frechet_to_heldout" not in pooled["methods"][METHODS[0]]
    table = (out / "table.md").read_text()
    assert "5 identities × 2 seeds" in table and "difference from" in table
    assert json.loads((out / "results.json").read_text())["summary"]["final"].keys() == set(METHODS)
    assert (out / "heldout_loss_vs_steps.png").is_file()


def test_pool_refuses_a_shared_identity(tmp_path):
    a, _ = _run(tmp_path, "a", (1100, 1101), seed=0)
    b, _ = _run(tmp_path, "b", (1101, 1102), seed=1)
    with pytest.raises(ValueError, match="identity 1101 is in both"):
        benchmark.pool([a, b], tmp_path / "out")


@pytest.mark.parametrize("other,message", [({"lr": 1e-3}, "other settings"), ({"seeds": (0, 2)}, "has seeds")])
def test_pool_refuses_runs_with_other_settings(tmp_path, other, message):
    a, _ = _run(tmp_path, "a", (1100,), seed=0)
    b, _ = _run(tmp_path, "b", (1101,), seed=1, **other)
    with pytest.raises(ValueError, match=message):
        benchmark.pool([a, b], tmp_path / "out")


def test_pool_names_an_unfinished_run(tmp_path):
    a, _ = _run(tmp_path, "a", (1100,), seed=0)
    (tmp_path / "b").mkdir()
    with pytest.raises(FileNotFoundError, match=r"b/results\.json"):
        benchmark.pool([a, tmp_path / "b"], tmp_path / "out")


def test_pool_cli_prints_one_error_line(tmp_path, capsys):
    a, _ = _run(tmp_path, "a", (1100,), seed=0)
    with pytest.raises(SystemExit) as exit_info:
        pool_cli.main([str(a), str(tmp_path / "missing"), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: pool: no results.json") and "missing" in err[0]
