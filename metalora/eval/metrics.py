"""Evaluation metrics on probe outputs (embeddings, features, predicted class ids): pure NumPy, float64.

These functions know nothing about networks; ``metalora.eval.probes`` wraps them to take images. Formulas:

* cosine(a, b) = <a, b> / (‖a‖ ‖b‖)
* FaceSim_i = mean_r cosine(e(x_i), e(ref_r))                      (reference photo(s) the method saw)
* R-FaceSim_i = mean_h cosine(e(x_i), e(held_h))                   (held-out photos, references excluded)
* prompt alignment = Σ_i Σ_{a ∈ A_i} [ŷ_ia = y_ia] / Σ_i |A_i|    (A_i: attributes the prompt of i asks for)
* pose copying = #{i : pose ŷ_i = pose(ref_i)} / #{i : requested pose_i ≠ pose(ref_i)}, over those i only
* diversity = 2 / (n(n−1)) Σ_{i<j} d(f_i, f_j), d = 1 − cosine (default) or Euclidean
* Fréchet distance = ‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁^½ Σ₂ Σ₁^½)^½     (FID's formula on probe features)
* ROC AUC = P(s⁺ > s⁻) + ½ P(s⁺ = s⁻)                              (Mann–Whitney U / (n⁺ n⁻))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = [
    "best_threshold",
    "cosine_matrix",
    "face_sim_from_embeddings",
    "frechet_distance",
    "frechet_distance_from_stats",
    "gaussian_stats",
    "mean_pairwise_distance",
    "pose_copying_rate",
    "prompt_alignment_from_predictions",
    "r_face_sim_from_embeddings",
    "roc_auc",
    "sqrtm_psd",
    "verification_accuracy",
]


def _as_2d(x, name: str) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape (N, D) or (D,), got {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains NaN/Inf")
    return x


def cosine_matrix(a, b) -> np.ndarray:
    """(N, M) cosine similarities between rows of ``a`` (N, D) and ``b`` (M, D). Zero vectors raise."""
    a, b = _as_2d(a, "a"), _as_2d(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dims differ: {a.shape} vs {b.shape}")
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    if np.any(na == 0) or np.any(nb == 0):
        raise ValueError("cosine similarity of a zero vector is undefined")
    return (a / na[:, None]) @ (b / nb[:, None]).T


def face_sim_from_embeddings(embeddings, reference_embeddings) -> np.ndarray:
    """FaceSim per sample, (N,): mean cosine of each sample's embedding to the reference embedding(s)."""
    return cosine_matrix(embeddings, reference_embeddings).mean(axis=1)


def r_face_sim_from_embeddings(embeddings, heldout_embeddings) -> np.ndarray:
    """R-FaceSim per sample, (N,): mean cosine to the held-out photos of the same identity.

    The caller passes held-out photos only (the protocol's held-out set is disjoint from the references), so a
    method that copies the reference image gains nothing here that identity itself does not explain.
    """
    return cosine_matrix(embeddings, heldout_embeddings).mean(axis=1)


def prompt_alignment_from_predictions(
    predicted: Mapping[str, Sequence[int]],
    requested: Sequence[Mapping[str, int]],
) -> dict:
    """Accuracy of predicted attribute class ids on the attributes each prompt asks for.

    Args:
      predicted: attribute name -> (N,) predicted class ids.
      requested: N dicts attribute name -> requested class id (only the prompted attributes; may be empty).

    Returns ``{"accuracy", "per_attribute": {name: acc}, "per_image": (N,) float (NaN where nothing was asked),
    "num_requests"}``. ``accuracy`` pools all (image, attribute) requests; NaN when there are none.
    """
    n = len(requested)
    per_image = np.full(n, np.nan)
    hits: dict[str, list[bool]] = {}
    for i, req in enumerate(requested):
        ok = []
        for name, cls in req.items():
            if name not in predicted:
                raise KeyError(
                    f"prompt {i} asks for attribute {name!r} but the classifier predicts only {sorted(predicted)}"
                )
            pred = np.asarray(predicted[name])
            if pred.shape[0] != n:
                raise ValueError(f"predicted[{name!r}] has {pred.shape[0]} entries for {n} prompts")
            ok.append(bool(pred[i] == cls))
            hits.setdefault(name, []).append(ok[-1])
        if ok:
            per_image[i] = float(np.mean(ok))
    total = sum(len(v) for v in hits.values())
    accuracy = float(sum(sum(v) for v in hits.values()) / total) if total else float("nan")
    return {
        "accuracy": accuracy,
        "per_attribute": {k: float(np.mean(v)) for k, v in sorted(hits.items())},
        "per_image": per_image,
        "num_requests": total,
    }


