"""The one rule for every path that a user's input names: the file must lie inside the folder the user gave.

Readers of image folders, CSV and Excel tables, public-dataset layouts, manifests and share bundles ask
:func:`inside` before they open a file. Symbolic links are followed to their end, so a link is read only when its
target lies inside the folder too; a path that leads elsewhere (``../`` in a table, an absolute path, a link out of
the folder, a link loop) is never opened: ingest rejects it as :data:`OUTSIDE_INPUT`, and the other readers stop
with one line naming it.
"""

from __future__ import annotations

from pathlib import Path

OUTSIDE_INPUT = "outside_input"


def inside(root: str | Path, path: str | Path) -> Path | None:
    """``path`` (as it would be opened: ``root / name`` for a name a table gives) with every link resolved, or
    None when that is not inside ``root``, itself resolved: the folder the user named may be a link, nothing
    below it may lead out."""
    try:
        real = Path(path).resolve()
        return real if real.is_relative_to(Path(root).resolve()) else None
    except (OSError, RuntimeError, ValueError):  # a link loop, a NUL byte, a name too long: nothing inside
        return None
