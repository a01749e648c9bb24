#!/usr/bin/env python3
"""JPEG files of the layouts photo datasets hold, for nofuss-data's decoding of only the
rows a crop reads (`crates/nofuss-data/tests/jpeg_rows.rs`).

    .venv/bin/python tests/reference/jpeg_layouts.py

Writes tests/reference/fixtures/jpeg/*.jpg, encoded by Pillow's libjpeg(-turbo) from one
seeded 157x119 image (smooth shapes plus noise, sizes that are no multiple of a block):
4:2:0 (Pillow's default), 4:2:0 with optimised Huffman tables, 4:2:2, 4:4:4, grayscale,
4:2:0 with a restart marker every 5 MCUs and every MCU row, a 4:2:0 image taller than wide
(119x301), and progressive 4:2:0 (decoded whole, as any file that is not sequential).
"""
import pathlib

import numpy as np
import PIL
from PIL import Image

OUT = pathlib.Path(__file__).resolve().parent / "fixtures" / "jpeg"
OUT.mkdir(parents=True, exist_ok=True)


def picture(w, h, seed):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for c in range(3):
        img[..., c] = 128 + 70 * np.sin(xx / rng.uniform(6, 30) + rng.uniform(0, 6)) \
            * np.cos(yy / rng.uniform(6, 30))
    for _ in range(6):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(5, 30)
        img[((xx - cx) ** 2 + (yy - cy) ** 2) < r * r] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 10, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


wide, tall = picture(157, 119, 1), picture(119, 301, 2)
files = {
    "s420.jpg": (wide, dict(quality=90, subsampling=2)),
    "s420_optimized.jpg": (wide, dict(quality=85, subsampling=2, optimize=True)),
    "s422.jpg": (wide, dict(quality=90, subsampling=1)),
    "s444.jpg": (wide, dict(quality=90, subsampling=0)),
    "gray.jpg": (wide.convert("L"), dict(quality=90)),
    "s420_restart_blocks.jpg": (wide, dict(quality=90, subsampling=2, restart_marker_blocks=5)),
    "s420_restart_rows.jpg": (wide, dict(quality=90, subsampling=2, restart_marker_rows=1)),
    "s420_tall.jpg": (tall, dict(quality=90, subsampling=2)),
    "progressive.jpg": (wide, dict(quality=90, subsampling=2, progressive=True)),
}
for name, (img, opts) in files.items():
    img.save(OUT / name, **opts)
    print(name, (OUT / name).stat().st_size, "bytes")
print("Pillow", PIL.__version__)
