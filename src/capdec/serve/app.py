"""The HTTP API and web page of ``capdec serve`` (FastAPI on uvicorn).

Endpoints:

- ``POST /caption``: multipart form, field ``image`` (repeatable, up to ``max_files``), optional fields
  ``strategy`` (beam, greedy, sample), ``beam_size``, ``max_length``. Answers
  ``{"captions": [{"image": NAME, "caption": TEXT}, ...]}`` in upload order. A request is captioned
  whole or not at all: when any file is unusable the answer lists every bad file with its reason,
  ``{"detail": "...", "errors": [{"image": NAME, "error": REASON}, ...]}``, with status 413 (a file over
  ``max_upload_mb``) or 422 (not an image, truncated or corrupt, over ``max_pixels``: a decompression
  bomb). 400: a malformed request; 503: too many images waiting (``Retry-After``); 504: no answer
  within ``timeout_s``.
- ``GET /health``: ``{"status": "ok", ...}`` once the model is loaded.
- ``GET /info``: checkpoint, encoder, decoding defaults, limits, batching statistics, capdec version.
- ``GET /``: a single page (no build step, nothing from a CDN) to drop or pick images and read captions.

Uploads are written to a temporary file and opened with :func:`capdec.images.load_image` (the one image
loader), in the server's thread pool; captioning runs on the :class:`DynamicBatcher`'s worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from capdec import __version__
from capdec.decode import STRATEGIES
from capdec.images import DEFAULT_MAX_PIXELS, ImageLoadError, load_image
from capdec.serve.batcher import DynamicBatcher, QueueFull

logger = logging.getLogger(__name__)

DECODE_FIELDS = ("strategy", "beam_size", "max_length")
MAX_BEAM_SIZE = 16  # a bound on the work one request can ask for
_MB = 1024 * 1024


@dataclass
class ServeSettings:
    """Limits and batching of the server (``capdec serve`` flags)."""

    max_batch: int = 32  # images captioned together at most
    max_wait_ms: float = 10.0  # how long the oldest waiting request may wait for others to join its batch
    max_queue: int = 256  # images waiting at most; more gets 503
    max_files: int = 16  # images per request
    max_upload_mb: float = 10.0  # size of one uploaded file
    max_pixels: int | None = DEFAULT_MAX_PIXELS  # decompression-bomb guard (width × height)
    timeout_s: float = 120.0  # a request not answered by then gets 504

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * _MB)

    @property
    def max_request_bytes(self) -> int:
        """The whole request body: every file at its limit plus the form's own overhead."""
        return self.max_upload_bytes * self.max_files + _MB


def _error(status: int, detail: str, errors: list[dict[str, str]] | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"detail": detail}
    if errors is not None:
        body["errors"] = errors
    return JSONResponse(body, status_code=status, headers=headers)