def pose_copying_rate(predicted_pose, reference_pose, requested_pose) -> dict:
    """How often the predicted pose equals the reference's pose among samples whose prompt asks for another pose.

    Args (class ids, (N,) or scalars broadcast to N; ``requested_pose`` < 0 means the prompt names no pose):
      predicted_pose: pose predicted on each sample; reference_pose: pose of the reference photo of that sample.

    Returns ``{"rate", "copied", "eligible"}``; ``rate`` is NaN when no prompt asked for a different pose.
    """
    pred, ref, req = np.broadcast_arrays(
        np.asarray(predicted_pose), np.asarray(reference_pose), np.asarray(requested_pose)
    )
    eligible = (req >= 0) & (req != ref)
    copied = eligible & (pred == ref)
    n_el = int(eligible.sum())
    return {"rate": float(copied.sum() / n_el) if n_el else float("nan"), "copied": int(copied.sum()), "eligible": n_el}


def mean_pairwise_distance(features, metric: str = "cosine") -> float:
    """Mean distance over the n(n−1)/2 unordered pairs of rows: 1 − cosine (default) or Euclidean."""
    f = _as_2d(features, "features")
    n = f.shape[0]
    if n < 2:
        raise ValueError(f"diversity needs at least 2 samples, got {n}")
    if metric == "cosine":
        d = 1.0 - cosine_matrix(f, f)
    elif metric == "euclidean":
        sq = np.sum(f * f, axis=1)
        d = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2.0 * f @ f.T, 0.0))
    else:
        raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}")
    iu = np.triu_indices(n, k=1)
    return float(d[iu].mean())


def gaussian_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of the rows of ``features``, in float64."""
    f = _as_2d(features, "features")
    if f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature rows for a covariance, got {f.shape[0]}")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def sqrtm_psd(a) -> np.ndarray:
    """Principal square root of a symmetric positive semi-definite matrix by eigendecomposition.

    Eigenvalues that round-off made slightly negative are clipped to 0, so the result is real and symmetric,
    which ``scipy.linalg.sqrtm`` of a near-singular covariance does not guarantee (it can return complex parts).
    """
    a = np.asarray(a, np.float64)
    a = 0.5 * (a + a.T)
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance_from_stats(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet (2-Wasserstein²) distance between N(μ₁, Σ₁) and N(μ₂, Σ₂).

    tr (Σ₁Σ₂)^½ is computed as tr (Σ₁^½ Σ₂ Σ₁^½)^½: the same eigenvalues (similar matrices), but the argument is
    symmetric PSD, so an eigendecomposition gives it stably and without complex round-off.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = mu1.shape[0]
    for name, s in (("sigma1", s1), ("sigma2", s2)):
        if s.shape != (d, d):
            raise ValueError(f"{name} must have shape ({d}, {d}), got {s.shape}")
    if mu2.shape != (d,):
        raise ValueError(f"mu2 must have shape ({d},), got {mu2.shape}")
    r1 = sqrtm_psd(s1)
    inner = r1 @ s2 @ r1
    w = np.linalg.eigvalsh(0.5 * (inner + inner.T))
    tr_covmean = float(np.sqrt(np.clip(w, 0.0, None)).sum())
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean, 0.0))


def frechet_distance(features_a, features_b) -> float:
    """FID-style Fréchet distance between Gaussians fitted to two feature sets (rows = samples)."""
    return frechet_distance_from_stats(*gaussian_stats(features_a), *gaussian_stats(features_b))


def roc_auc(scores, labels) -> float:
    """Area under the ROC curve: the Mann–Whitney statistic with ties counted ½ (average ranks)."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"ROC AUC needs both classes, got {n_pos} positives and {n_neg} negatives")
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    ranks = np.empty(len(s))
    # Average 1-based ranks within runs of equal scores.
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    ends = np.r_[starts[1:], len(s)]
    for a, b in zip(starts, ends):
        ranks[order[a:b]] = 0.5 * (a + 1 + b)
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def best_threshold(scores, labels) -> float:
    """The threshold t maximising the accuracy of ``score > t`` (midpoint between neighbouring distinct scores)."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels).astype(bool)
    u = np.unique(scores)
    candidates = np.r_[u[0] - 1.0, 0.5 * (u[1:] + u[:-1]), u[-1] + 1.0]
    # accuracy(t) = (#pos with s > t + #neg with s <= t) / n, for all candidates at once via sorted counts.
    pos, neg = np.sort(scores[labels]), np.sort(scores[~labels])
    correct = (len(pos) - np.searchsorted(pos, candidates, side="right")) + np.searchsorted(neg, candidates, "right")
    return float(candidates[int(np.argmax(correct))])


def verification_accuracy(scores, labels, threshold: float) -> float:
    """Fraction of pairs classified correctly by ``score > threshold`` (same identity)."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels).astype(bool)
    return float(np.mean((scores > threshold) == labels))
