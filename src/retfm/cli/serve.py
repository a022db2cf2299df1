"""``retfm serve``: the screening service and its web page (FastAPI + uvicorn)."""

from __future__ import annotations

import os
import secrets
import typing
from pathlib import Path

import typer

from retfm.cli.common import FromOption, config_command, console
from retfm.errors import RetfmError
from retfm.serve.config import ServeConfig

API_KEY_ENV = "RETFM_API_KEY"


def _api_key(path: Path | None) -> str:
    """The key from the file, else the environment, else a new one, printed: the user must know it."""
    if path is not None:
        try:
            key = path.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise RetfmError(f"{path}: cannot read the API key ({type(exc).__name__})") from None
        if len(key) < 16:
            raise RetfmError(f"{path}: the API key must be at least 16 characters")
        return key
    if os.environ.get(API_KEY_ENV):
        return os.environ[API_KEY_ENV].strip()
    key = secrets.token_urlsafe(24)
    console.print(f"API key for this run (send it as X-API-Key): {key}", highlight=False, soft_wrap=True)
    return key


API_KEY = FromOption("--api-key-file", typing.Optional[Path], f"file holding the API key (else ${API_KEY_ENV}; else "
                     "a new key is printed at start)", _api_key)


@config_command(ServeConfig, "model", "index", "device", "engine", "precision", "max_upload_mb", "min_quality",
                "batch_size", "batch_wait_ms", "keep_uploads", api_key=API_KEY)
def serve(
    config: ServeConfig,
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on (127.0.0.1: this machine only)"),
    port: int = typer.Option(8000, "--port", help="port to listen on"),
) -> None:
    """Serve a fine-tuned classifier: HTTP API (/v1/predict, /v1/batch, /v1/model) and a web page at /."""
    import uvicorn

    from retfm.serve.app import create_app

    with console.status("loading the model"):
        app = create_app(config)
    if host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"listening on {host} over plain HTTP: put a TLS proxy in front before patients' images "
                      "travel a network", highlight=False)
    console.print(f"web page: http://{'[' + host + ']' if ':' in host else host}:{port}/", highlight=False)
    try:
        uvicorn.run(app, host=host, port=port, log_level="info", ws="none")  # no websockets route
    except OSError as exc:
        raise RetfmError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
