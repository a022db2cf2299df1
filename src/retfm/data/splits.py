"""Patient-level train/val/test splits: a patient's images never cross splits; stratified (by site, label or
both) when strata are given; deterministic for a seed."""

from __future__ import annotations

import numpy as np
import pandas as pd

from retfm.data.manifest import SPLITS


def assign_splits(groups: pd.Series, fractions: tuple[float, float, float], seed: int,
                  strata: pd.Series | None = None, fixed: dict[str, str] | None = None) -> pd.Series:
    """Split rows by group (patient). ``groups``: one key per row; ``strata``: optional stratum per row (e.g. site
    and label); ``fixed``: groups whose split is already decided (an earlier ingest). Returns a split per row.

    Within each stratum, groups are shuffled (seeded) and each goes to the split whose image count lags its
    target most, so image proportions track ``fractions`` even when patients have different numbers of images.
    """
    fixed = dict(fixed or {})
    frame = pd.DataFrame({"group": groups.astype(str).to_numpy(),
                          "stratum": (strata.astype(str).to_numpy() if strata is not None else "")})
    # A patient's stratum is their most common one (ties broken by value, for determinism).
    by_group = frame.groupby("group")["stratum"].agg(
        lambda v: sorted(v.value_counts().items(), key=lambda kv: (-kv[1], kv[0]))[0][0])
    sizes = frame.groupby("group").size()
    target = np.asarray(fractions, dtype=float)
    decided = dict(fixed)
    rng = np.random.default_rng(seed)
    for stratum in sorted(by_group.unique()):
        members = sorted(by_group.index[by_group == stratum])
        counts = np.zeros(len(SPLITS))
        for group in members:
            if group in fixed and fixed[group] in SPLITS:
                counts[SPLITS.index(fixed[group])] += sizes[group]
        pending = [g for g in members if g not in decided]
        for index in rng.permutation(len(pending)):
            group = pending[index]
            total = counts.sum() + sizes[group]
            deficit = target * total - counts
            choice = int(np.argmax(np.where(target > 0, deficit, -np.inf)))
            decided[group] = SPLITS[choice]
            counts[choice] += sizes[group]
    return pd.Series([decided[g] for g in frame["group"]], index=groups.index, dtype="string")


def label_fraction_subset(table: pd.DataFrame, label: str, fraction: float, seed: int) -> pd.DataFrame:
    """Keep ``fraction`` of the patients (images without a patient id count as their own), stratified by each
    patient's most common label, at least one per label. A seed fixes one order of patients per stratum and a
    fraction takes its head, so smaller fractions are subsets of larger ones."""
    if fraction >= 1:
        return table
    groups = (table["patient_id"].astype("string").fillna(table["image_id"].astype("string"))
              if "patient_id" in table else table["image_id"].astype("string")).astype(str)
    frame = pd.DataFrame({"group": groups.to_numpy(), "label": table[label].astype(str).to_numpy()})
    stratum = frame.groupby("group")["label"].agg(lambda v: sorted(v.value_counts().items(),
                                                                   key=lambda kv: (-kv[1], kv[0]))[0][0])
    rng = np.random.default_rng(seed)
    kept: set[str] = set()
    for value in sorted(stratum.unique()):
        members = sorted(stratum.index[stratum == value])
        order = rng.permutation(len(members))
        kept.update(members[i] for i in order[:max(1, round(fraction * len(members)))])
    return table[groups.isin(kept).to_numpy()].reset_index(drop=True)
