"""Training and evaluation of the evaluation probes (``metalora.eval.probes``) on the procedural world.

``train_probes`` renders (or loads cached) ``meta_train`` / ``meta_val`` / ``test`` images, trains the identity
encoder with a margin softmax (``margin_logits``: CosFace or ArcFace) and the attribute classifier with one
cross-entropy per attribute, and measures both on identities they never saw (``evaluate_probes``). Every step
goes through the library's one jitted train step (``metalora.train.make_train_step``), so a non-finite loss
stops training with the step that produced it. The job's entry point is ``experiments/train_probes.py``.
"""

from __future__ import annotations

import pathlib
import time
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from metalora.data import world
from metalora.eval import metrics as M
from metalora.eval import probe_data
from metalora.eval.probes import (
    AttributeClassifier,
    IdentityEncoder,
    NetConfig,
    Probes,
    attribute_logits,
    default_probes_dir,
    embed,
    predict_attributes,
)
from metalora.train import create_train_state, make_optimizer, make_train_step

__all__ = [
    "evaluate_probes",
    "margin_logits",
    "train_attribute_classifier",
    "train_identity_encoder",
    "train_probes",
]


# --------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------


def margin_logits(embeddings, class_weights, labels, *, kind: str, scale: float, margin: float) -> jax.Array:
    """Scaled cosine logits with an additive margin on the target class.

    CosFace: s·(cos θ_y − m). ArcFace: s·cos(θ_y + m), replaced by s·(cos θ_y − m·sin m) once θ_y + m > π, where
    cos(θ + m) would stop decreasing in θ (the usual monotonic fallback).
    """
    w = class_weights / jnp.maximum(jnp.linalg.norm(class_weights, axis=0, keepdims=True), 1e-12)
    cos = jnp.clip(embeddings @ w, -1.0, 1.0)
    target = jnp.take_along_axis(cos, labels[:, None], axis=1)
    if kind == "cosface":
        target_m = target - margin
    elif kind == "arcface":
        sin = jnp.sqrt(jnp.clip(1.0 - target * target, 0.0, 1.0))
        arc = target * jnp.cos(margin) - sin * jnp.sin(margin)
        target_m = jnp.where(target > jnp.cos(jnp.pi - margin), arc, target - margin * jnp.sin(margin))
    else:
        raise ValueError(f"margin loss must be 'cosface' or 'arcface', got {kind!r}")
    one_hot = jax.nn.one_hot(labels, cos.shape[1], dtype=cos.dtype)
    return scale * (cos + one_hot * (target_m - target))


def _optimizer_config(cfg) -> dict:
    return {
        "learning_rate": float(cfg.learning_rate),
        "warmup_steps": int(cfg.warmup_steps),
        "total_steps": int(cfg.steps),
        "end_lr_ratio": 0.01,
        "weight_decay": float(cfg.weight_decay),
        "grad_clip_norm": 5.0,
    }


def _batches(n: int, batch_size: int, steps: int, seed: int):
    """Epoch-wise seeded permutations, ``steps`` batches of indices (the tail of each epoch is dropped)."""
    if n < batch_size:
        raise ValueError(f"batch_size {batch_size} exceeds the {n} training images")
    rng = np.random.default_rng(np.random.SeedSequence([seed, n]))
    per_epoch = n // batch_size
    done = 0
    while done < steps:
        perm = rng.permutation(n)
        for b in range(min(per_epoch, steps - done)):
            yield perm[b * batch_size : (b + 1) * batch_size]
        done += per_epoch


def _run(step_fn, state, batches, key, arrays: Mapping[str, np.ndarray], log_every: int, name: str, log) -> tuple:
    history, t0 = [], time.perf_counter()
    for i, idx in enumerate(batches):
        state, m = step_fn(state, {k: v[idx] for k, v in arrays.items()}, key)
        if (i + 1) % log_every == 0 or i == 0:
            m = {k: float(v) for k, v in m.items()}
            if not m["finite"]:
                raise FloatingPointError(f"{name}: non-finite loss/gradient at step {i}: {m}")
            history.append({"step": i + 1, **m, "time_s": time.perf_counter() - t0})
            if log:
                log(f"[{name}] step {i + 1}: " + ", ".join(f"{k}={v:.4g}" for k, v in m.items() if k != "finite"))
    jax.block_until_ready(state.params)
    return state, history


