"""``retfm evaluate``: metrics with 95% bootstrap CIs, overall and per group, their gaps, and a report.

Reads the predictions contract (``predictions.parquet``, written by ``retfm probe``), returns the
``metrics.json`` dict. The schema is documented in docs/evaluate.md.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from retfm import __version__
from retfm.data.stats import AGE_LABELS, age_band
from retfm.errors import RetfmError
from retfm.evaluate.bootstrap import CONFIDENCE, percentile_ci, resample_metrics
from retfm.evaluate.metrics import LOWER_IS_BETTER, METRICS, TASKS, Outcomes, as_strings, outcomes, point_metrics
from retfm.evaluate.report import write_report
from retfm.hashing import file_sha256

__all__ = ["evaluate_predictions", "read_predictions", "write_report"]

PREDICTIONS_FILENAME = "predictions.parquet"
UNKNOWN = "unknown"
IDENTIFIERS = ("image_id", "patient_id")


def read_predictions(path: str | Path) -> tuple[pd.DataFrame, dict]:
    """Read ``predictions.parquet`` (or a folder holding it). Returns the table and ``info``: ``classes``,
    ``task``, ``threshold`` and ``meta`` (the file's ``retfm.meta`` plus its sha256)."""
    path = Path(path)
    if path.is_dir():
        path = path / PREDICTIONS_FILENAME
    if not path.is_file():
        raise RetfmError(f"{path}: no such predictions file")
    try:
        parquet = pq.read_table(path)
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise RetfmError(f"{path}: cannot read predictions ({str(exc).splitlines()[0]})") from None
    metadata = {k.decode(): v.decode() for k, v in (parquet.schema.metadata or {}).items() if k.startswith(b"retfm.")}
    table = parquet.to_pandas()
    prob_classes = [str(c)[5:] for c in table.columns if str(c).startswith("prob_")]
    try:
        classes = json.loads(metadata.get("retfm.classes", "null"))
        meta = json.loads(metadata.get("retfm.meta", "{}"))
        threshold = float(metadata.get("retfm.threshold", 0.5))
    except ValueError as exc:
        raise RetfmError(f"{path}: unreadable retfm metadata ({exc})") from None
    if classes is None:
        classes = prob_classes
    if not isinstance(classes, list) or not isinstance(meta, dict):
        raise RetfmError(f"{path}: retfm.classes must be a JSON list and retfm.meta a JSON object")
    classes = [str(c) for c in classes]
    if len(classes) < 2:
        raise RetfmError(f"{path}: needs a prob_<class> column for each of at least two classes "
                         f"(found {len(prob_classes)})")
    missing = [c for c in classes if f"prob_{c}" not in table]
    if missing:
        raise RetfmError(f"{path}: no column prob_{missing[0]} for class {missing[0]!r} of retfm.classes")
    for column in (f"prob_{c}" for c in classes):
        values = table[column]
        numeric = pd.api.types.is_numeric_dtype(values)
        if not numeric or not np.isfinite(values.to_numpy(np.float64, na_value=np.nan)).all():
            raise RetfmError(f"{path}: column {column} must hold probabilities, finite numbers")
    task = metadata.get("retfm.task", "binary" if len(classes) == 2 else "multiclass")
    if task not in TASKS:
        raise RetfmError(f"{path}: retfm.task is {task!r}, not one of {', '.join(TASKS)}")
    meta = {**meta, "predictions_sha256": file_sha256(path)}  # the content identifies it, never the path
    return table, {"classes": classes, "task": task, "threshold": threshold, "meta": meta}


def evaluate_predictions(table: pd.DataFrame, label: str, classes: list, task: str, threshold: float = 0.5,
                         by: tuple[str, ...] | list[str] = (), n_boot: int = 1000, seed: int = 0,
                         meta: dict | None = None) -> dict:
    """Every metric with its 95% percentile bootstrap CI, overall and for each group of each ``by`` column,
    the best and worst group per metric, and notes on whatever was undefined. Returns the metrics.json dict."""
    for column in by:
        if column not in table:
            raise RetfmError(f"no column {column!r} to group by (columns: {', '.join(map(str, table.columns))})")
        if column in IDENTIFIERS:
            raise RetfmError(f"cannot group by {column!r}: groups of identifiers would put them in the report")
    o = outcomes(table, label, classes, task, threshold)
    rows = table.loc[o.kept]
    clusters = bootstrap_clusters(rows)
    notes = list(o.notes)
    overall, overall_why = _scope(o, clusters, n_boot, seed, "overall", notes, {})
    groups: dict = {}
    gaps: dict = {}
    for column in by:
        values = _group_values(rows, column)
        groups[column] = {}
        for value in _group_order(values, column):
            mask = (values == value).to_numpy()
            metrics, _ = _scope(o.subset(mask), clusters[mask], n_boot, seed, f"{column}={value}", notes, overall_why)
            groups[column][value] = {"n": int(mask.sum()), "metrics": metrics}
        gaps[column] = _gaps(groups[column])
    has_patients = "patient_id" in rows and rows["patient_id"].notna().any()
    bootstrap = {"n": n_boot, "seed": seed, "unit": "patient" if has_patients else "image",
                 "units": len(np.unique(clusters)), "confidence": CONFIDENCE, "method": "percentile"}
    return {
        "n": len(o.y),
        "n_excluded_null_label": int((~o.kept).sum()),
        "label": label,
        "task": task,
        "classes": o.classes,
        "threshold": float(threshold) if o.binary else None,
        "metrics": overall,
        "groups": groups,
        "gaps": gaps,
        "notes": notes,
        "meta": {**(meta or {}), "bootstrap": bootstrap, "retfm_version": __version__},
    }


def bootstrap_clusters(rows: pd.DataFrame) -> np.ndarray:
    """The resampling unit of each row: its patient, or the row itself when there is no patient_id."""
    if "patient_id" not in rows:
        return np.arange(len(rows))
    codes, _ = pd.factorize(rows["patient_id"].astype("string"), sort=True)
    alone = codes < 0  # an image without a patient_id is its own patient
    codes[alone] = codes.max() + 1 + np.arange(alone.sum())
    return codes


def _scope(o: Outcomes, clusters: np.ndarray, n_boot: int, seed: int, scope: str, notes: list[str],
           said: dict[str, str]) -> tuple[dict, dict[str, str]]:
    """Metrics of one set of rows, with CIs; notes what is undefined, unless ``said`` already says so."""
    values, why = point_metrics(o)
    # Each scope draws from its own stream, so its CIs do not depend on which other groups were asked for.
    rng = np.random.default_rng([seed, zlib.crc32(scope.encode())])
    samples = resample_metrics(o, clusters, n_boot, rng) if n_boot else {}
    metrics, skipped = {}, {}
    for name in METRICS:
        ci, used = percentile_ci(samples[name]) if n_boot and values[name] is not None else (None, 0)
        metrics[name] = {"value": values[name], "ci": ci, "n_boot": used}
        if values[name] is not None and used < n_boot:
            skipped.setdefault(used, []).append(name)
    reasons: dict[str, list[str]] = {}
    for name, reason in why.items():
        if said.get(name) != reason:
            reasons.setdefault(reason, []).append(name)
    notes.extend(f"{scope} (n={len(o.y)}): {', '.join(names)} undefined: {reason}" for reason, names in reasons.items())
    notes.extend(f"{scope} (n={len(o.y)}): {', '.join(names)}: CI from {used} of {n_boot} resamples (undefined "
                 f"in the others)" for used, names in skipped.items())
    return metrics, why


def _group_values(rows: pd.DataFrame, column: str) -> pd.Series:
    values = age_band(rows[column]) if column == "age" else as_strings(rows[column])
    return values.fillna(UNKNOWN)


def _group_order(values: pd.Series, column: str) -> list[str]:
    present = set(values)
    known = [v for v in AGE_LABELS if v in present] if column == "age" else sorted(present - {UNKNOWN})
    return known + [UNKNOWN] * (UNKNOWN in present)


def _gaps(groups: dict) -> dict:
    """Per metric, the best and worst known group and their distance (always >= 0; for ECE lower is better).
    The "unknown" group is no population, so it is left out; a metric needs two groups with a value."""
    gaps = {}
    for name in METRICS:
        scored = {value: group["metrics"][name]["value"] for value, group in groups.items()
                  if value != UNKNOWN and group["metrics"][name]["value"] is not None}
        if len(scored) < 2:
            continue
        low, high = min(scored, key=scored.get), max(scored, key=scored.get)
        best, worst = (low, high) if name in LOWER_IS_BETTER else (high, low)
        gaps[name] = {"best": best, "worst": worst, "gap": abs(scored[high] - scored[low])}
    return gaps
