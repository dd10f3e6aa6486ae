"""Meta-PHD-style protocol: adapt test identities with each method, evaluate at a list of step counts, aggregate.

For every method × seed, the S test identities adapt together (one vmapped ``metalora.meta.optimize`` call per
chunk of steps); at each evaluation step every identity samples its evaluation prompts with fixed seeds (the same
initial noise for every method and step: common random numbers) and the probes score the samples. Metric
formulas are in ``metalora.eval.metrics``; per (method, identity, seed, step) cell:

* ``face_sim``: mean cosine of the samples' identity embeddings to the reference shot(s);
* ``r_face_sim``: mean cosine to the identity's *held-out* photos (references excluded);
* ``prompt_alignment``: attribute-probe accuracy on the attributes the prompts ask for (our CLIP-T);
* ``pose_copying``: share of samples asked for another pose that show the reference's pose anyway;
* ``diversity``: mean pairwise (1 − cosine) identity-embedding distance between the seeds of one prompt;
* ``heldout_loss``: denoising loss on the held-out photos (fixed noise draws), the ``does it work`` measure;
* ``no_face``: share of samples in which the identity judge found no face (dlib judge only; those samples are left
  out of the identity metrics, never scored as zero).

Identity metrics come from an ``IdentityJudge``: the procedural world's identity probe (``probe_judge``) or, on the
real-photo track, dlib's face descriptor (``dlib_judge``: detector, 5-point alignment, ResNet descriptor).

Aggregates (``aggregate``): mean ± 95% CI (Student t over identity × seed cells), Fréchet distance of the final
samples' probe features to the held-out photos, and steps to reach a target R-FaceSim (default: the reference
method's best mean over its evaluated steps).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from metalora.compiler import jit
from metalora.data import builders, protocol, world
from metalora.eval import metrics as M
from metalora.eval import probes as P
from metalora.eval.faces import FaceEmbeddings, face_sim_from_face_embeddings
from metalora.eval.methods import Method
from metalora.meta.inner import InnerLoopConfig, inner_optimizer, optimize, unflipped
from metalora.meta.personalize import encode_shots
from metalora.models import base_model as bm

METRICS = ("face_sim", "r_face_sim", "prompt_alignment", "pose_copying", "diversity", "heldout_loss", "no_face")
HIGHER_IS_BETTER = {"face_sim": True, "r_face_sim": True, "prompt_alignment": True, "pose_copying": False,
                    "diversity": True, "heldout_loss": False, "no_face": False}


# ----------------------------------------------------------------------------------------------------------------
# Subjects: the protocol's test identities as stacked arrays
# ----------------------------------------------------------------------------------------------------------------


def photo_caption(record: Mapping[str, Any], *, flipped: bool = False,
                  identifier: str = world.DEFAULT_IDENTIFIER) -> str:
    """The identifier caption of a photo (``a photo of sks person ...``); mirrored attributes when ``flipped``."""
    attributes = json.loads(builders.decode_text(record["attributes_json"]) or "{}")
    if flipped and attributes:
        attributes = world.flip_attributes(attributes)
    return world.make_caption(attributes, identifier=identifier)


def shot_arrays(source, records: Sequence[int], tokenizer) -> dict[str, np.ndarray]:
    """Images in [-1, 1] and token ids of the given records, plus the ids of the mirrored photos' captions."""
    rows = [source[int(r)] for r in records]
    images = np.stack([np.asarray(row["image"], np.float32) / 127.5 - 1.0 for row in rows])
    return {"images": images,
            "input_ids": tokenizer.tokenize([photo_caption(row) for row in rows]),
            "input_ids_flipped": tokenizer.tokenize([photo_caption(row, flipped=True) for row in rows])}


def stack_shots(dicts: Sequence[Mapping[str, np.ndarray]]) -> dict[str, jax.Array]:
    """Per-subject shot dicts → one dict of arrays with a leading subject axis."""
    return {k: jnp.asarray(np.stack([d[k] for d in dicts])) for k in dicts[0]}


