"""MegaPortrait-style portraits: a personalised face in a template photo, by identity → shading → harmonisation.

One ControlNet (``metalora.models.controlnet``) conditions the base model on the template's control images
(``metalora.data.controls``: landmarks, shading, inpainting), with the groups a step does not use set to zero, as
in training (each group is dropped independently there). The UNet is the *personalised* one (e.g. Meta-LoRA merged):
ControlNets trained on a base transfer to its fine-tunes, which is how MegaPortrait combines them.

1. **identity**: DDIM from noise, prompt = the template's caption with the identifier ("a photo of sks person ...,
   facing left, lit from the right, ..."), control = the template's landmarks: the subject in the template's pose.
2. **shading**: SDEdit of (1) at ``shading_strength``, control = landmarks + the template's shading map: re-lit as
   the template is, the face's layout kept.
3. **harmonisation**: (2)'s head region pasted into the template, then SDEdit at ``harmonize_strength`` with every
   control group, the inpainting group showing the template around the head; the template outside the head region
   grown by ``seam_pixels`` is kept exactly (RePaint-style), so only the head and the seam around it are re-drawn.

``Portrait`` holds the static parts (hashable by identity, a static jit argument); weights are passed as
``{"unet": personalised UNet state, "controlnet": ControlNet state}`` plus the frozen text encoder's state.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from metalora.compiler import jit
from metalora.data import controls as C
from metalora.data import world
from metalora.diffusion import ddim_edit, ddim_sample, diffusion_loss, initial_noise, loss_weights, training_inputs
from metalora.models import base_model as bm
from metalora.models.controlnet import ControlNetModel, controlnet_from_unet

STEPS = ("identity", "shading", "harmonize")
# The control groups each step sees (the others are zeros).
STEP_GROUPS: dict[str, tuple[str, ...]] = {
    "identity": ("landmarks",),
    "shading": ("landmarks", "shading"),
    "harmonize": ("landmarks", "shading", "inpaint"),
}


@dataclasses.dataclass(frozen=True)
class PortraitConfig:
    num_inference_steps: int = 25
    guidance_scale: float = 3.0
    control_scale: float = 1.0  # ControlNet residual scale in every step ...
    # ... unless given per step, in STEP_GROUPS' order (identity, shading, harmonize): e.g. keep the identity step's
    # face and take more of the template's geometry in the edits.
    step_control_scales: tuple[float, ...] = ()
    shading_strength: float = 0.6  # fraction of the DDIM steps the shading step re-runs
    harmonize_strength: float = 0.4
    seam_pixels: int = 2  # the re-drawn region: the head mask grown by this many pixels

    def __post_init__(self):
        for name in ("shading_strength", "harmonize_strength"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"PortraitConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.seam_pixels < 0:
            raise ValueError(f"PortraitConfig.seam_pixels must be >= 0, got {self.seam_pixels}")
        # a config file's list becomes a tuple: the config is a static (hashed) argument of the jitted pipeline
        object.__setattr__(self, "step_control_scales", tuple(float(x) for x in self.step_control_scales))
        if self.step_control_scales and len(self.step_control_scales) != len(STEP_GROUPS):
            raise ValueError(f"PortraitConfig.step_control_scales needs one scale per step {tuple(STEP_GROUPS)} (or "
                             f"none, for control_scale in every step), got {self.step_control_scales}")

    def scale_of(self, step: str) -> float:
        if not self.step_control_scales:
            return self.control_scale
        return float(self.step_control_scales[list(STEP_GROUPS).index(step)])


@dataclasses.dataclass(frozen=True, eq=False)
class Portrait:
    """Static half: the base model and the ControlNet's graph; ``model_fn`` is made once so samplers compile once."""

    model: bm.BaseModel
    controlnet_def: nnx.GraphDef

    @functools.cached_property
    def model_fn(self):
        return functools.partial(controlled_unet, self.model.unet_def, self.controlnet_def)


