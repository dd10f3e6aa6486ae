"""LoRA files in and out: diffusers/PEFT (``lora_A``/``lora_B``) and kohya (``lora_down``/``lora_up``/``alpha``).

Export writes one subject's adapter in the standard two-factor form ``ΔW = B·A`` with scale 1:

* ``A = D`` — Linear ``(r_d, in)``; Conv ``(r_d, in, kh, kw)`` (torch layouts),
* ``B = s·(M·U)ᵀ`` — Linear ``(out, r_d)``; Conv ``(out, r_d, 1, 1)``,
* ``alpha = r_d``, so loaders apply ``alpha / r = 1`` and ``B·A`` is exactly our ``s·D·M·U`` (in torch layout).

The three-factor adapter has rank ≤ min(r_d, r_m) but is written at rank ``r_d``: exact, and A stays the
shared Meta-Down, so files from different subjects of one meta-model share their ``lora_A`` tensors.

Import reads such files back into two-factor adapters (``mid_rank=None``): ``D = A``, ``U = (scale_file / s)·B``
with ``scale_file = alpha / r`` (PEFT ``use_rslora``: ``alpha / sqrt(r)``; no alpha anywhere: ``alpha = r``).
File keys are resolved through the model's own module paths (kohya names are compared with the model's paths
written kohya-style, never split on ``_``). Every missing, unexpected and mis-shaped key is reported at once.

Only ``.safetensors`` is read or written; writes are atomic (temporary file + rename).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import pathlib
import re
from collections.abc import Callable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from metalora.lora.adapters import LoRAAdapter, LoRAConv, iter_adapters
from metalora.models.convert import PICKLE_SUFFIXES, CheckpointMismatchError, module_key, refuse_pickle

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
PEFT_WEIGHT_NAME = "adapter_model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers ≥ 0.35 reads LoraConfig kwargs from here
KOHYA_PREFIX = "lora_unet"
_OTHER_COMPONENTS = ("text_encoder", "text_encoder_2", "transformer", "unet", "prior", "controlnet")


class LoRAFileError(CheckpointMismatchError):
    """A LoRA file does not fit the model's adapters; the message lists every offending key."""


# ---------------------------------------------------------------------------------------------- factor layout
def two_factor(adapter: LoRAAdapter, subject: int) -> tuple[np.ndarray, np.ndarray]:
    """``(A, B)`` in torch layout with ``B·A == s·D·M·U`` (transposed to torch's ``(out, in, ...)``)."""
    down, mid, up = adapter.factors(subject)
    mu = up if mid is None else mid @ up  # (r_d, out)
    b = np.asarray(adapter.scale * mu, np.float32).T  # (out, r_d)
    down = np.asarray(down, np.float32)
    if isinstance(adapter, LoRAConv):
        return np.ascontiguousarray(down.transpose(3, 2, 0, 1)), np.ascontiguousarray(b[:, :, None, None])
    return np.ascontiguousarray(down.T), np.ascontiguousarray(b)


