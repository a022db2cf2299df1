"""Options of ``retfm data ingest``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator

from retfm.config import CommaSeparated, Options, Seed
from retfm.data.sources import FORMATS


class IngestConfig(Options):
    """Options of ``retfm data ingest`` (see ``retfm data ingest --help``)."""

    format: Literal[FORMATS] = Field("auto", description="the source's layout: auto (detected), a generic reader or "
                                                         "a public dataset's published layout (see docs/data.md)")
    size: int = Field(512, ge=8, le=8192, description="side of the stored square image (never upscaled)")
    site: str = Field("site1", min_length=1, description="site name for sources without a site column")
    split: Annotated[tuple[float, ...], CommaSeparated] = Field(
        (0.7, 0.1, 0.2), description="train,val,test fractions for sources without splits")
    seed: Seed = 0
    workers: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1, description="worker processes")
    deid_key_file: Path | None = Field(None, description="site key: de-identify with keyed pseudonyms")
    image_format: Literal["png", "jpg"] = Field("png", description="format of the stored images")
    jpeg_quality: int = Field(95, ge=50, le=100)
    margin: float = Field(0.02, ge=0, le=0.5, description="border kept around the field of view, as a fraction")
    clahe: bool = Field(False, description="contrast-limited histogram equalisation")
    max_pixels: int = Field(64_000_000, ge=1)
    modality: Literal["CFP", "UWF", "OCT", "FA"] | None = None
    label_column: str = Field("label", description="column for image-folder class names")
    stratify: str | None = Field(None, description="label column to stratify new splits by "
                                                   "(default: the source's only label column)")
    path_column: str | None = Field(None, description="CSV column holding image paths")
    columns: dict[str, str] = Field(default_factory=dict, description="CSV column renames, source -> manifest")
    image_root: Path | None = None
    extension: str | None = None

    @field_validator("split")
    @classmethod
    def _check_split(cls, value):
        if len(value) != 3 or any(v < 0 for v in value) or abs(sum(value) - 1) > 1e-6:
            raise ValueError(f"split must be three fractions train,val,test >= 0 that sum to 1, got {value}")
        return value

