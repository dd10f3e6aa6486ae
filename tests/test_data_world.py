"""The procedural face world: determinism, vocabularies, caption <-> attribute consistency, visible attributes."""

import hashlib
import itertools
import subprocess
import sys

import numpy as np
import pytest

from metalora.data import world


def _digest(world_seed, identity, image_id, resolution):
    return hashlib.sha256(world.render_sample(world_seed, identity, image_id, resolution).image.tobytes()).hexdigest()


def test_renderer_is_deterministic_across_processes():
    cases = [(0, 3, 1, 32), (7, 123, 4, 64), (1, 0, 0, 128)]
    code = (
        "import hashlib, sys; from metalora.data import world\n"
        f"for c in {cases!r}:\n"
        "    print(hashlib.sha256(world.render_sample(*c).image.tobytes()).hexdigest())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [_digest(*c) for c in cases]


def test_sample_is_pure_function_of_seed_identity_image():
    a = world.render_sample(0, 5, 2)
    b = world.render_sample(0, 5, 2)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.traits, b.traits)
    assert a.attributes == b.attributes and a.caption == b.caption
    # Traits belong to the identity: every photo of it shares them; another identity or world differs.
    np.testing.assert_array_equal(world.render_sample(0, 5, 9).traits, a.traits)
    assert not np.array_equal(world.identity_traits(0, 6), a.traits)
    assert not np.array_equal(world.identity_traits(1, 5), a.traits)


@pytest.mark.parametrize("resolution", world.RESOLUTIONS)
def test_resolutions(resolution):
    s = world.render_sample(0, 1, 1, resolution)
    assert s.image.shape == (resolution, resolution, 3) and s.image.dtype == np.uint8
    assert s.image.std() > 10  # not a blank canvas


def test_traits_shape_and_ranges():
    assert world.NUM_TRAITS >= 10
    t = np.stack([world.identity_traits(0, i) for i in range(200)])
    assert t.shape == (200, world.NUM_TRAITS) and t.dtype == np.float32
    continuous = [i for i, n in enumerate(world.TRAIT_NAMES) if n not in ("hair_style", "mole_count")]
    assert len(continuous) >= 10
    assert t[:, continuous].min() >= 0 and t[:, continuous].max() <= 1
    hs = t[:, world.TRAIT_NAMES.index("hair_style")]
    assert set(np.unique(hs).astype(int)) == set(range(len(world.HAIR_STYLES)))
    # Continuous traits really vary across identities.
    assert (t[:, continuous].std(axis=0) > 0.15).all()


def test_identities_look_different():
    """Same attributes and jitter, different identity: images differ a lot; same identity: identical."""
    attrs, jitter = world.image_condition(0, 0, 0)
    imgs = [world.render_face(world.identity_traits(0, i), attrs, jitter, 32).astype(float) for i in range(20)]
    dists = [np.abs(a - b).mean() for a, b in itertools.combinations(imgs, 2)]
    assert min(dists) > 2.0, min(dists)


def test_attributes_sampled_over_all_classes():
    seen = {n: set() for n in world.ATTRIBUTE_NAMES}
    for i, j in itertools.product(range(20), range(10)):
        attrs, jitter = world.image_condition(0, i, j)
        for n, v in attrs.items():
            seen[n].add(v)
        assert jitter.shape == (world.NUM_JITTER,)
    for n, classes in world.ATTRIBUTE_CLASSES.items():
        assert seen[n] == set(classes), n


def test_caption_attribute_consistency():
    for i, j in itertools.product(range(10), range(10)):
        s = world.render_sample(0, i, j)
        assert s.caption == world.make_caption(s.attributes)
        parsed = world.parse_caption(s.caption)
        expected = {k: v for k, v in s.attributes.items() if v != "none"}
        assert parsed == expected, (s.caption, s.attributes)
        assert set(s.caption.replace(",", "").split()) <= set(world.CAPTION_VOCABULARY)
        assert world.attributes_from_ids(world.attribute_ids(s.attributes)) == s.attributes


def test_caption_with_identifier_and_partial_attributes():
    assert world.make_caption({}, identifier="sks") == "a photo of sks person"
    c = world.make_caption({"glasses": "red", "background": "orange"}, identifier="zwx", class_word="man")
    assert c == "a photo of zwx man wearing red glasses, on an orange background"
    assert world.parse_caption(c) == {"glasses": "red", "background": "orange"}


def test_attribute_ids_reject_bad_values():
    attrs, _ = world.image_condition(0, 0, 0)
    with pytest.raises(ValueError, match=r"'glasses'.*'mauve'"):
        world.attribute_ids({**attrs, "glasses": "mauve"})
    with pytest.raises(KeyError, match="hat"):
        world.attribute_ids({k: v for k, v in attrs.items() if k != "hat"})


def test_flip_swaps_left_right_only():
    a = {
        "pose": "left",
        "lighting": "right",
        "expression": "smiling",
        "glasses": "none",
        "hat": "red",
        "background": "blue",
    }
    f = world.flip_attributes(a)
    assert f == {**a, "pose": "right", "lighting": "left"}
    assert world.flip_attributes(f) == a


@pytest.mark.parametrize(
    ("name", "a", "b"),
    [
        ("glasses", "none", "red"),
        ("hat", "none", "blue"),
        ("background", "white", "green"),
        ("expression", "neutral", "surprised"),
        ("pose", "left", "right"),
        ("lighting", "left", "right"),
    ],
)
def test_attributes_are_visible_at_32px(name, a, b):
    traits = world.identity_traits(0, 3)
    base, jitter = world.image_condition(0, 3, 0)
    ia = world.render_face(traits, {**base, name: a}, jitter, 32).astype(float)
    ib = world.render_face(traits, {**base, name: b}, jitter, 32).astype(float)
    changed = (np.abs(ia - ib).max(axis=-1) > 30).sum()
    assert changed >= 4, f"{name}: {a} vs {b} changes only {changed} pixels"


def test_negative_ids_rejected():
    with pytest.raises(ValueError, match="non-negative"):
        world.identity_traits(0, -1)


def test_preview_writes_contact_sheet(tmp_path):
    from PIL import Image

    from metalora.data import preview

    out = preview.main(["--out", str(tmp_path / "sheet.png"), "--identities", "3", "--images", "4", "--zoom", "1"])
    im = Image.open(out)
    assert im.size == (4 * 34 + 2, 3 * 34 + 2)  # 32 px tiles with 2 px gaps
    grid, _ = preview.synthetic_grid(0, [0, 1, 2], 4, 32)
    np.testing.assert_array_equal(np.asarray(im)[2:34, 2:34], grid[0, 0])
