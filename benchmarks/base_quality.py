"""Quality bars of a base model of the procedural world, measured by the evaluation probes.

    python -m benchmarks.base_quality [--model assets/base_tiny] [--probes r32] [--n 120] [--guidance 3] [--eta 0]
                                        [--out runs/base_quality]

* Prompted-attribute accuracy: the base samples the captions of ``n`` real ``test`` photos (every attribute of the
  photo is in its caption); the attribute probe checks each prompted attribute of each sample. The same probe on
  the real photos gives the ceiling.
* Diversity: mean pairwise cosine of identity embeddings between samples, next to the same statistic of the real
  photos (different identities). Samples of one identity-free prompt should spread like real people: a mean cosine
  far above the real one means the base draws one face.
* Caption gain: the denoising loss of the real photos with their own caption, with another photo's caption and with
  the empty prompt, at several noise levels (same noise for all three). ``1 - right/shuffled`` is how much the
  UNet's prediction improves by reading the prompt; it needs no sampler and no probe, so it separates "the UNet
  ignores the text" from "the sampler or the probe fails". Expect the gain at the noisiest steps only: below
  t ≈ 900 the noisy image itself still shows the background colour, pose and accessories.
* Attribute gain: the same with a caption that changes one attribute only (``swap_attribute``): which attributes'
  words the UNet reads at all.
* Attribute variance share: how much of the training photos' pixel variance each attribute explains. Where the
  noisy image shows nothing, the caption's words can lower the loss by at most their share, so a small share means
  a weak signal to learn that word from (in the procedural world at 32 px: background ~59 %, hat ~4 %, lighting ~2 %,
  glasses 0.3 %, pose 0.2 %, expression 0.01 %). Also within the head region (the squared deviations weighted by
  each photo's head mask): what a loss weighted towards the face could give those words (weights 1 + λ · mask
  approach it as λ grows).

Prints a Markdown table and writes ``base_quality.json`` and ``base_quality.png`` (samples above, their real
photos below) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from metalora import host
from metalora.compiler import jit
from metalora.data import builders, controls, world
from metalora.eval import metrics as M
from metalora.eval import probes as P
from metalora.models import base_model as bm
from metalora.train.io import atomic_write_text, save_image_grid


def _spread_rows(resolution: int, n: int, split: str) -> list[dict]:
    """``n`` rows spread evenly over a split (so over identities)."""
    source = builders.data_source(builders.synth_builder(f"r{resolution}"), split)
    if not 0 < n <= len(source):
        raise ValueError(f"asked for {n} {split} photos; the split has {len(source)}")
    return [source[int(i)] for i in np.linspace(0, len(source) - 1, n).round()]


def _photos(rows: list[dict]) -> tuple[np.ndarray, list[str], list[dict[str, str]]]:
    images = np.stack([np.asarray(r["image"], np.float32) / 255.0 for r in rows])
    captions = [builders.decode_text(r["caption"]) for r in rows]
    attributes = [json.loads(builders.decode_text(r["attributes_json"])) for r in rows]
    return images, captions, attributes


def real_photos(resolution: int, n: int, split: str = "test") -> tuple[np.ndarray, list[str], list[dict[str, str]]]:
    """``n`` photos spread evenly over a split (so over identities), their captions and attributes."""
    return _photos(_spread_rows(resolution, n, split))


def head_masks(rows: list[dict], resolution: int) -> np.ndarray:
    """(n, R, R) in [0, 1]: the head region of each row's photo (from its jitter)."""
    return np.stack([controls.head_mask(np.asarray(r["jitter"]), resolution) for r in rows]).astype(np.float32)


def attribute_variance_share(images: np.ndarray, attributes: list[dict[str, str]],
                             pixel_weights: np.ndarray | None = None) -> dict[str, float]:
    """Per attribute: the share of the photos' pixel variance that its class explains (ε², the between-class sum of
    squares less its chance level (K - 1) · within-class mean square, over the total sum of squares, summed over
    pixels). At the noisiest steps the caption is all the UNet sees, so an attribute's share bounds how much its
    word can lower the denoising loss there, i.e. how strong the training signal to read that word is.

    ``pixel_weights`` (N, H, W), if given, weight each photo's squared deviations per pixel (every channel alike):
    the share under a loss weighted that way, e.g. by a head mask (does weighting the face raise the small
    attributes' signal?)."""
    x = np.asarray(images, np.float64)
    w = np.ones(x.shape[:3]) if pixel_weights is None else np.asarray(pixel_weights, np.float64)
    if w.shape != x.shape[:3]:
        raise ValueError(f"pixel_weights have shape {w.shape}; the images need {x.shape[:3]}")
    w = np.broadcast_to(w[..., None], x.shape).reshape(len(x), -1)
    x = x.reshape(len(x), -1)
    total = (w * (x - x.mean(0)) ** 2).sum()
    out = {}
    for name in world.ATTRIBUTE_NAMES:
        labels = np.asarray([a[name] for a in attributes])
        classes = np.unique(labels)
        within = sum((w[labels == c] * (x[labels == c] - x[labels == c].mean(0)) ** 2).sum() for c in classes)
        chance = (len(classes) - 1) * within / max(len(x) - len(classes), 1)
        out[name] = float((total - within - chance) / total)
    return out


