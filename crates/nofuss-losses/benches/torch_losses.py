#!/usr/bin/env python3
"""PyTorch reference for benches/losses.rs: Proxy-NCA (paper form: positive excluded from the
denominator, embeddings and proxies L2-normalised and scaled by 3) and Proxy-Triplet (margin
0.1, all negative proxies, per-anchor mean then batch mean; `proxy-triplet-hard10`: the 10
nearest negative proxies of each anchor, by `topk`), forward + backward on CPU, for N in
{32, 256}, D in {64, 512}, P in {100, 11318}. Median of REPEATS runs after 2 warm-up runs; one
JSON line per case. LOSS names limit the losses.

    python3 benches/torch_losses.py [REPEATS] [LOSS...]   (threads: torch default, or NOFUSS_THREADS)
"""
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 20
only = sys.argv[2:]
if os.environ.get("NOFUSS_THREADS"):
    torch.set_num_threads(int(os.environ["NOFUSS_THREADS"]))
torch.manual_seed(0)


def sqdist(a, b):
    return ((a * a).sum(1, keepdim=True) + (b * b).sum(1)[None, :] - 2 * a @ b.t()).clamp_min(0)


def proxy_nca(x, y, p):
    d = sqdist(F.normalize(x, dim=1) * 3, F.normalize(p, dim=1) * 3)
    pos = d.gather(1, y[:, None]).squeeze(1)
    neg = (-d).masked_fill(F.one_hot(y, p.shape[0]).bool(), float("-inf"))
    return (pos + torch.logsumexp(neg, dim=1)).mean()


def proxy_triplet(x, y, p):
    d = sqdist(F.normalize(x, dim=1), F.normalize(p, dim=1))
    pos = d.gather(1, y[:, None])
    neg = 1.0 - F.one_hot(y, p.shape[0]).to(d.dtype)
    hinge = torch.relu(pos + 0.1 - d) * neg
    return (hinge.sum(1) / neg.sum(1)).mean()


def proxy_triplet_hard10(x, y, p):
    d = sqdist(F.normalize(x, dim=1), F.normalize(p, dim=1))
    pos = d.gather(1, y[:, None])
    hard = d.masked_fill(F.one_hot(y, p.shape[0]).bool(), float("inf")).topk(10, dim=1, largest=False).values
    return torch.relu(pos + 0.1 - hard).mean(1).mean()


cases = [("proxy-nca", proxy_nca), ("proxy-triplet", proxy_triplet),
         ("proxy-triplet-hard10", proxy_triplet_hard10)]
unknown = [o for o in only if o not in dict(cases)]
if unknown:
    sys.exit(f"unknown loss {unknown[0]!r}; the losses are {', '.join(n for n, _ in cases)}")
for name, fn in cases:
    if only and name not in only:
        continue
    for n in (32, 256):
        for d in (64, 512):
            for p in (100, 11318):
                x = torch.randn(n, d, requires_grad=True)
                pr = torch.randn(p, d, requires_grad=True)
                y = (torch.arange(n) * 7) % p
                times = []
                for i in range(repeats + 2):
                    x.grad = pr.grad = None
                    t = time.perf_counter()
                    fn(x, y, pr).backward()
                    x.grad.sum().item()
                    if i >= 2:
                        times.append(time.perf_counter() - t)
                times.sort()
                print(json.dumps({"impl": f"PyTorch {torch.__version__}", "threads": torch.get_num_threads(),
                                  "loss": name, "n": n, "d": d, "p": p,
                                  "median_ms": round(times[len(times) // 2] * 1e3, 2)}))
