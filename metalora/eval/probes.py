"""Evaluation probes for the procedural world: an identity encoder (our FaceSim backbone) and attribute classifiers
(our CLIP-T analogue), plus the image-level metrics every benchmark calls.

* ``IdentityEncoder``: a small ResNet → L2-normalised embedding, trained with a CosFace (default) or ArcFace
  margin softmax over the ``meta_train`` identities, with crop/flip/mild colour-jitter augmentation. Per-image
  attributes (pose, expression, glasses, hat, background, lighting) vary within every identity, so the margin loss
  itself pushes the embedding to ignore them; ``metalora.eval.probe_training.evaluate_probes`` measures how well
  it does.
* ``AttributeClassifier``: the same backbone with one softmax head per attribute of ``world.ATTRIBUTE_CLASSES``.

Both are deterministic functions of the config's seed, saved as safetensors + ``config.json`` under
``<root>/<name>/`` (root: ``$METALORA_PROBES`` or ``~/.cache/metalora/probes``) and loaded with ``load_probes``.
Training and evaluating them: ``metalora.eval.probe_training``.
The metric formulas are documented in ``metalora.eval.metrics``.

Image convention of every function here: uint8 in [0, 255] or float in [0, 1], shape (N, H, W, 3) at the
resolution the probes were trained at.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load as safetensors_load
from safetensors.numpy import save as safetensors_save

from metalora.compiler import jit
from metalora.data import world
from metalora.eval import metrics as M
from metalora.eval import probe_data
from metalora.train.io import atomic_write_bytes, atomic_write_text

__all__ = [
    "PROBES_DIR_ENV",
    "AttributeClassifier",
    "IdentityEncoder",
    "NetConfig",
    "Probes",
    "attribute_logits",
    "default_probes_dir",
    "diversity",
    "embed",
    "face_sim",
    "frechet_distance",
    "load_probes",
    "metrics_markdown",
    "pose_copying",
    "predict_attributes",
    "probe_features",
    "prompt_alignment",
    "r_face_sim",
    "save_probes",
]

PROBES_DIR_ENV = "METALORA_PROBES"
FORMAT_VERSION = 1
ENCODER_FILE, CLASSIFIER_FILE = "identity_encoder.safetensors", "attribute_classifier.safetensors"


# Probes shipped with the repository (``assets/probes_<name>``), used when the probes dir has none of that name.
SHIPPED_PROBES_DIR = pathlib.Path(__file__).resolve().parents[2] / "assets"


def default_probes_dir() -> pathlib.Path:
    """``$METALORA_PROBES`` or ``~/.cache/metalora/probes`` (never inside the repository)."""
    return pathlib.Path(
        os.environ.get(PROBES_DIR_ENV, pathlib.Path.home() / ".cache" / "metalora" / "probes")
    ).expanduser()


# --------------------------------------------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NetConfig:
    """Backbone shape. Images are first folded losslessly to 16×16 positions (space-to-depth by ``resolution //
    16``: a 3×3 stem conv at full resolution costs as much as the rest of the network, mostly in its weight
    gradient), then a stem conv and three residual stages with strides 1, 2, 2 give a 4×4 map at any supported
    resolution (32, 64, 128). It is flattened, not pooled, because *where* things are (a mole on the left
    cheek, a face turned right) matters to both probes."""

    resolution: int = 32
    stem_width: int = 24
    widths: tuple[int, ...] = (32, 64, 128)
    feature_dim: int = 128
    groups: int = 8

    def __post_init__(self):
        if self.resolution % 32 or self.resolution < 32:
            raise ValueError(f"NetConfig.resolution must be a multiple of 32, got {self.resolution}")
        if len(self.widths) != 3:
            raise ValueError(f"NetConfig.widths must have 3 stages (32 px -> 4x4 features), got {self.widths}")
        for w in (self.stem_width, *self.widths):
            if w % self.groups:
                raise ValueError(f"NetConfig: width {w} is not divisible by groups={self.groups}")

    @property
    def space_to_depth(self) -> int:
        return self.resolution // 16

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> NetConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        if unknown := set(d) - known:
            raise ValueError(f"NetConfig: unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
        d = dict(d)
        if "widths" in d:
            d["widths"] = tuple(d["widths"])
        return cls(**d)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["widths"] = list(self.widths)
        return d


class ResBlock(nnx.Module):
    """conv3×3(stride) → GN → ReLU → conv3×3 → GN, plus a 1×1 projection shortcut, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int, groups: int, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(cin, cout, (3, 3), stride, use_bias=False, rngs=rngs)
        self.norm1 = nnx.GroupNorm(cout, groups, rngs=rngs)
        self.conv2 = nnx.Conv(cout, cout, (3, 3), 1, use_bias=False, rngs=rngs)
        self.norm2 = nnx.GroupNorm(cout, groups, rngs=rngs)
        self.shortcut = nnx.Conv(cin, cout, (1, 1), stride, use_bias=False, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.relu(self.norm1(self.conv1(x)))
        h = self.norm2(self.conv2(h))
        return jax.nn.relu(h + self.shortcut(x))


def _space_to_depth(x: jax.Array, f: int) -> jax.Array:
    """(B, H, W, C) -> (B, H/f, W/f, f·f·C): every f×f pixel block becomes one position's channels (lossless)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // f, f, w // f, f, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h // f, w // f, f * f * c)


class Backbone(nnx.Module):
    """Images in [0, 1] (B, R, R, 3) → features (B, feature_dim). GroupNorm, not BatchNorm: no batch statistics,
    so parameters are the whole state and a probe's output on an image does not depend on the rest of its batch."""

    def __init__(self, config: NetConfig, *, rngs: nnx.Rngs):
        s = config.space_to_depth
        self.config = config
        self.stem = nnx.Conv(3 * s * s, config.stem_width, (3, 3), 1, use_bias=False, rngs=rngs)
        self.stem_norm = nnx.GroupNorm(config.stem_width, config.groups, rngs=rngs)
        cins = (config.stem_width, *config.widths[:-1])
        self.blocks = nnx.List(
            [ResBlock(ci, co, st, config.groups, rngs=rngs) for ci, co, st in zip(cins, config.widths, (1, 2, 2))]
        )
        self.proj = nnx.Linear(16 * config.widths[-1], config.feature_dim, rngs=rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        r = self.config.resolution
        if images.shape[1:] != (r, r, 3):
            raise ValueError(f"probe trained at {r} px expects images (B, {r}, {r}, 3), got {images.shape}")
        h = _space_to_depth(images * 2.0 - 1.0, self.config.space_to_depth)
        h = jax.nn.relu(self.stem_norm(self.stem(h)))
        for block in self.blocks:
            h = block(h)
        return self.proj(h.reshape(h.shape[0], -1))


class IdentityEncoder(nnx.Module):
    """Backbone → L2-normalised identity embedding (B, feature_dim). FaceSim(a, b) = <e(a), e(b)>."""

    def __init__(self, config: NetConfig, *, rngs: nnx.Rngs):
        self.backbone = Backbone(config, rngs=rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        f = self.backbone(images)
        return f / jnp.maximum(jnp.linalg.norm(f, axis=-1, keepdims=True), 1e-12)


ATTRIBUTE_HEADS: tuple[tuple[str, int], ...] = tuple((n, len(c)) for n, c in world.ATTRIBUTE_CLASSES.items())


class AttributeClassifier(nnx.Module):
    """Backbone → ReLU → one linear layer holding every attribute's logits side by side (ATTRIBUTE_HEADS order).
    ``__call__`` returns the concatenated logits; ``attribute_logits`` splits them by attribute."""

    def __init__(self, config: NetConfig, *, rngs: nnx.Rngs):
        self.backbone = Backbone(config, rngs=rngs)
        self.head = nnx.Linear(config.feature_dim, sum(n for _, n in ATTRIBUTE_HEADS), rngs=rngs)

    def features(self, images: jax.Array) -> jax.Array:
        return jax.nn.relu(self.backbone(images))

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.head(self.features(images))


def attribute_logits(logits: jax.Array) -> dict[str, jax.Array]:
    """Split concatenated logits (B, Σ classes) into {attribute: (B, classes)}."""
    out, start = {}, 0
    for name, n in ATTRIBUTE_HEADS:
        out[name] = logits[..., start : start + n]
        start += n
    return out


# --------------------------------------------------------------------------------------------------------------
# Inference: fixed-size jitted batches (one compilation per network, whatever N is)
# --------------------------------------------------------------------------------------------------------------


@functools.partial(jit, static_argnums=(0, 3))
def _apply(graphdef, state, images, method: str):
    model = nnx.merge(graphdef, state)
    x = probe_data.to_unit_interval(images)
    return model(x) if method == "__call__" else getattr(model, method)(x)


def _check_images(images) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must have shape (N, H, W, 3), got {images.shape}")
    if images.dtype != np.uint8:
        if not np.issubdtype(images.dtype, np.floating):
            raise TypeError(f"images must be uint8 or float in [0, 1], got dtype {images.dtype}")
        lo, hi = (float(images.min()), float(images.max())) if images.size else (0.0, 1.0)
        if lo < -0.02 or hi > 1.02:
            raise ValueError(
                f"float images must be in [0, 1] (got [{lo:.3f}, {hi:.3f}]); convert [-1, 1] samples with (x + 1) / 2"
            )
        images = np.clip(images, 0.0, 1.0).astype(np.float32)
    return images


def _batched(model: nnx.Module, images, method: str = "__call__", batch_size: int = 256) -> np.ndarray:
    images = _check_images(images)
    graphdef, state = nnx.split(model)
    n = len(images)
    outs = []
    # Pad every call to one of few shapes (batch_size, or the next power of two for small inputs), so a benchmark
    # calling with many different N compiles a handful of programs, not one per N.
    size = min(batch_size, 1 << max(n - 1, 0).bit_length())
    for start in range(0, n, size):
        chunk = images[start : start + size]
        pad = size - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
        out = np.asarray(_apply(graphdef, state, jnp.asarray(chunk), method))
        outs.append(out[: len(out) - pad])
    return np.concatenate(outs) if outs else np.zeros((0,), np.float32)


def embed(encoder: IdentityEncoder, images, batch_size: int = 256) -> np.ndarray:
    """Identity embeddings (N, D), unit norm."""
    return _batched(encoder, images, batch_size=batch_size)


def predict_attributes(classifier: AttributeClassifier, images, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Predicted class id per attribute: {name: (N,) int}, names and ids as in ``world.ATTRIBUTE_CLASSES``."""
    logits = _batched(classifier, images, batch_size=batch_size)
    return {k: np.argmax(v, axis=-1) for k, v in attribute_logits(logits).items()}


# --------------------------------------------------------------------------------------------------------------
# Image-level metrics (formulas in metalora.eval.metrics)
# --------------------------------------------------------------------------------------------------------------


def _one_or_many(images) -> np.ndarray:
    images = np.asarray(images)
    return images[None] if images.ndim == 3 else images


def face_sim(encoder: IdentityEncoder, images, reference) -> np.ndarray:
    """FaceSim per sample (N,): mean cosine of e(image) to e(reference) over the reference photo(s) (H, W, 3) or
    (K, H, W, 3). Average over samples for the table."""
    return M.face_sim_from_embeddings(embed(encoder, images), embed(encoder, _one_or_many(reference)))


def r_face_sim(encoder: IdentityEncoder, images, heldout_photos) -> np.ndarray:
    """R-FaceSim per sample (N,): mean cosine to the held-out photos of the same identity (references excluded:
    pass the protocol's ``heldout`` photos, which are disjoint from the references)."""
    return M.r_face_sim_from_embeddings(embed(encoder, images), embed(encoder, _one_or_many(heldout_photos)))


def _class_id(name: str, value) -> int:
    if name not in world.ATTRIBUTE_CLASSES:
        raise KeyError(f"unknown attribute {name!r}; expected one of {world.ATTRIBUTE_NAMES}")
    classes = world.ATTRIBUTE_CLASSES[name]
    if isinstance(value, str):
        if value not in classes:
            raise ValueError(f"attribute {name!r} has no class {value!r}; expected one of {classes}")
        return classes.index(value)
    if not 0 <= int(value) < len(classes):
        raise ValueError(f"attribute {name!r} class id {value} out of range [0, {len(classes)})")
    return int(value)


def prompt_alignment(
    classifier: AttributeClassifier, images, requested_attributes: Mapping[str, str] | Sequence[Mapping[str, str]]
) -> dict:
    """Our CLIP-T: accuracy of the attribute classifier on the attributes the prompt asks for, and only those.

    ``requested_attributes``: one dict for all images (e.g. ``EvalPrompt.attributes``) or one dict per image;
    values are class names (or ids). Returns ``metrics.prompt_alignment_from_predictions``'s dict.
    """
    images = _check_images(images)
    req = [requested_attributes] * len(images) if isinstance(requested_attributes, Mapping) else requested_attributes
    if len(req) != len(images):
        raise ValueError(f"{len(req)} attribute requests for {len(images)} images")
    req_ids = [{k: _class_id(k, v) for k, v in r.items()} for r in req]
    return M.prompt_alignment_from_predictions(predict_attributes(classifier, images), req_ids)


def pose_copying(
    classifier: AttributeClassifier, images, reference_pose: str | Sequence[str], requested_pose: str | Sequence
) -> dict:
    """Fraction of samples whose predicted pose equals the reference photo's pose, among samples whose prompt asks
    for a *different* pose (``requested_pose`` None = no pose asked: not counted). Returns {"rate", "copied",
    "eligible"}."""
    images = _check_images(images)
    n = len(images)
    refs = [reference_pose] * n if isinstance(reference_pose, str) else list(reference_pose)
    reqs = [requested_pose] * n if requested_pose is None or isinstance(requested_pose, str) else list(requested_pose)
    if len(refs) != n or len(reqs) != n:
        raise ValueError(f"need one reference/requested pose per image: {len(refs)}, {len(reqs)} for {n} images")
    ref_ids = np.array([_class_id("pose", p) for p in refs])
    req_ids = np.array([-1 if p is None else _class_id("pose", p) for p in reqs])
    return M.pose_copying_rate(predict_attributes(classifier, images)["pose"], ref_ids, req_ids)


def probe_features(probes: Probes, images, kind: str = "attributes") -> np.ndarray:
    """Features for Fréchet distance / diversity: ``"attributes"`` (the classifier's penultimate ReLU features,
    the analogue of Inception's pool features), ``"identity"`` (unit embeddings) or ``"both"`` (concatenated)."""
    if kind == "attributes":
        return _batched(probes.attribute_classifier, images, method="features")
    if kind == "identity":
        return embed(probes.identity_encoder, images)
    if kind == "both":
        return np.concatenate([probe_features(probes, images, "attributes"), embed(probes.identity_encoder, images)], 1)
    raise ValueError(f"kind must be 'attributes', 'identity' or 'both', got {kind!r}")


def diversity(encoder_or_features, images=None, metric: str = "cosine") -> float:
    """Mean pairwise distance between samples (of one prompt): 1 − cosine of identity embeddings by default.

    Pass an ``IdentityEncoder`` and images, or a feature array (N, D) and no images.
    """
    if isinstance(encoder_or_features, nnx.Module):
        if images is None:
            raise ValueError("diversity(encoder, images): images are required with an encoder")
        features = embed(encoder_or_features, images)
    else:
        if images is not None:
            raise ValueError("diversity(features): pass either an encoder and images, or features only")
        features = encoder_or_features
    return M.mean_pairwise_distance(features, metric)


def frechet_distance(features_a, features_b) -> float:
    """FID-like Fréchet distance between two probe-feature sets (see ``probe_features``)."""
    return M.frechet_distance(features_a, features_b)


# --------------------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Probes:
    identity_encoder: IdentityEncoder
    attribute_classifier: AttributeClassifier
    config: dict  # what produced them: net, world/splits, training settings, seed
    metrics: dict | None = None  # evaluate_probes output stored next to the weights
    path: pathlib.Path | None = None

    @property
    def resolution(self) -> int:
        return int(self.config["net"]["resolution"])


def _flat_params(model: nnx.Module) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))[0]
    return {".".join(str(getattr(k, "key", k)) for k in path): np.asarray(v) for path, v in leaves}


def _load_params(cls, net: NetConfig, path: pathlib.Path):
    """Build ``cls(net)`` abstractly and fill every parameter from the safetensors file, checking names/shapes."""
    abstract = nnx.eval_shape(lambda: cls(net, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    pure = nnx.to_pure_dict(state)
    paths, treedef = jax.tree_util.tree_flatten_with_path(pure)
    try:
        tensors = safetensors_load(path.read_bytes())
    except FileNotFoundError:
        raise FileNotFoundError(f"probe checkpoint file missing: {path}") from None
    leaves, expected = [], set()
    for p, spec in paths:
        key = ".".join(str(getattr(k, "key", k)) for k in p)
        expected.add(key)
        if key not in tensors:
            raise KeyError(f"{path}: parameter {key!r} missing (file has {len(tensors)} tensors)")
        if tensors[key].shape != spec.shape:
            raise ValueError(f"{path}: parameter {key!r} has shape {tensors[key].shape}, expected {spec.shape}")
        leaves.append(jnp.asarray(tensors[key], spec.dtype))
    if extra := set(tensors) - expected:
        raise KeyError(f"{path}: unexpected parameters {sorted(extra)[:5]} for {cls.__name__}")
    nnx.replace_by_pure_dict(state, jax.tree_util.tree_unflatten(treedef, leaves))
    return nnx.merge(graphdef, state)


def save_probes(directory: str | os.PathLike, probes: Probes) -> pathlib.Path:
    """Write ``identity_encoder.safetensors``, ``attribute_classifier.safetensors``, ``metrics.json`` and finally
    ``config.json`` (its presence marks a complete checkpoint), each atomically."""
    d = pathlib.Path(directory).expanduser()
    d.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(d / ENCODER_FILE, safetensors_save(_flat_params(probes.identity_encoder)))
    atomic_write_bytes(d / CLASSIFIER_FILE, safetensors_save(_flat_params(probes.attribute_classifier)))
    if probes.metrics is not None:
        atomic_write_text(d / "metrics.json", json.dumps(probes.metrics, indent=2, sort_keys=True))
        atomic_write_text(d / "metrics.md", metrics_markdown(probes.metrics))
    atomic_write_text(d / "config.json", json.dumps({"format_version": FORMAT_VERSION, **probes.config}, indent=2))
    return d


def load_probes(path_or_name: str | os.PathLike = "r32", *, root: str | os.PathLike | None = None) -> Probes:
    """Load probes from a checkpoint folder, or by name from ``root`` (default ``default_probes_dir()``).

    A name like ``"r32"`` resolves to ``<root>/r32``, else to the shipped ``assets/probes_r32``; an existing folder
    path is used as is.
    """
    p = pathlib.Path(path_or_name).expanduser()
    if not (p / "config.json").exists():
        base = pathlib.Path(root).expanduser() if root is not None else default_probes_dir()
        candidates = [base / str(path_or_name), SHIPPED_PROBES_DIR / f"probes_{path_or_name}"]
        found = [c for c in candidates if (c / "config.json").exists()]
        if not found:
            raise FileNotFoundError(
                f"no probes at {str(path_or_name)!r}: none of {[str(p), *map(str, candidates)]} holds a config.json; "
                "train them with `python -m experiments.train_probes --config configs/probes.py --workdir DIR`"
            )
        p = found[0]
    config = json.loads((p / "config.json").read_text())
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{p / 'config.json'}: format_version {config.get('format_version')}, expected {FORMAT_VERSION}"
        )
    if "net" not in config:
        raise KeyError(f"{p / 'config.json'}: missing key 'net'")
    net = NetConfig.from_dict(config["net"])
    metrics = json.loads((p / "metrics.json").read_text()) if (p / "metrics.json").exists() else None
    return Probes(
        identity_encoder=_load_params(IdentityEncoder, net, p / ENCODER_FILE),
        attribute_classifier=_load_params(AttributeClassifier, net, p / CLASSIFIER_FILE),
        config=config,
        metrics=metrics,
        path=p,
    )


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------


def metrics_markdown(metrics: Mapping[str, Any]) -> str:
    """The probes' accuracy as Markdown tables."""
    i = metrics["identity"]
    lines = [
        "| identity encoder (test identities, unseen) | value |",
        "|---|---|",
        f"| verification accuracy (threshold {i['threshold_from_meta_val']:.3f} from meta_val) | "
        f"{100 * i['test_accuracy']:.1f}% |",
        f"| ROC AUC | {i['test_roc_auc']:.4f} |",
        f"| pairs same / different | {i['test_pairs']['same']} / {i['test_pairs']['different']} |",
        f"| mean cosine same / different identity | {i['mean_cosine_same']:.3f} / {i['mean_cosine_different']:.3f} |",
        "",
        "| attribute | hard-pair verification acc. | cos same id, attr differs | cos diff id, attr equal |",
        "|---|---|---|---|",
    ]
    for name, r in i["robustness"].items():
        lines.append(
            f"| {name} | {100 * r['accuracy_hard_pairs']:.1f}% | {r['mean_cosine_same_id_attr_differs']:.3f} | "
            f"{r['mean_cosine_diff_id_attr_equal']:.3f} |"
        )
    lines += [
        "",
        "| attribute classifier (test images) | accuracy | chance (majority) | classes |",
        "|---|---|---|---|",
    ]
    for name, r in metrics["attributes"].items():
        lines.append(
            f"| {name} | {100 * r['test_accuracy']:.1f}% | {100 * r['chance_majority']:.1f}% | {r['num_classes']} |"
        )
    if "timing" in metrics:
        t = metrics["timing"]
        lines += ["", "| wall time (s) | " + " | ".join(t) + " |", "|---|" + "---|" * len(t)]
        lines.append("| | " + " | ".join(f"{v:.1f}" for v in t.values()) + " |")
    return "\n".join(lines) + "\n"
