"""Episode sampler: shapes, determinism in (seed, step), checkpoint/resume, augmentation label consistency."""

import json

import numpy as np
import pytest
from PIL import Image

from metalora.data import builders, episodes, world


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    return builders.prepare(builders.synth_builder("smoke", data_dir=tmp_path_factory.mktemp("tfds")))


def _sampler(smoke, **kw):
    kw = {"identities_per_step": 4, "shots": 2, "query_shots": 1, "seed": 3, **kw}
    return episodes.make_sampler(smoke, "meta_train", **kw)


def _assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_batch_layout(smoke):
    s = _sampler(smoke)
    b = s.episode(0)
    r = smoke.builder_config.resolution
    assert b["images"].shape == (4, 2, r, r, 3) and b["images"].dtype == np.float32
    assert b["query_images"].shape == (4, 1, r, r, 3)
    assert -1.0 <= b["images"].min() and b["images"].max() <= 1.0
    assert b["identity"].shape == (4,) and len(set(b["identity"].tolist())) == 4
    assert b["captions"].shape == (4, 2) and b["attributes"].shape == (4, 2, len(world.ATTRIBUTE_NAMES))
    for i, ident in enumerate(b["identity"]):
        recs = np.concatenate([b["records"][i], b["query_records"][i]])
        assert len(set(recs.tolist())) == 3  # support and query shots are different photos
        assert set(recs.tolist()) <= set(s.index[int(ident)].tolist())  # ... of the same identity


def test_deterministic_in_seed_and_step(smoke):
    a, b = _sampler(smoke), _sampler(smoke)
    _assert_batches_equal(a.episode(7), b.episode(7))
    assert not np.array_equal(a.episode(7)["images"], a.episode(8)["images"])
    assert not np.array_equal(a.episode(7)["images"], _sampler(smoke, seed=4).episode(7)["images"])


def test_resume_sees_the_same_batches(smoke):
    straight = list(zip(range(10), _sampler(smoke).iterator()))
    it = _sampler(smoke).iterator()
    first = [next(it) for _ in range(5)]
    state = json.loads(json.dumps(it.get_state()))  # a checkpoint is plain JSON
    assert state["step"] == 5
    resumed_it = _sampler(smoke).iterator(state)
    resumed = [next(resumed_it) for _ in range(5)]
    for (step, want), got in zip(straight, first + resumed):
        assert int(got["step"]) == step
        _assert_batches_equal(want, got)
        _assert_batches_equal(want, _sampler(smoke).episode(step))  # iterator == pure episode(step)


def test_restore_into_other_sampler_fails(smoke):
    state = _sampler(smoke).iterator().get_state()
    with pytest.raises(ValueError, match="different sampler"):
        _sampler(smoke, seed=99).iterator(state)


def test_flip_mirrors_pixels_and_labels(smoke):
    plain = _sampler(smoke, augment=episodes.NO_AUGMENT).episode(2)
    flipped = _sampler(smoke, augment=episodes.Augment(pad_fraction=0.0, flip_prob=1.0)).episode(2)
    assert not plain["flipped"].any() and flipped["flipped"].all()
    # Same (seed, step) -> same identities and records; only the augmentation differs.
    np.testing.assert_array_equal(plain["records"], flipped["records"])
    np.testing.assert_array_equal(flipped["images"], plain["images"][:, :, :, ::-1])
    for i, j in np.ndindex(plain["captions"].shape):
        a = world.attributes_from_ids(plain["attributes"][i, j])
        fa = world.attributes_from_ids(flipped["attributes"][i, j])
        assert fa == world.flip_attributes(a)
        assert flipped["captions"][i, j] == world.make_caption(fa)
        assert plain["captions"][i, j] == world.make_caption(a)


def test_counterfactual_partners_change_one_attribute(smoke):
    names = ("pose", "glasses", "expression")
    s = _sampler(smoke, query_shots=0, counterfactual=names, augment=episodes.Augment(pad_fraction=0.1))
    b = s.episode(0)
    assert b["pair_images"].shape == b["images"].shape and b["pair_captions"].shape == b["captions"].shape
    allowed = {world.ATTRIBUTE_NAMES.index(n) for n in names}
    for i, j in np.ndindex(b["captions"].shape):
        changed = np.flatnonzero(b["attributes"][i, j] != b["pair_attributes"][i, j])
        assert len(changed) == 1 and int(changed[0]) in allowed
        pair = world.attributes_from_ids(b["pair_attributes"][i, j])
        assert b["pair_captions"][i, j] == world.make_caption(pair)
        # Same person, jitter, crop and flip: re-rendered without the change, the partner is the photo itself.
        ex = s.source[int(b["records"][i, j])]
        same = world.render_face(np.asarray(ex["traits"]), world.attributes_from_ids(ex["attributes"]),
                                 np.asarray(ex["jitter"]), b["images"].shape[2])
        np.testing.assert_array_equal(same, np.asarray(ex["image"]))
        assert 0 < np.mean(np.abs(b["pair_images"][i, j] - b["images"][i, j])) < 0.2
        # ... and cropped and flipped as the photo: the background in the top corners is the same pixels.
        for corner in (np.s_[:3, :3], np.s_[:3, -3:]):
            np.testing.assert_array_equal(b["pair_images"][i, j][corner], b["images"][i, j][corner])
    assert s.fingerprint() != _sampler(smoke, query_shots=0, augment=episodes.Augment(pad_fraction=0.1)).fingerprint()
    _assert_batches_equal(b, s.episode(0))  # still a pure function of (seed, step)
    with pytest.raises(ValueError, match="unknown attributes"):
        _sampler(smoke, counterfactual=("nose",))


def test_crop_keeps_shape_and_moves_content():
    img = np.arange(16 * 16 * 3, dtype=np.uint8).reshape(16, 16, 3)
    rng = np.random.default_rng(0)
    crops = [episodes.random_crop(img, 2, rng) for _ in range(20)]
    assert all(c.shape == img.shape for c in crops)
    assert any(not np.array_equal(c, img) for c in crops)
    assert episodes.random_crop(img, 0, rng) is img


def test_bad_arguments(smoke):
    with pytest.raises(ValueError, match="identities_per_step"):
        _sampler(smoke, identities_per_step=100)
    with pytest.raises(ValueError, match="shots"):
        _sampler(smoke, shots=5, query_shots=1)  # smoke identities have 5 photos
    with pytest.raises(ValueError, match="pad_fraction"):
        episodes.Augment(pad_fraction=0.7)


def test_folder_source_has_unknown_attributes(tmp_path):
    root = tmp_path / "people"
    rng = np.random.default_rng(0)
    for i in range(5):
        (root / f"p{i}").mkdir(parents=True)
        for j in range(3):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / f"p{i}" / f"{j}.png")
    b = builders.prepare(builders.folder_builder(builders.folder_config(root, resolution=16, n_test=1), tmp_path))
    s = episodes.make_sampler(b, "meta_train", identities_per_step=2, shots=3, augment=episodes.NO_AUGMENT)
    batch = s.episode(0)
    assert batch["images"].shape == (2, 3, 16, 16, 3)
    assert (batch["attributes"] == -1).all()
    assert (batch["captions"] == "a photo of a person").all()
