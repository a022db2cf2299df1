"""``retfm embed`` and ``retfm probe``: frozen-model embeddings, and a light head evaluated on them."""

from __future__ import annotations

from pathlib import Path

import typer

from retfm.cli.common import ConfigOption, SetOption, console, print_metrics, progress_bar, stdout


def embed(
    data: Path = typer.Option(..., "--data", help="ingest folder or manifest file"),
    model: str = typer.Option(None, "--model", help="registry name (see `retfm models list`) or retfm checkpoint"),
    out: Path = typer.Option(..., "--out", help="embeddings Parquet file to write (resumed if it exists)"),
    weights: str = typer.Option(None, "--weights", help="weights file, or 'random' (drawn from seed 0) [default: the model's source]"),
    batch_size: int = typer.Option(None, "--batch-size", help="images per forward pass [default: 4 on CPU, 64 on CUDA]"),
    device: str = typer.Option(None, "--device", help="cpu|cuda [default: cpu]"),
    engine: str = typer.Option(None, "--engine", help="auto|torch|onnxruntime|openvino [default: auto: the fastest "
                                                      "whose features match PyTorch eager fp32 on your images]"),
    precision: str = typer.Option(None, "--precision", help="fp32|bf16|int8 [default: fp32, or bf16 under auto where "
                                                            "the CPU has it and the features match]"),
    workers: int = typer.Option(None, "--workers", help="decoding processes [default: half the cores, at most 4]"),
    split: str = typer.Option(None, "--split", help="embed only this split"),
    config: Path = typer.Option(None, "--config", help=ConfigOption),
    sets: list[str] = typer.Option(None, "--set", help=SetOption),
) -> None:
    """Compute one embedding per image with a foundation model and its own preprocessing."""
    from retfm.adapt.embed import embed as run_embed
    from retfm.adapt.config import EmbedConfig
    from retfm.config import load_config

    options = {"model": model, "weights": weights, "batch_size": batch_size, "device": device, "engine": engine,
               "precision": precision, "workers": workers, "split": split}
    cfg = load_config(EmbedConfig, config, options, sets)
    with progress_bar("embed", unit="img") as (total, advance):
        summary = run_embed(data, out, cfg, progress=advance, total=total)
    stdout.print(f"{summary['images']} embeddings of size {summary['embed_dim']} in {out} "
                 f"({summary['embedded_now']} computed now, {summary['resumed']} kept from an earlier run)")
    if summary.get("engine"):
        stdout.print(summary["engine"])


def probe(
    embeddings: Path = typer.Option(..., "--embeddings", help="embeddings Parquet from `retfm embed`"),
    label: str = typer.Option(None, "--label", help="label column to predict"),
    out: Path = typer.Option(..., "--out", help="output folder (predictions.parquet, metrics.json, report.html)"),
    head: str = typer.Option(None, "--head", help="logreg|knn [default: logreg]"),
    class_weight: str = typer.Option(None, "--class-weight", help="none|balanced [default: none]"),
    task: str = typer.Option(None, "--task", help="auto|binary|multiclass|ordinal [default: auto]"),
    by: str = typer.Option(None, "--by", help="group columns for per-group metrics, e.g. site,sex"),
    bootstrap: int = typer.Option(None, "--bootstrap", help="bootstrap resamples for the CIs [default: 1000]"),
    seed: int = typer.Option(None, "--seed", help="seed [default: 0]"),
    config: Path = typer.Option(None, "--config", help=ConfigOption),
    sets: list[str] = typer.Option(None, "--set", help=SetOption),
) -> None:
    """Fit a logistic-regression or kNN head on train embeddings (C or k chosen on val), evaluate on test."""
    from retfm.adapt.probe import probe as run_probe
    from retfm.adapt.config import ProbeConfig
    from retfm.config import load_config

    options = {"label": label, "head": head, "class_weight": class_weight, "task": task, "by": by,
               "bootstrap": bootstrap, "seed": seed}
    cfg = load_config(ProbeConfig, config, options, sets)
    with console.status("fitting the head and bootstrapping the metrics"):
        result = run_probe(embeddings, out, cfg)
    print_metrics(result)
    stdout.print(f"wrote {out / 'predictions.parquet'}, {out / 'metrics.json'}, {out / 'report.html'}")
