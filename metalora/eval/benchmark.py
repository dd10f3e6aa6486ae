"""The Meta-PHD-style benchmark as one job: config in, ``results.json`` / ``table.md`` / plots / grids out.

Used by ``benchmarks/meta_phd/run.py`` (the full protocol), ``experiments/quickstart.py`` (one identity) and the
ablation runner. Resumable: every finished (method variant, seed) cell is written to ``<workdir>/cells/`` and
skipped on a rerun with the same config; a rerun with a changed config refuses stale cells instead of mixing them.
``config.reuse_cells_from`` names other runs' folders whose cells with the same fingerprint are copied in first (how a
benchmark too long for one sitting is continued from the cells shipped in ``assets/default_benchmark``).

Methods and learning rates come from ``config.methods`` and ``config.method.<name>.learning_rate``; a tuple of
learning rates is a sweep, run as variants named ``<name>@lr=<value>``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from metalora.config_utils import config_to_dict
from metalora.data import builders, protocol
from metalora.eval import harness as H
from metalora.eval import methods as methods_lib
from metalora.eval import probes as P
from metalora.meta.inner import InnerLoopConfig, diffusion_example_loss
from metalora.models import base_model as bm
from metalora.train.io import atomic_write_bytes, atomic_write_text, plot_curves, save_image_grid

RESULTS_FORMAT = 1


def variants(config: ml_collections.ConfigDict) -> list[tuple[str, str, float]]:
    """(variant name, method, learning rate) for every method and swept learning rate."""
    out = []
    for name in config.methods:
        if name not in methods_lib.METHODS:
            raise ValueError(f"config.methods: unknown method {name!r}; choose from {methods_lib.METHODS}")
        lrs = config.method[name].learning_rate
        lrs = tuple(lrs) if isinstance(lrs, (tuple, list)) else (lrs,)
        for lr in lrs:
            out.append((name if len(lrs) == 1 else f"{name}@lr={lr:g}", name, float(lr)))
    return out


def build_method(name: str, config: ml_collections.ConfigDict, model: bm.BaseModel, params: bm.BaseParams,
                 workdir: pathlib.Path) -> methods_lib.Method:
    example_loss = diffusion_example_loss(model.schedule, min_snr_gamma=config.adapt.min_snr_gamma or None)
    lc, mc = config.lora, config.method[name]
    if name in ("meta_lora", "lora"):
        meta_down = (mc.meta_down or str(workdir / "meta_down")) if name == "meta_lora" else None
        return methods_lib.lora_method(name, model, params, example_loss, targets=lc.targets, rank=lc.rank,
                                       mid_rank=lc.mid_rank, alpha=lc.alpha or None, meta_down=meta_down,
                                       key=jax.random.key(config.seed))
    if name == "dreambooth":
        prior_images = prior_prompt = None
        if mc.prior_weight > 0 and mc.prior_images > 0:
            prior_images, prior_prompt = class_images(model, params, mc.prior_images, config.seed,
                                                       config.sample.num_inference_steps, config.sample.guidance_scale)
        return methods_lib.dreambooth_method(model, params, example_loss, prior_images=prior_images,
                                             prior_prompt=prior_prompt, prior_weight=mc.prior_weight)
    if name == "textual_inversion":
        return methods_lib.textual_inversion_method(model, params, example_loss)
    if name == "stacked_id":
        folder = mc.folder or str(workdir / "id_encoder")
        return methods_lib.stacked_id_method(model, params, folder, start_merge_step=mc.start_merge_step,
                                             min_snr_gamma=config.adapt.min_snr_gamma or None)
    if name == "attn_dreambooth":
        if not len(mc.stage_steps) == len(mc.stage_learning_rates) == len(mc.stage_groups) == len(mc.reg_weights):
            raise ValueError("config.method.attn_dreambooth: stage_steps, stage_learning_rates, stage_groups and "
                             "reg_weights need one entry per stage")
        stages = [methods_lib.Stage(int(n), float(lr), tuple(g))
                  for n, lr, g in zip(mc.stage_steps, mc.stage_learning_rates, mc.stage_groups)]
        return methods_lib.attn_dreambooth_method(model, params, model.schedule,
                                                  min_snr_gamma=config.adapt.min_snr_gamma or None, stages=stages,
                                                  reg_weights=[tuple(map(float, w)) for w in mc.reg_weights])
    if name == "megaportrait":
        return megaportrait_method(config, model, params, workdir)
    raise ValueError(f"unknown method {name!r}")


def megaportrait_method(config: ml_collections.ConfigDict, model: bm.BaseModel, params: bm.BaseParams,
                        workdir: pathlib.Path) -> methods_lib.Method:
    """``method.megaportrait``: the ``personalize`` method's adaptation, portraits by the ControlNet at ``controlnet``
    ("untrained" = a fresh one, zero convolutions: smoke runs) in templates from the ``template_split`` photos."""
    from metalora.meta import megaportrait as mp

    mc = config.method.megaportrait
    if mc.personalize == "megaportrait" or mc.personalize not in methods_lib.METHODS:
        raise ValueError(f"config.method.megaportrait.personalize={mc.personalize!r}: name another benchmark method")
    if config.data.source != "synth":
        raise ValueError("megaportrait needs template photos with ground truth (pose, lighting, the head region): "
                         "the procedural world's (data.source='synth'); leave it out of config.methods on this track")
    personal = build_method(mc.personalize, config, model, params, workdir)
    if mc.controlnet == "untrained":
        portrait, controlnet = mp.new_controlnet(model, params, key=jax.random.key(config.seed))
    else:
        portrait, controlnet = mp.load_portrait(model, mc.controlnet)
    builder = builders.prepare(builders.track_builder(config.data, resolution=model.image_resolution))
    pool = mp.template_pool(builders.data_source(builder, mc.template_split, decode_images=False),
                            builders.data_source(builder, mc.template_split))
    portrait_config = mp.PortraitConfig(control_scale=mc.control_scale, shading_strength=mc.shading_strength,
                                        harmonize_strength=mc.harmonize_strength, seam_pixels=mc.seam_pixels)
    return methods_lib.megaportrait_method(personal, portrait, controlnet, pool, portrait_config, seed=config.seed,
                                           info={"controlnet": mc.controlnet, "template_split": mc.template_split})


def class_images(model: bm.BaseModel, params: bm.BaseParams, n: int, seed: int, num_inference_steps: int,
                 guidance_scale: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """DreamBooth's prior-preservation set: ``n`` base-model samples of the bare class prompt in the UNet's space
    (photos in [-1, 1], or their VAE latents), and the prompt's ``bm.encode_prompt`` entries per image."""
    prompt = protocol.class_word_prompts(identifier="")[0].text
    ids = jnp.asarray(model.tokenize([prompt] * n))
    images = bm.sample_from_ids(model, params, ids, jax.random.split(jax.random.key(seed + 99), n),
                                num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
    return bm.encode_images(model, params, images * 2.0 - 1.0), bm.encode_prompt(model, params["text_encoder"], ids)


def choose_tests(config: ml_collections.ConfigDict, source_meta) -> tuple[protocol.TestIdentity, ...]:
    p = config.protocol
    tests = protocol.protocol_from_source(source_meta, k=p.shots, seed=config.seed, max_shots=p.max_shots or None,
                                          with_attributes=config.data.source == "synth")
    if p.identities:
        bad = [i for i in p.identities if not 0 <= i < len(tests)]
        if bad:
            raise ValueError(f"config.protocol.identities {bad} out of range: the {config.protocol.split!r} split has "
                             f"{len(tests)} identities")
        return tuple(tests[i] for i in p.identities)
    return tuple(tests[: p.num_identities] if p.num_identities else tests)


def config_fingerprint(config: ml_collections.ConfigDict, method: str | None = None) -> str:
    """Hash of everything that changes a cell's numbers (not the method list or seed list, which only add cells).

    With ``method``, the other methods' sections are left out: a cell depends on the shared settings and its own
    method's, so adding a method or retuning another one keeps the finished cells valid.
    """
    d = config_to_dict(config)
    for (section, key), default in _SETTINGS_ADDED_LATER.items():
        if d.get(section, {}).get(key, default) == default:
            d.get(section, {}).pop(key, None)
    if method is not None:
        sections = d.get("method", {})
        d["method"] = {method: sections.get(method)}
        uses = (sections.get(method) or {}).get("personalize")  # megaportrait: its adaptation is that method's
        if uses:
            d["method"][uses] = sections.get(uses)
        for section, key in _SHARED_SETTINGS_NOT_READ.get(method, ()):
            d.get(section, {}).pop(key, None)
    return _hash_settings(d)


# Shared settings a method never reads. Leaving them out of its fingerprint lets a grid that varies only them (the
# ablation runner's r_m sweep) reuse that method's finished cells instead of recomputing identical numbers.
_SHARED_SETTINGS_NOT_READ: dict[str, tuple[tuple[str, str], ...]] = {
    "lora": (("lora", "mid_rank"),),  # plain LoRA has no Mid factor (``metalora.meta.personalize.lora_config``)
}


# Settings added after shipped cells were computed, with the default that reproduces the earlier behaviour. At that
# default they are left out of the fingerprint, so the shipped cells (assets/default_benchmark, the ablation grids)
# stay valid; any other value is part of it.
_SETTINGS_ADDED_LATER: dict[tuple[str, str], Any] = {
    ("protocol", "max_shots"): 0,
}


def reuse_cells(config: ml_collections.ConfigDict, sources: Sequence[str | pathlib.Path],
                workdir: str | pathlib.Path) -> list[str]:
    """Copy into ``workdir`` the finished cells of ``config``'s (variant, seed) pairs that another benchmark workdir in
    ``sources`` computed with the same fingerprint, i.e. the same numbers; returns the copied cells' names.

    The ablation runner calls it before each grid cell, so a method that the grid's keys do not touch runs once.
    (With ``config.export`` a copied cell's LoRA files stay where the cell that computed them wrote them.)
    """
    workdir, copied = pathlib.Path(workdir), []
    for variant, name, _ in variants(config):
        fingerprint = config_fingerprint(config, name)
        for seed in config.seeds:
            meta_path, samples_path = _cell_paths(workdir, variant, seed)
            if meta_path.exists():
                continue
            for source in map(pathlib.Path, sources):
                src_meta, src_samples = _cell_paths(source, variant, seed)
                if not (src_meta.exists() and src_samples.exists()):
                    continue
                text = src_meta.read_text()
                if json.loads(text).get("fingerprint") == fingerprint:
                    atomic_write_bytes(samples_path, src_samples.read_bytes())  # samples first, as in _save_cell
                    atomic_write_text(meta_path, text)
                    copied.append(f"{variant} seed {seed} from {source}")
                    break
    return copied


def _hash_settings(config: Mapping[str, Any]) -> str:
    """Hash of a config dict without the method and seed lists, the reporting keys and where finished cells may be
    copied from (they change no number)."""
    d = {k: v for k, v in config.items() if k not in ("methods", "seeds", "report", "progress", "reuse_cells_from")}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cell_paths(workdir: pathlib.Path, variant: str, seed: int) -> tuple[pathlib.Path, pathlib.Path]:
    stem = f"{variant.replace('@', '_').replace('=', '')}__seed{seed}"
    return workdir / "cells" / f"{stem}.json", workdir / "cells" / f"{stem}.npz"


def _load_cell(workdir, variant, seed, fingerprint) -> dict | None:
    meta_path, samples_path = _cell_paths(workdir, variant, seed)
    if not (meta_path.exists() and samples_path.exists()):
        return None
    cell = json.loads(meta_path.read_text())
    if cell.get("fingerprint") != fingerprint:
        raise ValueError(f"{meta_path} was produced with another config (fingerprint {cell.get('fingerprint')} vs "
                         f"{fingerprint}); use a new workdir or delete {meta_path.parent}")
    with np.load(samples_path) as f:
        cell["samples"] = {int(k.split("_")[1]): f[k] for k in f.files}
    return cell


def _save_cell(workdir, variant, seed, cell: Mapping[str, Any], samples: Mapping[int, np.ndarray]) -> None:
    import io

    meta_path, samples_path = _cell_paths(workdir, variant, seed)
    buf = io.BytesIO()
    np.savez_compressed(buf, **{f"step_{k}": np.asarray(v * 255.0 + 0.5, np.uint8) for k, v in samples.items()})
    atomic_write_bytes(samples_path, buf.getvalue())  # samples first: a cell counts as done once its json exists
    atomic_write_text(meta_path, json.dumps(dict(cell), indent=1, default=float) + "\n")


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
        log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) every method variant × seed on the configured test identities; write the report."""
    workdir = pathlib.Path(workdir)
    t_start = time.perf_counter()
    sources = [pathlib.Path(s) for s in config.get("reuse_cells_from", ())]
    for source in sources:  # a typo would otherwise silently recompute every cell
        if not (source / "cells").is_dir():
            raise FileNotFoundError(f"config.reuse_cells_from: {source} has no cells/ folder of a benchmark run")
    for copied in reuse_cells(config, sources, workdir):
        log(f"reused {copied}")
    b = config.base
    model, params = bm.load_base(b.path, attention_backend=b.attention_backend, compute_dtype=b.compute_dtype,
                                 remat=b.remat)
    d = config.data
    builder = builders.prepare(builders.track_builder(d, resolution=model.image_resolution))
    tests = choose_tests(config, builders.data_source(builder, config.protocol.split, decode_images=False))
    subjects = H.load_subjects(model, params["text_encoder"], builders.data_source(builder, config.protocol.split),
                               tests, max_heldout=config.protocol.max_heldout,
                               seeds_per_prompt=config.sample.seeds_per_prompt,
                               max_prompts=config.protocol.max_prompts or None, vae_params=params.get("vae"))
    probes = P.load_probes(config.probes) if config.probes else None
    judge = make_judge(config.get("judge", "probes"), probes)
    log(f"{subjects.count} test identities {subjects.identities}, {config.protocol.shots} shot(s), "
        f"{len(subjects.prompts[0])} prompts × {subjects.seeds_per_prompt} seeds; probes: "
        f"{probes.path if probes else 'none'}; identity judge: {judge.name if judge else 'none'}")
    a = config.adapt
    # A mirrored VAE latent is only approximately the latent of the mirrored photo: latent bases adapt unmirrored
    # (as experiments/adapt.py does).
    inner = InnerLoopConfig(steps=1, learning_rate=1.0, optimizer=a.optimizer, batch_size=a.batch_size,
                            flip=a.flip and not model.latent, max_shift=a.max_shift)
    records, info, final_samples, exports = [], {}, {}, {}
    all_variants = variants(config)
    methods = {name: build_method(name, config, model, params, workdir) for name in dict.fromkeys(n for _, n, _ in
                                                                                                 all_variants)}
    evaluations = {name: 1 if m.tuning_free else len(set(a.eval_steps)) for name, m in methods.items()}
    # One bar over every (variant, seed, evaluation step); the harness reports each evaluation through ``advance``.
    bar = tqdm.tqdm(total=sum(evaluations[n] for _, n, _ in all_variants) * len(config.seeds),
                    desc="adapt + evaluate", disable=not config.get("progress", True))

    def advance(message: str) -> None:
        bar.update(1)
        bar.set_postfix_str(message, refresh=False)
        log(message)

    for variant, name, lr in all_variants:
        method = methods[name]
        info[variant] = {"method": name, "learning_rate": lr, "trainable_parameters": method.trainable_parameters,
                         **{k: v for k, v in method.info.items() if k != "meta_down_info"}}
        for seed in config.seeds:
            fingerprint = config_fingerprint(config, name)
            cell = _load_cell(workdir, variant, seed, fingerprint)
            if cell is None:
                t0 = time.perf_counter()
                result = H.run_method(method, model, subjects, seed=seed, eval_steps=a.eval_steps,
                                      inner=dataclasses.replace(inner, learning_rate=lr),
                                      num_inference_steps=config.sample.num_inference_steps,
                                      guidance_scale=config.sample.guidance_scale,
                                      heldout_repeats=config.eval.heldout_repeats,
                                      sample_steps=_sample_steps(config), progress=advance)
                cell_records = [r | {"method": variant} for r in H.score_run(result, probes, subjects, judge)]
                cell = {"fingerprint": fingerprint, "variant": variant, "seed": seed, "records": cell_records,
                        "seconds_per_step": result.seconds_per_step, "first_chunk_seconds": result.chunk_seconds[0]
                        if result.chunk_seconds else None, "cell_seconds": time.perf_counter() - t0,
                        "train_loss_first": result.train_losses[:, 0].tolist() if result.train_losses.size else [],
                        "train_loss_last": result.train_losses[:, -1].tolist() if result.train_losses.size else [],
                        "sampling_info": result.sampling_info}
                if config.export and method.export is not None:
                    cell["exports"] = [str(method.export(jax.tree.map(lambda x, s=s: x[s], result.trainables),
                                                         workdir / "exports" / variant / f"seed{seed}"
                                                         / f"subject_{identity}"))
                                       for s, identity in enumerate(subjects.identities)]
                last = {k: v for k, v in result.samples.items() if k == max(result.steps)}
                _save_cell(workdir, variant, seed, cell, last)
                cell["samples"] = last
            else:
                bar.update(evaluations[name])
                log(f"{variant} seed {seed}: done earlier, loaded from {workdir / 'cells'}")
                cell["samples"] = {k: v.astype(np.float32) / 255.0 for k, v in cell["samples"].items()}
            records += cell["records"]
            info[variant].setdefault("seconds_per_step_all_subjects", []).append(cell["seconds_per_step"])
            info[variant].setdefault("cell_seconds", []).append(cell["cell_seconds"])
            for key, value in cell.get("sampling_info", {}).items():
                info[variant].setdefault(key, []).append(value)
            exports.setdefault(variant, []).extend(cell.get("exports", []))
            if cell["samples"]:
                final_samples.setdefault(variant, []).append(next(iter(cell["samples"].values())))
    bar.close()
    reference = _reference_variant(records, config.eval.reference_method, config.eval.target_metric)
    summary = H.aggregate(records, reference_method=reference, target_metric=config.eval.target_metric)
    if probes is not None:
        for variant, arrays in final_samples.items():
            info[variant]["frechet_to_heldout"] = H.frechet_to_heldout(probes, np.concatenate(arrays), subjects)
    out = report(config, workdir, subjects, records, summary, info, final_samples)
    out["exports"] = exports
    out["wall_time_s"] = time.perf_counter() - t_start
    atomic_write_text(workdir / "results.json", json.dumps(out, indent=1, default=_json_default) + "\n")
    log(out["table"])
    log(f"results: {workdir}")
    return out


def make_judge(name: str, probes: P.Probes | None) -> H.IdentityJudge | None:
    """``config.judge``: "probes" (the identity probe; None when no probes are configured) or "dlib"."""
    if name == "probes":
        return H.probe_judge(probes) if probes is not None else None
    if name == "dlib":
        from metalora.eval.faces import load_dlib_encoder  # optional extra: metalora[faces]

        return H.dlib_judge(load_dlib_encoder())
    raise ValueError(f"config.judge={name!r}; choose 'probes' or 'dlib'")


def _sample_steps(config) -> tuple[int, ...] | None:
    """``config.sample.at``: "all" evaluation steps, only the "final" one, or "none" (held-out loss only)."""
    at = config.sample.at
    if at == "all":
        return None
    if at == "final":
        return (max(config.adapt.eval_steps),)
    if at == "none":
        return ()
    raise ValueError(f"config.sample.at={at!r}; choose 'all', 'final' or 'none'")


def _json_default(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def _reference_variant(records, reference_method: str, metric: str) -> str | None:
    """The reference method's variant with the best mean ``metric`` at any evaluated step (the strongest baseline of
    an LR sweep, each variant at its best step)."""
    if not reference_method:
        return None
    higher = H.HIGHER_IS_BETTER[metric]
    best = {name: H.best_mean(curve, higher) for name, curve in H.curves(records, metric).items()
            if name.split("@")[0] == reference_method}
    valid = {k: v for k, v in best.items() if np.isfinite(v)}
    sign = 1.0 if higher else -1.0
    return max(valid, key=lambda k: sign * valid[k]) if valid else None


def _notes(config) -> list[str]:
    notes = []
    judge = config.get("judge", "probes")
    if judge == "dlib":
        notes.append("Identity metrics: dlib's ResNet face descriptor (HOG detector, 5-point alignment), cosine "
                     "similarity; `no_face` is the share of samples with no detected face, left out of FaceSim, "
                     "R-FaceSim and diversity.")
    if not config.probes and judge == "probes":
        notes.append("No probes configured (config.probes=''): identity and prompt metrics were not computed.")
    if config.data.source != "synth":
        notes.append("Prompt alignment and pose copying are not defined on this track (its photos have no "
                     "attribute labels).")
    return notes


def _method_notes(info: Mapping[str, Any]) -> list[str]:
    notes = []
    for variant, i in info.items():
        if "template_attribute_match" in i:
            notes.append(f"{variant}: portraits in photos of other identities ({i['template_split']} split) chosen to "
                         f"show what each prompt asks for (they show {np.mean(i['template_attribute_match']):.0%} of "
                         f"the prompted attributes), so its prompt alignment is partly the template's; it adapts as "
                         f"{i['personalize']} does (same held-out loss).")
    return notes


def _seconds_per_step(info: Mapping[str, Any]) -> dict[str, float]:
    """Mean seconds per adaptation step (all subjects) over each variant's cells; tuning-free variants have none."""
    out = {}
    for variant, i in info.items():
        sps = [x for x in i.get("seconds_per_step_all_subjects", []) if np.isfinite(x)]
        if sps:
            out[variant] = float(np.mean(sps))
    return out


