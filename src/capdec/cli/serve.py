"""``capdec serve``: a captioning HTTP server and web page for a checkpoint."""

from __future__ import annotations

import argparse
import ipaddress
import logging
from typing import Any

from capdec.config_base import add_arguments as add_config_arguments
from capdec.config_base import given
from capdec.configs import DecodeConfig  # torch-free: cheap for --help
from capdec.encoders import PRECISION_HELP, PRECISIONS  # torch-free: cheap for --help
from capdec.images import DEFAULT_MAX_ASPECT, DEFAULT_MAX_PIXELS  # stdlib-only module: cheap for --help

DECODE_FLAGS = ["strategy", "beam_size", "max_length", "length_penalty"]  # the server's default DecodeConfig
HELP = "serve a checkpoint: an HTTP captioning API with dynamic batching and a web page"
DESCRIPTION = (
    "Serve a checkpoint over HTTP (FastAPI on uvicorn). Open http://HOST:PORT/ for a page where you drop "
    "or pick images and read their captions; programs POST multipart field 'image' (repeatable) to "
    "/caption and get {\"captions\": [{\"image\", \"caption\"}], \"errors\": [{\"image\", \"error\"}]}; GET "
    "/health and /info describe the server. "
    "Concurrent requests are captioned together (up to --max-batch images, waiting at most --max-wait-ms). "
    "A bad file (not an image, truncated, over --max-upload-mb, over --max-pixels, over --max-aspect-ratio) is "
    "named in the answer's 'errors' while the other files of the request are captioned. Memory is bounded by "
    "decoded pixels (--max-decode-pixels; large images are decoded reduced to the encoder's input size), and "
    "slow or idle clients by --header-timeout, --body-timeout and --max-requests (idle connections and /health "
    "never count against it). "
    "There is no authentication: keep the default --host 127.0.0.1 unless the network is trusted. "
    "CHECKPOINT is a directory or a Hugging Face Hub repo id (org/name[@revision]). Needs the 'serve' "
    "extra: pip install 'capdec[serve]'."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint directory or Hub repo id")
    net = parser.add_argument_group("server")
    net.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    net.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port)")
    net.add_argument("--max-requests", "--max-connections", dest="max_requests", type=int, default=64,
                     help="captioning requests in progress at once; more get 503 (idle connections, /health, /info "
                          "and the page do not count; --max-connections is the old name)")
    net.add_argument("--header-timeout", type=float, default=10.0,
                     help="seconds a connection has to send a whole request head; then it is closed (408)")
    net.add_argument("--body-timeout", type=float, default=60.0,
                     help="seconds a request has to send its whole body; then it is answered 408 and closed")
    lim = parser.add_argument_group("batching and limits")
    lim.add_argument("--max-batch", type=int, default=32, help="images captioned together at most")
    lim.add_argument("--max-wait-ms", type=float, default=10.0,
                     help="how long a request may wait for others to join its batch")
    lim.add_argument("--max-queue", type=int, default=256, help="images waiting at most; more get 503")
    lim.add_argument("--max-files", type=int, default=16, help="images per request")
    lim.add_argument("--max-upload-mb", type=float, default=10.0, help="size limit of one uploaded file, in MB")
    lim.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                     help="refuse images with more pixels than this (decompression-bomb guard; 0: no limit)")
    lim.add_argument("--max-decode-pixels", type=int, default=100_000_000,
                     help="decoded pixels held at once, all requests together (images being decoded, and decoded "
                          "images waiting to be captioned); a request waits for room, up to --timeout (then 503); "
                          "a request needing more than this is refused (413). Must be at least --max-pixels")
    lim.add_argument("--max-aspect-ratio", type=float, default=DEFAULT_MAX_ASPECT,
                     help="refuse images whose long side is over this many times their short side (0: no limit)")
    lim.add_argument("--timeout", type=float, default=120.0,
                     help="seconds from a request's upload to its answer; then 504 (503 if it was still waiting for "
                          "room to decode)")
    dec = parser.add_argument_group("decoding defaults (a request may override strategy, beam size, max length)")
    add_config_arguments(dec, DecodeConfig, DECODE_FLAGS)
    run_ = parser.add_argument_group("model")
    run_.add_argument("--encoder", metavar="SPEC",
                      help="encoder to use instead of the one the checkpoint records (the same model, e.g. a local copy)")
    run_.add_argument("--memory", metavar="DIR", help="text memory for projection / retrieval-augmented checkpoints")
    run_.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    run_.add_argument("--precision", default="auto", choices=PRECISIONS, help=PRECISION_HELP)


