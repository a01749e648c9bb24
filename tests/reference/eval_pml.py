#!/usr/bin/env python3
"""Reference MAP@R, R-Precision and Precision@1 from pytorch-metric-learning.

Writes tests/reference/fixtures/eval_pml.json: seeded clustered embeddings, labels, and the
values of pytorch_metric_learning.utils.accuracy_calculator.AccuracyCalculator with exact
Euclidean neighbours (CustomKNN over LpDistance without normalisation), every point a query
against all others (the query itself excluded), as in "A Metric Learning Reality Check"
(Musgrave et al., ECCV 2020). Every class has at least two members.

Run from the repository root:  python3 tests/reference/eval_pml.py
Needs: torch, pytorch-metric-learning, numpy.
"""
import json
import pathlib

import numpy as np
import pytorch_metric_learning
import torch
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import CustomKNN

rng = np.random.default_rng(2020)
calc = AccuracyCalculator(
    include=("mean_average_precision_at_r", "r_precision", "precision_at_1"),
    k="max_bin_count",
    knn_func=CustomKNN(LpDistance(normalize_embeddings=False)),
    device=torch.device("cpu"),
)
out = {"pytorch_metric_learning": pytorch_metric_learning.__version__, "torch": torch.__version__, "cases": []}
for n_classes, per_class_max, dim, spread in [(12, 9, 6, 1.2), (30, 5, 16, 0.8), (5, 40, 3, 2.0)]:
    counts = rng.integers(2, per_class_max + 1, n_classes)
    labels = np.repeat(np.arange(n_classes), counts)
    rng.shuffle(labels)
    centres = rng.normal(size=(n_classes, dim)) * spread
    x = (centres[labels] + rng.normal(size=(len(labels), dim))).astype(np.float32)
    acc = calc.get_accuracy(torch.from_numpy(x), torch.from_numpy(labels))
    out["cases"].append({
        "dim": dim,
        "embeddings": x.ravel().tolist(),
        "labels": labels.tolist(),
        "map_at_r": float(acc["mean_average_precision_at_r"]),
        "r_precision": float(acc["r_precision"]),
        "precision_at_1": float(acc["precision_at_1"]),
    })
path = pathlib.Path(__file__).parent / "fixtures" / "eval_pml.json"
path.write_text(json.dumps(out))
print(f"wrote {path} ({path.stat().st_size} bytes) with pytorch-metric-learning {pytorch_metric_learning.__version__}")