def _short_extras(info: Mapping[str, Any], sps: Mapping[str, float]) -> dict[str, dict[str, Any]]:
    """The table's per-variant columns; ``sps``: ``_seconds_per_step(info)``."""
    out = {}
    for variant, i in info.items():
        out[variant] = {"trainable params": f"{i['trainable_parameters']:,}", "lr": f"{i['learning_rate']:g}",
                        "s/step (all subjects)": f"{sps[variant]:.3f}" if variant in sps else "–"}
        if "frechet_to_heldout" in i:
            out[variant]["FD to held-out"] = f"{i['frechet_to_heldout']:.3g}"
    return out


def report(config, workdir: pathlib.Path, subjects: H.Subjects, records: Sequence[Mapping[str, Any]],
           summary: Mapping[str, Any], info: Mapping[str, Any],
           final_samples: Mapping[str, list[np.ndarray]]) -> dict[str, Any]:
    """table.md, plots and the image grid; returns the results dict (written by the caller)."""
    n_cells = len(config.seeds) * subjects.count
    header = (f"# {config.report.title}\n\n{subjects.count} identities × {len(config.seeds)} seeds = {n_cells} "
              f"cells per method; mean ± 95% CI (Student t) over identities, each identity's seeds averaged first. "
              f"{config.protocol.shots} reference shot(s), "
              f"{len(subjects.prompts[0])} prompts × {subjects.seeds_per_prompt} samples per identity.\n\n")
    table, plots = tables_and_curves(workdir, header, summary, info, notes=_notes(config) + _method_notes(info))
    finals = {m: [r for r in records if r["method"] == m and r["step"] == summary["final"][m]["step"]]
              for m in summary["final"]}
    if any("prompt_alignment" in r for rows in finals.values() for r in rows):
        pts = {m: ([r["prompt_alignment"] for r in rows if "prompt_alignment" in r],
                   [r["r_face_sim"] for r in rows if "prompt_alignment" in r]) for m, rows in finals.items()}
        plots["scatter"] = str(H.plot_scatter(pts, workdir / "rfacesim_vs_alignment.png", xlabel="prompt alignment",
                                              ylabel="R-FaceSim", title="identity vs prompt (final step)"))
    if final_samples:
        plots["grid"] = str(image_grid(workdir / "grid.png", subjects, final_samples, config.report.grid_identities))
    return {"format": RESULTS_FORMAT, "config": config_to_dict(config), "fingerprint": config_fingerprint(config),
            "identities": subjects.identities, "prompts": [[p.text for p in ps] for ps in subjects.prompts],
            "methods": dict(info), "summary": summary, "records": list(records), "table": table, "plots": plots,
            "versions": {"jax": jax.__version__, "python": platform.python_version()},
            "machine": {"platform": platform.platform(), "processor": platform.processor(),
                        "devices": [str(x) for x in jax.devices()]}}