def new_controlnet(model: bm.BaseModel, params: bm.BaseParams, *, key: jax.Array,
                   embedding_channels: Sequence[int] = (32,)) -> tuple[Portrait, nnx.State]:
    """A ControlNet for the world's control images, initialised from the base UNet (zero convs: a no-op at first).

    One ``embedding_channels`` entry keeps the conditioning image at the sample's resolution (pixel-space model; the
    published SD ControlNets downsample 8× to the latents with four).
    """
    controlnet = controlnet_from_unet(model.unet(params), conditioning_channels=C.CONTROL_CHANNELS,
                                      conditioning_embedding_out_channels=tuple(embedding_channels),
                                      rngs=nnx.Rngs(key), attention_backend=model.attention_backend)
    graphdef, state = nnx.split(controlnet, nnx.Param)
    return Portrait(model, graphdef), state


def from_controlnet(model: bm.BaseModel, controlnet: ControlNetModel) -> tuple[Portrait, nnx.State]:
    """Wrap a loaded ControlNet (``load_controlnet``); its conditioning channels must be the world's."""
    if controlnet.config.conditioning_channels != C.CONTROL_CHANNELS:
        raise ValueError(f"ControlNet has conditioning_channels={controlnet.config.conditioning_channels}; the world's "
                         f"control images have {C.CONTROL_CHANNELS} ({C.GROUP_CHANNELS})")
    graphdef, state = nnx.split(controlnet, nnx.Param)
    return Portrait(model, graphdef), state


def controlled_unet(unet_def: nnx.GraphDef, controlnet_def: nnx.GraphDef, params, x: jax.Array, t: jax.Array,
                    cond: Mapping[str, jax.Array]) -> jax.Array:
    """A sampler ``model_fn``: the UNet with the ControlNet's residuals. ``cond``: ``context`` (B, L, D), ``control``
    (B, H, W, CONTROL_CHANNELS) and ``scale`` (B,) per-example residual scale."""
    controlnet = nnx.merge(controlnet_def, params["controlnet"])
    scale = cond["scale"].astype(x.dtype)[:, None, None, None]
    down, mid = controlnet(x, t, cond["context"], cond["control"], conditioning_scale=scale)
    unet = nnx.merge(unet_def, params["unet"])
    return unet(x, t, cond["context"], down_block_additional_residuals=down, mid_block_additional_residual=mid)


# ----------------------------------------------------------------------------------------------------------------
# Training: the ControlNet on the frozen base
# ----------------------------------------------------------------------------------------------------------------


def drop_groups(key: jax.Array, control: jax.Array, keep_prob: float) -> jax.Array:
    """Zero each control group of each example independently with probability ``1 - keep_prob``: one ControlNet
    then serves every subset of groups (the pipeline's steps use three of them)."""
    keep = jax.random.bernoulli(key, keep_prob, (control.shape[0], len(C.CONTROL_GROUPS)))
    widths = [C.GROUP_CHANNELS[name] for name in C.CONTROL_GROUPS]
    per_channel = jnp.repeat(keep, np.asarray(widths), axis=1, total_repeat_length=C.CONTROL_CHANNELS)
    return control * per_channel[:, None, None, :].astype(control.dtype)


def group_mask(groups: Sequence[str]) -> jax.Array:
    """(CONTROL_CHANNELS,): 1 on the channels of ``groups``, 0 on the others."""
    unknown = set(groups) - set(C.CONTROL_GROUPS)
    if unknown:
        raise KeyError(f"unknown control groups {sorted(unknown)}; known: {C.CONTROL_GROUPS}")
    return jnp.concatenate([jnp.full((C.GROUP_CHANNELS[name],), name in groups, jnp.float32)
                            for name in C.CONTROL_GROUPS])


