#!/usr/bin/env python3
"""PyTorch reference for the GPU kNN of benches/knn.rs (`... --features cuda --bench knn
-- EMB.npy LABELS.npy REPEATS cuda`): the same exact search on the same GPU.

    python3 benches/torch_knn.py EMB.npy LABELS.npy [REPEATS] [DEVICE]

Per block of queries: squared distances |q|^2 + |x|^2 - 2 q.x by one matmul against all
points, the query's own column set to +inf, torch.topk(1000, largest=False); only the
[block, 1000] indices leave the device. Prints one JSON line: median seconds over REPEATS
(synchronised) and Recall@{1,10,100,1000}.
"""
import json
import sys
import time

import numpy as np
import torch

x_np = np.load(sys.argv[1])
labels = np.load(sys.argv[2])
repeats = int(sys.argv[3]) if len(sys.argv) > 3 else 3
device = sys.argv[4] if len(sys.argv) > 4 else "cuda"
ks = [1, 10, 100, 1000]
x = torch.from_numpy(x_np).to(device)
n = x.shape[0]
norms = (x * x).sum(1)
block = max(1, (1 << 27) // n)


def search():
    out = []
    for q0 in range(0, n, block):
        q = x[q0:q0 + block]
        d = norms[q0:q0 + block, None] + norms[None, :] - 2.0 * (q @ x.T)
        rows = torch.arange(q.shape[0], device=device)
        d[rows, rows + q0] = float("inf")
        out.append(torch.topk(d, ks[-1], dim=1, largest=False).indices.cpu())
    return torch.cat(out).numpy()


search()  # warm-up (kernels, allocator)
times = []
for _ in range(repeats):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    nbrs = search()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    times.append(time.perf_counter() - t)
same = labels[nbrs] == labels[:, None]
recall = {f"recall@{k}": float(same[:, :k].any(axis=1).mean()) for k in ks}
times.sort()
name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
print(json.dumps({"impl": f"PyTorch {torch.__version__} matmul+topk", "device": name, "n": n,
                  "dim": x.shape[1], "seconds": round(times[len(times) // 2], 3), **recall}))
