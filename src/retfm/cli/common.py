"""What every command shares: the console, progress bars, and options generated from a stage's config."""

from __future__ import annotations

import functools
import inspect
import json
import types
import typing
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Table
from rich.text import Text

from retfm.config import load_config

console = Console(stderr=True)
stdout = Console()


def print_table(table: Table) -> None:
    """A table on stdout: drawn for a terminal; piped or redirected, its full values as tab-separated lines
    (a header line unless the table has none), so scripts read every value whatever the width, and its title on
    stderr."""
    if stdout.is_terminal:
        stdout.print(table)
        return
    if table.title:
        console.print(table.title, highlight=False)
    rows = zip(*(column.cells for column in table.columns))
    lines = ([[column.header for column in table.columns]] if table.show_header else []) + [list(r) for r in rows]
    for line in lines:
        print("\t".join(str(cell).replace("\t", " ").replace("\n", " ") for cell in line))


ConfigOption = "YAML config file; command-line options override it"
SetOption = "override a config value: --set key=value (repeatable; values parsed as YAML)"


@dataclass(frozen=True)
class FromOption:
    """A config field filled from an option of another form: ``convert(value)`` is the field's value (None: not
    given), e.g. the mapping ``columns`` from repeated ``--map SOURCE=TARGET``."""

    flag: str
    annotation: object
    help: str
    convert: Callable


def config_command(model: type[BaseModel], *fields: str, **converted: FromOption):
    """A command whose options ``fields`` are generated from ``model``'s fields (flag ``--field-name``, type,
    description as help, every accepted value of a Literal, and the config's default), beside ``converted`` fields
    (field name: :class:`FromOption`), ``--config`` and ``--set``. The command itself takes its other parameters
    and ``config``: the model loaded from the defaults < the YAML file < the options given < ``--set``."""
    def wrap(command):
        own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "config"]
        generated = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option(model, name),
                                       annotation=cli_type(model.model_fields[name])) for name in fields]
        generated += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=source.annotation,
                                        default=typer.Option(None, source.flag, help=source.help))
                      for name, source in converted.items()]
        extra = [inspect.Parameter("config_file", inspect.Parameter.KEYWORD_ONLY, annotation=typing.Optional[Path],
                                   default=typer.Option(None, "--config", help=ConfigOption)),
                 inspect.Parameter("sets", inspect.Parameter.KEYWORD_ONLY, annotation=typing.Optional[list[str]],
                                   default=typer.Option(None, "--set", help=SetOption))]

        @functools.wraps(command)
        def run(**given):
            options = {name: given.pop(name) for name in fields}
            options = {name: value or None if isinstance(value, list) else value for name, value in options.items()}
            options |= {name: source.convert(given.pop(name)) for name, source in converted.items()}
            config = load_config(model, given.pop("config_file"), options, given.pop("sets"))
            return command(config=config, **given)

        del run.__wrapped__  # typer reads the generated signature, not the command's own
        run.config_model, run.config_fields = model, fields
        run.__signature__ = inspect.Signature([*own, *generated, *extra])
        run.__annotations__ = {p.name: p.annotation for p in run.__signature__.parameters.values()}
        return run
    return wrap


def option(model: type[BaseModel], name: str):
    """The typer option of one config field; its value is None unless given, so YAML and defaults hold."""
    field = model.model_fields[name]
    flag = "--" + name.replace("_", "-")
    choices = literal_values(field.annotation)
    described = ": ".join(part for part in ("|".join(map(str, choices)), field.description or "") if part)
    default = "" if field.is_required() else f"[default: {shown_default(field.get_default(call_default_factory=True))}]"
    help_text = " ".join(part for part in (described, default) if part)
    declarations = [f"{flag}/--no-{flag[2:]}"] if cli_type(field) is typing.Optional[bool] else [flag]
    return typer.Option(None, *declarations, help=help_text)


def cli_type(field) -> object:
    """What the command line parses a field's value as: its scalar type; a Literal's values and other containers
    as one string the config parses (e.g. 0.7,0.1,0.2); a list of strings marked repeatable as a repeated flag."""
    annotation = _without_none(field.annotation)
    if (field.json_schema_extra or {}).get("repeatable"):
        return typing.Optional[list[str]]
    return typing.Optional[annotation if annotation in (bool, int, float, Path) else str]


def literal_values(annotation) -> tuple:
    annotation = _without_none(annotation)
    return typing.get_args(annotation) if typing.get_origin(annotation) is typing.Literal else ()


def shown_default(value) -> str:
    """A default as a user writes it in YAML or on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) or "[]"
    return str(value)


def _without_none(annotation):
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(annotation) if a is not type(None)]
        return rest[0] if len(rest) == 1 else annotation
    return annotation


class _RateColumn(ProgressColumn):
    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        return Text(f"{task.speed:.1f} {self.unit}/s" if task.speed else "")


@contextmanager
def progress_bar(description: str, unit: str | None = None):
    """Yields (set_total, advance) callbacks for library code that reports progress; ``unit`` adds a rate.
    The bar appears at the first callback, so an error raised before any work is one line, with no bar."""
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn(), *([_RateColumn(unit)] if unit else []))
    progress = Progress(*columns, console=console, transient=False)
    task = progress.add_task(description, total=None)

    def started(update):
        def call(*args):
            if not progress.live.is_started:
                progress.start()
            update(*args)
        return call

    try:
        yield started(lambda n: progress.update(task, total=n)), started(lambda n=1: progress.advance(task, n))
    finally:
        progress.stop()


def print_metrics(result: dict, prefix: str = "") -> None:
    """The headline metrics of a metrics.json dict, with their 95% CIs, one per line."""
    for name in ("auroc", "balanced_accuracy", "kappa_quadratic"):
        metric = result["metrics"].get(name)
        if metric and metric.get("value") is not None:
            ci = metric.get("ci") or [None, None]
            stdout.print(f"{prefix}{name}: {metric['value']:.4f}" +
                         (f" (95% CI {ci[0]:.4f}-{ci[1]:.4f})" if ci[0] is not None else ""))


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
