"""Train the PhotoMaker-style stacked ID encoder (+ a UNet LoRA) across many identities; frozen base and text.

    python -m experiments.train_id_encoder --config configs/id_encoder_tiny.py --workdir runs/id_encoder

The one train loop (exact resume, NaN guard, TensorBoard, checkpoints). Output: ``<workdir>/id_encoder/``
(``id_encoder.safetensors`` + ``id_encoder.json``), which the benchmark's ``stacked_id`` method reads
(``method.stacked_id.folder``), and ``results.json``.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from metalora.config_utils import config_to_dict, run_cli
from metalora.data import builders, episodes
from metalora.meta import stacked_id as sid
from metalora.meta.personalize import EpisodeBatches
from metalora.models import base_model as bm
from metalora.models.id_encoder import IDEncoderConfig, save_id_encoder
from metalora.train import create_train_state, make_lr_schedule, make_optimizer, make_train_step, run_training_job
from metalora.train.io import atomic_write_text


def encoder_config(config: ml_collections.ConfigDict, model: bm.BaseModel) -> IDEncoderConfig:
    e = config.encoder
    return IDEncoderConfig(text_dim=model.config.text_encoder.hidden_size, channels=tuple(e.channels),
                           image_dim=e.image_dim, fuse_hidden=e.fuse_hidden, groups=e.groups, inject=e.inject)


def make_loss(system: sid.StackedID, *, cond_drop_prob: float, min_snr_gamma: float | None,
              contrastive_weight: float = 0.0, temperature: float = 0.1):
    """Per identity: embed its references, denoise its query photo(s) conditioned on the fused ID tokens. With
    ``contrastive_weight`` > 0, plus that times ``sid.identity_contrastive_loss`` between the step's identities'
    first reference and first query embeddings."""

    def loss_fn(params, frozen, batch, key):
        count = batch["identity"].shape[0]

        def one(support, query, k):
            embeds = sid.embed_references(system, params["encoder"], support["images"])
            return sid.denoising_loss(system, params["encoder"], params["lora"], frozen["text"], embeds, query, k,
                                      cond_drop_prob=cond_drop_prob, min_snr_gamma=min_snr_gamma)

        denoising = jnp.mean(jax.vmap(one)(batch["support"], batch["query"], jax.random.split(key, count)))
        if not contrastive_weight:
            return denoising, {}
        refs, queries = (sid.embed_references(system, params["encoder"], batch[part]["images"][:, 0])
                         for part in ("support", "query"))
        contrastive = sid.identity_contrastive_loss(refs, queries, temperature)
        return denoising + contrastive_weight * contrastive, {"denoising": denoising, "contrastive": contrastive}

    return loss_fn


def main(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict[str, Any]:
    workdir = pathlib.Path(workdir)
    model, params = bm.load_pixel_base(config.base.path, attention_backend=config.base.attention_backend,
                                        job="experiments/train_id_encoder.py")
    enc_config = encoder_config(config, model)
    system, encoder, lora = sid.build(model, params, enc_config, lora_targets=config.lora.targets,
                                      lora_rank=config.lora.rank, key=jax.random.key(config.seed))
    t = config.train
    opt_config = config_to_dict(config.optimizer)
    opt_config["total_steps"] = opt_config["total_steps"] or t.steps
    optimizer = make_optimizer(opt_config)
    state = create_train_state({"encoder": encoder, "lora": lora}, optimizer, frozen={"text": params["text_encoder"]})
    loss_fn = make_loss(system, cond_drop_prob=t.cond_drop_prob, min_snr_gamma=t.min_snr_gamma or None,
                        contrastive_weight=t.contrastive_weight, temperature=t.contrastive_temperature)
    step_fn = make_train_step(loss_fn, optimizer, lr_schedule=make_lr_schedule(opt_config))
    d = config.data
    builder = builders.prepare(builders.track_builder(d, resolution=model.resolution))
    sampler = episodes.make_sampler(builder, d.split, identities_per_step=t.identities_per_step, shots=t.refs,
                                    query_shots=t.query_shots, seed=config.seed, max_identities=t.num_identities,
                                    augment=episodes.Augment(pad_fraction=d.pad_fraction, flip_prob=d.flip_prob))
    data = EpisodeBatches(sampler.iterator(num_threads=d.num_threads), model.tokenizer, with_query=True)

    state, results = run_training_job(t, workdir=workdir, step_fn=step_fn, state=state, data=data,
                                      key=jax.random.key(config.seed + 1), config=config)
    if results["finished"]:
        info = {"lora": {"targets": config.lora.targets, "rank": config.lora.rank},
                "base": config.base.path or "assets/base_tiny", "steps": t.steps, "seed": config.seed,
                "trained_on": f"{d.source}:{d.split}", "refs": t.refs}
        results["id_encoder"] = str(save_id_encoder(workdir / "id_encoder", state.params["encoder"],
                                                    state.params["lora"], enc_config, info))
    atomic_write_text(workdir / "results.json", json.dumps(results, indent=2, default=float) + "\n")
    return results


if __name__ == "__main__":
    run_cli(main)
