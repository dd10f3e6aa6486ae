"""Optional real face-recognition identity backend for the real-photo (LFW) track: dlib's ResNet descriptor.

Why: the probes in ``metalora.eval.probes`` are trained on our own data, so FaceSim / R-FaceSim measured with them
can share blind spots with the models being evaluated. dlib's descriptor (99.38% on LFW verification) is an
independent, pre-trained face-recognition network, so identity numbers on real photos can be checked against it.

Pipeline per image (the one dlib's descriptor was trained with):

1. upsample so the shorter side is ``upsample_to`` px (PIL bicubic). Our images are 32-64 px, while the HOG frontal
   detector scans an 80x80 window and misses smaller faces; upsampling the image once is cheaper and more
   predictable than the detector's own pyramid upsampling.
2. HOG frontal face detector (``dlib.get_frontal_face_detector``); with several faces, the largest box wins, since
   the subject of a portrait is its largest face.
3. 5-point landmarks, aligned 150x150 chip (``dlib.get_face_chip``), 128-D descriptor
   (``face_recognition_model_v1.compute_face_descriptor`` on the chip).

Images without a detected face are never dropped: their row is NaN and ``FaceEmbeddings.found`` is False, and the
similarity helpers report how many samples / references were unusable, so a method that generates non-faces cannot
look better by shrinking its own denominator unnoticed.

dlib's verification rule is Euclidean distance < 0.6 between descriptors (``same_person``); the FaceSim helpers use
cosine similarity instead, to stay on the same scale as ``metalora.eval.metrics``.

Install with ``pip install -e ".[faces]"``. ``face_recognition_models`` 0.3.0 imports ``pkg_resources``, which
setuptools >= 81 no longer ships; the model files are then located next to the package without importing it.
"""

from __future__ import annotations

import importlib.util
import pathlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

from metalora.eval.metrics import face_sim_from_embeddings

__all__ = [
    "DLIB_SAME_PERSON_THRESHOLD",
    "DlibFaceEncoder",
    "FaceEmbeddings",
    "face_sim_dlib",
    "face_sim_from_face_embeddings",
    "largest_box_index",
    "load_dlib_encoder",
    "same_person",
    "to_uint8_images",
    "upsample_shorter_side",
]

INSTALL_HINT = 'the dlib face encoder needs the optional "faces" extra: pip install -e ".[faces]"'
DESCRIPTOR_DIM = 128
CHIP_SIZE = 150  # the aligned chip size dlib's ResNet descriptor was trained on
DLIB_SAME_PERSON_THRESHOLD = 0.6  # dlib's documented Euclidean-distance rule for "same person"
_FIVE_POINT_MODEL = "shape_predictor_5_face_landmarks.dat"
_DESCRIPTOR_MODEL = "dlib_face_recognition_resnet_model_v1.dat"


@dataclass(frozen=True)
class FaceEmbeddings:
    """Descriptors of a batch, one row per input image, so rows stay aligned with the caller's images.

    embeddings: (N, 128) float32; NaN rows where no face was found.
    found: (N,) bool; False where no face was found.
    """

    embeddings: np.ndarray
    found: np.ndarray

    @property
    def missing(self) -> int:
        """Number of images without a detected face."""
        return int(np.count_nonzero(~self.found))


# ----------------------------------------------------------------------------------------------- pure helpers


def to_uint8_images(images) -> np.ndarray:
    """(N, H, W, 3) uint8 from uint8 or float-in-[0, 1] images: dlib only accepts uint8 RGB.

    Floats outside [0, 1] raise instead of being clipped: a [-1, 1] model output passed by mistake would otherwise
    be silently darkened and score as a different (or no) face.
    """
    x = np.asarray(images)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"images must have shape (N, H, W, 3), got {x.shape}")
    if x.dtype == np.uint8:
        return x
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"images must be uint8 or float in [0, 1], got dtype {x.dtype}")
    if x.size and (not np.all(np.isfinite(x)) or x.min() < -1e-3 or x.max() > 1 + 1e-3):
        raise ValueError("float images must be finite and in [0, 1]")
    return np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def _as_image_batch(images) -> np.ndarray:
    """Promote a single (H, W, 3) image to a batch of one: references are often a single photo."""
    x = np.asarray(images)
    return x[None] if x.ndim == 3 else x


