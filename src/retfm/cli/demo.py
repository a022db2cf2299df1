"""``retfm demo``: what a federation of sites gains, end to end (phantoms or your own ingest -> federated, pooled
and local-only pretraining from the ImageNet start -> probes -> paired comparisons -> report)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from retfm.cli.common import config_command, console, stdout
from retfm.demo.config import DemoConfig, with_quick


@config_command(DemoConfig, "data", "label", "sites")
def demo(
    config: DemoConfig,
    out: Path = typer.Option(Path("runs/demo"), "--out", help="folder for every stage's files and report.html"),
    quick: bool = typer.Option(False, "--quick", help="3 small sites, 2 short rounds at 96 px: about 80 s"),
) -> None:
    """Federated pretraining from the ImageNet start against pooled, each site alone, the start and random
    weights, on built-in phantoms or your own photographs; writes OUT/report.html."""
    from retfm.demo.run import run_demo

    with _Bars() as bars:
        results = run_demo(out, with_quick(config) if quick else config, bars)
    for sentence in results["findings"]:
        stdout.print(f"- {sentence}", highlight=False)
    minutes = sum(results["seconds"].values()) / 60
    stdout.print(f"report: {out / 'report.html'}  ({minutes:.1f} min)")


class _Bars:
    """Two rich bars: the whole run (with the time left, from the stages' estimated weights) and the stage."""

    def __init__(self):
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TimeElapsedColumn(),
                                 TextColumn("left"), TimeRemainingColumn(), console=console, transient=False)
        self.whole = self.progress.add_task("retfm demo", total=None)
        self.current = None
        self.weight = 0.0

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def total(self, seconds: float) -> None:
        self.progress.update(self.whole, total=seconds)

    def stage(self, name: str, units: int, seconds_per_unit: float) -> None:
        if self.current is not None:
            self.progress.update(self.current, completed=self.progress.tasks[self.current].total)
            self.progress.stop_task(self.current)
        self.current = self.progress.add_task(f"  {name}", total=units)
        self.weight = seconds_per_unit

    def advance(self, units: int = 1) -> None:
        self.progress.advance(self.current, units)
        self.progress.advance(self.whole, units * self.weight)
