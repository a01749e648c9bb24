#!/usr/bin/env python3
"""Reference outputs of torchvision's PIL transforms for nofuss-data's resampling
(`crates/nofuss-data/tests/pil_parity.rs`).

    .venv/bin/python tests/reference/pipeline_pil.py

Writes tests/reference/fixtures/pipeline/source.png (a seeded 61x47 RGB image) and
pil.json: the 8-bit HWC outputs of Resize(36) + CenterCrop(32), and of
resized_crop(top=5, left=7, height=30, width=41, size=24) with and without hflip
(bilinear with antialiasing, torchvision's default on PIL images).
"""
import json
import pathlib

import numpy as np
import PIL
import torchvision
from PIL import Image
from torchvision.transforms import functional as F
from torchvision import transforms

OUT = pathlib.Path(__file__).resolve().parent / "fixtures" / "pipeline"
OUT.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(47)
yy, xx = np.mgrid[0:47, 0:61]
img = np.stack([(xx * 4) % 256, (yy * 5) % 256, (xx * yy) % 256], -1).astype(np.float64)
img += rng.normal(0, 20, img.shape)
src = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
src.save(OUT / "source.png")
src = Image.open(OUT / "source.png").convert("RGB")

cases = {
    "eval_resize36_crop32": transforms.Compose([transforms.Resize(36), transforms.CenterCrop(32)])(src),
    "crop_5_7_30x41_to24": F.resized_crop(src, 5, 7, 30, 41, [24, 24]),
    "crop_5_7_30x41_to24_flip": F.hflip(F.resized_crop(src, 5, 7, 30, 41, [24, 24])),
}
out = {"torchvision": torchvision.__version__, "pillow": PIL.__version__}
for k, v in cases.items():
    a = np.asarray(v)
    out[k] = {"shape": list(a.shape), "hwc": a.flatten().tolist()}
(OUT / "pil.json").write_text(json.dumps(out) + "\n")
print({k: list(np.asarray(v).shape) for k, v in cases.items()})
