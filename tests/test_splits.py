"""Patient-level, stratified, seeded splits."""

import numpy as np
import pandas as pd

from retfm.data.splits import assign_splits


def _cohort(patients: int = 400, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(patients):
        site = f"site{p % 3}"
        label = int(rng.random() < (0.1 if site == "site0" else 0.4))  # prevalence differs by site
        rows += [{"patient": f"P{p}", "site": site, "label": label}] * int(rng.integers(1, 4))  # 1-3 images
    return pd.DataFrame(rows)


def test_patients_never_cross_splits_and_proportions_hold_per_stratum():
    table = _cohort()
    strata = table["site"] + "|" + table["label"].astype(str)
    split = assign_splits(table["patient"], (0.7, 0.1, 0.2), seed=3, strata=strata)
    assert (table.assign(split=split).groupby("patient")["split"].nunique() == 1).all()
    for _, rows in table.assign(split=split).groupby(strata):
        shares = rows["split"].value_counts(normalize=True).reindex(["train", "val", "test"], fill_value=0)
        # Greedy by image count: each stratum is within one patient (<= 3 images) of its target.
        target = np.array([0.7, 0.1, 0.2]) * len(rows)
        assert np.abs(shares.to_numpy() * len(rows) - target).max() <= 3.5


def test_deterministic_for_a_seed_and_different_across_seeds():
    table = _cohort()
    first = assign_splits(table["patient"], (0.7, 0.1, 0.2), seed=1)
    assert first.equals(assign_splits(table["patient"], (0.7, 0.1, 0.2), seed=1))
    assert not first.equals(assign_splits(table["patient"], (0.7, 0.1, 0.2), seed=2))


def test_fixed_patients_keep_their_split_and_count_towards_the_targets():
    table = _cohort(100)
    fixed = {f"P{p}": "test" for p in range(20)}
    split = assign_splits(table["patient"], (0.5, 0.0, 0.5), seed=0, fixed=fixed)
    assert (split[table["patient"].isin(fixed)] == "test").all()
    assert "val" not in set(split)  # a zero fraction is never chosen
    shares = split.value_counts(normalize=True)
    assert abs(shares["test"] - 0.5) < 0.05
