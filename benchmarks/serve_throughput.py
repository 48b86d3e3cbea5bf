"""Benchmark ``capdec serve``: what dynamic batching buys under concurrent load.

The real server (FastAPI on uvicorn, 127.0.0.1, a free port) runs a captioner; HTTP clients (threads in
a separate process) send one photo per request. Measured, on the same images:

- ``one_at_a_time``: one client, each request waits for the previous answer (no batching possible);
- ``concurrent``: ``--clients`` clients at once, ``--requests`` each (the server batches them);
- ``library_batched``: ``Captioner.caption`` on the same images in batches of ``--max-batch`` (what
  ``capdec caption`` does; the server adds HTTP and upload, but decodes large images reduced to the
  encoder's input size, which ``capdec caption`` does not);
- ``library_at_the_servers_mean_batch``: the same at the batch size the server reached (so the server's
  own overhead shows apart from the batch size its load allowed).

Closed-loop clients (each waits for its answer before sending the next) keep at most ``--clients`` images
in flight, and the images of the clients answered last arrive while the next batch runs, so batches hold
about half of them unless ``--max-wait-ms`` covers a client's turnaround.

Default model: real sizes with random weights, as ``caption_speed.py`` builds it (ViT-B/32 CLIP image
tower, CapDec's 8-layer transformer mapper, GPT-2 small; a random LM never ends a caption early, so
every caption is ``--max-length`` tokens). ``--checkpoint`` serves a trained checkpoint instead. Images:
the 17 COCO photos in tests/data/coco/images, cycled. Prints one JSON object (also written to ``--out``),
with the run's command, machine, threads and load average (``run``)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/serve_throughput.py              # ~2 min on one core
    .venv/bin/python benchmarks/serve_throughput.py --threads 4 --clients 16 --requests 8
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import multiprocessing
import os
import statistics
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import torch
from run_record import finish, start

from capdec.caption import Captioner
from capdec.decode import DecodeConfig
from capdec.serve import ServerThread, ServeSettings, create_app

logger = logging.getLogger("capdec.benchmarks.serve_throughput")


def _caption_speed() -> Any:
    """The sibling benchmark module (its real-size random captioner and image list)."""
    spec = importlib.util.spec_from_file_location("caption_speed", Path(__file__).with_name("caption_speed.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(url: str, files: list[str], *, clients: int, requests: int) -> dict[str, Any]:
    """``clients`` threads, ``requests`` one-image requests each; every answer must be a caption."""
    payloads = [(Path(p).name, Path(p).read_bytes()) for p in files]
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        with httpx.Client(timeout=600) as http:
            for i in range(requests):
                name, data = payloads[(k * requests + i) % len(payloads)]
                t = time.perf_counter()
                r = http.post(f"{url}/caption", files=[("image", (name, data))])
                dt = time.perf_counter() - t
                ok = r.status_code == 200 and len(r.json().get("captions", [])) == 1
                with lock:
                    latencies.append(dt)
                    if not ok:
                        failures.append(f"{r.status_code}: {r.text[:200]}")

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - t0
    latencies.sort()
    return {"clients": clients, "requests": len(latencies), "failed": len(failures), "wall_s": round(wall, 3),
            "images_per_s": round(len(latencies) / wall, 3),
            "p50_ms": round(1000 * statistics.median(latencies), 1),
            "p95_ms": round(1000 * latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], 1)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1") or 1),
                        help="torch threads")
    parser.add_argument("--checkpoint", help="serve this checkpoint (default: real-size random weights)")
    parser.add_argument("--strategy", default="greedy", choices=["greedy", "beam"], help="decoding strategy")
    parser.add_argument("--beam-size", type=int, default=5, help="beam width (with --strategy beam)")
    parser.add_argument("--max-length", type=int, default=12, help="tokens per caption (random model)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--requests", type=int, default=8, help="requests per concurrent client")
    parser.add_argument("--serial", type=int, default=16, help="requests sent one at a time")
    parser.add_argument("--max-batch", type=int, default=32, help="the server's --max-batch")
    parser.add_argument("--max-wait-ms", type=float, default=10.0, help="the server's --max-wait-ms")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    record = start(argv, threads=args.threads)

    cs = _caption_speed()
    if args.checkpoint:
        captioner = Captioner.from_pretrained(args.checkpoint, device="cpu")
        model = args.checkpoint
    else:
        captioner = cs.build_captioner(max_length=args.max_length, prefix_length=10, seed=args.seed)
        model = "random ViT-B/32 + 8-layer transformer mapper + GPT-2 small"
    captioner.decode = DecodeConfig(strategy=args.strategy, beam_size=args.beam_size)
    n_images = args.clients * args.requests
    files = cs.image_files(max(n_images, args.serial))
    captioner.caption(files[:2], show_progress=False)  # warm-up: first-call allocations

    t = time.perf_counter()
    captioner.caption(files[:n_images], batch_size=args.max_batch, show_progress=False)
    library = {"images": n_images, "batch_size": args.max_batch,
               "images_per_s": round(n_images / (time.perf_counter() - t), 3)}

    settings = ServeSettings(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_files=1,
                             max_queue=max(256, n_images), timeout_s=600, max_requests=max(64, args.clients))
    app = create_app(captioner, settings, checkpoint=model)
    # the clients run in another process, so that they do not compete with the server for the GIL
    with ServerThread(app) as server, \
            ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as clients:
        def remote(n_clients: int, n_requests: int, paths: list[str]) -> dict[str, Any]:
            return clients.submit(load, server.url, paths, clients=n_clients, requests=n_requests).result()

        remote(1, 1, files[:1])  # warm-up
        serial = remote(1, args.serial, files)
        before = app.state.batcher.stats.to_dict()
        concurrent = remote(args.clients, args.requests, files)
        after = app.state.batcher.stats.to_dict()
    batches = after["batches"] - before["batches"]
    mean_batch = (after["images"] - before["images"]) / batches if batches else 1.0
    at_mean = max(1, round(mean_batch))
    t = time.perf_counter()
    captioner.caption(files[:n_images], batch_size=at_mean, show_progress=False)
    library_same = {"images": n_images, "batch_size": at_mean,
                    "images_per_s": round(n_images / (time.perf_counter() - t), 3)}
    result = {
        "benchmark": "serve_throughput",
        "model": model,
        "decoding": {"strategy": args.strategy, "beam_size": args.beam_size if args.strategy == "beam" else None,
                     "max_length": args.max_length if not args.checkpoint else None},
        "server": {"max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms},
        "one_at_a_time": serial,
        "concurrent": {**concurrent, "batches": batches, "mean_batch": round(mean_batch, 2)},
        "library_batched": library,
        "library_at_the_servers_mean_batch": library_same,
        "speedup_concurrent_vs_one_at_a_time": round(concurrent["images_per_s"] / serial["images_per_s"], 2),
        "concurrent_vs_library_batched": round(concurrent["images_per_s"] / library["images_per_s"], 3),
        "run": finish(record),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
