#!/usr/bin/env python3
"""k-means + NMI references for `benches/knn.rs ... kmeans`: faiss and scikit-learn.

    python3 benches/kmeans_ref.py EMB.npy LABELS.npy RESTARTS ITERS [faiss|sklearn|both]

Clusters the rows of EMB.npy (float32 [N, D]) into as many clusters as LABELS.npy has
classes, with RESTARTS runs of at most ITERS Lloyd iterations, and prints one JSON line per
implementation: seconds, NMI (scikit-learn's arithmetic normalisation), inertia and peak
resident memory of this process so far. faiss: `faiss.Kmeans` (random init, its own
defaults otherwise); scikit-learn: `KMeans(init="k-means++", algorithm="lloyd")`, the
same algorithm as nofuss-eval.
"""
import json
import os
import resource
import sys
import time

import numpy as np
from sklearn.metrics import normalized_mutual_info_score

x = np.load(sys.argv[1])
labels = np.load(sys.argv[2])
restarts, iters = int(sys.argv[3]), int(sys.argv[4])
which = sys.argv[5] if len(sys.argv) > 5 else "both"
k = len(np.unique(labels))
n, dim = x.shape


def peak_mib():
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def report(impl, threads, seconds, assignment, inertia):
    print(json.dumps({"impl": impl, "threads": threads, "n": n, "dim": dim, "k": k,
                      "restarts": restarts, "iters": iters, "seconds": round(seconds, 3),
                      "nmi": float(normalized_mutual_info_score(labels, assignment)),
                      "inertia": float(inertia), "peak_rss_mib": peak_mib()}), flush=True)


if which in ("faiss", "both"):
    import faiss
    faiss.omp_set_num_threads(os.cpu_count())
    t = time.perf_counter()
    km = faiss.Kmeans(dim, k, niter=iters, nredo=restarts, seed=1234, verbose=False)
    km.train(x)
    dist, assignment = km.index.search(x, 1)
    seconds = time.perf_counter() - t
    report(f"faiss {faiss.__version__} Kmeans", faiss.omp_get_max_threads(), seconds,
           assignment[:, 0], dist.sum())

if which in ("sklearn", "both"):
    import sklearn
    from sklearn.cluster import KMeans
    t = time.perf_counter()
    km = KMeans(n_clusters=k, init="k-means++", n_init=restarts, max_iter=iters, tol=0.0,
                algorithm="lloyd", random_state=0).fit(x)
    seconds = time.perf_counter() - t
    report(f"scikit-learn {sklearn.__version__} KMeans", os.cpu_count(), seconds,
           km.labels_, km.inertia_)
