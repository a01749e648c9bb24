#!/usr/bin/env python3
"""PyTorch reference for `nofuss bench train-step` (and benches/train_step.rs): the same
training step, timed the same way.

Backbones:
- small-cnn (default): 3 blocks of conv3x3 (no bias) + BatchNorm + ReLU + 2x2 max-pool
  (16, 32, 64 channels) on 1x32x32 input;
- bn-inception: BN-Inception with the layer plan of the `pretrainedmodels` port (conv with
  bias + BatchNorm + ReLU everywhere, 3x3 stride-2 ceil-mode max pools, 3x3 stride-1 padded
  average pools counting padding) on 3x224x224 input, written out below from the channel
  table (nofuss's own implementation is checked against the port in
  crates/nofuss-backbone/tests/bn_inception_parity.rs).
Head: global average pooling, linear to 64, L2 normalisation. Loss: Proxy-NCA, paper form
(positive proxy excluded from the denominator), embeddings and proxies L2-normalised and
scaled by 3. Optimisers: Adam lr 3e-3 (model) and 3e-2 (proxies), as nofuss's defaults.
Synthetic input on the device, WARMUP untimed steps, median of STEPS timed steps, each step
ended by reading the loss (a device synchronisation). Prints one JSON line.

    python3 benches/torch_train_step.py [BATCH] [STEPS] [--backbone bn-inception]
        [--device cuda] [--classes 100] [--precision f32|bf16] [--warmup 3] [--mode backbone]
    (CPU threads: torch default, or NOFUSS_THREADS)
"""
import argparse
import json
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

ap = argparse.ArgumentParser()
ap.add_argument("batch", nargs="?", type=int, default=64)
ap.add_argument("steps", nargs="?", type=int, default=20)
ap.add_argument("--backbone", default="small-cnn", choices=["small-cnn", "bn-inception"])
ap.add_argument("--device", default="cpu")
ap.add_argument("--classes", type=int, default=124)
ap.add_argument("--precision", default="f32", choices=["f32", "bf16"])
ap.add_argument("--warmup", type=int, default=3)
ap.add_argument("--phases", action="store_true",
                help="also time forward (with the loss), backward and optimiser steps separately, "
                     "synchronising after each: queueing and completion time per phase")
ap.add_argument("--profile-ops", action="store_true",
                help="also profile `steps` steps with torch.profiler: GPU kernels' ms per step under 'ops'")
ap.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True")
ap.add_argument("--mode", default="train", choices=["train", "backbone"],
                help="train: whole steps; backbone: forward (eval, no grad) and forward+backward "
                     "(train mode, sum of pooled features) of the backbone alone")
args = ap.parse_args()
if os.environ.get("NOFUSS_THREADS"):
    torch.set_num_threads(int(os.environ["NOFUSS_THREADS"]))
torch.manual_seed(0)
dev = torch.device(args.device)
classes, dim, scale = args.classes, 64, 3.0


def conv_bn_relu(c_in, c_out, k, stride=1, pad=0):
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, stride, pad), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class Block(nn.Module):
    """One inception block: 1x1 | 1x1-3x3 | 1x1-3x3-3x3 | pool(-1x1), concatenated."""

    def __init__(self, c_in, one, r3, o3, rd, od, pool, proj):
        super().__init__()
        s = 2 if pool == "reduce" else 1
        self.one = conv_bn_relu(c_in, one, 1) if one else None
        self.b3 = nn.Sequential(conv_bn_relu(c_in, r3, 1), conv_bn_relu(r3, o3, 3, s, 1))
        self.bd = nn.Sequential(conv_bn_relu(c_in, rd, 1), conv_bn_relu(rd, od, 3, 1, 1), conv_bn_relu(od, od, 3, s, 1))
        if pool == "avg":
            self.pool = nn.AvgPool2d(3, 1, 1, ceil_mode=True, count_include_pad=True)
        elif pool == "max":
            self.pool = nn.MaxPool2d(3, 1, 1, ceil_mode=True)
        else:
            self.pool = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.proj = conv_bn_relu(c_in, proj, 1) if proj else None

    def forward(self, x):
        out = [self.one(x)] if self.one is not None else []
        p = self.pool(x)
        out += [self.b3(x), self.bd(x), self.proj(p) if self.proj is not None else p]
        return torch.cat(out, 1)


def bn_inception():
    plan = [  # c_in, 1x1, 3x3 reduce/out, double reduce/out, pool, pool projection
        (192, 64, 64, 64, 64, 96, "avg", 32), (256, 64, 64, 96, 64, 96, "avg", 64),
        (320, 0, 128, 160, 64, 96, "reduce", 0), (576, 224, 64, 96, 96, 128, "avg", 128),
        (576, 192, 96, 128, 96, 128, "avg", 128), (576, 160, 128, 160, 128, 160, "avg", 128),
        (608, 96, 128, 192, 160, 192, "avg", 128), (608, 0, 128, 192, 192, 256, "reduce", 0),
        (1056, 352, 192, 320, 160, 224, "avg", 128), (1024, 352, 192, 320, 192, 224, "max", 128),
    ]
    stem = [conv_bn_relu(3, 64, 7, 2, 3), nn.MaxPool2d(3, 2, ceil_mode=True), conv_bn_relu(64, 64, 1),
            conv_bn_relu(64, 192, 3, 1, 1), nn.MaxPool2d(3, 2, ceil_mode=True)]
    return nn.Sequential(*stem, *[Block(*p) for p in plan]), 1024, (3, 224, 224)


