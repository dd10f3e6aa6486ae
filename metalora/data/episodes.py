"""Few-shot episodes for meta-training: B identities x k support shots (+ q query shots) per step.

An episode is a pure function of (seed, step): the step's generator is seeded from ``SeedSequence([seed, step])``,
so resuming at step n reproduces exactly the batches an uninterrupted run would have seen. Loading goes through a
grain ``MapDataset`` over step numbers (random access into a tfds data source underneath); the iterator's state is
a small JSON-able dict (the next step plus what must match on restore).

Batches are numpy dicts: ``images`` float32 in [-1, 1], NHWC per shot, shape (B, k, H, W, 3); ``identity`` (B,);
``captions`` (B, k) str; ``attributes`` (B, k, A) int64 class ids in ``world.ATTRIBUTE_NAMES`` order (-1 where a
record has no such label); ``flipped`` (B, k) bool; ``records`` (B, k) record indices. With ``query_shots > 0``
the same keys prefixed ``query_`` hold q further photos of the same identities (for MAML-style outer losses).
With ``counterfactual`` attribute names (synthetic records only), every shot also has ``pair_images``,
``pair_captions`` and ``pair_attributes``: the same photo re-rendered with one of those attributes changed.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence

import grain
import numpy as np

from metalora.data import builders, world

EPISODE_STREAM = 3  # SeedSequence stream id, distinct from the world's and the protocol's


@dataclasses.dataclass(frozen=True)
class Augment:
    """Random crop after reflect-padding by ``pad_fraction`` of the side, and horizontal flips.

    A flip mirrors the photo, so left/right pose and lighting labels (and the captions built from them) are
    swapped for synthetic records; free-text captions of real photos are kept as they are.
    """

    pad_fraction: float = 0.0625
    flip_prob: float = 0.5

    def __post_init__(self):
        if not 0.0 <= self.pad_fraction < 0.5:
            raise ValueError(f"Augment.pad_fraction must be in [0, 0.5), got {self.pad_fraction}")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"Augment.flip_prob must be in [0, 1], got {self.flip_prob}")


NO_AUGMENT = Augment(pad_fraction=0.0, flip_prob=0.0)


def random_crop(image: np.ndarray, pad: int, rng: np.random.Generator) -> np.ndarray:
    """Reflect-pad by ``pad`` pixels and crop a random window of the original size."""
    if pad == 0:
        return image
    h, w = image.shape[:2]
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    y, x = rng.integers(0, 2 * pad + 1, size=2)
    return padded[y : y + h, x : x + w]


def counterfactual_attributes(attributes: Mapping[str, str], names: Sequence[str],
                              rng: np.random.Generator) -> dict[str, str]:
    """``attributes`` with one of ``names`` (drawn uniformly) set to another of its classes (drawn uniformly)."""
    name = names[rng.integers(len(names))]
    others = [c for c in world.ATTRIBUTE_CLASSES[name] if c != attributes[name]]
    return {**attributes, name: others[rng.integers(len(others))]}


def to_unit_range(image: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return image.astype(np.float32) / 127.5 - 1.0


def attribute_vector(attributes: Mapping[str, str]) -> np.ndarray:
    """Class ids in ATTRIBUTE_NAMES order, -1 where the attribute is absent or not one of the world's classes."""
    out = np.full(len(world.ATTRIBUTE_NAMES), -1, np.int64)
    for i, name in enumerate(world.ATTRIBUTE_NAMES):
        value = attributes.get(name)
        if value in world.ATTRIBUTE_CLASSES[name]:
            out[i] = world.ATTRIBUTE_CLASSES[name].index(value)
    return out


