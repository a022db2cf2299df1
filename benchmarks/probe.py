"""Probe fit time: ``retfm probe``'s logistic head against RETFound-Green's protocol, in the same run.

Data: 20,000 training embeddings of 384 dimensions, 5 classes (Gaussian classes seen through a random
correlated projection with decaying spectrum, as real embeddings are correlated), 2,000 validation and 4,000
test rows. Reference: scikit-learn StandardScaler + LogisticRegression(max_iter=20000), C=1, fitted once.
retfm: the whole logistic head fit, i.e. 7 values of C fitted warm-started, C chosen by validation log-loss;
and, like for like, one fit at C=1. Both are warmed up first (imports, thread pools).

    python benchmarks/probe.py [--train 20000] [--dim 384] [--classes 5]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from retfm.adapt.probe import LogisticHead


def make_embeddings(n: int, dim: int, classes: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    projection = q * (1 / np.sqrt(np.arange(1, dim + 1)))[None, :] @ q.T
    means = rng.normal(size=(classes, dim)) * 0.12
    y = rng.integers(0, classes, n)
    x = (rng.normal(size=(n, dim)) + means[y]) @ projection + rng.normal(size=dim)
    return x.astype(np.float32), y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=20000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--classes", type=int, default=5)
    args = parser.parse_args()
    x, y = make_embeddings(args.train + 6000, args.dim, args.classes)
    train, val, test = slice(0, args.train), slice(args.train, args.train + 2000), slice(args.train + 2000, None)

    # Warm up both (imports, thread pools: torch.optim imports torch._dynamo, ~2 s, once per process).
    LogisticHead().fit(x[:200], y[:200], x[200:300], y[200:300], args.classes)
    make_pipeline(StandardScaler(), LogisticRegression(max_iter=100)).fit(x[:200], y[:200])

    start = time.perf_counter()
    reference = make_pipeline(StandardScaler(), LogisticRegression(max_iter=20000)).fit(x[train], y[train])
    reference_s = time.perf_counter() - start
    start = time.perf_counter()
    head = LogisticHead()
    choice = head.fit(x[train], y[train], x[val], y[val], args.classes)
    retfm_s = time.perf_counter() - start
    start = time.perf_counter()
    fixed = LogisticHead(grid=(1.0,))
    fixed.fit(x[train], y[train], x[val], y[val], args.classes)
    fixed_s = time.perf_counter() - start

    def auroc(probabilities):
        return roc_auc_score(y[test], probabilities, multi_class="ovr")

    results = {
        "train_rows": args.train, "dim": args.dim, "classes": args.classes, "cores": os.cpu_count(),
        "reference_sklearn_C1": {"seconds": round(reference_s, 2), "iterations": int(reference[-1].n_iter_[0]),
                                 "test_auroc": round(auroc(reference.predict_proba(x[test])), 4)},
        "retfm_logreg_7C": {"seconds": round(retfm_s, 2), "chosen_C": choice["C"],
                            "test_auroc": round(auroc(head.predict_proba(x[test])), 4)},
    }
    results["retfm_logreg_C1_like_for_like"] = {"seconds": round(fixed_s, 2),
                                                "test_auroc": round(auroc(fixed.predict_proba(x[test])), 4),
                                                "speedup_vs_reference": round(reference_s / fixed_s, 2)}
    results["speedup_vs_reference"] = round(reference_s / retfm_s, 2)
    results["auroc_difference"] = round(results["retfm_logreg_7C"]["test_auroc"]
                                        - results["reference_sklearn_C1"]["test_auroc"], 4)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
