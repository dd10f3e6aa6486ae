"""dlib face-recognition backend (metalora.eval.faces) on real LFW photos; skipped without the "faces" extra."""

import re
import sys

import numpy as np
import pytest

dlib = pytest.importorskip("dlib")

from PIL import Image  # noqa: E402

from metalora.eval import faces  # noqa: E402
from metalora.eval.metrics import cosine_matrix  # noqa: E402

N_IDENTITIES = 6  # x 2 photos each: enough pairs to compare, a few seconds of CPU per batch
HINT = re.escape('pip install -e ".[faces]"')


@pytest.fixture(scope="module")
def encoder():
    return faces.load_dlib_encoder()


@pytest.fixture(scope="module")
def lfw_pairs(lfw_root):
    """(2K, 128, 128, 3) uint8: the first two photos of the first K identities, in identity order, and labels."""
    names = sorted(p.name for p in lfw_root.iterdir() if p.is_dir())[:N_IDENTITIES]
    files = [f for name in names for f in sorted((lfw_root / name).glob("*.jpg"))[:2]]
    assert len(files) == 2 * N_IDENTITIES, "every LFW identity here has >= 5 photos"
    images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    return images, np.repeat(np.arange(N_IDENTITIES), 2)


def _downscale(images: np.ndarray, size: int) -> np.ndarray:
    return np.stack([np.asarray(Image.fromarray(x).resize((size, size), Image.Resampling.BICUBIC)) for x in images])


@pytest.fixture(scope="module")
def lfw_embeddings(encoder, lfw_pairs):
    images, _ = lfw_pairs
    return {"native": encoder.embed(images), "64px": encoder.embed(_downscale(images, 64))}


def _gray(size: int = 64) -> np.ndarray:
    return np.full((size, size, 3), 128, np.uint8)


# ------------------------------------------------------------------------------------------- LFW photos


@pytest.mark.lfw
@pytest.mark.parametrize("which", ["native", "64px"])
def test_faces_found_and_rows_consistent(lfw_embeddings, which):
    emb = lfw_embeddings[which]
    n = 2 * N_IDENTITIES
    assert emb.embeddings.shape == (n, 128) and emb.embeddings.dtype == np.float32
    assert emb.found.shape == (n,) and emb.found.dtype == bool
    assert emb.found.sum() >= 0.8 * n, f"{which}: faces found in {emb.found.sum()}/{n}"
    np.testing.assert_array_equal(np.isnan(emb.embeddings).all(axis=1), ~emb.found)
    assert np.isfinite(emb.embeddings[emb.found]).all()
    assert emb.missing == n - emb.found.sum()


@pytest.mark.lfw
@pytest.mark.parametrize("which", ["native", "64px"])
def test_same_person_closer_than_different(lfw_embeddings, lfw_pairs, which):
    _, labels = lfw_pairs
    emb = lfw_embeddings[which]
    both = np.array([emb.found[2 * k] and emb.found[2 * k + 1] for k in range(N_IDENTITIES)])
    assert both.sum() >= N_IDENTITIES - 1
    e = emb.embeddings.astype(np.float64)
    cos = np.full((len(e), len(e)), np.nan)
    cos[np.ix_(emb.found, emb.found)] = cosine_matrix(e[emb.found], e[emb.found])
    different = labels[:, None] != labels[None]
    same_pairs = [(2 * k, 2 * k + 1) for k in np.flatnonzero(both)]
    for a, b in same_pairs:
        others = np.nanmean(cos[a][different[a]])
        assert cos[a, b] > others, f"photo {a}: same-person cosine {cos[a, b]:.3f} vs others {others:.3f}"
    same_cos = np.array([cos[a, b] for a, b in same_pairs])
    same_dist = np.array([np.linalg.norm(e[a] - e[b]) for a, b in same_pairs])
    assert same_cos.mean() > cos[different & np.isfinite(cos)].mean() + 0.05
    # dlib's own rule: Euclidean < 0.6 for the same person; the closest pair and most pairs must pass it
    a, b = same_pairs[int(np.argmin(same_dist))]
    assert same_dist.min() < 0.6 and faces.same_person(e[a], e[b])
    assert np.mean(same_dist < 0.6) >= 0.5
    pairs = [(i, j) for i in np.flatnonzero(emb.found) for j in np.flatnonzero(emb.found) if i < j and different[i, j]]
    impostor = faces.same_person(e[[i for i, _ in pairs]], e[[j for _, j in pairs]])
    assert impostor.dtype == bool and impostor.mean() <= 0.1


