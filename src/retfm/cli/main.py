"""``retfm``: the one console script. Errors a user can fix (a RetfmError, or a file the user named that cannot
be read or written) are printed as one line, exit code 2."""

from __future__ import annotations

import sys
import warnings

import typer

from retfm import __version__
from retfm.cli import (adapt, data, demo, evaluate, federated, finetune, knowledge, models, pretrain, retrieve, serve,
                       share, study, synth, zeroshot)
from retfm.cli.common import console
from retfm.errors import RetfmError, RetfmWarning

app = typer.Typer(name="retfm", help="Retinal foundation models: ingest, pretrain, federate, adapt, evaluate, serve.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
                  rich_markup_mode=None)  # help texts are plain: "[default: 64]" must not be read as markup
app.add_typer(data.app, name="data")
app.add_typer(models.app, name="models")
app.add_typer(knowledge.app, name="knowledge")
app.add_typer(federated.app, name="federated")
app.add_typer(share.app, name="share")
app.add_typer(retrieve.index_app, name="index")
app.add_typer(synth.app, name="synth")
app.command(name="evaluate")(evaluate.evaluate)
app.command()(adapt.embed)
app.command()(adapt.probe)
app.command()(pretrain.pretrain)
app.command()(finetune.finetune)
app.command()(zeroshot.zeroshot)
app.command()(study.study)
app.command()(retrieve.retrieve)
app.command()(serve.serve)
app.command()(demo.demo)


def _version(value: bool) -> None:
    if value:
        print(f"retfm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="print the version and exit")) -> None:
    """retfm: build, share, adapt and evaluate retinal foundation models."""


def main() -> None:
    warnings.formatwarning = _warning_line
    try:
        app(standalone_mode=False)
    except RetfmError as exc:
        _fail(str(exc))
    except OSError as exc:  # a file the user named cannot be read or written: --out names a file, no permission, ...
        if exc.filename is None:
            raise
        _fail(f"{exc.filename}: {exc.strerror or exc}")
    except typer.Abort:
        console.print("aborted")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # click usage errors carry their own formatting and exit code
        from click.exceptions import ClickException

        if isinstance(exc, ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise


def _warning_line(message, category, filename, lineno, line=None) -> str:
    """retfm's own warnings as one line, like its errors; other libraries' as Python prints them."""
    if isinstance(message, RetfmWarning) or issubclass(category, RetfmWarning):
        return f"warning: {message}\n"
    return _python_warning_line(message, category, filename, lineno, line)


_python_warning_line = warnings.formatwarning


def _fail(line: str) -> None:
    console.print(f"[red]error:[/red] {line}", highlight=False, soft_wrap=True)
    sys.exit(2)


if __name__ == "__main__":
    main()
