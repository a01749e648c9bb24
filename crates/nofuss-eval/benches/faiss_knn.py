#!/usr/bin/env python3
"""faiss reference for benches/knn.rs: writes SOP-shaped data and times exact kNN on it.

    python3 benches/faiss_knn.py OUT_DIR [N] [DIM] [CLASSES] [REPEATS]

Generates N seeded embeddings (class centres plus noise, L2-normalised, like a network's
output) with CLASSES classes, saves OUT_DIR/emb.npy (float32 [N, DIM]) and
OUT_DIR/labels.npy (int64 [N]), then times faiss IndexFlatL2.search of every point for its
1,000 nearest others (K+1 with the query itself removed) with all cores, and prints one JSON
line: median seconds over REPEATS, Recall@{1,10,100,1000} and peak resident memory.
With REPEATS = 0 it only writes the data.
"""
import json
import os
import pathlib
import resource
import sys
import time

import faiss
import numpy as np

out = pathlib.Path(sys.argv[1])
n = int(sys.argv[2]) if len(sys.argv) > 2 else 60502
dim = int(sys.argv[3]) if len(sys.argv) > 3 else 64
classes = int(sys.argv[4]) if len(sys.argv) > 4 else 11316
repeats = int(sys.argv[5]) if len(sys.argv) > 5 else 1
out.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(60502)
labels = rng.integers(0, classes, n)
centres = rng.normal(size=(classes, dim)).astype(np.float32)
x = centres[labels] + 0.9 * rng.normal(size=(n, dim)).astype(np.float32)
x /= np.linalg.norm(x, axis=1, keepdims=True)
x = np.ascontiguousarray(x, dtype=np.float32)
np.save(out / "emb.npy", x)
np.save(out / "labels.npy", labels.astype(np.int64))

if repeats == 0:  # only the data, for other benchmarks
    print(json.dumps({"n": n, "dim": dim, "classes": classes}))
    sys.exit(0)

ks = [1, 10, 100, 1000]
faiss.omp_set_num_threads(os.cpu_count())
index = faiss.IndexFlatL2(dim)
index.add(x)
times = []
for _ in range(repeats):
    t = time.perf_counter()
    _, nbrs = index.search(x, ks[-1] + 1)
    times.append(time.perf_counter() - t)
# Remove the query itself from its list (or the last entry if an exact duplicate pushed it out).
rows = []
for i in range(n):
    r = nbrs[i]
    hit = np.nonzero(r == i)[0]
    rows.append(np.delete(r, hit[0]) if len(hit) else r[:-1])
nbrs = np.stack(rows)
same = labels[nbrs] == labels[:, None]
recall = {f"recall@{k}": float(same[:, :k].any(axis=1).mean()) for k in ks}
times.sort()
print(json.dumps({"impl": f"faiss {faiss.__version__} IndexFlatL2", "threads": faiss.omp_get_max_threads(),
                  "n": n, "dim": dim, "seconds": round(times[len(times) // 2], 3), **recall,
                  "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))
