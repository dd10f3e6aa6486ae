"""Real photos laid out as ``root/<identity>/<image files>``: scanning, validation and loading.

Optional per-identity side files:
* ``captions.txt`` -- one line per photo, ``<file name><TAB><caption>``; blank lines and ``#`` comments ignored.
* ``attributes.json`` -- ``{"<file name>": {"<attribute>": "<value>", ...}, ...}``.

Anything else in an identity folder that is not a readable image is an error naming the file, unless the scan is
asked to ``on_error="skip"``, in which case it is skipped and listed in the scan's report -- never dropped silently.
Hidden files (``.*``) are ignored; plain files directly under ``root`` (a README) are not identities.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
CAPTIONS_FILE = "captions.txt"
ATTRIBUTES_FILE = "attributes.json"
LFW_ENV = "METALORA_LFW"

# A face-crop hook maps an RGB image to the box (left, top, right, bottom) to keep; None means centre crop.
FaceCrop = Callable[[Image.Image], tuple[int, int, int, int]]


class DataError(ValueError):
    """Bad input data; the message names the offending file or folder."""


def default_lfw_root() -> pathlib.Path:
    """``$METALORA_LFW`` or ``<repo>/../shared/data/lfw`` (resolved from this file, not from the cwd)."""
    if env := os.environ.get(LFW_ENV):
        return pathlib.Path(env).expanduser().resolve()
    return (pathlib.Path(__file__).resolve().parents[3] / "shared" / "data" / "lfw").resolve()


@dataclasses.dataclass(frozen=True)
class IdentityFolder:
    name: str
    images: tuple[pathlib.Path, ...]  # sorted by file name
    captions: dict[str, str] | None  # file name -> caption, when captions.txt exists
    attributes: dict[str, dict[str, str]] | None  # file name -> attributes, when attributes.json exists


@dataclasses.dataclass(frozen=True)
class ScanReport:
    """What a lenient scan skipped, as (path, reason) pairs."""

    skipped: tuple[tuple[str, str], ...] = ()

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)


@dataclasses.dataclass(frozen=True)
class FolderScan:
    root: pathlib.Path
    identities: tuple[IdentityFolder, ...]  # sorted by name
    report: ScanReport


def load_photo(
    path: pathlib.Path | str, resolution: int | None = None, *, face_crop: FaceCrop | None = None
) -> np.ndarray:
    """Decode one photo to uint8 RGB (H, W, 3): EXIF orientation applied, grayscale/RGBA/palette -> RGB,
    square crop (centre, or ``face_crop``'s box), Lanczos resize to ``resolution`` when given.

    Raises DataError naming the file when it cannot be decoded (corrupt or truncated bytes, not an image).
    """
    path = pathlib.Path(path)
    try:
        with Image.open(path) as im:
            im.load()  # decode fully here, so truncated files fail now and not later
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                bg = Image.new("RGBA", im.size, (255, 255, 255, 255))  # transparent pixels -> white
                im = Image.alpha_composite(bg, im)
            im = im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot read image {path}: {type(e).__name__}: {e}") from e
    if face_crop is not None:
        box = tuple(int(v) for v in face_crop(im))
        left, top, right, bottom = box
        if not (0 <= left < right <= im.width and 0 <= top < bottom <= im.height):
            raise DataError(f"face crop box {box} outside image {path} of size {im.size}")
        im = im.crop(box)
    w, h = im.size
    side = min(w, h)
    if (w, h) != (side, side):
        left, top = (w - side) // 2, (h - side) // 2
        im = im.crop((left, top, left + side, top + side))
    if resolution is not None and im.size != (resolution, resolution):
        im = im.resize((resolution, resolution), Image.Resampling.LANCZOS)
    return np.asarray(im, np.uint8)


def _read_captions(path: pathlib.Path, image_names: set[str]) -> dict[str, str]:
    captions = {}
    for lineno, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, caption = line.partition("\t")
        if not sep or not caption.strip():
            raise DataError(f"{path}:{lineno}: expected '<file name><TAB><caption>', got {raw!r}")
        if name not in image_names:
            raise DataError(f"{path}:{lineno}: caption for {name!r}, which is not an image in {path.parent}")
        captions[name] = caption.strip()
    return captions


def _read_attributes(path: pathlib.Path, image_names: set[str]) -> dict[str, dict[str, str]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise DataError(f"{path}: expected an object mapping file names to attribute objects")
    for name in data:
        if name not in image_names:
            raise DataError(f"{path}: attributes for {name!r}, which is not an image in {path.parent}")
    return {k: {str(a): str(v) for a, v in d.items()} for k, d in data.items()}


def scan_identity_folders(root: pathlib.Path | str, *, on_error: str = "raise", validate: bool = True) -> FolderScan:
    """List and validate identity folders under ``root``.

    ``on_error="raise"`` (default) raises DataError at the first bad file or empty folder; ``"skip"`` skips it and
    records it in ``FolderScan.report``. ``validate`` decodes every image once (catches corrupt bytes early).
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    root = pathlib.Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"identity-folder root {root} does not exist or is not a directory")
    skipped: list[tuple[str, str]] = []

    def bad(path: pathlib.Path, reason: str, exc: Exception | None = None) -> None:
        if on_error == "raise":
            raise DataError(f"{path}: {reason}") from exc
        skipped.append((str(path), reason))

    identities = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
        images, side = [], {}
        for f in files:
            if f.name in (CAPTIONS_FILE, ATTRIBUTES_FILE):
                side[f.name] = f
            elif f.is_dir():
                bad(f, "unexpected sub-folder in an identity folder")
            elif f.suffix.lower() not in IMAGE_SUFFIXES:
                bad(
                    f,
                    f"not an image file (suffix {f.suffix!r}; expected one of {IMAGE_SUFFIXES} or "
                    f"{CAPTIONS_FILE}/{ATTRIBUTES_FILE})",
                )
            else:
                if validate:
                    try:
                        load_photo(f)
                    except DataError as e:
                        bad(f, str(e), e)
                        continue
                images.append(f)
        if not images:
            bad(folder, "identity folder has no readable images")
            continue
        # Side files may name images a lenient scan skipped; they are checked against every image-like file.
        names = {f.name for f in files if f.suffix.lower() in IMAGE_SUFFIXES}
        captions = attributes = None
        try:
            if CAPTIONS_FILE in side:
                captions = _read_captions(side[CAPTIONS_FILE], names)
            if ATTRIBUTES_FILE in side:
                attributes = _read_attributes(side[ATTRIBUTES_FILE], names)
        except DataError as e:
            bad(folder, str(e), e)
            continue
        identities.append(IdentityFolder(folder.name, tuple(images), captions, attributes))
    if not identities:
        raise DataError(f"no identity folders with images under {root}")
    return FolderScan(root, tuple(identities), ScanReport(tuple(skipped)))
