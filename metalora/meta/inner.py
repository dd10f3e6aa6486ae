"""The inner loop: adapt one subject's factors from a few shots. Used at test time *and* inside meta-training.

A subject is adapted by ``adapt``: N optimiser steps on the subject role (Mid/Up for Meta-LoRA; A/B for the
LoRA baseline) with the base model and — unless ``train_meta`` — the Meta-Down ``D`` frozen. The N steps are
one ``lax.scan``, so there is no per-step dispatch, and the function is pure: ``jax.vmap`` over subjects adapts
many identities in one compiled call (``adapt_subjects``), and ``jax.grad`` through it gives second-order MAML.

``example_loss(model, batch, key) -> scalar`` is the task: e.g. ``diffusion_example_loss`` (denoising loss of a
UNet on the shots' images given their caption embeddings). Shots are a dict of arrays with a leading shot axis
``k``: ``images`` (k, H, W, C) and ``context`` (k, L, D), optionally ``context_flipped`` — the embedding of the
caption of the mirrored image (a face 'facing left' faces right when flipped), used by flip augmentation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from metalora.diffusion import NoiseSchedule, diffusion_loss, loss_weights, training_inputs
from metalora.lora.roles import merge_roles
from metalora.models.unet import added_conditions

FLIPPED = "_flipped"  # suffix of a shot entry that belongs to the mirrored image
STEP = "step"  # minibatch entry added by ``optimize``: the index of the optimiser step (a scalar)
ExampleLoss = Callable[[nnx.Module, Mapping[str, jax.Array], jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class InnerLoopConfig:
    """Adaptation hyper-parameters (the same for test-time adaptation and the meta-training inner loop).

    Attributes:
      steps: optimiser steps (one ``lax.scan``).
      learning_rate: of the inner optimiser.
      optimizer: ``"adam"`` or ``"sgd"``. Adam is used with ``eps_root`` > 0 so that second-order MAML can
        differentiate through ``sqrt(v)`` at ``v = 0`` without producing inf/NaN.
      batch_size: examples per step, drawn with replacement from the k shots.
      flip: random horizontal flips (uses ``context_flipped`` when the shots carry it).
      max_shift: random translation of up to this many pixels (edge padding), a crop-style augmentation.
      train_meta: also adapt ``D`` (Reptile's inner loop); otherwise ``D`` is frozen.
    """

    steps: int = 100
    learning_rate: float = 1e-3
    optimizer: str = "adam"
    batch_size: int = 1
    flip: bool = True
    max_shift: int = 0
    train_meta: bool = False

    def __post_init__(self):
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"inner optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if self.steps < 0 or self.batch_size < 1 or self.max_shift < 0:
            raise ValueError(f"invalid inner-loop config {self}")


def inner_optimizer(config: InnerLoopConfig) -> optax.GradientTransformation:
    if config.optimizer == "sgd":
        return optax.sgd(config.learning_rate)
    return optax.adam(config.learning_rate, eps_root=1e-16)


class AdaptResult(NamedTuple):
    """Output of ``adapt``: adapted heads (and ``D``, changed only with ``train_meta``), per-step losses, and the
    inner optimiser state (pass it back with ``start_step`` to continue: chunked adaptation equals one long run)."""

    heads: nnx.State
    meta: nnx.State
    losses: jax.Array
    opt_state: Any


def sample_minibatch(shots: Mapping[str, jax.Array], key: jax.Array, config: InnerLoopConfig) -> dict[str, jax.Array]:
    """``batch_size`` examples drawn from the shots with replacement, flipped/shifted at random.

    Every entry of ``shots`` is indexed by shot; an entry ``X_flipped`` (e.g. ``context_flipped``, the embedding of
    the mirrored image's caption) replaces ``X`` for the examples that are flipped and is not returned itself.
    """
    k_pick, k_flip, k_shift = jax.random.split(key, 3)
    num_shots = shots["images"].shape[0]
    index = jax.random.randint(k_pick, (config.batch_size,), 0, num_shots)
    batch = {name: value[index] for name, value in unflipped(shots).items()}
    if config.flip:
        flip = jax.random.bernoulli(k_flip, 0.5, (config.batch_size,))
        batch["images"] = jnp.where(flip[:, None, None, None], batch["images"][:, :, ::-1], batch["images"])
        for name in batch:
            if name + FLIPPED in shots:
                mirrored = shots[name + FLIPPED][index]
                batch[name] = jnp.where(flip.reshape((-1,) + (1,) * (mirrored.ndim - 1)), mirrored, batch[name])
    if config.max_shift:
        batch["images"] = _random_shift(batch["images"], k_shift, config.max_shift)
    return batch


def unflipped(shots: Mapping[str, Any]) -> dict[str, Any]:
    """``shots`` without the mirrored images' entries (``X_flipped``): held-out photos are evaluated as they are."""
    return {name: value for name, value in shots.items() if not name.endswith(FLIPPED)}


def _random_shift(images: jax.Array, key: jax.Array, max_shift: int) -> jax.Array:
    """Translate each image by up to ``max_shift`` pixels per axis (edge padding, then a crop back to size)."""
    b, h, w, _ = images.shape
    padded = jnp.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)), mode="edge")
    offsets = jax.random.randint(key, (b, 2), 0, 2 * max_shift + 1)

    def crop(image, offset):
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, image.shape[-1]))

    return jax.vmap(crop)(padded, offsets)


