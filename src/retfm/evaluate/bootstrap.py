"""Percentile bootstrap CIs, with every resample's metrics computed at once.

A resample is a vector of integer weights, one per row: how many times the resample drew that row's patient
(cluster bootstrap) or that row (image bootstrap). Each metric is then a weighted version of the same
formula, so one matrix product gives the confusion matrices of all resamples, and one sort per class plus
cumulative sums give all AUROCs and average precisions. A weighted metric with integer weights equals
scikit-learn's on the rows repeated that many times, which the tests check resample by resample; the point
estimates themselves come from scikit-learn (``metrics.point_metrics``).

Undefined cases follow ``point_metrics``: a resample where a metric divides by zero gives NaN and is skipped.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from scipy import sparse

from retfm.evaluate.metrics import Outcomes, ece

CONFIDENCE = 0.95
MAX_WEIGHTS = 2**21  # resamples x rows held at once: 16 MB of weights, about ten times that in temporaries


def resample_metrics(o: Outcomes, clusters: np.ndarray, n_boot: int,
                     rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Every metric on ``n_boot`` resamples, drawn and computed in blocks so memory stays bounded on large
    test sets."""
    parts = [bootstrap_metrics(o, weights) for weights in weight_blocks(n_boot, clusters, rng)]
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def weight_blocks(n_boot: int, clusters: np.ndarray, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """The weights of ``n_boot`` resamples (:func:`resample_weights`), in blocks of at most :data:`MAX_WEIGHTS`
    entries, so memory stays bounded on large test sets."""
    block = max(1, MAX_WEIGHTS // len(clusters))
    for start in range(0, n_boot, block):
        yield resample_weights(min(block, n_boot - start), clusters, rng)


def resample_weights(n_boot: int, clusters: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, n_rows) weights: draw as many clusters as there are, with replacement; each row gets its
    cluster's count. ``clusters`` labels each row's cluster (patient); unique labels make an image bootstrap."""
    _, cluster_of_row = np.unique(clusters, return_inverse=True)  # sorted: the same draws whatever the row order
    n_clusters = int(cluster_of_row.max()) + 1
    counts = rng.multinomial(n_clusters, np.full(n_clusters, 1 / n_clusters), size=n_boot)
    return counts[:, cluster_of_row].astype(float)


def percentile_ci(samples: np.ndarray) -> tuple[list[float] | None, int]:
    """95% percentile interval of the defined (finite) samples, and how many there were."""
    defined = samples[np.isfinite(samples)]
    if not defined.size:
        return None, 0
    tail = 100 * (1 - CONFIDENCE) / 2
    low, high = np.percentile(defined, [tail, 100 - tail])
    return [float(low), float(high)], int(defined.size)


def bootstrap_metrics(o: Outcomes, weights: np.ndarray) -> dict[str, np.ndarray]:
    """Every metric of ``metrics.METRICS`` for each row of ``weights``; NaN where undefined."""
    n_classes = len(o.classes)
    cells = _one_hot(o.y * n_classes + o.pred, n_classes * n_classes)
    confusion = (weights @ cells).reshape(-1, n_classes, n_classes)  # [resample, true, predicted]
    truth = confusion.sum(axis=2)
    called = confusion.sum(axis=1)
    hits = np.diagonal(confusion, axis1=1, axis2=2)
    total = truth.sum(axis=1)
    negatives = total[:, None] - truth
    out = {}
    with np.errstate(divide="ignore", invalid="ignore"):
        out["auroc"], out["aupr"] = _ranking_metrics(o, weights)
        out["accuracy"] = hits.sum(axis=1) / total
        out["balanced_accuracy"] = _mean_where(hits / truth, truth > 0)
        out["f1_macro"] = _mean_where(2 * hits / (truth + called), truth + called > 0)
        index = np.arange(n_classes)
        out["kappa"] = _kappa(confusion, truth, called, total, 1.0 - np.eye(n_classes))
        out["kappa_quadratic"] = (_kappa(confusion, truth, called, total, (index[:, None] - index) ** 2.0)
                                  if o.ordered else np.full(len(weights), np.nan))
        cov_true_pred = hits.sum(axis=1) * total - (truth * called).sum(axis=1)
        cov_pred = total ** 2 - (called ** 2).sum(axis=1)
        cov_true = total ** 2 - (truth ** 2).sum(axis=1)
        out["mcc"] = np.where(cov_pred * cov_true > 0, cov_true_pred / np.sqrt(cov_pred * cov_true), np.nan)
        true_negatives = negatives - called + hits
        if o.binary:
            out["sensitivity"] = hits[:, 1] / truth[:, 1]
            out["specificity"] = hits[:, 0] / truth[:, 0]
        else:
            out["sensitivity"] = _mean_where(hits / truth, truth > 0)
            out["specificity"] = _mean_where(true_negatives / negatives, negatives > 0)
    out["ece"] = ece(o, weights)
    return out


def _one_hot(index: np.ndarray, width: int) -> sparse.csr_array:
    """Rows x ``width``, a 1 at each row's ``index``: weights @ it sums the weights of each column's rows."""
    return sparse.csr_array((np.ones(len(index)), (np.arange(len(index)), index)), shape=(len(index), width))


def _mean_where(values: np.ndarray, defined: np.ndarray) -> np.ndarray:
    """Per resample, the mean over classes where the value is defined (NaN when it is nowhere)."""
    return np.where(defined, values, 0).sum(axis=1) / defined.sum(axis=1)


def _kappa(confusion, truth, called, total, cost) -> np.ndarray:
    """Cohen's kappa as scikit-learn computes it: 1 - observed cost / cost expected by chance."""
    expected = called[:, :, None] * truth[:, None, :] / total[:, None, None]
    observed = (cost * confusion).sum(axis=(1, 2))
    chance = (cost * expected).sum(axis=(1, 2))
    return np.where(chance > 0, 1 - observed / chance, np.nan)


def _ranking_metrics(o: Outcomes, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUROC and average precision, binary or macro one-vs-rest; undefined when a class has no labels."""
    columns = [1] if o.binary else range(len(o.classes))
    results = [_binary_ranking(o.probs[:, k], o.y == k, weights) for k in columns]
    auroc = np.mean([r[0] for r in results], axis=0)
    aupr = np.mean([r[1] for r in results], axis=0)
    return auroc, aupr


def _binary_ranking(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted AUROC (Mann-Whitney, ties count half, equal to scikit-learn's trapezoid) and average precision
    (sum over distinct thresholds of recall gained times precision), for every resample at once."""
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    last_of_tie = np.flatnonzero(np.r_[sorted_scores[1:] != sorted_scores[:-1], True])
    w = weights[:, order]
    pos = np.cumsum(w * positive[order], axis=1)[:, last_of_tie]  # positive weight at or below each score
    seen = np.cumsum(w, axis=1)[:, last_of_tie]
    neg = seen - pos
    pos_tied = np.diff(pos, axis=1, prepend=0)
    neg_tied = np.diff(neg, axis=1, prepend=0)
    n_pos, n_neg, n_all = pos[:, -1], neg[:, -1], seen[:, -1]
    auroc = (pos_tied * (neg - neg_tied / 2)).sum(axis=1) / (n_pos * n_neg)
    pos_above = n_pos[:, None] - pos + pos_tied  # at or above each distinct score: called positive there
    all_above = n_all[:, None] - seen + pos_tied + neg_tied
    precision = np.divide(pos_above, all_above, out=np.zeros_like(pos_above), where=all_above > 0)
    aupr = (pos_tied * precision).sum(axis=1) / n_pos
    return auroc, aupr
