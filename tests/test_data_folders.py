"""Real-photo folders: decoding rules and every bad-input case (strict error naming the file, or skip + report)."""

import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from metalora.data import folders


def _save(path: pathlib.Path, image: Image.Image, **kw) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kw)
    return path


def _rgb(seed=0, size=(24, 24)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size[::-1], 3), dtype=np.uint8))


@pytest.fixture
def good_root(tmp_path):
    root = tmp_path / "photos"
    for i, name in enumerate(("alice", "bob")):
        for j in range(3):
            _save(root / name / f"{name}_{j}.png", _rgb(10 * i + j))
    (root / "README.md").write_text("not an identity")  # plain files under root are not identities
    (root / "alice" / ".DS_Store").write_bytes(b"\0")  # hidden files are ignored
    return root


def test_scan_good_root(good_root):
    scan = folders.scan_identity_folders(good_root)
    assert [i.name for i in scan.identities] == ["alice", "bob"]
    assert [p.name for p in scan.identities[0].images] == ["alice_0.png", "alice_1.png", "alice_2.png"]
    assert scan.report.num_skipped == 0
    assert scan.identities[0].captions is None and scan.identities[0].attributes is None


def test_captions_and_attributes(good_root):
    (good_root / "alice" / "captions.txt").write_text("# comment\nalice_0.png\ta photo of a person smiling\n\n")
    (good_root / "alice" / "attributes.json").write_text(json.dumps({"alice_1.png": {"glasses": "red"}}))
    ident = folders.scan_identity_folders(good_root).identities[0]
    assert ident.captions == {"alice_0.png": "a photo of a person smiling"}
    assert ident.attributes == {"alice_1.png": {"glasses": "red"}}


def _bad_cases(root: pathlib.Path) -> dict[str, pathlib.Path]:
    """One bad thing per identity folder; returns the path each error must name."""
    cases = {}
    p = root / "corrupt" / "x.jpg"
    p.parent.mkdir(parents=True)
    p.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    _save(root / "corrupt" / "ok.png", _rgb())
    cases["corrupt"] = p
    p = _save(root / "truncated" / "t.jpg", _rgb(size=(64, 64)), format="JPEG")
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
    _save(root / "truncated" / "ok.png", _rgb())
    cases["truncated"] = p
    (root / "empty").mkdir()
    cases["empty"] = root / "empty"
    _save(root / "notes" / "ok.png", _rgb())
    (root / "notes" / "notes.txt").write_text("some notes, not captions")
    cases["notes"] = root / "notes" / "notes.txt"
    _save(root / "badcaptions" / "ok.png", _rgb())
    (root / "badcaptions" / "captions.txt").write_text("ok.png has no tab here\n")
    cases["badcaptions"] = root / "badcaptions" / "captions.txt"
    _save(root / "orphancaption" / "ok.png", _rgb())
    (root / "orphancaption" / "captions.txt").write_text("missing.png\ta photo\n")
    cases["orphancaption"] = root / "orphancaption" / "captions.txt"
    _save(root / "badjson" / "ok.png", _rgb())
    (root / "badjson" / "attributes.json").write_text("{not json")
    cases["badjson"] = root / "badjson" / "attributes.json"
    return cases


@pytest.mark.parametrize("case", ["corrupt", "truncated", "empty", "notes", "badcaptions", "orphancaption", "badjson"])
def test_bad_input_raises_naming_the_file(tmp_path, case):
    root = tmp_path / "root"
    _save(root / "good" / "g.png", _rgb())
    bad = _bad_cases(root)
    # Isolate one case: remove the other bad folders.
    import shutil

    for other in bad:
        if other != case:
            shutil.rmtree(root / other)
    with pytest.raises(folders.DataError) as e:
        folders.scan_identity_folders(root)
    assert str(bad[case]) in str(e.value)


