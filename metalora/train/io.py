"""Small file utilities for run outputs: atomic writes, PNG sample grids and loss-curve plots.

Everything here writes atomically (temporary file in the destination folder, then ``os.replace``), so a reader
(TensorBoard, a human, a resumed run) never sees a half-written file even if the process is killed mid-write.
None of these functions know about processes: callers decide who writes (the train loop writes only on process 0).
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import tempfile
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "make_image_grid",
    "plot_curves",
    "read_metrics_jsonl",
    "save_image_grid",
]


def _umask() -> int:
    """The process's file-creation mask, read without changing it (``os.umask`` can only set it); 0o022 where
    /proc does not say."""
    try:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> pathlib.Path:
    """Write ``data`` to ``path`` atomically (tmp file in the same folder + ``os.replace``). The file gets the mode
    a plain ``open`` would give it (``mkstemp`` creates 0600, which would hide results from the rest of a group)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> pathlib.Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def _to_uint8(images: np.ndarray) -> np.ndarray:
    """uint8 passes through; floats are read as [0, 1] (the convention of our samplers' outputs) and clipped."""
    if images.dtype == np.uint8:
        return images
    if not np.issubdtype(images.dtype, np.floating):
        raise TypeError(f"images must be uint8 or float in [0, 1], got dtype {images.dtype}")
    if not np.all(np.isfinite(images)):
        raise ValueError("images contain NaN/Inf; refusing to write a misleading sample grid")
    return np.round(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)


