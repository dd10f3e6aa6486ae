"""MegaPortrait-style portraits in the procedural world: does each step keep identity and take the template's look?

    python -m benchmarks.megaportrait --config configs/megaportrait_tiny.py --workdir runs/megaportrait

For each held-out test identity (the benchmark protocol of ``configs/meta_phd_tiny.py``), the personalisation method
(``meta_lora`` by default) adapts on its reference shot(s); then, for ``templates`` photos of *other* test identities,
every row of the table makes one image per (identity, template):

* ``template``: the template photo itself (its attributes by definition; someone else's identity);
* ``prompt_only``: the personalised model prompted with the template's caption (what text alone gets);
* ``identity`` / ``shading`` / ``pasted`` / ``portrait``: the pipeline's steps (``metalora.meta.megaportrait``);
  ``pasted`` is the shaded head in the template without harmonisation;
* ``base_portrait``: the whole pipeline on the *base* UNet (no personalisation): how much identity the
  personalisation, not the template, brings.

Scores (the world's probes): R-FaceSim to the subject's held-out photos (identity kept), FaceSim to the template
(identity copied from it, lower is better), the attribute probe's accuracy on the template's pose, expression,
lighting and background (the look taken), and on all six attributes. Mean ± 95% CI over identities × templates.
Writes ``results.json``, ``table.md`` and ``grid.png``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from metalora.config_utils import config_to_dict, run_cli
from metalora.data import builders, world
from metalora.eval import benchmark
from metalora.eval import harness as H
from metalora.eval import metrics as M
from metalora.eval import probes as P
from metalora.meta import megaportrait as mp
from metalora.meta.inner import InnerLoopConfig
from metalora.models import base_model as bm
from metalora.train.io import atomic_write_text, save_image_grid

ROWS = ("template", "prompt_only", "identity", "shading", "pasted", "portrait", "base_portrait")
LOOK = ("pose", "expression", "lighting", "background")  # what the template, not the prompt's words, must give
# (row, reference row) pairs whose differences the table pairs per identity × template: the rows share templates,
# prompts and noise, so the spread between identities and templates cancels. The personalisation's own contribution
# is portrait − base_portrait (R-FaceSim is not 0 for a stranger in this world: template photos score ~0.28), and
# the pipeline's over text alone is portrait − prompt_only.
PAIRED = (("portrait", "base_portrait"), ("portrait", "prompt_only"))


@dataclasses.dataclass(frozen=True)
class Template:
    identity: int
    record: int
    image: np.ndarray  # uint8 (H, W, 3)
    attributes: dict[str, str]
    jitter: np.ndarray


def choose_templates(source, tests, per_subject: int, seed: int) -> list[list[Template]]:
    """Per test identity, ``per_subject`` photos of the *other* test identities (seeded, never its own)."""
    rng = np.random.default_rng(np.random.SeedSequence([11, seed]))
    by_identity = {t.identity: [*t.references, *t.heldout] for t in tests}
    out = []
    for t in tests:
        others = [(i, r) for i, records in by_identity.items() if i != t.identity for r in records]
        if len(others) < per_subject:
            raise ValueError(f"{len(others)} photos of other test identities, fewer than templates={per_subject}")
        picks = rng.choice(len(others), per_subject, replace=False)
        chosen = []
        for p in picks:
            identity, record = others[int(p)]
            ex = source[int(record)]
            chosen.append(Template(identity, int(record), np.asarray(ex["image"], np.uint8),
                                   world.attributes_from_ids(ex["attributes"]), np.asarray(ex["jitter"], np.float32)))
        out.append(chosen)
    return out


def personalize(config: ml_collections.ConfigDict, model, params, subjects: H.Subjects, workdir: pathlib.Path):
    """Adapt every subject with the configured method; returns ``(method, trainables with a subject axis, seconds)``."""
    name = config.personalize.method
    method = benchmark.build_method(name, config, model, params, workdir)
    a = config.adapt
    inner = InnerLoopConfig(steps=1, learning_rate=float(config.method[name].learning_rate), optimizer=a.optimizer,
                            batch_size=a.batch_size, flip=a.flip, max_shift=a.max_shift)
    start = time.perf_counter()
    run = H.run_method(method, model, subjects, seed=config.personalize.seed, eval_steps=(0, config.personalize.steps),
                       inner=inner, sample_steps=(), heldout_repeats=config.eval.heldout_repeats)
    return method, run.trainables, time.perf_counter() - start, {int(k): v.tolist() for k, v in
                                                                 run.heldout_loss.items()}


def load_controlnet(config: ml_collections.ConfigDict, model, params):
    if config.controlnet == "untrained":  # smoke runs: zero convolutions, i.e. the base model unchanged
        return mp.new_controlnet(model, params, key=jax.random.key(config.seed))
    return mp.load_portrait(model, config.controlnet)


def score(probes: P.Probes, images: np.ndarray, heldout: np.ndarray, templates: list[Template]) -> dict[str, list]:
    """Per image: R-FaceSim to ``heldout``, FaceSim to its template, attribute matches with its template."""
    emb = P.embed(probes.identity_encoder, images)
    held = P.embed(probes.identity_encoder, heldout)
    tmpl = P.embed(probes.identity_encoder, np.stack([t.image for t in templates]))
    predicted = P.predict_attributes(probes.attribute_classifier, images)
    truth = np.stack([world.attribute_ids(t.attributes) for t in templates])
    out: dict[str, list] = {"r_face_sim": M.r_face_sim_from_embeddings(emb, held).tolist(),
                            # image j against its own template j
                            "template_face_sim": np.diagonal(M.cosine_matrix(emb, tmpl)).tolist()}
    matches = {name: np.asarray(predicted[name]) == truth[:, i] for i, name in enumerate(world.ATTRIBUTE_NAMES)}
    for name in LOOK:
        out[name] = matches[name].astype(float).tolist()
    out["look"] = np.mean([matches[n] for n in LOOK], axis=0).tolist()
    out["all_attributes"] = np.mean(list(matches.values()), axis=0).tolist()
    return out


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, log=print) -> dict[str, Any]:
    workdir = pathlib.Path(workdir)
    t_start = time.perf_counter()
    model, params = bm.load_pixel_base(config.base.path, attention_backend=config.base.attention_backend,
                                        job="benchmarks/megaportrait.py")
    builder = builders.prepare(builders.track_builder(config.data, resolution=model.resolution))
    if config.data.source != "synth":
        raise ValueError("benchmarks/megaportrait: templates need the world's ground truth (data.source='synth')")
    source = builders.data_source(builder, config.protocol.split)
    tests = benchmark.choose_tests(config, builders.data_source(builder, config.protocol.split, decode_images=False))
    subjects = H.load_subjects(model, params["text_encoder"], source, tests, max_heldout=config.protocol.max_heldout,
                               seeds_per_prompt=1, max_prompts=1)
    templates = choose_templates(source, tests, config.templates, config.seed)
    probes = P.load_probes(config.probes) if config.probes else None
    portrait, controlnet = load_controlnet(config, model, params)
    method, trainables, adapt_seconds, heldout_loss = personalize(config, model, params, subjects, workdir)
    log(f"{subjects.count} identities {subjects.identities} adapted with {method.name} "
        f"({config.personalize.steps} steps) in {adapt_seconds:.0f} s; held-out loss {heldout_loss}")
    pc = mp.PortraitConfig(**config_to_dict(config.portrait))
    keys_of = functools.partial(_keys, config.seed, config.templates)
    images: dict[str, list[np.ndarray]] = {row: [] for row in ROWS}
    pipeline_seconds = []
    for s in range(subjects.count):
        chosen = templates[s]
        tmpl = np.stack([t.image for t in chosen])
        control = jnp.asarray(mp.template_controls(tmpl, [t.attributes for t in chosen], [t.jitter for t in chosen]))
        prompts = [world.make_caption(t.attributes, identifier=world.DEFAULT_IDENTIFIER) for t in chosen]
        ids = jnp.asarray(model.tokenize(prompts))
        personal = method.sampling_params(jax.tree.map(lambda x, s=s: x[s], trainables))
        keys = keys_of(s)
        tmpl_unit = jnp.asarray(tmpl, jnp.float32) / 255.0
        t0 = time.perf_counter()
        out = jax.device_get(mp.run(portrait, {"unet": personal["unet"], "controlnet": controlnet},
                                    personal["text_encoder"], tmpl_unit, control, ids, keys, pc))
        pipeline_seconds.append(time.perf_counter() - t0)
        base_out = mp.run(portrait, {"unet": params["unet"], "controlnet": controlnet}, params["text_encoder"],
                          tmpl_unit, control, ids, keys, pc)
        prompt_only = bm.sample_from_ids(model, personal, ids, keys, num_inference_steps=pc.num_inference_steps,
                                         guidance_scale=pc.guidance_scale)
        for row, arr in (("template", tmpl / 255.0), ("prompt_only", prompt_only), ("identity", out["identity"]),
                         ("shading", out["shading"]), ("pasted", out["pasted"]), ("portrait", out["harmonize"]),
                         ("base_portrait", base_out["harmonize"])):
            images[row].append(np.asarray(arr, np.float32))
    control_losses = held_out_control_losses(portrait, controlnet, params, templates, model, config.seed)
    log("denoising loss of the templates by control shown: " + ", ".join(f"{k} {v:.4f}"
                                                                         for k, v in control_losses.items()))
    records = {}
    if probes is not None:
        for row in ROWS:
            per = [score(probes, images[row][s], H.to_unit(subjects.heldout_photos[s]), templates[s])
                   for s in range(subjects.count)]
            records[row] = {metric: [v for p in per for v in p[metric]] for metric in per[0]}
    summary = {row: {metric: H.mean_ci(values) for metric, values in metrics.items()}
               for row, metrics in records.items()}
    paired = paired_differences(records)
    table = markdown(summary, paired)
    grid_path = grid(workdir / "grid.png", images, subjects, config.report.grid_identities)
    out = {"config": config_to_dict(config), "identities": subjects.identities,
           "templates": [[{"identity": t.identity, "record": t.record, "attributes": t.attributes} for t in ts]
                         for ts in templates],
           "personalization": {"method": method.name, "steps": config.personalize.steps,
                               "trainable_parameters": method.trainable_parameters, "seconds": adapt_seconds,
                               "heldout_loss": heldout_loss},
           "controlnet": {"path": config.controlnet,
                          "parameters": int(sum(np.prod(x.shape) for x in jax.tree.leaves(controlnet)))},
           # the first subject's call includes compilation
           "pipeline_seconds_per_subject": pipeline_seconds, "control_losses": control_losses, "records": records,
           "summary": {row: {m: list(v) for m, v in ms.items()} for row, ms in summary.items()},
           "paired": {name: {m: list(v) for m, v in ms.items()} for name, ms in paired.items()},
           "table": table, "grid": str(grid_path), "wall_time_s": time.perf_counter() - t_start}
    table += "\n\nDenoising loss of the template photos (base UNet, same noise draws) by the control groups shown:\n\n"
    table += "| " + " | ".join(control_losses) + " |\n" + "|---" * len(control_losses) + "|\n"
    table += "| " + " | ".join(f"{v:.4f}" for v in control_losses.values()) + " |"
    atomic_write_text(workdir / "table.md", table + "\n")
    atomic_write_text(workdir / "results.json", json.dumps(out, indent=1, default=float) + "\n")
    log(table)
    log(f"results: {workdir}")
    return out


CONTROL_SETS = {"none": (), "landmarks": ("landmarks",), "landmarks+shading": ("landmarks", "shading"),
                "all": ("landmarks", "shading", "inpaint")}


def held_out_control_losses(portrait, controlnet, params, templates: list[list[Template]], model, seed: int,
                            repeats: int = 8) -> dict[str, float]:
    """Does the ControlNet use each group? The base's denoising loss of every template photo (test identities, never
    trained on) without the ControlNet, then with it shown no control, landmarks, landmarks + shading, and every
    group, on the same noise draws."""
    flat = [t for ts in templates for t in ts]
    images = jnp.asarray(np.stack([t.image for t in flat]), jnp.float32) / 127.5 - 1.0
    ids = jnp.asarray(model.tokenize([world.make_caption(t.attributes) for t in flat]))
    control = jnp.asarray(mp.template_controls(np.stack([t.image for t in flat]), [t.attributes for t in flat],
                                               [t.jitter for t in flat]))
    key = jax.random.key(seed + 17)
    no_controlnet = jax.tree.map(jnp.zeros_like, controlnet)  # zero convolutions: the base alone
    base = float(mp.control_loss(portrait, no_controlnet, params, images, ids, control, key, groups=(),
                                 repeats=repeats))
    with_controlnet = {name: float(mp.control_loss(portrait, controlnet, params, images, ids, control, key,
                                                   groups=groups, repeats=repeats))
                       for name, groups in CONTROL_SETS.items()}
    return {"base": base} | with_controlnet


def _keys(seed: int, count: int, subject: int) -> jax.Array:
    """The same noise for every row of a subject (common random numbers)."""
    return jax.random.split(jax.random.fold_in(jax.random.key(seed + 31), subject), count)


def paired_differences(records: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, tuple[float, float, int]]]:
    """Mean ± 95% CI of ``row − reference`` per metric for the ``PAIRED`` rows, paired per identity × template."""
    out = {}
    for row, reference in PAIRED:
        if row in records and reference in records:
            out[f"{row} − {reference}"] = {
                metric: H.mean_ci(np.asarray(values) - np.asarray(records[reference][metric]))
                for metric, values in records[row].items()}
    return out


def markdown(summary, paired=None) -> str:
    metrics = ("r_face_sim", "template_face_sim", *LOOK, "look", "all_attributes")
    lines = ["| row | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for row, cells in summary.items():
        lines.append(f"| {row} | " + " | ".join(H.format_cell(cells[m]) for m in metrics) + " |")
    if paired:
        lines += ["", "Paired differences (per identity × template, same templates, prompts and noise):", "",
                  lines[0].replace("| row |", "| difference |"), lines[1]]
        for name, cells in paired.items():
            lines.append(f"| {name} | " + " | ".join(H.format_cell(cells[m], signed=True) for m in metrics) + " |")
    return "\n".join(lines)


def grid(path: pathlib.Path, images: dict[str, list[np.ndarray]], subjects: H.Subjects, max_identities: int):
    """Per identity and template: reference shot | template | prompt_only | identity | shading | pasted | portrait |
    base_portrait."""
    rows = []
    for s in range(min(max_identities, subjects.count)):
        reference = H.to_unit(subjects.shot_photos[s, 0])
        for j in range(images["template"][s].shape[0]):
            rows.append(np.stack([reference, *(images[row][s][j] for row in ROWS)]))
    return save_image_grid(np.concatenate(rows), path, nrow=len(ROWS) + 1)


def main(config, workdir: pathlib.Path):
    return run(config, workdir, log=functools.partial(print, flush=True))


if __name__ == "__main__":
    run_cli(main)
