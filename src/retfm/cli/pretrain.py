"""``retfm pretrain``: self-supervised pretraining (MAE, token reconstruction) on one or more manifests."""

from __future__ import annotations

from pathlib import Path

import typer

from retfm.cli.common import ConfigOption, SetOption, console, progress_bar, stdout


def pretrain(
    objective: str = typer.Option(None, "--objective", help="mae|token-reconstruction|clip"),
    data: list[str] = typer.Option(None, "--data", help="ingest folder or manifest (repeatable: mixed), or shards "
                                                        "from `retfm data shard` (folder, brace pattern or URL)"),
    data_weights: str = typer.Option(None, "--data-weights", help="sampling shares of the --data, e.g. 0.7,0.3 "
                                                                  "[default: by size]"),
    model: str = typer.Option(None, "--model", help="architecture: registry name or retfm checkpoint"),
    init: str = typer.Option(None, "--init", help="initial weights: a file, or 'published' for the model's "
                                                        "own (e.g. ImageNet for efficientnet-lite0) [default: random "
                                                        "initialisation]"),
    out: Path = typer.Option(..., "--out", help="run folder: checkpoint.pt, log.jsonl, model.safetensors + card"),
    steps: int = typer.Option(None, "--steps", help="optimiser steps [default: 1000]"),
    batch_size: int = typer.Option(None, "--batch-size", help="images per micro-batch [default: 64]"),
    device: str = typer.Option(None, "--device", help="cpu|cuda [default: cpu]"),
    precision: str = typer.Option(None, "--precision", help="fp32|bf16|fp16 [default: fp32]"),
    workers: int = typer.Option(None, "--workers", help="decoding processes [default: half the cores, at most 4]"),
    seed: int = typer.Option(None, "--seed", help="seed [default: 0]"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --out from its last checkpoint"),
    config: Path = typer.Option(None, "--config", help=ConfigOption),
    sets: list[str] = typer.Option(None, "--set", help=SetOption),
) -> None:
    """Pretrain a backbone self-supervised; the result loads wherever a model name does."""
    from retfm.config import load_config
    from retfm.pretrain.config import PretrainConfig
    from retfm.pretrain.trainer import MODEL_FILENAME, pretrain as run_pretrain

    options = {"objective": objective, "data": data or None, "data_weights": data_weights, "model": model,
               "init": init, "steps": steps, "batch_size": batch_size, "device": device, "precision": precision,
               "workers": workers, "seed": seed}
    cfg = load_config(PretrainConfig, config, options, sets)

    def show(record: dict) -> None:
        console.print(f"step {record['step']}: loss {record['loss']:.4f}, lr {record['lr']:.2e}, "
                      f"{record['images_per_s']:.1f} img/s", highlight=False)

    with progress_bar("pretrain", unit="step") as (total, advance):
        card = run_pretrain(cfg, out, resume=resume, progress=advance, total=total, on_log=show)
    stdout.print(f"pretrained {card['name']}: {card['steps']} steps, {card['images_seen']} images seen, "
                 f"{card['compute']['device_hours'] * 60:.1f} min; backbone: {out / MODEL_FILENAME}")
