"""Does the stacked ID encoder carry identity? Held-out loss with each subject's own reference vs another's.

    python -m benchmarks.stacked_id_gain [--track ""|lfw] [--identities 8] [--folder <id_encoder folder>] \
        [--out runs/stacked_id_gain.json]

For each test identity of the benchmark protocol (``configs/meta_phd_tiny.py[:lfw]``), the ``stacked_id`` method's
held-out denoising loss (the identity's held-out photos, fixed noise draws) is computed twice: conditioned on the ID
tokens of the identity's own reference shot, and on those of the next identity's reference (references rolled by
one). An encoder that encodes identity gives ``other - own > 0`` on most identities; a gain that is the same for
every reference (a better fit to the data in general, e.g. the LoRA trained with the encoder) cancels here.
Prints the paired difference (mean ± 1.96 SE) and writes every number to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from configs import meta_phd_tiny
from metalora import host
from metalora.compiler import jit
from metalora.data import builders
from metalora.eval import benchmark
from metalora.eval import harness as H
from metalora.models import base_model as bm
from metalora.train.io import atomic_write_text


def identity_gain(track: str, identities: int, repeats: int = 4, folder: str = "") -> dict:
    """``folder``: an ID encoder written by ``experiments/train_id_encoder.py`` ("" = the benchmark config's)."""
    config = meta_phd_tiny.get_config(track)
    config.protocol.num_identities = identities
    if folder:
        config.method.stacked_id.folder = folder
    model, params = bm.load_base(config.base.path)
    builder = builders.prepare(builders.track_builder(config.data, resolution=model.resolution))
    tests = benchmark.choose_tests(config, builders.data_source(builder, config.protocol.split, decode_images=False))
    subjects = H.load_subjects(model, params["text_encoder"], builders.data_source(builder, config.protocol.split),
                               tests, max_heldout=config.protocol.max_heldout, seeds_per_prompt=1, max_prompts=1)
    method = benchmark.build_method("stacked_id", config, model, params, pathlib.Path(config.method.stacked_id.folder))
    embeds = jax.vmap(method.init_from_shots)(jax.random.split(jax.random.key(0), subjects.count), subjects.shots)
    keys = jax.random.split(jax.random.key(7), repeats)

    @jit
    def heldout(e):
        return jax.vmap(lambda one, photos: jnp.mean(jax.vmap(lambda k: method.eval_loss(one, photos, k))(keys)))(
            e, subjects.heldout)

    own, other = np.asarray(heldout(embeds)), np.asarray(heldout(jnp.roll(embeds, 1, axis=0)))
    diff = other - own
    return {"track": track or "world", "encoder": config.method.stacked_id.folder, "identities": subjects.identities,
            "own": own.tolist(), "other": other.tolist(), "mean_diff": float(diff.mean()),
            "half_width_1.96se": float(1.96 * diff.std(ddof=1) / np.sqrt(len(diff))),
            "own_lower": int((diff > 0).sum())}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--track", default="", help="'' (procedural world) or 'lfw'")
    parser.add_argument("--identities", type=int, default=8)
    parser.add_argument("--folder", default="", help="ID encoder folder ('' = the benchmark config's)")
    parser.add_argument("--out", default="runs/stacked_id_gain.json")
    args = parser.parse_args(argv)
    result = identity_gain(args.track, args.identities, folder=args.folder)
    print(f"{result['track']}: {len(result['identities'])} identities, held-out loss with another's reference − with "
          f"the own: {result['mean_diff']:.2e} ± {result['half_width_1.96se']:.2e}; own lower for "
          f"{result['own_lower']}/{len(result['identities'])}")
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    host.reexec_with_malloc_tunables()  # before any work: see metalora/host.py
    main()
