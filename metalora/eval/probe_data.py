"""Training/evaluation data for the probes: rendered world photos (cached as .npz), augmentation, verification pairs.

The probes are trained on the same identity splits as the ``synth_identities`` tfds builder (meta_train ids
[0, n_meta_train), then meta_val, then test; see ``metalora.data.builders.SynthConfig.identity_range``), rendered
straight from ``metalora.data.world.render_sample`` because that is as fast as decoding PNGs and needs no prepared
dataset. Rendered arrays are cached under the probes' cache folder; a cache is trusted only if re-rendering two of
its photos reproduces their pixels, so a renderer change never silently feeds stale images to the probes.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import multiprocessing
import os
import pathlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from metalora.data import world
from metalora.train.io import atomic_write_bytes

__all__ = [
    "ATTRIBUTE_FLIP",
    "SPLITS",
    "augment",
    "flip_attribute_ids",
    "identity_range",
    "load_or_render",
    "render_split",
    "to_unit_interval",
    "verification_pairs",
]

SPLITS = ("meta_train", "meta_val", "test")


def identity_range(split: str, *, n_meta_train: int, n_meta_val: int, n_test: int) -> range:
    """Identity ids of ``split``: contiguous and disjoint, in SPLITS order (as the tfds builder assigns them)."""
    counts = {"meta_train": n_meta_train, "meta_val": n_meta_val, "test": n_test}
    if split not in counts:
        raise KeyError(f"unknown split {split!r}; expected one of {SPLITS}")
    start = sum(counts[s] for s in SPLITS[: SPLITS.index(split)])
    return range(start, start + counts[split])


def _attribute_flip_permutations() -> dict[str, np.ndarray]:
    """For each attribute, class id -> class id of the horizontally mirrored photo (from ``world.flip_attributes``)."""
    out = {}
    for name, classes in world.ATTRIBUTE_CLASSES.items():
        out[name] = np.array([classes.index(world.flip_attributes({name: c})[name]) for c in classes], np.int32)
    return out


# (num_attributes, max_classes) table: row a maps class ids of attribute a under a horizontal flip.
ATTRIBUTE_FLIP: np.ndarray = np.stack(
    [
        np.pad(p, (0, max(map(len, world.ATTRIBUTE_CLASSES.values())) - len(p)))
        for p in _attribute_flip_permutations().values()
    ]
)


def flip_attribute_ids(ids: jax.Array, flipped: jax.Array) -> jax.Array:
    """Attribute ids (B, A) of photos after mirroring those with ``flipped`` (B,) set (pose/lighting swap sides)."""
    table = jnp.asarray(ATTRIBUTE_FLIP)
    mirrored = table[jnp.arange(ids.shape[1])[None, :], ids]
    return jnp.where(flipped[:, None], mirrored, ids)


def _render_identity(args: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Images (n, H, W, 3) and attribute ids (n, A) of one identity (module level so a process pool can pickle it)."""
    world_seed, identity, n_images, resolution = args
    samples = [world.render_sample(world_seed, identity, i, resolution) for i in range(n_images)]
    return np.stack([s.image for s in samples]), np.stack([world.attribute_ids(s.attributes) for s in samples])


