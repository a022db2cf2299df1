"""``retfm knowledge ...``: the disease knowledge base behind zero-shot recognition and image-text captions."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from retfm.cli.common import console, print_table, stdout

app = typer.Typer(help="Disease knowledge base: fundus conditions, their signs per modality, label maps, prompts.",
                  no_args_is_help=True)

KnowledgeFiles = typer.Option(None, "--knowledge", help="extra knowledge YAML merged onto the built-in one "
                                                         "(repeatable; see docs/zeroshot.md)")


@app.command("list")
def list_(
    category: str = typer.Option(None, "--category", help="only this category, e.g. diabetic, macular, tumour"),
    modality: str = typer.Option(None, "--modality", help="only conditions visible on this modality: cfp|uwf|oct|fa"),
    knowledge: list[Path] = KnowledgeFiles,
) -> None:
    """Table of the conditions: key, name, category, the modalities they are described on, synonyms."""
    from retfm.errors import RetfmError
    from retfm.knowledge.base import CATEGORIES, MODALITIES, load_knowledge

    if category is not None and category not in CATEGORIES:
        raise RetfmError(f"--category {category!r} is not one of {', '.join(CATEGORIES)}")
    if modality is not None and modality.lower() not in MODALITIES:
        raise RetfmError(f"--modality {modality!r} is not one of {', '.join(MODALITIES)}")
    kb = load_knowledge(*(knowledge or []))
    chosen = [c for c in kb.conditions if (category is None or c.category == category)
              and (modality is None or modality.lower() in c.signs)]
    table = Table(title=f"retfm knowledge: {len(chosen)} conditions")
    for column in ("key", "name", "category", "modalities", "synonyms"):
        table.add_column(column, overflow="fold")
    for entry in chosen:
        table.add_row(entry.key, entry.name, entry.category, " ".join(entry.signs), ", ".join(entry.synonyms))
    print_table(table)
    console.print("signs, label maps and prompts of one condition: retfm knowledge show KEY")


@app.command()
def show(
    key: str = typer.Argument(..., metavar="KEY", help="a condition key, name or synonym (e.g. brvo, 'wet AMD')"),
    modality: str = typer.Option(None, "--modality", help="modality of the prompts shown: cfp|uwf|oct|fa "
                                                         "[default: cfp, or the first one the condition is seen on]"),
    knowledge: list[Path] = KnowledgeFiles,
) -> None:
    """One condition: names, signs on every modality, the label values that map to it, and its prompts."""
    from retfm.knowledge.base import MODALITIES, load_knowledge

    kb = load_knowledge(*(knowledge or []))
    entry = kb.condition(key)
    table = Table(title=entry.name, show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    table.add_row("key", entry.key)
    table.add_row("category", entry.category)
    table.add_row("synonyms", ", ".join(entry.synonyms) or "-")
    for name in MODALITIES:
        table.add_row(f"signs: {name}", entry.signs.get(name, "(not visible on this modality)"))
    table.add_row("label values", ", ".join(kb.label_values(entry.key)) or "-")
    print_table(table)

    modality = modality or ("cfp" if "cfp" in entry.signs else next(iter(entry.signs)))
    ensemble = kb.prompts(entry, modality)
    prompts = Table(title=f"{len(ensemble)} prompts ({modality.lower()})", show_header=False)
    prompts.add_column("#", justify="right")
    prompts.add_column("prompt", overflow="fold")
    for number, prompt in enumerate(ensemble, 1):
        prompts.add_row(str(number), prompt)
    stdout.print(prompts)
