"""``retfm data stats``: what is in a Manifest, and whether each split represents the groups of the whole."""

from __future__ import annotations

import numpy as np
import pandas as pd

from retfm.data.manifest import SPLITS, Manifest

GROUP_COLUMNS = ("site", "country", "sex", "age_band", "ethnicity", "device", "eye", "modality")
AGE_BANDS = (0, 40, 50, 60, 70, 80, 200)
AGE_LABELS = ("<40", "40-49", "50-59", "60-69", "70-79", "80+")
MAX_CATEGORIES = 20  # a label column with more distinct values is summarised as a number, not counted


def age_band(age: pd.Series) -> pd.Series:
    return pd.cut(pd.to_numeric(age, errors="coerce"), AGE_BANDS, right=False, labels=AGE_LABELS).astype("string")


def manifest_stats(manifest: Manifest) -> dict:
    table = manifest.table.copy()
    if "age" in table:
        table["age_band"] = age_band(table["age"])
    stats: dict = {
        "images": len(table),
        "patients": int(table["patient_id"].nunique()) if "patient_id" in table else None,
        "splits": {s: int((table["split"] == s).sum()) for s in SPLITS},
        "groups": {},
        "labels": {},
        "quality": _quality(table),
        "representativeness": [],
    }
    for column in GROUP_COLUMNS:
        if column in table and table[column].notna().any():
            stats["groups"][column] = _counts(table, column)
            stats["representativeness"].extend(_representativeness(table, column))
    for column in manifest.label_columns:
        values = table[column]
        if values.nunique(dropna=True) <= MAX_CATEGORIES:
            stats["labels"][column] = _counts(table, column)
        else:
            numeric = pd.to_numeric(values, errors="coerce")
            stats["labels"][column] = {"mean": _num(numeric.mean()), "min": _num(numeric.min()),
                                       "max": _num(numeric.max()), "missing": int(numeric.isna().sum())}
    return stats


def _counts(table: pd.DataFrame, column: str) -> dict:
    """{value: {"all": n, "train": n, "val": n, "test": n}}, unknown values counted as "unknown"."""
    values = table[column].astype("string").fillna("unknown")
    out = {}
    for value in sorted(values.unique(), key=str):
        mask = values == value
        out[str(value)] = {"all": int(mask.sum()), **{s: int((mask & (table["split"] == s)).sum()) for s in SPLITS}}
    return out


def _representativeness(table: pd.DataFrame, column: str) -> list[dict]:
    """Share of each group in the whole collection and in each split; the gap is the largest absolute difference
    in percentage points between a split's share and the overall share."""
    values = table[column].astype("string").fillna("unknown")
    rows = []
    for value in sorted(values.unique(), key=str):
        mask = values == value
        overall = float(mask.mean())
        shares = {}
        for split in SPLITS:
            in_split = table["split"] == split
            shares[split] = float(mask[in_split].mean()) if in_split.any() else None
        gaps = [abs(s - overall) for s in shares.values() if s is not None]
        rows.append({"column": column, "group": str(value), "n": int(mask.sum()), "share": round(overall, 4),
                     **{f"share_{s}": (None if v is None else round(v, 4)) for s, v in shares.items()},
                     "max_gap_pp": round(100 * max(gaps), 2) if gaps else None})
    return rows


def _quality(table: pd.DataFrame) -> dict | None:
    if "quality" not in table:
        return None
    quality = pd.to_numeric(table["quality"], errors="coerce").dropna()
    if quality.empty:
        return None
    quantiles = {f"p{int(q * 100)}": round(float(quality.quantile(q)), 4) for q in (0.05, 0.25, 0.5, 0.75, 0.95)}
    histogram, edges = np.histogram(quality, bins=10, range=(0, 1))
    return {"mean": round(float(quality.mean()), 4), **quantiles, "below_0.5": int((quality < 0.5).sum()),
            "histogram": {f"{edges[i]:.1f}-{edges[i + 1]:.1f}": int(c) for i, c in enumerate(histogram)}}


def _num(value) -> float | None:
    return None if pd.isna(value) else round(float(value), 4)
