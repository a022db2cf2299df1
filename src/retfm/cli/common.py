"""What every command shares: the console, progress bars, config loading from options."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)
stdout = Console()

ConfigOption = "YAML config file; command-line options override it"
SetOption = "override a config value: --set key=value (repeatable; values parsed as YAML)"


@contextmanager
def progress_bar(description: str):
    """Yields (set_total, advance) callbacks for library code that reports progress."""
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(description, total=None)
        yield (lambda n: progress.update(task, total=n)), (lambda n=1: progress.advance(task, n))


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
