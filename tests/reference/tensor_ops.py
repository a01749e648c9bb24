#!/usr/bin/env python3
"""Reference values of nofuss-tensor's custom operations, from PyTorch (float64, CPU).

For each case: the input(s), the output, and the gradients of sum(output * R) for a fixed
R (stored too), for
- conv2d (nn.functional.conv2d): BN-Inception's shapes in small (7x7 stride 2 pad 3 with
  bias, 3x3 pad 1, 3x3 stride 2 pad 1, 1x1) and a grouped convolution;
- max_pool2d / avg_pool2d with padding, ceil mode and count_include_pad (every pooling
  BN-Inception uses, plus odd cases);
- batch_norm (nn.functional.batch_norm, training mode, momentum 0.1) followed by ReLU,
  with the updated running statistics; and in evaluation mode.

Writes tests/reference/fixtures/tensor_ops.json, read by
crates/nofuss-tensor/tests/ops_parity.rs on the CPU (CI) and on a GPU
(NOFUSS_TEST_DEVICE=cuda). Run from the repository root:
    python3 tests/reference/tensor_ops.py        (needs torch)
"""
import json
import pathlib

import torch
import torch.nn.functional as F

torch.manual_seed(7)
DT = torch.float64


def rnd(*shape, scale=1.0, shift=0.0):
    return (torch.randn(*shape, dtype=DT) * scale + shift)


def flat(t):
    return [round(float(v), 15) for v in t.detach().reshape(-1)]


def case_conv(name, n, c_in, hw, c_out, k, stride, pad, groups=1, bias=True):
    x = rnd(n, c_in, hw, hw).requires_grad_()
    w = rnd(c_out, c_in // groups, k, k, scale=0.3).requires_grad_()
    b = rnd(c_out, scale=0.1).requires_grad_() if bias else None
    y = F.conv2d(x, w, b, stride=stride, padding=pad, groups=groups)
    r = rnd(*y.shape)
    (y * r).sum().backward()
    out = {"name": name, "op": "conv2d", "stride": stride, "padding": pad, "groups": groups,
           "x_shape": list(x.shape), "w_shape": list(w.shape), "y_shape": list(y.shape),
           "x": flat(x), "w": flat(w), "r": flat(r), "y": flat(y),
           "dx": flat(x.grad), "dw": flat(w.grad)}
    if bias:
        out["b"], out["db"] = flat(b), flat(b.grad)
    return out


def case_pool(name, kind, n, c, h, w, k, s, p, ceil, include_pad=True):
    x = rnd(n, c, h, w).requires_grad_()
    if kind == "max":
        y = F.max_pool2d(x, k, s, p, ceil_mode=ceil)
    else:
        y = F.avg_pool2d(x, k, s, p, ceil_mode=ceil, count_include_pad=include_pad)
    r = rnd(*y.shape)
    (y * r).sum().backward()
    return {"name": name, "op": kind + "_pool2d", "kernel": k, "stride": s, "padding": p,
            "ceil_mode": ceil, "count_include_pad": include_pad,
            "x_shape": list(x.shape), "y_shape": list(y.shape),
            "x": flat(x), "r": flat(r), "y": flat(y), "dx": flat(x.grad)}


def case_bn(name, n, c, h, w, train, relu):
    x = rnd(n, c, h, w, scale=2.0, shift=0.5).requires_grad_()
    gamma = rnd(c, scale=0.5, shift=1.0).requires_grad_()
    beta = rnd(c, scale=0.5).requires_grad_()
    rm, rv = rnd(c, scale=0.3), rnd(c, scale=0.2, shift=1.0).abs()
    rm0, rv0 = rm.clone(), rv.clone()
    y = F.batch_norm(x, rm, rv, gamma, beta, training=train, momentum=0.1, eps=1e-5)
    if relu:
        y = F.relu(y)
    r = rnd(*y.shape)
    (y * r).sum().backward()
    return {"name": name, "op": "batch_norm", "train": train, "relu": relu, "eps": 1e-5,
            "momentum": 0.1, "x_shape": list(x.shape), "x": flat(x), "gamma": flat(gamma),
            "beta": flat(beta), "running_mean": flat(rm0), "running_var": flat(rv0),
            "r": flat(r), "y": flat(y), "dx": flat(x.grad), "dgamma": flat(gamma.grad),
            "dbeta": flat(beta.grad), "new_running_mean": flat(rm), "new_running_var": flat(rv)}


cases = [
    case_conv("stem 7x7 s2 p3", 2, 3, 16, 8, 7, 2, 3),
    case_conv("3x3 p1", 2, 6, 9, 5, 3, 1, 1),
    case_conv("3x3 s2 p1 no bias", 2, 4, 10, 6, 3, 2, 1, bias=False),
    case_conv("1x1", 3, 8, 5, 4, 1, 1, 0),
    case_conv("grouped 3x3", 2, 6, 7, 4, 3, 1, 1, groups=2),
    case_pool("max 3x3 s2 ceil", "max", 2, 3, 11, 11, 3, 2, 0, True),
    case_pool("max 3x3 s2 ceil even", "max", 2, 3, 8, 10, 3, 2, 0, True),
    case_pool("max 3x3 s1 p1 ceil", "max", 2, 3, 7, 7, 3, 1, 1, True),
    case_pool("max 2x2", "max", 2, 2, 8, 6, 2, 2, 0, False),
    case_pool("avg 3x3 s1 p1 incl", "avg", 2, 3, 7, 7, 3, 1, 1, True, True),
    case_pool("avg 3x3 s2 p1 ceil excl", "avg", 2, 3, 8, 9, 3, 2, 1, True, False),
    case_pool("avg 2x2", "avg", 1, 2, 6, 6, 2, 2, 0, False, True),
    case_bn("bn train relu", 4, 5, 6, 6, True, True),
    case_bn("bn train", 3, 4, 5, 7, True, False),
    case_bn("bn eval relu", 2, 3, 4, 4, False, True),
]
out = pathlib.Path("tests/reference/fixtures/tensor_ops.json")
out.write_text(json.dumps({"torch": torch.__version__, "cases": cases}))
print(f"wrote {out} ({out.stat().st_size} bytes, {len(cases)} cases)")
