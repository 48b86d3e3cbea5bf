"""Benchmark ``capdec serve`` under hostile clients: memory under large uploads, /health under idle sockets.

The real command (``python -m capdec serve CHECKPOINT --port 0``) runs in a child process on 127.0.0.1;
this process attacks it and samples the server's resident memory (``VmRSS`` in ``/proc/PID/status``,
every 10 ms) while it does. Measured:

- ``pixels``: ``--uploads`` concurrent requests of one ``--side`` x ``--side`` greyscale PNG each (about
  100 KB of file, 88 megapixels decoded at 9400: under the default ``--max-pixels``): status codes,
  server RSS before and at peak, wall time;
- ``aspect``: one 4000 x 1 PNG (status code, peak RSS), and what Hugging Face's ``CLIPImageProcessor`` at
  CLIP's 224 pixels costs on it when called directly (peak RSS of a child process; no server involved);
- ``idle_sockets``: ``--sockets`` connections that send nothing, then as many that send half a request
  head; after each, the status and latency of ``GET /health`` (10 s at most);
- ``stalled``: how long the server keeps a connection that sent half a request head, and one that sent a
  head and part of its body, open (``--stall-wait`` seconds at most; null: still open), and what it sent;
- ``form``: the status of ``beam_size=²`` (a Unicode digit).

Any checkpoint works (the numbers are about image decoding and connections, not the model), e.g. the
demo's: ``capdec demo --out demo_out`` then::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/serve_hostile.py demo_out/runs/capdec

Prints one JSON object (also written to ``--out``). Only 127.0.0.1 is ever contacted.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx


def grey_png(width: int, height: int) -> bytes:
    """A ``width`` x ``height`` 8-bit greyscale PNG of vertical stripes, compressed without holding its pixels
    (every row after the first is filtered 'Up' to zeros, so the file stays ~1000x smaller than its pixels)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    z = zlib.compressobj(9)
    parts = [z.compress(b"\x00" + bytes(i % 256 for i in range(width)))]
    row = b"\x02" + bytes(width)
    for _ in range(height - 1):
        parts.append(z.compress(row))
    parts.append(z.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def _rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} for process {pid}")


class RssSampler:
    """Samples a process's RSS every 10 ms on a thread; ``peak`` is the largest seen."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_mb(self.pid))
            time.sleep(0.01)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def start_server(checkpoint: str, extra: list[str]) -> tuple[subprocess.Popen, str]:
    """``capdec serve`` in a child process on a free loopback port (its log goes to this stderr), once healthy."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "capdec", "serve", checkpoint, "--port", str(port), *extra])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode} (see its log above)")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("the server did not answer /health within 300 s")
        time.sleep(0.2)


def pixel_attack(url: str, pid: int, png: bytes, uploads: int) -> dict[str, Any]:
    def post(i: int) -> int:
        r = httpx.post(f"{url}/caption", files=[("image", (f"big{i}.png", png))], timeout=600)
        return r.status_code

    before = _rss_mb(pid)
    t0 = time.perf_counter()
    with RssSampler(pid) as rss, ThreadPoolExecutor(uploads) as pool:
        statuses = list(pool.map(post, range(uploads)))
    return {"uploads": uploads, "file_kb": round(len(png) / 1024, 1), "statuses": statuses,
            "rss_before_mb": round(before), "rss_peak_mb": round(rss.peak), "wall_s": round(time.perf_counter() - t0, 2)}


def _processor_peak(queue: Any) -> None:
    from PIL import Image
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor()  # CLIP's defaults: shortest edge 224, centre crop 224
    before = _rss_mb(os.getpid(), "VmHWM")
    processor(images=[Image.new("RGB", (4000, 1), (120, 60, 30))], return_tensors="pt")
    queue.put({"hf_processor_before_mb": round(before), "hf_processor_peak_mb": round(_rss_mb(os.getpid(), "VmHWM"))})


