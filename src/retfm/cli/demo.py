"""``retfm demo``: the whole road on built-in data (phantoms -> de-identified ingest -> federated pretraining ->
probes -> per-site evaluation -> report)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from retfm.cli.common import console, stdout


def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="folder for every stage's files and report.html"),
    data: Path = typer.Option(None, "--data", help="an ingest folder with several sites instead of phantoms"),
    quick: bool = typer.Option(False, "--quick", help="3 small sites, 2 rounds: about a minute on two cores"),
) -> None:
    """Build and evaluate a small global model end to end on built-in data; writes OUT/report.html."""
    from retfm.demo import LABELS, run_demo

    results = run_demo(out, data, quick, say=lambda line: console.print(line, highlight=False))
    table = Table(title="test AUROC (95% CI)")
    table.add_column("model")
    for label in LABELS:
        table.add_column(label, justify="right")
    for name, per_label in results["models"].items():
        cells = []
        for label in LABELS:
            auroc = per_label[label]["overall"]["auroc"]
            ci = auroc.get("ci") or [None, None]
            cells.append("undefined" if auroc["value"] is None else f"{auroc['value']:.3f}"
                         + (f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci[0] is not None else ""))
        table.add_row(name, *cells)
    stdout.print(table)
    stdout.print(f"report: {out / 'report.html'}  ({sum(results['seconds'].values()) / 60:.1f} min)")
