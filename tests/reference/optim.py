#!/usr/bin/env python3
"""Parameter trajectories of torch.optim optimisers, for nofuss-tensor's optim module
(`crates/nofuss-tensor/tests/optim_parity.rs`).

    .venv/bin/python tests/reference/optim.py

Two parameters (a 2x3 matrix and a 3-vector, float64) start at fixed values; the loss is
sum(sin(W) * C) + sum((v - 1)^2 * d), whose gradients differ per element. Each case runs
six steps of one optimiser (two parameter groups: the vector at half the learning rate,
with its own weight decay) and records both parameters after every step. TensorFlow's
RMSProp has no PyTorch class; its update is transcribed here from TensorFlow's
documentation (mean square starting at 1, eps inside the root, lr in the momentum).
"""
import json
import pathlib

import torch

torch.set_default_dtype(torch.float64)
OUT = pathlib.Path(__file__).resolve().parent / "fixtures" / "optim.json"
W0 = [[0.5, -1.2, 2.0], [0.1, 0.7, -0.3]]
V0 = [0.2, -0.4, 1.5]
C = torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.25, -1.0]])
D = torch.tensor([0.5, 2.0, 1.0])


def loss_of(w, v):
    return (torch.sin(w) * C).sum() + ((v - 1.0) ** 2 * D).sum()


CASES = [
    ("sgd", {"name": "sgd", "momentum": 0.0, "dampening": 0.0, "nesterov": False}, 0.1, 0.0, 0.01,
     lambda g, lr: torch.optim.SGD(g, lr=lr)),
    ("sgd_momentum_wd", {"name": "sgd", "momentum": 0.9, "dampening": 0.1, "nesterov": False}, 0.05, 1e-2, 1e-3,
     lambda g, lr: torch.optim.SGD(g, lr=lr, momentum=0.9, dampening=0.1)),
    ("sgd_nesterov", {"name": "sgd", "momentum": 0.9, "dampening": 0.0, "nesterov": True}, 0.05, 1e-3, 0.0,
     lambda g, lr: torch.optim.SGD(g, lr=lr, momentum=0.9, nesterov=True)),
    ("rmsprop", {"name": "rms-prop", "alpha": 0.9, "eps": 1e-3, "momentum": 0.0, "centered": False, "tf_style": False}, 0.01, 0.0, 1e-2,
     lambda g, lr: torch.optim.RMSprop(g, lr=lr, alpha=0.9, eps=1e-3)),
    ("rmsprop_momentum_centered", {"name": "rms-prop", "alpha": 0.95, "eps": 1e-2, "momentum": 0.9, "centered": True, "tf_style": False}, 0.01, 1e-3, 0.0,
     lambda g, lr: torch.optim.RMSprop(g, lr=lr, alpha=0.95, eps=1e-2, momentum=0.9, centered=True)),
    ("adam_l2", {"name": "adam", "beta1": 0.9, "beta2": 0.999, "eps": 1e-8}, 0.01, 1e-2, 0.0,
     lambda g, lr: torch.optim.Adam(g, lr=lr)),
    ("adam_eps1", {"name": "adam", "beta1": 0.9, "beta2": 0.999, "eps": 1.0}, 0.045, 0.0, 0.0,
     lambda g, lr: torch.optim.Adam(g, lr=lr, eps=1.0)),
    ("adamw", {"name": "adam-w", "beta1": 0.85, "beta2": 0.99, "eps": 1e-8}, 0.01, 0.05, 0.1,
     lambda g, lr: torch.optim.AdamW(g, lr=lr, betas=(0.85, 0.99))),
]

out = {"torch": torch.__version__, "w0": W0, "v0": V0, "c": C.tolist(), "d": D.tolist(), "cases": []}
for name, kind, lr, wd_w, wd_v, make in CASES:
    w = torch.tensor(W0, requires_grad=True)
    v = torch.tensor(V0, requires_grad=True)
    opt = make([{"params": [w], "weight_decay": wd_w}, {"params": [v], "lr": lr * 0.5, "weight_decay": wd_v}], lr)
    traj = []
    for _ in range(6):
        opt.zero_grad()
        loss_of(w, v).backward()
        opt.step()
        traj.append({"w": w.detach().flatten().tolist(), "v": v.detach().tolist()})
    out["cases"].append({"name": name, "kind": kind, "lr": lr, "wd_w": wd_w, "wd_v": wd_v, "steps": traj})

# TensorFlow's RMSProp, transcribed: ms starts at 1; ms = decay*ms + (1-decay)*g^2;
# mom = momentum*mom + lr*g/sqrt(ms + eps); p -= mom. (No weight decay in TF's optimiser.)
decay, eps, momentum, lr = 0.9, 1.0, 0.9, 0.045
w = torch.tensor(W0, requires_grad=True)
v = torch.tensor(V0, requires_grad=True)
state = {id(p): (torch.ones_like(p), torch.zeros_like(p)) for p in (w, v)}
traj = []
for _ in range(6):
    for p in (w, v):
        p.grad = None
    loss_of(w, v).backward()
    with torch.no_grad():
        for p, plr in ((w, lr), (v, lr * 0.5)):
            ms, mom = state[id(p)]
            ms = decay * ms + (1 - decay) * p.grad ** 2
            mom = momentum * mom + plr * p.grad / torch.sqrt(ms + eps)
            p -= mom
            state[id(p)] = (ms, mom)
    traj.append({"w": w.detach().flatten().tolist(), "v": v.detach().tolist()})
out["cases"].append({"name": "rmsprop_tf", "kind": {"name": "rms-prop", "alpha": decay, "eps": eps, "momentum": momentum,
                     "centered": False, "tf_style": True}, "lr": lr, "wd_w": 0.0, "wd_v": 0.0, "steps": traj})
OUT.write_text(json.dumps(out) + "\n")
print(f"{OUT}: {len(out['cases'])} cases")