@pytest.mark.lfw
def test_float_input_matches_uint8(encoder, lfw_pairs):
    images, _ = lfw_pairs
    a = encoder.embed(images[:1])
    b = encoder.embed(images[:1].astype(np.float32) / 255.0)
    assert a.found[0] and b.found[0]
    np.testing.assert_allclose(a.embeddings, b.embeddings, atol=1e-6)


@pytest.mark.lfw
def test_blank_image_is_reported_not_dropped(encoder, lfw_pairs):
    images, _ = lfw_pairs
    small = _downscale(images[:3], 64)
    emb = encoder.embed(np.stack([_gray(), small[0]]))
    assert emb.found.tolist() == [False, True] and emb.missing == 1
    assert np.isnan(emb.embeddings[0]).all()

    r = faces.r_face_sim_dlib(encoder, np.stack([_gray(), small[0]]), heldout=np.stack([small[1], _gray()]))
    assert r["missing_samples"] == 1 and r["missing_references"] == 1
    assert r["per_image"].shape == (2,) and np.isnan(r["per_image"][0]) and np.isfinite(r["per_image"][1])
    assert r["mean"] == pytest.approx(r["per_image"][1]) and r["per_image"][1] > 0.85  # same person, photo 2

    # every reference faceless: nothing usable, NaN mean, counted, no exception
    f = faces.face_sim_dlib(encoder, small[:2], reference=_gray())
    assert np.isnan(f["mean"]) and np.isnan(f["per_image"]).all()
    assert f["missing_samples"] == 0 and f["missing_references"] == 1


# ----------------------------------------------------------------------------------- no photos needed


def test_gray_image_not_found(encoder):
    emb = encoder.embed(_gray(32)[None])
    assert not emb.found[0] and emb.missing == 1 and np.isnan(emb.embeddings).all()


def test_largest_face_is_used():
    """With two detections, landmarks are taken on the larger box (a fake detector, so no photo is needed)."""
    boxes = [dlib.rectangle(0, 0, 20, 20), dlib.rectangle(10, 10, 90, 90), dlib.rectangle(5, 5, 40, 40)]
    seen = []

    class Recognizer:
        def compute_face_descriptor(self, chip):
            return np.ones(128)

    enc = faces.DlibFaceEncoder(
        detector=lambda image, upsample: boxes,
        shape_predictor=lambda image, box: seen.append(box) or box,
        recognizer=Recognizer(),
        get_face_chip=lambda image, shape, size: np.zeros((size, size, 3), np.uint8),
        upsample_to=160,
    )
    emb = enc.embed(np.zeros((2, 32, 48, 3), np.uint8))
    assert emb.found.all() and seen == [boxes[1], boxes[1]]
    assert faces.largest_box_index(boxes) == 1


def test_input_validation_and_upsampling():
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        faces.to_uint8_images(np.full((1, 8, 8, 3), -1.0))
    with pytest.raises(ValueError, match="shape"):
        faces.to_uint8_images(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(TypeError):
        faces.to_uint8_images(np.zeros((1, 8, 8, 3), np.int32))
    assert faces.upsample_shorter_side(np.zeros((32, 48, 3), np.uint8), 160).shape == (160, 240, 3)
    assert faces.upsample_shorter_side(np.zeros((200, 300, 3), np.uint8), 160).shape == (200, 300, 3)
    assert faces.same_person(np.zeros(128), np.full(128, 0.05)) is True  # distance 0.566
    assert faces.same_person(np.zeros(128), np.full(128, np.nan)) is False


def test_import_error_names_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "dlib", None)
    with pytest.raises(ImportError, match=HINT):
        faces.load_dlib_encoder()


def test_import_error_when_models_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "face_recognition_models", None)
    with pytest.raises(ImportError, match=HINT):
        faces.load_dlib_encoder()


def test_model_paths_without_pkg_resources(monkeypatch):
    """face_recognition_models 0.3.0 imports pkg_resources, gone from setuptools >= 81: the files are still found."""
    monkeypatch.setitem(sys.modules, "pkg_resources", None)
    monkeypatch.delitem(sys.modules, "face_recognition_models", raising=False)
    five_point, descriptor = faces._model_paths()
    assert five_point.endswith("shape_predictor_5_face_landmarks.dat")
    assert descriptor.endswith("dlib_face_recognition_resnet_model_v1.dat")
