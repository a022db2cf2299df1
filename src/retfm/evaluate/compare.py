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
from retfm.evaluate.bootstrap import CONFIDENCE, bootstrap_metrics, percentile_ci, weight_blocks
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
    parts = [(bootstrap_metrics(a, weights), bootstrap_metrics(b, weights))
             for weights in weight_blocks(n_boot, clusters, np.random.default_rng(seed))]
    point_a, _ = point_metrics(a)
    point_b, _ = point_metrics(b)
    results = {}
    for name in metrics:
        ci, p, used = _interval(np.concatenate([pa[name] - pb[name] for pa, pb in parts]))
        if point_a[name] is None or point_b[name] is None or not used:
            results[name] = PairedDifference(name, point_a[name], point_b[name], None, None, None, 0)
            continue
        results[name] = PairedDifference(name, point_a[name], point_b[name], point_a[name] - point_b[name], ci, p,
                                         used)
    return results


def _interval(differences: np.ndarray) -> tuple[list[float] | None, float | None, int]:
    """The 95% percentile CI of the resampled differences that are defined (finite), their two-sided p-value (twice
    the smaller share on either side of zero, counted as (1 + k) / (1 + resamples) so it is never exactly 0), and
    how many were defined."""
    differences = differences[np.isfinite(differences)]
    ci, used = percentile_ci(differences)
    if not used:
        return None, None, 0
    tail = min((differences <= 0).sum(), (differences >= 0).sum())
    return ci, float(min(1.0, 2 * (1 + tail) / (1 + used))), used


def _read_aligned(paths: list[Path], label: str, sites: list[str] | None) -> tuple[list[Outcomes], np.ndarray]:
    """The outcomes of several ``predictions.parquet`` files on the same test images, rows in the first file's
    order, and each row's bootstrap cluster (patient). ``sites``: these sites' images only."""
    tables, infos = zip(*(read_predictions(path) for path in paths))
    tables = list(tables)
    if sites is not None:
        for path, table in zip(paths, tables):
            if "site" not in table:
                raise RetfmError(f"{path}: has no site column to choose the sites {sites} by")
        tables = [table[table["site"].astype(str).isin(sites)].reset_index(drop=True) for table in tables]
        if tables[0].empty:
            raise RetfmError(f"{paths[0]}: holds no test image of the sites {sites}")
    first = tables[0]
    for path, table, info in zip(paths[1:], tables[1:], infos[1:]):
        if (info["classes"], info["task"]) != (infos[0]["classes"], infos[0]["task"]):
            raise RetfmError(f"{path}: classes or task differ from {paths[0]}; they do not predict the same label")
        if set(table["image_id"]) != set(first["image_id"]) or len(table) != len(first):
            raise RetfmError(f"{path}: holds other test images than {paths[0]}; a paired comparison needs the "
                             "same ones")
    tables = [first] + [table.set_index("image_id").loc[first["image_id"]].reset_index() for table in tables[1:]]
    results = [outcomes(table, label, info["classes"], info["task"], info["threshold"])
               for table, info in zip(tables, infos)]
    return results, bootstrap_clusters(first.loc[results[0].kept])


def compare_predictions(path_a: str | Path, path_b: str | Path, label: str, n_boot: int = 1000,
                        seed: int = 0, sites: list[str] | None = None) -> dict:
    """Compare two ``predictions.parquet`` files on their common test images: AUROC of each, the difference
    a - b with its paired-bootstrap 95% CI and p-value, and DeLong's p-value when the task is binary.
    The files must hold the same images with the same labels. ``sites``: compare on these sites' images only."""
    (a, b), clusters = _read_aligned([Path(path_a), Path(path_b)], label, sites)
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


def compare_repeated(paths_a: list[str | Path], paths_b: list[str | Path], label: str, n_boot: int = 2000,
                     seed: int = 0) -> dict:
    """Is recipe A better than B when each was run several times (seeds)? The mean AUROC of A's runs minus the
    mean of B's, all scored on the same test images, with a two-level bootstrap: each resample draws patients
    once for every run (paired, as :func:`paired_bootstrap`) and, independently, draws each side's runs with
    replacement, so the interval holds the run-to-run spread as well as the test set's. With one run a side it
    is :func:`compare_predictions`' paired bootstrap, resample for resample. Few runs (say under 5) make the
    run-level draw coarse; report every run beside it."""
    paths = [Path(p) for p in [*paths_a, *paths_b]]
    if not paths_a or not paths_b:
        raise RetfmError("compare_repeated: each side needs at least one predictions file")
    runs, clusters = _read_aligned(paths, label, None)
    point = np.array([point_metrics(o)[0]["auroc"] for o in runs], dtype=float)
    if not np.isfinite(point).all():
        raise RetfmError(f"{paths[0]}: AUROC is undefined on these test images (one class only)")
    run_rng = np.random.default_rng([seed, 1])  # the run draws leave the patient draws as paired_bootstrap's
    k_a = len(paths_a)
    differences = []
    for weights in weight_blocks(n_boot, clusters, np.random.default_rng(seed)):
        per_run = np.stack([bootstrap_metrics(o, weights)["auroc"] for o in runs])  # [run, resample]
        side_a = per_run[:k_a][run_rng.integers(0, k_a, (k_a, len(weights))), np.arange(len(weights))]
        side_b = per_run[k_a:][run_rng.integers(0, len(paths_b), (len(paths_b), len(weights))),
                               np.arange(len(weights))]
        differences.append(side_a.mean(axis=0) - side_b.mean(axis=0))
    ci, p, used = _interval(np.concatenate(differences))
    return {"metric": "auroc", "n": len(runs[0].y), "runs_a": point[:k_a].round(6).tolist(),
            "runs_b": point[k_a:].round(6).tolist(), "value_a": float(point[:k_a].mean()),
            "value_b": float(point[k_a:].mean()), "difference": float(point[:k_a].mean() - point[k_a:].mean()),
            "ci_low": ci[0] if ci else None, "ci_high": ci[1] if ci else None,
            "p_bootstrap": p, "n_boot": used,
            "confidence": CONFIDENCE}
