"""Control images of the procedural world: what a ControlNet sees of a template photo.

A MegaPortrait-style pipeline keeps a template's pose, lighting and surroundings while the face comes from a
personalised model. In this world the template's ground truth (attributes and geometric jitter) gives those
conditions exactly, drawn by the renderer's own geometry (``world.face_layout`` / ``world.apply_jitter``):

* ``landmarks`` (3 channels): a landmark drawing, as a face-landmark detector would output: head outline (R), eyes
  (G), nose and mouth (B), in the template's pose, expression and placement. Drawn for the *average* face
  (every trait 0.5), so it carries pose, not the template's identity (face width, eye spacing, ...).
* ``shading`` (3 channels): the template's lighting: brightness gain over the average head silhouette (R), the
  silhouette itself (G), and the gain over the whole head region (B).
* ``inpaint`` (4 channels): the template with its head region blanked (RGB) and that region's mask (A): what an
  inpainting ControlNet needs to re-draw the seam between a pasted face and the template.

A ControlNet here takes all ``CONTROL_CHANNELS`` at once; a group that a step does not use is all zeros, the same as
in training (``control_image``), so one ControlNet serves every step of the pipeline. Everything is in [0, 1],
float32, HWC, a pure function of its arguments.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from PIL import Image, ImageDraw

from metalora.data import world

CONTROL_GROUPS: tuple[str, ...] = ("landmarks", "shading", "inpaint")
GROUP_CHANNELS: dict[str, int] = {"landmarks": 3, "shading": 3, "inpaint": 4}
CONTROL_CHANNELS = sum(GROUP_CHANNELS.values())
# The average face: every trait at the middle of its range (hair and moles are not drawn in control maps).
AVERAGE_TRAITS = np.full(world.NUM_TRAITS, 0.5, np.float32)
# The region a harmonisation step re-draws (unit coordinates before jitter): an ellipse over head, hair and hat.
HEAD_REGION_CENTRE = (0.5, 0.40)
HEAD_REGION_RADII = (0.36, 0.42)
_GAIN_MAX = 1.12  # the largest gain world.lighting_gain produces: maps it to [0, 1]


def _canvas(resolution: int) -> tuple[Image.Image, ImageDraw.ImageDraw, int]:
    if resolution < 8:
        raise ValueError(f"resolution must be >= 8, got {resolution}")
    size = resolution * world.SUPERSAMPLE
    layer = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    return layer, ImageDraw.Draw(layer), size


def _finish(layer: Image.Image, jitter: np.ndarray, resolution: int) -> np.ndarray:
    """Jitter like the photo, downsample like the photo, RGBA float in [0, 1]."""
    layer = world.apply_jitter(layer, np.asarray(jitter, np.float32))
    return np.asarray(layer.resize((resolution, resolution), Image.Resampling.BOX), np.float32) / 255.0


def _check_pose(attributes: Mapping[str, str]) -> None:
    for name in ("pose", "expression", "lighting"):
        if attributes.get(name) not in world.ATTRIBUTE_CLASSES[name]:
            raise ValueError(f"control maps need attribute {name!r} in {world.ATTRIBUTE_CLASSES[name]}, got "
                             f"{attributes.get(name)!r}")


def landmark_map(attributes: Mapping[str, str], jitter: np.ndarray, resolution: int,
                 traits: np.ndarray | None = None) -> np.ndarray:
    """(R, R, 3): head outline, eyes, nose + mouth of ``traits`` (default: the average face) in the photo's pose,
    expression and placement."""
    _check_pose(attributes)
    layout = world.face_layout(AVERAGE_TRAITS if traits is None else traits, dict(attributes))
    layer, d, size = _canvas(resolution)

    def P(x, y):
        return (x * size, y * size)

    def box(x0, y0, x1, y1):
        return [P(min(x0, x1), min(y0, y1)), P(max(x0, x1), max(y0, y1))]

    width = max(2, round(size / 40))  # survives the downsample as about one pixel
    d.line([P(*p) for p in (*layout.outline, layout.outline[0])], fill=(255, 0, 0, 255), width=width)
    for x, y, rx, ry in layout.eyes:
        d.ellipse(box(x - rx, y - ry, x + rx, y + ry), fill=(0, 255, 0, 255))
    d.polygon([P(*p) for p in layout.nose], fill=(0, 0, 255, 255))
    blue = (0, 0, 255, 255)
    world.draw_mouth(d, box, layout, lip=blue, inside=blue, teeth=blue, width=width)
    return _finish(layer, jitter, resolution)[..., :3]


def _head_region(d: ImageDraw.ImageDraw, size: int, fill) -> None:
    (cx, cy), (rx, ry) = HEAD_REGION_CENTRE, HEAD_REGION_RADII
    d.ellipse([((cx - rx) * size, (cy - ry) * size), ((cx + rx) * size, (cy + ry) * size)], fill=fill)


def head_mask(jitter: np.ndarray, resolution: int) -> np.ndarray:
    """(R, R) in [0, 1]: the head region of a photo with this jitter (1 inside; soft at the edge)."""
    layer, d, size = _canvas(resolution)
    _head_region(d, size, (255, 255, 255, 255))
    return _finish(layer, jitter, resolution)[..., 0]


def shading_map(attributes: Mapping[str, str], jitter: np.ndarray, resolution: int) -> np.ndarray:
    """(R, R, 3): the lighting gain over the average head (R), the head silhouette (G), the gain over the head
    region (B)."""
    _check_pose(attributes)
    layout = world.face_layout(AVERAGE_TRAITS, dict(attributes))
    silhouette, d, size = _canvas(resolution)
    d.polygon([(x * size, y * size) for x, y in layout.outline], fill=(255, 255, 255, 255))
    region, d_region, _ = _canvas(resolution)
    _head_region(d_region, size, (255, 255, 255, 255))
    gain = world.lighting_gain(attributes["lighting"], size) / _GAIN_MAX
    inside = np.asarray(silhouette, np.float32)[..., 0] / 255.0
    around = np.asarray(region, np.float32)[..., 0] / 255.0
    channels = np.stack([gain * inside, inside, gain * around, np.ones_like(gain)], axis=-1)
    layer = Image.fromarray(np.round(channels * 255.0).astype(np.uint8), "RGBA")
    return _finish(layer, jitter, resolution)[..., :3]


def inpaint_condition(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(R, R, 4): ``image`` (uint8, or float in [0, 1]) with the ``mask`` region blanked, and the mask."""
    image = np.asarray(image)
    image = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image.astype(np.float32)
    mask = np.asarray(mask, np.float32)
    if image.shape[:2] != mask.shape or image.shape[-1] != 3:
        raise ValueError(f"inpaint_condition: image {image.shape} and mask {mask.shape} must be (R, R, 3) and (R, R)")
    return np.concatenate([image * (1.0 - mask[..., None]), mask[..., None]], axis=-1)


