"""``retfm evaluate``: metrics with bootstrap CIs, per-group gaps and an HTML report from a predictions file."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from retfm.cli.common import console, stdout, write_json
from retfm.config import comma_separated
from retfm.errors import RetfmError


def evaluate(
    predictions: Path = typer.Option(..., "--predictions", help="predictions.parquet written by `retfm probe`, "
                                                                "or the folder holding it"),
    label: str = typer.Option(..., "--label", help="the true label column, e.g. dr_grade"),
    out: Path = typer.Option(..., "--out", help="output folder for metrics.json and report.html"),
    by: str = typer.Option("", "--by", help="comma-separated group columns, e.g. site,country,sex,age "
                                            "(age is banded into decades)"),
    bootstrap: int = typer.Option(1000, "--bootstrap", min=0, help="bootstrap resamples for the 95% CIs "
                                                                   "(patients when there is a patient_id; 0: no CIs)"),
    seed: int = typer.Option(0, "--seed", help="bootstrap seed (same seed, same CIs)"),
) -> None:
    """Score predictions: AUROC, AUPR, accuracy, kappa, MCC, sensitivity, specificity and calibration with 95%
    bootstrap CIs, overall and per group, and each group column's best-to-worst gap; writes metrics.json and a
    self-contained report.html."""
    from retfm.evaluate import evaluate_predictions, read_predictions, write_report
    from retfm.evaluate.report import METRIC_NAMES

    table, info = read_predictions(predictions)
    columns = comma_separated(by)
    try:
        result = evaluate_predictions(table, label, info["classes"], info["task"], info["threshold"], by=columns,
                                      n_boot=bootstrap, seed=seed, meta=info["meta"])
    except RetfmError as exc:  # the library does not know the file; the user needs it
        raise RetfmError(f"{predictions}: {exc}") from None
    write_json(out / "metrics.json", result)
    report = write_report(result, table, label, out)

    headline = Table(title=f"{label}: {result['task']}, n={result['n']}")
    for column in ("metric", "value", "95% CI", "resamples"):
        headline.add_column(column, justify="left" if column == "metric" else "right")
    for name, metric in result["metrics"].items():
        ci = metric["ci"]
        headline.add_row(METRIC_NAMES[name], "-" if metric["value"] is None else f"{metric['value']:.3f}",
                         "-" if ci is None else f"{ci[0]:.3f} - {ci[1]:.3f}", str(metric["n_boot"]))
    stdout.print(headline)
    for column, gaps in result["gaps"].items():
        main = gaps.get("auroc") or gaps.get("accuracy")
        if main:
            stdout.print(f"{column}: best {main['best']}, worst {main['worst']}, gap {main['gap']:.3f} "
                         f"({'AUROC' if 'auroc' in gaps else 'accuracy'})")
    for note in result["notes"]:
        console.print(f"[yellow]note:[/yellow] {note}", highlight=False)
    console.print(f"metrics: {out / 'metrics.json'}\nreport: {report}")
