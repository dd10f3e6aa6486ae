"""Choosing target layers by diffusers module path and wrapping them with adapters in place.

Targets are chosen once, at injection, by matching regexes against the dotted diffusers module path
(``down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k``) together with the layer kind. After that,
everything (training, roles, export) works on module types, never on names.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
from flax import nnx

from metalora.lora.adapters import ADAPTER_TYPES, LoRAAdapter, LoRAConfig, iter_adapters
from metalora.models.convert import module_key

LINEAR, CONV = (nnx.Linear,), (nnx.Conv,)
ANY = (nnx.Linear, nnx.Conv)

_ATTN = r"(.*\.)?attn[12]\.(to_q|to_k|to_v|to_out\.0)"
_FF = r"(.*\.)?ff\.net\.(0\.proj|2)"
_BLOCKS = r"(down_blocks|mid_block|up_blocks)\..*"
_RESNET_CONVS = r"(down_blocks|mid_block|up_blocks)\..*resnets\.\d+\.(conv1|conv2|conv_shortcut)"
_PROJ = r"(down_blocks|mid_block|up_blocks)\..*attentions\.\d+\.(proj_in|proj_out)"

# preset -> ((regex over the dotted path, layer types it may select), ...)
TARGET_PRESETS: dict[str, tuple[tuple[str, tuple[type, ...]], ...]] = {
    # PEFT/diffusers default for SD LoRA: self- and cross-attention projections.
    "attn": ((_ATTN, LINEAR),),
    "attn_ff": ((_ATTN, LINEAR), (_FF, LINEAR)),
    # every Linear inside the down/mid/up blocks: attention, feed-forward, proj_in/out (when linear),
    # resnet time_emb_proj.
    "all_linear": ((_BLOCKS, LINEAR),),
    # + resnet convs and the convolutional proj_in/proj_out (LoCon-style).
    "all_linear_conv": ((_BLOCKS, LINEAR), (_RESNET_CONVS, CONV), (_PROJ, CONV)),
}


def _target_rules(targets: str | Sequence[str]) -> tuple[tuple[re.Pattern, tuple[type, ...]], ...]:
    if isinstance(targets, str):
        if targets not in TARGET_PRESETS:
            raise ValueError(f"unknown target preset {targets!r}; presets are {sorted(TARGET_PRESETS)} "
                             "(or pass a sequence of regexes over dotted module paths)")
        return tuple((re.compile(p), kinds) for p, kinds in TARGET_PRESETS[targets])
    rules = []
    for pattern in targets:
        try:
            rules.append((re.compile(pattern), ANY))
        except re.error as e:
            raise ValueError(f"target pattern {pattern!r} is not a valid regex: {e}") from e
    return tuple(rules)


def select_targets(model: nnx.Module, targets: str | Sequence[str]) -> list[tuple[tuple, nnx.Module]]:
    """``(path, layer)`` for each layer the targets select, in graph order.

    A user regex that matches a module which cannot be adapted (not Linear/Conv), or that matches nothing,
    is an error naming the pattern: a silently empty target set would train nothing.
    """
    rules = _target_rules(targets)
    hits, used = [], [False] * len(rules)
    for path, module in nnx.iter_modules(model):
        if not path or isinstance(module, LoRAAdapter):
            continue
        name = module_key(path)
        for i, (pattern, kinds) in enumerate(rules):
            if not pattern.fullmatch(name):
                continue
            if type(module) in kinds:
                hits.append((path, module))
                used[i] = True
                break
            if not isinstance(targets, str):
                raise ValueError(f"target pattern {pattern.pattern!r} matches '{name}', a {type(module).__name__}; "
                                 "only nnx.Linear and nnx.Conv layers can carry adapters")
    if not isinstance(targets, str):
        unused = [rules[i][0].pattern for i, u in enumerate(used) if not u]
        if unused:
            raise ValueError(f"target pattern(s) {unused} match no Linear/Conv layer of {type(model).__name__}")
    if not hits:
        raise ValueError(f"targets {targets!r} select no layer of {type(model).__name__}")
    return hits


def _parent_and_key(model: nnx.Module, path: tuple):
    parent = model
    for part in path[:-1]:
        parent = parent[part] if isinstance(part, int) else getattr(parent, part)
    return parent, path[-1]


def _replace(model: nnx.Module, path: tuple, new: nnx.Module) -> None:
    parent, key = _parent_and_key(model, path)
    if isinstance(key, int):
        parent[key] = new
    else:
        setattr(parent, key, new)


def inject(model: nnx.Module, config: LoRAConfig, *, key: jax.Array) -> tuple[str, ...]:
    """Wraps every target layer of ``model`` with an adapter, in place; returns the wrapped dotted paths.

    Each adapter's factors are drawn from ``fold_in(key, i)`` (i = its index in graph order), so injection is
    deterministic given ``key`` and the model structure.
    """
    if any(True for _ in iter_adapters(model)):
        raise ValueError(f"{type(model).__name__} already carries LoRA adapters; call remove() first")
    targets = select_targets(model, config.targets)
    for i, (path, layer) in enumerate(targets):
        adapter_type = ADAPTER_TYPES[type(layer)]
        try:
            adapter = adapter_type(layer, config, key=jax.random.fold_in(key, i))
        except ValueError as e:
            raise ValueError(f"cannot adapt '{module_key(path)}': {e}") from e
        _replace(model, path, adapter)
    return tuple(module_key(p) for p, _ in targets)


def remove(model: nnx.Module) -> None:
    """Replaces every adapter by its base layer, in place (merge a subject first to keep its effect)."""
    for path, adapter in list(iter_adapters(model)):
        _replace(model, path, adapter.base)