def attribute_accuracy(probes: P.Probes, images: np.ndarray, attributes: list[dict[str, str]]) -> dict[str, float]:
    out = P.prompt_alignment(probes.attribute_classifier, images, attributes)
    return {"all": out["accuracy"], **out["per_attribute"]}


def mean_pairwise_cosine(embeddings: np.ndarray) -> float:
    return 1.0 - M.mean_pairwise_distance(embeddings, "cosine")


def denoising_mse(model: bm.BaseModel, params: bm.BaseParams, images: np.ndarray, prompts: dict[str, jax.Array],
                  key: jax.Array, timesteps) -> dict[str, dict[str, float]]:
    """Per timestep, per named prompt batch (token ids, one row per image): the mean denoising MSE of ``images`` (in
    [0, 1]) with that prompt, the same noise for every prompt."""
    from metalora.diffusion import per_example_mse
    from metalora.diffusion.forward import add_noise, training_target

    x0 = jnp.asarray(images, jnp.float32) * 2.0 - 1.0
    noise = jax.random.normal(key, x0.shape)

    @jit
    def mse(input_ids, t):
        t = jnp.full((x0.shape[0],), t, jnp.int32)
        x_t = add_noise(model.schedule, x0, noise, t)
        pred = bm.denoise(model, params, x_t, t, input_ids)
        return jnp.mean(per_example_mse(pred, training_target(model.schedule, x0, noise, t)))

    return {str(t): {name: float(mse(ids, t)) for name, ids in prompts.items()} for t in timesteps}


def caption_gain(model: bm.BaseModel, params: bm.BaseParams, images: np.ndarray, captions: list[str],
                 key: jax.Array, timesteps=(300, 600, 900, 950, 990, 999)) -> dict[str, dict[str, float]]:
    """Per timestep: mean denoising MSE with the right / a shuffled / the empty caption and ``gain = 1 - right /
    shuffled``. ``images`` in [0, 1]; the shuffled caption of photo i is the caption of photo i+1."""
    ids = jnp.asarray(model.tokenize(captions))
    prompts = {"right": ids, "shuffled": jnp.roll(ids, 1, axis=0),
               "empty": jnp.broadcast_to(jnp.asarray(model.empty_ids)[None], ids.shape)}
    return {t: {**row, "gain": 1.0 - row["right"] / row["shuffled"]}
            for t, row in denoising_mse(model, params, images, prompts, key, timesteps).items()}


def swap_attribute(attributes: dict[str, str], name: str) -> dict[str, str]:
    """``attributes`` with ``name`` set to the next class of the world's list (cyclically): a caption that differs
    from the photo's in that attribute only."""
    classes = world.ATTRIBUTE_CLASSES[name]
    return {**attributes, name: classes[(classes.index(attributes[name]) + 1) % len(classes)]}