def _settings(args: argparse.Namespace) -> Any:
    """The server's limits from the flags, checked before anything is loaded."""
    from capdec.errors import InputError
    from capdec.serve.app import ServeSettings

    if not 0 <= args.port <= 65535:
        raise InputError(f"--port must be from 0 to 65535, got {args.port}")
    DecodeConfig(**given(args, DecodeConfig, DECODE_FLAGS))  # the decoding flags are checked by their config
    return ServeSettings(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                         max_files=args.max_files, max_upload_mb=args.max_upload_mb,
                         max_pixels=args.max_pixels if args.max_pixels > 0 else None, timeout_s=args.timeout,
                         max_requests=args.max_requests, max_decode_pixels=args.max_decode_pixels,
                         max_aspect_ratio=args.max_aspect_ratio if args.max_aspect_ratio != 0 else None,
                         header_timeout_s=args.header_timeout, body_timeout_s=args.body_timeout)


def _load(args: argparse.Namespace, decode: DecodeConfig, max_pixels: int | None) -> Any:
    """The captioner with its encoder loaded; any failure to load the checkpoint is one line (exit 2)."""
    from capdec.caption import Captioner
    from capdec.errors import CapdecError, InputError

    try:
        captioner = Captioner.from_pretrained(args.checkpoint, encoder=args.encoder, device=args.device,
                                              precision=args.precision, decode=decode, max_pixels=max_pixels,
                                              memory=args.memory)
        captioner.encoder  # noqa: B018  (loaded and checked now: /health means ready)
    except Exception as e:  # torch, safetensors and transformers raise their own kinds (MemoryError too)
        text = " ".join(str(e).split())  # one line, whatever the message was
        if not isinstance(e, CapdecError):
            text = f"{type(e).__name__}: {text}"
        if args.checkpoint not in text:
            text = f"cannot load the checkpoint {args.checkpoint}: {text}"
        raise InputError(text) from e
    return captioner


def run(args: argparse.Namespace) -> int:
    from capdec.errors import CapdecError, InputError

    log = logging.getLogger("capdec.serve")
    try:
        import fastapi  # noqa: F401
        import multipart  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise CapdecError(f"capdec serve needs FastAPI, uvicorn and python-multipart ({e}): "
                          "pip install 'capdec[serve]'") from e
    settings = _settings(args)
    from PIL import Image

    from capdec.serve import bind, create_app, uvicorn_config
    from capdec.utils import set_threads_from_env

    set_threads_from_env()
    max_pixels = settings.max_pixels
    if Image.MAX_IMAGE_PIXELS is not None and (max_pixels is None or max_pixels > Image.MAX_IMAGE_PIXELS):
        Image.MAX_IMAGE_PIXELS = max_pixels  # our check is the guard (as in capdec caption)
    captioner = _load(args, DecodeConfig(**given(args, DecodeConfig, DECODE_FLAGS)), max_pixels)
    if args.max_length is not None and args.max_length > captioner.model.config.max_length:
        raise InputError(f"--max-length {args.max_length} is over the checkpoint's {captioner.model.config.max_length}")
    encoder = captioner.encoder
    app = create_app(captioner, settings, checkpoint=args.checkpoint)
    try:
        sock = bind(args.host, args.port)
    except OSError as e:
        raise InputError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from e
    host, port = sock.getsockname()[:2]
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        log.warning("listening on %s, reachable from other machines: the server has no authentication", host)
    url_host = f"[{host}]" if ":" in host else host
    log.info("serving %s (encoder %s) on http://%s:%d/ (Ctrl-C to stop)", args.checkpoint, encoder.spec,
             url_host, port)
    level = logging.getLogger("capdec").getEffectiveLevel()
    server = uvicorn.Server(uvicorn_config(app, log_level="info" if level <= logging.INFO else "warning"))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it caught, after a graceful shutdown
        pass
    finally:
        sock.close()
    log.info("server stopped")
    return 0