def optimize(loss_of: Callable[[Any, Mapping[str, jax.Array], jax.Array], jax.Array], params: Any,
             shots: Mapping[str, jax.Array], key: jax.Array, config: InnerLoopConfig, *, opt_state: Any = None,
             start_step: int | jax.Array = 0,
             optimizer: optax.GradientTransformation | None = None) -> tuple[Any, jax.Array, Any]:
    """The inner loop itself: ``config.steps`` optimiser steps on any pytree ``params``, one ``lax.scan``.

    ``loss_of(params, minibatch, key)`` is the objective; the minibatch also carries ``STEP`` (the index of the
    step, for objectives that change over training, e.g. staged recipes). Step ``i`` draws its minibatch and noise
    from ``fold_in(key, i)``; ``opt_state``/``start_step`` continue an earlier call, so a run split into chunks (e.g.
    to evaluate at several step counts) equals one long run. ``optimizer`` replaces ``inner_optimizer(config)``
    (a method with its own schedule). Returns ``(params, losses before each step, opt_state)``. Every adaptation
    method (LoRA heads, a full UNet, a token embedding, a staged recipe) runs through this one function.
    """
    optimizer = optimizer or inner_optimizer(config)

    def step(carry, i):
        p, state = carry
        k_batch, k_loss = jax.random.split(jax.random.fold_in(key, i))
        batch = sample_minibatch(shots, k_batch, config) | {STEP: i}
        loss, grads = jax.value_and_grad(loss_of)(p, batch, k_loss)
        updates, state = optimizer.update(grads, state, p)
        return (optax.apply_updates(p, updates), state), loss

    state = optimizer.init(params) if opt_state is None else opt_state
    (params, state), losses = jax.lax.scan(step, (params, state), start_step + jnp.arange(config.steps))
    return params, losses, state


def adapt(example_loss: ExampleLoss, graphdef: nnx.GraphDef, base: nnx.State, meta: nnx.State, heads: nnx.State,
          shots: Mapping[str, jax.Array], key: jax.Array, config: InnerLoopConfig, *, opt_state: Any = None,
          start_step: int | jax.Array = 0) -> AdaptResult:
    """Adapts one subject's LoRA factors: ``optimize`` on ``heads`` (and ``meta`` if ``train_meta``).

    ``heads`` is one subject's factors (no subject axis). See ``optimize`` for keys and chunking. Returns the
    adapted factors, the loss before each step and the optimiser state.
    """
    params = {"heads": heads, "meta": meta} if config.train_meta else {"heads": heads}

    def loss_of(p, batch, k):
        model = merge_roles(graphdef, base, p.get("meta", meta), p["heads"])
        return example_loss(model, batch, k)

    params, losses, state = optimize(loss_of, params, shots, key, config, opt_state=opt_state, start_step=start_step)
    return AdaptResult(params["heads"], params.get("meta", meta), losses, state)


def adapt_subjects(example_loss: ExampleLoss, graphdef: nnx.GraphDef, base: nnx.State, meta: nnx.State,
                   heads: nnx.State, shots: Mapping[str, jax.Array], keys: jax.Array,
                   config: InnerLoopConfig) -> AdaptResult:
    """``adapt`` for S subjects at once: ``heads``, ``shots`` and ``keys`` carry a leading subject axis.

    One vmapped computation: base convolutions and matmuls see the S subjects' examples as one batch.
    """
    def one(h, s, k):
        return adapt(example_loss, graphdef, base, meta, h, s, k, config)
    return jax.vmap(one)(heads, shots, keys)


def diffusion_example_loss(schedule: NoiseSchedule, *, min_snr_gamma: float | None = None) -> ExampleLoss:
    """Denoising loss of a conditional UNet on ``batch = {"images": (b,H,W,C), "context": (b,L,D)}`` (for SDXL
    also ``text_embeds`` and ``time_ids``, its added conditions).

    The noise, timesteps and target follow the schedule's prediction type; ``min_snr_gamma`` turns on
    Min-SNR-γ weighting.
    """
    def loss(model: nnx.Module, batch: Mapping[str, jax.Array], key: jax.Array) -> jax.Array:
        x_t, t, target = training_inputs(schedule, key, batch["images"])
        pred = model(x_t, t, batch["context"], added_conditions(batch))
        return diffusion_loss(pred, target, loss_weights(schedule, t, min_snr_gamma))

    return loss


def heldout_loss(example_loss: ExampleLoss, graphdef: nnx.GraphDef, base: nnx.State, meta: nnx.State,
                 heads: nnx.State, photos: Mapping[str, Any], key: jax.Array, repeats: int = 4) -> jax.Array:
    """Mean loss of one subject's adapted model on its held-out photos, averaged over ``repeats`` noise draws.

    The evaluation keys are fixed by ``key`` so that curves at different adaptation steps are comparable
    (common random numbers).
    """
    model = merge_roles(graphdef, base, meta, heads)
    keys = jax.random.split(key, repeats)
    return jnp.mean(jax.vmap(lambda k: example_loss(model, photos, k))(keys))