def photo_controls(image: np.ndarray, attributes: Mapping[str, str], jitter: np.ndarray) -> dict[str, np.ndarray]:
    """Every control group of one photo (uint8 (R, R, 3)) with its ground-truth attributes and jitter."""
    resolution = int(np.asarray(image).shape[0])
    return {
        "landmarks": landmark_map(attributes, jitter, resolution),
        "shading": shading_map(attributes, jitter, resolution),
        "inpaint": inpaint_condition(image, head_mask(jitter, resolution)),
    }


def photo_control_image(image: np.ndarray, attributes: Mapping[str, str], jitter: np.ndarray) -> np.ndarray:
    """(R, R, CONTROL_CHANNELS): every group of one photo, as a ControlNet of this world takes it."""
    return control_image(photo_controls(image, attributes, jitter), int(np.asarray(image).shape[0]),
                         dict.fromkeys(CONTROL_GROUPS, True))


def control_image(groups: Mapping[str, np.ndarray], resolution: int,
                  enabled: Mapping[str, bool] | None = None) -> np.ndarray:
    """(R, R, CONTROL_CHANNELS): the groups in ``CONTROL_GROUPS`` order; a missing or disabled group is zeros."""
    unknown = set(groups) - set(CONTROL_GROUPS)
    if unknown:
        raise KeyError(f"unknown control groups {sorted(unknown)}; known: {CONTROL_GROUPS}")
    parts = []
    for name in CONTROL_GROUPS:
        on = name in groups and (enabled is None or enabled.get(name, False))
        shape = (resolution, resolution, GROUP_CHANNELS[name])
        if on and np.shape(groups[name]) != shape:
            raise ValueError(f"control group {name!r} has shape {np.shape(groups[name])}, expected {shape}")
        parts.append(np.asarray(groups[name], np.float32) if on else np.zeros(shape, np.float32))
    return np.concatenate(parts, axis=-1)


def group_slices() -> dict[str, slice]:
    """Channel range of each group in a control image."""
    out, start = {}, 0
    for name in CONTROL_GROUPS:
        out[name] = slice(start, start + GROUP_CHANNELS[name])
        start += GROUP_CHANNELS[name]
    return out
