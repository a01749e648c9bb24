#!/usr/bin/env python3
"""Reference values for nofuss-eval, computed with scikit-learn.

Writes tests/reference/fixtures/eval_sklearn.json:
  - `nmi`: labelings and sklearn's normalized_mutual_info_score (arithmetic, geometric);
  - `recall`: seeded random embeddings with labels, and Recall@K where the neighbours come
    from sklearn's exact brute-force NearestNeighbors (the query itself excluded).

Run from the repository root:  python3 tests/reference/eval_sklearn.py
Needs: numpy, scikit-learn (pip install scikit-learn).
"""
import json
import pathlib

import numpy as np
import sklearn
from sklearn.metrics import normalized_mutual_info_score
from sklearn.neighbors import NearestNeighbors

rng = np.random.default_rng(1703_07464)
out = {"sklearn_version": sklearn.__version__, "nmi": [], "recall": []}

for n, ka, kb in [(50, 3, 4), (200, 10, 10), (500, 20, 7)]:
    a = rng.integers(0, ka, n)
    # b agrees with a partly, so scores are neither 0 nor 1
    b = np.where(rng.random(n) < 0.6, a % kb, rng.integers(0, kb, n))
    out["nmi"].append({
        "a": a.tolist(), "b": b.tolist(),
        "arithmetic": normalized_mutual_info_score(a, b, average_method="arithmetic"),
        "geometric": normalized_mutual_info_score(a, b, average_method="geometric"),
    })

for n, d, c in [(300, 8, 10), (257, 3, 40)]:
    labels = rng.integers(0, c, n)
    centres = rng.normal(size=(c, d)) * 1.5
    x = (centres[labels] + rng.normal(size=(n, d))).astype(np.float32)
    ks = [1, 2, 4, 8, 16]
    nn = NearestNeighbors(n_neighbors=max(ks) + 1, algorithm="brute").fit(x)
    _, idx = nn.kneighbors(x)
    # drop the query itself (distance 0, always first with distinct random points)
    assert (idx[:, 0] == np.arange(n)).all()
    idx = idx[:, 1:]
    recall = {str(k): float(np.mean([(labels[idx[i, :k]] == labels[i]).any() for i in range(n)])) for k in ks}
    out["recall"].append({"dim": d, "embeddings": x.ravel().tolist(), "labels": labels.tolist(), "recall": recall})

path = pathlib.Path(__file__).parent / "fixtures" / "eval_sklearn.json"
path.write_text(json.dumps(out))
print(f"wrote {path} ({path.stat().st_size} bytes) with scikit-learn {sklearn.__version__}")
