"""The Predictions contract (docs/evaluate.md) and what every head does after predicting: choose the task, set a binary
threshold on validation rows, write ``predictions.parquet``, ``metrics.json`` and ``report.html``.

``predictions.parquet``: ``image_id``, the label, ``prediction``, ``prob_<class>`` per class, ``patient_id`` and
the group columns; schema metadata ``retfm.label``, ``retfm.classes``, ``retfm.task``, ``retfm.threshold``
(binary), ``retfm.meta``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from sklearn.metrics import roc_curve

from retfm.data.manifest import GROUP_COLUMNS
from retfm.errors import RetfmError
from retfm.evaluate import evaluate_predictions, write_report

ORDINAL_LABELS = ("dr_grade",)  # graded scales: quadratic kappa is their headline agreement measure
from retfm.evaluate import PREDICTIONS_FILENAME


def resolve_task(task: str, label: str, classes: list) -> str:
    if task == "auto":
        return "binary" if len(classes) == 2 else "ordinal" if label in ORDINAL_LABELS else "multiclass"
    if task == "binary" and len(classes) != 2:
        raise RetfmError(f"--task binary: label {label!r} has {len(classes)} classes")
    return task


def write_results(out: Path, rows: pd.DataFrame, label: str, classes: list, probabilities: np.ndarray, task: str,
                  threshold: float | None, meta: dict, by: list[str], n_boot: int, seed: int,
                  excluded: int = 0, extra: dict | None = None) -> dict:
    """Write predictions.parquet, metrics.json and report.html for ``rows`` (test rows with their manifest
    columns) and their class probabilities; ``extra`` adds head-specific results to metrics.json. Returns the
    metrics dict."""
    predictions = predictions_table(rows, label, classes, probabilities, threshold)
    out.mkdir(parents=True, exist_ok=True)
    class_names = [str(c) for c in classes]
    write_predictions(out / PREDICTIONS_FILENAME, predictions, label, class_names, task, threshold, meta)
    result = evaluate_predictions(predictions, label, class_names, task, threshold=0.5 if threshold is None
                                  else threshold, by=by, n_boot=n_boot, seed=seed, meta=meta)
    result["n_excluded_null_label"] = excluded
    result.update(extra or {})
    (out / "metrics.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    write_report(result, predictions, label, out)
    return result


def youden_threshold(y: np.ndarray, positive: np.ndarray) -> float:
    """The probability threshold maximising sensitivity + specificity on the validation rows (0.5 if undefined)."""
    if len(np.unique(y)) < 2:
        return 0.5
    fpr, tpr, thresholds = roc_curve(y, positive)
    return float(np.clip(thresholds[int(np.argmax(tpr - fpr))], 0, 1))


def predictions_table(rows: pd.DataFrame, label: str, classes: list, probabilities: np.ndarray,
                       threshold: float | None) -> pd.DataFrame:
    if threshold is None:
        predicted = np.argmax(probabilities, axis=1)
    else:
        predicted = (probabilities[:, 1] >= threshold).astype(int)
    table = pd.DataFrame({"image_id": rows["image_id"].to_numpy(), label: rows[label].to_numpy(),
                          "prediction": np.asarray(classes, dtype=object)[predicted]})
    table["prediction"] = table["prediction"].astype(rows[label].dtype)
    for i, c in enumerate(classes):
        table[f"prob_{c}"] = probabilities[:, i]
    for column in ("patient_id", *GROUP_COLUMNS):
        if column in rows:
            table[column] = rows[column].to_numpy()
    return table


def write_predictions(path: Path, table: pd.DataFrame, label: str, classes: list[str], task: str,
                       threshold: float | None, meta: dict) -> None:
    arrow = pa.Table.from_pandas(table, preserve_index=False)
    extra = {"retfm.label": label, "retfm.classes": json.dumps(classes), "retfm.task": task,
             "retfm.meta": json.dumps(meta, default=str)}
    if threshold is not None:
        extra["retfm.threshold"] = repr(threshold)
    arrow = arrow.replace_schema_metadata({**(arrow.schema.metadata or {}),
                                           **{k.encode(): v.encode() for k, v in extra.items()}})
    pq.write_table(arrow, path)
