"""tfds builders without TensorFlow: round trips, split disjointness, folder builds, configs."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from metalora.data import builders, folders, protocol, world


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    return builders.prepare(builders.synth_builder("smoke", data_dir=tmp_path_factory.mktemp("tfds")))


def test_default_data_dir_outside_repo(monkeypatch, tmp_path):
    monkeypatch.delenv(builders.DATA_DIR_ENV, raising=False)
    assert builders.default_data_dir().parts[-3:] == (".cache", "metalora", "tfds")
    monkeypatch.setenv(builders.DATA_DIR_ENV, str(tmp_path))
    assert builders.default_data_dir() == tmp_path


def test_prepare_reads_splits_that_another_builder_generated(tmp_path):
    stale = builders.synth_builder("smoke", data_dir=tmp_path)  # created before the data exists, as in a 2nd process
    assert not stale.info.splits
    builders.prepare(builders.synth_builder("smoke", data_dir=tmp_path))
    assert len(builders.data_source(stale, "test", decode_images=False)) == len(
        builders.data_source(builders.synth_builder("smoke", data_dir=tmp_path), "test", decode_images=False))


_PREPARE_WHEN_TOLD = """
import pathlib, sys, time
from metalora.data import builders
data_dir, ready, go = sys.argv[1:]
pathlib.Path(ready).touch()
while not pathlib.Path(go).exists():
    time.sleep(0.01)
