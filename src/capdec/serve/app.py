"""The HTTP API and web page of ``capdec serve`` (FastAPI on uvicorn).

Endpoints:

- ``POST /caption``: multipart form, field ``image`` (repeatable, up to ``max_files``), optional fields
  ``strategy`` (beam, greedy, sample), ``beam_size``, ``max_length`` (ASCII digits; each field at most once).
  Answers ``{"captions": [{"image": NAME, "caption": TEXT}, ...], "errors": [{"image": NAME, "error": REASON},
  ...]}``, both in upload order: the images that could be used are captioned, and each file that could not
  is listed with its reason (over ``max_upload_mb``; not an image, truncated or corrupt; over ``max_pixels``,
  a decompression bomb; an aspect ratio over ``max_aspect_ratio``). When no file is usable the answer is
  ``{"detail": "...", "errors": [...]}`` with status 413 (a file was over ``max_upload_mb``) or 422.
  Other statuses: 400 a malformed request or form value; 408 a body not received within ``body_timeout_s``;
  413 a body over every file's limit together, or images needing more than ``max_decode_pixels`` decoded at
  once; 503 (``Retry-After``) ``max_requests`` requests already in progress, ``max_queue`` images waiting,
  or no room in the pixel budget within ``timeout_s``; 504 no answer within ``timeout_s``.
- ``GET /health``: ``{"status": "ok", ...}`` once the model is loaded (never limited, never queued).
- ``GET /info``: checkpoint, encoder, decoding defaults, limits, current load, batching statistics, version.
- ``GET /``: a single page (no build step, nothing from a CDN) to drop or pick images and read captions.

Memory follows decoded pixels, not file counts (a 100 KB PNG can hold 88 megapixels). Each upload's header is
read first (:func:`capdec.images.plan_decode`); a request then takes what its images need from the server's
:class:`~capdec.serve.limits.PixelBudget` (waiting behind earlier requests), decodes them one at a time
reduced to the encoder's input size (:func:`capdec.images.load_image` with ``min_side``: a JPEG at 1/2 to 1/8
scale, then a box average), gives back what decoding needed beyond the reduced images, and gives back the
rest when the batcher is done with them. Uploads go to a temporary file each; decoding runs in the server's
thread pool and captioning on the :class:`DynamicBatcher`'s worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import logging
import os
import re
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
from capdec.errors import InputError
from capdec.images import (
    DEFAULT_MAX_ASPECT,
    DEFAULT_MAX_PIXELS,
    DecodePlan,
    ImageLoadError,
    plan_decode,
    try_load_image,
)
from capdec.serve.batcher import DynamicBatcher, QueueFull
from capdec.serve.limits import InFlight, PixelBudget, RequestGuard

logger = logging.getLogger(__name__)

DECODE_FIELDS = ("strategy", "beam_size", "max_length")
MAX_BEAM_SIZE = 16  # a bound on the work one request can ask for
_DIGITS = re.compile(r"[0-9]{1,6}")  # ASCII only: str.isdigit() also takes '²' and '٣', which int() refuses or reads
_MB = 1024 * 1024


@dataclass
class ServeSettings:
    """Limits and batching of the server (``capdec serve`` flags; checked on construction)."""

    max_batch: int = 32  # images captioned together at most
    max_wait_ms: float = 10.0  # how long the oldest waiting request may wait for others to join its batch
    max_queue: int = 256  # images waiting at most; more gets 503
    max_files: int = 16  # images per request
    max_upload_mb: float = 10.0  # size of one uploaded file
    max_pixels: int | None = DEFAULT_MAX_PIXELS  # decompression-bomb guard (width × height of one image)
    timeout_s: float = 120.0  # a request not answered by then (after its upload) gets 504
    max_requests: int = 64  # /caption requests in progress at once; more get 503 (idle connections do not count)
    max_decode_pixels: int = 100_000_000  # decoded pixels held at once, all requests together (see the module doc)
    max_aspect_ratio: float | None = DEFAULT_MAX_ASPECT  # long side over short side of one image (see images.py)
    header_timeout_s: float = 10.0  # a connection must send a whole request head within this
    body_timeout_s: float = 60.0  # a request's body must arrive whole within this

    def __post_init__(self) -> None:
        def flag(name: str) -> str:
            return "--" + name.removesuffix("_s").replace("_", "-")

        for name in ("max_batch", "max_queue", "max_files", "max_requests", "max_decode_pixels"):
            if getattr(self, name) < 1:
                raise InputError(f"{flag(name)} must be ≥ 1, got {getattr(self, name)}")
        for name in ("max_upload_mb", "timeout_s", "header_timeout_s", "body_timeout_s"):
            if not getattr(self, name) > 0:
                raise InputError(f"{flag(name)} must be > 0, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise InputError(f"--max-wait-ms must be ≥ 0, got {self.max_wait_ms}")
        if self.max_aspect_ratio is not None and not self.max_aspect_ratio >= 1:
            raise InputError(f"--max-aspect-ratio must be ≥ 1, got {self.max_aspect_ratio}")
        if self.max_files > self.max_queue:
            raise InputError(f"--max-files ({self.max_files}) must not be over --max-queue ({self.max_queue}): a "
                             "request with that many images could never be queued")
        if self.max_pixels is not None and self.max_pixels > self.max_decode_pixels:
            raise InputError(f"--max-decode-pixels ({self.max_decode_pixels:,}) must not be under --max-pixels "
                             f"({self.max_pixels:,}): an image of --max-pixels could never be decoded")

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


def _shown(value: str) -> str:
    return repr(value) if len(value) <= 40 else repr(value[:40]) + "..."


def _decode_options(form: Any, max_length: int) -> dict[str, Any]:
    """The decoding fields of the form, checked (HTTPException 400 on a bad value)."""
    options: dict[str, Any] = {}
    for name in DECODE_FIELDS:
        values = form.getlist(name)
        if len(values) > 1:
            raise HTTPException(400, f"{name} given {len(values)} times; send it once")
        if not values or values[0] == "":
            continue
        value = values[0]
        if not isinstance(value, str):
            raise HTTPException(400, f"the form field '{name}' must be text, not a file")
        if name == "strategy":
            if value not in STRATEGIES:
                raise HTTPException(400, f"strategy must be one of {', '.join(STRATEGIES)}, got {_shown(value)}")
            options[name] = value
            continue
        top = MAX_BEAM_SIZE if name == "beam_size" else max_length
        if not _DIGITS.fullmatch(value) or not 1 <= int(value) <= top:
            raise HTTPException(400, f"{name} must be an integer from 1 to {top}, got {_shown(value)}")
        options[name] = int(value)
    return options


def _upload_name(upload: Any, index: int) -> str:
    name = os.path.basename((upload.filename or "").replace("\\", "/")).strip()
    return (name or f"upload-{index + 1}")[:200]


@dataclass
class _Upload:
    """One uploaded file on its way through a request."""

    name: str
    path: str = ""
    plan: DecodePlan | None = None  # from its header; None: refused (see error)
    image: Any = None  # the decoded (reduced) RGB image
    error: str | None = None
    too_big: bool = False  # refused for its size (413 when nothing in the request is usable)


def _save_and_plan(files: list[Any], names: list[str], tmp: str, settings: ServeSettings,
                   min_side: int | None) -> list[_Upload]:
    """Each upload written to a temporary file and its header read (nothing decoded yet)."""
    uploads = []
    for i, (upload, name) in enumerate(zip(files, names)):
        u = _Upload(name, path=os.path.join(tmp, f"{i}.upload"))
        uploads.append(u)
        size = upload.file.seek(0, os.SEEK_END)  # the parser spooled it already: its size, before any copy
        if size > settings.max_upload_bytes:
            u.error = (f"{size:,} bytes is over the upload limit of {settings.max_upload_mb:g} MB "
                       f"({settings.max_upload_bytes:,} bytes)")
            u.too_big = True
            continue
        upload.file.seek(0)
        with open(u.path, "wb") as out:
            shutil.copyfileobj(upload.file, out)
        try:
            u.plan = plan_decode(u.path, max_pixels=settings.max_pixels, min_side=min_side,
                                 max_aspect=settings.max_aspect_ratio)
        except ImageLoadError as e:
            u.error = e.reason
            continue
        if u.plan.decoded > settings.max_decode_pixels:  # possible only without --max-pixels
            u.error = (f"decoding it needs {u.plan.decoded:,} pixels, over the server's limit of "
                       f"{settings.max_decode_pixels:,} (--max-decode-pixels)")
            u.too_big, u.plan = True, None
    return uploads


def _decode(uploads: list[_Upload], settings: ServeSettings, min_side: int | None) -> None:
    """Decode the planned uploads one at a time (the budget was taken for one decode at a time)."""
    for u in uploads:
        if u.plan is None:
            continue
        u.image, reason = try_load_image(u.path, max_pixels=settings.max_pixels, min_side=min_side,
                                         max_aspect=settings.max_aspect_ratio)
        if reason is not None:
            u.error, u.plan = reason, None


def _pixels_needed(plans: list[DecodePlan]) -> int:
    """Pixels held at the worst moment of decoding ``plans`` in turn: every reduced image, plus the largest
    surplus of one decode over its reduced image."""
    return sum(p.kept for p in plans) + max((p.decoded - p.kept for p in plans), default=0)


def _refusal(uploads: list[_Upload]) -> JSONResponse:
    errors = [{"image": u.name, "error": u.error or ""} for u in uploads if u.error]
    status = 413 if any(u.too_big for u in uploads) else 422
    return _error(status, "; ".join(f"{e['image']}: {e['error']}" for e in errors), errors)


def page_html() -> str:
    """The web page (package data: capdec/serve/static/index.html)."""
    return importlib.resources.files("capdec.serve").joinpath("static/index.html").read_text(encoding="utf-8")


def create_app(captioner: Any, settings: ServeSettings | None = None, *, checkpoint: str | None = None) -> FastAPI:
    """The FastAPI app serving ``captioner`` (a :class:`capdec.caption.Captioner`)."""
    settings = settings or ServeSettings()
    batcher = DynamicBatcher(captioner, max_batch=settings.max_batch, max_wait_ms=settings.max_wait_ms,
                             max_queue=settings.max_queue)
    budget = PixelBudget(settings.max_decode_pixels)
    in_flight = InFlight()
    model_max_length = captioner.model.config.max_length
    min_side = getattr(captioner.encoder, "image_size", None)  # decode no larger than the encoder resizes to
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
    app.state.budget = budget
    app.add_middleware(RequestGuard, max_body=settings.max_request_bytes, body_timeout=settings.body_timeout_s,
                       max_active=settings.max_requests, in_flight=in_flight)

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
            "limits": {**asdict(settings), "max_beam_size": MAX_BEAM_SIZE, "max_length": model_max_length,
                       "decode_min_side": min_side},
            "load": {"active_requests": in_flight.count, "queued_images": batcher.queued,
                     "decoded_pixels_held": budget.held, "decoded_pixels_peak": budget.peak},
            "batching": batcher.stats.to_dict(),
        }

    @app.post("/caption")
    async def caption(request: Request) -> Any:
        form = await request.form(max_files=settings.max_files, max_fields=len(DECODE_FIELDS) + 1)
        with tempfile.TemporaryDirectory(prefix="capdec-serve-") as tmp:
            try:
                unknown = sorted(set(form.keys()) - {"image", *DECODE_FIELDS})
                if unknown:
                    raise HTTPException(400, f"unknown form field(s) {', '.join(unknown)}; send 'image' (one or "
                                             f"more files) and optionally {', '.join(DECODE_FIELDS)}")
                files = form.getlist("image")
                if not files:
                    raise HTTPException(400, "no image: send the files in the multipart form field 'image'")
                if not all(isinstance(f, UploadFile) for f in files):
                    raise HTTPException(400, "the form field 'image' must hold files, not text")
                options = _decode_options(form, model_max_length)
                names = [_upload_name(f, i) for i, f in enumerate(files)]
                uploads = await run_in_threadpool(_save_and_plan, files, names, tmp, settings, min_side)
            finally:
                await form.close()
            return await _caption(uploads, options)

    async def _caption(uploads: list[_Upload], options: dict[str, Any]) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settings.timeout_s
        planned = [u.plan for u in uploads if u.plan is not None]
        if not planned:
            return _refusal(uploads)
        need = _pixels_needed(planned)
        if need > budget.capacity:
            return _error(413, f"the images of this request need {need:,} decoded pixels at once, over the server's "
                               f"limit of {budget.capacity:,} (--max-decode-pixels); send fewer or smaller images")
        if not await budget.acquire(need, deadline - loop.time()):
            return _error(503, f"the server is busy decoding other images (no room for {need:,} decoded pixels "
                               f"within {settings.timeout_s:g} s); retry shortly", headers={"Retry-After": "1"})
        held = need
        try:
            await run_in_threadpool(_decode, uploads, settings, min_side)
            good = [u for u in uploads if u.image is not None]
            kept = sum(u.plan.kept for u in good if u.plan is not None)
            budget.release(held - kept)  # what decoding needed beyond the reduced images
            held = kept
            if not good:
                return _refusal(uploads)
            try:
                future = batcher.submit([u.image for u in good], options)
            except QueueFull as e:
                return _error(503, f"the server is busy ({e}); retry shortly", headers={"Retry-After": "1"})
            # the batcher holds the images until it is done with them, whatever becomes of this request
            future.add_done_callback(lambda _, n=kept: budget.release_threadsafe(n))
            held = 0
        finally:
            if held:
                budget.release(held)
        try:
            captions = await asyncio.wait_for(asyncio.wrap_future(future), timeout=max(deadline - loop.time(), 0))
        except asyncio.TimeoutError:
            return _error(504, f"no caption within {settings.timeout_s:g} s; the server is overloaded")
        except Exception as e:
            logger.warning("captioning failed: %s", e)
            return _error(500, f"captioning failed: {type(e).__name__}: {e}")
        return {"captions": [{"image": u.name, "caption": c} for u, c in zip(good, captions)],
                "errors": [{"image": u.name, "error": u.error} for u in uploads if u.error]}

    return app