class _BodyLimit:
    """ASGI middleware: refuse request bodies over ``limit`` bytes (by Content-Length, or while reading)."""

    def __init__(self, app: Any, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        detail = f"request body over {self.limit / _MB:.1f} MB"
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                return await _error(413, detail)(scope, receive, send)
        received = 0

        async def limited() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise HTTPException(413, detail)
            return message

        await self.app(scope, limited, send)


def _decode_options(form: Any, max_length: int) -> dict[str, Any]:
    """The decoding fields of the form, checked (HTTPException 400 on a bad value)."""
    options: dict[str, Any] = {}
    strategy = form.get("strategy")
    if strategy not in (None, ""):
        if strategy not in STRATEGIES:
            raise HTTPException(400, f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
        options["strategy"] = strategy
    for name, top in (("beam_size", MAX_BEAM_SIZE), ("max_length", max_length)):
        value = form.get(name)
        if value in (None, ""):
            continue
        if not isinstance(value, str) or not value.strip().isdigit() or not 1 <= int(value) <= top:
            raise HTTPException(400, f"{name} must be an integer from 1 to {top}, got {value!r}")
        options[name] = int(value)
    return options


def _upload_name(upload: Any, index: int) -> str:
    name = os.path.basename((upload.filename or "").replace("\\", "/")).strip()
    return (name or f"upload-{index + 1}")[:200]


def _load_uploads(files: list[Any], names: list[str], max_pixels: int | None) -> tuple[list[Any], list[dict]]:
    """RGB images of the uploads (via a temporary file each), and the errors of those that failed."""
    images, errors = [], []
    with tempfile.TemporaryDirectory(prefix="capdec-serve-") as tmp:
        for i, (upload, name) in enumerate(zip(files, names)):
            path = os.path.join(tmp, f"{i}.upload")
            upload.file.seek(0)
            with open(path, "wb") as out:
                shutil.copyfileobj(upload.file, out)
            try:
                images.append(load_image(path, max_pixels=max_pixels))
            except ImageLoadError as e:
                errors.append({"image": name, "error": e.reason})
    return images, errors


def page_html() -> str:
    """The web page (package data: capdec/serve/static/index.html)."""
    return importlib.resources.files("capdec.serve").joinpath("static/index.html").read_text(encoding="utf-8")


def create_app(captioner: Any, settings: ServeSettings | None = None, *, checkpoint: str | None = None) -> FastAPI:
    """The FastAPI app serving ``captioner`` (a :class:`capdec.caption.Captioner`)."""
    settings = settings or ServeSettings()
    batcher = DynamicBatcher(captioner, max_batch=settings.max_batch, max_wait_ms=settings.max_wait_ms,
                             max_queue=settings.max_queue)
    model_max_length = captioner.model.config.max_length
    page = page_html()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        try:
            yield
        finally:
            await run_in_threadpool(batcher.stop)

    app = FastAPI(title="capdec", version=__version__, lifespan=lifespan,
                  description="Text-only image captioning: POST images to /caption.")
    app.state.batcher = batcher
    app.state.settings = settings
    app.add_middleware(_BodyLimit, limit=settings.max_request_bytes)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        csp = ("default-src 'self'; img-src 'self' blob: data:; style-src 'unsafe-inline'; "
               "script-src 'unsafe-inline'; connect-src 'self'")
        return HTMLResponse(page, headers={"Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff"})

    @app.get("/health")
    async def health() -> Any:
        if not batcher.alive:
            return _error(503, "the captioning worker is not running")
        return {"status": "ok", "queued_images": batcher.queued}

    @app.get("/info")
    async def info() -> dict[str, Any]:
        encoder = captioner.encoder
        return {
            "capdec_version": __version__,
            "checkpoint": checkpoint if checkpoint is not None else str(captioner.checkpoint.path),
            "encoder": encoder.spec,
            "embed_dim": captioner.model.config.embed_dim,
            "decoding": {**captioner.decode.to_dict(), "max_length": captioner.decode.max_length or model_max_length},
            "limits": {**asdict(settings), "max_beam_size": MAX_BEAM_SIZE, "max_length": model_max_length},
            "batching": batcher.stats.to_dict(),
        }

    @app.post("/caption")
    async def caption(request: Request) -> Any:
        form = await request.form(max_files=settings.max_files, max_fields=len(DECODE_FIELDS) + 1)
        try:
            unknown = sorted(set(form.keys()) - {"image", *DECODE_FIELDS})
            if unknown:
                raise HTTPException(400, f"unknown form field(s) {', '.join(unknown)}; send 'image' (one or more "
                                         f"files) and optionally {', '.join(DECODE_FIELDS)}")
            files = form.getlist("image")
            if not files:
                raise HTTPException(400, "no image: send the files in the multipart form field 'image'")
            if not all(isinstance(f, UploadFile) for f in files):
                raise HTTPException(400, "the form field 'image' must hold files, not text")
            options = _decode_options(form, model_max_length)
            names = [_upload_name(f, i) for i, f in enumerate(files)]

            too_big = [{"image": n, "error": f"{f.size:,} bytes is over the upload limit of "
                                             f"{settings.max_upload_mb:g} MB ({settings.max_upload_bytes:,} bytes)"}
                       for f, n in zip(files, names) if (f.size or 0) > settings.max_upload_bytes]
            if too_big:
                return _error(413, "; ".join(f"{e['image']}: {e['error']}" for e in too_big), too_big)
            images, errors = await run_in_threadpool(_load_uploads, files, names, settings.max_pixels)
            if errors:
                return _error(422, "; ".join(f"{e['image']}: {e['error']}" for e in errors), errors)
        finally:
            await form.close()

        try:
            future = batcher.submit(images, options)
        except QueueFull as e:
            return _error(503, f"the server is busy ({e}); retry shortly", headers={"Retry-After": "1"})
        try:
            captions = await asyncio.wait_for(asyncio.wrap_future(future), timeout=settings.timeout_s)
        except asyncio.TimeoutError:
            return _error(504, f"no caption within {settings.timeout_s:g} s; the server is overloaded")
        except Exception as e:
            logger.warning("captioning failed: %s", e)
            return _error(500, f"captioning failed: {type(e).__name__}: {e}")
        return {"captions": [{"image": n, "caption": c} for n, c in zip(names, captions)]}

    return app
