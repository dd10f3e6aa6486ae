"""Draw a PNG grid from a text-to-image model: one row per prompt, one column per seed.

    python -m experiments.sample --out grid.png \\
        --prompt "a photo of a person wearing red glasses, on a blue background" --prompt "a photo of a person" \\
        [--model assets/base_tiny] [--seeds 4] [--steps 50] [--guidance 3.0] [--eta 0.0] [--seed 0]

``--model`` is a pipeline folder; its ``model_index.json`` ``_class_name`` picks the loader in ``PIPELINE_LOADERS``.
Our base models (``MetaloraBaseModel``) and diffusers ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline``
folders (``metalora.models.pipeline``: UNet, CLIP encoders, VAE) are supported.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
from collections.abc import Callable, Sequence

import jax
import numpy as np

from metalora import host
from metalora.models import base_model as bm
from metalora.train.io import save_image_grid

__all__ = ["PIPELINE_LOADERS", "Pipeline", "load_pipeline", "main", "sample_grid"]


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """What the CLI needs: ``draw(prompts, keys, *, num_inference_steps, guidance_scale, eta) -> (B, H, W, C) in
    [0, 1]`` with one key per prompt."""

    name: str
    draw: Callable[..., np.ndarray]


def _load_metalora_base(path: pathlib.Path) -> Pipeline:
    model, params = bm.load_base_model(path)

    def draw(prompts, keys, *, num_inference_steps, guidance_scale, eta):
        return bm.sample(model, params, prompts, keys, num_inference_steps=num_inference_steps,
                         guidance_scale=guidance_scale, eta=eta)

    return Pipeline(name=f"{path} ({model!r})", draw=draw)


def _load_stable_diffusion(path: pathlib.Path) -> Pipeline:
    """A diffusers Stable Diffusion / SDXL folder (UNet, CLIP encoders, VAE; safetensors only), sampled with DDIM."""
    from metalora.models.pipeline import load_pipeline as load_sd

    pipe = load_sd(path)

    def draw(prompts, keys, *, num_inference_steps, guidance_scale, eta):
        return np.asarray(pipe.sample(list(prompts), keys=keys, num_inference_steps=num_inference_steps,
                                      guidance_scale=guidance_scale, eta=eta))

    return Pipeline(name=f"{path} ({pipe.pipeline_class})", draw=draw)


# model_index.json _class_name -> loader(folder) -> Pipeline
PIPELINE_LOADERS: dict[str, Callable[[pathlib.Path], Pipeline]] = {
    "MetaloraBaseModel": _load_metalora_base,
    "StableDiffusionPipeline": _load_stable_diffusion,
    "StableDiffusionXLPipeline": _load_stable_diffusion,
}


def load_pipeline(path: str | pathlib.Path | None = None) -> Pipeline:
    """The pipeline in folder ``path`` (default: the pretrained base in ``assets/base_tiny``)."""
    path = pathlib.Path(path) if path is not None else bm.DEFAULT_BASE_CHECKPOINT
    index_path = path / "model_index.json"
    if not index_path.is_file():
        raise FileNotFoundError(f"{path} is not a pipeline folder: {index_path} is missing")
    class_name = json.loads(index_path.read_text()).get("_class_name")
    if class_name not in PIPELINE_LOADERS:
        raise ValueError(f"{index_path}: _class_name={class_name!r} has no loader; supported: "
                         f"{sorted(PIPELINE_LOADERS)} (register one in experiments.sample.PIPELINE_LOADERS)")
    return PIPELINE_LOADERS[class_name](path)


def sample_grid(pipeline: Pipeline, prompts: Sequence[str], *, seeds: int, seed: int = 0, num_inference_steps: int = 50,
                guidance_scale: float = 3.0, eta: float = 0.0) -> np.ndarray:
    """(len(prompts)·seeds, H, W, C) images, prompt-major. Column j uses the same key for every prompt, so a
    column shows one starting noise under different prompts."""
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    column_keys = jax.random.split(jax.random.key(seed), seeds)
    keys = jax.numpy.concatenate([column_keys] * len(prompts))
    flat = [p for p in prompts for _ in range(seeds)]
    return pipeline.draw(flat, keys, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, eta=eta)


def main(argv: Sequence[str] | None = None) -> pathlib.Path:
    parser = argparse.ArgumentParser(prog="python -m experiments.sample", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="pipeline folder (default: assets/base_tiny)")
    parser.add_argument("--prompt", action="append", required=True, help="repeat for several rows")
    parser.add_argument("--seeds", type=int, default=4, help="images per prompt (grid columns)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale")
    parser.add_argument("--eta", type=float, default=0.0)
    parser.add_argument("--out", required=True, help="output PNG path")
    args = parser.parse_args(argv)
    try:
        pipeline = load_pipeline(args.model)
        images = sample_grid(pipeline, args.prompt, seeds=args.seeds, seed=args.seed, num_inference_steps=args.steps,
                             guidance_scale=args.guidance, eta=args.eta)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    out = save_image_grid(images, args.out, nrow=args.seeds)
    print(out)
    return out


if __name__ == "__main__":
    host.reexec_with_malloc_tunables()  # before any work: see metalora/host.py
    main()
