"""``retfm zeroshot``: classify images by the descriptions of conditions, with an image-text model."""

from __future__ import annotations

from pathlib import Path

import typer

from retfm.cli.common import print_metrics, progress_bar, stdout
from retfm.config import comma_separated


def zeroshot(
    data: Path = typer.Option(..., "--data", help="ingest folder or manifest"),
    model: Path = typer.Option(..., "--model", help="folder of a `retfm pretrain --objective clip` run"),
    label: str = typer.Option(..., "--label", help="label column whose values are the classes"),
    out: Path = typer.Option(..., "--out", help="output folder (predictions.parquet, metrics.json, report.html, "
                                                "image_embeddings.parquet)"),
    classes: str = typer.Option(None, "--classes", help="conditions per label value: '0=normal fundus,1=glaucoma', "
                                                        "or names in sorted-value order [default: the knowledge "
                                                        "base's label map for --label]"),
    split: str = typer.Option("test", "--split", help="split to classify; 'all' for every image"),
    modality: str = typer.Option(None, "--modality", help="cfp|uwf|oct|fa: which signs the prompts describe "
                                                          "[default: the images' modality, else cfp]"),
    by: str = typer.Option(None, "--by", help="group columns for per-group metrics, e.g. site,sex"),
    bootstrap: int = typer.Option(1000, "--bootstrap", help="bootstrap resamples for the CIs"),
    workers: int = typer.Option(0, "--workers", help="decoding processes"),
    device: str = typer.Option("cpu", "--device", help="cpu|cuda"),
) -> None:
    """Zero-shot disease recognition: prompts from the disease knowledge base, Top-1/3/5 accuracy and AUROC."""
    from retfm.zeroshot.classify import zeroshot as run_zeroshot

    groups = comma_separated(by or "")
    with progress_bar("embed", unit="img") as (total, advance):
        result = run_zeroshot(data, model, label, out, classes=classes, split=None if split == "all" else split,
                              modality=modality, by=groups, n_boot=bootstrap, workers=workers, device=device,
                              progress=advance, total=total)
    for name, value in result["top_k"].items():
        stdout.print(f"{name}: {value:.4f}")
    print_metrics(result)
    stdout.print(f"wrote {out / 'predictions.parquet'}, {out / 'metrics.json'}, {out / 'report.html'}")
