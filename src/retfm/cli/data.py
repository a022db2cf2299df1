"""``retfm data ...``: phantoms, ingest, de-identify, stats, shards."""

from __future__ import annotations

import json
import typing
from pathlib import Path

import typer
from rich.table import Table

from retfm.cli.common import FromOption, config_command, console, print_table, progress_bar, stdout, write_json
from retfm.config import comma_separated
from retfm.data.config import IngestConfig
from retfm.errors import RetfmError

app = typer.Typer(help="Data: phantom cohorts, ingestion, de-identification, statistics.", no_args_is_help=True)


def _columns(items: list[str] | None) -> dict[str, str] | None:
    """``--map SOURCE=TARGET`` (repeatable) as the config's column renames."""
    columns = {}
    for item in items or []:
        source, sep, target = item.partition("=")
        if not sep or not source or not target:
            raise RetfmError(f"--map {item!r}: expected SOURCE=TARGET")
        columns[source] = target
    return columns or None


COLUMN_MAP = FromOption("--map", typing.Optional[list[str]], "CSV column rename SOURCE=TARGET (repeatable), e.g. "
                        "--map level=dr_grade --map PatientID=patient_id", _columns)


@app.command()
@config_command(IngestConfig, "format", "size", "site", "split", "seed", "deid_key_file", "workers", "path_column",
                "image_format", "clahe", "stratify", columns=COLUMN_MAP)
def ingest(
    config: IngestConfig,
    src: Path = typer.Argument(..., help="image folder, CSV, RetinaMNIST .npz, DICOM folder or the folder of a "
                                         "downloaded public dataset (with --format NAME)"),
    out: Path = typer.Option(..., "--out", help="output folder (manifest.parquet, images/, ingest_report.json)"),
) -> None:
    """Validate, de-identify, crop to the field of view, resize and quality-score images into a Manifest."""
    from retfm.data.ingest import REPORT_FILENAME, ingest as run_ingest

    with progress_bar("ingest") as (total, advance):
        report = run_ingest(src, out, config, progress=advance, total=total)
    stdout.print(f"ingested {report['ingested']} of {report['seen']} item(s) into {out}: "
                 f"{report['duplicates']} duplicate(s), {sum(report['rejected'].values())} rejected")
    for entry in report["rejected_files"]:
        console.print(f"  rejected {entry['source']}: {entry['reason']}", highlight=False)
    for warning in report["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {warning}", highlight=False)
    console.print(f"report: {out / REPORT_FILENAME}")


@app.command()
def phantoms(
    out: Path = typer.Option(..., "--out", help="output folder (images/ and labels.csv)"),
    sites: int = typer.Option(3, "--sites", min=1, help="number of sites"),
    per_site: int = typer.Option(40, "--per-site", min=1, help="images per site (two eyes per patient)"),
    size: int = typer.Option(256, "--size", min=32, help="base image side in pixels"),
    seed: int = typer.Option(0, "--seed", help="random seed (same seed, same bytes)"),
    lesions: float = typer.Option(1.0, "--lesions", min=0.01, max=1.0,
                                  help="opacity of the disease signs (below 1: subtler lesions)"),
) -> None:
    """Draw a multi-site cohort of synthetic fundus photographs with visible disease signs and demographics."""
    from retfm.data.phantoms import generate_cohort

    with progress_bar("phantoms") as (total, advance):
        total(sites * per_site)
        table = generate_cohort(out, sites=sites, per_site=per_site, size=size, seed=seed, progress=advance,
                                lesions=lesions)
    stdout.print(f"wrote {len(table)} phantom images from {sites} site(s) to {out} (labels: {out / 'labels.csv'})")


@app.command()
def stats(
    data: Path = typer.Argument(..., help="ingest folder or manifest file"),
    out: Path = typer.Option(None, "--out", help="JSON file to write [default: DATA/stats.json]"),
) -> None:
    """Counts per site, country, label and group; quality distribution; representativeness of each split."""
    from retfm.data.manifest import Manifest
    from retfm.data.stats import manifest_stats

    manifest = Manifest.read(data)
    result = manifest_stats(manifest)
    out = out or manifest.root / "stats.json"
    write_json(out, result)
    _print_stats(result)
    console.print(f"stats: {out}")


