"""Image folders: RETFound's ``train|val|test/<class>/*``, flat ``<class>/*``, or loose files."""

from __future__ import annotations

from pathlib import Path

from retfm.data.sources import SPLIT_ALIASES, SourceItem, SourceListing
from retfm.errors import RetfmError


def list_files(root: Path) -> list[SourceItem]:
    """Every non-hidden file below ``root`` (hidden files are OS metadata such as .DS_Store), sorted."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and not any(part.startswith(".") for part in
                                                                           p.relative_to(root).parts))
    if not files:
        raise RetfmError(f"{root}: the folder holds no files")
    return [SourceItem(source=p.relative_to(root).as_posix(), file=p) for p in files]


def list_imagefolder(root: Path, label_column: str) -> SourceListing:
    items = list_files(root)
    top = {item.source.split("/")[0].lower() for item in items if "/" in item.source}
    retfound_layout = bool(top) and top <= set(SPLIT_ALIASES)
    for item in items:
        parts = item.source.split("/")
        if retfound_layout and len(parts) >= 2:
            item.columns["split"] = SPLIT_ALIASES[parts[0].lower()]
            parts = parts[1:]
        if len(parts) >= 2:
            item.columns[label_column] = parts[0]
    has_labels = any(label_column in item.columns for item in items)
    return SourceListing(items, "imagefolder", label_columns=[label_column] if has_labels else [])
