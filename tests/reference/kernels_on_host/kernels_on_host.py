#!/usr/bin/env python3
"""Checks nofuss-tensor's CUDA kernels without a GPU: compiles them as plain C++
(crates/nofuss-tensor/kernels/host_emulation.h: blocks one after another, a block's
threads as real threads meeting at __syncthreads)
with harness.cpp, runs pooling, batch norm (+ReLU, statistics, backward, running
statistics), the fused NCA rows of the proxy losses, the fused optimiser steps, the
scaled row normalisation, the squared distances and the kNN row selection on random inputs in f64, f32 and bf16, and
compares with PyTorch. It checks the kernels' arithmetic, indexing and block reductions;
the launch code in src/cuda.rs, cuDNN and speed still need a GPU run
(xtask/scripts/gpu-check.sh).

    python3 tests/reference/kernels_on_host/kernels_on_host.py    (needs g++ with C++20 and torch)
"""
import pathlib
import subprocess
import sys
import tempfile

import torch
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parents[3]
HERE = pathlib.Path(__file__).resolve().parent
TOL = {"f64": 1e-10, "f32": 2e-5, "bf16": 3e-2}
DT = {"f64": torch.float64, "f32": torch.float32, "bf16": torch.bfloat16}
failures = []


def build(out):
    cmd = ["g++", "-std=c++20", "-O1", "-pthread", "-DNOFUSS_HOST_EMULATION",
           f"-I{ROOT / 'crates/nofuss-tensor/kernels'}", str(HERE / "harness.cpp"), "-o", str(out)]
    subprocess.run(cmd, check=True)


def write(d, name, t):
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    (d / f"{name}.bin").write_bytes(t.numpy().tobytes())


def read(d, name, dtype, shape):
    raw = (d / f"{name}.bin").read_bytes()
    if dtype == torch.bfloat16:
        return torch.frombuffer(bytearray(raw), dtype=torch.int16).view(torch.bfloat16).reshape(shape)
    return torch.frombuffer(bytearray(raw), dtype=dtype).reshape(shape)


def check(what, got, want, tol):
    got, want = got.double(), want.double()
    scale = max(1.0, want.abs().max().item())
    err = (got - want).abs().max().item()
    status = "ok" if err <= tol * scale else "FAIL"
    if status == "FAIL":
        failures.append(what)
    print(f"{status:4} {what}: max error {err:.3g} (tolerance {tol * scale:.3g})")


def run(exe, d, *args):
    subprocess.run([str(exe), *map(str, args[:2]), str(d), *map(str, args[2:])], check=True)


def pool_case(exe, d, dt, kind, shape, k, s, p, ceil, inc=True):
    x = torch.randn(shape, dtype=torch.float64).to(DT[dt]).requires_grad_()
    xr = x.detach().double().requires_grad_()
    if kind == "max":
        y = F.max_pool2d(xr, k, s, p, ceil_mode=ceil)
    else:
        y = F.avg_pool2d(xr, k, s, p, ceil_mode=ceil, count_include_pad=inc)
    dy = torch.randn(y.shape, dtype=torch.float64).to(DT[dt])
    y.backward(dy.double())
    write(d, "x", x)
    write(d, "dy", dy)
    n, c, h, w = shape
    run(exe, d, "pool", dt, kind, n, c, h, w, y.shape[2], y.shape[3], k, s, p, int(inc))
    tag = f"{kind} pool {dt} {tuple(shape)} k{k} s{s} p{p} ceil={ceil} inc={inc}"
    check(tag + " y", read(d, "y", DT[dt], y.shape), y, TOL[dt])
    check(tag + " dx", read(d, "dx", DT[dt], shape), xr.grad, TOL[dt])