builder = builders.prepare(builders.synth_builder("smoke", data_dir=data_dir))
print(len(builders.data_source(builder, "meta_train", decode_images=False)))
"""


def test_concurrent_prepares_of_one_cache_both_succeed(tmp_path):
    # Two processes generate the same empty cache at the same moment (xdist workers on a fresh machine). Without
    # the lock in builders.prepare the second fails renaming tfds's temporary folder onto the finished one.
    go = tmp_path / "go"
    ready = [tmp_path / f"ready{i}" for i in range(2)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", _PREPARE_WHEN_TOLD, str(tmp_path / "tfds"), str(r), str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for r in ready]
    deadline = time.monotonic() + 120
    while not all(r.exists() for r in ready) and time.monotonic() < deadline:
        time.sleep(0.05)
    go.touch()
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    counts = {int(out.split()[-1]) for out, _ in outs}
    assert len(counts) == 1 and counts.pop() > 0


def test_default_config_sizes():
    cfg = builders.SynthIdentities.builder_configs["r32"]
    assert cfg.resolution == 32 and cfg.n_meta_train >= 1000 and cfg.n_test >= 50
    assert {c.resolution for c in builders.SynthIdentities.BUILDER_CONFIGS} >= {32, 64, 128}


def test_synth_round_trip(smoke):
    """Every stored record equals a fresh render of (world_seed, identity, image_id)."""
    cfg = smoke.builder_config
    for split in builders.SPLITS:
        src = builders.data_source(smoke, split)
        assert len(src) == len(cfg.identity_range(split)) * cfg.images_per_identity
        for i in range(len(src)):
            ex = src[i]
            s = world.render_sample(cfg.world_seed, int(ex["identity"]), int(ex["image_id"]), cfg.resolution)
            np.testing.assert_array_equal(ex["image"], s.image)
            np.testing.assert_array_equal(ex["traits"], s.traits)
            np.testing.assert_array_equal(ex["jitter"], s.jitter)
            np.testing.assert_array_equal(ex["attributes"], world.attribute_ids(s.attributes))
            attrs = json.loads(builders.decode_text(ex["attributes_json"]))
            assert attrs == s.attributes == world.attributes_from_ids(ex["attributes"])
            assert builders.decode_text(ex["caption"]) == s.caption == world.make_caption(attrs)


def test_synth_splits_disjoint_and_complete(smoke):
    cfg = smoke.builder_config
    ids = {}
    for split in builders.SPLITS:
        index = builders.identity_index(builders.data_source(smoke, split, decode_images=False))
        ids[split] = set(index)
        assert ids[split] == set(cfg.identity_range(split))
        for recs in index.values():
            assert len(recs) == cfg.images_per_identity
    assert not ids["meta_train"] & ids["meta_val"]
    assert not ids["meta_train"] & ids["test"]
    assert not ids["meta_val"] & ids["test"]


def test_undecoded_source_gives_png_bytes(smoke):
    ex = builders.data_source(smoke, "test", decode_images=False)[0]
    assert isinstance(ex["image"], bytes) and ex["image"].startswith(b"\x89PNG")


def test_unknown_split(smoke):
    with pytest.raises(KeyError, match="nope"):
        builders.data_source(smoke, "nope")


def _photo_root(tmp_path, n_identities=6, n_images=3):
    root = tmp_path / "people"
    rng = np.random.default_rng(0)
    for i in range(n_identities):
        d = root / f"person_{i:02d}"
        d.mkdir(parents=True)
        for j in range(n_images):
            Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(d / f"{j}.png")
    (root / "person_00" / "captions.txt").write_text("1.png\ta photo of a person with red glasses\n")
    (root / "person_00" / "attributes.json").write_text(json.dumps({"1.png": {"glasses": "red"}}))
    return root


def test_folder_builder_round_trip(tmp_path):
    root = _photo_root(tmp_path)
    cfg = builders.folder_config(root, resolution=16, n_test=2)
    b = builders.prepare(builders.folder_builder(cfg, data_dir=tmp_path / "tfds"))
    scan = folders.scan_identity_folders(root)
    names = [i.name for i in scan.identities]
    expected = protocol.split_names(names, n_test=2)
    seen = {}
    for split in builders.FOLDER_SPLITS:
        src = builders.data_source(b, split)
        seen[split] = set()
        for i in range(len(src)):
            ex = src[i]
            name = builders.decode_text(ex["identity_name"])
            image_name = builders.decode_text(ex["image_name"])
            assert names[int(ex["identity"])] == name
            seen[split].add(name)
            np.testing.assert_array_equal(ex["image"], folders.load_photo(root / name / image_name, 16))
            caption = builders.decode_text(ex["caption"])
            attrs = json.loads(builders.decode_text(ex["attributes_json"]))
            if (name, image_name) == ("person_00", "1.png"):
                assert caption == "a photo of a person with red glasses" and attrs == {"glasses": "red"}
            else:
                assert caption == "a photo of a person" and attrs == {}
        assert seen[split] == set(expected[split])
    assert not seen["meta_train"] & seen["test"]
    assert b.info.metadata["skipped"] == []


def test_folder_builder_strict_and_lenient(tmp_path):
    root = _photo_root(tmp_path)
    bad = root / "person_03" / "broken.jpg"
    bad.write_bytes(b"garbage")
    strict = builders.folder_builder(builders.folder_config(root, n_test=2), data_dir=tmp_path / "tfds")
    with pytest.raises(folders.DataError, match=r"broken\.jpg"):
        builders.prepare(strict)
    lenient = builders.folder_config(root, n_test=2, on_error="skip")
    assert lenient.name != strict.builder_config.name  # settings are part of the cache key
    b = builders.prepare(builders.folder_builder(lenient, data_dir=tmp_path / "tfds"))
    assert [s[0] for s in b.info.metadata["skipped"]] == [str(bad)]
    total = sum(len(builders.data_source(b, s)) for s in builders.FOLDER_SPLITS)
    assert total == 6 * 3


def test_folder_config_names():
    a = builders.folder_config("/x/lfw", resolution=32)
    assert a.name == builders.folder_config("/x/lfw", resolution=32).name
    assert a.name.startswith("lfw_r32_")
    assert a.name != builders.folder_config("/y/lfw", resolution=32).name
    assert a.name != builders.folder_config("/x/lfw", resolution=64).name


@pytest.mark.lfw
def test_lfw_split_is_deterministic_and_disjoint(lfw_root):
    names = [i.name for i in folders.scan_identity_folders(lfw_root, validate=False).identities]
    s = protocol.split_names(names, n_test=protocol.LFW_TEST_IDENTITIES)
    assert s == protocol.split_names(list(reversed(names)), n_test=protocol.LFW_TEST_IDENTITIES)
    assert len(s["test"]) == 50 and len(s["meta_train"]) == 290
    assert not set(s["test"]) & set(s["meta_train"])
    assert set(s["test"]) | set(s["meta_train"]) == set(names)


@pytest.mark.lfw
def test_lfw_builder(lfw_root, tmp_path):
    """The real-photo track builds from its folder: 340 identities, 290 meta-train / 50 test, every photo kept."""
    b = builders.prepare(builders.folder_builder(builders.folder_config(lfw_root, resolution=32), tmp_path))
    ids = {}
    for split in builders.FOLDER_SPLITS:
        ids[split] = set(builders.identity_index(builders.data_source(b, split, decode_images=False)))
    assert len(ids["meta_train"]) == 290 and len(ids["test"]) == 50
    assert not ids["meta_train"] & ids["test"]
    assert sum(b.info.splits[s].num_examples for s in builders.FOLDER_SPLITS) == 3634
    ex = builders.data_source(b, "test")[0]
    path = lfw_root / builders.decode_text(ex["identity_name"]) / builders.decode_text(ex["image_name"])
    np.testing.assert_array_equal(ex["image"], folders.load_photo(path, 32))
    assert builders.decode_text(ex["caption"]) == "a photo of a person"


def test_registered_name_reads_through_tfds_data_source(smoke):
    import pathlib

    import tensorflow_datasets as tfds

    root = pathlib.Path(smoke.data_dir).parents[2]  # <root>/synth_identities/smoke/1.0.0
    src = tfds.data_source("synth_identities/smoke", split="test", data_dir=root, download=False)
    mine = builders.data_source(smoke, "test")
    assert len(src) == len(mine)
    assert src[3]["caption"] == mine[3]["caption"] and int(src[3]["identity"]) == int(mine[3]["identity"])
