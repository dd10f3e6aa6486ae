"""Evaluation probes: metric formulas on hand-made cases and closed forms, data plumbing, a tiny training run
through the CLI, checkpoint round trips. The full-size training run is a command (see configs/probes.py)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from flax import nnx
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from configs.probes import get_config
from metalora.data import world
from metalora.eval import metrics as M
from metalora.eval import probe_data, probe_training
from metalora.eval import probes as P

TINY = P.NetConfig(stem_width=8, widths=(8, 16, 16), feature_dim=16)


# --------------------------------------------------------------------------------------------------------------
# Metrics on hand-made cases
# --------------------------------------------------------------------------------------------------------------


def test_cosine_face_sim_hand_cases():
    e = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    np.testing.assert_allclose(M.face_sim_from_embeddings(e, e[0]), [1.0, 0.0, np.sqrt(0.5)], atol=1e-12)
    # R-FaceSim averages over the held-out photos: cos to (1,0) and (0,1) -> mean.
    np.testing.assert_allclose(M.r_face_sim_from_embeddings(e, e[:2]), [0.5, 0.5, np.sqrt(0.5)], atol=1e-12)
    with pytest.raises(ValueError, match="zero vector"):
        M.cosine_matrix(e, np.zeros((1, 2)))


def test_prompt_alignment_hand_labelled():
    predicted = {"background": [0, 1, 2, 3], "glasses": [0, 2, 2, 1], "pose": [1, 1, 1, 1]}
    requested = [{"background": 0}, {"background": 2, "glasses": 2}, {}, {"glasses": 1, "pose": 0}]
    out = M.prompt_alignment_from_predictions(predicted, requested)
    # Hits: img0 bg ok; img1 bg wrong, glasses ok; img3 glasses ok, pose wrong -> 3 of 5.
    assert out["num_requests"] == 5
    assert out["accuracy"] == pytest.approx(3 / 5)
    assert out["per_attribute"] == {"background": 0.5, "glasses": 1.0, "pose": 0.0}
    np.testing.assert_array_equal(out["per_image"], [1.0, 0.5, np.nan, 0.5])
    with pytest.raises(KeyError, match="hat"):
        M.prompt_alignment_from_predictions(predicted, [{"hat": 1}] * 4)


def test_pose_copying_counts():
    # reference pose 0 for all; prompts ask for 2, 2, 0 (same as reference: not eligible), none, 1.
    out = M.pose_copying_rate(predicted_pose=[0, 2, 0, 0, 0], reference_pose=0, requested_pose=[2, 2, 0, -1, 1])
    assert out == {"rate": 2 / 3, "copied": 2, "eligible": 3}
    assert np.isnan(M.pose_copying_rate([0], 0, [0])["rate"])


def test_mean_pairwise_distance():
    f = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    # cosine distances: (0,1)=1, (0,2)=2, (1,2)=1 -> 4/3; euclidean: sqrt2, 2, sqrt2.
    assert M.mean_pairwise_distance(f) == pytest.approx(4 / 3)
    assert M.mean_pairwise_distance(f, "euclidean") == pytest.approx((2 * np.sqrt(2) + 2) / 3)
    assert M.mean_pairwise_distance(np.ones((4, 3))) == pytest.approx(0.0, abs=1e-12)


def _random_spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_matches_closed_forms():
    rng = np.random.default_rng(0)
    d = 6
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    # Commuting (diagonal) covariances: FD = |mu1-mu2|^2 + sum (sqrt a - sqrt b)^2.
    a, b = rng.uniform(0.1, 2, d), rng.uniform(0.1, 2, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert M.frechet_distance_from_stats(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    # Non-commuting covariances: FID's formula with scipy's general matrix square root of S1 S2.
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    ref = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2)).real
    assert M.frechet_distance_from_stats(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-9)
    # Identical stats -> 0, also for a singular (rank-deficient) covariance where sqrtm is delicate.
    v = rng.normal(size=(d, 2))
    sing = v @ v.T
    assert M.frechet_distance_from_stats(mu1, sing, mu1, sing) == pytest.approx(0.0, abs=1e-9)
    np.testing.assert_allclose(M.sqrtm_psd(s1) @ M.sqrtm_psd(s1), s1, atol=1e-12)


def test_frechet_on_samples():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 4))
    assert M.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)
    # Two large Gaussian samples: N(0, I) vs N(m, 4I): FD = |m|^2 + d (1 - 2)^2.
    m = np.array([1.0, -1.0, 0.5, 0.0])
    y = m + 2.0 * rng.normal(size=(200_000, 4))
    x = rng.normal(size=(200_000, 4))
    assert M.frechet_distance(x, y) == pytest.approx(np.sum(m**2) + 4.0, rel=0.02)


def test_roc_auc_and_threshold():
    rng = np.random.default_rng(2)
    s = np.round(rng.normal(size=60), 1)  # rounding makes ties
    y = rng.random(60) < 0.5
    brute = np.mean([(p > n) + 0.5 * (p == n) for p in s[y] for n in s[~y]])
    assert M.roc_auc(s, y) == pytest.approx(brute, abs=1e-12)
    assert M.roc_auc([0.9, 0.8, 0.1], [True, True, False]) == 1.0
    t = M.best_threshold([0.1, 0.2, 0.7, 0.9], [False, False, True, True])
    assert 0.2 < t < 0.7
    assert M.verification_accuracy([0.1, 0.2, 0.7, 0.9], [False, True, True, True], t) == 0.75


# --------------------------------------------------------------------------------------------------------------
# Data plumbing
# --------------------------------------------------------------------------------------------------------------


def test_identity_ranges_match_tfds_builder():
    builders = pytest.importorskip("metalora.data.builders")
    cfg = builders.SynthConfig(name="x", n_meta_train=7, n_meta_val=3, n_test=2)
    for split in probe_data.SPLITS:
        assert probe_data.identity_range(split, n_meta_train=7, n_meta_val=3, n_test=2) == cfg.identity_range(split)
    with pytest.raises(KeyError, match="validation"):
        probe_data.identity_range("validation", n_meta_train=7, n_meta_val=3, n_test=2)


def test_flip_attribute_ids():
    names = world.ATTRIBUTE_NAMES
    ids = np.array(
        [
            world.attribute_ids(
                dict(pose="left", expression="smiling", glasses="red", hat="none", background="blue", lighting="right")
            )
        ]
    )
    out = np.asarray(probe_data.flip_attribute_ids(jnp.asarray(ids), jnp.array([True])))[0]
    got = {n: world.ATTRIBUTE_CLASSES[n][i] for n, i in zip(names, out)}
    assert got == dict(
        pose="right", expression="smiling", glasses="red", hat="none", background="blue", lighting="left"
    )
    same = probe_data.flip_attribute_ids(jnp.asarray(ids), jnp.array([False]))
    np.testing.assert_array_equal(same, ids)


def test_augment():
    x = jax.random.uniform(jax.random.key(0), (3, 8, 8, 3))
    key = jax.random.key(1)
    out, flipped = probe_data.augment(key, x, pad=0, flip_prob=1.0)
    np.testing.assert_array_equal(out, x[:, :, ::-1])
    assert bool(flipped.all())
    out, flipped = probe_data.augment(key, x, pad=0, flip_prob=0.0)
    np.testing.assert_array_equal(out, x)
    out, _ = probe_data.augment(key, x, pad=2, flip_prob=0.0)
    # A crop of the reflect-padded image: some 8x8 window of it.
    padded = np.pad(np.asarray(x), ((0, 0), (2, 2), (2, 2), (0, 0)), mode="reflect")
    for b in range(3):
        assert any(np.array_equal(out[b], padded[b, i : i + 8, j : j + 8]) for i in range(5) for j in range(5)), (
            f"image {b} is not a window of its padded version"
        )
    out, _ = probe_data.augment(key, x, pad=0, flip_prob=0.0, brightness=0.1, channel_gain=0.05)
    ratio = np.asarray(out) / np.asarray(x)
    assert np.all((ratio > 0.85) & (ratio < 1.16)) and not np.allclose(ratio, 1.0)


def test_render_cache_roundtrip_and_staleness(tmp_path):
    data = probe_data.load_or_render(tmp_path, 0, [3, 5], 2, 32, num_workers=1)
    assert data["images"].shape == (4, 32, 32, 3) and data["images"].dtype == np.uint8
    np.testing.assert_array_equal(data["identity"], [3, 3, 5, 5])
    np.testing.assert_array_equal(data["image_id"], [0, 1, 0, 1])
    s = world.render_sample(0, 5, 1, 32)
    np.testing.assert_array_equal(data["images"][3], s.image)
    np.testing.assert_array_equal(data["attributes"][3], world.attribute_ids(s.attributes))
    (path,) = tmp_path.glob("*.npz")
    # Corrupt the cached last photo: the cache must be detected as stale and re-rendered.
    stale = dict(data)
    stale["images"] = data["images"].copy()
    stale["images"][-1] ^= 1
    np.savez(path, **stale)
    again = probe_data.load_or_render(tmp_path, 0, [3, 5], 2, 32, num_workers=1)
    np.testing.assert_array_equal(again["images"], data["images"])


def test_verification_pairs():
    identity = np.repeat(np.arange(4), 3)
    pairs, labels = probe_data.verification_pairs(identity, seed=0)
    assert labels.sum() == 4 * 3 and (~labels).sum() == 12
    np.testing.assert_array_equal(identity[pairs[:, 0]] == identity[pairs[:, 1]], labels)
    assert len({tuple(p) for p in pairs}) == len(pairs)
    again, _ = probe_data.verification_pairs(identity, seed=0)
    np.testing.assert_array_equal(pairs, again)


# --------------------------------------------------------------------------------------------------------------
# Networks, losses, image-level metrics
# --------------------------------------------------------------------------------------------------------------


def test_margin_logits():
    emb = jnp.array([[1.0, 0.0], [0.6, 0.8]])
    w = jnp.array([[2.0, 0.0], [0.0, 3.0]])  # columns: class directions (normalised inside)
    labels = jnp.array([0, 1])
    cos = np.array([[1.0, 0.0], [0.6, 0.8]])
    cf = probe_training.margin_logits(emb, w, labels, kind="cosface", scale=10.0, margin=0.3)
    np.testing.assert_allclose(cf, 10 * (cos - 0.3 * np.eye(2)), atol=1e-6)
    af = probe_training.margin_logits(emb, w, labels, kind="arcface", scale=10.0, margin=0.3)
    theta = np.arccos(0.8)
    np.testing.assert_allclose(af[1], 10 * np.array([0.6, np.cos(theta + 0.3)]), atol=1e-5)
    # theta_y = 0 for sample 0: cos(0 + m).
    np.testing.assert_allclose(af[0], 10 * np.array([np.cos(0.3), 0.0]), atol=1e-5)
    with pytest.raises(ValueError, match="sphereface"):
        probe_training.margin_logits(emb, w, labels, kind="sphereface", scale=1.0, margin=0.1)


@pytest.mark.parametrize("resolution", [32, 64])
def test_identical_images_face_sim_one_at_any_resolution(resolution):
    net = P.NetConfig(resolution=resolution, stem_width=8, widths=(8, 16, 16), feature_dim=16)
    enc = P.IdentityEncoder(net, rngs=nnx.Rngs(0))
    images = np.stack([world.render_sample(0, i, 0, resolution).image for i in range(3)])
    e = P.embed(enc, images)
    assert e.shape == (3, 16)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(P.face_sim(enc, images[:1], images[0]), [1.0], atol=1e-5)
    # uint8 and [0, 1] floats are the same images; [-1, 1] floats are refused with a hint.
    np.testing.assert_allclose(P.embed(enc, images / 255.0), e, atol=1e-5)
    with pytest.raises(ValueError, match=r"\(x \+ 1\) / 2"):
        P.embed(enc, images / 127.5 - 1.0)
    with pytest.raises(ValueError, match=f"{resolution} px"):
        P.embed(enc, np.zeros((1, resolution // 2, resolution // 2, 3), np.uint8))


def test_embed_batching_is_independent_of_batch_size():
    """GroupNorm (not BatchNorm) and tail padding: an image's embedding does not depend on its batch."""
    enc = P.IdentityEncoder(TINY, rngs=nnx.Rngs(1))
    images = np.stack([world.render_sample(0, i, 1, 32).image for i in range(5)])
    np.testing.assert_allclose(P.embed(enc, images, batch_size=2), P.embed(enc, images, batch_size=8), atol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# Tiny end-to-end run through the CLI, checkpoints
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    from experiments.train_probes import main

    root = tmp_path_factory.mktemp("probes")
    config = get_config("smoke")
    config.publish = True
    config.cache_dir = str(root / "cache")
    config.name = "tiny"
    probes = main(config, root / "workdir")
    return root, config, probes


def test_cli_smoke_outputs(smoke_run):
    root, config, _ = smoke_run
    work = root / "workdir"
    for f in ("identity_encoder.safetensors", "attribute_classifier.safetensors", "config.json", "metrics.json"):
        assert (work / f).exists(), f
    metrics = json.loads((work / "metrics.json").read_text())
    ident = metrics["identity"]
    assert 0.0 <= ident["test_accuracy"] <= 1.0 and 0.0 <= ident["test_roc_auc"] <= 1.0
    n_test = config.world.n_test * config.world.eval_images_per_identity
    assert ident["test_pairs"]["same"] == config.world.n_test * 6  # C(4, 2) pairs per identity
    assert metrics["test_images"] == n_test
    assert set(metrics["attributes"]) == set(world.ATTRIBUTE_NAMES)
    assert set(ident["robustness"]) == set(world.ATTRIBUTE_NAMES)
    assert len(metrics["history"]["identity_encoder"]) >= 2
    md = (work / "metrics.md").read_text()
    assert "| background |" in md and "ROC AUC" in md
    assert (root / "cache" / "tiny" / "config.json").exists()  # published by name


def test_load_by_path_and_name_roundtrip(smoke_run, monkeypatch):
    root, _, probes = smoke_run
    images = np.stack([world.render_sample(0, 1200 + i, 0, 32).image for i in range(4)])
    e0 = P.embed(probes.identity_encoder, images)
    a0 = P.predict_attributes(probes.attribute_classifier, images)
    monkeypatch.setenv(P.PROBES_DIR_ENV, str(root / "cache"))
    for loaded in (P.load_probes(root / "workdir"), P.load_probes("tiny")):
        np.testing.assert_array_equal(P.embed(loaded.identity_encoder, images), e0)
        for k, v in P.predict_attributes(loaded.attribute_classifier, images).items():
            np.testing.assert_array_equal(v, a0[k])
        assert loaded.metrics["identity"] == probes.metrics["identity"]
        assert loaded.resolution == 32
    with pytest.raises(FileNotFoundError, match="no probes at 'nonexistent'"):
        P.load_probes("nonexistent")


def test_load_errors_name_the_parameter(smoke_run, tmp_path):
    root, _, _ = smoke_run
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(root / "workdir", bad)
    tensors = st_load((bad / P.ENCODER_FILE).read_bytes())
    key = sorted(tensors)[0]
    del tensors[key]
    (bad / P.ENCODER_FILE).write_bytes(st_save(tensors))
    with pytest.raises(KeyError, match=key.replace(".", r"\.")):
        P.load_probes(bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["net"]["bogus"] = 1
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="bogus"):
        P.load_probes(bad)


def test_image_metrics_with_trained_probes(smoke_run):
    _, _, probes = smoke_run
    clf, enc = probes.attribute_classifier, probes.identity_encoder
    images = np.stack([world.render_sample(0, 1200 + i, i, 32).image for i in range(6)])
    pred = P.predict_attributes(clf, images)
    names = {k: [world.ATTRIBUTE_CLASSES[k][i] for i in v] for k, v in pred.items()}
    # Requests equal to the classifier's own predictions are all "aligned"; the next class of each is never.
    req = [{"background": names["background"][i], "pose": names["pose"][i]} for i in range(6)]
    assert P.prompt_alignment(clf, images, req)["accuracy"] == 1.0
    other = [{"background": world.ATTRIBUTE_CLASSES["background"][(pred["background"][i] + 1) % 9]} for i in range(6)]
    assert P.prompt_alignment(clf, images, other)["accuracy"] == 0.0
    with pytest.raises(ValueError, match="no class 'teal'"):
        P.prompt_alignment(clf, images, {"background": "teal"})
    # Reference pose = predicted pose, prompts ask for another pose: every sample copies the reference.
    poses = world.ATTRIBUTE_CLASSES["pose"]
    asked = [poses[(pred["pose"][i] + 1) % 3] for i in range(6)]
    out = P.pose_copying(clf, images, names["pose"], asked)
    assert out == {"rate": 1.0, "copied": 6, "eligible": 6}
    assert P.pose_copying(clf, images, names["pose"], None)["eligible"] == 0
    assert P.diversity(enc, np.repeat(images[:1], 3, axis=0)) == pytest.approx(0.0, abs=1e-5)
    assert P.diversity(enc, images) > 0.0
    feats = P.probe_features(probes, images, "both")
    assert feats.shape == (6, 32)
    assert P.frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-6)


def test_training_is_deterministic_and_learns():
    data = probe_data.render_split(0, range(4), 4, 32, num_workers=1)
    cfg = get_config("smoke").identity
    cfg.steps, cfg.batch_size, cfg.log_every = 12, 8, 1
    enc1, hist1 = probe_training.train_identity_encoder(data, TINY, cfg, seed=3, log=None)
    enc2, hist2 = probe_training.train_identity_encoder(data, TINY, cfg, seed=3, log=None)
    for a, b in zip(jax.tree.leaves(nnx.state(enc1)), jax.tree.leaves(nnx.state(enc2))):
        np.testing.assert_array_equal(a, b)
    assert [h["loss"] for h in hist1] == [h["loss"] for h in hist2]
    first, last = np.mean([h["loss"] for h in hist1[:3]]), np.mean([h["loss"] for h in hist1[-3:]])
    assert last < first, (first, last)
