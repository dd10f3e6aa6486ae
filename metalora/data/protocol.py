"""Meta-PHD-style evaluation protocol: identity splits, reference shots, held-out photos, evaluation prompts.

For every test identity: ``k`` reference photos (what the personalisation method sees), a disjoint set of
held-out photos of the same identity (the targets of R-FaceSim), and prompts that ask for attributes the
references do not show (another background, glasses when the references have none, another pose...), each with
the attributes it asks for, so attribute probes can score prompt alignment.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence

import numpy as np

from metalora.data import world

LFW_TEST_IDENTITIES = 50
PROTOCOL_STREAM = 2  # SeedSequence stream id, distinct from the world's trait/image streams


@dataclasses.dataclass(frozen=True)
class EvalPrompt:
    text: str
    attributes: dict[str, str]  # what the prompt asks for (empty: class word only)
    novel: tuple[str, ...]  # the attribute names whose requested value no reference shows


@dataclasses.dataclass(frozen=True)
class TestIdentity:
    identity: int
    references: tuple[int, ...]  # record indices of the k reference shots
    heldout: tuple[int, ...]  # record indices of other photos of the same identity (disjoint from references)
    prompts: tuple[EvalPrompt, ...]


def split_names(names: Sequence[str], *, n_test: int, seed: int = 0) -> dict[str, tuple[str, ...]]:
    """Deterministic identity split {"meta_train", "test"}: a seeded permutation of the sorted names, so the split
    depends only on the set of names and the seed."""
    names = sorted(set(names))
    if not 0 < n_test < len(names):
        raise ValueError(f"n_test must be in [1, {len(names) - 1}] for {len(names)} identities, got {n_test}")
    perm = np.random.default_rng(np.random.SeedSequence([PROTOCOL_STREAM, seed, len(names)])).permutation(len(names))
    test = tuple(sorted(names[i] for i in perm[:n_test]))
    train = tuple(sorted(names[i] for i in perm[n_test:]))
    return {"meta_train": train, "test": test}


def choose_references(
    records: Sequence[int], *, identity: int, k: int = 1, seed: int = 0, max_heldout: int | None = None
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(references, heldout): a seeded choice of ``k`` records and the disjoint rest (optionally capped)."""
    records = list(records)
    if len(records) < k + 1:
        raise ValueError(f"identity {identity} has {len(records)} photos; need k={k} references + >=1 held out")
    perm = np.random.default_rng(np.random.SeedSequence([PROTOCOL_STREAM, seed, identity])).permutation(len(records))
    refs = tuple(int(records[i]) for i in perm[:k])
    rest = tuple(int(records[i]) for i in sorted(perm[k:]))
    return refs, rest[:max_heldout] if max_heldout is not None else rest


def evaluation_prompts(
    reference_attributes: Sequence[Mapping[str, str]],
    *,
    identity: int = 0,
    seed: int = 0,
    identifier: str = world.DEFAULT_IDENTIFIER,
    class_word: str = world.CLASS_WORD,
) -> tuple[EvalPrompt, ...]:
    """Prompts asking for what the references do not show, one novel attribute each, plus one combining a novel
    background with a novel accessory. Requested values are drawn (seeded) among the unseen classes."""
    rng = np.random.default_rng(np.random.SeedSequence([PROTOCOL_STREAM, seed, identity, 1]))
    seen = {name: {a[name] for a in reference_attributes if name in a} for name in world.ATTRIBUTE_NAMES}

    def unseen(name: str) -> str | None:
        classes = [c for c in world.ATTRIBUTE_CLASSES[name] if c not in seen[name] and c != "none"]
        return classes[rng.integers(len(classes))] if classes else None

    def prompt(attrs: dict[str, str]) -> EvalPrompt:
        text = world.make_caption(attrs, identifier=identifier, class_word=class_word)
        return EvalPrompt(text, attrs, tuple(attrs))

    out = []
    for name in ("background", "glasses", "hat", "pose", "expression"):
        if (value := unseen(name)) is not None:
            out.append(prompt({name: value}))
    bg, acc = unseen("background"), unseen("glasses")
    if bg is not None and acc is not None:
        out.append(prompt({"glasses": acc, "background": bg}))
    return tuple(out)


def class_word_prompts(
    *, identifier: str = world.DEFAULT_IDENTIFIER, class_word: str = world.CLASS_WORD
) -> tuple[EvalPrompt, ...]:
    """The real-photo track has no attribute labels: prompts use the identifier and the class word only."""
    return (EvalPrompt(world.make_caption({}, identifier=identifier, class_word=class_word), {}, ()),)


def make_protocol(
    index: Mapping[int, Sequence[int]],
    reference_attributes: Mapping[int, dict[str, str]] | None = None,
    *,
    k: int = 1,
    seed: int = 0,
    max_heldout: int | None = None,
    max_shots: int | None = None,
    identifier: str = world.DEFAULT_IDENTIFIER,
    class_word: str = world.CLASS_WORD,
) -> tuple[TestIdentity, ...]:
    """Protocol of a test split from its identity index (identity -> record indices, see ``builders.identity_index``).

    ``reference_attributes`` maps a record index to its attributes (synthetic data); without it prompts use the
    class word only (real photos).

    ``max_shots`` (>= ``k``) holds out photos and chooses prompts as if ``max_shots`` references were taken, and
    keeps the first ``k`` of them: protocols with any ``k <= max_shots`` then score the same held-out photos and
    prompts, so a shots sweep can pair its cells per identity. (By default, ``max_shots = k``, a larger ``k`` holds
    out fewer photos and rules out more prompt attributes.)
    """
    if max_shots is not None and max_shots < k:
        raise ValueError(f"max_shots ({max_shots}) must be at least the number of shots k ({k})")
    out = []
    for identity in sorted(index):
        # choose_references takes its references as a prefix of one seeded order, so the first k of max_shots
        # references are exactly the k references that a protocol without max_shots would take.
        basis, heldout = choose_references(index[identity], identity=identity, k=max_shots or k, seed=seed,
                                           max_heldout=max_heldout)
        refs = basis[:k]
        if reference_attributes is None:
            prompts = class_word_prompts(identifier=identifier, class_word=class_word)
        else:
            prompts = evaluation_prompts(
                [reference_attributes[r] for r in basis],
                identity=identity,
                seed=seed,
                identifier=identifier,
                class_word=class_word,
            )
        out.append(TestIdentity(identity, refs, heldout, prompts))
    return tuple(out)


def protocol_from_source(source, *, k: int = 1, seed: int = 0, with_attributes: bool = True, **kwargs):
    """Protocol of a tfds data source of a test split (pass a ``decode_images=False`` source: reads every record)."""
    from metalora.data import builders  # builders imports this module; import lazily

    index = builders.identity_index(source)
    attrs = None
    if with_attributes:
        attrs = {}
        for records in index.values():
            for r in records:
                attrs[int(r)] = json.loads(builders.decode_text(source[int(r)]["attributes_json"]))
    return make_protocol(index, attrs, k=k, seed=seed, **kwargs)
