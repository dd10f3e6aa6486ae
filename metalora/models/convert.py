"""Loading PyTorch-layout safetensors checkpoints (diffusers / transformers) into NNX modules, without torch.

The mapping from a torch state dict to our modules is mechanical because our module attribute paths mirror
the torch module paths: the parameter ``down_blocks.1.attentions.0.proj_in.weight`` lives in our module at
``down_blocks[1].attentions[0].proj_in``. What differs is only each layer type's tensor layout, handled by
``_LAYOUTS`` keyed on the NNX module *type* (never on names):

* ``nnx.Linear``: torch ``weight`` (out, in) → ``kernel`` (in, out).
* ``nnx.Conv``: torch ``weight`` (out, in, kh, kw) → ``kernel`` (kh, kw, in, out) — we compute in NHWC.
* ``nnx.GroupNorm`` / ``nnx.LayerNorm``: ``weight`` → ``scale``.
* ``nnx.Embed``: ``weight`` → ``embedding``.

Only ``.safetensors`` files are read: pickled checkpoints (``.bin``, ``.pt``, ``.ckpt``) can execute code on
load, so they are refused with an explanation instead.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable, Iterator, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model: lists every missing, unexpected and mis-shaped key."""


def _torch_to_linear(w: np.ndarray) -> np.ndarray:
    return w.T


def _torch_to_conv(w: np.ndarray) -> np.ndarray:
    return w.transpose(2, 3, 1, 0)


def _identity(w: np.ndarray) -> np.ndarray:
    return w


# module type -> {our attribute: (torch tensor name, torch->ours transform, ours->torch transform)}
_LAYOUTS: dict[type, dict[str, tuple[str, Callable, Callable]]] = {
    nnx.Linear: {"kernel": ("weight", _torch_to_linear, lambda k: k.T), "bias": ("bias", _identity, _identity)},
    nnx.Conv: {
        "kernel": ("weight", _torch_to_conv, lambda k: k.transpose(3, 2, 0, 1)),
        "bias": ("bias", _identity, _identity),
    },
    nnx.GroupNorm: {"scale": ("weight", _identity, _identity), "bias": ("bias", _identity, _identity)},
    nnx.LayerNorm: {"scale": ("weight", _identity, _identity), "bias": ("bias", _identity, _identity)},
    nnx.Embed: {"embedding": ("weight", _identity, _identity)},
}


def register_layout(module_type: type, layout: dict[str, tuple[str, Callable, Callable]]) -> None:
    """Teach the converter a new parameter-holding module type (e.g. a LoRA wrapper's base layer)."""
    _LAYOUTS[module_type] = layout


def module_key(path: tuple) -> str:
    """NNX module path → dotted torch module name: ('down_blocks', 0, 'resnets', 1) → 'down_blocks.0.resnets.1'."""
    return ".".join(str(p) for p in path)


def _layout_for(module: nnx.Module) -> dict[str, tuple[str, Callable, Callable]] | None:
    for module_type in type(module).__mro__:
        if module_type in _LAYOUTS:
            return _LAYOUTS[module_type]
    return None


def iter_torch_parameters(model: nnx.Module, prefix: str = "") -> Iterator[tuple[str, nnx.Module, str, str]]:
    """Yields (torch key, module, our attribute, torch tensor name) for every parameter a torch twin would hold.

    Modules are visited through the graph, so a parameter-holding type we do not know is an error rather
    than a silently skipped tensor.
    """
    for path, module in nnx.iter_modules(model):
        own = [name for name, value in vars(module).items() if isinstance(value, nnx.Param)]
        if not own:
            continue
        layout = _layout_for(module)
        if layout is None:
            raise TypeError(f"no torch layout registered for {type(module).__name__} at '{module_key(path)}'")
        for attr in own:
            if attr not in layout:
                raise TypeError(f"{type(module).__name__}.{attr} at '{module_key(path)}' has no torch layout")
            base = module_key(path)
            key = f"{prefix}{base}.{layout[attr][0]}" if base else f"{prefix}{layout[attr][0]}"
            yield key, module, attr, layout[attr][0]


