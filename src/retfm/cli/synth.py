"""``retfm synth``: train a label-conditioned image generator, sample a synthetic cohort, audit it; a site exports
its generator and the coordinator assembles every site's samples into one pretraining set."""

from __future__ import annotations

from pathlib import Path

import typer

from retfm.cli.common import config_command, console, progress_bar, stdout
from retfm.synth.config import SynthAssembleConfig, SynthAuditConfig, SynthSampleConfig, SynthTrainConfig

app = typer.Typer(help="Synthetic fundus images: conditional diffusion (train, sample, export, assemble) and audits.",
                  no_args_is_help=True, rich_markup_mode=None)

GENERATOR_HELP = "folder written by `retfm synth train`"
SAMPLER_OPTIONS = ("sampler", "inference_steps", "guidance", "batch_size", "device", "seed", "base_model")


@app.command()
@config_command(SynthTrainConfig, "data", "label", "cond", "base_model", "size", "steps", "batch_size", "device",
                "workers", "seed")
def train(
    config: SynthTrainConfig,
    out: Path = typer.Option(..., "--out", help="generator folder: unet/ and scheduler/ (or lora/), "
                                                "generator.json, checkpoint.pt, log.jsonl"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --out from its last checkpoint"),
) -> None:
    """Train a class-conditional diffusion model (classifier-free guidance) on real fundus images, or a LoRA
    adapter of a local pretrained text-to-image model (--base-model)."""
    from retfm.synth.train import train as run_train

    def show(record: dict) -> None:
        console.print(f"step {record['step']}: loss {record['loss']:.4f}, lr {record['lr']:.2e}", highlight=False)

    with progress_bar("synth train", unit="step") as (total, advance):
        card = run_train(config, out, resume=resume, progress=advance, total=total, on_log=show)
    stdout.print(f"trained {card['generator_id']}: {card['steps']} steps, {card['images_seen']} images seen, "
                 f"{card['compute']['device_hours'] * 60:.1f} min; generator: {out}")


@app.command()
@config_command(SynthSampleConfig, "n", "labels", *SAMPLER_OPTIONS)
def sample(
    config: SynthSampleConfig,
    generator: Path = typer.Option(..., "--generator", help=GENERATOR_HELP),
    out: Path = typer.Option(..., "--out", help="folder for images/ and manifest.parquet (resumed if it exists)"),
) -> None:
    """Generate a synthetic cohort and a manifest that `retfm pretrain --data` accepts."""
    from retfm.synth.sample import sample as run_sample

    with progress_bar("synth sample", unit="img") as (total, advance):
        summary = run_sample(generator, out, config, progress=advance, total=total)
    stdout.print(f"{summary['images']} synthetic images in {out} ({summary['generated_now']} generated now, "
                 f"{summary['kept']} kept from an earlier run)")


@app.command()
@config_command(SynthAuditConfig, "model", "weights", "device")
def audit(
    config: SynthAuditConfig,
    generator: Path = typer.Option(..., "--generator", help=GENERATOR_HELP),
    real: Path = typer.Option(..., "--real", help="ingest folder or manifest of the real images it was trained on"),
    synthetic: Path = typer.Option(..., "--synthetic", help="folder written by `retfm synth sample`"),
    out: Path = typer.Option(..., "--out", help="folder for audit.json and report.html"),
) -> None:
    """Fidelity (Frechet distance, precision/recall), label fidelity and memorisation of synthetic images."""
    from retfm.synth.audit import audit as run_audit

    result = run_audit(generator, real, synthetic, out, config)
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
    generator: Path = typer.Option(..., "--generator", help=GENERATOR_HELP),
    out: Path = typer.Option(..., "--out", help="new folder: the submission a site sends the coordinator"),
) -> None:
    """Copy what a site sends the coordinator: unet/, scheduler/ (a LoRA generator: lora/) and generator.json (no
    checkpoint, log or config)."""
    from retfm.synth.assemble import export as run_export

    card = run_export(generator, out)
    stdout.print(f"submission of {card['generator_id']} (sites: {', '.join(map(str, card['data']['sites']))}) in "
                 f"{out}; send this folder to the coordinator")


@app.command()
@config_command(SynthAssembleConfig, "n", "allocation", *SAMPLER_OPTIONS)
def assemble(
    config: SynthAssembleConfig,
    generator: list[Path] = typer.Option(..., "--generator", help="a site's submitted generator folder "
                                                                   "(repeatable, once per generator)"),
    out: Path = typer.Option(..., "--out", help="folder for <site>/ samples, manifest.parquet and provenance.json "
                                                "(resumed if it exists)"),
) -> None:
    """Sample every site's generator in its own label mix into one synthetic pretraining set with provenance."""
    from retfm.synth.assemble import assemble as run_assemble

    with progress_bar("synth assemble", unit="img") as (total, advance):
        summary = run_assemble(generator, out, config, progress=advance, total=total)
    stdout.print(f"{summary['images']} synthetic images from {summary['generators']} generators in {out} "
                 f"({summary['generated_now']} generated now, {summary['kept']} kept); manifest and "
                 f"provenance.json there; pretrain with --data {out}")
