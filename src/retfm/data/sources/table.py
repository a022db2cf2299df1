"""CSV sources: one row per image, a path column plus label and metadata columns.

Columns are renamed with a mapping given on the command line (``--map level=dr_grade``) or in YAML
(``columns: {level: dr_grade}``); the path column is found by name unless given. Paths are relative to
``image_root`` (default: the CSV's folder) and must lead to a file inside it (``retfm.data.paths``);
``extension`` is appended to paths without one (APTOS-style ids).
"""

from __future__ import annotations

from pathlib import Path, PurePath

import pandas as pd

from retfm.data.manifest import CONVENTIONAL_COLUMNS
from retfm.data.paths import OUTSIDE_INPUT, inside
from retfm.data.sources.items import SPLIT_ALIASES, SourceItem, SourceListing
from retfm.errors import RetfmError

PATH_COLUMN_NAMES = ("path", "image_path", "image", "file", "filename", "file_name", "img", "image_file")
INVALID_SPLIT = "invalid_split"
MISSING_FILE = "missing_file"


def list_csv(csv_path: Path | None, options) -> SourceListing:
    if csv_path is None or not csv_path.is_file():
        raise RetfmError(f"{csv_path}: no CSV table found")
    try:
        table = pd.read_csv(csv_path, sep="\t" if csv_path.suffix.lower() == ".tsv" else ",", dtype=str,
                            keep_default_na=False, na_values=[""])
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise RetfmError(f"{csv_path}: cannot read CSV ({exc})") from None
    mapping = dict(options.columns or {})
    unknown = [c for c in mapping if c not in table.columns]
    if unknown:
        raise RetfmError(f"{csv_path}: mapped column(s) {', '.join(unknown)} not in the CSV header "
                         f"({', '.join(table.columns)})")
    table = table.rename(columns=mapping)
    path_column = options.path_column or next((c for c in PATH_COLUMN_NAMES if c in table.columns), None)
    if path_column is None or path_column not in table.columns:
        raise RetfmError(f"{csv_path}: no path column (looked for {', '.join(PATH_COLUMN_NAMES)}); "
                         f"name it with --path-column or map it with --map COLUMN=path")
    root = Path(options.image_root) if options.image_root else csv_path.parent
    items = []
    for index, row in enumerate(table.to_dict("records")):
        columns = {k: v for k, v in row.items() if k != path_column and not pd.isna(v)}
        relative = row[path_column]
        if pd.isna(relative):
            items.append(SourceItem(source=f"row {index + 2}", columns=columns, rejected=MISSING_FILE))
            continue
        relative = str(relative)
        if options.extension and not PurePath(relative).suffix:
            relative += options.extension if options.extension.startswith(".") else "." + options.extension
        item = SourceItem(source=relative, file=inside(root, root / relative), columns=columns)
        if "split" in columns:
            split = SPLIT_ALIASES.get(str(columns["split"]).strip().lower())
            if split is None:
                item.rejected = INVALID_SPLIT
            columns["split"] = split
        if item.rejected is None and item.file is None:
            item.rejected = OUTSIDE_INPUT
        elif item.rejected is None and not item.file.is_file():
            item.rejected = MISSING_FILE
        items.append(item)
    label_columns = [c for c in table.columns if c != path_column and c not in CONVENTIONAL_COLUMNS]
    return SourceListing(items, "csv", label_columns=label_columns)