def tables_and_curves(workdir: pathlib.Path, header: str, summary: Mapping[str, Any], info: Mapping[str, Any],
                      notes: Sequence[str] = ()) -> tuple[str, dict[str, str]]:
    """``table.md`` (``header``, the final-step table, then every curve as a table) and the curve plots; returns the
    final-step table and {plot name: path}."""
    sps = _seconds_per_step(info)
    table = H.markdown_table(summary, _short_extras(info, sps), notes=notes, seconds_per_step=sps)
    # (what, how paired, plot-file suffix, curves): the raw curves, then the paired ones, in which the spread between
    # identities (far larger than what adaptation changes) cancels.
    sections = [("by adaptation step", "", "", summary["curves"]),
                ("change since the first evaluated step", "paired per identity × seed, seeds averaged", "_change",
                 summary["change_from_start"])]
    if "vs_reference" in summary:
        sections.append((f"difference from {summary['vs_reference']['method']}",
                         "paired per identity × seed × step, seeds averaged",
                         "_vs_reference", summary["vs_reference"]["curves"]))
    curve_md = "".join(f"\n### {m}: {what}" + (f" ({how})" if how else "") + "\n\n"
                       + H.curve_table({"curves": curves}, m)
                       for what, how, _, curves in sections for m in ("r_face_sim", "heldout_loss")
                       if any(c["step"] for c in curves.get(m, {}).values()))
    atomic_write_text(workdir / "table.md", header + table + curve_md)
    plots = {}
    labels = {"r_face_sim": "R-FaceSim (held-out photos)", "heldout_loss": "held-out denoising loss",
              "prompt_alignment": "prompt alignment"}
    for what, _, suffix, curves in sections:
        for metric in labels if not suffix else ("r_face_sim", "heldout_loss"):
            cs = {m: c for m, c in curves.get(metric, {}).items() if c["mean"]}
            if not cs:
                continue
            lines = {m: (c["step"], c["mean"]) for m, c in cs.items()}
            bands = {m: (np.subtract(c["mean"], np.nan_to_num(c["ci"])), np.add(c["mean"], np.nan_to_num(c["ci"])))
                     for m, c in cs.items()}
            title = labels[metric] + (f"\n{what}" if suffix else "") + " (mean ± 95% CI)"  # 2 lines fit the plot
            plots[metric + suffix] = str(plot_curves(lines, workdir / f"{metric}{suffix}_vs_steps.png", bands=bands,
                                                     xlabel="adaptation steps", ylabel=labels[metric], title=title))
    return table, plots


