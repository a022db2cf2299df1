"""``retfm synth``: train a label-conditioned image generator, sample a synthetic cohort, audit it; a site exports
its generator and the coordinator assembles every site's samples into one pretraining set."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from retfm.cli.common import ConfigOption, SetOption, console, progress_bar, stdout

app = typer.Typer(help="Synthetic fundus images: conditional diffusion (train, sample, export, assemble) and audits.",
                  no_args_is_help=True, rich_markup_mode=None)


# the sampling options of `sample` and `assemble`
Sampler = Annotated[str, typer.Option("--sampler", help="ddim|dpm [default: ddim]")]
InferenceSteps = Annotated[int, typer.Option("--inference-steps", help="denoising steps [default: 50]")]
Guidance = Annotated[float, typer.Option("--guidance", help="classifier-free guidance scale [default: 2.0]")]
SampleBatch = Annotated[int, typer.Option("--batch-size", help="images per batch [default: 64]")]
Device = Annotated[str, typer.Option("--device", help="cpu|cuda [default: cpu]")]
Seed = Annotated[int, typer.Option("--seed", help="seed [default: 0]")]
BaseModel = Annotated[str, typer.Option("--base-model", help="local diffusers folder of the base model a LoRA "
                                                             "generator adapts (never downloaded)")]


@app.command()
def train(
    data: str = typer.Option(None, "--data", help="ingest folder or manifest with the real images"),
    label: str = typer.Option(None, "--label", help="label column the images are conditioned on, e.g. dr_grade"),
    cond: list[str] = typer.Option(None, "--cond", help="further condition column, e.g. site (repeatable)"),
    out: Path = typer.Option(..., "--out", help="generator folder: unet/ and scheduler/ (or lora/), "
                                                "generator.json, checkpoint.pt, log.jsonl"),
    base_model: str = typer.Option(None, "--base-model", help="local diffusers folder of a pretrained "
                                   "Stable-Diffusion-style model: train a LoRA adapter of it, prompted with the "
                                   "labels, instead of a pixel UNet (never downloaded)"),
    size: int = typer.Option(None, "--size", help="image side in pixels: 64, 128 or 256 (any multiple of 2^(levels-1)) [default: 64]"),
    steps: int = typer.Option(None, "--steps", help="optimiser steps [default: 2000]"),
    batch_size: int = typer.Option(None, "--batch-size", help="images per step [default: 32]"),
    device: str = typer.Option(None, "--device", help="cpu|cuda [default: cpu]"),
    workers: int = typer.Option(None, "--workers", help="decoding processes [default: half the cores, at most 4]"),
    seed: int = typer.Option(None, "--seed", help="seed [default: 0]"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --out from its last checkpoint"),
    config: Path = typer.Option(None, "--config", help=ConfigOption),
    sets: list[str] = typer.Option(None, "--set", help=SetOption),
) -> None:
    """Train a class-conditional diffusion model (classifier-free guidance) on real fundus images, or a LoRA
    adapter of a local pretrained text-to-image model (--base-model)."""
    from retfm.config import load_config
    from retfm.synth.config import SynthTrainConfig
    from retfm.synth.train import train as run_train

    options = {"data": data, "label": label, "cond": cond or None, "base_model": base_model, "size": size,
               "steps": steps, "batch_size": batch_size, "device": device, "workers": workers, "seed": seed}
    cfg = load_config(SynthTrainConfig, config, options, sets)

    def show(record: dict) -> None:
        console.print(f"step {record['step']}: loss {record['loss']:.4f}, lr {record['lr']:.2e}", highlight=False)

    with progress_bar("synth train", unit="step") as (total, advance):
        card = run_train(cfg, out, resume=resume, progress=advance, total=total, on_log=show)
    stdout.print(f"trained {card['generator_id']}: {card['steps']} steps, {card['images_seen']} images seen, "
                 f"{card['compute']['device_hours'] * 60:.1f} min; generator: {out}")


@app.command()
def sample(
    generator: Path = typer.Option(..., "--generator", help="folder written by `retfm synth train`"),
    n: int = typer.Option(None, "--n", help="number of images"),
    labels: str = typer.Option(None, "--labels", help='condition shares, e.g. "dr_grade=0:0.5,1:0.2,2:0.3" '
                                                      '(";" between columns) [default: the training shares]'),
    out: Path = typer.Option(..., "--out", help="folder for images/ and manifest.parquet (resumed if it exists)"),
    sampler: Sampler = None,
    inference_steps: InferenceSteps = None,
    guidance: Guidance = None,
    batch_size: SampleBatch = None,
    device: Device = None,
    seed: Seed = None,
    base_model: BaseModel = None,
    config: Path = typer.Option(None, "--config", help=ConfigOption),
    sets: list[str] = typer.Option(None, "--set", help=SetOption),
) -> None:
    """Generate a synthetic cohort and a manifest that `retfm pretrain --data` accepts."""
    from retfm.config import load_config
    from retfm.synth.config import SynthSampleConfig
    from retfm.synth.sample import sample as run_sample

    options = {"n": n, "labels": labels, "sampler": sampler, "inference_steps": inference_steps,
               "guidance": guidance, "batch_size": batch_size, "device": device, "seed": seed,
               "base_model": base_model}
    cfg = load_config(SynthSampleConfig, config, options, sets)
    with progress_bar("synth sample", unit="img") as (total, advance):
        summary = run_sample(generator, out, cfg, progress=advance, total=total)
    stdout.print(f"{summary['images']} synthetic images in {out} ({summary['generated_now']} generated now, "
                 f"{summary['kept']} kept from an earlier run)")


@app.command()
def audit(
    generator: Path = typer.Option(..., "--generator", help="folder written by `retfm synth train`"),
    real: Path = typer.Option(..., "--real", help="ingest folder or manifest of the real images it was trained on"),
    synthetic: Path = typer.Option(..., "--synthetic", help="folder written by `retfm synth sample`"),
    out: Path = typer.Option(..., "--out", help="folder for audit.json and report.html"),
    model: str = typer.Option(None, "--model", help="encoder: registry name, retfm checkpoint or pixels [default: "
                                                    "tiny-vit; use a pretrained retinal encoder]"),
    weights: str = typer.Option(None, "--weights", help="encoder weights file, or 'random' [default: its own]"),
    device: str = typer.Option(None, "--device", help="cpu|cuda [default: cpu]"),
    config: Path = typer.Option(None, "--config", help=ConfigOption),
    sets: list[str] = typer.Option(None, "--set", help=SetOption),
) -> None:
    """Fidelity (Frechet distance, precision/recall), label fidelity and memorisation of synthetic images."""
    from retfm.config import load_config
    from retfm.synth.config import SynthAuditConfig
    from retfm.synth.audit import audit as run_audit

    cfg = load_config(SynthAuditConfig, config, {"model": model, "weights": weights, "device": device}, sets)
    result = run_audit(generator, real, synthetic, out, cfg)
    m, fidelity, labels = result["memorisation"], result["fidelity"], result["label_fidelity"]
    stdout.print(f"Frechet distance {fidelity['frechet_distance']:.3f}, precision {fidelity['precision']:.3f}, "
                 f"recall {fidelity['recall']:.3f}")
    if "accuracy" in labels:
        stdout.print(f"label fidelity: accuracy {labels['accuracy']:.3f} (chance {labels['chance_accuracy']:.3f}), "
                     f"kappa {labels['kappa']:.3f}")
    stdout.print(f"memorisation: {m['near_copies']} near-copies ({100 * m['near_copy_share']:.1f}%), "
                 f"{'FLAGGED' if m['flagged'] else 'not flagged'}; report: {out / 'report.html'}")


@app.command()
def export(
    generator: Path = typer.Option(..., "--generator", help="folder written by `retfm synth train`"),
    out: Path = typer.Option(..., "--out", help="new folder: the submission a site sends the coordinator"),
) -> None:
    """Copy what a site sends the coordinator: unet/, scheduler/ (a LoRA generator: lora/) and generator.json (no
    checkpoint, log or config)."""
    from retfm.synth.assemble import export as run_export

    card = run_export(generator, out)
    stdout.print(f"submission of {card['generator_id']} (sites: {', '.join(map(str, card['data']['sites']))}) in "
                 f"{out}; send this folder to the coordinator")


@app.command()
def assemble(
    generator: list[Path] = typer.Option(..., "--generator", help="a site's submitted generator folder "
                                                                   "(repeatable, once per generator)"),
    n: int = typer.Option(None, "--n", help="images per generator (or in all with --allocation by_images)"),
    allocation: str = typer.Option(None, "--allocation", help="per_generator|by_images (n split by each "
                                                              "generator's training images) [default: per_generator]"),
    out: Path = typer.Option(..., "--out", help="folder for <site>/ samples, manifest.parquet and provenance.json "
                                                "(resumed if it exists)"),
    sampler: Sampler = None,
    inference_steps: InferenceSteps = None,
    guidance: Guidance = None,
    batch_size: SampleBatch = None,
    device: Device = None,
    seed: Seed = None,
    base_model: BaseModel = None,
    config: Path = typer.Option(None, "--config", help=ConfigOption),
    sets: list[str] = typer.Option(None, "--set", help=SetOption),
) -> None:
    """Sample every site's generator in its own label mix into one synthetic pretraining set with provenance."""
    from retfm.config import load_config
    from retfm.synth.config import SynthAssembleConfig
    from retfm.synth.assemble import assemble as run_assemble

    options = {"n": n, "allocation": allocation, "sampler": sampler, "inference_steps": inference_steps,
               "guidance": guidance, "batch_size": batch_size, "device": device, "seed": seed,
               "base_model": base_model}
    cfg = load_config(SynthAssembleConfig, config, options, sets)
    with progress_bar("synth assemble", unit="img") as (total, advance):
        summary = run_assemble(generator, out, cfg, progress=advance, total=total)
    stdout.print(f"{summary['images']} synthetic images from {summary['generators']} generators in {out} "
                 f"({summary['generated_now']} generated now, {summary['kept']} kept); manifest and "
                 f"provenance.json there; pretrain with --data {out}")
