"""``retfm zeroshot``: classify images by the descriptions of conditions, with an image-text model."""

from __future__ import annotations

from pathlib import Path

import typer

from retfm.cli.common import config_command, print_metrics, progress_bar, stdout
from retfm.zeroshot.config import ZeroshotConfig


@config_command(ZeroshotConfig, "label", "classes", "split", "modality", "by", "bootstrap", "workers", "device")
def zeroshot(
    config: ZeroshotConfig,
    data: Path = typer.Option(..., "--data", help="ingest folder or manifest"),
    model: Path = typer.Option(..., "--model", help="folder of a `retfm pretrain --objective clip` run"),
    out: Path = typer.Option(..., "--out", help="output folder (predictions.parquet, metrics.json, report.html, "
                                                "image_embeddings.parquet)"),
) -> None:
    """Zero-shot disease recognition: prompts from the disease knowledge base, Top-1/3/5 accuracy and AUROC."""
    from retfm.zeroshot.classify import zeroshot as run_zeroshot

    with progress_bar("embed", unit="img") as (total, advance):
        result = run_zeroshot(data, model, out, config, progress=advance, total=total)
    for name, value in result["top_k"].items():
        stdout.print(f"{name}: {value:.4f}")
    print_metrics(result)
    stdout.print(f"wrote {out / 'predictions.parquet'}, {out / 'metrics.json'}, {out / 'report.html'}")