@app.command()
def keygen(path: Path = typer.Argument(..., help="where to write the new key (never overwritten)")) -> None:
    """Create a random de-identification key. Keep it at the site: it links pseudonyms to patients."""
    from retfm.data.deid import generate_key

    generate_key(path)
    stdout.print(f"wrote a new key to {path} (owner-only permissions); keep it safe and do not share it")


@app.command()
def deid(
    data: Path = typer.Argument(..., help="an ingest folder made without a key"),
    key_file: Path = typer.Option(..., "--key-file", help="site key (see `retfm data keygen`)"),
    out: Path = typer.Option(..., "--out", help="new folder for the de-identified copy"),
) -> None:
    """De-identify an earlier ingest: keyed pseudonyms, identifying columns dropped, images re-encoded."""
    from retfm.data.deid import deidentify_ingest, load_key

    report = deidentify_ingest(data, out, load_key(key_file))
    stdout.print(f"de-identified copy in {out}; dropped columns: {', '.join(report['columns_dropped']) or 'none'}")


@app.command()
def shard(
    data: Path = typer.Argument(..., help="ingest folder or manifest file"),
    out: Path = typer.Option(..., "--out", help="folder for shard-000000.tar, ... and index.json"),
    shard_size: int = typer.Option(1000, "--shard-size", min=1, help="images per shard"),
    split: str = typer.Option(None, "--split", help="only this split: train, val or test [default: all]"),
    columns: str = typer.Option(None, "--columns", help="comma-separated manifest columns for each image's JSON, "
                                                        "e.g. site,dr_grade [default: every safe column and label]"),
    shuffle: bool = typer.Option(False, "--shuffle/--no-shuffle", help="shuffle images before sharding, so that "
                                                                       "streaming a few shards at a time mixes well"),
    seed: int = typer.Option(0, "--seed", help="seed for --shuffle"),
) -> None:
    """Pack a Manifest's images into WebDataset tar shards plus index.json, for streaming large corpora."""
    from retfm.data.shards import INDEX_FILENAME, write_shards

    chosen = comma_separated(columns) or None
    with progress_bar("shard", unit="img") as (total, advance):
        index = write_shards(data, out, shard_size=shard_size, split=split, columns=chosen,
                             shuffle_seed=seed if shuffle else None, progress=advance, total=total)
    stdout.print(f"wrote {index['total']} image(s) in {len(index['shards'])} shard(s) to {out}; "
                 f"columns: {', '.join(index['columns'])}")
    if not index["deidentified"]:
        console.print("[yellow]warning:[/yellow] the manifest is not marked as de-identified (no --deid-key-file "
                      "at ingest): patient_id and labels are as the source gave them; see `retfm data deid`",
                      highlight=False)
    console.print(f"index: {out / INDEX_FILENAME}")


def _print_stats(result: dict) -> None:
    summary = Table(title="collection")
    for column in ("images", "patients", "train", "val", "test"):
        summary.add_column(column, justify="right")
    splits = result["splits"]
    summary.add_row(str(result["images"]), str(result["patients"] or "-"), *(str(splits[s]) for s in splits))
    stdout.print(summary)
    for title, groups in (("groups", result["groups"]), ("labels", result["labels"])):
        table = Table(title=title)
        for column in ("column", "value", "all", "train", "val", "test"):
            table.add_column(column, justify="left" if column in ("column", "value") else "right")
        for column, values in groups.items():
            if not all(isinstance(counts, dict) for counts in values.values()):  # a numeric label's summary
                table.add_row(column, "summary", json.dumps(values), "", "", "")
                continue
            for value, counts in values.items():
                table.add_row(column, value, *(str(counts[k]) for k in ("all", "train", "val", "test")))
        if groups:
            print_table(table)
    if result["quality"]:
        q = result["quality"]
        stdout.print(f"quality: mean {q['mean']}, median {q['p50']}, p5 {q['p5']}, below 0.5: {q['below_0.5']}")
    table = Table(title="representativeness (share of each group overall and per split)")
    for column in ("column", "group", "n", "share", "train", "val", "test", "max gap (pp)"):
        table.add_column(column)
    for row in result["representativeness"]:
        table.add_row(row["column"], row["group"], str(row["n"]), f"{row['share']:.3f}",
                      *(("-" if row[f"share_{s}"] is None else f"{row[f'share_{s}']:.3f}") for s in ("train", "val", "test")),
                      "-" if row["max_gap_pp"] is None else f"{row['max_gap_pp']:.1f}")
    if result["representativeness"]:
        print_table(table)
