"""benchmarks/base_quality.py at smoke size: an untrained base, the shipped probes, four real test photos."""

import json

import numpy as np
import pytest

from benchmarks import base_quality
from metalora.data import world


def test_base_quality_smoke(tmp_path):
    out = base_quality.main(["--model", "random:smoke", "--n", "4", "--steps", "2", "--eta", "1",
                             "--variance-n", "300", "--out", str(tmp_path)])
    written = json.loads((tmp_path / "base_quality.json").read_text())
    assert written["eta"] == 1.0 and written["n"] == 4
    assert (tmp_path / "base_quality.png").exists()
    # The probe reads the real photos' prompted attributes (the ceiling); noise from an untrained base does not
    # reach it.
    real, samples = out["attribute_accuracy_real"], out["attribute_accuracy_samples"]
    assert set(real) == {"all", "background", "expression", "glasses", "hat", "lighting", "pose"}
    assert real["all"] >= 0.8 > samples["all"]
    gain = out["caption_gain"]["999"]
    assert gain["gain"] == pytest.approx(1 - gain["right"] / gain["shuffled"])
    assert all(np.isfinite(v) for v in gain.values())
    cos = out["mean_pairwise_identity_cosine"]
    assert all(-1.0 <= v <= 1.0 for v in cos.values())
    assert set(out["attribute_gain"]) == set(world.ATTRIBUTE_NAMES)
    assert all(np.isfinite(g) for row in out["attribute_gain"].values() for g in row.values())
    assert "| pose |" in out["table"]
    # on real training photos the background colour explains most pixel variance, the expression almost none
    share = out["attribute_variance_share"]
    assert share["background"] > 0.3 > share["hat"] > share["expression"]
    # within the head the background explains less, the hat more
    in_head = out["attribute_variance_share_in_head"]
    assert in_head["background"] < share["background"] and in_head["hat"] > share["hat"]


@pytest.mark.parametrize("name", world.ATTRIBUTE_NAMES)
def test_swap_attribute_changes_that_attribute_only(name):
    """Every class of every attribute swaps to another class, and the caption says so: only that attribute parses
    differently."""
    for value in world.ATTRIBUTE_CLASSES[name]:
        attributes = {n: world.ATTRIBUTE_CLASSES[n][0] for n in world.ATTRIBUTE_NAMES} | {name: value}
        swapped = base_quality.swap_attribute(attributes, name)
        assert swapped[name] != value and {k: v for k, v in swapped.items() if k != name} == {
            k: v for k, v in attributes.items() if k != name}
        before, after = (world.parse_caption(world.make_caption(a)) for a in (attributes, swapped))
        assert {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)} == {name}


def test_base_quality_rejects_more_photos_than_the_split_has(tmp_path):
    with pytest.raises(ValueError, match="asked for 100000 test photos"):
        base_quality.main(["--model", "random:smoke", "--n", "100000", "--out", str(tmp_path)])


def test_attribute_variance_share_is_the_bias_corrected_between_class_share():
    """Images = a class offset (±1 on every pixel for pose, 0 for the other attributes) + unit noise: the pose
    explains 1 / (1 + 1) of the variance, a random label nothing; the chance correction removes the label-noise
    share that plain between/total would report (~(K - 1)/N)."""
    rng = np.random.default_rng(0)
    n = 4000
    pose = rng.integers(0, 2, n)
    images = (2.0 * pose - 1.0)[:, None, None, None] + rng.normal(size=(n, 4, 4, 3))
    attributes = [{name: "x" for name in world.ATTRIBUTE_NAMES} | {"pose": ("left", "right")[p],
                                                                   "hat": str(rng.integers(0, 8))} for p in pose]
    share = base_quality.attribute_variance_share(images, attributes)
    assert share["pose"] == pytest.approx(0.5, abs=0.02)
    assert abs(share["hat"]) < 1e-3 and share["background"] == 0.0  # one class: nothing to explain


def test_attribute_variance_share_with_pixel_weights_counts_the_weighted_pixels_only():
    """The pose moves the left half of each image only (±1 over unit noise everywhere): over all pixels it explains
    (1/2 of the left half's variance) · (2/3 of the total, the left half's share) = 1/3; weighted by a left-half
    mask, 1/2."""
    rng = np.random.default_rng(1)
    n = 4000
    pose = rng.integers(0, 2, n)
    images = rng.normal(size=(n, 4, 4, 3))
    images[:, :, :2] += (2.0 * pose - 1.0)[:, None, None, None]
    attributes = [{name: "x" for name in world.ATTRIBUTE_NAMES} | {"pose": ("left", "right")[p]} for p in pose]
    left = np.zeros((n, 4, 4))
    left[:, :, :2] = 1.0
    assert base_quality.attribute_variance_share(images, attributes)["pose"] == pytest.approx(1 / 3, abs=0.02)
    weighted = base_quality.attribute_variance_share(images, attributes, left)
    assert weighted["pose"] == pytest.approx(0.5, abs=0.02)
    with pytest.raises(ValueError, match=r"pixel_weights have shape \(4000, 4\)"):
        base_quality.attribute_variance_share(images, attributes, left[:, 0])