def controlnet_loss(portrait: Portrait, controlnet_params: nnx.State, base: bm.BaseParams,
                    batch: Mapping[str, jax.Array], key: jax.Array, *, cond_drop_prob: float = 0.1,
                    group_keep_prob: float = 0.5, min_snr_gamma: float | None = None) -> jax.Array:
    """The base's denoising loss with the ControlNet's residuals; only the ControlNet is differentiated.

    ``batch``: ``images`` (B, H, W, 3) in [-1, 1], ``input_ids`` (B, L), ``control`` (B, H, W, CONTROL_CHANNELS).
    Captions are dropped with ``cond_drop_prob`` (the control is kept, so guidance works with control on).
    """
    model = portrait.model
    k_drop, k_groups, k_noise = jax.random.split(key, 3)
    input_ids, _ = bm.drop_captions(model, k_drop, jnp.asarray(batch["input_ids"], jnp.int32), cond_drop_prob)
    context = bm.encode_text(model, base["text_encoder"], input_ids)
    control = drop_groups(k_groups, jnp.asarray(batch["control"], jnp.float32), group_keep_prob)
    x_t, t, target = training_inputs(model.schedule, k_noise, jnp.asarray(batch["images"], jnp.float32))
    cond = {"context": context, "control": control, "scale": jnp.ones((x_t.shape[0],), jnp.float32)}
    pred = controlled_unet(model.unet_def, portrait.controlnet_def,
                           {"unet": base["unet"], "controlnet": controlnet_params}, x_t, t, cond)
    return diffusion_loss(pred, target, loss_weights(model.schedule, t, min_snr_gamma))


@functools.partial(jit, static_argnames=("portrait", "groups", "repeats"))
def control_loss(portrait: Portrait, controlnet_params: nnx.State, base: bm.BaseParams, images: jax.Array,
                 input_ids: jax.Array, control: jax.Array, key: jax.Array, *, groups: tuple[str, ...],
                 repeats: int = 8) -> jax.Array:
    """Mean denoising loss of ``images`` (in [-1, 1]) with only ``groups`` of the control shown, over ``repeats`` fixed
    (noise, timestep) draws from ``key``: the same draws for every ``groups``, so differences are the control's."""
    batch = {"images": images, "input_ids": input_ids, "control": control * group_mask(groups)}
    losses = jax.vmap(lambda k: controlnet_loss(portrait, controlnet_params, base, batch, k, cond_drop_prob=0.0,
                                                group_keep_prob=1.0))(jax.random.split(key, repeats))
    return jnp.mean(losses)


# ----------------------------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------------------------


def step_control(control: jax.Array, step: str) -> jax.Array:
    """The full control image with only ``step``'s groups kept."""
    return control * group_mask(STEP_GROUPS[step]).astype(control.dtype)


def grow_mask(mask: jax.Array, pixels: int) -> jax.Array:
    """(B, H, W) mask dilated by ``pixels`` (a (2p+1)² max filter)."""
    if pixels == 0:
        return mask
    window = (1, 2 * pixels + 1, 2 * pixels + 1)
    return jax.lax.reduce_window(mask, -jnp.inf, jax.lax.max, window, (1, 1, 1), "SAME")


def _conditions(portrait: Portrait, text_params, input_ids, control, step: str, scale: float):
    model = portrait.model
    batch = input_ids.shape[0]
    empty = jnp.broadcast_to(jnp.asarray(model.empty_ids)[None], input_ids.shape)
    control = step_control(control, step)
    scales = jnp.full((batch,), scale, jnp.float32)
    cond = {"context": bm.encode_text(model, text_params, input_ids), "control": control, "scale": scales}
    uncond = {"context": bm.encode_text(model, text_params, empty), "control": control, "scale": scales}
    return cond, uncond


