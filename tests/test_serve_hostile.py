"""capdec serve under careless and hostile clients (issue 21, items 9-11 and the server part of item 5).

Every case runs through the real server (uvicorn on 127.0.0.1 at a free port, in this process) over HTTP or
raw sockets; never any other address. Loops are bounded in count and time, and waits are generous, so the
suite holds on a loaded 2-core machine. The checkpoint is a tiny one trained here through the CLI on the
session's tiny Hugging Face CLIP store, so uploads go through the real CLIP image processor.

Where a case needs the worker busy (a full queue, a timeout, the pixel budget held), the real captioner sits
behind a gate (:class:`Gated`) that the test opens: the batcher then really holds the request.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import select
import socket
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("multipart")
httpx = pytest.importorskip("httpx")

from PIL import Image  # noqa: E402

from capdec.caption import Captioner  # noqa: E402
from capdec.cli import main  # noqa: E402
from capdec.serve import ServerThread, ServeSettings, create_app  # noqa: E402

TINY_MODEL = ["--prefix-length", "2", "--mapper", "mlp", "--max-length", "8", "--lm-dim", "32", "--lm-depth", "1",
              "--lm-heads", "2", "--vocab-size", "400"]
WAIT = 30.0  # the most any single step of a test waits (a bound, never an expected duration)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, hf_store) -> Path:
    out = tmp_path_factory.mktemp("hostile") / "ckpt"
    assert main(["-q", "train", str(hf_store), "--out", str(out), "--epochs", "1", "--batch-size", "64",
                 *TINY_MODEL]) == 0
    return out


@pytest.fixture(scope="module")
def captioner(checkpoint) -> Captioner:
    return Captioner.from_pretrained(checkpoint, device="cpu", num_workers=0)


def png(width: int, height: int, mode: str = "L") -> bytes:
    """A ``width`` x ``height`` PNG (8-bit greyscale or RGB) of vertical stripes, written without holding its
    pixels: every row after the first is filtered 'Up' to zeros, so the file is ~1000x smaller than its pixels."""
    channels = {"L": 1, "RGB": 3}[mode]

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    z = zlib.compressobj(9)
    parts = [z.compress(b"\x00" + bytes(i % 251 for i in range(width * channels)))]
    row = b"\x02" + bytes(width * channels)
    parts += [z.compress(row) for _ in range(height - 1)]
    parts.append(z.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0 if mode == "L" else 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def small_png(width: int = 40, height: int = 30, colour=(200, 120, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, "PNG")
    return buf.getvalue()


class Gated:
    """The real captioner behind a gate: ``caption`` waits until the test opens it (at most a minute)."""

    def __init__(self, captioner: Captioner):
        self._captioner = captioner
        self.open = threading.Event()
        self.entered = threading.Event()  # a batch reached the model

    def __getattr__(self, name):
        return getattr(self._captioner, name)

    def caption(self, images, **kwargs):
        self.entered.set()
        if not self.open.wait(60):
            raise TimeoutError("the test never opened the gate")
        return self._captioner.caption(images, **kwargs)


@contextlib.contextmanager
def serving(captioner, **settings):
    """The real server on 127.0.0.1 at a free port, with these ServeSettings."""
    defaults = {"max_wait_ms": 5, "timeout_s": WAIT}
    with ServerThread(create_app(captioner, ServeSettings(**{**defaults, **settings}), checkpoint="hostile")) as srv:
        try:
            yield srv
        finally:  # a failed test must not leave the worker waiting at a closed gate while the server stops
            if isinstance(captioner, Gated):
                captioner.open.set()


def _post(url: str, files: list[tuple[str, bytes]], fields: list[tuple[str, str]] = (), **kw) -> httpx.Response:
    parts = [("image", f) for f in files] + [(k, (None, v)) for k, v in fields]
    return httpx.post(f"{url}/caption", files=parts, timeout=kw.pop("timeout", 2 * WAIT), **kw)


def _load(url: str) -> dict:
    return httpx.get(f"{url}/info", timeout=WAIT).json()["load"]


def _wait_until(predicate, what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# -- 9. memory is bounded by pixels ------------------------------------------------------------------------


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def _peak_growth_mb(fn) -> tuple[float, object]:
    """(peak RSS of this process while ``fn`` runs, minus RSS before it, in MB; ``fn``'s result)."""
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (the peak) to the current RSS
    before = _rss_kb("VmRSS")
    result = fn()
    return (_rss_kb("VmHWM") - before) / 1024, result


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc peak-RSS reset")
def test_large_uploads_are_decoded_within_the_pixel_budget(captioner):
    """The issue's attack, scaled to a test: concurrent uploads of large, tiny PNGs (each under max-pixels).
    Decoded one at a time within the budget and reduced straight to the encoder's size, they cost about one
    decode of memory; decoded at once and kept whole (before the fix), each costs ~100 MB more."""
    side, uploads = 5000, 4  # 25 megapixels of RGB (100 MB as PIL holds it) in a file of ~75 KB
    big = png(side, side, "RGB")
    assert len(big) < 100_000
    budget = side * side + 1_000_000  # one large image decodes at a time
    with serving(captioner, max_pixels=budget, max_decode_pixels=budget) as server:
        _post(server.url, [("warm.png", small_png())])  # first-request allocations out of the measurement

        def attack():
            with ThreadPoolExecutor(uploads) as pool:
                return list(pool.map(lambda i: _post(server.url, [(f"big{i}.png", big)]), range(uploads)))

        growth, answers = _peak_growth_mb(attack)
        load = _load(server.url)
    assert [r.status_code for r in answers] == [200] * uploads, [r.text[:200] for r in answers]
    assert all(r.json()["captions"][0]["caption"].strip() for r in answers)
    one_decode_mb = side * side * 4 / 2**20  # RGB is held in 4 bytes a pixel
    print(f"\npeak RSS growth under {uploads} concurrent {side}x{side} uploads: {growth:.0f} MB "
          f"(one decode: {one_decode_mb:.0f} MB)")
    assert growth < 2.2 * one_decode_mb  # ~4.4 decodes before the fix (kept whole, decoded at once)
    assert load["decoded_pixels_peak"] <= budget and load["decoded_pixels_held"] == 0


def test_an_extreme_aspect_ratio_is_refused_and_the_rest_answered(server):
    wide = small_png(4000, 1)
    r = _post(server.url, [("wide.png", wide), ("ok.png", small_png())])
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["image"] for c in body["captions"]] == ["ok.png"]
    assert body["errors"] == [{"image": "wide.png", "error": body["errors"][0]["error"]}]
    assert "aspect ratio 4000:1 is over the limit of 20:1" in body["errors"][0]["error"]
    alone = _post(server.url, [("wide.png", wide)])
    assert alone.status_code == 422 and "aspect ratio" in alone.json()["errors"][0]["error"]


