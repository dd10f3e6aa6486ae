"""Benchmark harness: the methods (no-op at init, what each one trains), the chunked inner loop, the
aggregation math, and the benchmark job end to end at smoke size (outputs, resume, stale-config refusal)."""

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from configs import meta_phd_tiny
from metalora.eval import benchmark
from metalora.eval import harness as H
from metalora.eval import methods as methods_lib
from metalora.meta import InnerLoopConfig, diffusion_example_loss, optimize
from metalora.meta.personalize import attach_adapters, lora_config, save_meta_down
from metalora.models import base_model as bm


@pytest.fixture(scope="module")
def tiny():
    model, params = bm.load_base("random:smoke")
    return model, params, diffusion_example_loss(model.schedule)


@pytest.fixture(scope="module")
def meta_down_dir(tiny, tmp_path_factory):
    """A Meta-Down with random (non-zero) values, saved as experiments/meta_train.py would."""
    model, params, _ = tiny
    _, _, meta, _ = attach_adapters(model, params, lora_config("meta_lora", rank=4, mid_rank=4), jax.random.key(3))
    folder = tmp_path_factory.mktemp("meta_down")
    save_meta_down(folder, meta, {"test": True})
    return folder


def _batch(model, params, key, n=2, caption="a photo of sks person"):
    images = jax.random.uniform(key, (n, *model.sample_shape), minval=-1.0, maxval=1.0)
    ids = jnp.asarray(model.tokenize([caption] * n))
    return {"images": images, "input_ids": ids, "context": bm.encode_text(model, params["text_encoder"], ids)}


def _methods(tiny, meta_down_dir):
    model, params, loss = tiny
    key = jax.random.key(0)
    return {
        "meta_lora": methods_lib.lora_method("meta_lora", model, params, loss, rank=4, mid_rank=4,
                                             meta_down=str(meta_down_dir), key=key),
        "lora": methods_lib.lora_method("lora", model, params, loss, rank=4, key=key),
        "dreambooth": methods_lib.dreambooth_method(model, params, loss),
        "textual_inversion": methods_lib.textual_inversion_method(model, params, loss),
    }


def test_every_method_starts_at_the_base_model(tiny, meta_down_dir):
    """At init each method computes the base model's loss (LoRA: U = 0; DreamBooth: the base weights; textual
    inversion: only the identifier's embedding, set to the class word's, so 'sks person' reads 'person person')."""
    model, params, loss = tiny
    batch = _batch(model, params, jax.random.key(1))
    key = jax.random.key(2)
    base_loss = loss(nnx.merge(model.unet_def, params["unet"]), batch, key)
    for name, method in _methods(tiny, meta_down_dir).items():
        trainable = method.init(jax.random.key(5))
        if name == "textual_inversion":
            person = jnp.asarray(model.tokenize(["a photo of person person"] * 2))
            expected = loss(nnx.merge(model.unet_def, params["unet"]),
                            {**batch, "context": bm.encode_text(model, params["text_encoder"], person)}, key)
        else:
            expected = base_loss
        np.testing.assert_allclose(method.loss(trainable, batch, key), expected, rtol=1e-5, err_msg=name)
        sampled = method.sampling_params(trainable)
        if name != "textual_inversion":
            for a, b in zip(jax.tree.leaves(sampled["unet"]), jax.tree.leaves(params["unet"])):
                np.testing.assert_allclose(a, b, atol=1e-6, err_msg=name)


def test_meta_lora_has_fewer_trainable_parameters_than_rank_matched_lora(tiny, meta_down_dir):
    ms = _methods(tiny, meta_down_dir)
    counts = {n: m.trainable_parameters for n, m in ms.items()}
    assert counts["textual_inversion"] == tiny[0].config.text_encoder.hidden_size
    assert counts["dreambooth"] == sum(x.size for x in jax.tree.leaves(tiny[1]["unet"]))
    assert 0 < counts["meta_lora"] and 0 < counts["lora"] < counts["dreambooth"]
    leaves = jax.tree.leaves(ms["lora"].init(jax.random.key(0)))
    assert counts["lora"] == sum(x.size for x in leaves)