def attribute_gain(model: bm.BaseModel, params: bm.BaseParams, images: np.ndarray,
                   attributes: list[dict[str, str]], key: jax.Array,
                   timesteps=(500, 700, 900, 990)) -> dict[str, dict[str, float]]:
    """Per attribute and timestep: ``1 - MSE(right caption) / MSE(caption with only that attribute changed)``. How
    much the UNet reads each attribute's words: near 0 means it predicts the same whatever that attribute says, so
    no sampler setting can make samples follow it."""
    prompts = {"right": jnp.asarray(model.tokenize([world.make_caption(a) for a in attributes]))}
    for name in world.ATTRIBUTE_NAMES:
        prompts[name] = jnp.asarray(model.tokenize([world.make_caption(swap_attribute(a, name)) for a in attributes]))
    mse = denoising_mse(model, params, images, prompts, key, timesteps)
    return {name: {t: 1.0 - row["right"] / row[name] for t, row in mse.items()} for name in world.ATTRIBUTE_NAMES}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="", help="base model folder ('' = assets/base_tiny)")
    ap.add_argument("--probes", default="r32")
    ap.add_argument("--n", type=int, default=120)
    ap.add_argument("--steps", type=int, default=25, help="DDIM steps")
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--eta", type=float, default=0.0, help="DDIM eta (1 = DDPM-like ancestral noise)")
    ap.add_argument("--variance-n", type=int, default=3000, help="meta_train photos for the variance shares")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/base_quality")
    args = ap.parse_args(argv)
    out = pathlib.Path(args.out)
    model, params = bm.load_base(args.model)
    probes = P.load_probes(args.probes)
    real, captions, attributes = real_photos(model.resolution, args.n)
    ids = jnp.asarray(model.tokenize(captions))
    samples = np.asarray(bm.sample_from_ids(model, params, ids, jax.random.split(jax.random.key(args.seed), args.n),
                                            num_inference_steps=args.steps, guidance_scale=args.guidance, eta=args.eta))
    class_ids = jnp.asarray(model.tokenize([world.make_caption({})] * args.n))
    bare = np.asarray(bm.sample_from_ids(model, params, class_ids,
                                         jax.random.split(jax.random.key(args.seed + 1), args.n),
                                         num_inference_steps=args.steps, guidance_scale=args.guidance,
                                         eta=args.eta))
    result = {
        "model": args.model or "assets/base_tiny", "n": args.n, "ddim_steps": args.steps, "guidance": args.guidance,
        "eta": args.eta,
        "attribute_accuracy_samples": attribute_accuracy(probes, samples, attributes),
        "attribute_accuracy_real": attribute_accuracy(probes, real, attributes),
        "mean_pairwise_identity_cosine": {
            "samples_prompted": mean_pairwise_cosine(P.embed(probes.identity_encoder, samples)),
            "samples_class_prompt": mean_pairwise_cosine(P.embed(probes.identity_encoder, bare)),
            "real_test_photos": mean_pairwise_cosine(P.embed(probes.identity_encoder, real))},
        "frechet_distance_to_real": P.frechet_distance(P.probe_features(probes, samples),
                                                       P.probe_features(probes, real)),
        "caption_gain": caption_gain(model, params, real, captions, jax.random.key(args.seed + 2)),
        "attribute_gain": attribute_gain(model, params, real, attributes, jax.random.key(args.seed + 3)),
    }
    train_rows = _spread_rows(model.resolution, args.variance_n, "meta_train")
    train_images, _, train_attributes = _photos(train_rows)
    result["attribute_variance_share"] = attribute_variance_share(train_images, train_attributes)
    result["attribute_variance_share_in_head"] = attribute_variance_share(
        train_images, train_attributes, head_masks(train_rows, model.resolution))
    names = list(result["attribute_accuracy_real"])
    lines = ["| prompted attribute | base samples | real photos (probe ceiling) |", "|---|---|---|"]
    lines += [f"| {k} | {result['attribute_accuracy_samples'].get(k, float('nan')):.1%} | "
              f"{result['attribute_accuracy_real'][k]:.1%} |" for k in names]
    c = result["mean_pairwise_identity_cosine"]
    lines += ["", "| mean pairwise identity cosine | value |", "|---|---|",
              f"| samples (photo captions) | {c['samples_prompted']:.3f} |",
              f"| samples ('a photo of a person') | {c['samples_class_prompt']:.3f} |",
              f"| real test photos | {c['real_test_photos']:.3f} |", "",
              f"Fréchet distance (attribute-probe features) samples vs real: {result['frechet_distance_to_real']:.3g}",
              "", "| timestep | MSE right caption | shuffled caption | empty prompt | gain 1-right/shuffled |",
              "|---|---|---|---|---|"]
    lines += [f"| {t} | {g['right']:.4f} | {g['shuffled']:.4f} | {g['empty']:.4f} | {g['gain']:.1%} |"
              for t, g in result["caption_gain"].items()]
    gain_steps = list(next(iter(result["attribute_gain"].values())))
    lines += ["", "| attribute gain 1-right/changed at t = | " + " | ".join(gain_steps) + " |",
              "|---|" + "---|" * len(gain_steps)]
    lines += [f"| {name} | " + " | ".join(f"{g[t]:.1%}" for t in gain_steps) + " |"
              for name, g in result["attribute_gain"].items()]
    lines += ["", "| attribute | share of the training photos' pixel variance (ε²) | within the head region |",
              "|---|---|---|"]
    lines += [f"| {name} | {share:.2%} | {result['attribute_variance_share_in_head'][name]:.2%} |"
              for name, share in result["attribute_variance_share"].items()]
    result["table"] = "\n".join(lines)
    k = min(16, args.n)
    save_image_grid(np.concatenate([samples[:k], real[:k]]), out / "base_quality.png", nrow=k)
    atomic_write_text(out / "base_quality.json", json.dumps(result, indent=2, default=float) + "\n")
    print(result["table"])
    print(f"wrote {out / 'base_quality.json'} and {out / 'base_quality.png'}")
    return result


if __name__ == "__main__":
    host.reexec_with_malloc_tunables()  # before any work: see metalora/host.py
    main()
