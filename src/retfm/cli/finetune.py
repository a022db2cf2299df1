"""``retfm finetune``: adapt a model to a labelled task (full, linear or LoRA), select on val, evaluate on test."""

from __future__ import annotations

from pathlib import Path

import typer

from retfm.adapt.config import FinetuneConfig
from retfm.cli.common import config_command, print_metrics, progress_bar, stdout


@config_command(FinetuneConfig, "data", "model", "weights", "label", "adaptation", "label_fraction", "epochs",
                "batch_size", "by", "device", "precision", "seed")
def finetune(
    config: FinetuneConfig,
    out: Path = typer.Option(..., "--out", help="run folder: model.safetensors, predictions.parquet, metrics.json, "
                                                "report.html"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --out from its last whole epoch"),
) -> None:
    """Fine-tune a foundation model on a label (RETFound's recipe), pick the best epoch on val, evaluate on test."""
    from retfm.adapt.finetune import finetune as run_finetune

    with progress_bar("finetune", unit="epoch") as (total, advance):
        result = run_finetune(config, out, resume=resume, progress=advance, total=total)
    meta = result["meta"]
    stdout.print(f"best epoch {meta['best_epoch'] + 1} of {meta['epochs_run']} (val {meta['select_metric']} "
                 f"{meta['best_val_score']:.4f})")
    print_metrics(result, prefix="test ")
    stdout.print(f"wrote {out / 'model.safetensors'}, {out / 'predictions.parquet'}, {out / 'metrics.json'}, "
                 f"{out / 'report.html'}")
