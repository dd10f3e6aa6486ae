"""Train the world's ControlNet (landmarks / shading / inpainting control) on the frozen base model.

    python -m experiments.train_controlnet --config configs/controlnet_tiny.py --workdir runs/controlnet

The one train loop (exact resume, NaN guard, TensorBoard, checkpoints). Each step draws ``batch_size`` meta_train
photos, renders their control images from the ground truth (``metalora.data.controls``) and trains the ControlNet
to help the frozen base denoise them; each control group is dropped independently so that one network serves every
step of the MegaPortrait pipeline. Output: ``<workdir>/controlnet/`` (a diffusers ControlNetModel folder) and
``results.json``.
"""

from __future__ import annotations

import functools
import json
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from metalora.config_utils import config_to_dict, run_cli
from metalora.data import builders, world
from metalora.data import controls as C
from metalora.data.episodes import to_unit_range
from metalora.meta import megaportrait as mp
from metalora.models import base_model as bm
from metalora.train import create_train_state, make_lr_schedule, make_optimizer, make_train_step, run_training_job
from metalora.train.io import atomic_write_text

CONTROL_STREAM = 5  # SeedSequence stream id of these batches (distinct from the world's, episodes', protocol's)


class ControlBatches:
    """Checkpointable batches ``{"images", "input_ids", "control"}``: a pure function of (seed, step).

    Photos are drawn from the whole split (any identity); a flipped photo gets flipped controls and caption.
    """

    def __init__(self, source, tokenizer, *, batch_size: int, seed: int, flip_prob: float):
        if len(source) < batch_size:
            raise ValueError(f"the split has {len(source)} photos, fewer than batch_size={batch_size}")
        self._source, self._tokenizer = source, tokenizer
        self._batch_size, self._seed, self._flip_prob = batch_size, seed, flip_prob
        self._step = 0

    def batch(self, step: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(np.random.SeedSequence([CONTROL_STREAM, self._seed, int(step)]))
        images, controls, captions = [], [], []
        for record in rng.choice(len(self._source), self._batch_size, replace=False):
            ex = self._source[int(record)]
            if "jitter" not in ex or "attributes" not in ex:
                raise ValueError("ControlNet training needs the procedural world's ground truth (attributes, jitter): "
                                 "use config.data.source='synth'")
            image = np.asarray(ex["image"], np.uint8)
            attributes = world.attributes_from_ids(ex["attributes"])
            control = C.photo_control_image(image, attributes, ex["jitter"])
            if rng.random() < self._flip_prob:
                image, control = image[:, ::-1], control[:, ::-1]
                attributes = world.flip_attributes(attributes)
            images.append(to_unit_range(image))
            controls.append(control)
            captions.append(world.make_caption(attributes))
        return {"images": np.stack(images), "control": np.stack(controls),
                "input_ids": self._tokenizer.tokenize(captions)}

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        out = self.batch(self._step)
        self._step += 1
        return out

    def get_state(self) -> dict:
        return {"step": self._step, "seed": self._seed, "batch_size": self._batch_size}

    def set_state(self, state: Mapping) -> None:
        if (state["seed"], state["batch_size"]) != (self._seed, self._batch_size):
            raise ValueError(f"data state {dict(state)} was written with another seed or batch size")
        self._step = int(state["step"])


def main(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict[str, Any]:
    workdir = pathlib.Path(workdir)
    model, params = bm.load_pixel_base(config.base.path, attention_backend=config.base.attention_backend,
                                        job="experiments/train_controlnet.py")
    portrait, controlnet = mp.new_controlnet(model, params, key=jax.random.key(config.seed),
                                             embedding_channels=tuple(config.controlnet.embedding_channels))
    t = config.train
    opt_config = config_to_dict(config.optimizer)
    opt_config["total_steps"] = opt_config["total_steps"] or t.steps
    optimizer = make_optimizer(opt_config)
    state = create_train_state({"controlnet": controlnet}, optimizer, frozen={"base": params})
    loss = functools.partial(mp.controlnet_loss, portrait, cond_drop_prob=t.cond_drop_prob,
                             group_keep_prob=t.group_keep_prob, min_snr_gamma=t.min_snr_gamma or None)

    def loss_fn(trainable, frozen, batch, key):
        return loss(trainable["controlnet"], frozen["base"], batch, key), {}

    step_fn = make_train_step(loss_fn, optimizer, lr_schedule=make_lr_schedule(opt_config))
    d = config.data
    if d.source != "synth":
        raise ValueError("configs: the world's ControlNet trains on the procedural world (data.source='synth'), whose "
                         "ground truth draws the control images")
    source = builders.data_source(builders.prepare(builders.track_builder(d, resolution=model.resolution)), d.split)
    data = ControlBatches(source, model.tokenizer, batch_size=t.batch_size, seed=config.seed, flip_prob=d.flip_prob)

    state, results = run_training_job(t, workdir=workdir, step_fn=step_fn, state=state, data=data,
                                      key=jax.random.key(config.seed + 1), config=config)
    results["trainable_parameters"] = int(sum(np.prod(x.shape) for x in jax.tree.leaves(controlnet)))
    if results["finished"]:
        info = {"base": config.base.path or "assets/base_tiny", "steps": t.steps, "seed": config.seed,
                "trained_on": f"{d.source}:{d.synth_config}:{d.split}", "groups": list(C.CONTROL_GROUPS),
                "group_keep_prob": t.group_keep_prob}
        results["controlnet"] = str(mp.save_controlnet(workdir / "controlnet", portrait, state.params["controlnet"],
                                                       info=info))
    atomic_write_text(workdir / "results.json", json.dumps(results, indent=2, default=float) + "\n")
    return results


if __name__ == "__main__":
    run_cli(main)