@dataclasses.dataclass(frozen=True)
class Subjects:
    """S test identities, stacked: ``shots`` (S, k, ...), ``heldout`` (S, h, ...) with ``images`` in the UNet's
    space (photos in [-1, 1] for a pixel base, scaled VAE latents for a latent one), ``input_ids`` and ``context``;
    ``prompt_ids`` (S, N, L) for N = prompts × seeds_per_prompt samples. ``shot_photos`` / ``heldout_photos`` are
    the photos themselves in [-1, 1] (what judges and grids look at), whatever the base's space."""

    tests: tuple[protocol.TestIdentity, ...]
    shots: dict[str, jax.Array]
    heldout: dict[str, jax.Array]
    prompt_ids: jax.Array
    prompts: tuple[tuple[protocol.EvalPrompt, ...], ...]  # per subject, P prompts
    seeds_per_prompt: int
    reference_attributes: tuple[dict[str, str], ...]  # of each subject's first reference ({} on real photos)
    shot_photos: jax.Array
    heldout_photos: jax.Array

    @property
    def count(self) -> int:
        return len(self.tests)

    @property
    def identities(self) -> list[int]:
        return [t.identity for t in self.tests]


def load_subjects(model: bm.BaseModel, text_params: Any, source, tests: Sequence[protocol.TestIdentity], *,
                  max_heldout: int = 8, seeds_per_prompt: int = 2, max_prompts: int | None = None,
                  vae_params: Any = None) -> Subjects:
    """Read and encode the shots, held-out photos and prompts of ``tests`` (a decoded tfds source of their split);
    a latent base needs ``vae_params`` (``params["vae"]``) to encode the photos.

    Subjects need the same number of prompts to be stacked: all keep the smallest count (≤ ``max_prompts``).
    """
    if not tests:
        raise ValueError("load_subjects: no test identities")
    num_prompts = min(len(t.prompts) for t in tests)
    if max_prompts:
        num_prompts = min(num_prompts, max_prompts)
    if num_prompts == 0:
        raise ValueError("load_subjects: a test identity has no evaluation prompts")
    num_heldout = min(min(len(t.heldout) for t in tests), max_heldout)

    refs = stack_shots([shot_arrays(source, t.references, model.tokenizer) for t in tests])
    held = stack_shots([shot_arrays(source, t.heldout[:num_heldout], model.tokenizer) for t in tests])
    encode = jit(jax.vmap(lambda s: encode_shots(model, text_params, s, vae_params)))
    shot_photos, heldout_photos = refs["images"], held["images"]
    shots = {**refs, **encode(refs)}
    held = {**held, **encode(held)}
    held = unflipped(held)  # held-out photos are never flipped
    prompts = tuple(tuple(t.prompts[:num_prompts]) for t in tests)
    texts = [[p.text for p in ps for _ in range(seeds_per_prompt)] for ps in prompts]
    prompt_ids = jnp.asarray(np.stack([model.tokenize(t) for t in texts]))
    ref_attrs = []
    for t in tests:
        raw = builders.decode_text(source[int(t.references[0])]["attributes_json"])
        ref_attrs.append(json.loads(raw) if raw else {})
    return Subjects(tuple(tests), shots, held, prompt_ids, prompts, seeds_per_prompt, tuple(ref_attrs),
                    shot_photos=shot_photos, heldout_photos=heldout_photos)


# ----------------------------------------------------------------------------------------------------------------
# Adapt + sample at each evaluation step
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class MethodRun:
    """Everything one method × seed produced: per evaluation step the samples (S, N, H, W, C) in [0, 1] and the
    held-out loss (S,); the inner-loop losses (S, steps); adaptation wall time per chunk (the first includes
    compilation)."""

    method: str
    seed: int
    steps: tuple[int, ...]
    samples: dict[int, np.ndarray]
    heldout_loss: dict[int, np.ndarray]
    train_losses: np.ndarray
    chunk_seconds: list[float]
    chunk_steps: int
    trainables: Any = None  # the adapted trainables at the last step, leading subject axis
    sampling_info: dict[str, Any] = dataclasses.field(default_factory=dict)  # from ``Method.sampling_inputs``

    @property
    def seconds_per_step(self) -> float:
        """Adaptation seconds per step for all S subjects together, compile excluded (first chunk dropped)."""
        timed = self.chunk_seconds[1:] or self.chunk_seconds
        return float(np.mean(timed)) / self.chunk_steps if timed else float("nan")


