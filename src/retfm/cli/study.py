"""``retfm study``: a grid of fine-tuning runs, cached cell by cell, with one table and one report."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import typer
from rich.table import Table

from retfm.cli.common import SetOption, console, progress_bar, stdout


def study(
    config: Path = typer.Argument(..., help="study YAML: data, label, by, finetune options, and the grid axes "
                                            "models, adaptations, label_fractions, seeds, sites (docs/study.md)"),
    out: Path = typer.Option(None, "--out", help="study folder: cells/, results.csv, comparisons.csv, report.html "
                                                 "[default: runs/<config name>]"),
    sets: list[str] = typer.Option(None, "--set", help=SetOption + ", e.g. --set finetune.epochs=5"),
) -> None:
    """Run every cell of a fine-tuning grid (cells already done are read back, interrupted ones resume), compare
    models on the same test images, and write one results table and report. Exits 1 when a cell failed."""
    from retfm.adapt.study import run_study
    from retfm.adapt.config import StudyConfig
    from retfm.config import load_config

    cfg = load_config(StudyConfig, config, None, sets)
    out = out or Path("runs") / config.stem

    def report(cell, status, error):
        if error:
            console.print(f"[red]cell {cell.key} failed:[/red] {error}", highlight=False, soft_wrap=True)

    with progress_bar("study", unit="cell") as (total, advance):
        result = run_study(cfg, out, progress=advance, total=total, on_cell=report)
    stdout.print(_summary(result))
    failed = int((result["cells"]["status"] == "failed").sum())
    stdout.print(f"wrote {out / 'results.csv'}, {out / 'comparisons.csv'}, {out / 'cells.csv'}, "
                 f"{out / 'report.html'}")
    if failed:
        console.print(f"[red]{failed} of {len(result['cells'])} cells failed[/red] (see {out / 'cells.csv'})")
        raise typer.Exit(1)


def _summary(result: dict) -> Table:
    """One line per cell: its axes, status and the headline metric with its CI."""
    results = result["results"]
    overall = results[results["group_column"].isna()].set_index(["cell", "metric"])
    table = Table("model", "adaptation", "fraction", "seed", "train -> test", "status", "AUROC (95% CI)")
    for row in result["cells"].itertuples():
        score = "–"
        if (row.cell, "auroc") in overall.index:
            value = overall.loc[(row.cell, "auroc")]
            if pd.notna(value["value"]):
                score = f"{value['value']:.3f}" + (f" ({value['ci_low']:.3f}-{value['ci_high']:.3f})"
                                                   if pd.notna(value["ci_low"]) else "")
        table.add_row(row.model, row.adaptation, f"{row.label_fraction:g}", str(row.seed),
                      f"{row.train_site} -> {row.test_site}", row.status, score)
    return table
