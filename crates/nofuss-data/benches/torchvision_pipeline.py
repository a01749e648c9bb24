#!/usr/bin/env python3
"""torchvision + PIL reference for benches/pipeline.rs: CUB-like JPEGs through
decode + RandomResizedCrop(224) + RandomHorizontalFlip + ToTensor + Normalize.

    python3 benches/torchvision_pipeline.py OUT_DIR [IMAGES] [ROUNDS]

Writes IMAGES seeded 500x375 JPEGs (quality 90, smooth shapes plus texture and noise, so
they compress like photos) into OUT_DIR if absent, then times the transform chain over
all of them ROUNDS times in one process with one thread (per-core throughput), and prints
one JSON line with the median images/s over the rounds, and the time per image split
into decoding alone and the transform chain alone (on images decoded beforehand).
"""
import json
import pathlib
import sys
import time

import numpy as np
import PIL
import torch
import torchvision
from PIL import Image
from torchvision import transforms

out = pathlib.Path(sys.argv[1])
n = int(sys.argv[2]) if len(sys.argv) > 2 else 64
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 5
out.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(2011)
yy, xx = np.mgrid[0:375, 0:500].astype(np.float32)
for i in range(n):
    p = out / f"{i:04d}.jpg"
    if p.exists():
        continue
    img = np.zeros((375, 500, 3), np.float32)
    for c in range(3):
        img[..., c] = 128 + 60 * np.sin(xx / rng.uniform(20, 90) + rng.uniform(0, 6)) \
            * np.cos(yy / rng.uniform(20, 90))
    for _ in range(12):  # blobs: a "bird" and "branches"
        cx, cy, r = rng.uniform(0, 500), rng.uniform(0, 375), rng.uniform(15, 90)
        mask = ((xx - cx) ** 2 + (yy - cy) ** 2) < r * r
        img[mask] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 12, img.shape)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(p, quality=90)

torch.set_num_threads(1)
torch.manual_seed(0)
chain = transforms.Compose([
    transforms.RandomResizedCrop(224),
    transforms.RandomHorizontalFlip(),
    transforms.ToTensor(),
    transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
])
files = sorted(out.glob("*.jpg"))
rates = []
for _ in range(rounds):
    t = time.perf_counter()
    for f in files:
        x = chain(Image.open(f).convert("RGB"))
    rates.append(len(files) / (time.perf_counter() - t))
rates.sort()
decode_ms, transform_ms = [], []
for _ in range(rounds):
    t = time.perf_counter()
    images = [Image.open(f).convert("RGB") for f in files]
    decode_ms.append((time.perf_counter() - t) * 1e3 / len(files))
    t = time.perf_counter()
    for img in images:
        x = chain(img)
    transform_ms.append((time.perf_counter() - t) * 1e3 / len(files))
    del images
median = lambda v: sorted(v)[len(v) // 2]
print(json.dumps({"impl": f"torchvision {torchvision.__version__} + Pillow {PIL.__version__}",
                  "threads": 1, "images": len(files), "images_per_s": round(rates[len(rates) // 2], 1),
                  "shape": list(x.shape), "decode_ms": round(median(decode_ms), 3),
                  "transform_ms": round(median(transform_ms), 3)}))