def bn_case(exe, d, dt, shape, relu, batch, slices):
    acc = torch.float64 if dt == "f64" else torch.float32
    n, c, h, w = shape
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 0.5).to(DT[dt])
    dy = torch.randn(shape, dtype=torch.float64).to(DT[dt])
    gamma = (torch.randn(c, dtype=torch.float64) * 0.5 + 1).to(acc)
    beta = (torch.randn(c, dtype=torch.float64) * 0.5).to(acc)
    rm = (torch.randn(c, dtype=torch.float64) * 0.3).to(acc)
    rv = (torch.rand(c, dtype=torch.float64) + 0.5).to(acc)
    for name, t in [("x", x), ("dy", dy), ("gamma", gamma), ("beta", beta), ("mean", rm),
                    ("var", rv), ("running_mean", rm), ("running_var", rv)]:
        write(d, name, t)
    xr = x.double().requires_grad_()
    gr, br = gamma.double().requires_grad_(), beta.double().requires_grad_()
    rm_ref, rv_ref = rm.double().clone(), rv.double().clone()
    y = F.batch_norm(xr, rm_ref, rv_ref, gr, br, training=bool(batch), momentum=0.1, eps=1e-5)
    if relu:
        y = F.relu(y)
    y.backward(dy.double())
    run(exe, d, "bn", dt, n, c, h * w, slices, int(relu), int(batch), 1e-5)
    tag = f"bn {dt} {tuple(shape)} relu={relu} batch={batch} slices={slices}"
    tol = TOL[dt]
    check(tag + " y", read(d, "y", DT[dt], shape), y, tol)
    sums = read(d, "sums", acc, (2, c))
    check(tag + " dbeta", sums[0], br.grad, tol if dt != "bf16" else 0.1)
    check(tag + " dgamma", sums[1], gr.grad, tol if dt != "bf16" else 0.1)
    if dt != "bf16":  # bf16 input gradients cancel most digits (see ops_parity.rs)
        check(tag + " dx", read(d, "dx", DT[dt], shape), xr.grad, tol)
    if batch:
        check(tag + " running mean", read(d, "running_mean", acc, (c,)), rm_ref, max(tol, 1e-6))
        check(tag + " running var", read(d, "running_var", acc, (c,)), rv_ref, max(tol, 1e-6))


def nca_case(exe, d, dt, n, p, paper, eps, bad_label=False):
    dist = (torch.rand(n, p, dtype=torch.float64) * 8).to(DT[dt])
    labels = torch.randint(0, p, (n,), dtype=torch.int64)
    if bad_label:
        labels[1] = p + 3
    g = torch.randn(n, 2, dtype=torch.float64).to(DT[dt])
    g[:, 1] = 0
    write(d, "d", dist)
    (d / "labels.bin").write_bytes(labels.to(torch.int32).numpy().astype("uint32").tobytes())
    write(d, "g", g)
    run(exe, d, "nca", dt, n, p, int(paper), eps)
    dr = dist.double().requires_grad_()
    rows = []
    for i in range(n):
        y = int(labels[i])
        if y >= p:
            rows.append(torch.tensor(float("nan"), dtype=torch.float64))
            continue
        mask = torch.ones(p, dtype=torch.bool)
        if paper:
            mask[y] = False
        lse = torch.logsumexp(-dr[i][mask], 0)
        if paper:
            rows.append(dr[i, y] + lse)
        else:
            neg = torch.ones(p, dtype=torch.bool)
            neg[y] = False
            rows.append((1 - eps) * dr[i, y] + eps * dr[i][neg].mean() + lse)
    loss = torch.stack(rows)
    tag = f"nca {dt} {n}x{p} paper={paper} eps={eps} bad_label={bad_label}"
    out = read(d, "out", DT[dt], (n, 2))
    if bad_label:
        ok = torch.isnan(out[1, 0]) and torch.isfinite(out[0, 0])
        print(("ok  " if ok else "FAIL") + f" {tag}: NaN for the bad label only")
        if not ok:
            failures.append(tag)
        return
    check(tag + " loss", out[:, 0], loss, TOL[dt])
    (loss * g[:, 0].double()).sum().backward()
    check(tag + " grad", read(d, "dd", DT[dt], (n, p)), dr.grad, TOL[dt])


