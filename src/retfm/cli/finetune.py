"""``retfm finetune``: adapt a model to a labelled task (full, linear or LoRA), select on val, evaluate on test."""

from __future__ import annotations

from pathlib import Path

import typer

from retfm.cli.common import ConfigOption, SetOption, print_metrics, progress_bar, stdout


def finetune(
    data: str = typer.Option(None, "--data", help="ingest folder or manifest with train/val/test splits"),
    model: str = typer.Option(None, "--model", help="registry name or retfm checkpoint (e.g. runs/mae/model.safetensors)"),
    weights: str = typer.Option(None, "--weights", help="weights file, or 'random' [default: the model's own]"),
    label: str = typer.Option(None, "--label", help="label column to predict"),
    out: Path = typer.Option(..., "--out", help="run folder: model.safetensors, predictions.parquet, metrics.json, "
                                                "report.html"),
    adaptation: str = typer.Option(None, "--adaptation", help="full|linear|lora [default: full]"),
    label_fraction: float = typer.Option(None, "--label-fraction", help="share of training patients kept, "
                                                                        "stratified by label [default: 1]"),
    epochs: int = typer.Option(None, "--epochs", help="training epochs [default: 50]"),
    batch_size: int = typer.Option(None, "--batch-size", help="images per batch [default: 16]"),
    by: str = typer.Option(None, "--by", help="group columns for per-group metrics, e.g. site,sex"),
    device: str = typer.Option(None, "--device", help="cpu|cuda [default: cpu]"),
    precision: str = typer.Option(None, "--precision", help="fp32|bf16 [default: fp32]"),
    seed: int = typer.Option(None, "--seed", help="seed [default: 0]"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --out from its last whole epoch"),
    config: Path = typer.Option(None, "--config", help=ConfigOption),
    sets: list[str] = typer.Option(None, "--set", help=SetOption),
) -> None:
    """Fine-tune a foundation model on a label (RETFound's recipe), pick the best epoch on val, evaluate on test."""
    from retfm.adapt.finetune import finetune as run_finetune
    from retfm.adapt.config import FinetuneConfig
    from retfm.config import load_config

    options = {"data": data, "model": model, "weights": weights, "label": label, "adaptation": adaptation,
               "label_fraction": label_fraction, "epochs": epochs, "batch_size": batch_size, "by": by,
               "device": device, "precision": precision, "seed": seed}
    cfg = load_config(FinetuneConfig, config, options, sets)
    with progress_bar("finetune", unit="epoch") as (total, advance):
        result = run_finetune(cfg, out, resume=resume, progress=advance, total=total)
    meta = result["meta"]
    stdout.print(f"best epoch {meta['best_epoch'] + 1} of {meta['epochs_run']} (val {meta['select_metric']} "
                 f"{meta['best_val_score']:.4f})")
    print_metrics(result, prefix="test ")
    stdout.print(f"wrote {out / 'model.safetensors'}, {out / 'predictions.parquet'}, {out / 'metrics.json'}, "
                 f"{out / 'report.html'}")
