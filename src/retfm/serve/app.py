"""The screening service: a FastAPI app over a :class:`~retfm.serve.screening.Screener`, with its web page.

Routes: ``GET /`` (the web page, static files in the package, no CDN), ``GET /healthz``, ``GET /openapi.json``;
with the API key (header ``X-API-Key``, compared in constant time): ``GET /v1/model``, ``POST /v1/predict`` (one
image), ``POST /v1/batch`` (several images and/or zips -> a triage list sorted by risk).

Swagger UI and ReDoc are switched off: FastAPI loads them from a CDN, which a hospital network may not reach and
which would leak that the page is open. The OpenAPI schema stays at /openapi.json for any local viewer.

Uploads are held in memory only (``uploads.py``) unless ``keep_uploads`` names a folder. Log lines name the
route, the verdict and the time taken, never a file name or anything from inside the image.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from contextlib import asynccontextmanager
from importlib.resources import files
from pathlib import Path

from fastapi import Depends, FastAPI, HTTPException, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import APIKeyHeader
from fastapi.staticfiles import StaticFiles

from retfm import __version__
from retfm.data.io import EMPTY_FILE, NOT_AN_IMAGE, TOO_MANY_PIXELS, UNREADABLE_DICOM, ImageRejected
from retfm.serve.batching import MicroBatcher
from retfm.serve.config import ServeConfig
from retfm.serve.screening import Screener
from retfm.serve.uploads import UploadError, expand_zips, file_parts, read_body

log = logging.getLogger("retfm.serve")
STATIC = files("retfm.serve") / "static"
API_KEY_HEADER = "X-API-Key"
# HTTP status per reason a single upload is refused; anything else undecodable (truncated files) is 422.
REJECTED_STATUS = {EMPTY_FILE: 400, NOT_AN_IMAGE: 415, UNREADABLE_DICOM: 415, TOO_MANY_PIXELS: 413}
_FILE_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "file": {"type": "string", "format": "binary", "description": "a fundus photograph (JPEG, PNG, TIFF, "
                                                                      "DICOM, ...)"}}}},
    "image/*": {"schema": {"type": "string", "format": "binary"}}}}}
_FILES_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"},
                  "description": "fundus photographs and/or zip files of them"}}}}}}}


def create_app(config: ServeConfig, screener: Screener | None = None) -> FastAPI:
    """The app for ``config``; ``screener``, a model already loaded for the same model, index and device, is
    shared instead of loading it again (tests run apps with several limits over one model)."""
    screener = screener.with_config(config) if screener else Screener(config)
    batcher = MicroBatcher(screener.run_batch, config.batch_size, config.batch_wait_ms)
    card = screener.model_card()
    upload_limit = int(config.max_upload_mb * 1024 * 1024)
    if config.keep_uploads is not None:
        config.keep_uploads.mkdir(parents=True, exist_ok=True)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="retfm screening service", version=__version__, lifespan=lifespan, docs_url=None,
                  redoc_url=None, description="Quality check, findings, heatmap and similar cases for colour fundus "
                                              f"photographs. Send the API key in the {API_KEY_HEADER} header.")
    key_header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="the service's API key")

    def require_key(given: str | None = Security(key_header)) -> None:
        if given is None or not hmac.compare_digest(given.encode(), config.api_key.encode()):
            raise HTTPException(401, f"missing or wrong API key (send it in the {API_KEY_HEADER} header)",
                                headers={"WWW-Authenticate": API_KEY_HEADER})

    async def uploaded_files(request: Request) -> list[bytes]:
        try:
            body = await read_body(request, upload_limit)
            return file_parts(body, request.headers.get("content-type", ""))
        except UploadError as exc:
            raise HTTPException(exc.status, exc.message) from None

    async def screen(data: bytes, explain: bool) -> dict:
        """Verdict and findings for one image; raises ImageRejected when it is no image."""
        if config.keep_uploads is not None:
            await run_in_threadpool((config.keep_uploads / f"{uuid.uuid4().hex}.upload").write_bytes, data)
        prepared = await run_in_threadpool(screener.prepare, data)
        result = {"verdict": "gradable" if prepared.gradable else "ungradable", "quality": prepared.quality,
                  "reasons": prepared.reasons}
        if prepared.gradable:
            result.update(await batcher.submit((prepared, explain)))
        return result

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(Path(str(STATIC / "index.html")))

    app.mount("/static", StaticFiles(directory=Path(str(STATIC))), name="static")

    @app.get("/healthz", summary="liveness, the model served, and how well requests batch")
    async def healthz() -> dict:
        return {"status": "ok", "model": card["name"], "index": card["index"] is not None,
                "engine": screener.features.label,
                "forward_passes": batcher.batches, "images_in_passes": batcher.items}

    @app.get("/v1/model", dependencies=[Depends(require_key)],
             summary="the model card: training data, metrics with CIs, per-group results, licence, use and limits")
    async def model_card() -> dict:
        return card

    @app.post("/v1/predict", dependencies=[Depends(require_key)], openapi_extra=_FILE_BODY,
              summary="screen one fundus photograph: quality verdict, findings, heatmap, similar cases")
    async def predict(request: Request, heatmap: bool = True) -> dict:
        started = time.perf_counter()
        uploads = await uploaded_files(request)
        if len(uploads) != 1:
            raise HTTPException(400, f"send exactly one image (got {len(uploads)}): as the request body, or as "
                                     "the multipart field 'file'; several images go to /v1/batch")
        try:
            result = await screen(uploads[0], heatmap)
        except ImageRejected as exc:
            log.info("predict: rejected (%s)", exc.reason)
            raise HTTPException(REJECTED_STATUS.get(exc.reason, 422), _rejection(exc)) from None
        log.info("predict: %s in %.0f ms", result["verdict"], 1000 * (time.perf_counter() - started))
        return result

    @app.post("/v1/batch", dependencies=[Depends(require_key)], openapi_extra=_FILES_BODY,
              summary="screen several photographs (files and/or zips): a triage list, highest risk first")
    async def batch(request: Request) -> dict:
        started = time.perf_counter()
        try:
            uploads = expand_zips(await uploaded_files(request), config.max_batch_images, upload_limit)
        except UploadError as exc:
            raise HTTPException(exc.status, exc.message) from None
        if not uploads:
            raise HTTPException(400, "no images in the request (send multipart field 'files')")

        async def one(upload) -> dict:
            row = {"item": upload.item, "zip_entry": upload.zip_entry}
            try:
                return {**row, **await screen(upload.data, explain=False)}
            except ImageRejected as exc:  # one bad file is reported; the others go on
                return {**row, "verdict": "rejected", "reasons": [_rejection(exc)]}

        rows = await asyncio.gather(*(one(upload) for upload in uploads))
        order = {"gradable": 0, "ungradable": 1, "rejected": 2}
        rows.sort(key=lambda r: (order[r["verdict"]], -r.get("risk", 0.0), r["item"]))
        counts = {verdict: sum(r["verdict"] == verdict for r in rows) for verdict in order}
        log.info("batch: %d images (%s) in %.0f ms", len(rows), ", ".join(f"{v} {n}" for v, n in counts.items()),
                 1000 * (time.perf_counter() - started))
        return {"label": card["label"], "order": "gradable by risk (highest first), then ungradable, then rejected",
                "counts": counts, "items": rows}

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s failed: %s", request.method, request.url.path, type(exc).__name__)
        return JSONResponse({"detail": "internal error; see the service log"}, status_code=500)

    return app


def _rejection(exc: ImageRejected) -> str:
    reason = exc.reason.replace("_", " ")
    return f"not usable as a fundus photograph: {reason}" + (f" ({exc.detail})" if exc.detail else "")
