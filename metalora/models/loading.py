"""Building our NNX models from diffusers-format folders on disk (no torch needed)."""

from __future__ import annotations

import pathlib

import jax.numpy as jnp
from flax import nnx

from metalora.models.controlnet import ControlNetConfig, ControlNetModel
from metalora.models.convert import assign_torch_state, load_config, load_safetensors
from metalora.models.unet import UNet2DConditionModel, UNetConfig


def _component_folder(path: str | pathlib.Path, subfolder: str) -> pathlib.Path:
    """Accepts either the component folder itself or a pipeline folder that contains it."""
    path = pathlib.Path(path)
    if (path / "config.json").is_file():
        return path
    if (path / subfolder / "config.json").is_file():
        return path / subfolder
    raise FileNotFoundError(f"neither {path}/config.json nor {path}/{subfolder}/config.json exists")


def load_unet(path: str | pathlib.Path, *, dtype=jnp.float32, param_dtype=jnp.float32, attention_backend: str = "auto",
              remat: bool = False) -> UNet2DConditionModel:
    """Loads a diffusers ``UNet2DConditionModel`` folder (``config.json`` + safetensors, sharded or not)."""
    return _load_component(path, "unet", UNetConfig.from_diffusers, lambda config: UNet2DConditionModel(
        config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype, attention_backend=attention_backend,
        remat=remat))


def load_controlnet(path: str | pathlib.Path, *, dtype=jnp.float32, param_dtype=jnp.float32,
                    attention_backend: str = "auto", remat: bool = False) -> ControlNetModel:
    """Loads a diffusers ``ControlNetModel`` folder (``config.json`` + safetensors), or a pipeline's ``controlnet/``."""
    return _load_component(path, "controlnet", ControlNetConfig.from_diffusers, lambda config: ControlNetModel(
        config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype, attention_backend=attention_backend,
        remat=remat))


def _load_component(path, subfolder: str, parse_config, build):
    """A diffusers model folder → our module: parse its config, build it, assign its safetensors weights."""
    folder = _component_folder(path, subfolder)
    config = parse_config(load_config(folder))
    tensors = load_safetensors(folder, "diffusion_pytorch_model")
    # Build abstractly, then materialise: random init of an SD-size model would cost seconds for nothing.
    model = nnx.eval_shape(lambda: build(config))
    _materialize(model)
    assign_torch_state(model, tensors)
    return model


def _materialize(model: nnx.Module) -> None:
    """Replaces abstract (ShapeDtypeStruct) parameters with zero arrays so they can be assigned in place."""
    for _, variable in nnx.iter_graph(model):
        if isinstance(variable, nnx.Variable):
            raw = variable.get_value() if hasattr(variable, "get_value") else variable[...]
            if hasattr(raw, "shape") and not hasattr(raw, "devices"):
                variable.set_value(jnp.zeros(raw.shape, raw.dtype))
