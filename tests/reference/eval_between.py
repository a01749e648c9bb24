#!/usr/bin/env python3
"""Reference query/gallery retrieval from faiss and pytorch-metric-learning.

Writes tests/reference/fixtures/eval_between.json: seeded clustered queries and a separate
gallery (the In-Shop Clothes protocol: every query class is in the gallery, the gallery
also holds classes no query has), and
- from faiss (IndexFlatL2 over the gallery, searched with the queries): each query's K
  nearest gallery rows with squared L2 distances, and Recall@K (a hit: a gallery row of
  the query's class among the first K);
- from pytorch-metric-learning's AccuracyCalculator (exact Euclidean neighbours, queries
  against the gallery as its reference set, `ref_includes_query=False`): MAP@R,
  R-Precision and Precision@1, R being the number of gallery rows of the query's class.

Run from the repository root:  python3 tests/reference/eval_between.py
Needs: numpy, faiss-cpu, torch, pytorch-metric-learning.
"""
import json
import pathlib

import faiss
import numpy as np
import pytorch_metric_learning
import torch
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import CustomKNN

rng = np.random.default_rng(2016)
calc = AccuracyCalculator(
    include=("mean_average_precision_at_r", "r_precision", "precision_at_1"),
    k="max_bin_count",
    knn_func=CustomKNN(LpDistance(normalize_embeddings=False)),
    device=torch.device("cpu"),
)
out = {
    "faiss": faiss.__version__,
    "pytorch_metric_learning": pytorch_metric_learning.__version__,
    "torch": torch.__version__,
    "cases": [],
}
for q_classes, extra_classes, per_class_max, dim, spread, k in [
    (15, 5, 8, 8, 1.5, 10),
    (40, 10, 4, 16, 0.9, 20),
    (6, 0, 30, 3, 2.5, 50),
]:
    classes = q_classes + extra_classes
    centres = rng.normal(size=(classes, dim)) * spread
    g_counts = rng.integers(1, per_class_max + 1, classes)
    g_labels = np.repeat(np.arange(classes), g_counts)
    rng.shuffle(g_labels)
    q_counts = rng.integers(1, per_class_max + 1, q_classes)
    q_labels = np.repeat(np.arange(q_classes), q_counts)
    rng.shuffle(q_labels)
    gallery = (centres[g_labels] + rng.normal(size=(len(g_labels), dim))).astype(np.float32)
    queries = (centres[q_labels] + rng.normal(size=(len(q_labels), dim))).astype(np.float32)

    index = faiss.IndexFlatL2(dim)
    index.add(gallery)
    dist, idx = index.search(queries, k)
    recall = {
        str(kk): float((g_labels[idx[:, :kk]] == q_labels[:, None]).any(axis=1).mean())
        for kk in (1, 2, 4, k)
    }
    acc = calc.get_accuracy(
        torch.from_numpy(queries),
        torch.from_numpy(q_labels),
        torch.from_numpy(gallery),
        torch.from_numpy(g_labels),
        ref_includes_query=False,
    )
    out["cases"].append({
        "dim": dim,
        "k": k,
        "queries": queries.ravel().tolist(),
        "query_labels": q_labels.tolist(),
        "gallery": gallery.ravel().tolist(),
        "gallery_labels": g_labels.tolist(),
        "indices": idx.tolist(),
        "distances": dist.tolist(),
        "recall": recall,
        "map_at_r": float(acc["mean_average_precision_at_r"]),
        "r_precision": float(acc["r_precision"]),
        "precision_at_1": float(acc["precision_at_1"]),
    })
path = pathlib.Path(__file__).parent / "fixtures" / "eval_between.json"
path.write_text(json.dumps(out))
print(f"wrote {path} ({path.stat().st_size} bytes) with faiss {faiss.__version__}, "
      f"pytorch-metric-learning {pytorch_metric_learning.__version__}")