def assign_torch_state(model: nnx.Module, tensors: Mapping[str, np.ndarray], *, prefix: str = "",
                       ignore_unexpected: Callable[[str], bool] | None = None) -> None:
    """Writes torch-layout ``tensors`` into ``model`` in place, casting to each parameter's dtype.

    Checks the whole checkpoint before writing anything, and raises one ``CheckpointMismatchError`` listing
    every missing key, unexpected key and shape mismatch (path and both shapes), so that a wrong config is
    diagnosed in one run.
    """
    planned, missing, mismatched, used = [], [], [], set()
    for key, module, attr, _ in iter_torch_parameters(model, prefix):
        variable = getattr(module, attr)
        if key not in tensors:
            missing.append(f"{key} (model shape {tuple(variable.shape)})")
            continue
        used.add(key)
        converted = _layout_for(module)[attr][1](np.asarray(tensors[key]))
        if converted.shape != tuple(variable.shape):
            mismatched.append(f"{key}: checkpoint {tuple(tensors[key].shape)} → {converted.shape} in our layout, "
                              f"model expects {tuple(variable.shape)}")
            continue
        planned.append((variable, converted))
    unexpected = sorted(k for k in tensors if k not in used and k.startswith(prefix)
                        and not (ignore_unexpected and ignore_unexpected(k)))
    if missing or unexpected or mismatched:
        lines = []
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if items:
                lines.append(f"{len(items)} {title}:")
                lines.extend(f"  {item}" for item in items)
        raise CheckpointMismatchError("checkpoint does not match the model\n" + "\n".join(lines))
    for variable, value in planned:
        variable[...] = jnp.asarray(value, dtype=variable.dtype)


def export_torch_state(model: nnx.Module, *, prefix: str = "") -> dict[str, np.ndarray]:
    """The inverse of ``assign_torch_state``: our parameters in torch layout (for saving diffusers files)."""
    out = {}
    for key, module, attr, _ in iter_torch_parameters(model, prefix):
        out[key] = np.ascontiguousarray(_layout_for(module)[attr][2](np.asarray(getattr(module, attr)[...])))
    return out


def refuse_pickle(path: pathlib.Path) -> None:
    raise ValueError(
        f"refusing to load '{path}': pickle-based checkpoints ({', '.join(PICKLE_SUFFIXES)}) can run arbitrary code "
        "when loaded. Convert it to safetensors first (in a trusted environment: "
        "`diffusers`' save_pretrained(..., safe_serialization=True)), then point metalora at that folder."
    )


def load_safetensors(folder: str | pathlib.Path, weights_name: str) -> dict[str, np.ndarray]:
    """Reads ``<folder>/<weights_name>.safetensors`` or its sharded form (``.safetensors.index.json``).

    ``weights_name`` is the stem, e.g. ``"diffusion_pytorch_model"`` or ``"model"``. Pickle files in the
    folder with no safetensors twin get a clear refusal instead of a 'file not found'.
    """
    folder = pathlib.Path(folder)
    single = folder / f"{weights_name}.safetensors"
    index = folder / f"{weights_name}.safetensors.index.json"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        tensors: dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            tensors.update(load_file(str(folder / shard)))
        absent = sorted(set(weight_map) - set(tensors))
        if absent:
            raise CheckpointMismatchError(f"{index} lists tensors its shards do not contain: {absent[:20]}")
        return tensors
    for suffix in PICKLE_SUFFIXES:
        pickled = folder / f"{weights_name}{suffix}"
        if pickled.is_file():
            refuse_pickle(pickled)
    raise FileNotFoundError(f"no {single.name} or {index.name} in {folder}")


def load_config(folder: str | pathlib.Path, name: str = "config.json") -> dict:
    path = pathlib.Path(folder) / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: expected a diffusers/transformers model folder")
    return json.loads(path.read_text())
