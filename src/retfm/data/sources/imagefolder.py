"""Image folders: RETFound's ``train|val|test/<class>/*``, flat ``<class>/*``, or loose files."""

from __future__ import annotations

from pathlib import Path

from retfm.data.io import UNREADABLE_FILE
from retfm.data.paths import OUTSIDE_INPUT, inside
from retfm.data.sources.items import SPLIT_ALIASES, SourceItem, SourceListing
from retfm.errors import RetfmError

HIDDEN_FILE = "hidden_file"


def list_files(root: Path) -> list[SourceItem]:
    """Every file and link below ``root``, sorted. Listed but never opened, each with its reason: hidden files
    (a part of the path starts with '.': OS metadata such as .DS_Store), links that lead outside ``root``, and
    links to something other than a file. A link to a folder inside ``root`` is skipped: its files are listed
    where they lie."""
    items = []
    for path in sorted(root.rglob("*")):
        if not (path.is_symlink() or path.is_file()):
            continue
        source = path.relative_to(root).as_posix()
        if any(part.startswith(".") for part in source.split("/")):
            items.append(SourceItem(source, rejected=HIDDEN_FILE))
        elif (real := inside(root, path)) is None:
            items.append(SourceItem(source, rejected=OUTSIDE_INPUT))
        elif not real.is_dir():
            items.append(SourceItem(source, file=real, rejected=None if real.is_file() else UNREADABLE_FILE))
    if not items:
        raise RetfmError(f"{root}: the folder holds no files")
    return items


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