def test_textual_inversion_changes_only_the_identifier_row(tiny):
    model, params, loss = tiny
    method = methods_lib.textual_inversion_method(model, params, loss)
    shots = _batch(model, params, jax.random.key(4), n=2)
    config = InnerLoopConfig(steps=3, learning_rate=0.1, batch_size=2, flip=False)
    row, losses, _ = optimize(method.loss, method.init(jax.random.key(0)), shots, jax.random.key(1), config)
    assert np.isfinite(losses).all()
    new_table = methods_lib._token_table(method.sampling_params(row)["text_encoder"])
    old_table = methods_lib._token_table(params["text_encoder"])
    changed = np.flatnonzero(np.any(np.asarray(new_table) != np.asarray(old_table), axis=1))
    assert changed.tolist() == [model.tokenizer.token_to_id("sks")]


def test_dreambooth_prior_preservation_adds_the_class_loss(tiny):
    model, params, loss = tiny
    prior = _batch(model, params, jax.random.key(9), n=1, caption="a photo of person")
    plain = methods_lib.dreambooth_method(model, params, loss)
    with_prior = methods_lib.dreambooth_method(model, params, loss, prior_images=prior["images"],
                                               prior_prompt={"context": prior["context"]}, prior_weight=0.5)
    batch, key = _batch(model, params, jax.random.key(1)), jax.random.key(2)
    unet = plain.init(key)
    k_noise = jax.random.split(jax.random.fold_in(key, 1))[1]
    expected = plain.loss(unet, batch, key) + 0.5 * loss(nnx.merge(model.unet_def, unet), prior, k_noise)
    np.testing.assert_allclose(with_prior.loss(unet, batch, key), expected, rtol=1e-6)
    # the held-out evaluation measures the subject only
    np.testing.assert_allclose(with_prior.eval_loss(unet, batch, key), plain.loss(unet, batch, key), rtol=1e-6)


