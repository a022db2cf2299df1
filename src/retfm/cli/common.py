"""What every command shares: the console, progress bars, config loading from options."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.text import Text

console = Console(stderr=True)
stdout = Console()

ConfigOption = "YAML config file; command-line options override it"
SetOption = "override a config value: --set key=value (repeatable; values parsed as YAML)"


class _RateColumn(ProgressColumn):
    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        return Text(f"{task.speed:.1f} {self.unit}/s" if task.speed else "")


@contextmanager
def progress_bar(description: str, unit: str | None = None):
    """Yields (set_total, advance) callbacks for library code that reports progress; ``unit`` adds a rate.
    The bar appears at the first callback, so an error raised before any work is one line, with no bar."""
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn(), *([_RateColumn(unit)] if unit else []))
    progress = Progress(*columns, console=console, transient=False)
    task = progress.add_task(description, total=None)

    def started(update):
        def call(*args):
            if not progress.live.is_started:
                progress.start()
            update(*args)
        return call

    try:
        yield started(lambda n: progress.update(task, total=n)), started(lambda n=1: progress.advance(task, n))
    finally:
        progress.stop()


def print_metrics(result: dict, prefix: str = "") -> None:
    """The headline metrics of a metrics.json dict, with their 95% CIs, one per line."""
    for name in ("auroc", "balanced_accuracy", "kappa_quadratic"):
        metric = result["metrics"].get(name)
        if metric and metric.get("value") is not None:
            ci = metric.get("ci") or [None, None]
            stdout.print(f"{prefix}{name}: {metric['value']:.4f}" +
                         (f" (95% CI {ci[0]:.4f}-{ci[1]:.4f})" if ci[0] is not None else ""))


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
