"""Meta-train the shared Meta-Down ``D`` over many identities (joint / reptile / fomaml / maml).

    python -m experiments.meta_train --config configs/meta_lora_tiny.py --workdir runs/meta_tiny [--config.key=value]

The base model is frozen; ``D`` (and, for ``joint``, a head table that is discarded afterwards) is trained with the
one train loop (exact resume, NaN guard, TensorBoard, checkpoints). Output: ``<workdir>/meta_down/`` with
``meta_down.safetensors`` + ``meta_down.json``, read by ``experiments/adapt.py``, and ``results.json``.
``--config.base.path`` may name a diffusers Stable Diffusion (1.x/2.x) folder: the photos are then VAE-encoded
inside the step and the UNet trains on latents.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import jax
import ml_collections

from metalora.config_utils import config_to_dict, run_cli
from metalora.data import builders, episodes
from metalora.meta import InnerLoopConfig, MetaConfig, diffusion_example_loss, init_meta_params, make_meta_loss
from metalora.meta.outer import head_table_bytes
from metalora.meta.personalize import (
    EpisodeBatches,
    attach_adapters,
    frozen_inputs,
    lora_config,
    save_meta_down,
    with_text_encoder,
)
from metalora.models import base_model as bm
from metalora.train import create_train_state, make_lr_schedule, make_optimizer, make_train_step, run_training_job
from metalora.train.io import atomic_write_text


def load_base(config: ml_collections.ConfigDict) -> tuple[bm.BaseModel, bm.BaseParams]:
    b = config.base
    return bm.load_base(b.path, attention_backend=b.attention_backend, compute_dtype=b.compute_dtype, remat=b.remat)


def adapter_config(config: ml_collections.ConfigDict, num_subjects: int = 1):
    lc = config.lora
    return lora_config(lc.method, targets=lc.targets, rank=lc.rank, mid_rank=lc.mid_rank, alpha=lc.alpha or None,
                       num_subjects=num_subjects)


def meta_config(config: ml_collections.ConfigDict) -> MetaConfig:
    m = config.meta
    # Episodes are already flipped/cropped by the data sampler (with matching captions): no second flip inside.
    inner = InnerLoopConfig(steps=m.inner_steps, learning_rate=m.inner_learning_rate, optimizer=m.inner_optimizer,
                            batch_size=m.shots, flip=False)
    num_heads = m.num_heads or m.num_identities  # 0: one head per meta-train identity
    if m.algorithm == "joint" and not num_heads:
        raise ValueError("config.meta.num_heads=0 means one head per meta-train identity, so it needs "
                         "config.meta.num_identities > 0; set one of them")
    return MetaConfig(algorithm=m.algorithm, inner=inner, num_heads=num_heads or 1)


def make_batches(config: ml_collections.ConfigDict, model: bm.BaseModel, *, with_query: bool) -> EpisodeBatches:
    d, m = config.data, config.meta
    builder = builders.prepare(builders.track_builder(d, resolution=model.image_resolution))
    sampler = episodes.make_sampler(builder, d.split, identities_per_step=m.identities_per_step, shots=m.shots,
                                    query_shots=m.query_shots if with_query else 0, seed=config.seed,
                                    max_identities=m.num_identities,
                                    augment=episodes.Augment(pad_fraction=d.pad_fraction, flip_prob=d.flip_prob))
    return EpisodeBatches(sampler.iterator(num_threads=d.num_threads), model.tokenizer, with_query=with_query)


def main(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict[str, Any]:
    workdir = pathlib.Path(workdir)
    if config.lora.method != "meta_lora":
        raise ValueError("meta_train learns the Meta-Down of config.lora.method='meta_lora'; "
                         f"got {config.lora.method!r} (plain LoRA has nothing to meta-train)")
    model, base_params = load_base(config)
    adapters = adapter_config(config)
    graphdef, base, meta, heads_template = attach_adapters(model, base_params, adapters, jax.random.key(config.seed))
    mc = meta_config(config)
    example_loss = diffusion_example_loss(model.schedule, min_snr_gamma=config.train.min_snr_gamma or None)
    loss_fn = with_text_encoder(make_meta_loss(example_loss, graphdef, heads_template, mc), model)

    opt_config = config_to_dict(config.optimizer)
    opt_config["total_steps"] = opt_config["total_steps"] or config.train.steps
    optimizer = make_optimizer(opt_config)
    params = init_meta_params(graphdef, base, meta, heads_template, mc, jax.random.key(config.seed + 1))
    state = create_train_state(params, optimizer, frozen=frozen_inputs(model, base_params, base))
    step_fn = make_train_step(loss_fn, optimizer, lr_schedule=make_lr_schedule(opt_config))
    data = make_batches(config, model, with_query=mc.algorithm in ("fomaml", "maml"))

    state, job = run_training_job(config.train, workdir=workdir, step_fn=step_fn, state=state, data=data,
                                  key=jax.random.key(config.seed + 2), config=config)
    results = {"algorithm": mc.algorithm, **job, "inner": dataclasses.asdict(mc.inner)}
    if mc.algorithm == "joint":
        results["head_table_bytes_with_adam"] = head_table_bytes(state.params["heads"], mc.num_heads)
    if job["finished"]:
        info = {"lora": config_to_dict(config.lora), "base": config.base.path or "assets/base_tiny",
                "algorithm": mc.algorithm, "steps": job["step"], "seed": config.seed}
        results["meta_down"] = str(save_meta_down(workdir / "meta_down", state.params["meta"], info))
    atomic_write_text(workdir / "results.json", json.dumps(results, indent=2, default=float) + "\n")
    return results


if __name__ == "__main__":
    run_cli(main)