@pytest.fixture(scope="module")
def server(captioner):
    with serving(captioner, max_files=4, max_upload_mb=0.5) as running:
        yield running


def test_a_batch_with_bad_files_answers_the_good_ones(server, captioner):
    good = [("a.png", small_png(colour=(10, 200, 30))), ("b.png", small_png(64, 48, (250, 250, 10)))]
    truncated = ("truncated.png", good[0][1][: len(good[0][1]) // 2])
    too_big = ("big.png", os.urandom(600 * 1024))  # over the 0.5 MB upload limit
    r = _post(server.url, [good[0], truncated, too_big, good[1]])
    assert r.status_code == 200, r.text
    body = r.json()
    expected = captioner.caption([Image.open(io.BytesIO(data)).convert("RGB") for _, data in good])
    assert body["captions"] == [{"image": name, "caption": c} for (name, _), c in zip(good, expected)]
    assert [e["image"] for e in body["errors"]] == ["truncated.png", "big.png"]
    assert "truncated" in body["errors"][0]["error"] and "over the upload limit" in body["errors"][1]["error"]
    # nothing usable: the request is refused whole, 413 when a file was over the upload limit, else 422
    assert _post(server.url, [truncated, too_big]).status_code == 413
    assert _post(server.url, [truncated]).status_code == 422


def test_a_request_needing_more_pixels_than_the_budget_is_413(captioner):
    # 60x60 images are not reduced (the encoder takes 32 pixels), so each keeps its 3600 pixels until captioned
    tile = small_png(60, 60)
    with serving(captioner, max_pixels=5000, max_decode_pixels=10_000) as server:
        assert _post(server.url, [("a.png", tile), ("b.png", tile)]).status_code == 200
        r = _post(server.url, [("a.png", tile), ("b.png", tile), ("c.png", tile)])
        assert r.status_code == 413 and "10,800 decoded pixels" in r.json()["detail"], r.text
        over = _post(server.url, [("big.png", small_png(80, 80)), ("a.png", tile)])
        assert over.status_code == 200 and "over the limit of 5,000" in over.json()["errors"][0]["error"]
        assert _load(server.url)["decoded_pixels_held"] == 0


def test_requests_wait_for_the_pixel_budget_and_get_it_back(captioner):
    """Decoded images hold their pixels until captioned; a request that does not fit waits, then gets 503;
    every pixel comes back however a request ends (answered, refused, timed out)."""
    gated = Gated(captioner)
    tile = small_png(60, 60)  # 3600 pixels, kept whole
    with ThreadPoolExecutor(2) as pool, serving(gated, max_pixels=5000, max_decode_pixels=6000, timeout_s=1.5) as server:
        first = pool.submit(_post, server.url, [("first.png", tile)])
        assert gated.entered.wait(WAIT)  # the first request's pixels are held by the worker
        assert _load(server.url)["decoded_pixels_held"] == 3600
        second = _post(server.url, [("second.png", tile)])  # 3600 more do not fit: waits, then 503
        assert second.status_code == 503 and second.headers["retry-after"] == "1", second.text
        assert "decoded pixels" in second.json()["detail"]
        assert first.result(WAIT).status_code == 504  # the gate held it past timeout_s
        gated.open.set()
        _wait_until(lambda: _load(server.url)["decoded_pixels_held"] == 0, "the pixels to come back")
        assert _post(server.url, [("third.png", tile)]).status_code == 200


def test_a_decode_gives_back_what_it_needed_beyond_the_reduced_image(captioner):
    """A large image holds its full decode only while decoding: once reduced, the next request can decode."""
    gated = Gated(captioner)
    big = png(2000, 2000)  # 4 megapixels decoded, reduced to 33x33 for the encoder's 32 (2000 // 32 = 62)
    with ThreadPoolExecutor(2) as pool, serving(gated, max_pixels=4_000_000, max_decode_pixels=4_500_000) as server:
        first = pool.submit(_post, server.url, [("first.png", big)])
        assert gated.entered.wait(WAIT)  # its reduced image is held by the worker
        second = pool.submit(_post, server.url, [("second.png", big)])
        _wait_until(lambda: _load(server.url)["queued_images"] == 1, "the second image decoded and queued")
        assert _load(server.url)["decoded_pixels_held"] == 2 * 33 * 33
        gated.open.set()
        assert first.result(WAIT).status_code == 200 and second.result(WAIT).status_code == 200


# -- 10. slow or idle clients cannot lock others out ---------------------------------------------------------


def _connect(url: str) -> socket.socket:
    host, port = url.rsplit("/", 1)[-1].rsplit(":", 1)
    assert host == "127.0.0.1"
    return socket.create_connection((host, int(port)), timeout=WAIT)


def _read_until_closed(sock: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection (AssertionError after ``timeout``)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        raise AssertionError(f"the server kept the connection open for {timeout:g} s; it sent {data[:200]!r}") from None
    except ConnectionResetError:
        pass
    return data


def test_health_answers_while_80_connections_idle_or_half_open(server):
    socks = []
    try:
        for i in range(80):
            s = _connect(server.url)
            if i % 2:
                s.sendall(b"POST /caption HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # half a request head
            socks.append(s)
        t = time.perf_counter()
        health = httpx.get(f"{server.url}/health", timeout=WAIT)
        latency_ms = 1000 * (time.perf_counter() - t)
        assert health.status_code == 200, health.text
        r = _post(server.url, [("a.png", small_png())])
        assert r.status_code == 200, r.text
        print(f"\n/health with 80 idle or half-open connections: {health.status_code} in {latency_ms:.0f} ms")
    finally:
        for s in socks:
            s.close()


def _one_response(sock: socket.socket) -> bytes:
    """One HTTP response read from a raw socket (its head, then Content-Length bytes of body)."""
    sock.settimeout(WAIT)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection after {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def test_a_slow_or_silent_client_is_cut_off_after_the_header_timeout(captioner):
    with serving(captioner, header_timeout_s=1.0) as server:
        silent = _connect(server.url)
        slow = _connect(server.url)
        t = time.monotonic()
        slow.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        answer = None
        while answer is None and time.monotonic() - t < WAIT:  # a slowloris: a header line every 0.2 s
            if select.select([slow], [], [], 0.2)[0]:
                answer = _read_until_closed(slow, WAIT)
            else:
                try:
                    slow.sendall(b"X-Slow: 1\r\n")
                except OSError:
                    answer = b""
        assert answer is not None, "a head sent a line at a time was never cut off"
        assert time.monotonic() - t >= 0.9  # not before the timeout
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert _read_until_closed(silent, WAIT) == b""
        # a kept-alive connection idle between requests for longer than the header timeout is still served
        # (uvicorn's keep-alive timeout, 5 s, governs idle time between requests)
        kept = _connect(server.url)
        for _ in range(2):
            kept.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert _one_response(kept).startswith(b"HTTP/1.1 200 ")
            time.sleep(1.3)
        kept.close()


def test_a_stalled_body_is_answered_408_and_closed(captioner):
    with serving(captioner, body_timeout_s=1.0) as server:
        s = _connect(server.url)
        head = (b"POST /caption HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                b"Content-Length: 100000\r\n\r\n")
        s.sendall(head + b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n')
        answer = _read_until_closed(s, WAIT)
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert b"request body not received within 1 s" in answer
        _wait_until(lambda: _load(server.url)["active_requests"] == 0, "the stalled request to be let go")


def test_a_head_growing_past_16_kb_is_400_and_closed(server):
    """A client cannot make the server buffer an endless head (h11 refuses an incomplete one over 16 KB)."""
    s = _connect(server.url)
    s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"x" * 20_000)  # no end of line yet
    assert _read_until_closed(s, WAIT).startswith(b"HTTP/1.1 400 ")
    assert httpx.get(f"{server.url}/health", timeout=WAIT).status_code == 200


def test_the_request_limit_counts_requests_not_sockets(captioner):
    gated = Gated(captioner)
    with ThreadPoolExecutor(2) as pool, serving(gated, max_requests=2, max_files=1) as server:
        busy = [pool.submit(_post, server.url, [(f"{i}.png", small_png())]) for i in range(2)]
        _wait_until(lambda: _load(server.url)["active_requests"] == 2, "two requests in progress")
        refused = _post(server.url, [("third.png", small_png())])
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1", refused.text
        assert httpx.get(f"{server.url}/health", timeout=WAIT).status_code == 200  # never counted
        gated.open.set()
        assert [f.result(WAIT).status_code for f in busy] == [200, 200]
        _wait_until(lambda: _load(server.url)["active_requests"] == 0, "the count to drop")  # after the answers


@pytest.fixture()
def busy_port():
    """A port already listened on: a command that wrongly got as far as serving fails to bind instead of hanging."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        yield s.getsockname()[1]


# -- 11. form values, settings, and the 503/504 paths ------------------------------------------------------


@pytest.mark.parametrize("fields, reason", [
    ([("beam_size", "²")], "beam_size must be an integer from 1 to 16, got '²'"),
    ([("beam_size", "１")], "beam_size must be an integer"),  # a full-width digit
    ([("max_length", "٣")], "max_length must be an integer"),  # an Arabic-Indic digit
    ([("beam_size", "9" * 5000)], "beam_size must be an integer from 1 to 16, got '99999999"),
    ([("beam_size", "2"), ("beam_size", "3")], "beam_size given 2 times"),
    ([("strategy", "greedy"), ("strategy", "beam")], "strategy given 2 times"),
    ([("max_length", "3\n")], "max_length must be an integer"),
])
def test_form_values_are_validated_strictly(server, fields, reason):
    r = _post(server.url, [("a.png", small_png())], fields)
    assert r.status_code == 400 and reason in r.json()["detail"], r.text


def test_form_values_that_are_files_or_in_another_charset_are_400(server):
    r = httpx.post(f"{server.url}/caption", files=[("image", ("a.png", small_png())), ("strategy", ("s.txt", b"beam"))],
                   timeout=WAIT)
    assert r.status_code == 400 and r.json()["detail"] == "the form field 'strategy' must be text, not a file"
    body = (b'--b\r\nContent-Disposition: form-data; name="beam_size"\r\n\r\n\xb2\r\n'  # '²' in Latin-1
            b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n' + small_png() +
            b"\r\n--b--\r\n")
    r = httpx.post(f"{server.url}/caption", content=body, timeout=WAIT,
                   headers={"content-type": "multipart/form-data; boundary=b; charset=latin-1"})
    assert r.status_code == 400 and "beam_size must be an integer" in r.json()["detail"], r.text


def test_a_full_queue_is_503_over_http(captioner):
    gated = Gated(captioner)
    with ThreadPoolExecutor(2) as pool, serving(gated, max_queue=1, max_files=1, max_batch=1) as server:
        running = pool.submit(_post, server.url, [("running.png", small_png())])
        assert gated.entered.wait(WAIT)  # taken by the worker: the queue is empty again
        queued = pool.submit(_post, server.url, [("queued.png", small_png())])
        _wait_until(lambda: _load(server.url)["queued_images"] == 1, "one image queued")
        full = _post(server.url, [("refused.png", small_png())])
        assert full.status_code == 503 and full.headers["retry-after"] == "1", full.text
        assert "1 images are already waiting (the limit is 1)" in full.json()["detail"]
        gated.open.set()
        assert running.result(WAIT).status_code == 200 and queued.result(WAIT).status_code == 200
        assert _load(server.url)["decoded_pixels_held"] == 0


def test_an_unanswered_request_is_504_and_the_server_recovers(captioner):
    gated = Gated(captioner)
    with serving(gated, timeout_s=1.0) as server:
        t = time.monotonic()
        r = _post(server.url, [("slow.png", small_png())])
        assert r.status_code == 504 and "no caption within 1 s" in r.json()["detail"], r.text
        assert time.monotonic() - t < WAIT
        gated.open.set()
        ok = _post(server.url, [("next.png", small_png())])
        assert ok.status_code == 200 and ok.json()["captions"][0]["image"] == "next.png"
        _wait_until(lambda: _load(server.url)["decoded_pixels_held"] == 0, "the pixels to come back")


@pytest.mark.parametrize("flags, message", [
    (["--max-files", "9", "--max-queue", "8"], "--max-files (9) must not be over --max-queue (8)"),
    (["--max-pixels", "200000000"], "--max-decode-pixels (100,000,000) must not be under --max-pixels (200,000,000)"),
    (["--header-timeout", "0"], "--header-timeout must be > 0"),
    (["--max-aspect-ratio", "0.5"], "--max-aspect-ratio must be ≥ 1"),
])
def test_cli_refuses_inconsistent_limits_before_loading(flags, message, capsys, tmp_path, busy_port):
    # a checkpoint that does not exist: the limits are refused before anything is loaded
    assert main(["serve", str(tmp_path / "no-such-ckpt"), "--port", str(busy_port), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


# -- 5. a bad checkpoint is refused at start with one line --------------------------------------------------


def _spoil(kind: str, ckpt: Path) -> None:
    if kind == "empty weights":
        (ckpt / "model.safetensors").write_bytes(b"")
    elif kind == "truncated weights":
        data = (ckpt / "model.safetensors").read_bytes()
        (ckpt / "model.safetensors").write_bytes(data[:300])
    elif kind == "huge header length":
        data = (ckpt / "model.safetensors").read_bytes()
        (ckpt / "model.safetensors").write_bytes(struct.pack("<Q", 10**15) + data[8:])
    elif kind in ("wrong type in config", "wrong shape in config"):
        config = json.loads((ckpt / "config.json").read_text())
        config["model"]["lm_dim" if kind == "wrong type in config" else "embed_dim"] = "abc" if "type" in kind else 64
        (ckpt / "config.json").write_text(json.dumps(config))
    elif kind == "config not JSON":
        (ckpt / "config.json").write_text("{not json")


@pytest.mark.parametrize("kind", ["empty weights", "truncated weights", "huge header length", "wrong type in config",
                                  "wrong shape in config", "config not JSON"])
def test_serve_refuses_a_bad_checkpoint_at_start_with_one_line(checkpoint, tmp_path, capsys, kind, busy_port):
    import shutil

    bad = tmp_path / "bad-ckpt"
    shutil.copytree(checkpoint, bad)
    _spoil(kind, bad)
    assert main(["serve", str(bad), "--port", str(busy_port)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("capdec serve: error: ") and err.count("\n") == 1, err
    assert str(bad) in err and "Traceback" not in err


def test_an_upload_over_the_limit_is_refused_before_it_is_copied(tmp_path):
    """An upload's size is read from the parser's spooled file: one over ``max_upload_mb`` is refused without
    being copied to the request's temporary folder (a full second copy of every oversized upload, before)."""
    from types import SimpleNamespace

    from capdec.serve.app import _save_and_plan

    settings = ServeSettings(max_upload_mb=0.5)
    big = SimpleNamespace(file=io.BytesIO(os.urandom(settings.max_upload_bytes + 1)))
    small = SimpleNamespace(file=io.BytesIO(b"not an image"))
    big.file.seek(1000)  # wherever the parser left it
    uploads = _save_and_plan([big, small], ["big.png", "small.png"], str(tmp_path), settings, min_side=None)
    assert uploads[0].too_big and uploads[0].error == (f"{settings.max_upload_bytes + 1:,} bytes is over the upload "
                                                       f"limit of 0.5 MB ({settings.max_upload_bytes:,} bytes)")
    assert not Path(uploads[0].path).exists()  # never copied
    assert not uploads[1].too_big and Path(uploads[1].path).read_bytes() == b"not an image"  # copied whole
