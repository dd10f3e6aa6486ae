"""Glue between a base text-to-image model, adapters, text conditioning and the meta loops.

Used by ``experiments/meta_train.py`` and ``experiments/adapt.py`` (and the benchmark harness), so the two jobs
attach the same adapters, condition on text the same way and read/write the Meta-Down the same way.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from metalora.lora import LoRAConfig, inject, split_roles
from metalora.meta.inner import FLIPPED
from metalora.models import base_model as bm
from metalora.train.io import atomic_write_text, load_states, save_states

METHODS = ("meta_lora", "lora")
META_DOWN_FILE = "meta_down.safetensors"


def lora_config(method: str, *, targets: Any = "attn", rank: int = 4, mid_rank: int = 16, alpha: float | None = None,
                num_subjects: int = 1) -> LoRAConfig:
    """Meta-LoRA: three factors, ``D`` meta-shared. LoRA (baseline): two factors, all per subject."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    targets = targets if isinstance(targets, str) else tuple(targets)
    if method == "meta_lora":
        return LoRAConfig(targets=targets, rank=rank, mid_rank=mid_rank, alpha=alpha, down_role="meta",
                          num_subjects=num_subjects)
    return LoRAConfig(targets=targets, rank=rank, mid_rank=None, alpha=alpha, down_role="subject",
                      num_subjects=num_subjects)


def attach_adapters(model: bm.BaseModel, params: bm.BaseParams, config: LoRAConfig,
                    key: jax.Array) -> tuple[nnx.GraphDef, nnx.State, nnx.State, nnx.State]:
    """The base UNet with adapters injected: ``(graphdef, base, meta, subject)`` role states."""
    unet = model.unet(params)
    inject(unet, config, key=key)
    return split_roles(unet)


def encode_shots(model: bm.BaseModel, text_params: Any, shots: Mapping[str, jax.Array],
                 vae_params: Any = None) -> dict[str, jax.Array]:
    """Shots with token ids → shots with text embeddings (``context``, and ``context_flipped`` if ids given; for an
    SDXL base also ``text_embeds`` and ``time_ids``, see ``bm.encode_prompt``) and
    images in the UNet's space: photos in [-1, 1] for a pixel model, scaled VAE latents (``bm.encode_images``,
    with ``vae_params``) for a latent one."""
    if model.latent and vae_params is None:
        raise ValueError("encode_shots: the base model draws VAE latents; pass vae_params (params['vae'])")
    out = {"images": bm.encode_images(model, {"vae": vae_params}, shots["images"])}
    for ids_key, suffix in (("input_ids", ""), ("input_ids" + FLIPPED, FLIPPED)):
        if ids_key in shots:
            ids = shots[ids_key]
            cond = bm.encode_prompt(model, text_params, ids.reshape(-1, ids.shape[-1]))
            for name, flat in cond.items():
                out[name + suffix] = flat.reshape(*ids.shape[:-1], *flat.shape[1:])
    return out


def with_text_encoder(meta_loss: Callable, model: bm.BaseModel) -> Callable:
    """Wraps a meta objective so batches carry photos and token ids; the frozen text encoder (and, for a latent
    model, the VAE encoder) runs inside the step.

    ``frozen = {"base": UNet base state, "text": text encoder params[, "vae": VAE params]}`` (``frozen_inputs``).
    """
    def loss_fn(params, frozen, batch, key):
        encoded = {"identity": batch["identity"]}
        for part in ("support", "query"):
            if part in batch:
                encoded[part] = encode_shots(model, frozen["text"], batch[part], frozen.get("vae"))
        return meta_loss(params, {"base": frozen["base"]}, encoded, key)

    return loss_fn


def frozen_inputs(model: bm.BaseModel, params: bm.BaseParams, base: nnx.State) -> dict[str, Any]:
    """The ``frozen`` part of a train state that ``with_text_encoder`` reads: the adapted UNet's base role, the
    text encoder and, for a latent model, the VAE."""
    return {"base": base, "text": params["text_encoder"], **({"vae": params["vae"]} if model.latent else {})}


class EpisodeBatches:
    """Checkpointable meta-training batches from the data module's episode iterator, captions tokenized on host.

    ``{"identity": (B,), "support": {"images": (B,k,H,W,3), "input_ids": (B,k,L)}, "query": {...}}``.
    """

    def __init__(self, episode_iterator, tokenizer, *, with_query: bool):
        self._it = episode_iterator
        self._tokenizer = tokenizer
        self._with_query = with_query

    def __iter__(self):
        return self

    def _shots(self, ep, prefix: str) -> dict[str, np.ndarray]:
        captions = ep[prefix + "captions"]
        ids = self._tokenizer.tokenize([str(c) for c in captions.reshape(-1)])
        return {"images": ep[prefix + "images"], "input_ids": ids.reshape(*captions.shape, -1)}

    def __next__(self) -> dict[str, Any]:
        ep = next(self._it)
        batch = {"identity": np.asarray(ep["identity"], np.int32), "support": self._shots(ep, "")}
        if self._with_query:
            batch["query"] = self._shots(ep, "query_")
        return batch

    def get_state(self) -> dict:
        return self._it.get_state()

    def set_state(self, state: Mapping) -> None:
        self._it.set_state(state)


def save_meta_down(folder: str | pathlib.Path, meta: nnx.State, info: Mapping[str, Any]) -> pathlib.Path:
    """Writes ``D`` (safetensors, keys = module paths) and ``meta_down.json`` (adapter config, base, provenance)."""
    folder = pathlib.Path(folder)
    save_states(folder / META_DOWN_FILE, {"": meta}, "metalora-meta-down")
    atomic_write_text(folder / "meta_down.json", json.dumps(dict(info), indent=2, default=str) + "\n")
    return folder


def load_meta_down(folder: str | pathlib.Path, template: nnx.State) -> tuple[nnx.State, dict[str, Any]]:
    """Reads a saved ``D`` into the structure of ``template`` (the meta state of freshly attached adapters).

    Mismatched adapters (other targets, ranks or base) raise one error naming every differing key and shape.
    """
    folder = pathlib.Path(folder)
    path = folder / META_DOWN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: point at the output folder of experiments/meta_train.py")
    info = json.loads((folder / "meta_down.json").read_text())
    meta = load_states(path, {"": template}, "the attached adapters (targets/ranks/base differ)")[""]
    return meta, info
