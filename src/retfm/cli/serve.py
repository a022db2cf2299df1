"""``retfm serve``: the screening service and its web page (FastAPI + uvicorn)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import typer

from retfm.cli.common import ConfigOption, SetOption, console

API_KEY_ENV = "RETFM_API_KEY"


def serve(
    model: Path = typer.Option(None, "--model", help="classifier from `retfm finetune` (model.safetensors with "
                                                     "its model.json card)"),
    index: Path = typer.Option(None, "--index", help="retrieval index folder from `retfm index build`: adds "
                                                     "similar cases"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on (127.0.0.1: this machine only)"),
    port: int = typer.Option(8000, "--port", help="port to listen on"),
    api_key_file: Path = typer.Option(None, "--api-key-file", help=f"file holding the API key (else ${API_KEY_ENV}; "
                                                                   "else a new key is printed at start)"),
    device: str = typer.Option(None, "--device", help="cpu|cuda [default: cpu]"),
    engine: str = typer.Option(None, "--engine", help="auto|torch|onnxruntime|openvino for predictions and similar "
                                                      "cases [default: auto]"),
    precision: str = typer.Option(None, "--precision", help="fp32|bf16 [default: fp32, or bf16 under auto where the "
                                                            "CPU has it and the features match]"),
    max_upload_mb: float = typer.Option(None, "--max-upload-mb", help="largest request body [default: 20]"),
    min_quality: float = typer.Option(None, "--min-quality", help="quality score below which an image is "
                                                                  "ungradable [default: 0.5]"),
    batch_size: int = typer.Option(None, "--batch-size", help="most images per forward pass [default: 16]"),
    batch_wait_ms: float = typer.Option(None, "--batch-wait-ms", help="longest wait for a batch to fill "
                                                                      "[default: 10]"),
    keep_uploads: Path = typer.Option(None, "--keep-uploads", help="write every upload here under a random name "
                                                                   "[default: uploads stay in memory]"),
    config: Path = typer.Option(None, "--config", help=ConfigOption),
    sets: list[str] = typer.Option(None, "--set", help=SetOption),
) -> None:
    """Serve a fine-tuned classifier: HTTP API (/v1/predict, /v1/batch, /v1/model) and a web page at /."""
    import uvicorn

    from retfm.config import load_config

    from retfm.serve.config import ServeConfig
    from retfm.errors import RetfmError
    from retfm.serve.app import create_app

    api_key, printed = _api_key(api_key_file)
    options = {"model": model, "index": index, "api_key": api_key, "device": device, "engine": engine,
               "precision": precision, "max_upload_mb": max_upload_mb,
               "min_quality": min_quality, "batch_size": batch_size, "batch_wait_ms": batch_wait_ms,
               "keep_uploads": keep_uploads}
    cfg = load_config(ServeConfig, config, options, sets)
    with console.status("loading the model"):
        app = create_app(cfg)
    if printed:
        console.print(f"API key for this run (send it as X-API-Key): {api_key}", highlight=False, soft_wrap=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"listening on {host} over plain HTTP: put a TLS proxy in front before patients' images "
                      "travel a network", highlight=False)
    console.print(f"web page: http://{'[' + host + ']' if ':' in host else host}:{port}/", highlight=False)
    try:
        uvicorn.run(app, host=host, port=port, log_level="info", ws="none")  # no websockets route
    except OSError as exc:
        raise RetfmError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None


def _api_key(path: Path | None) -> tuple[str, bool]:
    """(key, whether it was made here and must be shown): from the file, the environment, or new."""
    from retfm.errors import RetfmError

    if path is not None:
        try:
            key = path.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise RetfmError(f"{path}: cannot read the API key ({type(exc).__name__})") from None
        if len(key) < 16:
            raise RetfmError(f"{path}: the API key must be at least 16 characters")
        return key, False
    if os.environ.get(API_KEY_ENV):
        return os.environ[API_KEY_ENV].strip(), False
    return secrets.token_urlsafe(24), True
