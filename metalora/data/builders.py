"""TFDS builders: ``synth_identities`` (the procedural world) and ``identity_folders`` (real photos).

They run without TensorFlow: images are handed to tfds already PNG-encoded, records are stored as
``array_record`` and read back with ``tfds.data_source`` / ``builder.as_data_source`` (random access; text comes
back as bytes). Never ``tfds.load`` / ``as_dataset`` -- those need TensorFlow.

Records are written in generation order (``disable_shuffling``): identity-major, then image. Readers should still
use :func:`identity_index`, which reads the order from the records instead of assuming it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import fcntl
import hashlib
import io
import json
import multiprocessing
import os
import pathlib

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from metalora.data import folders, protocol, world

DATA_DIR_ENV = "METALORA_TFDS"
SPLITS = ("meta_train", "meta_val", "test")


def default_data_dir() -> pathlib.Path:
    """``$METALORA_TFDS`` or ``~/.cache/metalora/tfds`` -- never inside the repository."""
    return pathlib.Path(os.environ.get(DATA_DIR_ENV, pathlib.Path.home() / ".cache" / "metalora" / "tfds")).expanduser()


def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------------------
# synth_identities
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False, kw_only=True)
class SynthConfig(tfds.core.BuilderConfig):
    """Resolution, world seed and identities per split. Identity ids are contiguous and disjoint across splits,
    in SPLITS order: meta_train gets [0, n_meta_train), meta_val the next n_meta_val, test the rest."""

    resolution: int = 32
    world_seed: int = 0
    n_meta_train: int = 1000
    n_meta_val: int = 100
    n_test: int = 50
    images_per_identity: int = 10
    num_workers: int = 0  # rendering processes; 0 = one per CPU core when the build is large enough

    def identity_range(self, split: str) -> range:
        counts = {"meta_train": self.n_meta_train, "meta_val": self.n_meta_val, "test": self.n_test}
        if split not in counts:
            raise KeyError(f"unknown split {split!r}; expected one of {SPLITS}")
        start = sum(counts[s] for s in SPLITS[: SPLITS.index(split)])
        return range(start, start + counts[split])


def _synth_configs() -> list[SynthConfig]:
    base = dict(n_meta_train=1000, n_meta_val=100, n_test=50, images_per_identity=10)
    cfgs = [
        SynthConfig(name=f"r{r}", resolution=r, description=f"{r} px, 1000/100/50 identities x 10 images", **base)
        for r in world.RESOLUTIONS
    ]
    cfgs.append(
        SynthConfig(
            name="smoke",
            resolution=32,
            n_meta_train=12,
            n_meta_val=4,
            n_test=6,
            images_per_identity=5,
            description="tiny config for tests and smoke runs: 12/4/6 identities x 5 images at 32 px",
        )
    )
    return cfgs


def _render_identity(args: tuple[int, int, int, int]) -> list[tuple[str, dict]]:
    """All examples of one identity (module-level so a process pool can pickle it)."""
    world_seed, identity, n_images, resolution = args
    out = []
    for image_id in range(n_images):
        s = world.render_sample(world_seed, identity, image_id, resolution)
        out.append((f"{identity:07d}_{image_id:04d}", synth_example(s)))
    return out


def synth_example(s: world.FaceSample) -> dict:
    """The tfds feature dict of one rendered photo."""
    return {
        "image": encode_png(s.image),
        "identity": s.identity,
        "image_id": s.image_id,
        "traits": s.traits,
        "attributes": world.attribute_ids(s.attributes),
        "attributes_json": json.dumps(s.attributes, sort_keys=True),
        "jitter": s.jitter,
        "caption": s.caption,
    }


class _LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of our builders. They download nothing, so they need no checksums file next to their code; tfds only
    uses ``code_path`` to find that file, and computing it for a package module imports ``importlib_resources``,
    which is not a dependency of this project."""

    code_path = None


