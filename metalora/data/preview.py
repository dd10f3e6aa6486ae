"""Contact sheet of identities x images: ``python -m metalora.data.preview --out sheet.png``.

Rows are identities, columns are photos of that identity. Synthetic photos are rendered straight from the world
(no dataset build needed); ``--source folders`` reads a real-photo folder (default: the LFW track).
"""

from __future__ import annotations

import argparse
import os
import pathlib

import numpy as np
from PIL import Image

from metalora.data import folders, world


def synthetic_grid(
    world_seed: int, identities: list[int], images_per_identity: int, resolution: int
) -> tuple[np.ndarray, list[list[str]]]:
    """uint8 (rows, cols, H, W, 3) of rendered photos and their captions."""
    rows, captions = [], []
    for i in identities:
        samples = [world.render_sample(world_seed, i, j, resolution) for j in range(images_per_identity)]
        rows.append(np.stack([s.image for s in samples]))
        captions.append([s.caption for s in samples])
    return np.stack(rows), captions


def folder_grid(root: pathlib.Path, n_identities: int, images_per_identity: int, resolution: int) -> np.ndarray:
    scan = folders.scan_identity_folders(root)
    rows = []
    for ident in scan.identities[:n_identities]:
        paths = ident.images[:images_per_identity]
        ims = [folders.load_photo(p, resolution) for p in paths]
        ims += [np.zeros_like(ims[0])] * (images_per_identity - len(ims))
        rows.append(np.stack(ims))
    return np.stack(rows)


def contact_sheet(grid: np.ndarray, *, zoom: int = 1, gap: int = 2) -> Image.Image:
    """Tile (rows, cols, H, W, 3) into one image, nearest-neighbour zoomed so 32 px faces stay inspectable."""
    r, c, h, w, _ = grid.shape
    sheet = np.full((r * (h + gap) + gap, c * (w + gap) + gap, 3), 255, np.uint8)
    for i in range(r):
        for j in range(c):
            y, x = gap + i * (h + gap), gap + j * (w + gap)
            sheet[y : y + h, x : x + w] = grid[i, j]
    im = Image.fromarray(sheet)
    return im.resize((im.width * zoom, im.height * zoom), Image.Resampling.NEAREST) if zoom > 1 else im


def _atomic_save(im: Image.Image, out: pathlib.Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    im.save(tmp, format="PNG")
    os.replace(tmp, out)


def main(argv: list[str] | None = None) -> pathlib.Path:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=pathlib.Path, required=True, help="PNG file to write")
    p.add_argument("--source", choices=("synth", "folders"), default="synth")
    p.add_argument("--root", type=pathlib.Path, default=None, help="identity folders (default: the LFW track)")
    p.add_argument("--identities", type=int, default=8)
    p.add_argument("--first-identity", type=int, default=0)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--world-seed", type=int, default=0)
    p.add_argument("--zoom", type=int, default=0, help="nearest zoom factor (default: to ~96 px per tile)")
    p.add_argument("--print-captions", action="store_true")
    args = p.parse_args(argv)

    if args.source == "synth":
        ids = list(range(args.first_identity, args.first_identity + args.identities))
        grid, captions = synthetic_grid(args.world_seed, ids, args.images, args.resolution)
        if args.print_captions:
            for i, row in zip(ids, captions):
                for j, cap in enumerate(row):
                    print(f"identity {i} image {j}: {cap}")
    else:
        root = args.root if args.root is not None else folders.default_lfw_root()
        grid = folder_grid(root, args.identities, args.images, args.resolution)
    zoom = args.zoom or max(1, 96 // args.resolution)
    _atomic_save(contact_sheet(grid, zoom=zoom), args.out)
    print(f"wrote {args.out} ({grid.shape[0]} identities x {grid.shape[1]} images at {args.resolution} px)")
    return args.out


if __name__ == "__main__":
    main()
