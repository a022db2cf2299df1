"""``retfm probe``: a light head on frozen embeddings (RETFound-Green's protocol), then ``retfm evaluate``.

Heads:

- ``logreg``: standardise (train mean and std), then multinomial logistic regression with an L2 penalty. The
  objective is scikit-learn's (``LogisticRegression``: mean log-loss + ||W||^2 / (2 C n), intercept not
  penalised), minimised with torch's L-BFGS in float32 — the same solution about ten times faster than
  scikit-learn's float64 solver on 20,000 x 384 embeddings, thanks to a change of coordinates that evens out
  the curvature (``fit_logistic``; ``benchmarks/probe.py``). C is chosen on the
  validation split by log-loss from a grid, each fit warm-started from the previous one.
- ``knn``: cosine k-nearest neighbours (scikit-learn), distance-weighted votes, k chosen on the validation split.

The head is fitted on ``split=train``; ``split=val`` chooses C (or k) and, for a binary label, the decision
threshold (Youden's J); without validation rows, 15% of the training patients are held out for the choice.
Test rows are predicted and evaluated. Rows with a null label are excluded and counted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import scipy.linalg
import torch
from sklearn.metrics import log_loss
from sklearn.model_selection import GroupShuffleSplit
from sklearn.neighbors import KNeighborsClassifier
from sklearn.utils.class_weight import compute_class_weight

from retfm.adapt.config import ProbeConfig
from retfm.adapt.embeddings import read_embeddings
from retfm.adapt.predictions import resolve_task, write_results, youden_threshold
from retfm.config import save_config
from retfm.errors import RetfmError
from retfm.hashing import file_sha256

C_GRID = tuple(np.logspace(-4, 2, 7))
K_GRID = (5, 10, 20, 50)


def probe(embeddings: Path, out: Path, config: ProbeConfig) -> dict:
    """Fit, choose, predict, evaluate; writes predictions.parquet, metrics.json, report.html, probe_config.yaml."""
    table, vectors, source_meta = read_embeddings(embeddings)
    label = config.label
    if label not in table:
        raise RetfmError(f"{embeddings}: no label column {label!r} (columns: {', '.join(table.columns)})")
    if "split" not in table:
        raise RetfmError(f"{embeddings}: no split column; embed a manifest with train/val/test splits")
    known = table[label].notna().to_numpy()
    excluded = int((~known).sum())
    table, vectors = table[known].reset_index(drop=True), vectors[known]
    classes = sorted(table[label].unique().tolist())
    if len(classes) < 2:
        raise RetfmError(f"{embeddings}: label {label!r} has fewer than two classes ({classes})")
    y = table[label].map({c: i for i, c in enumerate(classes)}).to_numpy()
    split = table["split"].astype(str).to_numpy()
    train, val, test = (split == "train"), (split == "val"), (split == "test")
    if not train.any() or not test.any():
        raise RetfmError(f"{embeddings}: needs rows with split=train and split=test for {label!r}")
    if not val.any() or len(np.unique(y[val])) < 2:
        train, val = hold_out(table, train, y, config.seed)
    task = resolve_task(config.task, label, classes)

    weights = None
    if config.class_weight == "balanced":
        if config.head == "knn":
            raise RetfmError("--class-weight balanced applies to the logreg head only")
        per_class = compute_class_weight("balanced", classes=np.arange(len(classes)), y=y[train]) \
            if len(np.unique(y[train])) == len(classes) else None
        if per_class is None:
            raise RetfmError(f"{embeddings}: a class of {label!r} has no training rows; cannot balance")
        weights = per_class[y]
    head = LogisticHead(config.seed) if config.head == "logreg" else KnnHead()
    choice = head.fit(vectors[train], y[train], vectors[val], y[val], len(classes),
                      None if weights is None else weights[train], None if weights is None else weights[val])
    threshold = youden_threshold(y[val], head.predict_proba(vectors[val])[:, 1]) if task == "binary" else None

    meta = {"embeddings_sha256": file_sha256(embeddings), "model": source_meta.get("retfm.model"),
            "weights_sha256": source_meta.get("retfm.weights_sha256"), "head": config.head, **choice,
            "train_rows": int(train.sum()), "selection_rows": int(val.sum()), "seed": config.seed,
            "config": config.model_dump(mode="json")}
    result = write_results(out, table[test], label, classes, head.predict_proba(vectors[test]), task, threshold,
                           meta, config.by, config.bootstrap, config.seed, excluded)
    save_config(config, out / "probe_config.yaml")
    return result


class LogisticHead:
    """Standardise + multinomial L2 logistic regression; C chosen by validation log-loss (module docstring)."""

    def __init__(self, seed: int = 0, grid: tuple[float, ...] = C_GRID):
        self.seed, self.grid = seed, grid

    def fit(self, x, y, x_val, y_val, n_classes, weight=None, weight_val=None) -> dict:
        # StandardScaler's statistics (population std; a constant feature keeps scale 1), computed in one pass:
        # scikit-learn's incremental version costs as much as the whole fit here.
        self.mean = x.mean(axis=0, dtype=np.float64)
        std = x.std(axis=0, dtype=np.float64)
        self.scale = np.where(std > 10 * np.finfo(np.float64).eps, std, 1.0)
        features, val_features = self._standardise(x), self._standardise(x_val)
        target = torch.from_numpy(y).long()
        sample_weight = None if weight is None else torch.from_numpy(np.asarray(weight, np.float32))
        basis = eigenbasis(features, torch.ones(len(features)) if sample_weight is None else sample_weight)
        best, parameters, losses = None, None, {}
        for c in self.grid:  # strong to weak penalties; each fit starts from the previous solution
            parameters = fit_logistic(features, target, n_classes, c, sample_weight, init=parameters, basis=basis)
            losses[c] = log_loss(y_val, _softmax(val_features, parameters), labels=np.arange(n_classes),
                                 sample_weight=weight_val)
            if best is None or losses[c] < losses[best[0]] - 1e-9:
                best = (c, parameters)
        self.c, self.parameters = best
        return {"C": float(self.c), "selection_log_loss": {f"{c:.0e}": round(float(v), 5) for c, v in losses.items()}}

    def predict_proba(self, x) -> np.ndarray:
        return _softmax(self._standardise(x), self.parameters)

    def _standardise(self, x) -> torch.Tensor:
        return torch.from_numpy(((x - self.mean) / self.scale).astype(np.float32))


def fit_logistic(x: torch.Tensor, y: torch.Tensor, n_classes: int, c: float, sample_weight: torch.Tensor | None = None,
                 init: torch.Tensor | None = None, tol: float = 3e-5, max_iter: int = 1000,
                 basis: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Minimise scikit-learn's multinomial objective: sum w_i CE_i / sum w + ||W||^2 / (2 C sum w).

    Returns a (D + 1) x K matrix, the last row the intercepts. L-BFGS runs in coordinates where the objective's
    curvature is about even: W = V diag(h^-1/2) U, with X^T X / n = V diag(lam) V^T (:func:`eigenbasis`) and
    h = lam / 4 + 1 / (C n), a quarter bounding the softmax's curvature. On correlated embeddings that takes ~10
    iterations instead of ~100; it is the same problem, so the same solution. ``tol`` bounds the largest entry of
    the gradient in those coordinates.
    """
    weight = torch.ones(len(x)) if sample_weight is None else sample_weight
    total = float(weight.sum())
    eigenvalues, vectors, rotated = eigenbasis(x, weight) if basis is None else basis
    scale = (eigenvalues.clamp_min(0) / 4 + 1 / (c * total)).rsqrt()[:, None]
    design = torch.cat([rotated, torch.ones(len(x), 1)], dim=1)
    if init is None:
        start = torch.zeros(design.shape[1], n_classes)
    else:
        start = torch.cat([(vectors.T @ init[:-1]) / scale, init[-1:]])
    full_scale = torch.cat([scale, torch.ones(1, 1)])
    parameters = start.requires_grad_(True)
    optimiser = torch.optim.LBFGS([parameters], lr=1, max_iter=max_iter, tolerance_grad=tol, tolerance_change=1e-12,
                                  history_size=20, line_search_fn="strong_wolfe")

    def objective():
        optimiser.zero_grad()
        losses = torch.nn.functional.cross_entropy(design @ (parameters * full_scale), y, reduction="none")
        loss = (weight * losses).sum() / total + ((parameters[:-1] * scale) ** 2).sum() / (2 * c * total)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimiser.step(objective)
    solution = parameters.detach() * full_scale
    return torch.cat([vectors @ solution[:-1], solution[-1:]])


