"""PNG grids, curve plots and atomic writes."""

import json
import os
import stat

import numpy as np
import pytest
from PIL import Image

from metalora.train import atomic_write_text, make_image_grid, plot_curves, read_metrics_jsonl, save_image_grid


def test_grid_places_tiles_row_major_with_padding():
    images = np.stack([np.full((2, 3, 3), i * 40, np.uint8) for i in range(5)])
    grid = make_image_grid(images, nrow=2, padding=1, pad_value=255)
    assert grid.shape == (3 * 3 + 1, 2 * 4 + 1, 3)  # 3 rows of (2+1), 2 cols of (3+1), plus the outer pad
    for i in range(5):
        r, c = divmod(i, 2)
        y, x = 1 + r * 3, 1 + c * 4
        assert (grid[y : y + 2, x : x + 3] == i * 40).all()
    assert (grid[7:9, 5:8] == 255).all()  # the empty 6th slot is padding
    assert (grid[0] == 255).all() and (grid[:, 0] == 255).all()


def test_save_image_grid_roundtrip_float_and_gray(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.uniform(-0.2, 1.2, size=(4, 5, 6, 3)).astype(np.float32)  # out of range values are clipped
    path = save_image_grid(images, tmp_path / "s" / "grid.png", nrow=4, padding=0)
    back = np.asarray(Image.open(path))
    assert back.shape == (5, 24, 3)
    np.testing.assert_array_equal(back[:, 6:12], np.round(np.clip(images[1], 0, 1) * 255).astype(np.uint8))
    gray = save_image_grid(np.zeros((2, 4, 4), np.uint8), tmp_path / "g.png", nrow=1)
    assert Image.open(gray).mode == "L"
    assert not [p for p in tmp_path.rglob("*.tmp")]


@pytest.mark.parametrize(
    "images, err, match",
    [
        (np.zeros((2, 4, 4, 2), np.float32), ValueError, r"shape \(N, H, W\[, C\]\)"),
        (np.full((1, 2, 2, 3), np.nan, np.float32), ValueError, "NaN"),
        (np.zeros((1, 2, 2, 3), np.int32), TypeError, "int32"),
    ],
)
def test_bad_images_are_rejected(tmp_path, images, err, match):
    with pytest.raises(err, match=match):
        save_image_grid(images, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_plot_curves_writes_png(tmp_path):
    x = np.arange(10)
    path = plot_curves(
        {"lora": (x, 1 / (x + 1)), "meta": 0.5 / (x + 1)},
        tmp_path / "curves.png",
        bands={"lora": (0.9 / (x + 1), 1.1 / (x + 1))},
        logy=True,
        title="held-out loss",
    )
    img = Image.open(path)
    assert img.format == "PNG" and img.size == (720, 480)
    with pytest.raises(ValueError, match="curve 'bad'"):
        plot_curves({"bad": ([0, 1, 2], [1.0, 2.0])}, tmp_path / "bad.png")


def test_plot_curves_categorical_axis(tmp_path):
    """Categories are drawn as labelled points with error bars; the PNG differs from the same data as a line."""
    means = np.array([0.22, 0.19, 0.18])
    kwargs = dict(bands={"meta_lora": (means - 0.05, means + 0.05)})
    points = plot_curves({"meta_lora": ([0, 1, 2], means)}, tmp_path / "cat.png",
                         categories=["joint", "reptile", "fomaml"], **kwargs)
    line = plot_curves({"meta_lora": ([0, 1, 2], means)}, tmp_path / "line.png", **kwargs)
    cat_pixels, line_pixels = (np.asarray(Image.open(p).convert("L")) for p in (points, line))
    assert cat_pixels.shape == line_pixels.shape == (480, 720)
    assert np.mean(cat_pixels != line_pixels) > 0.01


def test_read_metrics_jsonl_later_record_of_a_step_wins(tmp_path):
    lines = [{"step": 2, "loss": 1.0}, {"step": 4, "loss": 0.5}, {"step": 4, "loss": 0.25, "lr": 1e-3}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    curves = read_metrics_jsonl(tmp_path / "m.jsonl")
    np.testing.assert_array_equal(curves["loss"][0], [2, 4])
    np.testing.assert_array_equal(curves["loss"][1], [1.0, 0.25])
    np.testing.assert_array_equal(curves["lr"][0], [4])


def test_atomic_write_replaces_whole_file(tmp_path):
    path = tmp_path / "a" / "c.json"
    atomic_write_text(path, "x" * 1000)
    atomic_write_text(path, "short")
    assert path.read_text() == "short"
    assert [p.name for p in path.parent.iterdir()] == ["c.json"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_atomic_write_gives_the_mode_a_plain_open_would(tmp_path, umask):
    """``mkstemp`` creates files 0600; a result written atomically is as readable as one written with ``open``."""
    previous = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "atomic.txt", "x")
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "atomic.txt").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode) == 0o666 & ~umask