class EpisodeSampler:
    """Episodes over one split. ``source``: a tfds data source (random access); ``index``: identity -> record
    indices (``builders.identity_index``). Identities with fewer than ``shots + query_shots`` photos are left out."""

    def __init__(
        self,
        source: Sequence[Mapping],
        index: Mapping[int, Sequence[int]],
        *,
        identities_per_step: int,
        shots: int,
        query_shots: int = 0,
        seed: int = 0,
        augment: Augment = Augment(),
        counterfactual: Sequence[str] = (),
    ):
        if identities_per_step < 1 or shots < 1 or query_shots < 0:
            raise ValueError(
                f"need identities_per_step >= 1, shots >= 1, query_shots >= 0; got "
                f"{identities_per_step}, {shots}, {query_shots}"
            )
        need = shots + query_shots
        self.identities = np.array(sorted(i for i, r in index.items() if len(r) >= need), np.int64)
        if len(self.identities) < identities_per_step:
            raise ValueError(
                f"only {len(self.identities)} identities have >= {need} photos (shots + query_shots); "
                f"identities_per_step={identities_per_step} needs more"
            )
        self.source = source
        self.index = {int(i): np.asarray(index[int(i)], np.int64) for i in self.identities}
        self.identities_per_step = identities_per_step
        self.shots = shots
        self.query_shots = query_shots
        self.seed = seed
        self.augment = augment
        unknown = set(counterfactual) - set(world.ATTRIBUTE_NAMES)
        if unknown:
            raise ValueError(f"counterfactual: unknown attributes {sorted(unknown)}; the world's are "
                             f"{list(world.ATTRIBUTE_NAMES)}")
        self.counterfactual = tuple(counterfactual)

    def fingerprint(self) -> str:
        """What a checkpointed state must agree with to be restored into this sampler."""
        fields = {
            "seed": self.seed,
            "identities_per_step": self.identities_per_step,
            "shots": self.shots,
            "query_shots": self.query_shots,
            "augment": dataclasses.asdict(self.augment),
            "num_identities": len(self.identities),
            "num_records": len(self.source),
        }
        if self.counterfactual:  # only when set, so states saved before the option existed still restore
            fields["counterfactual"] = list(self.counterfactual)
        return json.dumps(fields, sort_keys=True)

    def _shot(self, record: int, rng: np.random.Generator) -> dict:
        ex = self.source[record]
        image = np.asarray(ex["image"], np.uint8)
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=-1)
        # Synthetic records carry ground-truth labels; free-text captions of real photos have none.
        attrs = world.attributes_from_ids(ex["attributes"]) if "attributes" in ex else None
        pair_attrs = None
        if self.counterfactual:
            # The same person, pose jitter and framing with one attribute changed: rendered before the crop and
            # flip, stacked on the channels, so both images get the same augmentation.
            if "traits" not in ex:
                raise ValueError("counterfactual pairs need synthetic records (traits and jitter to re-render); "
                                 f"record {record} has none")
            pair_attrs = counterfactual_attributes(attrs, self.counterfactual, rng)
            pair = world.render_face(np.asarray(ex["traits"]), pair_attrs, np.asarray(ex["jitter"]), image.shape[0])
            image = np.concatenate([image, pair], axis=-1)
        pad = round(image.shape[0] * self.augment.pad_fraction)
        image = random_crop(image, pad, rng)
        flip = bool(rng.random() < self.augment.flip_prob)
        caption = builders.decode_text(ex["caption"])
        if attrs is not None:  # ground truth, so mirror the labels with the pixels
            if flip:
                attrs = world.flip_attributes(attrs)
                caption = world.make_caption(attrs)
            attr_ids = world.attribute_ids(attrs)
        else:
            attr_ids = attribute_vector(json.loads(builders.decode_text(ex.get("attributes_json", b"{}"))))
        if flip:
            image = image[:, ::-1]
        shot = {
            "images": to_unit_range(image[..., :3]),
            "captions": caption,
            "attributes": attr_ids,
            "flipped": flip,
            "records": record,
        }
        if pair_attrs is not None:
            pair_attrs = world.flip_attributes(pair_attrs) if flip else pair_attrs
            shot.update(pair_images=to_unit_range(image[..., 3:]), pair_captions=world.make_caption(pair_attrs),
                        pair_attributes=world.attribute_ids(pair_attrs))
        return shot

    def episode(self, step: int) -> dict[str, np.ndarray]:
        """The batch of training step ``step`` (pure in (seed, step))."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        rng = np.random.default_rng(np.random.SeedSequence([EPISODE_STREAM, self.seed, int(step)]))
        ids = rng.choice(self.identities, self.identities_per_step, replace=False)
        support, query = [], []
        for i in ids:
            recs = rng.choice(self.index[int(i)], self.shots + self.query_shots, replace=False)
            shots = [self._shot(int(r), rng) for r in recs]
            support.append(shots[: self.shots])
            query.append(shots[self.shots :])
        batch = {"identity": ids.astype(np.int64), "step": np.int64(step)}
        batch.update(_stack(support, ""))
        if self.query_shots:
            batch.update(_stack(query, "query_"))
        return batch

    def dataset(self, num_steps: int = 2**40) -> grain.MapDataset:
        """Random-access dataset of episodes: element ``n`` is ``episode(n)``."""
        return grain.MapDataset.range(0, num_steps).map(self.episode)

    def iterator(self, state: Mapping | None = None, *, num_threads: int = 2, prefetch: int = 4) -> EpisodeIterator:
        """Iterator over steps 0, 1, ... (or from a saved ``state``), prefetching with ``num_threads`` threads."""
        return EpisodeIterator(self, state, num_threads=num_threads, prefetch=prefetch)


def _stack(shots: list[list[dict]], prefix: str) -> dict[str, np.ndarray]:
    return {prefix + key: np.array([[s[key] for s in row] for row in shots]) for key in shots[0][0]}


class EpisodeIterator:
    """Checkpointable iterator: ``get_state()`` is a small JSON-able dict; ``set_state`` resumes at its step."""

    def __init__(self, sampler: EpisodeSampler, state: Mapping | None = None, *, num_threads: int, prefetch: int):
        self._sampler = sampler
        self._options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
        self._it = iter(sampler.dataset().to_iter_dataset(self._options))
        if state is not None:
            self.set_state(state)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._it)

    def get_state(self) -> dict:
        return {"step": int(self._it.get_state()["next_index"]), "sampler": self._sampler.fingerprint()}

    def set_state(self, state: Mapping) -> None:
        if state.get("sampler") != self._sampler.fingerprint():
            raise ValueError(
                f"episode state was saved by a different sampler:\n saved: {state.get('sampler')}\n this:  "
                f"{self._sampler.fingerprint()}"
            )
        step = int(state["step"])
        if step < 0:
            raise ValueError(f"episode state has a negative step {step}")
        self._it = iter(self._sampler.dataset().to_iter_dataset(self._options))
        self._it.set_state({"next_index": step})


def make_sampler(
    builder,
    split: str,
    *,
    identities_per_step: int,
    shots: int,
    query_shots: int = 0,
    seed: int = 0,
    augment: Augment = Augment(),
    max_identities: int = 0,
    counterfactual: Sequence[str] = (),
) -> EpisodeSampler:
    """Sampler over a prepared (or preparable) tfds builder's split; the identity index is read without decoding
    images. ``max_identities > 0`` keeps only the first that many identities (by id): the number-of-identities
    ablation of meta-training."""
    index = builders.identity_index(builders.data_source(builder, split, decode_images=False))
    if max_identities > 0:
        if max_identities < identities_per_step:
            raise ValueError(f"max_identities={max_identities} < identities_per_step={identities_per_step}")
        index = {k: index[k] for k in sorted(index)[:max_identities]}
    return EpisodeSampler(
        builders.data_source(builder, split),
        index,
        identities_per_step=identities_per_step,
        shots=shots,
        query_shots=query_shots,
        seed=seed,
        augment=augment,
        counterfactual=counterfactual,
    )
