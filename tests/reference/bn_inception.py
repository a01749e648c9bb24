#!/usr/bin/env python3
"""Reference outputs of BN-Inception from the `pretrainedmodels` PyTorch port.

The 11.3 M weights are not stored: both sides generate them from a rule (see `seeded`),
which `crates/nofuss-backbone/tests/bn_inception_parity.rs` implements too. The script
builds `pretrainedmodels.models.bninception.BNInception`, fills every parameter and
running statistic from the rule, and writes tests/reference/fixtures/bn_inception.json:

- eval mode, a seeded 2x3x224x224 input: the pooled 1024-d features (the port's
  7x7 `global_pool`) and the 1000-way logits;
- train mode (batch statistics, float64), a seeded 2x3x64x64 input: the pooled features, the
  running statistics of two batch norms after that step (momentum 0.1), and the gradients
  of sum(features * R) (R seeded) for a few batch-norm scales and shifts, which flow
  back through every pooling and convolution of the network.

It also writes tests/reference/fixtures/bn_inception_stem.pth: `torch.save` of the stem
tensors (conv1_7x7_s2 and its batch norm, the latter as [1, 64] like the public
checkpoint), to test reading PyTorch pickles.

Run from the repository root:  python3 tests/reference/bn_inception.py
Needs: numpy, torch, pretrainedmodels (pip install --no-deps pretrainedmodels; its
package __init__ wants torchvision, so the model file is loaded directly).
"""
import importlib.util
import json
import os
import pathlib

import numpy as np
import torch

MASK = (1 << 64) - 1


def fnv1a64(text):
    h = 0xCBF29CE484222325
    for b in text.encode():
        h = ((h ^ b) * 0x100000001B3) & MASK
    return h


def seeded(name, shape):
    """Value i of tensor `name`: splitmix64(fnv1a64(name) + i * golden) -> [-1, 1), scaled."""
    n = int(np.prod(shape))
    with np.errstate(over="ignore"):
        z = np.uint64(fnv1a64(name)) + np.arange(n, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    v = (z >> np.uint64(11)).astype(np.float64) * 2.0**-53 * 2.0 - 1.0
    if name.endswith("running_var"):
        v = 1.0 + 0.5 * v
    elif name.endswith("running_mean"):
        v = 0.2 * v
    elif "_bn." in name and name.endswith(".weight"):
        v = 1.0 + 0.25 * v
    elif name.endswith(".bias"):
        v = 0.1 * v
    elif name.endswith(".weight"):
        fan_in = int(np.prod(shape[1:]))
        v = v * np.sqrt(6.0 / fan_in)
    elif name.startswith("input"):
        v = 64.0 * v
    return v.astype(np.float32).reshape(shape)


def load_port():
    spec = importlib.util.find_spec("pretrainedmodels")
    path = os.path.join(spec.submodule_search_locations[0], "models", "bninception.py")
    s = importlib.util.spec_from_file_location("bninception_port", path)
    m = importlib.util.module_from_spec(s)
    s.loader.exec_module(m)
    return m


def main():
    torch.set_grad_enabled(True)
    torch.backends.mkldnn.enabled = False  # plain im2col/GEMM convolutions, f32 throughout
    port = load_port()
    net = port.BNInception(num_classes=1000)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            t.copy_(torch.from_numpy(seeded(name, tuple(t.shape))))

    out = {"torch": torch.__version__, "rule": "see tests/reference/bn_inception.py:seeded"}

    net.eval()
    x = torch.from_numpy(seeded("input", (2, 3, 224, 224)))
    with torch.no_grad():
        f = net.features(x)
        pooled = net.global_pool(f).flatten(1)
        logits = net.last_linear(pooled)
    out["eval"] = {
        "input": [2, 3, 224, 224],
        "features": pooled.flatten().tolist(),
        "logits": logits.flatten().tolist(),
    }

    # Training mode in float64: with batch statistics over few values (2 images, 2x2
    # maps at the end) the network is ill-conditioned, and float32 PyTorch itself
    # differs from float64 by about 1e-2 there.
    net = net.double().train()
    x = torch.from_numpy(seeded("input_small", (2, 3, 64, 64))).double()
    feats = net.features(x).mean(dim=(2, 3))
    r = torch.from_numpy(seeded("grad_weights", (2, 1024))).double()
    (feats * r).sum().backward()
    params = dict(net.named_parameters())
    buffers = dict(net.named_buffers())
    grad_names = [
        "conv1_7x7_s2_bn.weight",
        "conv2_3x3_bn.bias",
        "inception_3c_3x3_bn.weight",
        "inception_4e_double_3x3_2_bn.bias",
        "inception_5b_pool_proj_bn.weight",
    ]
    stat_names = ["conv1_7x7_s2_bn", "inception_5b_pool_proj_bn"]
    out["train"] = {
        "input": [2, 3, 64, 64],
        "features": feats.detach().flatten().tolist(),
        "grads": {n: params[n].grad.flatten().tolist() for n in grad_names},
        "running_mean": {n: buffers[n + ".running_mean"].tolist() for n in stat_names},
        "running_var": {n: buffers[n + ".running_var"].tolist() for n in stat_names},
    }

    here = pathlib.Path(__file__).parent / "fixtures"
    (here / "bn_inception.json").write_text(json.dumps(out))
    stem = {}
    for n in ["conv1_7x7_s2.weight", "conv1_7x7_s2.bias"]:
        stem[n] = torch.from_numpy(seeded(n, tuple(params[n].shape)))
    for n in ["weight", "bias", "running_mean", "running_var"]:
        full = "conv1_7x7_s2_bn." + n
        stem[full] = torch.from_numpy(seeded(full, (64,))).reshape(1, 64)
    torch.save(stem, here / "bn_inception_stem.pth")
    print("wrote", here / "bn_inception.json", "and", here / "bn_inception_stem.pth")


if __name__ == "__main__":
    main()