@functools.partial(jit, static_argnames=("portrait", "config"))
def run(portrait: Portrait, params: Mapping[str, nnx.State], text_params: nnx.State, template: jax.Array,
        control: jax.Array, input_ids: jax.Array, keys: jax.Array, config: PortraitConfig) -> dict[str, jax.Array]:
    """The three steps for B templates. ``params``: ``{"unet": personalised UNet, "controlnet": ...}``; ``template``
    (B, H, W, 3) in [0, 1]; ``control`` (B, H, W, CONTROL_CHANNELS) from ``controls.control_image`` (every group);
    ``input_ids`` (B, L) the prompts; ``keys`` (B,) one seed per portrait.

    Returns every step's images in [0, 1]: ``identity``, ``shading``, ``pasted`` (the shaded head pasted into the
    template, no harmonisation) and ``harmonize`` (the portrait).
    """
    schedule, n, g = portrait.model.schedule, config.num_inference_steps, config.guidance_scale
    noise = initial_noise(keys, portrait.model.sample_shape)
    edit_noise = initial_noise(jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys), portrait.model.sample_shape)

    cond, uncond = _conditions(portrait, text_params, input_ids, control, "identity", config.scale_of("identity"))
    identity = ddim_sample(portrait.model_fn, params, schedule, noise, cond, uncond, num_inference_steps=n,
                           guidance_scale=g)
    cond, uncond = _conditions(portrait, text_params, input_ids, control, "shading", config.scale_of("shading"))
    shaded = ddim_edit(portrait.model_fn, params, schedule, identity, edit_noise, cond, uncond, num_inference_steps=n,
                       strength=config.shading_strength, guidance_scale=g)

    head = control[..., C.group_slices()["inpaint"]][..., -1]  # the inpainting group's mask channel
    template_x = template * 2.0 - 1.0
    pasted = head[..., None] * shaded + (1.0 - head[..., None]) * template_x
    keep = 1.0 - grow_mask(head, config.seam_pixels)
    cond, uncond = _conditions(portrait, text_params, input_ids, control, "harmonize", config.scale_of("harmonize"))
    harmonized = ddim_edit(portrait.model_fn, params, schedule, pasted, edit_noise, cond, uncond,
                           num_inference_steps=n, strength=config.harmonize_strength, guidance_scale=g,
                           keep_mask=keep[..., None])
    return {name: bm.to_unit_images(x) for name, x in (("identity", identity), ("shading", shaded),
                                                        ("pasted", pasted), ("harmonize", harmonized))}


def template_controls(images: np.ndarray, attributes: Sequence[Mapping[str, str]],
                      jitters: Sequence[np.ndarray]) -> np.ndarray:
    """(B, H, W, CONTROL_CHANNELS) control images of B template photos (uint8) with their ground truth."""
    return np.stack([C.photo_control_image(np.asarray(image), attrs, jitter)
                     for image, attrs, jitter in zip(images, attributes, jitters, strict=True)])


# ----------------------------------------------------------------------------------------------------------------
# Templates for text prompts: the harness asks for "sks person on a blue background"; a portrait needs a photo
# that shows a blue background to be placed in
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class TemplatePool:
    """Photos of a split with ground truth (the world's): every record's attribute ids are read up front, images and
    jitter only when a record is chosen. ``source`` is a decoded tfds data source of the split."""

    source: object
    attribute_ids: np.ndarray  # (P, len(world.ATTRIBUTE_NAMES)) class ids

    def __len__(self) -> int:
        return int(self.attribute_ids.shape[0])


def template_pool(source_meta, source) -> TemplatePool:
    """The pool of a split from its ``decode_images=False`` source (fast attribute scan) and its decoded source."""
    if len(source_meta) == 0:
        raise ValueError("template_pool: the template split is empty")
    rows = source_meta.__getitems__(list(range(len(source_meta))))
    if "attributes" not in rows[0]:
        raise ValueError("template_pool: the split has no attribute ground truth (templates need the procedural "
                         "world's data, data.source='synth')")
    return TemplatePool(source, np.stack([np.asarray(r["attributes"], np.int64) for r in rows]))