def optim_case(exe, d, dt, name, make, args, steps=3):
    torch.manual_seed(1)
    p0 = torch.randn(37, dtype=torch.float64)
    ref = p0.clone().requires_grad_()
    opt = make([ref])
    p = p0.to(DT[dt])
    state = torch.zeros(3, 37, dtype=DT[dt])
    if args.get("tf_style"):
        state[1] = 1
    for t in range(1, steps + 1):
        grad = torch.randn(37, dtype=torch.float64)
        ref.grad = grad.clone()
        opt.step()
        a = dict(args)
        b1, b2 = a.get("beta1", 0.0), a.get("beta2", 0.0)
        a["bc1"], a["bc2"] = 1 - b1 ** t, 1 - b2 ** t
        a["first"] = int(t == 1)
        write(d, "p", p)
        write(d, "grad", grad.to(DT[dt]))
        write(d, "state", state)
        fields = [a.get(k, 0) for k in ["kind", "first", "nesterov", "centered", "tf_style"]]
        fields += [a.get(k, 0.0) for k in ["scale", "wd_l2", "wd_decoupled", "lr", "momentum",
                                           "dampening", "alpha", "eps", "beta1", "beta2", "bc1", "bc2"]]
        run(exe, d, "optim", dt, *fields)
        p = read(d, "p", DT[dt], (37,)).clone()
        state = read(d, "state", DT[dt], (3, 37)).clone()
    check(f"optim {name} {dt} after {steps} steps", p, ref.detach(), TOL[dt] * 10)


def l2n_case(exe, d, dt, n, dim, scale, zero_row=False):
    """Scaled row normalisation and its gradient against scale * F.normalize."""
    torch.manual_seed(n * dim)
    x = torch.randn(n, dim, dtype=torch.float64)
    if zero_row:
        x[1] = 0.0
    g = torch.randn(n, dim, dtype=torch.float64)
    xr = x.to(DT[dt]).double().requires_grad_()
    y = F.normalize(xr, dim=1, eps=1e-12) * scale
    y.backward(g.to(DT[dt]).double())
    write(d, "x", x.to(DT[dt]))
    write(d, "g", g.to(DT[dt]))
    run(exe, d, "l2n", dt, n, dim, scale)
    tag = f"l2n {dt} {n}x{dim} scale={scale} zero_row={zero_row}"
    check(tag + " y", read(d, "y", DT[dt], (n, dim)), y.detach(), TOL[dt])
    grad = xr.grad
    if zero_row:  # compare the zero row's gradient relative to its own size (s/eps * g)
        got = read(d, "dx", DT[dt], (n, dim)).double()
        check(tag + " dx zero row", got[1] / 1e12, grad[1] / 1e12, TOL[dt])
        got[1], grad = 0, grad.clone()
        grad[1] = 0
        check(tag + " dx", got, grad, TOL[dt])
    else:
        check(tag + " dx", read(d, "dx", DT[dt], (n, dim)), grad, TOL[dt])


def sqdist_case(exe, d, dt, n, p, dim):
    """Squared distances from a product and norms, and the product's gradient, against
    PyTorch's element-wise ops (clamp at 0) with a point shared by both sides."""
    torch.manual_seed(n * p + dim)
    a = torch.randn(n, dim, dtype=torch.float64)
    b = torch.randn(p, dim, dtype=torch.float64)
    b[0] = a[0]
    a, b = a.to(DT[dt]), b.to(DT[dt])
    ab = (a @ b.T).requires_grad_()
    aa, bb = (a * a).sum(1), (b * b).sum(1)
    ref = ((aa[:, None] + bb[None, :]) - ab * 2).clamp_min(0)
    g = torch.randn(n, p, dtype=torch.float64).to(DT[dt])
    ref.backward(g)
    for name, t in [("ab", ab), ("aa", aa), ("bb", bb), ("g", g)]:
        write(d, name, t)
    run(exe, d, "sqdist", dt, n, p)
    tag = f"sqdist {dt} {n}x{p}x{dim}"
    check(tag + " d", read(d, "out", DT[dt], (n, p)), ref.detach(), TOL[dt])
    check(tag + " d(ab)", read(d, "dab", DT[dt], (n, p)), ab.grad, TOL[dt])


