"""Personalization methods of the benchmark, all adapted by the one inner loop (``metalora.meta.optimize``).

A ``Method`` says what is trained per subject and how: ``init(key)`` makes one subject's trainable pytree,
``loss(trainable, batch, key)`` is the few-shot objective on a minibatch of shots, and ``sampling_params`` turns
the trainable into plain base-model parameters (the base's, VAE included, with the trained parts replaced), so every
method samples with the same sampler at the same speed.

* ``meta_lora``: Mid/Up heads on a meta-trained, frozen Meta-Down ``D`` (three factors).
* ``lora``: a two-factor LoRA on the same target layers, from scratch (LoRA-DreamBooth).
* ``dreambooth``: every UNet weight, optionally with the prior-preservation loss on class images of the base.
* ``textual_inversion``: only the embedding row of the identifier token (initialised from the class word's).
* ``attn_dreambooth``: AttnDreamBooth's staged recipe: the identifier's embedding, then the cross-attention layers,
  then the whole UNet, each stage with its own learning rate, plus the attention-map regulariser.
* ``stacked_id``: PhotoMaker-style and tuning-free: a trained ID encoder turns the reference photos into ID tokens in
  the prompt (``metalora.meta.stacked_id``); nothing is optimised per subject.
* ``megaportrait``: MegaPortrait-style: another method's adaptation (Meta-LoRA by default), sampled by the
  identity → shading → harmonisation pipeline (``metalora.meta.megaportrait``) in a template photo that shows what
  the prompt asks for.

Shots/minibatches carry ``images`` (b, H, W, C) in the UNet's space (photos in [-1, 1], or scaled VAE latents for a
latent base), ``input_ids`` (b, L) and ``context`` (b, L, D), the frozen text encoder's embedding of the ids (methods
that do not train the text side use it and skip the encoder). ``stacked_id`` and ``megaportrait`` need a pixel-space
base (their image encoder and ControlNet look at photos).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from metalora.data import world
from metalora.diffusion import NoiseSchedule, diffusion_loss, loss_weights, training_inputs
from metalora.export import export_diffusers
from metalora.lora import init_subject_state, merge_roles, merged_params, take_heads
from metalora.meta.inner import STEP, ExampleLoss, InnerLoopConfig
from metalora.meta.personalize import attach_adapters, load_meta_down, lora_config
from metalora.models import base_model as bm
from metalora.models.unet_blocks import Attention, pop_cross_attention_maps, record_cross_attention
from metalora.train.optim import Stage, stage_index, staged_optimizer

__all__ = [
    "METHODS",
    "Method",
    "Stage",
    "attention_map_regularizer",
    "attn_dreambooth_method",
    "dreambooth_method",
    "lora_method",
    "megaportrait_method",
    "textual_inversion_method",
    "token_attention",
    "with_token_row",
]

METHODS = ("meta_lora", "lora", "dreambooth", "textual_inversion", "attn_dreambooth", "stacked_id", "megaportrait")

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
    # The method's own optimiser given the harness's inner-loop config (None = ``inner_optimizer(config)``)
    optimizer: Callable[[InnerLoopConfig], optax.GradientTransformation] | None = None
    # Tuning-free methods: the subject's state comes from its reference shots, ``(key, shots) -> trainable``, and is
    # never optimised (the harness evaluates it at step 0 only).
    init_from_shots: Callable[[jax.Array, Batch], Any] | None = None
    # ``(trainable, prompt ids (N, L), keys (N,), num_inference_steps, guidance_scale, inputs) -> images in [0, 1]``
    # for methods that do not sample as the base model with ``sampling_params`` (None = that default); ``inputs`` is
    # one subject's slice of ``sampling_inputs``' result (None without it)
    sample: Callable[..., jax.Array] | None = None
    # ``(prompts per subject (EvalPrompt), seeds per prompt) -> (pytree with leading (S, N) axes, info dict)``: what
    # ``sample`` needs besides the prompt ids, prepared once per benchmark on the host (MegaPortrait's templates)
    sampling_inputs: Callable[[Sequence[Sequence[Any]], int], tuple[Any, Mapping[str, Any]]] | None = None

    @property
    def tuning_free(self) -> bool:
        return self.init_from_shots is not None

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
        return {**params, "unet": merged_params(graphdef, base, meta, heads_one)}

    def export(heads_one, folder):
        with_subject_axis = jax.tree.map(lambda a: a[None], heads_one)
        return export_diffusers(merge_roles(graphdef, base, meta, with_subject_axis), 0, folder)

    return Method(name, init, loss, sampling_params, _size(take_heads(heads, 0)), info, export)


def dreambooth_method(model: bm.BaseModel, params: bm.BaseParams, example_loss: ExampleLoss, *,
                      prior_images: jax.Array | None = None, prior_prompt: Mapping[str, jax.Array] | None = None,
                      prior_weight: float = 1.0) -> Method:
    """Full UNet fine-tuning. With ``prior_images`` (class images drawn by the base model for the class prompt,
    ``prior_prompt`` their prompt's ``bm.encode_prompt`` entries, one row per image), each step adds
    ``prior_weight`` × the denoising loss on one of them (DreamBooth's prior preservation, which keeps the class
    from collapsing onto the subject)."""
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
        prior = {"images": prior_images[i], **{name: value[i] for name, value in prior_prompt.items()}}
        return subject_loss(unet, batch, k) + prior_weight * subject_loss(unet, prior, k_noise)

    def sampling_params(unet):
        return {**params, "unet": unet}

    info = {"prior_preservation": bool(with_prior), "prior_weight": prior_weight if with_prior else 0.0,
            "prior_images": int(prior_images.shape[0]) if with_prior else 0}
    return Method("dreambooth", init, loss, sampling_params, _size(params["unet"]), info,
                  subject_loss=subject_loss)


TOKEN_TABLE = ("text_model", "embeddings", "token_embedding", "embedding")  # path in a CLIP text state


def _token_table(text_params: nnx.State) -> jax.Array:
    return dict(nnx.to_flat_state(text_params))[TOKEN_TABLE].get_value()


def with_token_row(text_params: nnx.State, token: int, row: jax.Array) -> nnx.State:
    """The text encoder's state with row ``token`` of its token table replaced by ``row``."""
    def swap(path, v):
        return v.replace(v.get_value().at[token].set(row.astype(v.get_value().dtype))) if path == TOKEN_TABLE else v
    return nnx.from_flat_state([(path, swap(path, v)) for path, v in nnx.to_flat_state(text_params)])


def _token_ids(model: bm.BaseModel, *words: str) -> list[int]:
    """The id of each word, which must be one token of the base's tokenizer (a word of the world's vocabulary, or
    one BPE token of a CLIP tokenizer, e.g. SD's ``sks``). A base with two text encoders (SDXL) is refused: a new
    word would be a row of each encoder's token table, which these methods do not learn."""
    if model.xl:
        raise ValueError("textual_inversion and attn_dreambooth learn one token embedding of one text encoder; an SDXL "
                         "base has two: leave them out of config.methods for it")
    out = []
    for word in words:
        try:
            out.append(model.tokenizer.single_token_id(word))
        except ValueError as e:
            raise ValueError(f"the identifier and class word must be one token each of the base model's tokenizer: "
                             f"{e}") from None
    return out


def textual_inversion_method(model: bm.BaseModel, params: bm.BaseParams, example_loss: ExampleLoss, *,
                             identifier: str = world.DEFAULT_IDENTIFIER,
                             init_word: str = world.CLASS_WORD) -> Method:
    """One new word embedding: the identifier token's row of the token table, initialised from ``init_word``'s.

    The text encoder runs inside the loss (the context depends on the trained row); UNet and encoder are frozen.
    """
    token, init_token = _token_ids(model, identifier, init_word)

    def init(k):
        del k
        return _token_table(params["text_encoder"])[init_token]

    def loss(row, batch, k):
        context = bm.encode_text(model, with_token_row(params["text_encoder"], token, row), batch["input_ids"])
        return example_loss(nnx.merge(model.unet_def, params["unet"]), {**batch, "context": context}, k)

    def sampling_params(row):
        return {**params, "text_encoder": with_token_row(params["text_encoder"], token, row)}

    return Method("textual_inversion", init, loss, sampling_params, int(model.config.text_encoder.hidden_size),
                  {"identifier": identifier, "init_word": init_word})


# ----------------------------------------------------------------------------------------------------------------
# AttnDreamBooth (Pang et al., 2024): staged training with a cross-attention-map regulariser
# ----------------------------------------------------------------------------------------------------------------

# The recipe's groups: the identifier's embedding row, the cross-attention layers (attn2: q/k/v/out), the rest of
# the UNet. Stage 3 trains "the whole UNet" = the last two.
ATTN_DREAMBOOTH_STAGES = (Stage(60, 1e-3, ("token",)), Stage(100, 2e-5, ("cross_attention",)),
                          Stage(500, 2e-6, ("cross_attention", "unet")))  # the paper's SD-scale recipe
ATTN_DREAMBOOTH_REG_WEIGHTS = ((0.1, 0.0), (2.0, 5.0), (2.0, 5.0))  # (λ_mean, λ_var) per stage, the paper's


def token_attention(maps: Sequence[jax.Array], input_ids: jax.Array, token: int) -> list[jax.Array]:
    """Per map (B, Lq, Lk): the attention every query pays to ``token`` (its first occurrence), (B, Lq)."""
    position = jnp.argmax(input_ids == token, axis=1)
    return [jnp.take_along_axis(m, position[:, None, None], axis=2)[..., 0] for m in maps]


def attention_map_regularizer(maps: Sequence[jax.Array], input_ids: jax.Array, token: int, class_token: int,
                              weight_mean: float | jax.Array, weight_var: float | jax.Array) -> jax.Array:
    """AttnDreamBooth's regulariser: the new token's cross-attention map should have the mean and variance (over
    image positions) of its class word's map in the same prompt ("a photo of sks person"):

        λ_mean · (μ(A_sks) − μ(A_person))² + λ_var · (σ²(A_sks) − σ²(A_person))²,

    averaged over cross-attention layers and examples; examples whose prompt lacks either token count zero. The class
    word's statistics are the target (stop-gradient): the regulariser moves the new concept, not the class word.
    """
    present = jnp.any(input_ids == token, axis=1) & jnp.any(input_ids == class_token, axis=1)
    terms = []
    for a_new, a_class in zip(token_attention(maps, input_ids, token), token_attention(maps, input_ids, class_token)):
        a_class = jax.lax.stop_gradient(a_class)
        d_mean = jnp.mean(a_new, axis=-1) - jnp.mean(a_class, axis=-1)
        d_var = jnp.var(a_new, axis=-1) - jnp.var(a_class, axis=-1)
        terms.append(jnp.where(present, weight_mean * d_mean ** 2 + weight_var * d_var ** 2, 0.0))
    return jnp.mean(jnp.stack(terms)) if terms else jnp.zeros([])


def _cross_attention_filter(unet: nnx.Module):
    """An nnx filter for the variables of the UNet's cross-attention layers, chosen by module type."""
    prefixes = [path for path, m in nnx.iter_modules(unet) if isinstance(m, Attention) and m.is_cross_attention]
    if not prefixes:
        raise ValueError("attn_dreambooth: the UNet has no cross-attention layers")
    return lambda path, _: any(tuple(path[:len(p)]) == tuple(p) for p in prefixes)


def attn_dreambooth_method(model: bm.BaseModel, params: bm.BaseParams, schedule: NoiseSchedule, *,
                           min_snr_gamma: float | None = None,
                           stages: Sequence[Stage] = ATTN_DREAMBOOTH_STAGES,
                           reg_weights: Sequence[tuple[float, float]] = ATTN_DREAMBOOTH_REG_WEIGHTS,
                           identifier: str = world.DEFAULT_IDENTIFIER, class_word: str = world.CLASS_WORD) -> Method:
    """Staged personalization (AttnDreamBooth): stage 1 learns the identifier's embedding (initialised from the class
    word's), stage 2 the cross-attention layers, stage 3 the whole UNet; the text encoder stays frozen. Each stage
    has its own Adam and learning rate (``stages``; the harness's learning rate scales them all), and the loss adds
    the attention-map regulariser with the stage's ``reg_weights``. The maps come from the same UNet pass as the
    denoising prediction (``record_cross_attention``), not from a second model.

    Every step differentiates through the whole UNet, whichever stage is active (one compiled step for all stages),
    so it costs what a DreamBooth step costs.
    """
    stages = tuple(stages)
    if len(reg_weights) != len(stages):
        raise ValueError(f"attn_dreambooth: {len(stages)} stages but {len(reg_weights)} regulariser weight pairs")
    groups = {"token", "cross_attention", "unet"}
    unknown = {g for s in stages for g in s.groups} - groups
    if unknown:
        raise ValueError(f"attn_dreambooth: unknown parameter group(s) {sorted(unknown)}; groups are {sorted(groups)}")
    token, class_token = _token_ids(model, identifier, class_word)
    unet = model.unet(params)
    graphdef, cross, rest = nnx.split(unet, _cross_attention_filter(unet), ...)
    text = params["text_encoder"]
    weight_table = jnp.asarray(reg_weights, jnp.float32)

    def init(k):
        del k
        return {"token": _token_table(text)[class_token], "cross_attention": cross, "unet": rest}

    def forward(trainable, batch, key, record: bool):
        context = bm.encode_text(model, with_token_row(text, token, trainable["token"]), batch["input_ids"])
        unet = nnx.merge(graphdef, trainable["cross_attention"], trainable["unet"])
        x_t, t, target = training_inputs(schedule, key, batch["images"])
        if record:
            record_cross_attention(unet)
            pred = unet(x_t, t, context)
            maps = pop_cross_attention_maps(unet)
        else:
            pred, maps = unet(x_t, t, context), []
        return diffusion_loss(pred, target, loss_weights(schedule, t, min_snr_gamma)), maps

    def subject_loss(trainable, batch, k):  # held-out evaluation: how well the subject is fit, no regulariser
        return forward(trainable, batch, k, record=False)[0]

    def loss(trainable, batch, k):
        denoise, maps = forward(trainable, batch, k, record=True)
        w_mean, w_var = weight_table[stage_index(stages, batch[STEP])]
        return denoise + attention_map_regularizer(maps, batch["input_ids"], token, class_token, w_mean, w_var)

    def sampling_params(trainable):
        unet = nnx.merge(graphdef, trainable["cross_attention"], trainable["unet"])
        return {**params, "unet": nnx.state(unet), "text_encoder": with_token_row(text, token, trainable["token"])}

    def labels(trainable):
        return {name: jax.tree.map(lambda _, n=name: n, part) for name, part in trainable.items()}

    def optimizer(config: InnerLoopConfig) -> optax.GradientTransformation:
        scaled = [dataclasses.replace(s, learning_rate=s.learning_rate * config.learning_rate) for s in stages]
        return staged_optimizer(scaled, labels)

    info = {"identifier": identifier, "class_word": class_word,
            "stages": [{"steps": s.steps, "learning_rate": s.learning_rate, "groups": list(s.groups),
                        "reg_weights": list(w)} for s, w in zip(stages, reg_weights)],
            "learning_rate_is": "a scale on every stage's learning rate"}
    size = _size(params["unet"]) + int(model.config.text_encoder.hidden_size)
    return Method("attn_dreambooth", init, loss, sampling_params, size, info, subject_loss=subject_loss,
                  optimizer=optimizer)


# ----------------------------------------------------------------------------------------------------------------
# Stacked ID embedding (PhotoMaker-style, tuning-free)
# ----------------------------------------------------------------------------------------------------------------


def stacked_id_method(model: bm.BaseModel, params: bm.BaseParams, folder: str | pathlib.Path, *,
                      start_merge_step: int = 0, min_snr_gamma: float | None = None) -> Method:
    """The ID encoder + UNet LoRA written by ``experiments/train_id_encoder.py`` in ``folder``. A subject's state is
    its reference shots' image embeddings (N, image_dim): several references stack N ID tokens. The held-out loss
    is the denoising loss of the held-out photos conditioned on those tokens."""
    from metalora.meta import stacked_id as sid
    from metalora.models.id_encoder import IDEncoderConfig, load_id_encoder, read_id_encoder_info

    if model.latent:
        raise ValueError("stacked_id runs on pixel-space bases (experiments/train_id_encoder.py trains its ID encoder "
                         "on one); leave it out of config.methods for a latent (Stable Diffusion) base")
    info = read_id_encoder_info(folder)
    config = IDEncoderConfig.from_dict(info["config"])
    system, enc_template, lora_template = sid.build(model, params, config, lora_targets=info["lora"]["targets"],
                                                    lora_rank=info["lora"]["rank"], key=jax.random.key(0))
    encoder, lora, _ = load_id_encoder(folder, enc_template, lora_template)
    text = params["text_encoder"]

    def init_from_shots(k, shots):
        del k
        return sid.embed_references(system, encoder, shots["images"])

    def loss(embeds, batch, k):
        return sid.denoising_loss(system, encoder, lora, text, embeds, batch, k, min_snr_gamma=min_snr_gamma)

    def sampling_params(embeds):
        del embeds  # the ID tokens are in the prompt, see ``sample``
        return {"unet": sid.unet_params(system, lora), "text_encoder": text}

    def sample(embeds, ids, keys, num_inference_steps, guidance_scale, inputs):
        del inputs  # none: the ID tokens come from ``embeds``
        return sid.sample(system, encoder, lora, text, embeds, ids, keys, num_inference_steps=num_inference_steps,
                          guidance_scale=guidance_scale, start_merge_step=start_merge_step)

    size = _size(encoder) + _size(lora)
    return Method("stacked_id", lambda k: None, loss, sampling_params, size,
                  {"folder": str(folder), "start_merge_step": start_merge_step, "trained_on": info.get("trained_on"),
                   "trainable_parameters_are": "ID encoder + UNet LoRA, trained once on meta_train identities; "
                                               "nothing per subject"},
                  init_from_shots=init_from_shots, sample=sample)


# ----------------------------------------------------------------------------------------------------------------
# MegaPortrait-style: a personalised face placed in a template photo
# ----------------------------------------------------------------------------------------------------------------


def megaportrait_method(personal: Method, portrait, controlnet: nnx.State, pool, config, *, seed: int = 0,
                        info: Mapping[str, Any] | None = None) -> Method:
    """``personal`` (a tuned method, e.g. ``meta_lora``) adapts the subject exactly as it does alone (same
    trainables, loss, optimiser and held-out loss); samples are MegaPortrait portraits instead of plain text-to-image
    samples. For each sample the pipeline gets a template photo from ``pool`` (a ``megaportrait.TemplatePool``, photos
    of identities other than the subjects') that shows the attributes its prompt asks for; the prompt itself (with
    the identifier) conditions every step. The ControlNet (``portrait``, ``controlnet``) is trained once on the
    base, so, as for ``stacked_id``, it is not counted as per-subject trainable parameters. ``config`` is a
    ``megaportrait.PortraitConfig``; its sampler steps and guidance are replaced by the harness's.
    """
    from metalora.meta import megaportrait as mp

    if portrait.model.latent:
        raise ValueError("megaportrait runs on pixel-space bases (its ControlNet and the pasting into the template "
                         "work on photos); leave it out of config.methods for a latent (Stable Diffusion) base")
    if personal.tuning_free or personal.sample is not None:
        raise ValueError(f"megaportrait personalises with a tuned method that samples as the base model; "
                         f"{personal.name!r} is not one")

    def sampling_inputs(prompts, seeds_per_prompt):
        return mp.prompt_templates(pool, prompts, seeds_per_prompt, seed)

    def sample(trainable, ids, keys, num_inference_steps, guidance_scale, inputs):
        personal_params = personal.sampling_params(trainable)
        run_config = dataclasses.replace(config, num_inference_steps=num_inference_steps,
                                         guidance_scale=guidance_scale)
        out = mp.run(portrait, {"unet": personal_params["unet"], "controlnet": controlnet},
                     personal_params["text_encoder"], inputs["template"], inputs["control"], ids, keys, run_config)
        return out["harmonize"]

    controlnet_size = _size(controlnet)
    details = {"personalize": personal.name, **personal.info, "controlnet_parameters": controlnet_size,
               "portrait": dataclasses.asdict(config), "templates": len(pool),
               "trainable_parameters_are": f"{personal.name}'s per subject; the ControlNet "
                                           f"({controlnet_size:,}) is trained once on the base", **(info or {})}
    return dataclasses.replace(personal, name="megaportrait", info=details, sample=sample,
                               sampling_inputs=sampling_inputs)