def upsample_shorter_side(image: np.ndarray, size: int) -> np.ndarray:
    """Bicubic-resize an (H, W, 3) uint8 image so its shorter side is ``size`` px; larger images are left alone.

    Only upsampling: the detector handles large faces fine, and downsampling would discard detail the descriptor uses.
    """
    h, w = image.shape[:2]
    if min(h, w) >= size:
        return image
    scale = size / min(h, w)
    new_wh = (max(size, round(w * scale)), max(size, round(h * scale)))
    return np.asarray(Image.fromarray(image).resize(new_wh, Image.Resampling.BICUBIC))


def largest_box_index(boxes) -> int:
    """Index of the largest-area box among dlib rectangles: the portrait's subject, not a face in the background."""
    areas = [box.width() * box.height() for box in boxes]
    if not areas:
        raise ValueError("no boxes")
    return int(np.argmax(areas))


def same_person(a, b, threshold: float = DLIB_SAME_PERSON_THRESHOLD):
    """dlib's verification rule: Euclidean distance between descriptors < ``threshold`` (0.6 by default).

    Accepts (128,) or (N, 128) descriptors (broadcast); a NaN descriptor (no face) is never the same person.
    Returns a bool for a single pair, else a bool array.
    """
    dist = np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64), axis=-1)
    out = dist < threshold
    return bool(out) if np.ndim(out) == 0 else out


def face_sim_from_face_embeddings(samples: FaceEmbeddings, targets: FaceEmbeddings) -> dict:
    """Mean cosine of each sample's descriptor to the targets that have a face, with the unusable images counted.

    The cosine rejects NaN, so faceless rows are filtered out first and put back as NaN in ``per_image``;
    returns {"mean", "per_image", "missing_samples", "missing_references"} (see ``face_sim_dlib``).
    """
    n = samples.embeddings.shape[0]
    per_image = np.full(n, np.nan, np.float64)
    if samples.found.any() and targets.found.any():
        # The probe track's formula (mean cosine to the targets), on the rows that have a face.
        per_image[samples.found] = face_sim_from_embeddings(samples.embeddings[samples.found],
                                                            targets.embeddings[targets.found])
    usable = np.isfinite(per_image)
    return {
        "mean": float(per_image[usable].mean()) if usable.any() else float("nan"),
        "per_image": per_image,
        "missing_samples": samples.missing,
        "missing_references": targets.missing,
    }


# ------------------------------------------------------------------------------------------------ the encoder


class DlibFaceEncoder:
    """HOG detector + 5-point alignment + dlib ResNet descriptor; build it with ``load_dlib_encoder``.

    The dlib objects are passed in rather than loaded here so the class stays importable and testable without
    dlib; ``get_face_chip`` is the aligner (``dlib.get_face_chip``).
    """

    def __init__(self, detector, shape_predictor, recognizer, get_face_chip, upsample_to: int = 160):
        if upsample_to < 1:
            raise ValueError(f"upsample_to must be positive, got {upsample_to}")
        self.detector = detector
        self.shape_predictor = shape_predictor
        self.recognizer = recognizer
        self.get_face_chip = get_face_chip
        self.upsample_to = int(upsample_to)

    def embed_one(self, image: np.ndarray) -> np.ndarray | None:
        """(128,) float32 descriptor of the largest face in one (H, W, 3) uint8 image, or None if none is found."""
        image = np.ascontiguousarray(upsample_shorter_side(image, self.upsample_to))
        boxes = self.detector(image, 0)  # 0: no pyramid upsampling, the image was upsampled above
        if len(boxes) == 0:
            return None
        shape = self.shape_predictor(image, boxes[largest_box_index(boxes)])
        chip = self.get_face_chip(image, shape, size=CHIP_SIZE)
        return np.asarray(self.recognizer.compute_face_descriptor(chip), np.float32)

    def embed(self, images) -> FaceEmbeddings:
        """Descriptors of (N, H, W, 3) uint8 / float-in-[0, 1] images; NaN rows and found=False where no face."""
        batch = to_uint8_images(images)
        embeddings = np.full((batch.shape[0], DESCRIPTOR_DIM), np.nan, np.float32)
        found = np.zeros(batch.shape[0], bool)
        for i, image in enumerate(batch):
            vec = self.embed_one(image)
            if vec is not None:
                embeddings[i], found[i] = vec, True
        return FaceEmbeddings(embeddings=embeddings, found=found)


