"""Meta-PHD-style protocol: splits, references vs held-out photos, prompts that ask for unseen attributes."""

import numpy as np
import pytest

from metalora.data import builders, protocol, world


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    return builders.prepare(builders.synth_builder("smoke", data_dir=tmp_path_factory.mktemp("tfds")))


def test_split_names():
    names = [f"id{i}" for i in range(30)]
    s = protocol.split_names(names, n_test=7, seed=1)
    assert len(s["test"]) == 7 and len(s["meta_train"]) == 23
    assert not set(s["test"]) & set(s["meta_train"])
    assert s == protocol.split_names(names[::-1], n_test=7, seed=1)  # depends on the set, not the order
    assert s != protocol.split_names(names, n_test=7, seed=2)
    with pytest.raises(ValueError, match="n_test"):
        protocol.split_names(names, n_test=30)


def test_references_and_heldout_disjoint():
    recs = list(range(100, 110))
    refs, held = protocol.choose_references(recs, identity=4, k=2, seed=0)
    assert len(refs) == 2 and len(held) == 8
    assert not set(refs) & set(held) and set(refs) | set(held) == set(recs)
    assert (refs, held) == protocol.choose_references(recs, identity=4, k=2, seed=0)
    assert len(protocol.choose_references(recs, identity=4, k=1, max_heldout=3)[1]) == 3
    with pytest.raises(ValueError, match="identity 4"):
        protocol.choose_references([1], identity=4, k=1)


def test_prompts_ask_for_unseen_attributes():
    rng = np.random.default_rng(0)
    for trial in range(50):
        refs = [world.image_condition(0, trial, j)[0] for j in range(rng.integers(1, 4))]
        prompts = protocol.evaluation_prompts(refs, identity=trial, identifier="sks")
        assert len(prompts) >= 4
        for p in prompts:
            assert p.text.startswith("a photo of sks person")
            assert world.parse_caption(p.text) == p.attributes
            for name in p.novel:
                assert p.attributes[name] not in {r[name] for r in refs}, (p, refs)
                assert p.attributes[name] != "none"
    # References without glasses -> a prompt asks for glasses.
    refs = [{**world.image_condition(0, 0, 0)[0], "glasses": "none"}]
    assert any("glasses" in p.attributes for p in protocol.evaluation_prompts(refs))


def test_class_word_prompts():
    (p,) = protocol.class_word_prompts(identifier="zwx", class_word="woman")
    assert p.text == "a photo of zwx woman" and p.attributes == {} and p.novel == ()


def test_protocol_on_synthetic_test_split(smoke):
    cfg = smoke.builder_config
    src = builders.data_source(smoke, "test", decode_images=False)
    index = builders.identity_index(src)
    prot = protocol.protocol_from_source(src, k=1, seed=0)
    assert [t.identity for t in prot] == sorted(cfg.identity_range("test"))
    train_ids = set(builders.identity_index(builders.data_source(smoke, "meta_train", decode_images=False)))
    for t in prot:
        assert t.identity not in train_ids
        assert len(t.references) == 1 and len(t.heldout) == cfg.images_per_identity - 1
        assert not set(t.references) & set(t.heldout)
        assert set(t.references) | set(t.heldout) == set(index[t.identity].tolist())
        for r in t.references + t.heldout:
            assert int(src[r]["identity"]) == t.identity
        ref_attrs = [world.attributes_from_ids(src[r]["attributes"]) for r in t.references]
        for p in t.prompts:
            for name in p.novel:
                assert p.attributes[name] not in {a[name] for a in ref_attrs}
    again = protocol.protocol_from_source(src, k=1, seed=0)
    assert again == prot


def test_protocol_without_attributes_uses_class_word():
    prot = protocol.make_protocol({0: [0, 1, 2], 5: [3, 4]}, None, k=1)
    assert all(t.prompts == protocol.class_word_prompts() for t in prot)


def test_max_shots_fixes_heldout_photos_and_prompts_across_k():
    """A shots sweep pairs its cells: with max_shots every k <= max_shots scores the same held-out photos and prompts,
    and its references are the first k of max_shots, i.e. the default protocol's k references."""
    rng = np.random.default_rng(3)
    index = {i: list(range(10 * i, 10 * i + 8)) for i in range(6)}
    attrs = {r: world.image_condition(0, int(rng.integers(1000)), r)[0] for recs in index.values() for r in recs}
    wide = protocol.make_protocol(index, attrs, k=4)
    by_k = {k: protocol.make_protocol(index, attrs, k=k, max_shots=4) for k in (1, 2, 4)}
    assert by_k[4] == wide  # max_shots == k is the default protocol
    for k, prot in by_k.items():
        default = protocol.make_protocol(index, attrs, k=k)
        for t, t_wide, t_default in zip(prot, wide, default, strict=True):
            assert t.references == t_wide.references[:k] == t_default.references
            assert t.heldout == t_wide.heldout and t.prompts == t_wide.prompts
            assert not set(t.references) & set(t.heldout)
    # without max_shots a larger k holds out fewer photos: the pairing above is what the option adds
    assert len(protocol.make_protocol(index, attrs, k=1)[0].heldout) == len(wide[0].heldout) + 3
    with pytest.raises(ValueError, match="max_shots"):
        protocol.make_protocol(index, attrs, k=2, max_shots=1)
    with pytest.raises(ValueError, match="need k=8"):  # 8 photos: max_shots references leave none to hold out
        protocol.make_protocol(index, attrs, k=1, max_shots=8)
