#!/usr/bin/env python3
"""Reference exact k-nearest neighbours from faiss (IndexFlatL2).

Writes tests/reference/fixtures/knn_faiss.json: seeded random embeddings (distinct points, so
no exact ties), and for every point its K nearest *other* points as faiss returns them
(search with K+1, the query itself removed), with squared L2 distances, plus Recall@K.

Run from the repository root:  python3 tests/reference/knn_faiss.py
Needs: numpy, faiss-cpu.
"""
import json
import pathlib

import faiss
import numpy as np

rng = np.random.default_rng(1000)
out = {"faiss": faiss.__version__, "cases": []}
for n, dim, k, classes in [(400, 16, 10, 20), (300, 3, 25, 7)]:
    x = rng.normal(size=(n, dim)).astype(np.float32)
    labels = rng.integers(0, classes, n)
    index = faiss.IndexFlatL2(dim)
    index.add(x)
    dist, idx = index.search(x, k + 1)
    rows_i, rows_d = [], []
    for i in range(n):
        keep = idx[i] != i
        ri, rd = idx[i][keep][:k], dist[i][keep][:k]
        rows_i.append(ri.tolist())
        rows_d.append(rd.tolist())
    nb = np.array(rows_i)
    recall = {str(kk): float((labels[nb[:, :kk]] == labels[:, None]).any(axis=1).mean()) for kk in (1, 2, 4, k)}
    out["cases"].append({"dim": dim, "k": k, "embeddings": x.ravel().tolist(), "labels": labels.tolist(),
                         "indices": rows_i, "distances": rows_d, "recall": recall})
path = pathlib.Path(__file__).parent / "fixtures" / "knn_faiss.json"
path.write_text(json.dumps(out))
print(f"wrote {path} ({path.stat().st_size} bytes) with faiss {faiss.__version__}")
