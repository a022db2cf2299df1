"""The real fundus cohort of the benchmarks: ../shared/data/mexfundus ingested by ``retfm data ingest``, with the
honest task ``referable_dr`` (``dr >= 1``, PROVENANCE.md) and patient-level splits.

Splits: the patients with at least one DR-graded image are shuffled (seed 0) within two strata (any image with
referable DR, or none) and cut 50 / 20 / 30 into train / val / test; every image of a patient shares its split.
Patients without any DR grade (the DME acquisition batch) are all ``train``: they never reach a probe or a test,
and they are the bulk of the unlabelled pretraining corpus. ``referable_dr`` is null where ``dr`` is.

    python benchmarks/mexfundus.py --out benchmarks/_work/mexfundus [--size 512]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
DEFAULT_SOURCE = HERE.parents[1] / "shared" / "data" / "mexfundus"
FRACTIONS = {"train": 0.5, "val": 0.2, "test": 0.3}


def patient_splits(labels: pd.DataFrame, seed: int = 0) -> pd.Series:
    """Each image's split, by patient, stratified by whether the patient has referable DR."""
    graded = labels[labels["dr"].notna()]
    referable = graded.groupby("patient_id")["dr"].max() >= 1
    rng = np.random.default_rng(seed)
    split_of = {}
    for _, patients in referable.groupby(referable):
        order = rng.permutation(patients.index.to_numpy())
        cuts = np.round(np.cumsum([FRACTIONS["train"], FRACTIONS["val"]]) * len(order)).astype(int)
        for split, part in zip(FRACTIONS, np.split(order, cuts)):
            split_of.update(dict.fromkeys(part, split))
    return labels["patient_id"].map(split_of).fillna("train")


def prepare(out: Path, source: Path = DEFAULT_SOURCE, size: int = 512) -> Path:
    """Ingest the cohort into ``out`` once (a manifest folder ``retfm`` commands read); returns ``out``."""
    if (out / "manifest.parquet").exists():
        return out
    labels = pd.read_csv(source / "labels.csv", dtype={"patient_id": str})
    table = pd.DataFrame({
        "path": labels["file"], "patient_id": labels["patient_id"],
        "eye": labels["eye"].map({"OD": "R", "OS": "L"}),
        "referable_dr": (labels["dr"] >= 1).astype("Int64").where(labels["dr"].notna()),
        "split": patient_splits(labels),
    })
    out.parent.mkdir(parents=True, exist_ok=True)
    csv = out.parent / f"{out.name}-labels.csv"
    table.to_csv(csv, index=False)
    subprocess.run([sys.executable, "-m", "retfm.cli.main", "data", "ingest", str(csv), "--out", str(out),
                    "--format", "csv", "--path-column", "path", "--site", "mex", "--size", str(size),
                    "--image-format", "jpg", "--set", f"image_root={source}"], check=True, stdout=subprocess.DEVNULL)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--out", type=Path, default=HERE / "_work" / "mexfundus")
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()
    out = prepare(args.out, args.source, args.size)
    table = pd.read_parquet(out / "manifest.parquet")
    print(table.groupby("split")["referable_dr"].agg(["count", "sum", "size"]))


if __name__ == "__main__":
    main()