def chunk_size(eval_steps: Sequence[int]) -> int:
    """The largest chunk that lands on every evaluation step (so one compiled chunk serves the whole run)."""
    steps = sorted(set(int(s) for s in eval_steps))
    if not steps or steps[0] < 0:
        raise ValueError(f"evaluation steps must be non-negative, got {list(eval_steps)}")
    diffs = [b - a for a, b in zip([0, *steps], steps) if b > a]
    return math.gcd(*diffs) if diffs else 1


def sampling_keys(seed: int, num_samples: int) -> jax.Array:
    """Initial-noise keys of the N samples: the same for every method and step (common random numbers)."""
    return jax.random.split(jax.random.key(seed + 1_000_003), num_samples)


def run_method(method: Method, model: bm.BaseModel, subjects: Subjects, *, seed: int, eval_steps: Sequence[int],
               inner: InnerLoopConfig, num_inference_steps: int = 25, guidance_scale: float = 3.0,
               heldout_repeats: int = 4, sample_steps: Sequence[int] | None = None,
               progress: Callable[[str], None] | None = None) -> MethodRun:
    """Adapt all subjects with ``method`` (seed ``seed``); at every step of ``eval_steps`` measure the held-out
    loss and, at the steps of ``sample_steps`` (None = all evaluation steps), sample the evaluation prompts."""
    # A tuning-free method has nothing to adapt: it is evaluated once, at step 0, which is also its final step.
    steps = (0,) if method.tuning_free else tuple(sorted(set(int(s) for s in eval_steps)))
    if method.tuning_free and sample_steps is not None and len(sample_steps):
        sample_steps = (0,)
    chunk = chunk_size(steps)
    config = dataclasses.replace(inner, steps=chunk)
    s_count = subjects.count
    k_init, k_adapt = jax.random.split(jax.random.key(seed))
    if method.tuning_free:
        trainables = jit(jax.vmap(method.init_from_shots))(jax.random.split(k_init, s_count), subjects.shots)
    else:
        trainables = jax.vmap(method.init)(jax.random.split(k_init, s_count))
    adapt_keys = jax.random.split(k_adapt, s_count)
    optimizer = method.optimizer(config) if method.optimizer else inner_optimizer(config)
    opt_state = jax.vmap(optimizer.init)(trainables)

    @jit
    def run_chunk(trainables, opt_state, start):
        def one(t, st, shots, key):
            return optimize(method.loss, t, shots, key, config, opt_state=st, start_step=start, optimizer=optimizer)
        return jax.vmap(one)(trainables, opt_state, subjects.shots, adapt_keys)

    heldout_keys = jax.random.split(jax.random.key(seed + 7), heldout_repeats)

    @jit
    def heldout(trainables):
        def one(t, photos):
            return jnp.mean(jax.vmap(lambda k: method.eval_loss(t, photos, k))(heldout_keys))
        return jax.vmap(one)(trainables, subjects.heldout)

    keys = sampling_keys(seed, subjects.prompt_ids.shape[1])
    inputs, sampling_info = None, {}
    if method.sampling_inputs is not None and (sample_steps is None or len(sample_steps)):
        inputs, sampling_info = method.sampling_inputs(subjects.prompts, subjects.seeds_per_prompt)

    @jit
    def sample(trainables, inputs):
        def one(t, ids, x):
            if method.sample is not None:
                return method.sample(t, ids, keys, num_inference_steps, guidance_scale, x)
            return bm.sample_from_ids(model, method.sampling_params(t), ids, keys,
                                      num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
        return jax.vmap(one)(trainables, subjects.prompt_ids, inputs)

    samples, losses_at, train_losses, seconds = {}, {}, [], []
    done = 0
    for target in steps:
        while done < target:
            start = time.perf_counter()
            trainables, losses, opt_state = run_chunk(trainables, opt_state, jnp.asarray(done, jnp.int32))
            jax.block_until_ready(trainables)
            seconds.append(time.perf_counter() - start)
            train_losses.append(np.asarray(losses))
            done += chunk
        losses_at[target] = np.asarray(heldout(trainables))
        if sample_steps is None or target in sample_steps:
            samples[target] = np.asarray(sample(trainables, inputs))
        if progress is not None:
            progress(f"{method.name} seed {seed}: step {target}, held-out loss {losses_at[target].mean():.4f}")
    train = np.concatenate(train_losses, axis=1) if train_losses else np.zeros((s_count, 0), np.float32)
    return MethodRun(method.name, seed, steps, samples, losses_at, train, seconds, chunk, trainables,
                     dict(sampling_info))


# ----------------------------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------------------------


def to_unit(images: np.ndarray) -> np.ndarray:
    """[-1, 1] photos → [0, 1] (the probes' input range)."""
    return np.clip((np.asarray(images, np.float32) + 1.0) / 2.0, 0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class IdentityJudge:
    """Identity descriptors of images in [0, 1], one row per image; ``found`` is False where the judge sees no face.

    ``detects_faces``: the judge can miss faces (dlib), so the share of faceless samples is reported as ``no_face``.
    """

    name: str
    embed: Callable[[np.ndarray], FaceEmbeddings]
    detects_faces: bool = False


def probe_judge(probes: P.Probes) -> IdentityJudge:
    """The procedural world's identity probe (an ArcFace-trained encoder): every image gets a descriptor."""

    def embed(images: np.ndarray) -> FaceEmbeddings:
        emb = np.asarray(P.embed(probes.identity_encoder, images))
        return FaceEmbeddings(embeddings=emb, found=np.ones(emb.shape[0], bool))

    return IdentityJudge(name=f"probe:{probes.path}", embed=embed)


def dlib_judge(encoder) -> IdentityJudge:
    """dlib's ResNet face descriptor (``metalora.eval.faces.load_dlib_encoder()``), the real-photo track's judge."""
    return IdentityJudge(name="dlib", embed=encoder.embed, detects_faces=True)


def judge_targets(judge: IdentityJudge, subjects: Subjects, s: int) -> tuple[FaceEmbeddings, FaceEmbeddings]:
    """The judge's descriptors of subject ``s``'s (reference shots, held-out photos). ``score_run`` computes them once
    per run, not at every evaluation step (a dlib pass over the photos costs as much as one over the samples)."""
    return judge.embed(to_unit(subjects.shot_photos[s])), judge.embed(to_unit(subjects.heldout_photos[s]))


def score_subject(probes: P.Probes | None, samples: np.ndarray, subjects: Subjects, s: int,
                  judge: IdentityJudge | None = None,
                  targets: tuple[FaceEmbeddings, FaceEmbeddings] | None = None) -> dict[str, float]:
    """Metrics of one subject's N samples (prompt-major: prompt p's seeds are rows p·n … p·n + n − 1).

    Identity metrics use ``judge`` (default: the probes' identity encoder) against ``targets`` (default: computed
    here, see ``judge_targets``); attribute metrics need the probes.
    """
    out: dict[str, float] = {}
    judge = judge or (probe_judge(probes) if probes is not None else None)
    if judge is not None:
        refs, held = targets or judge_targets(judge, subjects, s)
        out |= _identity_metrics(judge, samples, refs, held, len(subjects.prompts[s]), subjects.seeds_per_prompt)
    if probes is None:
        return out
    classifier = probes.attribute_classifier
    n = subjects.seeds_per_prompt
    requested = [p.attributes for p in subjects.prompts[s] for _ in range(n)]
    if any(requested):
        out["prompt_alignment"] = float(P.prompt_alignment(classifier, samples, requested)["accuracy"])
        ref_pose = subjects.reference_attributes[s].get("pose")
        if ref_pose is not None:
            asked = [r.get("pose") if r.get("pose") != ref_pose else None for r in requested]
            if any(a is not None for a in asked):
                out["pose_copying"] = float(P.pose_copying(classifier, samples, ref_pose, asked)["rate"])
    return out


def _identity_metrics(judge: IdentityJudge, samples: np.ndarray, refs: FaceEmbeddings, held: FaceEmbeddings,
                      num_prompts: int, seeds_per_prompt: int) -> dict[str, float]:
    """FaceSim, R-FaceSim and diversity over the samples the judge found a face in (NaN when none)."""
    emb = judge.embed(samples)
    out = {"face_sim": face_sim_from_face_embeddings(emb, refs)["mean"],
           "r_face_sim": face_sim_from_face_embeddings(emb, held)["mean"]}
    if judge.detects_faces:
        out["no_face"] = emb.missing / len(emb.found)
    n = seeds_per_prompt
    if n >= 2:
        per_prompt = []
        for p in range(num_prompts):
            rows = emb.embeddings[p * n:(p + 1) * n][emb.found[p * n:(p + 1) * n]]
            if len(rows) >= 2:
                per_prompt.append(M.mean_pairwise_distance(rows, "cosine"))
        if per_prompt:
            out["diversity"] = float(np.mean(per_prompt))
    return {k: float(v) for k, v in out.items()}


def score_run(run: MethodRun, probes: P.Probes | None, subjects: Subjects,
              judge: IdentityJudge | None = None) -> list[dict[str, Any]]:
    """One record per (identity, step) of a method run: every metric and the identifiers of the cell."""
    judge = judge or (probe_judge(probes) if probes is not None else None)
    targets = [judge_targets(judge, subjects, s) if judge is not None and run.samples else None
               for s in range(subjects.count)]
    records = []
    for step in run.steps:
        for s, identity in enumerate(subjects.identities):
            row = {"method": run.method, "identity": identity, "seed": run.seed, "step": step,
                   "heldout_loss": float(run.heldout_loss[step][s])}
            if step in run.samples:
                row |= score_subject(probes, run.samples[step][s], subjects, s, judge, targets[s])
            records.append(row)
    return records


# ----------------------------------------------------------------------------------------------------------------
# Aggregation
# ----------------------------------------------------------------------------------------------------------------


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, int]:
    """(mean, half-width of the Student-t confidence interval, n); half-width NaN for n < 2."""
    from scipy import stats  # a dependency of jax

    x = np.asarray([v for v in values if v is not None and np.isfinite(v)], np.float64)
    n = len(x)
    if n == 0:
        return float("nan"), float("nan"), 0
    if n == 1:
        return float(x[0]), float("nan"), 1
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * x.std(ddof=1) / math.sqrt(n)
    return float(x.mean()), float(half), n


def curves(records: Sequence[Mapping[str, Any]], metric: str) -> dict[str, dict[str, list[float]]]:
    """{method: {"step": [...], "mean": [...], "ci": [...], "n": [...]}} of one metric over steps."""
    out: dict[str, dict[str, list[float]]] = {}
    for method in dict.fromkeys(r["method"] for r in records):
        rows = [r for r in records if r["method"] == method and metric in r]
        steps = sorted({r["step"] for r in rows})
        c = {"step": [], "mean": [], "ci": [], "n": []}
        for step in steps:
            m, h, n = mean_ci([r[metric] for r in rows if r["step"] == step])
            for k, v in zip(("step", "mean", "ci", "n"), (step, m, h, n)):
                c[k].append(v)
        out[method] = c
    return out


def change_from_start(records: Sequence[Mapping[str, Any]], metric: str) -> list[dict[str, Any]]:
    """The records holding ``metric``, with it replaced by its change since the first evaluated step of the same
    (method, identity, seed) cell. Paired differences: the spread between identities (far larger than what
    adaptation changes, e.g. held-out losses) cancels, so the confidence interval is about the change itself. Cells
    that hold ``metric`` at one step only (e.g. samples scored at the final step) have no change and are left out."""
    def cell(r):
        return r["method"], r["identity"], r["seed"]

    scored = [r for r in records if metric in r]
    start: dict[tuple, float] = {}
    for r in sorted(scored, key=lambda r: r["step"]):
        start.setdefault(cell(r), r[metric])
    evaluations = collections.Counter(cell(r) for r in scored)
    return [dict(r) | {metric: r[metric] - start[cell(r)]} for r in scored if evaluations[cell(r)] > 1]


def difference_from(records: Sequence[Mapping[str, Any]], metric: str, reference: str) -> list[dict[str, Any]]:
    """The other methods' records holding ``metric``, with it replaced by its difference from ``reference``'s value
    in the same (identity, seed, step) cell: the paired comparison of two methods, in which each identity's level
    (and each seed's evaluation noise, shared by all methods) cancels. Records without a reference partner are left
    out."""
    def cell(r):
        return r["identity"], r["seed"], r["step"]

    ref = {cell(r): r[metric] for r in records if r["method"] == reference and metric in r}
    return [dict(r) | {metric: r[metric] - ref[cell(r)]} for r in records
            if r["method"] != reference and metric in r and cell(r) in ref]


def seed_means(records: Sequence[Mapping[str, Any]], metric: str) -> list[dict[str, Any]]:
    """One record per (method, identity, step): ``metric`` averaged over seeds. The seeds of one identity are repeated
    measurements of it, not new identities; intervals over these records count identities only."""
    groups: dict[tuple, list[float]] = collections.defaultdict(list)
    for r in records:
        if metric in r:
            groups[r["method"], r["identity"], r["step"]].append(r[metric])
    return [{"method": m, "identity": i, "step": step, "seed": "mean", metric: float(np.mean(v))}
            for (m, i, step), v in groups.items()]


def best_mean(curve: Mapping[str, Sequence[float]], higher_is_better: bool) -> float:
    """The best of a curve's means over its evaluated steps (NaN if it has none)."""
    means = [m for m in curve["mean"] if np.isfinite(m)]
    if not means:
        return float("nan")
    return float(max(means) if higher_is_better else min(means))


def steps_to_reach(curve: Mapping[str, Sequence[float]], target: float, higher_is_better: bool = True) -> int | None:
    """First evaluation step whose mean reaches ``target`` (None if it never does)."""
    for step, value in zip(curve["step"], curve["mean"]):
        if (value >= target) if higher_is_better else (value <= target):
            return int(step)
    return None


def aggregate(records: Sequence[Mapping[str, Any]], *, reference_method: str | None = None,
              target_metric: str = "r_face_sim") -> dict[str, Any]:
    """Per-method summary at the final step (mean ± CI), curves over steps (also as paired changes from the first
    step and, given ``reference_method``, as paired differences from it), and steps to reach the target: the
    reference method's best mean of ``target_metric`` over its steps (if the reference method and metric are
    present).

    Every interval is over identities: each identity's seeds are averaged first (``seed_means``), since they are
    repeated measurements of one identity. The means equal the means over identity × seed cells when every
    identity has every seed."""
    all_curves = {m: curves(seed_means(records, m), m) for m in METRICS}
    final = {}
    for method in dict.fromkeys(r["method"] for r in records):
        last = max(r["step"] for r in records if r["method"] == method)
        final[method] = {"step": last}
        for m in METRICS:  # the curve's point at the method's last step: the table and the plots cannot disagree
            curve = all_curves[m].get(method)
            if curve and last in curve["step"]:
                i = curve["step"].index(last)
                final[method][m] = (curve["mean"][i], curve["ci"][i], curve["n"][i])
    out: dict[str, Any] = {"final": final, "curves": all_curves,
                           "change_from_start": {m: curves(seed_means(change_from_start(records, m), m), m)
                                                 for m in METRICS}}
    if reference_method:
        out["vs_reference"] = {"method": reference_method,
                               "curves": {m: curves(seed_means(difference_from(records, m, reference_method), m), m)
                                          for m in METRICS}}
    ref_curve = all_curves.get(target_metric, {}).get(reference_method or "")
    if ref_curve and ref_curve["mean"]:
        # The reference's best mean, not its last: a one-shot fit can over-fit (held-out loss rises again), and a
        # last value worse than the start would be "reached" at step 0 by every method.
        higher = HIGHER_IS_BETTER[target_metric]
        target = best_mean(ref_curve, higher)
        out["target"] = {"metric": target_metric, "reference_method": reference_method, "value": target,
                         "steps": {m: steps_to_reach(c, target, higher)
                                   for m, c in all_curves[target_metric].items()}}
    return out


def frechet_to_heldout(probes: P.Probes, samples: np.ndarray, subjects: Subjects) -> float:
    """Fréchet distance between attribute-probe features of all final samples and of the held-out photos."""
    real = to_unit(np.asarray(subjects.heldout_photos).reshape(-1, *subjects.heldout_photos.shape[2:]))
    fake = samples.reshape(-1, *samples.shape[2:])
    return P.frechet_distance(P.probe_features(probes, fake), P.probe_features(probes, real))


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------


def format_cell(cell: Any, digits: int = 3, *, signed: bool = False) -> str:
    """A (mean, CI, n) cell as "mean ± CI" (``signed``: "+mean", for differences), a float, "–" for none."""
    if cell is None:
        return "–"
    if isinstance(cell, tuple):
        m, h, _ = cell
        if not np.isfinite(m):
            return "–"
        if 0 < abs(m) < 0.1:  # small quantities (held-out losses ~0.03) differ in the fourth decimal
            digits += 1
        if 0 < abs(m) < 0.01:  # and their differences (~3e-4) in the fifth
            digits += 1
        mean = f"{m:+.{digits}f}" if signed else f"{m:.{digits}f}"
        return f"{mean} ± {h:.{digits}f}" if np.isfinite(h) else mean
    if isinstance(cell, float):
        return f"{cell:.{digits}g}"
    return str(cell)


def seconds_to_target(steps: int | None, seconds_per_step: float | None) -> float | None:
    """Adaptation time to the target: its steps × the method's seconds per step (None if either is unknown)."""
    if steps is None or seconds_per_step is None or not np.isfinite(seconds_per_step):
        return None
    return steps * seconds_per_step


def markdown_table(summary: Mapping[str, Any], extra: Mapping[str, Mapping[str, Any]],
                   notes: Sequence[str] = (), seconds_per_step: Mapping[str, float] | None = None) -> str:
    """Final-step table (mean ± 95% CI over identities, seeds averaged first) with per-method extras (parameters,
    timing, FD). With ``seconds_per_step`` (per method) and a target, a column of the adaptation seconds to it."""
    columns = [m for m in METRICS if any(m in f for f in summary["final"].values())]
    extra_cols = list(dict.fromkeys(k for e in extra.values() for k in e))
    header = ["method", "step", *columns, *extra_cols]
    timed = "target" in summary and seconds_per_step is not None
    if "target" in summary:
        header.append("steps to target")
    if timed:
        header.append("s to target")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, f in summary["final"].items():
        cells = [method, str(f["step"]), *(format_cell(f.get(c)) for c in columns),
                 *(format_cell(extra.get(method, {}).get(c)) for c in extra_cols)]
        if "target" in summary:
            cells.append(format_cell(summary["target"]["steps"].get(method)))
        if timed:
            seconds = seconds_to_target(summary["target"]["steps"].get(method), seconds_per_step.get(method))
            cells.append("–" if seconds is None else f"{seconds:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    if "target" in summary:
        t = summary["target"]
        lines.append(f"\nSteps to target: first evaluated step whose mean {t['metric']} reaches "
                     f"{t['value']:.4f}, the best mean of `{t['reference_method']}` over its steps (– = never).")
    if timed:
        lines.append("s to target: steps to target × the method's seconds per adaptation step (all subjects in one "
                     "call), as measured, on whatever load the machine had when each cell ran.")
    lines += [f"\n{note}" for note in notes]
    return "\n".join(lines) + "\n"


def curve_table(summary: Mapping[str, Any], metric: str) -> str:
    """Markdown table of one metric (mean ± CI) per method (rows) and evaluation step (columns)."""
    cs = summary["curves"].get(metric, {})
    steps = sorted({s for c in cs.values() for s in c["step"]})
    lines = [f"| {metric} | " + " | ".join(str(s) for s in steps) + " |", "|" + "---|" * (len(steps) + 1)]
    for method, c in cs.items():
        by_step = {s: (m, h, n) for s, m, h, n in zip(c["step"], c["mean"], c["ci"], c["n"])}
        lines.append(f"| {method} | " + " | ".join(format_cell(by_step.get(s)) for s in steps) + " |")
    return "\n".join(lines) + "\n"


def plot_scatter(points: Mapping[str, tuple[Sequence[float], Sequence[float]]], path, *, xlabel: str,
                 ylabel: str, title: str | None = None):
    """One colour per method; written atomically as PNG (Agg backend, no global pyplot state)."""
    import io

    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    from metalora.train.io import atomic_write_bytes

    fig = Figure(figsize=(6, 4), dpi=120)
    ax = fig.add_subplot(1, 1, 1)
    for label, (x, y) in points.items():
        ax.scatter(x, y, label=label, alpha=0.7, s=18)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return atomic_write_bytes(path, buf.getvalue())