# ----------------------------------------------------------------------------------------------------------------
# Pooling runs over disjoint identities
# ----------------------------------------------------------------------------------------------------------------


def _shared_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """A results.json config without its choice of identities: what runs to be pooled must share."""
    protocol = {k: v for k, v in config.get("protocol", {}).items() if k not in ("identities", "num_identities")}
    return {**config, "protocol": protocol}


def _pooled_info(runs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per-variant info of several runs: lists (per-cell timings) concatenated; any other value kept where every run
    has the same (parameter counts, rates) and left out where they differ (a run-level number such as the Fréchet
    distance of one run's samples is not the pooled run's)."""
    info: dict[str, dict[str, Any]] = {}
    for variant in dict.fromkeys(v for run in runs for v in run["methods"]):
        per_run = [run["methods"].get(variant, {}) for run in runs]
        merged: dict[str, Any] = {}
        for key in dict.fromkeys(k for i in per_run for k in i):
            values = [i.get(key) for i in per_run]
            if all(isinstance(v, list) for v in values):
                merged[key] = [x for v in values for x in v]
            elif all(v == values[0] for v in values):
                merged[key] = values[0]
        info[variant] = merged
    return info


def pool(workdirs: Sequence[str | pathlib.Path], out: str | pathlib.Path) -> dict[str, Any]:
    """Re-aggregate finished harness runs over disjoint identities as one run (a replication on new identities, or
    more identities than one run has): their records pooled, every interval then over all their identities.

    The runs must agree on every setting except the identities (seeds and method variants included) and share no
    identity: pooling two runs of one identity would count its seeds as new identities. Writes ``results.json``
    (``config``: the shared settings; ``sources``: each run's folder and identities), ``table.md`` and the curve
    plots to ``out``; returns the results dict.
    """
    paths = [pathlib.Path(w) / "results.json" for w in workdirs]
    if len(paths) < 2:
        raise ValueError("pool: give at least two runs")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"pool: no results.json (unfinished run?): {', '.join(missing)}")
    runs = [json.loads(p.read_text()) for p in paths]
    first = runs[0]
    settings = _shared_settings(first["config"])
    for path, run in zip(paths[1:], runs[1:]):
        if _hash_settings(_shared_settings(run["config"])) != _hash_settings(settings):
            raise ValueError(f"pool: {path} was run with other settings than {paths[0]} (only the identities may "
                             f"differ)")
        if run["config"]["seeds"] != settings["seeds"]:
            raise ValueError(f"pool: {path} has seeds {run['config']['seeds']}, {paths[0]} {settings['seeds']}")
        if sorted(run["methods"]) != sorted(first["methods"]):
            raise ValueError(f"pool: {path} has methods {sorted(run['methods'])}, {paths[0]} "
                             f"{sorted(first['methods'])}")
    seen: dict[int, pathlib.Path] = {}
    for path, run in zip(paths, runs):
        for identity in run["identities"]:
            if identity in seen:
                raise ValueError(f"pool: identity {identity} is in both {seen[identity]} and {path}")
            seen[identity] = path
    records = [r for run in runs for r in run["records"]]
    target = settings["eval"]["target_metric"]
    reference = _reference_variant(records, settings["eval"]["reference_method"], target)
    summary = H.aggregate(records, reference_method=reference, target_metric=target)
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    header = (f"# {settings['report']['title']} (pooled)\n\n{len(seen)} identities × {len(settings['seeds'])} seeds, "
              f"pooled from {len(runs)} runs over disjoint identities ("
              + "; ".join(f"`{p.parent}`: {len(r['identities'])}" for p, r in zip(paths, runs))
              + "); mean ± 95% CI (Student t) over identities, each identity's seeds averaged first.\n\n")
    info = _pooled_info(runs)
    table, plots = tables_and_curves(out, header, summary, info)
    sources = [{"workdir": str(p.parent), "identities": r["identities"]} for p, r in zip(paths, runs)]
    results = {"format": RESULTS_FORMAT, "config": settings, "sources": sources, "identities": list(seen),
               "methods": info, "summary": summary, "records": records, "table": table, "plots": plots}
    atomic_write_text(out / "results.json", json.dumps(results, indent=1, default=_json_default) + "\n")
    return results


def image_grid(path: pathlib.Path, subjects: H.Subjects, final_samples: Mapping[str, list[np.ndarray]],
               max_identities: int) -> pathlib.Path:
    """Per identity: one row per method — reference | held-out photo | one sample (first seed) per prompt."""
    rows = []
    n = subjects.seeds_per_prompt
    for s in range(min(max_identities, subjects.count)):
        real = H.to_unit(np.stack([subjects.shot_photos[s, 0], subjects.heldout_photos[s, 0]]))
        for arrays in final_samples.values():
            rows.append(np.concatenate([real, arrays[0][s][::n]]))  # first seed of the method's first seed cell
    width = max(len(r) for r in rows)
    grid = np.concatenate([np.concatenate([r, np.ones((width - len(r), *r.shape[1:]), r.dtype)]) for r in rows])
    return save_image_grid(grid, path, nrow=width)
