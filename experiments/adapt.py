"""Adapt held-out identities from k reference shots — many subjects in one compiled call — and export them.

    python -m experiments.adapt --config configs/meta_lora_tiny.py --workdir runs/meta_tiny \
        [--config.lora.method=lora] [--config.adapt.identities="(0, 1, 2, 3)"]

``meta_lora`` adapts Mid/Up on top of the meta-trained ``D`` (``<workdir>/meta_down`` unless
``--config.adapt.meta_down``); ``lora`` adapts a plain two-factor LoRA from scratch on the same targets. With a
Stable Diffusion folder as ``--config.base.path`` the shots are VAE-encoded and the samples decoded.
Output under ``<workdir>/adapt_<method>/``: ``subject_<id>/pytorch_lora_weights.safetensors`` (diffusers/PEFT
format), ``samples.png`` (per subject: reference | held-out photo | samples of the evaluation prompts),
``results.json`` (held-out denoising loss before/after, inner-loop losses, wall time).
"""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments.meta_train import adapter_config, load_base
from metalora.compiler import jit
from metalora.config_utils import run_cli
from metalora.data import builders, protocol
from metalora.eval.harness import shot_arrays, stack_shots
from metalora.export import export_diffusers
from metalora.lora import merge_roles, merged_params
from metalora.meta import InnerLoopConfig, adapt_subjects, diffusion_example_loss, heldout_loss
from metalora.meta.inner import unflipped
from metalora.meta.personalize import attach_adapters, encode_shots, load_meta_down
from metalora.models import base_model as bm
from metalora.train import save_image_grid
from metalora.train.io import atomic_write_text

MAX_HELDOUT = 8


def main(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict[str, Any]:
    workdir = pathlib.Path(workdir)
    a = config.adapt
    model, base_params = load_base(config)
    method = config.lora.method
    out = workdir / f"adapt_{method}"

    d = config.data
    builder = builders.prepare(builders.track_builder(d, resolution=model.image_resolution))
    source = builders.data_source(builder, a.split)
    tests = protocol.protocol_from_source(builders.data_source(builder, a.split, decode_images=False), k=a.shots,
                                          seed=config.seed, with_attributes=d.source == "synth")
    chosen = [tests[i] for i in a.identities] if a.identities else list(tests)
    subjects = len(chosen)

    # Injection creates S fresh heads (Up = 0: every subject starts exactly at the base model).
    graphdef, base, meta, heads = attach_adapters(model, base_params, adapter_config(config, subjects),
                                                  jax.random.key(config.seed))
    if method == "meta_lora":
        meta, meta_info = load_meta_down(a.meta_down or workdir / "meta_down", meta)
    else:
        meta_info = None

    text = base_params["text_encoder"]
    refs = stack_shots([shot_arrays(source, t.references, model.tokenizer) for t in chosen])
    held = stack_shots([shot_arrays(source, t.heldout[:MAX_HELDOUT], model.tokenizer) for t in chosen])
    encode = jit(jax.vmap(lambda s: encode_shots(model, text, s, base_params.get("vae"))))
    ref_shots, held_shots = encode(refs), encode(held)

    example_loss = diffusion_example_loss(model.schedule, min_snr_gamma=config.train.min_snr_gamma or None)
    # Mirroring augments photos; a mirrored VAE latent is only approximately the latent of the mirrored photo.
    inner = InnerLoopConfig(steps=a.steps, learning_rate=a.learning_rate, batch_size=a.batch_size,
                            flip=not model.latent)
    run = jit(lambda h, s, k: adapt_subjects(example_loss, graphdef, base, meta, h, s, k, inner))
    evaluate = jit(jax.vmap(lambda h, p: heldout_loss(example_loss, graphdef, base, meta, h, unflipped(p),
                                                      jax.random.key(config.seed + 4))))
    keys = jax.random.split(jax.random.key(config.seed + 5), subjects)
    before = np.asarray(evaluate(heads, held_shots))
    start = time.perf_counter()
    result = run(heads, ref_shots, keys)
    jax.block_until_ready(result.heads)
    wall = time.perf_counter() - start
    after = np.asarray(evaluate(result.heads, held_shots))

    rows, names = [], []
    adapted_model = merge_roles(graphdef, base, meta, result.heads)
    for s, test in enumerate(chosen):
        export_diffusers(adapted_model, s, out / f"subject_{test.identity}")
        unet = merged_params(graphdef, base, meta, result.heads, s)
        prompts = [p.text for p in test.prompts for _ in range(a.seeds_per_prompt)]
        images = bm.sample_from_ids(model, {**base_params, "unet": unet}, jnp.asarray(model.tokenize(prompts)),
                                    jax.random.split(jax.random.key(config.seed + 6), len(prompts)),
                                    num_inference_steps=a.num_inference_steps, guidance_scale=a.guidance_scale)
        real = (np.stack([refs["images"][s, 0], held["images"][s, 0]]) + 1.0) / 2.0
        rows.append(np.concatenate([real, np.asarray(images)]))
        names.append(test.identity)
    width = max(len(r) for r in rows)
    grid = np.concatenate([np.concatenate([r, np.zeros((width - len(r), *r.shape[1:]), r.dtype)]) for r in rows])
    save_image_grid(grid, out / "samples.png", nrow=width)

    results = {"method": method, "identities": names, "shots": a.shots, "steps": a.steps,
               "heldout_loss_before": before.tolist(), "heldout_loss_after": after.tolist(),
               "inner_loss_first": np.asarray(result.losses[:, 0]).tolist(),
               "inner_loss_last": np.asarray(result.losses[:, -1]).tolist(),
               "adapt_wall_time_s_incl_compile": wall, "subjects": subjects, "meta_down": meta_info,
               "exports": [str(out / f"subject_{i}") for i in names], "samples": str(out / "samples.png")}
    atomic_write_text(out / "results.json", json.dumps(results, indent=2, default=float) + "\n")
    print(f"adapted {subjects} subjects with {method} in {wall:.1f}s; held-out loss "
          f"{before.mean():.4f} -> {after.mean():.4f}; samples: {out / 'samples.png'}")
    return results


if __name__ == "__main__":
    run_cli(main)
