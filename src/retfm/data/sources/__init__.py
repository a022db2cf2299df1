"""Where images come from. Each reader lists :class:`SourceItem` s; decoding happens later, in ingest's workers.

Readers: ``imagefolder`` (RETFound ``train|val|test/<class>/*`` and flat ``<class>/*``), ``csv`` (a path column
plus label and metadata columns), ``retinamnist`` (the MedMNIST ``.npz``), ``dicom`` (a folder of DICOM files), and
one per public dataset in its published layout (``PUBLIC_FORMATS``, see :mod:`retfm.data.sources.public`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from retfm.errors import RetfmError

PUBLIC_FORMATS = ("retfound", "aptos2019", "idrid", "messidor2", "papila", "glaucoma_fundus", "jsiec", "brset",
                  "odir5k")
FORMATS = ("auto", "imagefolder", "csv", "retinamnist", "dicom", *PUBLIC_FORMATS)
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "dev": "val", "test": "test", "testing": "test"}


@dataclass
class SourceItem:
    """One image to ingest: a file on disk or pixels already in memory, plus what the source says about it."""

    source: str  # identifier inside the source (relative path, "train/0012", ...); never written when de-identifying
    file: Path | None = None
    pixels: np.ndarray | None = None
    columns: dict = field(default_factory=dict)  # manifest columns from the source: labels, split, patient_id, ...
    rejected: str | None = None  # a reason known before decoding (missing file, invalid split value, ...)


@dataclass
class SourceListing:
    items: list[SourceItem]
    format: str
    defaults: dict = field(default_factory=dict)  # column values that hold for every item (e.g. modality)
    label_columns: list[str] = field(default_factory=list)


def detect_format(src: Path) -> str:
    if src.is_file():
        suffix = src.suffix.lower()
        if suffix == ".npz":
            return "retinamnist"
        if suffix in (".csv", ".tsv"):
            return "csv"
        raise RetfmError(f"{src}: cannot tell the format of this file; pass --format")
    if not src.is_dir():
        raise RetfmError(f"{src}: no such file or folder")
    if find_table(src) is not None:
        return "csv"
    files = [p for p in src.rglob("*") if p.is_file() and not p.name.startswith(".")]
    if files and all(p.suffix.lower() == ".dcm" for p in files):
        return "dicom"
    return "imagefolder"


def find_table(folder: Path) -> Path | None:
    """A folder with ``labels.csv`` (as ``retfm data phantoms`` writes) or exactly one CSV at its top is a CSV source."""
    if (folder / "labels.csv").is_file():
        return folder / "labels.csv"
    tables = sorted(folder.glob("*.csv"))
    return tables[0] if len(tables) == 1 else None


def list_source(src: Path, fmt: str, options) -> SourceListing:
    """List the items of ``src`` in a deterministic order. ``options`` is the ingest config."""
    fmt = detect_format(src) if fmt == "auto" else fmt
    if fmt == "imagefolder":
        from retfm.data.sources.imagefolder import list_imagefolder

        return list_imagefolder(src, options.label_column)
    if fmt == "dicom":
        from retfm.data.sources.imagefolder import list_files

        return SourceListing(list_files(src), "dicom")
    if fmt == "csv":
        from retfm.data.sources.table import list_csv

        return list_csv(src if src.is_file() else find_table(src), options)
    if fmt == "retinamnist":
        from retfm.data.sources.retinamnist import list_retinamnist

        return list_retinamnist(src)
    if fmt in PUBLIC_FORMATS:
        from retfm.data.sources.public import READERS

        if not src.is_dir():
            raise RetfmError(f"{src}: --format {fmt} reads the dataset's downloaded folder; this is not a folder")
        return READERS[fmt](src, options)
    raise RetfmError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
