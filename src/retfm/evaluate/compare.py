"""Paired comparisons of two models scored on the same test images: is A's AUROC really higher than B's?

Two tests, both paired (the same images, so their errors are correlated and a paired test is far more
sensitive than comparing two confidence intervals):

- **DeLong's test** (DeLong, DeLong & Clarke-Pearson 1988) for binary AUROC, computed with the fast midrank
  algorithm of Sun & Xu (2014): the structural components (placement values) of every positive and negative
  come from three rankings, and their covariance across the two models gives the variance of the AUROC
  difference. For multi-class tasks (macro one-vs-rest AUROC) DeLong's variance of the macro average would
  need the covariance between classes, which the binary test does not give; retfm reports no DeLong p there
  and relies on the paired bootstrap.
- **Paired bootstrap**: resample patients (images when there are no patient ids) once per resample and score
  both models on that same resample; the differences give a 95% percentile CI and a two-sided p-value.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.stats import norm, rankdata

from retfm.errors import RetfmError
from retfm.evaluate import bootstrap_clusters, read_predictions
from retfm.evaluate.bootstrap import CONFIDENCE, MAX_WEIGHTS, bootstrap_metrics, percentile_ci, resample_weights
from retfm.evaluate.metrics import Outcomes, outcomes, point_metrics


@dataclass(frozen=True)
class DelongResult:
    auc_a: float
    auc_b: float
    difference: float  # auc_a - auc_b
    se: float  # standard error of the difference
    p: float  # two-sided


def delong_covariance(positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUROCs of each row of ``scores`` (k models x n images) against the boolean ``positive`` and their k x k
    DeLong covariance, by Sun & Xu's midrank algorithm (ties count half, as in scikit-learn)."""
    positive = np.asarray(positive, dtype=bool)
    scores = np.atleast_2d(np.asarray(scores, dtype=float))
    m, n = int(positive.sum()), int((~positive).sum())
    if m < 2 or n < 2:
        raise ValueError(f"DeLong's variance needs at least two positives and two negatives (got {m} and {n})")
    x, y = scores[:, positive], scores[:, ~positive]
    rank_x = rankdata(x, axis=1)  # midranks among the positives
    rank_y = rankdata(y, axis=1)  # among the negatives
    rank_all = rankdata(np.concatenate([x, y], axis=1), axis=1)  # among all
    auc = (rank_all[:, :m].sum(axis=1) - m * (m + 1) / 2) / (m * n)
    # placement values: the share of negatives a positive outranks, and of positives a negative is outranked by
    v10 = (rank_all[:, :m] - rank_x) / n
    v01 = 1 - (rank_all[:, m:] - rank_y) / m
    covariance = np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n
    return auc, covariance


def delong_test(positive: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray) -> DelongResult:
    """DeLong's test of AUROC(a) = AUROC(b) on the same images; two-sided normal p-value."""
    auc, covariance = delong_covariance(positive, np.vstack([scores_a, scores_b]))
    difference = float(auc[0] - auc[1])
    variance = float(covariance[0, 0] + covariance[1, 1] - 2 * covariance[0, 1])
    se = float(np.sqrt(max(variance, 0.0)))
    if se == 0:  # identical rankings: no evidence of a difference (or, with a difference, no variance left)
        p = 1.0 if difference == 0 else 0.0
    else:
        p = float(2 * norm.sf(abs(difference) / se))
    return DelongResult(float(auc[0]), float(auc[1]), difference, se, p)


@dataclass(frozen=True)
class PairedDifference:
    metric: str
    value_a: float | None
    value_b: float | None
    difference: float | None  # value_a - value_b
    ci: list[float] | None  # 95% percentile CI of the difference
    p: float | None  # two-sided bootstrap p-value
    n_boot: int  # resamples where both values were defined