def _expected_shapes(adapter: LoRAAdapter, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    *kernel, fan_in, _ = adapter.down_shape
    if isinstance(adapter, LoRAConv):
        return (rank, fan_in, *kernel), (adapter.out_features, rank, 1, 1)
    return (rank, fan_in), (adapter.out_features, rank)


def _adapters(model: nnx.Module) -> dict[str, LoRAAdapter]:
    adapters = {module_key(path): adapter for path, adapter in iter_adapters(model)}
    if not adapters:
        raise ValueError(f"{type(model).__name__} carries no LoRA adapters (metalora.lora.inject first)")
    return adapters


def kohya_name(key: str, prefix: str = KOHYA_PREFIX) -> str:
    """``down_blocks.0.attentions.0.proj_in`` → ``lora_unet_down_blocks_0_attentions_0_proj_in``."""
    return f"{prefix}_{key.replace('.', '_')}"


# -------------------------------------------------------------------------------------------------- writing
def _atomic(path: pathlib.Path, write: Callable[[pathlib.Path], None]) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _write_safetensors(path: pathlib.Path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> pathlib.Path:
    if path.suffix != ".safetensors":
        raise ValueError(f"refusing to write '{path}': LoRA files are written as .safetensors only")
    return _atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def _rank_and_patterns(ranks: dict[str, int]) -> tuple[int, dict[str, int]]:
    """PEFT's convention: one ``r`` (the most common) plus a ``rank_pattern`` for the exceptions."""
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    return r, {key: rank for key, rank in ranks.items() if rank != r}


def export_diffusers(model: nnx.Module, subject: int, out_dir: str | pathlib.Path, *, prefix: str = "unet",
                     weight_name: str = DIFFUSERS_WEIGHT_NAME) -> pathlib.Path:
    """Writes subject ``subject``'s adapter as ``<out_dir>/pytorch_lora_weights.safetensors`` + ``adapter_config.json``.

    Keys ``<prefix>.<module path>.lora_A.weight`` / ``.lora_B.weight``; the header carries diffusers'
    ``lora_adapter_metadata`` (``r``, ``lora_alpha = r``, target modules), so
    ``UNet2DConditionModel.load_lora_adapter(out_dir, prefix="unet")`` and pipelines'
    ``load_lora_weights(out_dir)`` reproduce our adapted UNet. Returns the weights path.
    """
    out_dir = pathlib.Path(out_dir)
    adapters = _adapters(model)
    tensors, ranks = {}, {}
    for key, adapter in adapters.items():
        a, b = two_factor(adapter, subject)
        tensors[f"{prefix}.{key}.lora_A.weight"] = a
        tensors[f"{prefix}.{key}.lora_B.weight"] = b
        ranks[key] = adapter.rank
    r, rank_pattern = _rank_and_patterns(ranks)
    lora_config = {"r": r, "lora_alpha": r, "rank_pattern": rank_pattern, "alpha_pattern": dict(rank_pattern),
                   "target_modules": sorted(adapters), "use_rslora": False, "use_dora": False, "lora_bias": False}
    metadata = {"format": "pt",
                LORA_ADAPTER_METADATA_KEY: json.dumps({f"{prefix}.{k}": v for k, v in lora_config.items()},
                                                      sort_keys=True)}
    path = _write_safetensors(out_dir / weight_name, tensors, metadata)
    first = next(iter(adapters.values()))
    config = {"peft_type": "LORA", "bias": "none", **lora_config,
              "metalora": {"subject": subject, "rank": first.rank, "mid_rank": first.mid_rank,
                           "scale": first.scale, "down_role": first.down_role}}
    _atomic(out_dir / ADAPTER_CONFIG_NAME, lambda tmp: tmp.write_text(json.dumps(config, indent=2, sort_keys=True)))
    return path


def export_kohya(model: nnx.Module, subject: int, path: str | pathlib.Path, *,
                 prefix: str = KOHYA_PREFIX) -> pathlib.Path:
    """Writes subject ``subject``'s adapter in kohya's format: ``<prefix>_<path with _>.lora_down/lora_up/alpha``."""
    tensors, ranks = {}, {}
    for key, adapter in _adapters(model).items():
        a, b = two_factor(adapter, subject)
        name = kohya_name(key, prefix)
        tensors[f"{name}.lora_down.weight"] = a
        tensors[f"{name}.lora_up.weight"] = b
        tensors[f"{name}.alpha"] = np.asarray(adapter.rank, np.float32)
        ranks[key] = adapter.rank
    r, _ = _rank_and_patterns(ranks)
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(r), "ss_network_alpha": str(r)}
    return _write_safetensors(pathlib.Path(path), tensors, metadata)


# -------------------------------------------------------------------------------------------------- reading
@dataclasses.dataclass(frozen=True)
class LoRAPair:
    """One layer's two-factor LoRA as stored: ``ΔW = scale·B·A`` in torch layout."""

    a: np.ndarray
    b: np.ndarray
    scale: float


def _read_safetensors(path: pathlib.Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    if path.suffix in PICKLE_SUFFIXES:
        refuse_pickle(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"'{path}' is not a .safetensors file; only safetensors LoRA files are read")
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file '{path}' not found")
    with safe_open(str(path), framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def _resolve_path(path: str | pathlib.Path) -> pathlib.Path:
    path = pathlib.Path(path)
    if path.is_dir():
        for name in (DIFFUSERS_WEIGHT_NAME, PEFT_WEIGHT_NAME):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"no {DIFFUSERS_WEIGHT_NAME} or {PEFT_WEIGHT_NAME} in '{path}'")
    return path


def _peft_alpha_rule(config: Mapping) -> Callable[[str, int], float]:
    """``scale(module key, rank)`` from LoraConfig kwargs (``lora_alpha``, ``alpha_pattern``, ``use_rslora``)."""
    alpha = config.get("lora_alpha")
    patterns = config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora", False))

    def scale(key: str, rank: int) -> float:
        a = alpha if alpha is not None else rank
        for pattern, value in patterns.items():  # PEFT: a pattern matches the module name or a dotted suffix
            if re.match(rf"(.*\.)?({pattern.removeprefix('^')})$", key):
                a = value
                break
        return a / math.sqrt(rank) if rslora else a / rank
    return scale


def read_lora_file(path: str | pathlib.Path, *, prefix: str = "unet") -> tuple[str, dict[str, LoRAPair],
                                                                               list[str]]:
    """``(format, {layer name: LoRAPair}, unrecognised keys)`` for a diffusers, PEFT or kohya LoRA file.

    Layer names are the file's own (dotted module paths for diffusers/PEFT; kohya names for kohya). Keys of
    other diffusers components (e.g. ``text_encoder.``) are skipped; keys that are neither LoRA factors nor
    alphas are returned as unrecognised.
    """
    path = _resolve_path(path)
    tensors, metadata = _read_safetensors(path)
    if any(k.startswith(f"{KOHYA_PREFIX}_") for k in tensors):
        fmt, pairs, unknown = "kohya", collections.defaultdict(dict), []
        for key, value in tensors.items():
            if not key.startswith(f"{KOHYA_PREFIX}_"):
                if not key.startswith(("lora_te", "lora_te1_", "lora_te2_")):
                    unknown.append(key)
                continue
            m = re.fullmatch(r"(.+)\.(lora_down\.weight|lora_up\.weight|alpha)", key)
            if m is None:
                unknown.append(key)
                continue
            pairs[m.group(1)][m.group(2).split(".")[0]] = value
        out = {}
        for name, parts in pairs.items():
            if "lora_down" not in parts or "lora_up" not in parts:
                unknown.extend(f"{name}.{p}" for p in parts)
                continue
            rank = parts["lora_down"].shape[0]
            alpha = float(parts["alpha"]) if "alpha" in parts else float(rank)
            out[name] = LoRAPair(parts["lora_down"], parts["lora_up"], alpha / rank)
        return fmt, out, unknown

    config: dict = {}
    if LORA_ADAPTER_METADATA_KEY in metadata:
        raw = json.loads(metadata[LORA_ADAPTER_METADATA_KEY])
        config = {k.removeprefix(f"{prefix}."): v for k, v in raw.items() if k.startswith(f"{prefix}.")} or raw
    elif (path.parent / ADAPTER_CONFIG_NAME).is_file():
        config = json.loads((path.parent / ADAPTER_CONFIG_NAME).read_text())
    fmt = "peft" if any(k.startswith("base_model.model.") for k in tensors) else "diffusers"
    parts, unknown, alphas = collections.defaultdict(dict), [], {}
    for key, value in tensors.items():
        head = key.split(".", 1)[0]
        if head in _OTHER_COMPONENTS and head != prefix:
            continue  # another pipeline component's LoRA (e.g. a text encoder's)
        # diffusers pipelines prefix the component ("unet."), PEFT's save_pretrained "base_model.model.",
        # a model's own save_lora_adapter nothing.
        stem = key.removeprefix(f"{prefix}.").removeprefix("base_model.model.")
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B)(\.default)?\.weight", stem)
        if m:
            parts[m.group(1)][m.group(2)] = value
        elif stem.endswith(".alpha") and value.size == 1:  # diffusers' network_alphas style
            alphas[stem.removesuffix(".alpha")] = float(value)
        else:
            unknown.append(key)
    rule = _peft_alpha_rule(config)
    out = {}
    for name, p in parts.items():
        if "lora_A" not in p or "lora_B" not in p:
            unknown.extend(f"{name}.{x}.weight (its partner is missing)" for x in p)
            continue
        rank = p["lora_A"].shape[0]
        scale = alphas[name] / rank if name in alphas else rule(name, rank)
        out[name] = LoRAPair(p["lora_A"], p["lora_B"], scale)
    return fmt, out, unknown


def import_lora(model: nnx.Module, path: str | pathlib.Path, *, subject: int = 0, prefix: str = "unet") -> str:
    """Loads a diffusers/PEFT/kohya LoRA file into the model's two-factor adapters (subject ``subject``).

    Adapters must exist (``inject`` with ``mid_rank=None`` and the file's rank and targets). If ``D`` has the
    meta role it is shared, so the file's ``A`` is written for every subject. Returns the detected format.
    Raises ``LoRAFileError`` naming every missing, unexpected and mis-shaped key; nothing is written then.
    """
    fmt, pairs, unknown = read_lora_file(path, prefix=prefix)
    adapters = _adapters(model)
    if fmt == "kohya":
        file_key = {key: kohya_name(key) for key in adapters}
        clashes = [n for n, c in collections.Counter(file_key.values()).items() if c > 1]
        if clashes:
            raise ValueError(f"module paths collide when written kohya-style: {clashes}")
        label = lambda key: file_key[key]
    else:
        file_key = {key: key for key in adapters}
        label = lambda key: f"{key}.lora_A/lora_B"
    three = [key for key, a in adapters.items() if a.mid_rank is not None]
    if three:
        raise ValueError(f"import_lora needs two-factor adapters (mid_rank=None); {len(three)} have a Mid factor, "
                         f"e.g. '{three[0]}'")
    missing, mismatched, planned = [], [], []
    for key, adapter in adapters.items():
        pair = pairs.get(file_key[key])
        if pair is None:
            missing.append(label(key))
            continue
        want_a, want_b = _expected_shapes(adapter, adapter.rank)
        if pair.a.shape != want_a or pair.b.shape != want_b:
            mismatched.append(f"{label(key)}: file A {pair.a.shape}, B {pair.b.shape}; model expects A {want_a}, "
                              f"B {want_b} (rank {adapter.rank})")
            continue
        planned.append((adapter, pair))
    unexpected = sorted(set(pairs) - set(file_key.values())) + sorted(unknown)
    if missing or unexpected or mismatched:
        lines = [f"LoRA file '{path}' ({fmt}) does not match the model's adapters"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if items:
                lines.append(f"{len(items)} {title}:")
                lines.extend(f"  {item}" for item in items)
        raise LoRAFileError("\n".join(lines))
    for adapter, pair in planned:
        if isinstance(adapter, LoRAConv):
            down, up = pair.a.transpose(2, 3, 1, 0), pair.b[:, :, 0, 0].T
        else:
            down, up = pair.a.T, pair.b.T
        up = (pair.scale / adapter.scale) * up
        _write_factor(adapter.lora_down, down, subject if adapter.down_role == "subject" else None)
        _write_factor(adapter.lora_up, up, subject)
    return fmt


def _write_factor(variable: nnx.Variable, value: np.ndarray, subject: int | None) -> None:
    value = jnp.asarray(value, variable.dtype)
    variable[...] = value if subject is None else variable[...].at[subject].set(value)
