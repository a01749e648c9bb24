#!/usr/bin/env python3
"""PyTorch reference for benches/train_step.rs: the same training step, timed the same way.

Model: 3 blocks of conv3x3 (no bias) + BatchNorm + ReLU + 2x2 max-pool (16, 32, 64 channels)
on 1x32x32 input, global average pooling, linear to 64, L2 normalisation. Loss: Proxy-NCA,
paper form (positive proxy excluded from the denominator), embeddings and 124 proxies
L2-normalised and scaled by 3. Optimisers: Adam lr 3e-3 (model) and 3e-2 (proxies).
Synthetic input, 3 warm-up steps, median of STEPS timed steps. Prints one JSON line.

    python3 benches/torch_train_step.py [BATCH] [STEPS]   (threads: torch default, or NOFUSS_THREADS)
"""
import json
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

batch = int(sys.argv[1]) if len(sys.argv) > 1 else 64
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 20
if os.environ.get("NOFUSS_THREADS"):
    torch.set_num_threads(int(os.environ["NOFUSS_THREADS"]))
torch.manual_seed(0)
classes, dim, scale = 124, 64, 3.0

blocks = []
c_in = 1
for w in (16, 32, 64):
    blocks += [nn.Conv2d(c_in, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2)]
    c_in = w
backbone = nn.Sequential(*blocks)
head = nn.Linear(64, dim)
proxies = nn.Parameter(torch.randn(classes, dim) / 8)
opt = torch.optim.Adam(list(backbone.parameters()) + list(head.parameters()), lr=3e-3)
popt = torch.optim.Adam([proxies], lr=3e-2)


def proxy_nca(e, y, p):
    e = F.normalize(e, dim=1) * scale
    p = F.normalize(p, dim=1) * scale
    d = torch.cdist(e, p).pow(2)
    pos = d.gather(1, y[:, None]).squeeze(1)
    neg = (-d).masked_fill(F.one_hot(y, classes).bool(), float("-inf"))
    return (pos + torch.logsumexp(neg, dim=1)).mean()


x = torch.randn(batch, 1, 32, 32)
y = torch.arange(batch) % classes
times = []
for i in range(steps + 3):
    t = time.perf_counter()
    e = F.normalize(head(backbone(x).mean(dim=(2, 3))), dim=1)
    loss = proxy_nca(e, y, proxies)
    opt.zero_grad(set_to_none=True)
    popt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    popt.step()
    loss.item()
    if i >= 3:
        times.append(time.perf_counter() - t)
times.sort()
med = times[len(times) // 2]
print(json.dumps({"impl": f"PyTorch {torch.__version__} eager", "threads": torch.get_num_threads(), "batch": batch,
                  "steps": steps, "median_ms": round(med * 1e3, 2), "images_per_sec": round(batch / med, 1)}))