def test_skip_mode_counts_everything(tmp_path):
    root = tmp_path / "root"
    _save(root / "good" / "g.png", _rgb())
    bad = _bad_cases(root)
    scan = folders.scan_identity_folders(root, on_error="skip")
    skipped = "\n".join(p for p, _ in scan.report.skipped)
    # corrupt/truncated/notes drop one file and keep the folder; empty and bad side files drop the folder.
    assert scan.report.num_skipped == len(bad)
    for case, path in bad.items():
        assert str(path.parent if case in ("badcaptions", "orphancaption", "badjson") else path) in skipped, case
    assert sorted(i.name for i in scan.identities) == ["corrupt", "good", "notes", "truncated"]
    assert [p.name for p in scan.identities[0].images] == ["ok.png"]


def test_on_error_value_checked(good_root):
    with pytest.raises(ValueError, match="on_error"):
        folders.scan_identity_folders(good_root, on_error="ignore")


def test_missing_root(tmp_path):
    with pytest.raises(folders.DataError, match="nowhere"):
        folders.scan_identity_folders(tmp_path / "nowhere")


def test_rgba_to_rgb_on_white(tmp_path):
    a = np.zeros((8, 8, 4), np.uint8)
    a[..., 0] = 255
    a[:4, :, 3] = 255  # top half opaque red, bottom half transparent
    p = _save(tmp_path / "rgba.png", Image.fromarray(a, "RGBA"))
    im = folders.load_photo(p)
    assert im.shape == (8, 8, 3)
    np.testing.assert_array_equal(im[0, 0], [255, 0, 0])
    np.testing.assert_array_equal(im[-1, 0], [255, 255, 255])


def test_grayscale_to_rgb(tmp_path):
    g = np.arange(64, dtype=np.uint8).reshape(8, 8) * 3
    p = _save(tmp_path / "gray.png", Image.fromarray(g, "L"))
    im = folders.load_photo(p)
    assert im.shape == (8, 8, 3)
    for c in range(3):
        np.testing.assert_array_equal(im[..., c], g)


def test_exif_orientation_applied(tmp_path):
    # 40x20: left half red, right half blue; Orientation=6 means "display rotated 90 degrees clockwise",
    # so the displayed photo is 20x40 with red on top and blue at the bottom.
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = (255, 0, 0)
    a[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    p = _save(tmp_path / "rot.jpg", Image.fromarray(a), format="JPEG", quality=95, exif=exif)
    im = folders.load_photo(p)  # 20x40 after transpose, centre-cropped to 20x20: rows 10..30
    assert im.shape == (20, 20, 3)
    assert im[1, 1, 0] > 200 and im[1, 1, 2] < 60  # red top
    assert im[-2, 1, 2] > 200 and im[-2, 1, 0] < 60  # blue bottom (without EXIF handling it would be red)


def test_centre_crop_and_resize(tmp_path):
    a = np.zeros((30, 50, 3), np.uint8)
    a[:, 10:40] = 200  # the centre 30x30 square is uniform
    p = _save(tmp_path / "wide.png", Image.fromarray(a))
    full = folders.load_photo(p)
    assert full.shape == (30, 30, 3) and (full == 200).all()
    assert folders.load_photo(p, 16).shape == (16, 16, 3)


def test_face_crop_hook(tmp_path):
    a = np.zeros((40, 40, 3), np.uint8)
    a[5:15, 20:30] = 255
    p = _save(tmp_path / "f.png", Image.fromarray(a))
    im = folders.load_photo(p, face_crop=lambda img: (20, 5, 30, 15))
    assert im.shape == (10, 10, 3) and (im == 255).all()
    with pytest.raises(folders.DataError, match="outside image"):
        folders.load_photo(p, face_crop=lambda img: (30, 0, 50, 20))


def test_default_lfw_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv(folders.LFW_ENV, str(tmp_path))
    assert folders.default_lfw_root() == tmp_path.resolve()
    monkeypatch.delenv(folders.LFW_ENV)
    assert folders.default_lfw_root().parts[-3:] == ("shared", "data", "lfw")


@pytest.mark.lfw
def test_lfw_scans_clean(lfw_root):
    scan = folders.scan_identity_folders(lfw_root)
    assert len(scan.identities) == 340 and scan.report.num_skipped == 0
    assert all(5 <= len(i.images) <= 30 for i in scan.identities)
    im = folders.load_photo(scan.identities[0].images[0], 32)
    assert im.shape == (32, 32, 3) and im.dtype == np.uint8
