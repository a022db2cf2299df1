"""``retfm embed`` and ``retfm probe``: frozen-model embeddings, and a light head evaluated on them."""

from __future__ import annotations

from pathlib import Path

import typer

from retfm.adapt.config import EmbedConfig, ProbeConfig
from retfm.cli.common import config_command, console, print_metrics, progress_bar, stdout


@config_command(EmbedConfig, "model", "weights", "batch_size", "device", "engine", "precision", "workers", "split")
def embed(
    config: EmbedConfig,
    data: Path = typer.Option(..., "--data", help="ingest folder or manifest file"),
    out: Path = typer.Option(..., "--out", help="embeddings Parquet file to write (resumed if it exists)"),
) -> None:
    """Compute one embedding per image with a foundation model and its own preprocessing."""
    from retfm.adapt.embed import embed as run_embed

    with progress_bar("embed", unit="img") as (total, advance):
        summary = run_embed(data, out, config, progress=advance, total=total)
    stdout.print(f"{summary['images']} embeddings of size {summary['embed_dim']} in {out} "
                 f"({summary['embedded_now']} computed now, {summary['resumed']} kept from an earlier run)")
    if summary.get("engine"):
        stdout.print(summary["engine"])


@config_command(ProbeConfig, "label", "head", "class_weight", "task", "by", "bootstrap", "seed")
def probe(
    config: ProbeConfig,
    embeddings: Path = typer.Option(..., "--embeddings", help="embeddings Parquet from `retfm embed`"),
    out: Path = typer.Option(..., "--out", help="output folder (predictions.parquet, metrics.json, report.html)"),
) -> None:
    """Fit a logistic-regression or kNN head on train embeddings (C or k chosen on val), evaluate on test."""
    from retfm.adapt.probe import probe as run_probe

    with console.status("fitting the head and bootstrapping the metrics"):
        result = run_probe(embeddings, out, config)
    print_metrics(result)
    stdout.print(f"wrote {out / 'predictions.parquet'}, {out / 'metrics.json'}, {out / 'report.html'}")