def match_templates(attribute_ids: np.ndarray, wanted: Mapping[str, str], count: int,
                    rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """``count`` pool indices whose photos show the most of ``wanted`` (attribute → class), drawn uniformly among the
    best-matching photos (without replacement while there are enough), and the fraction of ``wanted`` they show."""
    names = list(world.ATTRIBUTE_NAMES)
    score = np.zeros(attribute_ids.shape[0], np.int64)
    for name, value in wanted.items():
        if value not in world.ATTRIBUTE_CLASSES.get(name, ()):
            raise ValueError(f"match_templates: unknown attribute {name}={value!r}")
        score += attribute_ids[:, names.index(name)] == world.ATTRIBUTE_CLASSES[name].index(value)
    best = np.flatnonzero(score == score.max())
    picks = rng.choice(best, count, replace=len(best) < count)
    return picks, float(score.max()) / len(wanted) if wanted else 1.0


def prompt_templates(pool: TemplatePool, prompts: Sequence[Sequence], seeds_per_prompt: int,
                     seed: int) -> tuple[dict[str, np.ndarray], dict[str, object]]:
    """Per subject and sample, a template that shows what the sample's prompt asks for, and its control image.

    ``prompts``: per subject, ``EvalPrompt``s (``.attributes``), each sampled ``seeds_per_prompt`` times; every sample
    gets its own template (seeded by ``seed``), so samples of one prompt differ in the template's unprompted looks
    as text-to-image samples do. Returns ``{"template": (S, N, H, W, 3) in [0, 1], "control": (S, N, H, W,
    CONTROL_CHANNELS)}`` in ``prompt_ids`` order, and ``{"template_attribute_match": the mean fraction of prompted
    attributes the templates show, "template_records": (S, N) record indices in the pool's split}``.
    """
    rng = np.random.default_rng(np.random.SeedSequence([23, seed]))
    templates, controls, shown, records = [], [], [], []
    for subject_prompts in prompts:
        indices = []
        records.append(indices)
        for prompt in subject_prompts:
            picks, fraction = match_templates(pool.attribute_ids, prompt.attributes, seeds_per_prompt, rng)
            indices.extend(int(i) for i in picks)
            shown.append(fraction)
        rows = pool.source.__getitems__(indices)
        images = np.stack([np.asarray(r["image"], np.uint8) for r in rows])
        templates.append(images.astype(np.float32) / 255.0)
        controls.append(template_controls(images, [world.attributes_from_ids(r["attributes"]) for r in rows],
                                          [np.asarray(r["jitter"], np.float32) for r in rows]))
    info = {"template_attribute_match": float(np.mean(shown)), "template_records": records}
    return {"template": np.stack(templates), "control": np.stack(controls)}, info


# ----------------------------------------------------------------------------------------------------------------
# On disk: a diffusers ControlNetModel folder
# ----------------------------------------------------------------------------------------------------------------


def save_controlnet(folder, portrait: Portrait, controlnet_params: nnx.State, *, info: Mapping | None = None):
    """Writes diffusers' layout (``config.json`` + ``diffusion_pytorch_model.safetensors``, loadable by
    ``load_controlnet`` and by diffusers' ``ControlNetModel.from_pretrained``); ``info`` goes into
    ``metalora_info.json``. Every file is written atomically, the config last."""
    import json
    import pathlib

    from safetensors.numpy import save

    from metalora.models import convert
    from metalora.train.io import atomic_write_bytes, atomic_write_text

    folder = pathlib.Path(folder)
    controlnet = nnx.merge(portrait.controlnet_def, controlnet_params)
    tensors = {k: np.asarray(v, np.float32) for k, v in convert.export_torch_state(controlnet).items()}
    atomic_write_bytes(folder / "diffusion_pytorch_model.safetensors", save(tensors, metadata={"format": "pt"}))
    if info is not None:
        atomic_write_text(folder / "metalora_info.json", json.dumps(dict(info), indent=2, default=str) + "\n")
    config = {"_class_name": "ControlNetModel", **controlnet.config.to_diffusers()}
    atomic_write_text(folder / "config.json", json.dumps(config, indent=2) + "\n")
    return folder


def load_portrait(model: bm.BaseModel, folder) -> tuple[Portrait, nnx.State]:
    """The ControlNet written by ``save_controlnet`` (or any diffusers ControlNet folder with the world's channels)."""
    from metalora.models.loading import load_controlnet

    return from_controlnet(model, load_controlnet(folder, attention_backend=model.attention_backend))