class SynthIdentities(_LocalBuilder):
    """Stylised faces of many identities with ground-truth traits, attributes and captions."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}  # noqa: RUF012 -- tfds reads this class attribute
    BUILDER_CONFIGS = _synth_configs()
    DEFAULT_CONFIG_NAME = "r32"

    def _info(self) -> tfds.core.DatasetInfo:
        r = self.builder_config.resolution
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            disable_shuffling=True,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(r, r, 3), encoding_format="png"),
                    "identity": tfds.features.Scalar(np.int64),
                    "image_id": tfds.features.Scalar(np.int64),
                    "traits": tfds.features.Tensor(shape=(world.NUM_TRAITS,), dtype=np.float32),
                    "attributes": tfds.features.Tensor(shape=(len(world.ATTRIBUTE_NAMES),), dtype=np.int64),
                    "attributes_json": tfds.features.Text(),
                    "jitter": tfds.features.Tensor(shape=(world.NUM_JITTER,), dtype=np.float32),
                    "caption": tfds.features.Text(),
                }
            ),
            metadata=tfds.core.MetadataDict(
                world_seed=self.builder_config.world_seed,
                trait_names=list(world.TRAIT_NAMES),
                attribute_classes={k: list(v) for k, v in world.ATTRIBUTE_CLASSES.items()},
                jitter_names=list(world.JITTER_NAMES),
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split: str):
        cfg = self.builder_config
        jobs = [(cfg.world_seed, i, cfg.images_per_identity, cfg.resolution) for i in cfg.identity_range(split)]
        workers = cfg.num_workers or (os.cpu_count() or 1)
        if workers <= 1 or len(jobs) * cfg.images_per_identity < 2000:
            for job in jobs:
                yield from _render_identity(job)
            return
        # spawn, not fork: the caller may have started JAX threads, which fork would copy in a broken state.
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            for examples in pool.map(_render_identity, jobs, chunksize=16):
                yield from examples


# --------------------------------------------------------------------------------------------------------------
# identity_folders
# --------------------------------------------------------------------------------------------------------------

FOLDER_SPLITS = ("meta_train", "test")


@dataclasses.dataclass(eq=False, kw_only=True)
class FolderConfig(tfds.core.BuilderConfig):
    """Real photos under ``root``. Build one with :func:`folder_config`, which names it after its content so two
    roots or resolutions never share a cache entry."""

    root: str = ""
    resolution: int = 32
    n_test: int = protocol.LFW_TEST_IDENTITIES
    split_seed: int = 0
    on_error: str = "raise"


def folder_config(
    root: pathlib.Path | str | None = None,
    *,
    resolution: int = 32,
    n_test: int = protocol.LFW_TEST_IDENTITIES,
    split_seed: int = 0,
    on_error: str = "raise",
) -> FolderConfig:
    """Config for ``root`` (default: the LFW track). Its name is ``<folder>_r<res>_<sha256 of the settings>``."""
    root = pathlib.Path(root).expanduser().resolve() if root is not None else folders.default_lfw_root()
    key = json.dumps([str(root), resolution, n_test, split_seed, on_error]).encode()
    label = "".join(c if c.isalnum() else "_" for c in root.name.lower()) or "root"
    name = f"{label}_r{resolution}_{hashlib.sha256(key).hexdigest()[:10]}"
    return FolderConfig(
        name=name,
        description=f"identity folders under {root} at {resolution} px",
        root=str(root),
        resolution=resolution,
        n_test=n_test,
        split_seed=split_seed,
        on_error=on_error,
    )


class IdentityFolders(_LocalBuilder):
    """Real photos, one folder per identity, split by identity into meta_train / test."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}  # noqa: RUF012

    def _info(self) -> tfds.core.DatasetInfo:
        r = self.builder_config.resolution
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            disable_shuffling=True,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(r, r, 3), encoding_format="png"),
                    "identity": tfds.features.Scalar(np.int64),
                    "identity_name": tfds.features.Text(),
                    "image_name": tfds.features.Text(),
                    "caption": tfds.features.Text(),
                    "attributes_json": tfds.features.Text(),
                }
            ),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        cfg = self.builder_config
        if not cfg.root:
            raise ValueError("identity_folders needs a FolderConfig with a root; build one with folder_config(root)")
        scan = folders.scan_identity_folders(cfg.root, on_error=cfg.on_error)
        names = [ident.name for ident in scan.identities]
        splits = protocol.split_names(names, n_test=cfg.n_test, seed=cfg.split_seed)
        # Kept in the dataset's metadata (metadata.json), so a lenient build says what it left out.
        self.info.metadata["root"] = cfg.root
        self.info.metadata["skipped"] = [list(s) for s in scan.report.skipped]
        self.info.metadata["identity_names"] = names
        by_name = {ident.name: (i, ident) for i, ident in enumerate(scan.identities)}
        return {split: self._generate_examples([by_name[n] for n in sorted(splits[split])]) for split in FOLDER_SPLITS}

    def _generate_examples(self, identities):
        cfg = self.builder_config
        default_caption = world.make_caption({})
        for identity, ident in identities:
            for path in ident.images:
                image = folders.load_photo(path, cfg.resolution)
                caption = (ident.captions or {}).get(path.name, default_caption)
                attributes = (ident.attributes or {}).get(path.name, {})
                yield (
                    f"{identity:07d}_{path.name}",
                    {
                        "image": encode_png(image),
                        "identity": identity,
                        "identity_name": ident.name,
                        "image_name": path.name,
                        "caption": caption,
                        "attributes_json": json.dumps(attributes, sort_keys=True),
                    },
                )