def make_image_grid(images: np.ndarray, nrow: int, padding: int = 2, pad_value: int = 255) -> np.ndarray:
    """Tile ``images`` (N, H, W, C) or (N, H, W) into one (rows·H', nrow·W', C) uint8 array, ``nrow`` per row.

    Args:
      images: uint8 or float in [0, 1]; C is 1, 3 or 4.
      nrow: images per row (the last row is padded with ``pad_value``).
      padding: pixels of ``pad_value`` between and around tiles.
    """
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise ValueError(f"images must have shape (N, H, W[, C]) with C in 1/3/4, got {images.shape}")
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    images = _to_uint8(images)
    n, h, w, c = images.shape
    ncol = min(nrow, n)
    nrows = -(-n // ncol)
    grid = np.full((nrows * (h + padding) + padding, ncol * (w + padding) + padding, c), pad_value, np.uint8)
    for i in range(n):
        r, q = divmod(i, ncol)
        y, x = padding + r * (h + padding), padding + q * (w + padding)
        grid[y : y + h, x : x + w] = images[i]
    return grid


def save_image_grid(images: np.ndarray, path: str | os.PathLike, nrow: int = 8, padding: int = 2) -> pathlib.Path:
    """Write ``images`` (N, H, W[, C]; uint8 or float in [0, 1]) as one PNG grid at ``path``, atomically."""
    from PIL import Image

    grid = make_image_grid(images, nrow=nrow, padding=padding)
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[grid.shape[-1]]
    buf = io.BytesIO()
    Image.fromarray(grid[..., 0] if mode == "L" else grid, mode=mode).save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


def read_metrics_jsonl(path: str | os.PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read the loop's ``metrics.jsonl`` into ``{name: (steps, values)}``.

    A resumed run may re-log steps that an interrupted run had already logged after its last checkpoint; the
    later record of a step wins, so the curves show the run that actually produced the final state.
    """
    by_step: dict[int, dict[str, float]] = {}
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:  # a run killed mid-append leaves a torn last line
                raise ValueError(f"{path}:{line_no}: not valid JSON ({e})") from e
            by_step[int(record["step"])] = {k: v for k, v in record.items() if k != "step"}
    curves: dict[str, tuple[list[int], list[float]]] = {}
    for step in sorted(by_step):
        for name, value in by_step[step].items():
            curves.setdefault(name, ([], []))
            curves[name][0].append(step)
            curves[name][1].append(float(value))
    return {k: (np.asarray(s), np.asarray(v)) for k, (s, v) in curves.items()}


def plot_curves(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]] | Sequence[float]],
    path: str | os.PathLike,
    *,
    title: str | None = None,
    xlabel: str = "step",
    ylabel: str = "",
    logy: bool = False,
    bands: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None,
    categories: Sequence[str] | None = None,
) -> pathlib.Path:
    """Plot named curves on one axis and write a PNG atomically (matplotlib's Agg backend, no display needed).

    Args:
      curves: ``{label: (x, y)}`` or ``{label: y}`` (x = 0..len(y)-1).
      bands: optional ``{label: (lower, upper)}`` shaded around the curve of the same label (e.g. a 95% CI).
      categories: the x axis is categorical: x = 0..n-1 are labelled with these names and each value is drawn as a
        point with its band as an error bar (a line or shaded area between unordered categories would suggest an
        interpolation that does not exist).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure  # Figure without pyplot: no global figure registry, no leaks

    fig = Figure(figsize=(6, 4), dpi=120)
    ax = fig.add_subplot(1, 1, 1)
    for label, xy in curves.items():
        if isinstance(xy, tuple) and len(xy) == 2:
            x, y = np.asarray(xy[0], float), np.asarray(xy[1], float)
        else:
            y = np.asarray(xy, float)
            x = np.arange(len(y), dtype=float)
        if x.shape != y.shape:
            raise ValueError(f"curve {label!r}: x has shape {x.shape} but y has shape {y.shape}")
        band = tuple(np.asarray(b, float) for b in bands[label]) if bands and label in bands else None
        # A curve of one evaluation (a tuning-free method scored at step 0 only) is drawn as a point with an error
        # bar: as a line it would be invisible.
        if categories is not None or len(x) == 1:
            yerr = None if band is None else np.stack([y - band[0], band[1] - y])
            ax.errorbar(x, y, yerr=yerr, label=label, marker="o", linestyle="none", capsize=4)
            continue
        (line,) = ax.plot(x, y, label=label)
        if band is not None:
            ax.fill_between(x, band[0], band[1], color=line.get_color(), alpha=0.2, linewidth=0)
    if categories is not None:
        ax.set_xticks(range(len(categories)), [str(c) for c in categories])
        ax.set_xlim(-0.5, len(categories) - 0.5)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if curves:
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write_bytes(path, buf.getvalue())


# ----------------------------------------------------------------------------------------------------------------
# NNX states as safetensors (keys = "<part>.<dotted path>"): small learned artefacts such as D or an ID encoder
# ----------------------------------------------------------------------------------------------------------------


def state_tensors(state) -> dict[str, np.ndarray]:
    """An ``nnx.State`` as {dotted path: array}."""
    from flax import nnx

    return {".".join(str(p) for p in path): np.asarray(v.get_value()) for path, v in nnx.to_flat_state(state)}


def save_states(path: str | os.PathLike, parts: Mapping[str, object], fmt: str) -> pathlib.Path:
    """Writes several named states into one safetensors file atomically (``parts``: {prefix: nnx.State}; the prefix
    "" stores a state's paths unprefixed)."""
    from safetensors.numpy import save

    tensors = {(f"{prefix}.{k}" if prefix else k): v for prefix, state in parts.items()
               for k, v in state_tensors(state).items()}
    return atomic_write_bytes(path, save(tensors, metadata={"format": fmt}))


def load_states(path: str | os.PathLike, templates: Mapping[str, object], what: str) -> dict[str, object]:
    """Reads what ``save_states`` wrote into the structures (and dtypes) of ``templates``. Every missing, unexpected or
    mis-shaped tensor is reported in one error that names the keys (``what`` says what should have fitted)."""
    import jax.numpy as jnp
    from flax import nnx
    from safetensors.numpy import load_file

    path = pathlib.Path(path)
    tensors = load_file(str(path))
    expected = {(f"{prefix}.{k}" if prefix else k): v for prefix, state in templates.items()
                for k, v in state_tensors(state).items()}
    problems = [f"missing {k}" for k in expected if k not in tensors]
    problems += [f"unexpected {k}" for k in tensors if k not in expected]
    problems += [f"{k}: file {tensors[k].shape}, model {v.shape}" for k, v in expected.items()
                 if k in tensors and tensors[k].shape != v.shape]
    if problems:
        raise ValueError(f"{path} does not fit {what}:\n  " + "\n  ".join(problems))

    def fill(prefix, template):
        def key(p):
            dotted = ".".join(str(x) for x in p)
            return f"{prefix}.{dotted}" if prefix else dotted
        return nnx.from_flat_state([(p, v.replace(jnp.asarray(tensors[key(p)], v.get_value().dtype)))
                                    for p, v in nnx.to_flat_state(template)])

    return {prefix: fill(prefix, template) for prefix, template in templates.items()}
