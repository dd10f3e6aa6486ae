"""Personalization methods of the benchmark, all adapted by the one inner loop (``metalora.meta.optimize``).

A ``Method`` says what is trained per subject and how: ``init(key)`` makes one subject's trainable pytree,
``loss(trainable, batch, key)`` is the few-shot objective on a minibatch of shots, and ``sampling_params`` turns
the trainable into plain base-model parameters, so every method samples with the same sampler at the same speed.

* ``meta_lora``: Mid/Up heads on a meta-trained, frozen Meta-Down ``D`` (three factors).
* ``lora``: a two-factor LoRA on the same target layers, from scratch (LoRA-DreamBooth).
* ``dreambooth``: every UNet weight, optionally with the prior-preservation loss on class images of the base.
* ``textual_inversion``: only the embedding row of the identifier token (initialised from the class word's).

Shots/minibatches carry ``images`` (b, H, W, C) in [-1, 1], ``input_ids`` (b, L) and ``context`` (b, L, D), the
frozen text encoder's embedding of the ids (methods that do not train the text side use it and skip the encoder).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
from flax import nnx

from metalora.data import world
from metalora.export import export_diffusers
from metalora.lora import init_subject_state, merge_roles, merged_params, take_heads
from metalora.meta.inner import ExampleLoss
from metalora.meta.personalize import attach_adapters, load_meta_down, lora_config
from metalora.models import base_model as bm

METHODS = ("meta_lora", "lora", "dreambooth", "textual_inversion")

Batch = Mapping[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    init: Callable[[jax.Array], Any]
    loss: Callable[[Any, Batch, jax.Array], jax.Array]
    sampling_params: Callable[[Any], bm.BaseParams]
    trainable_parameters: int
    info: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # (trainable, folder) -> written file: the adapted subject as a diffusers-loadable LoRA (LoRA methods only)
    export: Callable[[Any, str | pathlib.Path], pathlib.Path] | None = None
    # The subject's denoising loss, for held-out evaluation; None = ``loss`` (differs when ``loss`` adds a
    # regulariser, e.g. DreamBooth's prior preservation, which is not part of how well the subject is fit)
    subject_loss: Callable[[Any, Batch, jax.Array], jax.Array] | None = None

    @property
    def eval_loss(self) -> Callable[[Any, Batch, jax.Array], jax.Array]:
        return self.subject_loss or self.loss


def _size(tree: Any) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def lora_method(name: str, model: bm.BaseModel, params: bm.BaseParams, example_loss: ExampleLoss, *,
                targets: Any = "attn", rank: int = 4, mid_rank: int = 16, alpha: float | None = None,
                meta_down: str | None = None, key: jax.Array) -> Method:
    """``meta_lora`` (needs ``meta_down``, the folder written by ``experiments/meta_train.py``) or ``lora``."""
    graphdef, base, meta, heads = attach_adapters(model, params, lora_config(name, targets=targets, rank=rank,
                                                                             mid_rank=mid_rank, alpha=alpha), key)
    info: dict[str, Any] = {"targets": targets, "rank": rank}
    if name == "meta_lora":
        if not meta_down:
            raise ValueError("meta_lora needs a meta-trained Meta-Down: set the path of experiments/meta_train.py's "
                             "meta_down folder")
        meta, meta_info = load_meta_down(meta_down, meta)
        info |= {"mid_rank": mid_rank, "meta_down": str(meta_down), "meta_down_info": meta_info}
    template = merge_roles(graphdef, base, meta, heads)

    def init(k):
        return take_heads(init_subject_state(template, k, 1), 0)

    def loss(heads_one, batch, k):
        return example_loss(merge_roles(graphdef, base, meta, heads_one), batch, k)

    def sampling_params(heads_one):
        return {"unet": merged_params(graphdef, base, meta, heads_one), "text_encoder": params["text_encoder"]}

    def export(heads_one, folder):
        with_subject_axis = jax.tree.map(lambda a: a[None], heads_one)
        return export_diffusers(merge_roles(graphdef, base, meta, with_subject_axis), 0, folder)

    return Method(name, init, loss, sampling_params, _size(take_heads(heads, 0)), info, export)


def dreambooth_method(model: bm.BaseModel, params: bm.BaseParams, example_loss: ExampleLoss, *,
                      prior_images: jax.Array | None = None, prior_context: jax.Array | None = None,
                      prior_weight: float = 1.0) -> Method:
    """Full UNet fine-tuning. With ``prior_images`` (class images drawn by the base model for the class prompt,
    ``prior_context`` their prompt embeddings), each step adds ``prior_weight`` × the denoising loss on one of
    them (DreamBooth's prior preservation, which keeps the class from collapsing onto the subject)."""
    with_prior = prior_images is not None and prior_weight > 0

    def init(k):
        del k  # starts from the base weights
        return params["unet"]

    def subject_loss(unet, batch, k):
        return example_loss(nnx.merge(model.unet_def, unet), batch, k)

    def loss(unet, batch, k):
        if not with_prior:
            return subject_loss(unet, batch, k)
        k_pick, k_noise = jax.random.split(jax.random.fold_in(k, 1))
        i = jax.random.randint(k_pick, (1,), 0, prior_images.shape[0])
        prior = {"images": prior_images[i], "context": prior_context[i]}
        return subject_loss(unet, batch, k) + prior_weight * subject_loss(unet, prior, k_noise)

    def sampling_params(unet):
        return {"unet": unet, "text_encoder": params["text_encoder"]}

    info = {"prior_preservation": bool(with_prior), "prior_weight": prior_weight if with_prior else 0.0,
            "prior_images": int(prior_images.shape[0]) if with_prior else 0}
    return Method("dreambooth", init, loss, sampling_params, _size(params["unet"]), info,
                  subject_loss=subject_loss)


TOKEN_TABLE = ("text_model", "embeddings", "token_embedding", "embedding")  # path in a CLIP text state


def _token_table(text_params: nnx.State) -> jax.Array:
    return dict(nnx.to_flat_state(text_params))[TOKEN_TABLE].get_value()


def textual_inversion_method(model: bm.BaseModel, params: bm.BaseParams, example_loss: ExampleLoss, *,
                             identifier: str = world.DEFAULT_IDENTIFIER,
                             init_word: str = world.CLASS_WORD) -> Method:
    """One new word embedding: the identifier token's row of the token table, initialised from ``init_word``'s.

    The text encoder runs inside the loss (the context depends on the trained row); UNet and encoder are frozen.
    """
    tokens = set(model.tokenizer.tokens)
    for word in (identifier, init_word):
        if word not in tokens:
            raise ValueError(f"textual_inversion: {word!r} is not a token of the base model's tokenizer")
    token, init_token = model.tokenizer.token_to_id(identifier), model.tokenizer.token_to_id(init_word)

    def text_params_with(row):
        def swap(path, v):
            return v.replace(v.get_value().at[token].set(row.astype(v.get_value().dtype))) if path == TOKEN_TABLE else v
        return nnx.from_flat_state([(path, swap(path, v)) for path, v in nnx.to_flat_state(params["text_encoder"])])

    def init(k):
        del k
        return _token_table(params["text_encoder"])[init_token]

    def loss(row, batch, k):
        context = bm.encode_text(model, text_params_with(row), batch["input_ids"])
        return example_loss(nnx.merge(model.unet_def, params["unet"]), {**batch, "context": context}, k)

    def sampling_params(row):
        return {"unet": params["unet"], "text_encoder": text_params_with(row)}

    return Method("textual_inversion", init, loss, sampling_params, int(model.config.text_encoder.hidden_size),
                  {"identifier": identifier, "init_word": init_word})
