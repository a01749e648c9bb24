#!/usr/bin/env python3
"""Reference values and gradients of every loss in nofuss-losses.

Writes tests/reference/fixtures/losses.json: small seeded batches (float64), and for each
case the loss and its gradients with respect to the embeddings and the proxies, from

- pytorch-metric-learning: `ProxyNCALoss` (Proxy-NCA, softmax form), `NCALoss` (in-batch
  NCA), `TripletMarginLoss` (all triplets, mean over the non-zero ones);
- direct PyTorch transcriptions of the formulas, written independently of the Rust code
  (distances as explicit differences, not through the Gram matrix): Proxy-NCA in the
  paper's form (positive excluded from the denominator) and with label smoothing,
  Proxy-Triplet (all or k hardest negatives), both with dynamic assignment, and the
  semi-hard triplet loss (FaceNet; TensorFlow's `triplet_semihard_loss` rule).

Run from the repository root:  python3 tests/reference/losses.py
Needs: numpy, torch, pytorch-metric-learning.
"""
import json
import pathlib

import numpy as np
import pytorch_metric_learning
import torch
import torch.nn.functional as F
from pytorch_metric_learning import distances, losses

torch.set_default_dtype(torch.float64)


def sqdist(a, b):
    return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)


def scaled(x, p, sx, sp):
    return F.normalize(x, dim=1) * sx, F.normalize(p, dim=1) * sp


def static_sets(y, num_proxies):
    return [(i, int(y[i]), [z for z in range(num_proxies) if z != int(y[i])]) for i in range(len(y))]


def dynamic_sets(y, d):
    """The dynamic-assignment rule of nofuss-losses (assignment.rs), transcribed."""
    assigned = d.detach().argmin(dim=1).tolist()
    n = len(y)
    sets = []
    for i in range(n):
        mates = [j for j in range(n) if j != i and y[j] == y[i]]
        pos = assigned[mates[0] if mates else i]
        negs = sorted({assigned[j] for j in range(n) if y[j] != y[i] and assigned[j] != pos})
        if negs:
            sets.append((i, pos, negs))
    return sets


def proxy_nca(x, y, p, cfg):
    xs, ps = scaled(x, p, cfg["embedding_scale"], cfg["proxy_scale"])
    d = sqdist(xs, ps)
    sets = dynamic_sets(y, d) if cfg["assignment"] == "dynamic" else static_sets(y, len(p))
    eps = cfg["label_smoothing"]
    out = []
    for i, pos, negs in sets:
        if cfg["form"] == "paper":
            out.append(d[i, pos] + torch.logsumexp(-d[i, negs], dim=0))
        else:
            cand = [pos] + negs
            logp = -d[i, cand] - torch.logsumexp(-d[i, cand], dim=0)
            t = torch.tensor([1 - eps] + [eps / len(negs)] * len(negs))
            out.append(-(t * logp).sum())
    return torch.stack(out).mean()


def proxy_triplet(x, y, p, cfg):
    xs, ps = scaled(x, p, cfg["embedding_scale"], cfg["proxy_scale"])
    d = sqdist(xs, ps)
    sets = dynamic_sets(y, d) if cfg["assignment"] == "dynamic" else static_sets(y, len(p))
    k = cfg["hardest_negatives"]
    out = []
    for i, pos, negs in sets:
        if k is not None:
            negs = sorted(negs, key=lambda z: (float(d[i, z]), z))[:k]
        out.append(torch.relu(d[i, pos] + cfg["margin"] - d[i, negs]).mean())
    return torch.stack(out).mean()


def semihard(x, y, cfg):
    x = F.normalize(x, dim=1) if cfg["normalize"] else x
    d = sqdist(x, x)
    if not cfg["squared"]:
        d = d.clamp_min(1e-12).sqrt()
    n = len(y)
    out = []
    for a in range(n):
        negs = [j for j in range(n) if y[j] != y[a]]
        for p in [j for j in range(n) if j != a and y[j] == y[a]]:
            far = [j for j in negs if d[a, j] > d[a, p]]
            if far:
                ng = min(far, key=lambda j: (float(d[a, j]), j))
            else:
                ng = max(negs, key=lambda j: (float(d[a, j]), -j))
            out.append(torch.relu(d[a, p] - d[a, ng] + cfg["margin"]))
    return torch.stack(out).mean()


def pml_proxy_nca(x, y, p, cfg):
    s = cfg["embedding_scale"]
    assert s == cfg["proxy_scale"] and cfg["form"] == "softmax" and cfg["label_smoothing"] == 0
    fn = losses.ProxyNCALoss(len(p), x.shape[1], softmax_scale=s * s)
    fn.proxies = torch.nn.Parameter(p)
    return fn(x, torch.tensor(y)), fn.proxies


def pml_triplet_all(x, y, cfg):
    assert cfg["normalize"]
    fn = losses.TripletMarginLoss(margin=cfg["margin"], distance=distances.LpDistance(power=2 if cfg["squared"] else 1))
    return fn(x, torch.tensor(y))


