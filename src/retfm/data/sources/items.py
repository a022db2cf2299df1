"""What a reader lists: one :class:`SourceItem` per image, in a :class:`SourceListing`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

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