def aspect_attack(url: str, pid: int) -> dict[str, Any]:
    from io import BytesIO

    from PIL import Image

    buf = BytesIO()
    Image.new("RGB", (4000, 1), (120, 60, 30)).save(buf, "PNG")
    before = _rss_mb(pid)
    with RssSampler(pid) as rss:
        r = httpx.post(f"{url}/caption", files=[("image", ("wide.png", buf.getvalue()))], timeout=600)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_processor_peak, args=(queue,))
    child.start()
    direct = queue.get(timeout=600)
    child.join()
    return {"status": r.status_code, "answer": r.text[:300], "rss_before_mb": round(before),
            "rss_peak_mb": round(rss.peak), **direct}


def _health(url: str) -> dict[str, Any]:
    t = time.perf_counter()
    try:
        status: Any = httpx.get(f"{url}/health", timeout=10).status_code
    except httpx.HTTPError as e:
        status = type(e).__name__
    return {"status": status, "latency_ms": round(1000 * (time.perf_counter() - t), 1)}


def idle_sockets(url: str, n: int) -> dict[str, Any]:
    host, port = url.rsplit("/", 1)[-1].split(":")
    out: dict[str, Any] = {"sockets": n}
    for kind, payload in (("silent", b""), ("half_head", b"POST /caption HTTP/1.1\r\nHost: x\r\n")):
        socks = []
        try:
            for _ in range(n):
                s = socket.create_connection((host, int(port)), timeout=10)
                if payload:
                    s.sendall(payload)
                socks.append(s)
            time.sleep(0.2)
            out[kind] = _health(url)
        finally:
            for s in socks:
                s.close()
    return out


def _held_open(url: str, payload: bytes, wait: float) -> dict[str, Any]:
    host, port = url.rsplit("/", 1)[-1].split(":")
    s = socket.create_connection((host, int(port)), timeout=10)
    s.sendall(payload)
    s.settimeout(wait)
    t = time.perf_counter()
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
        closed: Any = round(time.perf_counter() - t, 2)
    except TimeoutError:
        closed = None
    except ConnectionResetError:
        closed = round(time.perf_counter() - t, 2)
    finally:
        s.close()
    return {"closed_after_s": closed, "answer": data.split(b"\r\n", 1)[0].decode("latin-1")}


def stalled(url: str, wait: float) -> dict[str, Any]:
    head = b"POST /caption HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    body_start = (b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n"
                  b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n')
    return {"wait_s": wait, "half_head": _held_open(url, head, wait), "stalled_body": _held_open(url, head + body_start, wait)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--uploads", type=int, default=12)
    p.add_argument("--side", type=int, default=9400)
    p.add_argument("--sockets", type=int, default=80)
    p.add_argument("--stall-wait", type=float, default=75.0, help="the longest a stalled connection is watched")
    p.add_argument("--skip", nargs="*", default=[], choices=["pixels", "aspect", "idle_sockets", "stalled", "form"])
    p.add_argument("--serve-args", default="", help="extra flags for capdec serve, in one string")
    p.add_argument("--out", type=Path)
    args = p.parse_args()

    proc, url = start_server(args.checkpoint, args.serve_args.split())
    report: dict[str, Any] = {"checkpoint": args.checkpoint, "serve_args": args.serve_args,
                              "rss_idle_mb": round(_rss_mb(proc.pid))}
    try:
        if "idle_sockets" not in args.skip:
            report["idle_sockets"] = idle_sockets(url, args.sockets)
        if "stalled" not in args.skip:
            report["stalled"] = stalled(url, args.stall_wait)
        if "form" not in args.skip:
            png = grey_png(8, 8)
            r = httpx.post(f"{url}/caption", files=[("image", ("a.png", png))], data={"beam_size": "²"}, timeout=60)
            report["form"] = {"beam_size=²": r.status_code}
        if "aspect" not in args.skip:
            report["aspect"] = aspect_attack(url, proc.pid)
        if "pixels" not in args.skip:
            report["pixels"] = pixel_attack(url, proc.pid, grey_png(args.side, args.side), args.uploads)
        report["rss_peak_lifetime_mb"] = round(_rss_mb(proc.pid, "VmHWM"))
    finally:
        proc.terminate()
        proc.wait(60)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
