"""``retfm pretrain``: self-supervised pretraining (MAE, token reconstruction, CLIP) on one or more manifests."""

from __future__ import annotations

from pathlib import Path

import typer

from retfm.cli.common import config_command, console, progress_bar, stdout
from retfm.pretrain.config import PretrainConfig


@config_command(PretrainConfig, "objective", "data", "data_weights", "model", "init", "steps", "batch_size", "device",
                "precision", "workers", "seed")
def pretrain(
    config: PretrainConfig,
    out: Path = typer.Option(..., "--out", help="run folder: checkpoint.pt, log.jsonl, model.safetensors + card"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --out from its last checkpoint"),
) -> None:
    """Pretrain a backbone self-supervised; the result loads wherever a model name does."""
    from retfm.pretrain.trainer import MODEL_FILENAME, pretrain as run_pretrain

    def show(record: dict) -> None:
        console.print(f"step {record['step']}: loss {record['loss']:.4f}, lr {record['lr']:.2e}, "
                      f"{record['images_per_s']:.1f} img/s", highlight=False)

    with progress_bar("pretrain", unit="step") as (total, advance):
        card = run_pretrain(config, out, resume=resume, progress=advance, total=total, on_log=show)
    stdout.print(f"pretrained {card['name']}: {card['steps']} steps, {card['images_seen']} images seen, "
                 f"{card['compute']['device_hours'] * 60:.1f} min; backbone: {out / MODEL_FILENAME}")