def test_chunked_optimize_equals_one_run(tiny, meta_down_dir):
    """run_method evaluates between chunks: chunks continuing the optimiser state must equal one long scan."""
    model, params, _ = tiny
    method = _methods(tiny, meta_down_dir)["meta_lora"]
    shots = _batch(model, params, jax.random.key(4), n=3)
    config = InnerLoopConfig(steps=4, learning_rate=1e-2, batch_size=2, flip=True, max_shift=1)
    start = method.init(jax.random.key(0))
    once, losses_once, _ = optimize(method.loss, start, shots, jax.random.key(1), config)
    half = InnerLoopConfig(steps=2, learning_rate=1e-2, batch_size=2, flip=True, max_shift=1)
    p, l1, state = optimize(method.loss, start, shots, jax.random.key(1), half)
    p, l2, _ = optimize(method.loss, p, shots, jax.random.key(1), half, opt_state=state, start_step=2)
    np.testing.assert_allclose(np.concatenate([l1, l2]), losses_once, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(once)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_chunk_size_lands_on_every_evaluation_step():
    assert H.chunk_size((0, 25, 50, 100, 200, 400)) == 25
    assert H.chunk_size((0, 30, 100)) == 10
    assert H.chunk_size((0,)) == 1
    with pytest.raises(ValueError):
        H.chunk_size((-1, 5))


def test_mean_ci_is_the_student_t_interval():
    x = [0.2, 0.5, 0.4, 0.9]
    m, h, n = H.mean_ci(x)
    assert n == 4 and m == pytest.approx(0.5)
    assert h == pytest.approx(stats.t.ppf(0.975, 3) * np.std(x, ddof=1) / 2.0)
    assert np.isnan(H.mean_ci([1.0])[1]) and H.mean_ci([])[2] == 0


def test_aggregate_steps_to_target():
    records = []
    for identity in (0, 1):
        for step, a, b in ((0, 0.1, 0.1), (10, 0.5, 0.3), (20, 0.6, 0.5), (40, 0.6, 0.55)):
            records.append({"method": "meta_lora", "identity": identity, "seed": 0, "step": step, "r_face_sim": a,
                            "heldout_loss": 1 - a})
            records.append({"method": "lora", "identity": identity, "seed": 0, "step": step, "r_face_sim": b,
                            "heldout_loss": 1 - b})
    summary = H.aggregate(records, reference_method="lora")
    assert summary["target"]["value"] == pytest.approx(0.55)
    assert summary["target"]["steps"] == {"meta_lora": 20, "lora": 40}
    assert summary["final"]["meta_lora"]["r_face_sim"][0] == pytest.approx(0.6)
    table = H.markdown_table(summary, {"lora": {"params": 5}})
    assert "| meta_lora | 40 |" in table and "0.600" in table and "| s to target |" not in table
    timed = H.markdown_table(summary, {}, seconds_per_step={"meta_lora": 1.5, "lora": 0.5})
    header = next(line for line in timed.splitlines() if line.startswith("| method"))
    assert header.endswith("| steps to target | s to target |")
    assert [line.rsplit("|", 3)[1:3] for line in timed.splitlines() if line.startswith(("| meta_lora", "| lora"))] == [
        [" 20 ", " 30 "], [" 40 ", " 20 "]]  # 20 × 1.5 s and 40 × 0.5 s: fewer steps need not mean less time
    assert H.seconds_to_target(None, 1.0) is None and H.seconds_to_target(10, None) is None


def test_the_target_is_the_reference_best_when_it_over_fits():
    """A one-shot fit over-fits: LoRA's held-out loss falls to 0.90 at step 20, then rises above its start. Its last
    value would be "reached" at step 0; its best is reached by meta_lora at step 10 and by LoRA itself at 20. The
    strongest variant of an LR sweep is the one with the best mean at any step (lr=a), not the best last value."""
    curves = {"lora@lr=a": (1.0, 0.95, 0.90, 1.05), "lora@lr=b": (1.0, 0.99, 0.98, 0.97),
              "meta_lora": (1.0, 0.88, 0.92, 1.10)}
    records = [{"method": method, "identity": i, "seed": 0, "step": step, "heldout_loss": value + 0.1 * i}
               for method, values in curves.items() for i in (0, 1) for step, value in zip((0, 10, 20, 40), values)]
    reference = benchmark._reference_variant(records, "lora", "heldout_loss")
    assert reference == "lora@lr=a"
    target = H.aggregate(records, reference_method=reference, target_metric="heldout_loss")["target"]
    assert target["value"] == pytest.approx(0.95)  # 0.90 and 1.00 for the two identities
    assert target["steps"] == {"lora@lr=a": 20, "lora@lr=b": None, "meta_lora": 10}
    assert H.format_cell((-3.2e-4, 2.8e-4, 8)) == "-0.00032 ± 0.00028"  # paired differences keep two figures
    assert H.format_cell((0.0917, 0.016, 8)) == "0.0917 ± 0.0160"


def test_change_from_start_is_paired_per_identity():
    """Identities 0.5 apart in level but each improving by exactly 0.1 per step: the unpaired curve has a wide
    interval, the paired change has mean -0.1·k and zero width."""
    records = [{"method": "lora", "identity": i, "seed": 0, "step": step, "heldout_loss": 0.5 * i + 1.0 - 0.01 * step}
               for i in (0, 1, 2) for step in (0, 10, 20)]
    records.append({"method": "lora", "identity": 0, "seed": 0, "step": 30})  # a record without the metric
    summary = H.aggregate(records)
    assert summary["curves"]["heldout_loss"]["lora"]["ci"][1] > 0.5
    change = summary["change_from_start"]["heldout_loss"]["lora"]
    assert change["step"] == [0, 10, 20]
    np.testing.assert_allclose(change["mean"], [0.0, -0.1, -0.2], atol=1e-12)
    np.testing.assert_allclose(change["ci"], [0.0, 0.0, 0.0], atol=1e-12)
    assert change["n"] == [3, 3, 3]
    # a metric scored at one step only (samples at the final step) has no change to show
    once = [{"method": "lora", "identity": i, "seed": 0, "step": 20, "r_face_sim": 0.1 * i} for i in range(3)]
    assert H.change_from_start(once, "r_face_sim") == []
    assert H.aggregate(records + once)["change_from_start"]["r_face_sim"] == {}  # so the report leaves it out


def test_difference_from_reference_is_paired_per_cell():
    """Identities and seeds far apart in level, meta_lora 0.01 (seed 0) and 0.03 (seed 1) below lora in every
    identity after step 0: the unpaired curves overlap, the paired difference averaged over seeds is -0.02 for every
    identity, so zero width over identities; cells without a partner are left out."""
    records = []
    for i in (0, 1, 2):
        for seed in (0, 1):
            level = 0.3 * i + 0.1 * seed
            for step in (0, 10):
                records.append({"method": "lora", "identity": i, "seed": seed, "step": step, "heldout_loss": level})
                records.append({"method": "meta_lora", "identity": i, "seed": seed, "step": step,
                                "heldout_loss": level - ((0.01 + 0.02 * seed) if step else 0.0)})
    records.append({"method": "meta_lora", "identity": 9, "seed": 0, "step": 10, "heldout_loss": 5.0})  # no partner
    diff = H.difference_from(records, "heldout_loss", "lora")
    assert {r["method"] for r in diff} == {"meta_lora"} and len(diff) == 12
    summary = H.aggregate(records, reference_method="lora", target_metric="heldout_loss")
    paired = summary["vs_reference"]["curves"]["heldout_loss"]["meta_lora"]
    # seeds of one identity are averaged first: the interval counts the 3 identities, not 6 cells
    assert summary["vs_reference"]["method"] == "lora" and paired["step"] == [0, 10] and paired["n"] == [3, 3]
    np.testing.assert_allclose(paired["mean"], [0.0, -0.02], atol=1e-12)
    np.testing.assert_allclose(paired["ci"], [0.0, 0.0], atol=1e-12)
    assert summary["curves"]["heldout_loss"]["meta_lora"]["ci"][1] > 0.2  # the unpaired interval
    assert "vs_reference" not in H.aggregate(records)


def test_every_interval_counts_identities_not_seeds():
    """3 identities × 2 seeds: the final table, the curves and the changes average each identity's seeds first, so
    their intervals are Student-t intervals over 3 identity means (n = 3), not over 6 correlated cells."""
    seed_noise = {0: -0.05, 1: +0.05}
    records = [{"method": "lora", "identity": i, "seed": seed, "step": step,
                "r_face_sim": 0.2 * i + seed_noise[seed] + 0.01 * step * (1 + i)}
               for i in (0, 1, 2) for seed in (0, 1) for step in (0, 10)]
    summary = H.aggregate(records)
    identity_means = [0.2 * i + 0.1 * (1 + i) for i in (0, 1, 2)]  # step 10, seeds averaged
    assert summary["final"]["lora"]["r_face_sim"] == pytest.approx(H.mean_ci(identity_means))
    assert summary["curves"]["r_face_sim"]["lora"]["n"] == [3, 3]
    change = summary["change_from_start"]["r_face_sim"]["lora"]
    assert change["n"] == [3, 3]
    assert (change["mean"][1], change["ci"][1]) == pytest.approx(H.mean_ci([0.1, 0.2, 0.3])[:2])


@pytest.fixture(scope="module")
def id_encoder_dir(tiny, tmp_path_factory):
    """An untrained stacked-ID encoder for the smoke base, saved as experiments/train_id_encoder.py would."""
    from metalora.meta import stacked_id
    from metalora.models.id_encoder import IDEncoderConfig, save_id_encoder

    model, params, _ = tiny
    config = IDEncoderConfig(text_dim=model.config.text_encoder.hidden_size, channels=(8, 16), image_dim=16,
                             fuse_hidden=32, groups=4)
    _, encoder, lora = stacked_id.build(model, params, config, lora_rank=2, key=jax.random.key(0))
    folder = tmp_path_factory.mktemp("id_encoder")
    return save_id_encoder(folder, encoder, lora, config, {"lora": {"targets": "attn", "rank": 2}})


@pytest.fixture(scope="module")
def smoke_run(meta_down_dir, id_encoder_dir, tmp_path_factory):
    config = meta_phd_tiny.get_config("smoke")
    config.method.meta_lora.meta_down = str(meta_down_dir)
    config.method.stacked_id.folder = str(id_encoder_dir)
    config.export = True
    workdir = tmp_path_factory.mktemp("meta_phd")
    return config, workdir, benchmark.run(config, workdir, log=lambda s: None)


def test_benchmark_smoke_writes_every_output(smoke_run):
    config, workdir, out = smoke_run
    for name in ("results.json", "table.md", "heldout_loss_vs_steps.png", "grid.png"):
        assert (workdir / name).is_file(), name
    results = json.loads((workdir / "results.json").read_text())
    assert set(results["methods"]) == set(config.methods)
    cells = {(r["method"], r["identity"], r["step"]) for r in results["records"]}
    tuned = [m for m in config.methods if m != "stacked_id"]  # the tuning-free method is evaluated at step 0 only
    assert len(cells) == (len(tuned) * len(config.adapt.eval_steps) + 1) * 2 == len(results["records"])
    assert {r["step"] for r in results["records"] if r["method"] == "stacked_id"} == {0}
    assert all(np.isfinite(r["heldout_loss"]) for r in results["records"])
    for method in ("meta_lora", "lora"):  # exported LoRA files, one per subject
        assert len(out["exports"][method]) == 2
        assert all((p := __import__("pathlib").Path(f)).is_file() and p.suffix == ".safetensors"
                   for f in out["exports"][method])
    table = (workdir / "table.md").read_text()
    assert all(f"| {m} |" in table for m in config.methods)


def test_benchmark_resumes_and_refuses_stale_cells(smoke_run):
    config, workdir, out = smoke_run
    logs = []
    again = benchmark.run(config, workdir, log=logs.append)
    assert sum("done earlier" in line for line in logs) == len(config.methods)
    assert again["records"] == out["records"]
    # another method's settings do not touch a cell; a shared setting does
    retuned = meta_phd_tiny.get_config("smoke")
    for name in ("meta_lora", "stacked_id"):
        retuned.method[name] = config.method[name]
    retuned.export = True
    retuned.methods = ("lora",)
    retuned.method.dreambooth.learning_rate = 1.0
    logs = []
    benchmark.run(retuned, workdir, log=logs.append)
    assert sum("done earlier" in line for line in logs) == 1
    changed = meta_phd_tiny.get_config("smoke")
    for name in ("meta_lora", "stacked_id"):
        changed.method[name] = config.method[name]
    changed.export = True
    changed.adapt.batch_size = 2
    with pytest.raises(ValueError, match="another config"):
        benchmark.run(changed, workdir, log=lambda s: None)


def test_megaportrait_cells_depend_on_the_method_they_adapt_with(smoke_run):
    config, _, out = smoke_run
    table = out["table"]  # (table.md itself is rewritten by the resume test's narrower reruns)
    assert "megaportrait: portraits in photos of other identities (meta_train split)" in table
    fingerprint = benchmark.config_fingerprint(config, "megaportrait")
    other = meta_phd_tiny.get_config("smoke")
    other.update_from_flattened_dict({"method.meta_lora.meta_down": config.method.meta_lora.meta_down,
                                      "method.stacked_id.folder": config.method.stacked_id.folder, "export": True})
    assert benchmark.config_fingerprint(other, "megaportrait") == fingerprint
    other.method.dreambooth.learning_rate = 1.0  # not its adaptation
    assert benchmark.config_fingerprint(other, "megaportrait") == fingerprint
    other.method.meta_lora.meta_down = "elsewhere"  # its adaptation
    assert benchmark.config_fingerprint(other, "megaportrait") != fingerprint


def test_a_setting_added_later_is_in_the_fingerprint_only_off_its_default():
    """``protocol.max_shots`` came after the shipped cells: at its default (0, the earlier protocol) it must not
    change any fingerprint, and any other value must."""
    config = meta_phd_tiny.get_config("smoke")
    without = copy.deepcopy(config)
    del without.protocol["max_shots"]
    for method in (None, "lora", "meta_lora"):
        assert benchmark.config_fingerprint(config, method) == benchmark.config_fingerprint(without, method)
        config.protocol.max_shots = 2
        assert benchmark.config_fingerprint(config, method) != benchmark.config_fingerprint(without, method)
        config.protocol.max_shots = 0


def test_cells_of_a_method_whose_settings_did_not_change_are_reused(smoke_run, tmp_path):
    config, workdir, _ = smoke_run
    other = copy.deepcopy(config)
    other.lora.mid_rank = 2 * config.lora.mid_rank  # r_m: Meta-LoRA's Mid factor; plain LoRA has none
    assert benchmark.config_fingerprint(other, "lora") == benchmark.config_fingerprint(config, "lora")
    assert benchmark.config_fingerprint(other, "meta_lora") != benchmark.config_fingerprint(config, "meta_lora")
    copied = benchmark.reuse_cells(other, [tmp_path / "nothing_here", workdir], tmp_path / "r_m")
    assert [c.split(" from ")[0] for c in copied] == [f"lora seed {s}" for s in config.seeds]
    assert benchmark.reuse_cells(other, [workdir], tmp_path / "r_m") == []  # already there
    other.methods = ("lora",)
    logs = []
    out = benchmark.run(other, tmp_path / "r_m", log=logs.append)
    assert sum("done earlier" in line for line in logs) == len(config.seeds)
    before = json.loads((workdir / "results.json").read_text())["records"]
    assert out["records"] == [r for r in before if r["method"] == "lora"]
    # the same from the command line's side: config.reuse_cells_from names earlier runs; only matching cells come
    other.methods = ("lora", "meta_lora")
    other.seeds = config.seeds[:1]
    other.reuse_cells_from = (str(workdir),)
    assert benchmark.config_fingerprint(other, "lora") == benchmark.config_fingerprint(config, "lora")
    logs = []
    benchmark.run(other, tmp_path / "from_cli", log=logs.append)
    assert [line for line in logs if line.startswith("reused ")] == [f"reused lora seed {config.seeds[0]} from "
                                                                      f"{workdir}"]
    assert sorted(p.name for p in (tmp_path / "from_cli" / "cells").glob("*.json")) == [
        f"lora__seed{config.seeds[0]}.json", f"meta_lora__seed{config.seeds[0]}.json"]  # meta_lora: computed anew
    other.reuse_cells_from = (str(tmp_path / "typo"),)
    with pytest.raises(FileNotFoundError, match="typo has no cells"):
        benchmark.run(other, tmp_path / "from_cli", log=lambda s: None)


def test_quickstart_reports_a_user_mistake_in_one_line(tmp_path, capsys):
    from experiments import quickstart

    with pytest.raises(SystemExit) as exit_info:
        quickstart.cli(["--config", "configs/quickstart.py:smoke", "--workdir", str(tmp_path),
                        "--config.base.path", str(tmp_path / "no_such_base")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "no_such_base" in err[0]


def test_every_benchmark_config_variant_builds_its_method_list():
    assert [v for v, _, _ in benchmark.variants(meta_phd_tiny.get_config("study"))] == [
        "meta_lora@lr=0.0003", "meta_lora@lr=0.001", "meta_lora@lr=0.003",
        "lora@lr=0.0003", "lora@lr=0.001", "lora@lr=0.003"]
    assert [v for v, _, _ in benchmark.variants(meta_phd_tiny.get_config(""))] == list(methods_lib.METHODS)
    baselines = meta_phd_tiny.get_config("baselines")
    assert [v for v, _, _ in benchmark.variants(baselines)] == [
        "textual_inversion@lr=0.0015", "textual_inversion@lr=0.005", "textual_inversion@lr=0.015",
        "dreambooth@lr=6e-05", "dreambooth@lr=0.0002", "dreambooth@lr=0.0006",
        "attn_dreambooth@lr=0.3", "attn_dreambooth@lr=1", "attn_dreambooth@lr=3"]
    default = meta_phd_tiny.get_config("")
    assert baselines.method.dreambooth.prior_images == default.method.dreambooth.prior_images
    assert {k: v for k, v in baselines.method.attn_dreambooth.items() if k != "learning_rate"} == {
        k: v for k, v in default.method.attn_dreambooth.items() if k != "learning_rate"}
    assert "megaportrait" not in meta_phd_tiny.get_config("lfw").methods  # its templates need the world's truth


def test_a_sweep_composes_with_the_lfw_track():
    study, lfw = meta_phd_tiny.get_config("study"), meta_phd_tiny.get_config("lfw")
    lfw_study = meta_phd_tiny.get_config("study,lfw")
    assert [v for v, _, _ in benchmark.variants(lfw_study)] == [v for v, _, _ in benchmark.variants(study)]
    # the sweep's protocol and the track's models, data and judge
    assert lfw_study.adapt.eval_steps == study.adapt.eval_steps and lfw_study.eval.target_metric == "heldout_loss"
    assert lfw_study.method.meta_lora.meta_down == lfw.method.meta_lora.meta_down != study.method.meta_lora.meta_down
    for key in ("base", "data", "judge", "probes"):
        assert lfw_study[key] == lfw[key], key
    assert "LFW" in lfw_study.report.title and "Does it work" in lfw_study.report.title
    assert [v for v, _, _ in benchmark.variants(meta_phd_tiny.get_config("baselines,lfw"))] == [
        v for v, _, _ in benchmark.variants(meta_phd_tiny.get_config("baselines"))]
    for bad in ("study,baselines", "smoke,lfw", "study,study", "lfw,", "studies"):
        with pytest.raises(ValueError, match="unknown argument"):
            meta_phd_tiny.get_config(bad)


def _fake_subjects(seeds_per_prompt: int) -> H.Subjects:
    """One subject: 1 reference, 2 held-out photos, 2 prompts × ``seeds_per_prompt`` samples (images 2×2 px)."""
    from metalora.data import protocol

    prompts = tuple(protocol.EvalPrompt(text=f"p{i}", attributes={}, novel=()) for i in range(2))
    test = protocol.TestIdentity(identity=7, references=(0,), heldout=(1, 2), prompts=prompts)
    zeros = lambda n: np.zeros((1, n, 2, 2, 3), np.float32)
    return H.Subjects(tests=(test,), shots={"images": zeros(1)}, heldout={"images": zeros(2)},
                      prompt_ids=np.zeros((1, 2 * seeds_per_prompt, 3), np.int32), prompts=(prompts,),
                      seeds_per_prompt=seeds_per_prompt, reference_attributes=({},), shot_photos=zeros(1),
                      heldout_photos=zeros(2))


def test_a_face_detecting_judge_leaves_faceless_samples_out_and_counts_them():
    """dlib-style judge: identity metrics over the samples with a face; no_face = their share; the descriptor of
    each image is read from its first pixel, so every expected value is known by hand."""
    from metalora.eval.faces import FaceEmbeddings

    def embed(images):
        first = np.asarray(images)[:, 0, 0, :2]  # (N, 2): the image's "descriptor"
        found = np.linalg.norm(first, axis=1) > 0
        return FaceEmbeddings(embeddings=np.where(found[:, None], first, np.nan).astype(np.float32), found=found)

    judge = H.IdentityJudge(name="fake", embed=embed, detects_faces=True)
    subjects = _fake_subjects(seeds_per_prompt=2)
    # references/held-out are all-zero in [-1, 1], i.e. 0.5 in [0, 1] after to_unit: descriptor (0.5, 0.5)
    samples = np.zeros((4, 2, 2, 3), np.float32)
    samples[0, 0, 0, :2] = (1.0, 1.0)  # cosine 1 to (0.5, 0.5)
    samples[1, 0, 0, :2] = (1.0, 0.0)  # cosine 1/√2
    # samples 2 and 3 have no face
    out = H.score_subject(None, samples, subjects, 0, judge)
    assert out["no_face"] == 0.5
    np.testing.assert_allclose(out["face_sim"], (1.0 + 2 ** -0.5) / 2, rtol=1e-6)
    np.testing.assert_allclose(out["r_face_sim"], (1.0 + 2 ** -0.5) / 2, rtol=1e-6)
    # prompt 0 has two faces at cosine distance 1 - 1/√2; prompt 1 has none, so it does not count
    np.testing.assert_allclose(out["diversity"], 1.0 - 2 ** -0.5, rtol=1e-6)
    assert "prompt_alignment" not in out


def test_judge_choice_from_the_config():
    class Probes:
        path = "fake"
        identity_encoder = None

    judge = H.probe_judge(Probes())
    assert not judge.detects_faces and judge.name == "probe:fake"
    assert benchmark.make_judge("probes", None) is None
    with pytest.raises(ValueError, match="judge"):
        benchmark.make_judge("clip", None)