def train_identity_encoder(data: Mapping[str, np.ndarray], net: NetConfig, cfg, seed: int, log=print):
    """Train an ``IdentityEncoder`` on ``data`` (``images`` uint8, ``identity``) with a margin softmax.

    ``cfg``: steps, batch_size, learning_rate, warmup_steps, weight_decay, loss ('cosface'|'arcface'), scale, margin,
    pad, flip_prob, brightness, channel_gain, log_every. Returns (encoder, history).
    """
    labels = np.unique(data["identity"], return_inverse=True)[1].astype(np.int32)
    num_classes = int(labels.max()) + 1
    k_model, k_head, k_data = jax.random.split(jax.random.key(seed), 3)
    model = IdentityEncoder(net, rngs=nnx.Rngs(k_model))
    graphdef, net_params = nnx.split(model)
    params = {"net": net_params, "class_weights": jax.random.normal(k_head, (net.feature_dim, num_classes))}
    tx = make_optimizer(_optimizer_config(cfg))

    def loss_fn(params, frozen, batch, key):
        del frozen
        x, _ = probe_data.augment(
            key,
            probe_data.to_unit_interval(batch["images"]),
            pad=int(cfg.pad),
            flip_prob=float(cfg.flip_prob),
            brightness=float(cfg.brightness),
            channel_gain=float(cfg.channel_gain),
        )
        emb = nnx.merge(graphdef, params["net"])(x)
        logits = margin_logits(
            emb,
            params["class_weights"],
            batch["label"],
            kind=cfg.loss,
            scale=float(cfg.scale),
            margin=float(cfg.margin),
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        return loss, {"train_acc": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}

    step_fn = make_train_step(loss_fn, tx)
    state = create_train_state(params, tx)
    batches = _batches(len(labels), int(cfg.batch_size), int(cfg.steps), seed)
    arrays = {"images": data["images"], "label": labels}
    state, history = _run(step_fn, state, batches, k_data, arrays, int(cfg.log_every), "identity", log)
    return nnx.merge(graphdef, state.params["net"]), history


def train_attribute_classifier(data: Mapping[str, np.ndarray], net: NetConfig, cfg, seed: int, log=print):
    """Train an ``AttributeClassifier`` on ``data`` (``images`` uint8, ``attributes`` (N, A) ids): the sum of the
    per-attribute cross-entropies. Flips swap left/right pose and lighting labels; no colour jitter, since colours
    are what several heads must read. Returns (classifier, history)."""
    k_model, k_data = jax.random.split(jax.random.key(seed), 2)
    model = AttributeClassifier(net, rngs=nnx.Rngs(k_model))
    graphdef, params = nnx.split(model)
    tx = make_optimizer(_optimizer_config(cfg))

    def loss_fn(params, frozen, batch, key):
        del frozen
        x, flipped = probe_data.augment(
            key, probe_data.to_unit_interval(batch["images"]), pad=int(cfg.pad), flip_prob=float(cfg.flip_prob)
        )
        labels = probe_data.flip_attribute_ids(batch["attributes"], flipped)
        logits = attribute_logits(nnx.merge(graphdef, params)(x))
        losses, aux = [], {}
        for a, (name, lg) in enumerate(logits.items()):
            y = labels[:, a]
            losses.append(optax.softmax_cross_entropy_with_integer_labels(lg, y).mean())
            aux[f"acc_{name}"] = jnp.mean(jnp.argmax(lg, -1) == y)
        return sum(losses), aux

    step_fn = make_train_step(loss_fn, tx)
    state = create_train_state(params, tx)
    batches = _batches(len(data["images"]), int(cfg.batch_size), int(cfg.steps), seed + 1)
    arrays = {"images": data["images"], "attributes": data["attributes"]}
    state, history = _run(step_fn, state, batches, k_data, arrays, int(cfg.log_every), "attributes", log)
    return nnx.merge(graphdef, state.params), history


# --------------------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------------------


def _verification(emb: np.ndarray, identity: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pairs, labels = probe_data.verification_pairs(identity, seed)
    scores = np.sum(emb[pairs[:, 0]] * emb[pairs[:, 1]], axis=1, dtype=np.float64)
    return pairs, scores, labels


def evaluate_probes(
    probes: Probes, val: Mapping[str, np.ndarray], test: Mapping[str, np.ndarray], seed: int = 0
) -> dict:
    """Verification and attribute accuracy on identities never seen in training.

    Identity: all same-identity pairs + as many random different-identity pairs, scored by cosine; the threshold
    maximises accuracy on ``val`` (meta_val identities) and is applied to ``test``. Robustness to per-image
    attributes: for each attribute, test verification accuracy restricted to the *hard* pairs -- same identity with
    a different value of the attribute, and different identities sharing its value -- next to the mean cosines.
    Attributes: per-attribute accuracy on ``test`` images, with the majority-class rate as the chance level.
    """
    enc, clf = probes.identity_encoder, probes.attribute_classifier
    _, val_scores, val_labels = _verification(embed(enc, val["images"]), val["identity"], seed)
    threshold = M.best_threshold(val_scores, val_labels)
    pairs, scores, labels = _verification(embed(enc, test["images"]), test["identity"], seed + 1)
    identity = {
        "threshold_from_meta_val": threshold,
        "meta_val_accuracy": M.verification_accuracy(val_scores, val_labels, threshold),
        "test_accuracy": M.verification_accuracy(scores, labels, threshold),
        "test_roc_auc": M.roc_auc(scores, labels),
        "test_pairs": {"same": int(labels.sum()), "different": int((~labels).sum())},
        "test_identities": len(np.unique(test["identity"])),
        "mean_cosine_same": float(scores[labels].mean()),
        "mean_cosine_different": float(scores[~labels].mean()),
        "robustness": {},
    }
    attrs = np.asarray(test["attributes"])
    for a, name in enumerate(world.ATTRIBUTE_NAMES):
        equal = attrs[pairs[:, 0], a] == attrs[pairs[:, 1], a]
        hard = (labels & ~equal) | (~labels & equal)
        identity["robustness"][name] = {
            "accuracy_hard_pairs": M.verification_accuracy(scores[hard], labels[hard], threshold),
            "mean_cosine_same_id_attr_differs": float(scores[labels & ~equal].mean()),
            "mean_cosine_same_id_attr_equal": float(scores[labels & equal].mean()),
            "mean_cosine_diff_id_attr_equal": float(scores[~labels & equal].mean()),
            "mean_cosine_diff_id_attr_differs": float(scores[~labels & ~equal].mean()),
        }
    pred = predict_attributes(clf, test["images"])
    attributes = {}
    for a, name in enumerate(world.ATTRIBUTE_NAMES):
        y = attrs[:, a]
        attributes[name] = {
            "test_accuracy": float(np.mean(pred[name] == y)),
            "chance_majority": float(np.bincount(y).max() / len(y)),
            "num_classes": len(world.ATTRIBUTE_CLASSES[name]),
        }
    return {"identity": identity, "attributes": attributes, "test_images": len(test["images"])}


def _split_data(config, split: str, n_images: int) -> dict[str, np.ndarray]:
    w = config.world
    ids = probe_data.identity_range(split, n_meta_train=w.n_meta_train, n_meta_val=w.n_meta_val, n_test=w.n_test)
    cache = None if not config.cache_data else pathlib.Path(config.cache_dir or default_probes_dir()) / "data"
    return probe_data.load_or_render(
        cache, int(w.world_seed), ids, n_images, int(config.net.resolution), num_workers=int(config.num_workers)
    )


def train_probes(config: ml_collections.ConfigDict, log=print) -> Probes:
    """Render (or load cached) data, train both probes, evaluate them. Deterministic given ``config.seed``."""
    timing = {}
    t = time.perf_counter()
    train = _split_data(config, "meta_train", int(config.world.images_per_identity))
    val = _split_data(config, "meta_val", int(config.world.eval_images_per_identity))
    test = _split_data(config, "test", int(config.world.eval_images_per_identity))
    timing["data"] = time.perf_counter() - t
    if log:
        log(
            f"data: {len(train['images'])} train / {len(val['images'])} val / {len(test['images'])} test images "
            f"in {timing['data']:.1f}s"
        )
    net = NetConfig.from_dict(config.net.to_dict())
    t = time.perf_counter()
    encoder, id_hist = train_identity_encoder(train, net, config.identity, int(config.seed), log)
    timing["identity_encoder"] = time.perf_counter() - t
    t = time.perf_counter()
    classifier, attr_hist = train_attribute_classifier(train, net, config.attributes, int(config.seed), log)
    timing["attribute_classifier"] = time.perf_counter() - t
    probes = Probes(encoder, classifier, {"net": net.to_dict(), "train_config": config.to_dict()})
    t = time.perf_counter()
    metrics = evaluate_probes(probes, val, test, seed=int(config.seed))
    timing["evaluation"] = time.perf_counter() - t
    metrics["timing"] = timing
    metrics["history"] = {"identity_encoder": id_hist, "attribute_classifier": attr_hist}
    metrics["versions"] = {"jax": jax.__version__, "backend": jax.default_backend(), "devices": jax.device_count()}
    probes.metrics = metrics
    return probes