# --------------------------------------------------------------------------------------------------------------
# Building and reading
# --------------------------------------------------------------------------------------------------------------


def synth_builder(config: str | SynthConfig = "r32", data_dir: pathlib.Path | str | None = None) -> SynthIdentities:
    return SynthIdentities(config=config, data_dir=str(data_dir or default_data_dir()), file_format="array_record")


def folder_builder(config: FolderConfig, data_dir: pathlib.Path | str | None = None) -> IdentityFolders:
    return IdentityFolders(config=config, data_dir=str(data_dir or default_data_dir()), file_format="array_record")


def track_builder(data, *, resolution: int) -> tfds.core.DatasetBuilder:
    """The builder of a job's data track, from its ``config.data`` section (any object with the attributes
    ``source`` — ``"synth"`` (procedural world) or ``"folders"`` (real photos, default LFW) — ``synth_config``,
    ``folder_root`` and ``data_dir``; empty strings mean the defaults).

    Every job names its data with these fields, so they share one resolution check.
    """
    data_dir = data.data_dir or None
    if data.source == "synth":
        builder = synth_builder(data.synth_config, data_dir=data_dir)
        if builder.builder_config.resolution != resolution:
            raise ValueError(f"config.data.synth_config={data.synth_config!r} renders "
                             f"{builder.builder_config.resolution} px but the model draws {resolution} px")
        return builder
    if data.source == "folders":
        root = data.folder_root or folders.default_lfw_root()
        return folder_builder(folder_config(root, resolution=resolution), data_dir=data_dir)
    raise ValueError(f"config.data.source={data.source!r}; choose 'synth' or 'folders'")


@contextlib.contextmanager
def _exclusive(lock_path: pathlib.Path):
    """Hold an exclusive advisory lock on ``lock_path`` (created if missing) for the ``with`` block."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file is closed, also if generation raises
        yield


def prepare(builder: tfds.core.DatasetBuilder) -> tfds.core.DatasetBuilder:
    """Generate the dataset unless it is already in the cache; returns the builder for chaining.

    Processes that share a cache (pytest-xdist workers, two jobs started together on a fresh machine) take turns on
    a lock file next to the version folder: tfds generates into a temporary folder and renames it at the end, and
    the second of two concurrent generations fails on that rename. Whoever waited then finds the data prepared, and
    its builder, created before the data existed, reads the dataset info (the splits) from disk.
    """
    data_dir = pathlib.Path(builder.data_dir)
    with _exclusive(data_dir.parent / f".{data_dir.name}.prepare.lock"):
        builder.download_and_prepare()
    if not builder.info.splits:
        builder.info.read_from_directory(builder.data_dir)
    return builder


def data_source(builder: tfds.core.DatasetBuilder, split: str, *, decode_images: bool = True):
    """Random-access source of one split (prepared on demand). ``decode_images=False`` returns PNG bytes, which
    makes scanning metadata (identity, caption, attributes) cheap."""
    if split not in builder.info.splits:
        prepare(builder)
    if split not in builder.info.splits:
        raise KeyError(
            f"split {split!r} not in {builder.name}/{builder.builder_config.name}: {list(builder.info.splits)}"
        )
    decoders = None if decode_images else {"image": tfds.decode.SkipDecoding()}
    return builder.as_data_source(split, decoders=decoders)


def identity_index(source) -> dict[int, np.ndarray]:
    """identity -> record indices of its photos (in record order). Pass a ``decode_images=False`` source: this
    reads every record."""
    ids = np.array([int(source[i]["identity"]) for i in range(len(source))], np.int64)
    order = np.argsort(ids, kind="stable")
    uniq, starts = np.unique(ids[order], return_index=True)
    return {int(u): order[s:e] for u, s, e in zip(uniq, starts, [*starts[1:], len(ids)])}


def decode_text(value) -> str:
    """tfds data sources return Text features as bytes."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