def select_case(exe, d, rows, cols, k, skip):
    """kNN selection: the k smallest of each row (its own column `r + skip` left out) in
    ascending order, ties by column: torch.sort(stable=True) of the remaining columns."""
    torch.manual_seed(rows * cols + k)
    x = (torch.randn(rows, cols) * 8).round() / 8  # many ties across the k-th place
    x[0, 1] = float("inf")
    x[-1, 2] = float("nan")
    write(d, "x", x)
    run(exe, d, "select", "f32", rows, cols, k, skip if skip is not None else 0, int(skip is not None))
    vals = read(d, "vals", torch.float32, (rows, k))
    idx = read(d, "idx", torch.int32, (rows, k)).long()
    tag = f"select {rows}x{cols} k={k} skip={skip}"
    bad = 0
    for r in range(rows):
        cols_left = torch.tensor([j for j in range(cols) if skip is None or j != r + skip])
        v, order = torch.sort(x[r, cols_left], stable=True)
        want = cols_left[order[:k]]
        same_vals = torch.equal(vals[r].nan_to_num(7e7), v[:k].nan_to_num(7e7))
        bad += int(not torch.equal(idx[r], want) or not same_vals)
    status = "ok" if bad == 0 else "FAIL"
    if bad:
        failures.append(tag)
    print(f"{status:4} {tag}: {bad} row(s) differ from torch.sort")


def main():
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        d = pathlib.Path(tmp)
        exe = d / "harness"
        build(exe)
        for dt in ["f64", "f32", "bf16"]:
            pool_case(exe, d, dt, "max", (2, 3, 11, 11), 3, 2, 0, True)
            pool_case(exe, d, dt, "max", (2, 3, 7, 7), 3, 1, 1, True)
            pool_case(exe, d, dt, "max", (2, 2, 8, 6), 2, 2, 0, False)
            pool_case(exe, d, dt, "avg", (2, 3, 7, 7), 3, 1, 1, True, True)
            pool_case(exe, d, dt, "avg", (2, 3, 8, 9), 3, 2, 1, True, False)
            for relu in [True, False]:
                bn_case(exe, d, dt, (4, 5, 6, 7), relu, True, 3)
                bn_case(exe, d, dt, (3, 4, 5, 5), relu, False, 1)
            bn_case(exe, d, dt, (2, 3, 4, 4), True, True, 7)
        for dt in ["f64", "f32"]:
            for paper, eps in [(True, 0.0), (False, 0.0), (False, 0.1)]:
                nca_case(exe, d, dt, 6, 11, paper, eps)
                nca_case(exe, d, dt, 3, 700, paper, eps)
            nca_case(exe, d, dt, 4, 9, True, 0.0, bad_label=True)
        for dt in ["f64", "f32", "bf16"]:
            l2n_case(exe, d, dt, 5, 64, 1.0)
            l2n_case(exe, d, dt, 3, 700, 3.0, zero_row=True)
        for dt in ["f64", "f32", "bf16"]:
            sqdist_case(exe, d, dt, 33, 300, 64)
        for rows, cols, k, skip in [(3, 5000, 1000, 0), (4, 300, 10, 2), (2, 4100, 4096, None), (5, 60, 1, 0)]:
            select_case(exe, d, rows, cols, k, skip)
        base = dict(scale=1.0)
        cases = [
            ("sgd nesterov wd", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
             dict(base, kind=0, lr=0.1, momentum=0.9, nesterov=1, wd_l2=0.01)),
            ("sgd dampening", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.8, dampening=0.3),
             dict(base, kind=0, lr=0.1, momentum=0.8, dampening=0.3)),
            ("rmsprop centred momentum", lambda p: torch.optim.RMSprop(p, lr=0.01, alpha=0.9, eps=1e-3, momentum=0.5, centered=True),
             dict(base, kind=1, lr=0.01, alpha=0.9, eps=1e-3, momentum=0.5, centered=1)),
            ("rmsprop plain", lambda p: torch.optim.RMSprop(p, lr=0.01, alpha=0.99, eps=1e-8),
             dict(base, kind=1, lr=0.01, alpha=0.99, eps=1e-8)),
            ("adam wd", lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.1),
             dict(base, kind=2, lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, wd_l2=0.1)),
            ("adamw", lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
             dict(base, kind=2, lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, wd_decoupled=0.1)),
        ]
        for dt in ["f64", "f32"]:
            for name, make, args in cases:
                optim_case(exe, d, dt, name, make, args)
    print(f"{len(failures)} failure(s)")
    sys.exit(1 if failures else 0)


main()