def pml_nca(x, y, cfg):
    assert cfg["normalize"]
    return losses.NCALoss(softmax_scale=cfg["scale"])(x, torch.tensor(y))


rng = np.random.default_rng(1703)


def batch(n, dim, classes, num_proxies):
    x = rng.normal(size=(n, dim))
    y = [int(c) for c in rng.integers(0, classes, n)]
    p = rng.normal(size=(num_proxies, dim)) / 2 if num_proxies else None
    return x, y, p


NCA = dict(form="paper", embedding_scale=3.0, proxy_scale=3.0, label_smoothing=0.0, assignment="static")
PT = dict(margin=0.1, embedding_scale=1.0, proxy_scale=1.0, hardest_negatives=None, assignment="static")
TRI = dict(margin=0.2, mining="all", normalize=True, squared=True)

cases = [
    ("proxy-nca", "paper static", dict(NCA), (12, 8, 5, 5), "transcription"),
    ("proxy-nca", "paper static scale 1", dict(NCA, embedding_scale=1.0, proxy_scale=1.0), (10, 6, 4, 4), "transcription"),
    ("proxy-nca", "softmax static vs PML ProxyNCALoss", dict(NCA, form="softmax"), (12, 8, 5, 5), "pml"),
    ("proxy-nca", "softmax static smoothing 0.1", dict(NCA, form="softmax", label_smoothing=0.1), (12, 8, 5, 6), "transcription"),
    ("proxy-nca", "paper dynamic, 3 proxies for 5 classes", dict(NCA, assignment="dynamic"), (16, 8, 5, 3), "transcription"),
    ("proxy-nca", "softmax dynamic, 4 proxies for 6 classes", dict(NCA, form="softmax", assignment="dynamic", embedding_scale=1.0, proxy_scale=1.0), (16, 4, 6, 4), "transcription"),
    ("proxy-triplet", "static all negatives", dict(PT), (12, 8, 5, 5), "transcription"),
    ("proxy-triplet", "static 2 hardest, margin 0.5, scale 2", dict(PT, hardest_negatives=2, margin=0.5, embedding_scale=2.0, proxy_scale=2.0), (12, 8, 5, 7), "transcription"),
    ("proxy-triplet", "dynamic, 3 proxies for 5 classes", dict(PT, assignment="dynamic", margin=0.3), (16, 8, 5, 3), "transcription"),
    ("triplet", "all, squared, vs PML", dict(TRI), (12, 8, 3, 0), "pml"),
    ("triplet", "all, euclidean, vs PML", dict(TRI, squared=False, margin=0.1), (12, 8, 4, 0), "pml"),
    ("triplet", "semi-hard, squared", dict(TRI, mining="semi-hard"), (12, 8, 3, 0), "transcription"),
    ("triplet", "semi-hard, euclidean, margin 0.5", dict(TRI, mining="semi-hard", squared=False, margin=0.5), (14, 6, 4, 0), "transcription"),
    ("nca", "scale 1 vs PML NCALoss", dict(scale=1.0, normalize=True), (12, 8, 4, 0), "pml"),
    ("nca", "scale 4 vs PML NCALoss", dict(scale=4.0, normalize=True), (12, 8, 3, 0), "pml"),
    ("proxy-triplet", "static 3 hardest of 40 proxies, margin 0.3", dict(PT, hardest_negatives=3, margin=0.3), (10, 8, 40, 40), "transcription"),
    ("proxy-triplet", "dynamic 2 hardest, 12 proxies for 6 classes", dict(PT, assignment="dynamic", hardest_negatives=2, margin=0.3), (16, 8, 6, 12), "transcription"),
]

out = {"torch": torch.__version__, "pytorch_metric_learning": pytorch_metric_learning.__version__, "cases": []}
for loss, name, cfg, (n, dim, classes, num_proxies), source in cases:
    xn, y, pn = batch(n, dim, classes, num_proxies)
    x = torch.tensor(xn, requires_grad=True)
    p = torch.tensor(pn, requires_grad=True) if pn is not None else None
    proxy_param = p
    if loss == "proxy-nca" and source == "pml":
        value, proxy_param = pml_proxy_nca(x, y, p.detach().clone(), cfg)
    elif loss == "proxy-nca":
        value = proxy_nca(x, y, p, cfg)
    elif loss == "proxy-triplet":
        value = proxy_triplet(x, y, p, cfg)
    elif loss == "triplet" and cfg["mining"] == "all":
        value = pml_triplet_all(x, y, cfg)
    elif loss == "triplet":
        value = semihard(x, y, cfg)
    else:
        value = pml_nca(x, y, cfg)
    value.backward()
    case = {
        "loss": loss, "name": name, "source": source, "config": cfg,
        "embeddings": xn.tolist(), "labels": y,
        "value": value.item(), "grad_embeddings": x.grad.tolist(),
    }
    if p is not None:
        case["proxies"] = pn.tolist()
        case["grad_proxies"] = proxy_param.grad.tolist()
    out["cases"].append(case)

path = pathlib.Path(__file__).parent / "fixtures" / "losses.json"
path.write_text(json.dumps(out))
print("wrote", path, len(out["cases"]), "cases")