def render_split(
    world_seed: int, identities: Sequence[int], images_per_identity: int, resolution: int, *, num_workers: int = 0
) -> dict[str, np.ndarray]:
    """Render photos 0..images_per_identity-1 of each identity.

    Returns ``images`` uint8 (N, H, W, 3), ``identity`` int32 (N,), ``image_id`` int32 (N,), ``attributes`` int32
    (N, len(ATTRIBUTE_NAMES)), identity-major. ``num_workers`` 0 = one process per CPU core for large requests.
    """
    jobs = [(world_seed, int(i), images_per_identity, resolution) for i in identities]
    workers = num_workers or (os.cpu_count() or 1)
    if workers <= 1 or len(jobs) * images_per_identity < 1000:
        parts = [_render_identity(j) for j in jobs]
    else:
        # spawn, not fork: JAX may already have started threads, which fork would copy in a broken state.
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            parts = list(pool.map(_render_identity, jobs, chunksize=max(1, len(jobs) // (8 * workers))))
    return {
        "images": np.concatenate([p[0] for p in parts])
        if parts
        else np.zeros((0, resolution, resolution, 3), np.uint8),
        "identity": np.repeat(np.asarray(identities, np.int32), images_per_identity),
        "image_id": np.tile(np.arange(images_per_identity, dtype=np.int32), len(jobs)),
        "attributes": (
            np.concatenate([p[1] for p in parts]).astype(np.int32)
            if parts
            else np.zeros((0, len(world.ATTRIBUTE_NAMES)), np.int32)
        ),
    }


def _cache_name(world_seed: int, identities: Sequence[int], images_per_identity: int, resolution: int) -> str:
    ids = np.asarray(identities, np.int64)
    digest = hashlib.sha256(ids.tobytes()).hexdigest()[:12]
    return f"world{world_seed}_r{resolution}_n{len(ids)}x{images_per_identity}_{digest}.npz"


def _cache_is_current(data: dict[str, np.ndarray], world_seed: int, resolution: int) -> bool:
    """Re-render the first and last cached photos; the cache is stale if the renderer now draws other pixels."""
    n = len(data["images"])
    for k in {0, n - 1}:
        s = world.render_sample(world_seed, int(data["identity"][k]), int(data["image_id"][k]), resolution)
        if not np.array_equal(s.image, data["images"][k]):
            return False
    return True


def load_or_render(
    cache_dir: str | os.PathLike | None,
    world_seed: int,
    identities: Sequence[int],
    images_per_identity: int,
    resolution: int,
    *,
    num_workers: int = 0,
) -> dict[str, np.ndarray]:
    """``render_split`` through an .npz cache in ``cache_dir`` (None: no cache). Writes are atomic."""
    if cache_dir is None:
        return render_split(world_seed, identities, images_per_identity, resolution, num_workers=num_workers)
    path = pathlib.Path(cache_dir).expanduser() / _cache_name(world_seed, identities, images_per_identity, resolution)
    if path.exists():
        with np.load(path, allow_pickle=False) as f:
            data = {k: f[k] for k in f.files}
        if len(data.get("images", ())) and _cache_is_current(data, world_seed, resolution):
            return data
    data = render_split(world_seed, identities, images_per_identity, resolution, num_workers=num_workers)
    buf = io.BytesIO()
    np.savez(buf, **data)
    atomic_write_bytes(path, buf.getvalue())
    return data


def to_unit_interval(images) -> jax.Array:
    """uint8 [0, 255] -> float32 [0, 1]; float images pass through (they must already be in [0, 1])."""
    images = jnp.asarray(images)
    if images.dtype == jnp.uint8:
        return images.astype(jnp.float32) / 255.0
    return images.astype(jnp.float32)


def augment(
    key: jax.Array,
    images: jax.Array,
    *,
    pad: int,
    flip_prob: float,
    brightness: float = 0.0,
    channel_gain: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
    """Random crop (reflect-pad by ``pad`` px, crop back), horizontal flip and mild colour jitter, per image.

    ``images``: float (B, H, W, C) in [0, 1]. Colour jitter multiplies by ``U(1±brightness)`` per image and by
    ``U(1±channel_gain)`` per channel, then clips; keep both small, since skin/hair colour is part of identity and
    background colour is an attribute. Returns (augmented images, flipped (B,) bool) so labels can follow the flip.
    """
    b, h, w, c = images.shape
    k_crop, k_flip, k_bright, k_gain = jax.random.split(key, 4)
    if pad > 0:
        padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
        offsets = jax.random.randint(k_crop, (b, 2), 0, 2 * pad + 1)
        images = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, c)))(padded, offsets)
    flipped = jax.random.bernoulli(k_flip, flip_prob, (b,))
    images = jnp.where(flipped[:, None, None, None], images[:, :, ::-1], images)
    if brightness > 0 or channel_gain > 0:
        gain = jax.random.uniform(k_bright, (b, 1, 1, 1), minval=1 - brightness, maxval=1 + brightness)
        gain = gain * jax.random.uniform(k_gain, (b, 1, 1, c), minval=1 - channel_gain, maxval=1 + channel_gain)
        images = jnp.clip(images * gain, 0.0, 1.0)
    return images, flipped


def verification_pairs(identity: np.ndarray, seed: int, negatives_per_positive: float = 1.0) -> np.ndarray:
    """Index pairs (P, 2) and labels (P,) for face verification: every same-identity pair, plus a seeded uniform
    sample of distinct different-identity pairs (``negatives_per_positive`` times as many). Returns (pairs, labels).
    """
    identity = np.asarray(identity)
    i, j = np.triu_indices(len(identity), k=1)
    same = identity[i] == identity[j]
    pos = np.stack([i[same], j[same]], axis=1)
    neg_all = np.stack([i[~same], j[~same]], axis=1)
    n_neg = min(len(neg_all), round(negatives_per_positive * len(pos)))
    rng = np.random.default_rng(np.random.SeedSequence([seed, len(identity)]))
    neg = neg_all[np.sort(rng.choice(len(neg_all), n_neg, replace=False))]
    pairs = np.concatenate([pos, neg])
    labels = np.r_[np.ones(len(pos), bool), np.zeros(len(neg), bool)]
    return pairs, labels