def small_cnn():
    blocks, c_in = [], 1
    for w in (16, 32, 64):
        blocks += [nn.Conv2d(c_in, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2)]
        c_in = w
    return nn.Sequential(*blocks), 64, (1, 32, 32)


backbone, feats, shape = bn_inception() if args.backbone == "bn-inception" else small_cnn()
backbone = backbone.to(dev)
head = nn.Linear(feats, dim).to(dev)
proxies = nn.Parameter(torch.randn(classes, dim, device=dev) / 8)
opt = torch.optim.Adam(list(backbone.parameters()) + list(head.parameters()), lr=3e-3)
popt = torch.optim.Adam([proxies], lr=3e-2)


def proxy_nca(e, y, p):
    e = F.normalize(e, dim=1) * scale
    p = F.normalize(p, dim=1) * scale
    d = torch.cdist(e, p).pow(2)
    pos = d.gather(1, y[:, None]).squeeze(1)
    neg = (-d).masked_fill(F.one_hot(y, classes).bool(), float("-inf"))
    return (pos + torch.logsumexp(neg, dim=1)).mean()


x = torch.randn(args.batch, *shape, device=dev)
y = torch.arange(args.batch, device=dev) % classes


def sync():
    if dev.type == "cuda":
        torch.cuda.synchronize()


if args.mode == "backbone":
    def timed(train):
        backbone.train(train)
        ts = []
        for i in range(args.steps + args.warmup):
            t = time.perf_counter()
            if train:
                backbone(x).mean(dim=(2, 3)).sum().backward()
            else:
                with torch.no_grad():
                    backbone(x).mean(dim=(2, 3)).sum().item()
            sync()
            if i >= args.warmup:
                ts.append(time.perf_counter() - t)
        ts.sort()
        return ts[len(ts) // 2]
    f, fb = timed(False), timed(True)
    print(json.dumps({"impl": f"PyTorch {torch.__version__} eager", "device": str(dev), "backbone": args.backbone,
                      "threads": torch.get_num_threads(), "batch": args.batch, "steps": args.steps,
                      "forward_images_per_sec": round(args.batch / f, 1),
                      "forward_backward_images_per_sec": round(args.batch / fb, 1),
                      "forward_ms": round(f * 1e3, 2), "forward_backward_ms": round(fb * 1e3, 2)}))
    raise SystemExit(0)
autocast = args.precision == "bf16"
torch.backends.cudnn.benchmark = args.cudnn_benchmark


def queued_and_done(f):
    """Runs f, then waits for the device: seconds until f returned and until the device finished."""
    t = time.perf_counter()
    v = f()
    q = time.perf_counter() - t
    sync()
    return v, q, time.perf_counter() - t


def forward():
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
        e = head(backbone(x).mean(dim=(2, 3)))
    return proxy_nca(e.float(), y, proxies)


def backward(loss):
    opt.zero_grad(set_to_none=True)
    popt.zero_grad(set_to_none=True)
    loss.backward()


def optimise():
    opt.step()
    popt.step()


times = []
for i in range(args.steps + args.warmup):
    t = time.perf_counter()
    loss = forward()
    backward(loss)
    optimise()
    loss.item()
    if i >= args.warmup:
        times.append(time.perf_counter() - t)
times.sort()
med = times[len(times) // 2]
out = {"impl": f"PyTorch {torch.__version__} eager", "device": str(dev), "backbone": args.backbone,
       "precision": args.precision, "threads": torch.get_num_threads(), "batch": args.batch,
       "steps": args.steps, "median_ms": round(med * 1e3, 2), "images_per_sec": round(args.batch / med, 1),
       "cudnn_algorithms": "benchmark" if args.cudnn_benchmark else "heuristic"}
if args.phases:
    names = ["forward", "backward", "optimizer"]
    queued, done = {n: [] for n in names}, {n: [] for n in names}
    for i in range(args.steps + args.warmup):
        loss, q0, d0 = queued_and_done(forward)
        _, q1, d1 = queued_and_done(lambda: backward(loss))
        _, q2, d2 = queued_and_done(optimise)
        loss.item()
        if i >= args.warmup:
            for n, q, d in zip(names, (q0, q1, q2), (d0, d1, d2)):
                queued[n].append(q)
                done[n].append(d)
    for n in names:
        for key, ts in ((f"{n}_queue_ms", queued[n]), (f"{n}_ms", done[n])):
            ts.sort()
            out[key] = round(ts[len(ts) // 2] * 1e3, 2)
if args.profile_ops:
    from torch.profiler import ProfilerActivity, profile
    # GPU kernels on CUDA, operators' own CPU time on the CPU.
    gpu = dev.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if gpu else ProfilerActivity.CPU]) as prof:
        for i in range(args.steps):
            loss = forward()
            backward(loss)
            optimise()
            loss.item()
    own = (lambda e: e.self_device_time_total) if gpu else (lambda e: e.self_cpu_time_total)
    kernels = [e for e in prof.key_averages() if e.device_type.name == ("CUDA" if gpu else "CPU") and own(e) > 0]
    kernels.sort(key=lambda e: -own(e))
    out["profiled_ops_ms"] = round(sum(own(e) for e in kernels) / 1e3 / args.steps, 2)
    out["ops"] = [{"name": e.key[:160], "ms": round(own(e) / 1e3 / args.steps, 3),
                   "calls": round(e.count / args.steps, 2)} for e in kernels[:60]]
print(json.dumps(out))
