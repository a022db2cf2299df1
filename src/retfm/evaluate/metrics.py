"""Classification metrics on a predictions table: scikit-learn's values, and when each one is undefined.

A metric whose formula divides by zero on the rows at hand (AUROC with one class present, MCC when every
prediction is one class) is ``None`` with a reason, never a substituted number: scikit-learn returns 0 for
such an MCC, retfm returns ``None`` and says why. Everywhere else the value is scikit-learn's.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import (accuracy_score, average_precision_score, balanced_accuracy_score, cohen_kappa_score,
                             f1_score, matthews_corrcoef, recall_score, roc_auc_score)
from sklearn.preprocessing import label_binarize

from retfm.errors import RetfmError

TASKS = ("binary", "multiclass", "ordinal")
METRICS = ("auroc", "aupr", "accuracy", "balanced_accuracy", "f1_macro", "kappa", "kappa_quadratic", "mcc",
           "sensitivity", "specificity", "ece")
LOWER_IS_BETTER = frozenset({"ece"})
ECE_BINS = 15
PROBABILITY_TOLERANCE = 1e-5  # scikit-learn's own check that multi-class scores sum to 1


@dataclass
class Outcomes:
    """The labelled rows of a predictions table as arrays. Class codes index ``classes``."""

    y: np.ndarray  # true class codes
    pred: np.ndarray  # predicted class codes
    probs: np.ndarray  # (n, n_classes), columns in class order
    classes: list[str]
    binary: bool  # the positive class is classes[1]
    ordered: bool  # class order is meaningful: quadratic-weighted kappa is defined
    kept: np.ndarray  # the table rows with a label, which these are
    notes: list[str] = field(default_factory=list)  # about the table as read

    def subset(self, rows: np.ndarray) -> Outcomes:
        """The same outcomes on fewer (or repeated) rows; ``kept`` and ``notes`` still describe the table."""
        return replace(self, y=self.y[rows], pred=self.pred[rows], probs=self.probs[rows])


def outcomes(table: pd.DataFrame, label: str, classes: list, task: str, threshold: float = 0.5) -> Outcomes:
    """Validate a predictions table against its classes and turn it into arrays; rows without a label are left
    out. A binary prediction is ``prob_<classes[1]> >= threshold``; other tasks use the ``prediction`` column."""
    classes = [str(c) for c in classes]
    if task not in TASKS:
        raise RetfmError(f"task {task!r} is not one of {', '.join(TASKS)}")
    if len(classes) < 2 or len(set(classes)) != len(classes):
        raise RetfmError(f"classes {classes} must be at least two distinct values")
    if (task == "binary") != (len(classes) == 2):
        raise RetfmError(f"task {task!r} does not fit {len(classes)} classes {classes}: two classes are a binary "
                         f"task, three or more multiclass or ordinal")
    if label not in table:
        raise RetfmError(f"no label column {label!r} (columns: {', '.join(map(str, table.columns))})")
    prob_columns = [f"prob_{c}" for c in classes]
    missing = [c for c in prob_columns if c not in table]
    if missing:
        raise RetfmError(f"no probability column {missing[0]!r} for class {missing[0][5:]!r}")
    labels = as_strings(table[label])
    kept = labels.notna().to_numpy()
    if not kept.any():
        raise RetfmError(f"label column {label!r} has no values")
    index = {c: k for k, c in enumerate(classes)}
    y = class_codes(labels[kept], index, f"label column {label!r}")
    probs = table.loc[kept, prob_columns].to_numpy(dtype=float, na_value=np.nan)
    sums = probs.sum(axis=1)
    bad = ~np.isfinite(sums) | (probs < 0).any(axis=1) | (np.abs(sums - 1) > PROBABILITY_TOLERANCE)
    if bad.any():
        first = int(np.argmax(bad))
        raise RetfmError(f"{int(bad.sum())} row(s) have class probabilities that are missing, negative or do not "
                         f"sum to 1 (first: row {int(np.flatnonzero(kept)[first])}, sum {sums[first]:.6g})")
    notes = []
    if task == "binary":
        pred = (probs[:, 1] >= threshold).astype(int)
        if "prediction" in table:
            differ = int((as_strings(table.loc[kept, "prediction"]) != np.asarray(classes)[pred]).fillna(True).sum())
            if differ:
                notes.append(f"{differ} row(s) have a `prediction` other than prob_{classes[1]} >= {threshold}; "
                             f"metrics use the threshold")
    else:
        if "prediction" not in table:
            raise RetfmError("no `prediction` column (needed for multi-class and ordinal tasks)")
        pred = class_codes(as_strings(table.loc[kept, "prediction"]), index, "column 'prediction'")
    ordered = task != "multiclass" or _ascending_integers(classes)
    return Outcomes(y, pred, probs, classes, task == "binary", ordered, kept, notes)


def as_strings(values: pd.Series) -> pd.Series:
    """Values as the strings used in ``prob_<class>`` names. Whole floats (integers read back with nulls) lose
    their ``.0``; nulls stay null."""
    if pd.api.types.is_float_dtype(values):
        present = values.dropna()
        if (present == np.round(present)).all():
            values = values.astype("Int64")
    return values.astype("string")


def class_codes(values: pd.Series, index: dict[str, int], what: str) -> np.ndarray:
    """Class indices of ``values`` (strings, see :func:`as_strings`); a null or a value not in ``index`` is an
    error naming ``what``."""
    if values.isna().any():
        raise RetfmError(f"{what} has null values")
    unknown = sorted(set(values) - set(index))
    if unknown:
        raise RetfmError(f"{what} has value {unknown[0]!r}, which is not among the classes {list(index)}")
    return values.map(index).to_numpy(dtype=int)


def _ascending_integers(classes: list[str]) -> bool:
    try:
        numbers = [int(c) for c in classes]
    except ValueError:
        return False
    return numbers == sorted(numbers)


def point_metrics(o: Outcomes) -> tuple[dict[str, float | None], dict[str, str]]:
    """Every metric in METRICS from scikit-learn (ECE from ``ece``), and why each ``None`` is undefined."""
    values: dict[str, float | None] = {}
    why: dict[str, str] = {}
    n_classes = len(o.classes)
    labels = np.arange(n_classes)
    absent = [o.classes[k] for k in labels if not (o.y == k).any()]
    no_labels = f"no labels of class {absent[0]!r}" if absent else ""

    def undefined(name: str, reason: str) -> None:
        values[name] = None
        why[name] = reason

    with warnings.catch_warnings():
        # Undefined cases are caught below by their own test; what scikit-learn warns about beyond them (a
        # predicted class absent from the labels, a single class in a group) does not change the value.
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        warnings.filterwarnings("ignore", "y_pred contains classes not in y_true")
        warnings.filterwarnings("ignore", "A single label was found")
        if absent:  # binary AUROC needs both classes; one-vs-rest needs every class
            undefined("auroc", no_labels)
        elif o.binary:
            values["auroc"] = roc_auc_score(o.y == 1, o.probs[:, 1])
        else:
            values["auroc"] = roc_auc_score(o.y, o.probs, multi_class="ovr", average="macro", labels=labels)
        if (o.binary and not (o.y == 1).any()) or (not o.binary and absent):  # no positives in some class
            undefined("aupr", no_labels)
        elif o.binary:
            values["aupr"] = average_precision_score(o.y == 1, o.probs[:, 1])
        else:
            values["aupr"] = average_precision_score(label_binarize(o.y, classes=labels), o.probs, average="macro")
        values["accuracy"] = accuracy_score(o.y, o.pred)
        values["balanced_accuracy"] = balanced_accuracy_score(o.y, o.pred)
        values["f1_macro"] = f1_score(o.y, o.pred, average="macro")
        one_class = f"labels and predictions are all class {o.classes[o.y[0]]!r}"
        kappa = cohen_kappa_score(o.y, o.pred, labels=labels)
        if np.isnan(kappa):
            undefined("kappa", one_class)
        else:
            values["kappa"] = kappa
        if not o.ordered:
            undefined("kappa_quadratic", "the classes have no order (task is multiclass and the classes are not "
                                         "ascending integers)")
        else:
            kappa = cohen_kappa_score(o.y, o.pred, labels=labels, weights="quadratic")
            if np.isnan(kappa):
                undefined("kappa_quadratic", one_class)
            else:
                values["kappa_quadratic"] = kappa
        if len(np.unique(o.y)) < 2:
            undefined("mcc", f"all labels are class {o.classes[o.y[0]]!r}")
        elif len(np.unique(o.pred)) < 2:
            undefined("mcc", f"all predictions are class {o.classes[o.pred[0]]!r}")
        else:
            values["mcc"] = matthews_corrcoef(o.y, o.pred)
        if o.binary:
            for name, k in (("sensitivity", 1), ("specificity", 0)):
                if (o.y == k).any():
                    values[name] = recall_score(o.y, o.pred, pos_label=k)
                else:
                    undefined(name, f"no labels of class {o.classes[k]!r}")
        else:  # one-vs-rest, averaged over the classes where each is defined
            values["sensitivity"] = np.mean([recall_score(o.y == k, o.pred == k) for k in labels
                                             if (o.y == k).any()])
            specificity = [recall_score(o.y != k, o.pred != k) for k in labels if (o.y != k).any()]
            if specificity:
                values["specificity"] = np.mean(specificity)
            else:
                undefined("specificity", f"all labels are class {o.classes[o.y[0]]!r}")
    values["ece"] = ece(o, np.ones((1, len(o.y))))[0]
    return {name: None if values[name] is None else float(values[name]) for name in METRICS}, why


def ece(o: Outcomes, weights: np.ndarray) -> np.ndarray:
    """Expected calibration error of the top label, one value per row of ``weights`` (shape (resamples, n)).

    Confidence is the largest class probability and a row is correct when that class (the first, on ties) is
    the label. Confidences fall in ECE_BINS equal-width bins, (i/15, (i+1)/15], the first including 0, as in
    scikit-learn's ``calibration_curve``; ECE = sum over bins of (bin weight / total) * |accuracy - confidence|.
    """
    confidence = o.probs.max(axis=1)
    correct = (o.probs.argmax(axis=1) == o.y).astype(float)
    bins = np.searchsorted(np.linspace(0, 1, ECE_BINS + 1)[1:-1], confidence)
    per_bin = np.zeros((len(o.y), ECE_BINS))
    per_bin[np.arange(len(o.y)), bins] = correct - confidence
    return np.abs(weights @ per_bin).sum(axis=1) / weights.sum(axis=1)
