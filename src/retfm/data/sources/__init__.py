"""Where images come from. Each reader lists :class:`SourceItem` s; decoding happens later, in ingest's workers.

Readers (:data:`READERS`, whose names ``retfm data ingest --format`` takes): ``imagefolder`` (RETFound
``train|val|test/<class>/*`` and flat ``<class>/*``), ``csv`` (a path column plus label and metadata columns),
``retinamnist`` (the MedMNIST ``.npz``), ``dicom`` (a folder of DICOM files), and one per public dataset in its
published layout (see :mod:`retfm.data.sources.public`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from retfm.data.sources.imagefolder import list_files, list_imagefolder
from retfm.data.sources.items import SourceItem, SourceListing
from retfm.data.sources.public import PUBLIC_READERS
from retfm.data.sources.retinamnist import list_retinamnist
from retfm.data.sources.table import list_csv
from retfm.errors import RetfmError

__all__ = ["FORMATS", "READERS", "SourceItem", "SourceListing", "detect_format", "list_source"]


def _public(name: str, reader: Callable) -> Callable:
    def read(src: Path, options) -> SourceListing:
        if not src.is_dir():
            raise RetfmError(f"{src}: --format {name} reads the dataset's downloaded folder; this is not a folder")
        return reader(src, options)
    return read


# format name -> reader(src, ingest config)
READERS: dict[str, Callable[[Path, object], SourceListing]] = {
    "imagefolder": lambda src, options: list_imagefolder(src, options.label_column),
    "csv": lambda src, options: list_csv(src if src.is_file() else find_table(src), options),
    "retinamnist": lambda src, options: list_retinamnist(src),
    "dicom": lambda src, options: SourceListing(list_files(src), "dicom"),
    **{name: _public(name, reader) for name, reader in PUBLIC_READERS.items()},
}
FORMATS = ("auto", *READERS)


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
    if fmt not in READERS:
        raise RetfmError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    return READERS[fmt](src, options)