def eigenbasis(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eigenvalues and eigenvectors of the (weighted) second-moment matrix of ``x``, and ``x`` rotated into them;
    computed once per head and shared by every C. In float64: with more features than rows (1280-wide CNN
    embeddings, a few hundred images) most eigenvalues are near zero, where float32 LAPACK can fail to converge.
    By LAPACK's relatively robust representations (``evr``, SciPy): the divide-and-conquer driver that
    ``torch.linalg.eigh`` uses failed to converge on a model whose embeddings kept 23 live features of 1280 among
    exact zeros (a collapsed distillation), a matrix that ``evr`` decomposes."""
    moments = ((x * weight[:, None]).T @ x / weight.sum()).double()
    if not torch.isfinite(moments).all():
        raise RetfmError("probe: the embeddings hold values that are not finite numbers (a diverged model?)")
    eigenvalues, vectors = scipy.linalg.eigh(moments.numpy(), driver="evr")
    vectors = torch.from_numpy(vectors).float()
    return torch.from_numpy(eigenvalues).float(), vectors, x @ vectors


def _softmax(features: torch.Tensor, parameters: torch.Tensor) -> np.ndarray:
    logits = features @ parameters[:-1] + parameters[-1]
    return torch.softmax(logits.double(), dim=1).numpy()


class KnnHead:
    """Cosine k-nearest neighbours with distance-weighted votes; k chosen by validation log-loss."""

    def fit(self, x, y, x_val, y_val, n_classes, weight=None, weight_val=None) -> dict:
        self.n_classes = n_classes
        losses = {}
        for k in [k for k in K_GRID if k <= len(x)] or [len(x)]:
            model = KNeighborsClassifier(n_neighbors=k, metric="cosine", weights="distance").fit(x, y)
            losses[k] = log_loss(y_val, self._expand(model, x_val), labels=np.arange(n_classes))
        self.k = min(losses, key=losses.get)
        self.model = KNeighborsClassifier(n_neighbors=self.k, metric="cosine", weights="distance").fit(x, y)
        return {"k": int(self.k), "selection_log_loss": {str(k): round(float(v), 5) for k, v in losses.items()}}

    def predict_proba(self, x) -> np.ndarray:
        return self._expand(self.model, x)

    def _expand(self, model, x) -> np.ndarray:
        """Probabilities over all classes, including any absent from the training rows."""
        probabilities = np.zeros((len(x), self.n_classes))
        probabilities[:, model.classes_] = model.predict_proba(x)
        return probabilities


# ---- helpers ------------------------------------------------------------------------------------------------------

def hold_out(table: pd.DataFrame, train: np.ndarray, y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """15% of the training patients (or images) for choosing C / k and the threshold, when there is no usable
    validation split."""
    index = np.flatnonzero(train)
    groups = (table["patient_id"].fillna(table["image_id"]) if "patient_id" in table else table["image_id"])
    fit, chosen = next(GroupShuffleSplit(1, test_size=0.15, random_state=seed).split(index, y[index],
                                                                                      groups.to_numpy()[index]))
    new_train, new_val = np.zeros_like(train), np.zeros_like(train)
    new_train[index[fit]], new_val[index[chosen]] = True, True
    return new_train, new_val
