#!/usr/bin/env python3
"""PyTorch reference for benches/pool.rs: max pooling with indices (F.max_pool2d,
return_indices=True) and average pooling (F.avg_pool2d, count_include_pad=True), ceil mode,
forward and backward (autograd), on BN-Inception's pooling shapes at batch 8 and the small
CNN's 2x2 pools at batch 64. Median of REPEATS calls after 2 warm-up calls; one JSON line per
case and pass.

    python3 benches/torch_pool.py [REPEATS] [cuda]   (threads: torch default, or NOFUSS_THREADS)
"""
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

args = sys.argv[1:]
repeats = next((int(a) for a in args if a.isdigit()), 15)
device = "cuda" if "cuda" in args else "cpu"
if os.environ.get("NOFUSS_THREADS"):
    torch.set_num_threads(int(os.environ["NOFUSS_THREADS"]))
torch.manual_seed(0)

CASES = [
    ("max", 8, 64, 112, 3, 2, 0),
    ("max", 8, 192, 56, 3, 2, 0),
    ("max", 8, 320, 28, 3, 2, 0),
    ("max", 8, 576, 14, 3, 2, 0),
    ("max", 8, 1024, 7, 3, 1, 1),
    ("avg", 8, 192, 28, 3, 1, 1),
    ("avg", 8, 576, 14, 3, 1, 1),
    ("avg", 8, 1056, 7, 3, 1, 1),
    ("max", 64, 16, 32, 2, 2, 0),
]


def sync():
    if device == "cuda":
        torch.cuda.synchronize()


for op, n, c, hw, k, s, p in CASES:
    x = torch.randn(n, c, hw, hw, device=device, requires_grad=True)
    fwd, bwd = [], []
    for i in range(repeats + 2):
        t = time.perf_counter()
        if op == "max":
            y, _ = F.max_pool2d(x, k, s, p, ceil_mode=True, return_indices=True)
        else:
            y = F.avg_pool2d(x, k, s, p, ceil_mode=True, count_include_pad=True)
        sync()
        f = (time.perf_counter() - t) * 1e3
        g = y.detach()
        t = time.perf_counter()
        (dx,) = torch.autograd.grad(y, x, g)
        sync()
        b = (time.perf_counter() - t) * 1e3
        del dx
        if i >= 2:
            fwd.append(f)
            bwd.append(b)
    for name, times in (("forward", fwd), ("backward", bwd)):
        times.sort()
        print(json.dumps({"impl": f"PyTorch {torch.__version__}", "device": device, "op": op,
                          "pass": name, "shape": [n, c, hw, hw], "window": [k, s, p],
                          "threads": torch.get_num_threads(), "repeats": repeats,
                          "median_ms": round(times[len(times) // 2], 3)}))