def paired_bootstrap(a: Outcomes, b: Outcomes, clusters: np.ndarray, n_boot: int, seed: int,
                     metrics: tuple[str, ...] = ("auroc",)) -> dict[str, PairedDifference]:
    """Differences a - b of ``metrics`` with 95% CIs from resampling patients (``clusters``) once per resample,
    both models scored on the same resample. The p-value is two-sided: twice the smaller share of resampled
    differences on either side of zero, counted as (1 + k) / (1 + resamples) so it is never exactly 0."""
    if len(a.y) != len(b.y) or not np.array_equal(a.y, b.y):
        raise RetfmError("paired bootstrap: the two models must be scored on the same images with the same labels")
    rng = np.random.default_rng(seed)
    block = max(1, MAX_WEIGHTS // len(a.y))
    parts = []
    for start in range(0, n_boot, block):
        weights = resample_weights(min(block, n_boot - start), clusters, rng)
        parts.append((bootstrap_metrics(a, weights), bootstrap_metrics(b, weights)))
    point_a, _ = point_metrics(a)
    point_b, _ = point_metrics(b)
    results = {}
    for name in metrics:
        differences = np.concatenate([pa[name] - pb[name] for pa, pb in parts])
        differences = differences[np.isfinite(differences)]
        defined = point_a[name] is not None and point_b[name] is not None
        if not defined or not differences.size:
            results[name] = PairedDifference(name, point_a[name], point_b[name], None, None, None, 0)
            continue
        ci, used = percentile_ci(differences)
        tail = min((differences <= 0).sum(), (differences >= 0).sum())
        p = min(1.0, 2 * (1 + tail) / (1 + used))
        results[name] = PairedDifference(name, point_a[name], point_b[name], point_a[name] - point_b[name], ci,
                                         float(p), used)
    return results


def compare_predictions(path_a: str | Path, path_b: str | Path, label: str, n_boot: int = 1000,
                        seed: int = 0, sites: list[str] | None = None) -> dict:
    """Compare two ``predictions.parquet`` files on their common test images: AUROC of each, the difference
    a - b with its paired-bootstrap 95% CI and p-value, and DeLong's p-value when the task is binary.
    The files must hold the same images with the same labels. ``sites``: compare on these sites' images only."""
    table_a, info_a = read_predictions(path_a)
    table_b, info_b = read_predictions(path_b)
    if sites is not None:
        for path, table in ((path_a, table_a), (path_b, table_b)):
            if "site" not in table:
                raise RetfmError(f"{path}: has no site column to choose the sites {sites} by")
        table_a = table_a[table_a["site"].astype(str).isin(sites)].reset_index(drop=True)
        table_b = table_b[table_b["site"].astype(str).isin(sites)].reset_index(drop=True)
        if table_a.empty:
            raise RetfmError(f"{path_a}: holds no test image of the sites {sites}")
    if (info_a["classes"], info_a["task"]) != (info_b["classes"], info_b["task"]):
        raise RetfmError(f"{path_b}: classes or task differ from {path_a}; they do not predict the same label")
    if set(table_a["image_id"]) != set(table_b["image_id"]) or len(table_a) != len(table_b):
        raise RetfmError(f"{path_b}: holds other test images than {path_a}; a paired comparison needs the same ones")
    table_b = table_b.set_index("image_id").loc[table_a["image_id"]].reset_index()
    a = outcomes(table_a, label, info_a["classes"], info_a["task"], info_a["threshold"])
    b = outcomes(table_b, label, info_b["classes"], info_b["task"], info_b["threshold"])
    clusters = bootstrap_clusters(table_a.loc[a.kept])
    auroc = paired_bootstrap(a, b, clusters, n_boot, seed)["auroc"]
    delong = None
    positives = int((a.y == 1).sum())
    if a.binary and auroc.difference is not None and min(positives, len(a.y) - positives) >= 2:
        delong = delong_test(a.y == 1, a.probs[:, 1], b.probs[:, 1])
    return {
        "metric": "auroc", "n": len(a.y), "value_a": auroc.value_a, "value_b": auroc.value_b,
        "difference": auroc.difference, "ci_low": auroc.ci[0] if auroc.ci else None,
        "ci_high": auroc.ci[1] if auroc.ci else None, "p_bootstrap": auroc.p, "n_boot": auroc.n_boot,
        "p_delong": delong.p if delong else None, "se_delong": delong.se if delong else None,
        "confidence": CONFIDENCE,
    }

