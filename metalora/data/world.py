"""A procedural world of stylised faces whose ground truth we know.

Every identity is a vector of traits (face shape, skin, hair, eyes, brows, nose, mouth, ears, moles, freckles)
drawn once from ``(world_seed, identity)``; every photo of it draws per-image attributes (pose, expression,
glasses, hat, background, lighting) and a small geometric jitter from ``(world_seed, identity, image_id)``.
The renderer is a pure function of (traits, attributes, jitter, resolution): numpy + Pillow, drawn at
``SUPERSAMPLE``x and downsampled with a Lanczos filter, so the same call gives the same pixels on any machine
with the same Pillow. Seeds come from ``numpy.random.SeedSequence`` over those integers, never from ``hash``.

Vocabularies are module-level tuples so that tokenizers and attribute probes can be built from them.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import numpy as np
from PIL import Image, ImageDraw

# --------------------------------------------------------------------------------------------------------------
# Vocabularies
# --------------------------------------------------------------------------------------------------------------

CLASS_WORD = "person"
DEFAULT_IDENTIFIER = "sks"

COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "white", "gray", "black")
_RGB = {
    "red": (200, 40, 40),
    "orange": (235, 130, 30),
    "yellow": (235, 210, 50),
    "green": (50, 160, 70),
    "blue": (45, 90, 210),
    "purple": (130, 60, 170),
    "pink": (240, 140, 190),
    "white": (240, 240, 240),
    "gray": (128, 128, 128),
    "black": (25, 25, 25),
}

HAIR_STYLES = ("bald", "buzz", "side_part", "bangs", "long", "afro", "bun")

# Per-image attributes: name -> class names. Order of names is the order of the int attribute vector.
ATTRIBUTE_CLASSES: dict[str, tuple[str, ...]] = {
    "pose": ("left", "frontal", "right"),
    "expression": ("neutral", "smiling", "surprised"),
    "glasses": ("none", "black", "red", "blue", "green", "yellow"),
    "hat": ("none", "red", "blue", "green", "yellow", "purple", "white", "black"),
    "background": ("white", "gray", "blue", "green", "red", "yellow", "purple", "orange", "pink"),
    "lighting": ("left", "front", "right"),
}
ATTRIBUTE_NAMES: tuple[str, ...] = tuple(ATTRIBUTE_CLASSES)

# Identity traits, all in [0, 1] except ``hair_style`` (an index into HAIR_STYLES) and ``mole_count`` (0..3).
TRAIT_NAMES: tuple[str, ...] = (
    "face_width",
    "face_length",
    "jaw_width",
    "skin_tone",
    "hair_style",
    "hair_colour",
    "hair_volume",
    "eye_colour",
    "eye_size",
    "eye_spacing",
    "eye_height",
    "brow_thickness",
    "brow_slant",
    "nose_length",
    "nose_width",
    "mouth_width",
    "lip_fullness",
    "ear_size",
    "freckles",
    "mole_count",
    "mole1_u",
    "mole1_v",
    "mole2_u",
    "mole2_v",
    "mole3_u",
    "mole3_v",
)
NUM_TRAITS = len(TRAIT_NAMES)
_T = {name: i for i, name in enumerate(TRAIT_NAMES)}
MAX_MOLES = 3

# Geometric nuisance per image (not captioned): scale, shift (fraction of the image), roll (degrees).
JITTER_NAMES: tuple[str, ...] = ("scale", "dx", "dy", "roll")
NUM_JITTER = len(JITTER_NAMES)

SUPERSAMPLE = 4
RESOLUTIONS = (32, 64, 128)

_POSE_PHRASE = {"left": "facing left", "frontal": "facing the camera", "right": "facing right"}
_EXPRESSION_PHRASE = {"neutral": "with a neutral expression", "smiling": "smiling", "surprised": "looking surprised"}
_LIGHTING_PHRASE = {"left": "lit from the left", "front": "lit from the front", "right": "lit from the right"}
_FLIP = {"left": "right", "right": "left"}


def _caption_words() -> tuple[str, ...]:
    words = {"a", "an", "photo", "of", "and", "wearing", "glasses", "hat", "on", "background", CLASS_WORD}
    for phrase in (*_POSE_PHRASE.values(), *_EXPRESSION_PHRASE.values(), *_LIGHTING_PHRASE.values()):
        words.update(phrase.split())
    for name in ("glasses", "hat", "background"):
        words.update(ATTRIBUTE_CLASSES[name])
    words.discard("none")
    return tuple(sorted(words))


# Every word a caption of this world can contain (without the rare identifier token, which is configurable).
CAPTION_VOCABULARY: tuple[str, ...] = _caption_words()

# Colour ramps for continuous traits: the trait value interpolates piecewise-linearly along the ramp.
_SKIN_RAMP = np.array(
    [(255, 224, 196), (241, 194, 160), (224, 172, 125), (198, 134, 92), (150, 98, 62), (98, 62, 38)], np.float64
)
_HAIR_RAMP = np.array(
    [(20, 16, 14), (70, 42, 24), (120, 70, 35), (165, 70, 35), (215, 180, 100), (235, 225, 190), (150, 150, 150)],
    np.float64,
)
_EYE_RAMP = np.array([(60, 35, 20), (110, 70, 30), (120, 120, 50), (60, 130, 70), (60, 110, 190), (130, 140, 150)])
_SHIRT = (55, 62, 80, 255)


# --------------------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------------------

_TRAIT_STREAM, _IMAGE_STREAM = 0, 1


def _rng(*entropy: int) -> np.random.Generator:
    for e in entropy:
        if int(e) < 0:
            raise ValueError(f"seeds and ids must be non-negative integers, got {entropy}")
    return np.random.default_rng(np.random.SeedSequence([int(e) for e in entropy]))


def identity_traits(world_seed: int, identity: int) -> np.ndarray:
    """The fixed trait vector of one identity, float32 of shape (NUM_TRAITS,), ordered as TRAIT_NAMES."""
    rng = _rng(world_seed, _TRAIT_STREAM, identity)
    t = rng.uniform(0.0, 1.0, NUM_TRAITS)
    t[_T["hair_style"]] = rng.integers(len(HAIR_STYLES))
    t[_T["mole_count"]] = rng.choice(MAX_MOLES + 1, p=(0.35, 0.3, 0.2, 0.15))
    for k in range(1, MAX_MOLES + 1):  # moles on the cheeks/forehead, away from the eyes' centres
        t[_T[f"mole{k}_u"]] = rng.uniform(0.15, 0.85)
        t[_T[f"mole{k}_v"]] = rng.uniform(0.1, 0.9)
    return t.astype(np.float32)


def image_condition(world_seed: int, identity: int, image_id: int) -> tuple[dict[str, str], np.ndarray]:
    """Per-image attributes (name -> class name) and jitter (float32 (NUM_JITTER,)) of one photo."""
    rng = _rng(world_seed, _IMAGE_STREAM, identity, image_id)
    c = ATTRIBUTE_CLASSES
    attributes = {
        "pose": c["pose"][rng.integers(3)],
        "expression": c["expression"][rng.integers(3)],
        # Accessories are absent about half the time, so "wearing glasses" is a real request at evaluation.
        "glasses": "none" if rng.random() < 0.5 else c["glasses"][1 + rng.integers(len(c["glasses"]) - 1)],
        "hat": "none" if rng.random() < 0.6 else c["hat"][1 + rng.integers(len(c["hat"]) - 1)],
        "background": c["background"][rng.integers(len(c["background"]))],
        "lighting": c["lighting"][rng.integers(3)],
    }
    jitter = np.array(
        [rng.uniform(0.92, 1.08), rng.uniform(-0.04, 0.04), rng.uniform(-0.04, 0.04), rng.uniform(-8.0, 8.0)],
        np.float32,
    )
    return attributes, jitter


# --------------------------------------------------------------------------------------------------------------
# Attributes <-> ids <-> captions
# --------------------------------------------------------------------------------------------------------------


def attribute_ids(attributes: dict[str, str]) -> np.ndarray:
    """Int64 class ids in ATTRIBUTE_NAMES order; raises naming the attribute on a missing or unknown value."""
    ids = []
    for name in ATTRIBUTE_NAMES:
        if name not in attributes:
            raise KeyError(f"attribute {name!r} missing from {attributes}")
        classes = ATTRIBUTE_CLASSES[name]
        if attributes[name] not in classes:
            raise ValueError(f"attribute {name!r} has unknown class {attributes[name]!r}; expected one of {classes}")
        ids.append(classes.index(attributes[name]))
    return np.array(ids, np.int64)


def attributes_from_ids(ids) -> dict[str, str]:
    ids = np.asarray(ids)
    if ids.shape != (len(ATTRIBUTE_NAMES),):
        raise ValueError(f"expected {len(ATTRIBUTE_NAMES)} attribute ids, got shape {ids.shape}")
    return {name: ATTRIBUTE_CLASSES[name][int(i)] for name, i in zip(ATTRIBUTE_NAMES, ids)}


def flip_attributes(attributes: dict[str, str]) -> dict[str, str]:
    """Attributes of the horizontally mirrored photo: left/right pose and lighting swap."""
    out = dict(attributes)
    for name in ("pose", "lighting"):
        if name in out:
            out[name] = _FLIP.get(out[name], out[name])
    return out


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def make_caption(attributes: dict[str, str], *, class_word: str = CLASS_WORD, identifier: str | None = None) -> str:
    """Caption from a (possibly partial) attribute dict, in a fixed order so it parses back (``parse_caption``).

    ``identifier`` (e.g. "sks") is the rare token put before the class word for personalisation prompts.
    """
    subject = f"{identifier} {class_word}" if identifier else f"a {class_word}"
    wear = []
    if attributes.get("glasses", "none") != "none":
        wear.append(f"{attributes['glasses']} glasses")
    if attributes.get("hat", "none") != "none":
        wear.append(f"{_article(attributes['hat'])} {attributes['hat']} hat")
    parts = [f"a photo of {subject}" + (" wearing " + " and ".join(wear) if wear else "")]
    if "expression" in attributes:
        parts.append(_EXPRESSION_PHRASE[attributes["expression"]])
    if "pose" in attributes:
        parts.append(_POSE_PHRASE[attributes["pose"]])
    if "lighting" in attributes:
        parts.append(_LIGHTING_PHRASE[attributes["lighting"]])
    if "background" in attributes:
        bg = attributes["background"]
        parts.append(f"on {_article(bg)} {bg} background")
    return ", ".join(parts)


def parse_caption(caption: str) -> dict[str, str]:
    """Attributes a caption states (inverse of ``make_caption``; "none" accessories are implicit, not returned)."""
    out: dict[str, str] = {}
    if m := re.search(r"wearing (?:(\w+) glasses)?(?: and )?(?:an? (\w+) hat)?", caption):
        if m.group(1):
            out["glasses"] = m.group(1)
        if m.group(2):
            out["hat"] = m.group(2)
    for name, phrases in (("expression", _EXPRESSION_PHRASE), ("pose", _POSE_PHRASE), ("lighting", _LIGHTING_PHRASE)):
        for cls, phrase in phrases.items():
            if f", {phrase}" in caption:
                out[name] = cls
    if m := re.search(r"on an? (\w+) background", caption):
        out["background"] = m.group(1)
    return out


# --------------------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------------------


def _ramp(ramp: np.ndarray, t: float) -> np.ndarray:
    x = np.clip(t, 0.0, 1.0) * (len(ramp) - 1)
    i = min(int(x), len(ramp) - 2)
    return ramp[i] + (x - i) * (ramp[i + 1] - ramp[i])


def _rgba(c, scale: float = 1.0, alpha: int = 255) -> tuple[int, int, int, int]:
    c = np.clip(np.asarray(c, np.float64) * scale, 0, 255)
    return (round(c[0]), round(c[1]), round(c[2]), alpha)


def _face_outline(cx, cy, fw, fh, jaw, n=72) -> list[tuple[float, float]]:
    """Superellipse head: squarish forehead, jaw from pointed (jaw=0) to square (jaw=1)."""
    pts = []
    for th in np.linspace(0.0, 2 * np.pi, n, endpoint=False):
        c, s = np.cos(th), np.sin(th)
        e = 2.0 / (2.4 if s < 0 else 1.7 + 1.6 * jaw)
        x, y = np.sign(c) * abs(c) ** e, np.sign(s) * abs(s) ** e
        if y > 0:  # narrow the lower face toward the chin
            x *= 1.0 - (1.0 - jaw) * 0.35 * y**1.5
        pts.append((cx + fw * x, cy + fh * y))
    return pts


def _hair_cap(outline, cx, cy, fw, fh, grow, hairline) -> list[tuple[float, float]]:
    """Hair polygon: the part of the head outline above ``hairline(u)`` pushed outward by ``grow``.

    ``hairline`` maps u in [-1, 1] (face-relative x) to the face-relative y of the hair's lower edge.
    """
    top = [(cx + (x - cx) * (1 + grow), cy + (y - cy) * (1 + grow)) for x, y in outline if y < cy + fh * 0.05]
    # From the left side over the crown to the right: angles in (-3pi/2, pi/2] keep the left side contiguous.
    top.sort(key=lambda p: (a := np.arctan2(p[1] - cy, p[0] - cx)) - 2 * np.pi * (a > np.pi / 2))
    us = np.linspace(1.0, -1.0, 25)
    line = [(cx + fw * u * (1 + grow * 0.5), cy + fh * hairline(u)) for u in us]
    return top + line


HEAD_CENTRE = (0.5, 0.47)  # unit coordinates of the head's centre before jitter (the centre of scale and roll)


def apply_jitter(layer: Image.Image, jitter: np.ndarray) -> Image.Image:
    """Geometric jitter of a square figure layer: scale/roll about the head centre, then shift (fractions of the side).

    Shared by the photo renderer and the control maps (``metalora.data.controls``) so both move identically.
    """
    S = layer.size[0]
    cx, cy = HEAD_CENTRE
    scale, dx, dy, roll = (float(v) for v in jitter)
    th = np.deg2rad(roll)
    c, s = np.cos(th) / scale, np.sin(th) / scale  # PIL wants the output->input map
    ox, oy = cx * S, cy * S
    tx, ty = (cx + dx) * S, (cy + dy) * S
    coeffs = (c, s, ox - c * tx - s * ty, -s, c, oy + s * tx - c * ty)
    return layer.transform((S, S), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR)


def lighting_gain(lighting: str, size: int) -> np.ndarray:
    """(size, size) float32 brightness gain of the figure under ``lighting`` (the background stays flat)."""
    xs = np.linspace(-1.0, 1.0, size, dtype=np.float32)[None, :]
    ys = np.linspace(-1.0, 1.0, size, dtype=np.float32)[:, None]
    gain = {
        "left": 1.12 - 0.35 * (xs + 1.0),
        "right": 1.12 - 0.35 * (1.0 - xs),
        "front": 1.1 - 0.3 * (xs**2 + (ys + 0.1) ** 2),
    }[lighting]
    return np.broadcast_to(gain, (size, size))


@dataclasses.dataclass(frozen=True)
class FaceLayout:
    """Where the face's parts go (unit coordinates, before jitter): what a landmark detector would report.

    ``eyes``: (x, y, rx, ry) per eye, left first; ``nose``: the triangle's 3 points; ``mouth``: (x, y, half width,
    lip height). Computed once and used both to draw the photo and to draw landmark control maps.
    """

    fw: float  # face half width
    fh: float  # face half height
    yaw: float  # -1 left, 0 frontal, 1 right
    outline: tuple[tuple[float, float], ...]
    eyes: tuple[tuple[float, float, float, float], ...]
    nose: tuple[tuple[float, float], ...]
    mouth: tuple[float, float, float, float]
    expression: str

    def point(self, u: float, v: float, depth: float = 1.0) -> tuple[float, float]:
        """Face-relative (u, v) in [-1, 1] to unit coordinates (see ``_face_point``)."""
        return _face_point(self.fw, self.fh, self.yaw, u, v, depth)


def _face_point(fw: float, fh: float, yaw: float, u: float, v: float, depth: float = 1.0) -> tuple[float, float]:
    """Face-relative (u, v) in [-1, 1] to unit coordinates; yaw shifts nearer features (larger depth) more."""
    cx, cy = HEAD_CENTRE
    return (cx + fw * (u + 0.28 * yaw * depth), cy + fh * v)


def face_layout(traits: np.ndarray, attributes: dict[str, str]) -> FaceLayout:
    """The face geometry of ``traits`` in pose and expression ``attributes`` (pure; no pixels)."""
    t = np.asarray(traits, np.float64)
    cx, cy = HEAD_CENTRE
    fw = 0.19 + 0.09 * t[_T["face_width"]]
    fh = 0.25 + 0.07 * t[_T["face_length"]]
    yaw = {"left": -1.0, "frontal": 0.0, "right": 1.0}[attributes["pose"]]
    expression = attributes["expression"]
    F = functools.partial(_face_point, fw, fh, yaw)

    outline = _face_outline(cx + 0.08 * yaw * fw, cy, fw * (1 - 0.06 * abs(yaw)), fh, t[_T["jaw_width"]])
    ew = 0.13 + 0.09 * t[_T["eye_size"]]
    eh = ew * (0.75 if expression != "surprised" else 1.0) * fw / fh
    eu = 0.3 + 0.18 * t[_T["eye_spacing"]]
    ev = -0.12 - 0.15 * (t[_T["eye_height"]] - 0.5)
    eyes = []
    for side in (-1.0, 1.0):
        squeeze = 1.0 - 0.35 * max(0.0, -yaw * side)  # the far eye is foreshortened
        x, y = F(side * eu, ev)
        eyes.append((x, y, ew * fw * squeeze, eh * fh))
    nl = 0.12 + 0.2 * t[_T["nose_length"]]
    nw = 0.07 + 0.1 * t[_T["nose_width"]]
    nose = (F(0, ev + 0.05, 1.5), F(-nw, ev + 0.1 + nl + 0.08, 1.5), F(nw, ev + 0.1 + nl + 0.08, 1.5))
    mw = 0.2 + 0.2 * t[_T["mouth_width"]]
    mx, my = F(0, 0.5 + 0.05 * t[_T["face_length"]], 1.1)
    mh = (0.035 + 0.05 * t[_T["lip_fullness"]]) * fh
    return FaceLayout(fw, fh, yaw, tuple(outline), tuple(eyes), nose, (mx, my, mw * fw, mh), expression)


def draw_mouth(d: ImageDraw.ImageDraw, box, layout: FaceLayout, *, lip, inside, teeth, width: int) -> None:
    """The mouth of ``layout`` by expression: lips for neutral, an open smile with teeth, a round open mouth."""
    mx, my, half_width, mh = layout.mouth
    if layout.expression == "neutral":
        d.ellipse(box(mx - half_width, my - mh * 0.6, mx + half_width, my + mh * 0.6), fill=lip)
    elif layout.expression == "smiling":
        w = half_width * 1.2
        d.chord(box(mx - w, my - 2.2 * mh, mx + w, my + 2.2 * mh), 0, 180, fill=inside, outline=lip, width=width)
        d.rectangle(box(mx - w * 0.7, my, mx + w * 0.7, my + 0.6 * mh), fill=teeth)
    else:  # surprised: a round open mouth
        w = half_width * 0.45
        d.ellipse(box(mx - w, my - 1.8 * mh, mx + w, my + 2.2 * mh), fill=inside, outline=lip, width=width)


def render_face(traits: np.ndarray, attributes: dict[str, str], jitter: np.ndarray, resolution: int = 32) -> np.ndarray:
    """Draw one photo: uint8 (resolution, resolution, 3). Pure function of its arguments."""
    if resolution < 8:
        raise ValueError(f"resolution must be >= 8, got {resolution}")
    t = np.asarray(traits, np.float64)
    if t.shape != (NUM_TRAITS,):
        raise ValueError(f"traits must have shape ({NUM_TRAITS},), got {t.shape}")
    a = attributes
    S = resolution * SUPERSAMPLE

    def P(x: float, y: float) -> tuple[float, float]:
        return (x * S, y * S)

    def box(x0, y0, x1, y1):
        return [P(min(x0, x1), min(y0, y1)), P(max(x0, x1), max(y0, y1))]

    layer = Image.new("RGBA", (S, S), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)

    cx, cy = HEAD_CENTRE
    layout = face_layout(t, a)
    fw, fh, yaw = layout.fw, layout.fh, layout.yaw
    skin = _ramp(_SKIN_RAMP, t[_T["skin_tone"]])
    hair = _ramp(_HAIR_RAMP, t[_T["hair_colour"]])
    style = HAIR_STYLES[round(float(t[_T["hair_style"]]))]
    grow = 0.05 + 0.12 * t[_T["hair_volume"]]
    lw = max(1, round(S / 64))  # a line width that survives the downsample

    F = layout.point

    # Body and the hair behind the head.
    d.ellipse(box(cx - 2.3 * fw, cy + 1.2 * fh, cx + 2.3 * fw, cy + 3.0 * fh), fill=_SHIRT)
    d.rectangle(box(cx - 0.42 * fw, cy + 0.5 * fh, cx + 0.42 * fw, cy + 1.35 * fh), fill=_rgba(skin, 0.82))
    if style == "long":
        g = 1.15 + grow
        d.rounded_rectangle(
            box(cx - g * fw, cy - 0.6 * fh, cx + g * fw, cy + 1.35 * fh), radius=0.3 * fw * S, fill=_rgba(hair)
        )
    if style == "afro":
        r = 1.3 + 1.5 * grow
        d.ellipse(box(cx - r * fw, cy - 1.25 * fh - grow, cx + r * fw, cy + 0.35 * fh), fill=_rgba(hair))
    if style == "bun":
        rb = 0.45 * fw
        d.ellipse(box(cx - rb, cy - 1.12 * fh - 2 * rb, cx + rb, cy - 0.9 * fh), fill=_rgba(hair))

    # Ears: the one on the side the head turns away from is hidden.
    ear = 0.16 + 0.14 * t[_T["ear_size"]]
    for side in (-1.0, 1.0):
        if yaw * side < 0:
            continue
        ex = cx + side * fw * (0.97 - 0.12 * abs(yaw)) + 0.1 * yaw * fw
        d.ellipse(
            box(
                ex - 0.5 * ear * fw,
                cy - 0.05 * fh - ear * fh * 0.5,
                ex + 0.5 * ear * fw,
                cy + 0.2 * fh + ear * fh * 0.5,
            ),
            fill=_rgba(skin, 0.9),
        )

    # Face.
    outline = list(layout.outline)
    d.polygon([P(*p) for p in outline], fill=_rgba(skin))

    # Freckles and moles (seeded by the trait vector itself, so the renderer stays a function of its inputs).
    frk = t[_T["freckles"]]
    if frk > 0.55:
        frng = np.random.default_rng(np.random.SeedSequence(np.frombuffer(t.astype(np.float32).tobytes(), np.uint32)))
        for _ in range(int(12 + 40 * (frk - 0.55))):
            u, v = frng.uniform(-0.6, 0.6), frng.uniform(0.0, 0.35)
            x, y = F(u, v, 1.1)
            r = 0.006
            d.ellipse(box(x - r, y - r, x + r, y + r), fill=_rgba(skin, 0.72))
    for k in range(1, int(t[_T["mole_count"]]) + 1):
        u = (t[_T[f"mole{k}_u"]] * 2 - 1) * 0.75
        v = t[_T[f"mole{k}_v"]] * 0.9 - 0.25
        x, y = F(u, v)
        r = 0.016
        d.ellipse(box(x - r, y - r, x + r, y + r), fill=(60, 35, 25, 255))

    # Hair on top of the head.
    side_part = 1.0 if t[_T["hair_volume"]] * 7 % 1 > 0.5 else -1.0
    hairlines = {
        "buzz": lambda u: -0.6 + 0.1 * u * u,
        "side_part": lambda u: -0.55 + 0.2 * side_part * u + 0.45 * max(abs(u) - 0.75, 0) / 0.25,
        "bangs": lambda u: -0.3 + 0.35 * max(abs(u) - 0.8, 0) / 0.2,
        "long": lambda u: -0.55 + 0.12 * abs(u) + 0.6 * max(abs(u) - 0.7, 0) / 0.3,
        "afro": lambda u: -0.55 + 0.1 * u * u,
        "bun": lambda u: -0.62 + 0.12 * u * u,
    }
    if style in hairlines:
        g = 0.02 if style == "buzz" else grow
        cap = _hair_cap(outline, cx + 0.08 * yaw * fw, cy, fw, fh, g, lambda u: hairlines[style](u))
        d.polygon([P(*p) for p in cap], fill=_rgba(hair))

    # Eyes.
    ew = 0.13 + 0.09 * t[_T["eye_size"]]
    eh = ew * (0.75 if a["expression"] != "surprised" else 1.0) * fw / fh
    eu = 0.3 + 0.18 * t[_T["eye_spacing"]]
    ev = -0.12 - 0.15 * (t[_T["eye_height"]] - 0.5)
    iris = _ramp(_EYE_RAMP, t[_T["eye_colour"]])
    eye_centres = layout.eyes
    for x, y, rx, ry in eye_centres:
        d.ellipse(box(x - rx, y - ry, x + rx, y + ry), fill=(250, 250, 250, 255), outline=(40, 30, 30, 255), width=lw)
        ri = min(rx, ry) * 0.95
        ix = x + 0.35 * yaw * rx
        d.ellipse(box(ix - ri, y - ri, ix + ri, y + ri), fill=_rgba(iris))
        rp = ri * 0.45
        d.ellipse(box(ix - rp, y - rp, ix + rp, y + rp), fill=(10, 10, 10, 255))

    # Brows: thickness, slant; raised when surprised.
    brow = _rgba(hair, 0.75) if style != "bald" else _rgba(_HAIR_RAMP[1])
    bw = max(lw, round((0.01 + 0.02 * t[_T["brow_thickness"]]) * S))
    slant = (t[_T["brow_slant"]] - 0.5) * 0.2
    bv = ev - eh - (0.17 if a["expression"] != "surprised" else 0.28)
    for side in (-1.0, 1.0):
        p0 = F(side * (eu - ew * 0.8), bv + slant)
        p1 = F(side * (eu + ew * 1.1), bv - slant)
        d.line([P(*p0), P(*p1)], fill=brow, width=bw)

    # Nose.
    d.polygon([P(*p) for p in layout.nose], fill=_rgba(skin, 0.8))

    # Mouth by expression.
    lip = _rgba(np.array([180, 70, 70]) * 0.5 + skin * 0.5, 0.85)
    surprised_inside = a["expression"] == "surprised"
    draw_mouth(d, box, layout, lip=lip, inside=(70, 15, 20, 255) if surprised_inside else (90, 20, 25, 255),
               teeth=(250, 250, 250, 255), width=lw)

    # Glasses: thick rims around both eyes, tinted lenses, bridge.
    if a["glasses"] != "none":
        gc = _RGB[a["glasses"]]
        gw = max(lw, round(S * 0.028))
        for x, y, rx, ry in eye_centres:
            r = max(rx, ry) * 1.45
            d.ellipse(box(x - r, y - r * 0.85, x + r, y + r * 0.85), fill=(*gc, 60), outline=(*gc, 255), width=gw)
        (x0, y0, rx0, _), (x1, y1, rx1, _) = eye_centres
        d.line([P(x0 + rx0 * 1.4, y0), P(x1 - rx1 * 1.4, y1)], fill=(*gc, 255), width=gw)

    # Hat: a crown over the head and a brim turned the way the head faces.
    if a["hat"] != "none":
        hc = _RGB[a["hat"]]
        top = cy - fh * (1.18 + grow)
        brim_y = cy - fh * 0.5
        d.chord(box(cx - fw * 1.12, top, cx + fw * 1.12, brim_y + fh * 0.55), 180, 360, fill=(*hc, 255))
        bx = cx + 0.35 * yaw * fw
        d.rounded_rectangle(
            box(bx - fw * 1.3, brim_y - 0.1 * fh, bx + fw * 1.3, brim_y + 0.05 * fh),
            radius=0.05 * fh * S,
            fill=_rgba(hc, 0.8),
        )

    # Directional lighting: shade the figure along x (background stays flat).
    arr = np.asarray(layer, np.float32).copy()
    arr[..., :3] = np.clip(arr[..., :3] * lighting_gain(a["lighting"], S)[..., None], 0, 255)
    layer = Image.fromarray(np.round(arr).astype(np.uint8), "RGBA")

    layer = apply_jitter(layer, jitter)
    canvas = Image.new("RGBA", (S, S), (*_RGB[a["background"]], 255))
    canvas.alpha_composite(layer)
    out = canvas.convert("RGB").resize((resolution, resolution), Image.Resampling.LANCZOS)
    return np.asarray(out, np.uint8)


@dataclasses.dataclass(frozen=True)
class FaceSample:
    """One photo of the world with its ground truth."""

    identity: int
    image_id: int
    image: np.ndarray  # uint8 (H, W, 3)
    traits: np.ndarray  # float32 (NUM_TRAITS,)
    attributes: dict[str, str]
    jitter: np.ndarray  # float32 (NUM_JITTER,)
    caption: str


def render_sample(world_seed: int, identity: int, image_id: int, resolution: int = 32) -> FaceSample:
    """The photo ``image_id`` of ``identity`` in world ``world_seed``: a pure function of those integers."""
    traits = identity_traits(world_seed, identity)
    attributes, jitter = image_condition(world_seed, identity, image_id)
    image = render_face(traits, attributes, jitter, resolution)
    return FaceSample(identity, image_id, image, traits, attributes, jitter, make_caption(attributes))