def face_sim_dlib(encoder: DlibFaceEncoder, images, reference) -> dict:
    """FaceSim with dlib descriptors: mean cosine of each sample to the reference photo(s) the method saw.

    images: (N, H, W, 3); reference: (M, H, W, 3) or one (H, W, 3). Returns {"mean": float, NaN if nothing is
    usable; "per_image": (N,) float64, NaN where the sample or every reference lacked a face; "missing_samples",
    "missing_references": ints}. Report the missing counts alongside the mean: the mean is over usable samples only.
    """
    return face_sim_from_face_embeddings(encoder.embed(images), encoder.embed(_as_image_batch(reference)))


def r_face_sim_dlib(encoder: DlibFaceEncoder, images, heldout) -> dict:
    """R-FaceSim with dlib descriptors: mean cosine to held-out photos of the identity (references excluded).

    Same formula and return value as ``face_sim_dlib``; the caller passes held-out photos only, so copying the
    reference gains nothing that identity does not explain (see ``metalora.eval.metrics.r_face_sim_from_embeddings``).
    """
    return face_sim_from_face_embeddings(encoder.embed(images), encoder.embed(_as_image_batch(heldout)))


# -------------------------------------------------------------------------------------------------- loading


def _import_dlib():
    try:
        import dlib
    except ImportError as err:
        raise ImportError(INSTALL_HINT) from err
    return dlib


def _packaged_model_paths() -> tuple[str, str]:
    """Model paths found beside ``face_recognition_models`` without importing it (its import needs pkg_resources)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(INSTALL_HINT)
    models = pathlib.Path(next(iter(spec.submodule_search_locations))) / "models"
    return str(models / _FIVE_POINT_MODEL), str(models / _DESCRIPTOR_MODEL)


def _model_paths() -> tuple[str, str]:
    """(5-point landmark model, ResNet descriptor model) paths from ``face_recognition_models``."""
    try:
        import face_recognition_models
    except ModuleNotFoundError as err:
        if err.name != "pkg_resources":
            raise ImportError(INSTALL_HINT) from err
        paths = _packaged_model_paths()
    except ImportError as err:
        raise ImportError(INSTALL_HINT) from err
    else:
        paths = (
            face_recognition_models.pose_predictor_five_point_model_location(),
            face_recognition_models.face_recognition_model_location(),
        )
    for path in paths:
        if not pathlib.Path(path).is_file():
            raise FileNotFoundError(f"dlib model file missing: {path} ({INSTALL_HINT})")
    return paths


def load_dlib_encoder(upsample_to: int = 160) -> DlibFaceEncoder:
    """Build the dlib encoder; ImportError naming ``pip install -e ".[faces]"`` when the optional packages are absent.

    upsample_to: shorter side (px) small images are resized to before detection; 160 puts a face that fills a
    32-64 px crop well above the HOG detector's ~80 px minimum.
    """
    dlib = _import_dlib()
    five_point, descriptor = _model_paths()
    return DlibFaceEncoder(
        detector=dlib.get_frontal_face_detector(),
        shape_predictor=dlib.shape_predictor(five_point),
        recognizer=dlib.face_recognition_model_v1(descriptor),
        get_face_chip=dlib.get_face_chip,
        upsample_to=upsample_to,
    )
