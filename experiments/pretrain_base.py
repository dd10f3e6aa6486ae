"""Pretrain the base text-to-image model (UNet + small CLIP text encoder, jointly) on one track's meta_train split.

    python -m experiments.pretrain_base --config configs/base_tiny.py --workdir runs/base_tiny [--config.key=value]

Workdir: the train loop's layout (config.json, checkpoints/, tensorboard/, metrics.jsonl, samples/*.png) plus
``base_model/`` (the final EMA weights as a pipeline folder, loadable by ``load_base_model``) and
``results.json`` (wall time, steps/s, final loss). Rerunning the same command resumes exactly from the latest
checkpoint; ``--config.train.stop_at=N`` stops after step N as a preemption would.
"""

from __future__ import annotations

import functools
import json
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from metalora.config_utils import config_to_dict, run_cli
from metalora.data import builders, episodes
from metalora.models import base_model as bm
from metalora.train import (
    TrainState,
    create_train_state,
    make_lr_schedule,
    make_optimizer,
    make_train_step,
    run_training_job,
    sample_grid_hook,
)
from metalora.train.io import atomic_write_text

__all__ = ["CaptionBatches", "build_model", "main", "make_data", "make_state_and_step"]


def build_model(config: ml_collections.ConfigDict) -> bm.BaseModel:
    """The composite model the config describes (no weights)."""
    return bm.build_base_model(config.model)


class CaptionBatches:
    """Checkpointable batches for pretraining: one photo of each of B distinct identities per step.

    Wraps the data module's episode iterator (shots=1), whose state is the next step number, and tokenizes the
    captions on the host: ``{"images": (B, H, W, 3) float32 in [-1, 1], "input_ids": (B, L) int32}``.
    """

    def __init__(self, episode_iterator: episodes.EpisodeIterator, tokenizer):
        self._it = episode_iterator
        self._tokenizer = tokenizer

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        ep = next(self._it)
        batch = {}
        for prefix in ("", "pair_") if "pair_images" in ep else ("",):
            captions = [str(c) for c in ep[f"{prefix}captions"][:, 0]]
            batch.update({f"{prefix}images": ep[f"{prefix}images"][:, 0],
                          f"{prefix}input_ids": self._tokenizer.tokenize(captions)})
        return batch

    def get_state(self) -> dict:
        return self._it.get_state()

    def set_state(self, state: Mapping) -> None:
        self._it.set_state(state)


def make_data(config: ml_collections.ConfigDict, tokenizer) -> CaptionBatches:
    """The pretraining batches of ``config.data`` (tfds data source + grain, deterministic in (seed, step))."""
    data = config.data
    sampler = episodes.make_sampler(
        builders.prepare(builders.track_builder(data, resolution=config.model.resolution)), data.split,
        identities_per_step=config.train.batch_size, shots=1, seed=config.seed,
        augment=episodes.Augment(pad_fraction=data.pad_fraction, flip_prob=data.flip_prob),
        counterfactual=tuple(data.counterfactual),
    )
    return CaptionBatches(sampler.iterator(num_threads=data.num_threads), tokenizer)


def _optimizer_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    opt = config_to_dict(config.optimizer)
    opt["total_steps"] = opt["total_steps"] or config.train.steps
    return opt


def _sample_fn(model: bm.BaseModel, config: ml_collections.ConfigDict):
    """Grid sampler for the fixed prompts: row = prompt, column = seed; uses the EMA weights when there are any."""
    s = config.sample
    prompts = [p for p in s.prompts for _ in range(s.seeds_per_prompt)]
    ids = jnp.asarray(model.tokenize(prompts))
    # The same noise for every grid of the run, so grids at different steps are comparable.
    keys = jax.random.split(jax.random.key(config.seed + 1), len(prompts))

    def fn(state: TrainState, step: int) -> np.ndarray:
        del step
        params = state.ema_params if state.ema_params is not None else state.params
        params = {**(state.frozen or {}), **params}
        return bm.sample_from_ids(model, params, ids, keys, num_inference_steps=s.num_inference_steps,
                                  guidance_scale=s.guidance_scale)

    return fn


def make_state_and_step(config: ml_collections.ConfigDict, model: bm.BaseModel):
    """The initial train state (seeded by ``config.seed``) and the jitted train step the config describes.

    One place for both, so that anything timing the pretraining step (``benchmarks/host_allocator.py``) runs the
    step ``main`` runs: the same optimizer, frozen text tower, condition dropout, min-SNR weighting and EMA.
    """
    t = config.train
    opt_config = _optimizer_config(config)
    optimizer = make_optimizer(opt_config)
    params = bm.init_base_params(model, jax.random.key(config.seed))
    if t.train_text_encoder:
        state = create_train_state(params, optimizer, ema=t.ema_decay > 0)
    else:  # the text tower stays at its (random) init (measured in configs/base_tiny.py: it then barely conditions)
        state = create_train_state({"unet": params["unet"]}, optimizer, ema=t.ema_decay > 0,
                                   frozen={"text_encoder": params["text_encoder"]})
    loss_fn = functools.partial(_loss, model, cond_drop_prob=t.cond_drop_prob, min_snr_gamma=t.min_snr_gamma or None,
                                high_noise_fraction=t.high_noise_fraction, high_noise_start=t.high_noise_start,
                                pair_weight=t.pair_weight)
    step_fn = make_train_step(loss_fn, optimizer, ema_decay=t.ema_decay or None, ema_warmup=t.ema_warmup,
                              lr_schedule=make_lr_schedule(opt_config))
    return state, step_fn


def main(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict[str, Any]:
    workdir = pathlib.Path(workdir)
    model = build_model(config)
    t = config.train
    state, step_fn = make_state_and_step(config, model)
    data = make_data(config, model.tokenizer)
    hooks = []
    if t.sample_every > 0:  # 0: no sample grids (e.g. in tests)
        hooks.append(sample_grid_hook(_sample_fn(model, config), workdir / "samples", t.sample_every,
                                      nrow=config.sample.seeds_per_prompt))
    state, results = run_training_job(t, workdir=workdir, step_fn=step_fn, state=state, data=data,
                                      key=jax.random.key(config.seed + 2), config=config, hooks=hooks)
    ran = results["step"] - results["start_step"]
    results["steps_per_s_incl_compile_and_sampling"] = ran / results["wall_time_s"] if ran > 0 else None
    if results["finished"]:
        final = state.ema_params if state.ema_params is not None else state.params
        final = {**(state.frozen or {}), **final}
        bm.save_base_model(workdir / "base_model", model, final, weights_dtype=config.export.weights_dtype,
                           extra={"seed": config.seed, "steps": t.steps, "config": config_to_dict(config)})
        results["base_model"] = str(workdir / "base_model")
    atomic_write_text(workdir / "results.json", json.dumps(results, indent=2, default=float) + "\n")
    return results


def _loss(model, params, frozen, batch, key, **loss_options):
    # frozen holds the text encoder when it is not trained; otherwise everything trains
    return bm.base_loss(model, {**(frozen or {}), **params}, batch, key, **loss_options)


if __name__ == "__main__":
    run_cli(main)
