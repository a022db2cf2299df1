"""``retfm models ...``: the model zoo: what each model is, what it expects, where its weights come from."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from retfm.cli.common import console, print_table

app = typer.Typer(help="Model zoo: named foundation models, their preprocessing, weights and licences.",
                  no_args_is_help=True)


@app.command("list")
def list_() -> None:
    """Table of the named models: architecture, input size, embedding size, checkpoint format, licence, and
    whether their weights are on this machine now ("-": none published)."""
    from retfm.models import list_models, spec
    from retfm.models.backbones import weights_here

    table = Table(title="retfm models")
    for column in ("name", "architecture", "input", "embed dim", "format", "weights here", "licence"):
        table.add_column(column, justify="right" if column in ("input", "embed dim") else "left")
    for name in list_models():
        entry = spec(name)
        here = weights_here(entry)
        table.add_row(name, entry.architecture, str(entry.input_size), str(entry.embed_dim),
                      entry.checkpoint_format, {True: "yes", False: "no", None: "-"}[here], entry.licence)
    print_table(table)
    console.print("details, weight sources and caveats: retfm models show NAME")


@app.command()
def show(model: str = typer.Argument(..., metavar="NAME|PATH", help="a name from `retfm models list`, or a retfm "
                                                                   ".safetensors checkpoint (its JSON card lies "
                                                                   "beside it)")) -> None:
    """Every field of one model: architecture, preprocessing, pooling, weight source, licence, notes, card."""
    from retfm.models import preprocessing, spec
    from retfm.models.registry import CHECKPOINT_FORMATS, POOLINGS, weight_source

    entry = spec(model)
    pre = preprocessing(entry)
    table = Table(title=entry.name, show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    rows = {
        "description": entry.description,
        "modality": entry.modality,
        "architecture": f"timm {entry.architecture} {json.dumps(entry.model_kwargs)}",
        "preprocessing": f"resize to {pre.size}x{pre.size}, normalise mean {pre.mean}, std {pre.std}",
        "pooling": f"{entry.pooling}: {POOLINGS[entry.pooling]}",
        "embed dim": str(entry.embed_dim),
        "checkpoint format": f"{entry.checkpoint_format}: {CHECKPOINT_FORMATS[entry.checkpoint_format]}",
        "weights": weight_source(entry),
        "source": entry.source or "-",
        "licence": entry.licence,
        "notes": entry.notes or "-",
        **{f"card: {key}": json.dumps(value) for key, value in entry.card.items()},
    }
    for field, value in rows.items():
        table.add_row(field, value)
    print_table(table)
