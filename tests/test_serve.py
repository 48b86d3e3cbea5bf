"""capdec serve end to end: the real server (uvicorn on 127.0.0.1) with a checkpoint trained here, real COCO
photos, every kind of bad upload, a bounded load test, the web page in headless Chromium, and the CLI."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import statistics
import struct
import subprocess
import sys
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

from capdec.caption import Captioner  # noqa: E402
from capdec.cli import main  # noqa: E402
from capdec.images import load_image  # noqa: E402
from capdec.serve import DynamicBatcher, QueueFull, ServerThread, ServeSettings, create_app  # noqa: E402
from test_images import BOMB_LIMIT, ZOO_EXPECTED, make_image_zoo  # noqa: E402

TINY_MODEL = ["--prefix-length", "4", "--mapper-depth", "1", "--mapper-heads", "2", "--max-length", "16",
              "--lm-dim", "32", "--lm-depth", "2", "--lm-heads", "2", "--vocab-size", "400"]
UPLOAD_MB = 0.5  # the server's per-file limit in these tests
BAD = sorted(n for n, (kind, _) in ZOO_EXPECTED.items() if kind == "skip")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, list[Path]]:
    """A checkpoint that tells images apart, quickly: the toy world's mini-CLIP (shipped weights), 16 rendered
    scenes, and a tiny decoder trained without noise to reproduce one caption of each (text only)."""
    work = tmp_path_factory.mktemp("serve_ckpt")
    assert main(["-q", "toyworld", "sample", "--out", str(work / "scenes"), "--n", "16"]) == 0
    rows = [json.loads(line) for line in (work / "scenes" / "references.jsonl").read_text().splitlines()]
    (work / "corpus.txt").write_text("".join(r["references"][0] + "\n" for r in rows), encoding="utf-8")
    assert main(["-q", "embed", str(work / "corpus.txt"), "--out", str(work / "store"), "--encoder", "toy"]) == 0
    assert main(["-q", "train", str(work / "store"), "--out", str(work / "ckpt"), "--epochs", "100", "--batch-size",
                 "16", "--lr", "3e-3", "--dropout", "0", "--noise-variance", "0", "--val-fraction", "0",
                 "--save-every", "1000", "--log-every", "1000", *TINY_MODEL]) == 0
    return work / "ckpt", [work / "scenes" / r["image"] for r in rows]


@pytest.fixture(scope="module")
def checkpoint(trained) -> Path:
    return trained[0]


@pytest.fixture(scope="module")
def photos(coco_dir, trained) -> list[Path]:
    """Real CC-licensed COCO photos (attribution: tests/data/coco/README.md), then the rendered toy scenes."""
    found = sorted((coco_dir / "images").glob("*.jpg"))
    assert len(found) == 17, found
    return found + trained[1]


@pytest.fixture(scope="module")
def captioner(checkpoint) -> Captioner:
    return Captioner.from_pretrained(checkpoint, device="cpu", max_pixels=BOMB_LIMIT, num_workers=0)


@pytest.fixture(scope="module")
def expected(captioner, photos) -> dict[str, str]:
    """Each image's caption from the library directly, decoded as the server decodes uploads: reduced to the
    encoder's input size (the server must give the same)."""
    images = [load_image(p, max_pixels=BOMB_LIMIT, min_side=captioner.encoder.image_size) for p in photos]
    assert images[0].size != load_image(photos[0]).size  # the COCO photos are decoded reduced
    return dict(zip((p.name for p in photos), captioner.caption(images, batch_size=len(photos))))


@pytest.fixture(scope="module")
def distinct(photos, expected) -> list[Path]:
    """Images with pairwise different captions, so that an answer given to the wrong request shows."""
    seen: dict[str, Path] = {}
    for p in photos:
        seen.setdefault(expected[p.name], p)
    assert len(seen) >= 16, f"the test model gives only {len(seen)} different captions"
    return list(seen.values())


@pytest.fixture(scope="module")
def server(captioner):
    settings = ServeSettings(max_batch=16, max_wait_ms=20, max_files=4, max_upload_mb=UPLOAD_MB, max_pixels=BOMB_LIMIT,
                             timeout_s=60)
    with ServerThread(create_app(captioner, settings, checkpoint="tiny-test-ckpt")) as running:
        yield running


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("zoo")
    make_image_zoo(d)
    return d


def _bomb_png(width: int = 50_000, height: int = 50_000) -> bytes:
    """A valid-looking PNG header claiming 2.5 gigapixels, with a few hundred bytes of data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    idat = zlib.compress(bytes(width + 1) * 4)  # four all-black rows; a decoder would inflate 2.5 GB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _post(url: str, files: list[tuple[str, bytes]], **data) -> httpx.Response:
    return httpx.post(f"{url}/caption", files=[("image", f) for f in files], data=data, timeout=60)


# -- the API ----------------------------------------------------------------------------------------------


def test_health_and_info(server, captioner):
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    info = httpx.get(f"{server.url}/info").json()
    from capdec import __version__

    assert info["capdec_version"] == __version__
    assert info["checkpoint"] == "tiny-test-ckpt"
    assert info["encoder"] == json.loads(json.dumps(captioner.encoder.spec))
    assert info["decoding"]["strategy"] == "beam" and info["decoding"]["beam_size"] == 5
    assert info["decoding"]["max_length"] == 16  # the checkpoint's
    assert info["limits"]["max_files"] == 4 and info["limits"]["max_upload_mb"] == UPLOAD_MB


def test_captions_real_photos_as_the_library_does(server, photos, expected):
    chosen = photos[:3] + photos[-1:]  # three COCO photos, a toy scene
    r = _post(server.url, [(p.name, p.read_bytes()) for p in chosen])
    assert r.status_code == 200, r.text
    got = r.json()["captions"]
    assert [c["image"] for c in got] == [p.name for p in chosen]  # upload order
    assert [c["caption"] for c in got] == [expected[p.name] for p in chosen]
    assert all(c["caption"].strip() for c in got)


def test_decoding_options_reach_the_decoder(server, captioner, photos):
    photo = photos[0]
    r = _post(server.url, [(photo.name, photo.read_bytes())], strategy="greedy", max_length="3")
    assert r.status_code == 200, r.text
    assert r.json()["captions"][0]["caption"] == captioner.caption([photo], strategy="greedy", max_length=3)[0]
    beam2 = _post(server.url, [(photo.name, photo.read_bytes())], beam_size="2").json()["captions"][0]["caption"]
    assert beam2 == captioner.caption([photo], beam_size=2)[0]


@pytest.mark.parametrize("fields, reason", [
    ({"strategy": "best"}, "strategy must be one of"),
    ({"beam_size": "0"}, "beam_size must be an integer from 1 to 16"),
    ({"beam_size": "many"}, "beam_size must be"),
    ({"max_length": "17"}, "max_length must be an integer from 1 to 16"),
    ({"temperature": "2"}, "unknown form field(s) temperature"),
])
def test_bad_decoding_options_are_400(server, photos, fields, reason):
    r = _post(server.url, [(photos[0].name, photos[0].read_bytes())], **fields)
    assert r.status_code == 400 and reason in r.json()["detail"], r.text


@pytest.mark.parametrize("name", BAD)
def test_each_bad_file_is_refused_naming_it(server, zoo, name):
    r = _post(server.url, [(name, (zoo / name).read_bytes())])
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["errors"] == [{"image": name, "error": body["errors"][0]["error"]}]
    assert ZOO_EXPECTED[name][1] in body["errors"][0]["error"] and name in body["detail"]


def test_decompression_bomb_and_oversized_uploads(server, photos):
    bomb = _bomb_png()
    assert len(bomb) < 1000
    r = _post(server.url, [("bomb.png", bomb)])
    assert r.status_code == 422 and r.json()["errors"][0]["image"] == "bomb.png"
    assert "decompression bomb" in r.json()["errors"][0]["error"] or "over the limit" in r.json()["errors"][0]["error"]

    big = os.urandom(int(UPLOAD_MB * 1024 * 1024) + 1000)
    r = _post(server.url, [(photos[0].name, photos[0].read_bytes()), ("big.jpg", big)])
    assert r.status_code == 200, r.text  # the photo is captioned, the big file named
    assert [c["image"] for c in r.json()["captions"]] == [photos[0].name]
    assert r.json()["errors"] == [{"image": "big.jpg", "error": f"{len(big):,} bytes is over the upload limit of "
                                                                "0.5 MB (524,288 bytes)"}]
    assert _post(server.url, [("big.jpg", big)]).status_code == 413  # nothing usable

    # a body over every file's limit together is refused from its Content-Length, before it is read
    huge = httpx.post(f"{server.url}/caption", content=b"x" * (4 * 512 * 1024 + 1024 * 1024 + 1),
                      headers={"content-type": "multipart/form-data; boundary=b"}, timeout=60)
    assert huge.status_code == 413 and "request body over" in huge.json()["detail"]

    def chunks():  # no Content-Length: the limit is enforced while the body streams in
        yield b'--b\r\nContent-Disposition: form-data; name="image"; filename="big.jpg"\r\n\r\n'
        for _ in range(4 * 8):
            yield b"x" * (128 * 1024)
        yield b"\r\n--b--\r\n"

    streamed = httpx.post(f"{server.url}/caption", content=chunks(), timeout=60,
                          headers={"content-type": "multipart/form-data; boundary=b"})
    assert streamed.status_code == 413 and "request body over 3.0 MB" in streamed.json()["detail"]


def test_a_mixed_request_captions_the_good_files_and_names_the_bad(server, zoo, photos, expected):
    files = [("truncated.jpg", (zoo / "truncated.jpg").read_bytes()), (photos[0].name, photos[0].read_bytes()),
             ("garbage.jpg", (zoo / "garbage.jpg").read_bytes())]
    r = _post(server.url, files)
    assert r.status_code == 200, r.text
    assert r.json()["captions"] == [{"image": photos[0].name, "caption": expected[photos[0].name]}]
    assert [e["image"] for e in r.json()["errors"]] == ["truncated.jpg", "garbage.jpg"]


def test_malformed_requests_are_400(server, photos):
    url = f"{server.url}/caption"
    assert "no image" in httpx.post(url, data={"strategy": "beam"}).json()["detail"]
    assert httpx.post(url, data={"image": "not a file"}).json()["detail"] == \
        "the form field 'image' must hold files, not text"
    five = [(f"{i}.jpg", photos[0].read_bytes()) for i in range(5)]
    r = _post(server.url, five)
    assert r.status_code == 400 and "Maximum number of files is 4" in r.json()["detail"]
    r = httpx.post(url, content=b"{}", headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert httpx.get(url).status_code == 405


def test_server_keeps_serving_after_bad_input(server, zoo, photos, expected):
    for name in BAD:
        _post(server.url, [(name, (zoo / name).read_bytes())])
    r = _post(server.url, [(photos[1].name, photos[1].read_bytes())])
    assert r.status_code == 200 and r.json()["captions"][0]["caption"] == expected[photos[1].name]
    assert httpx.get(f"{server.url}/health").status_code == 200


def _load(url: str, photos: list[Path], clients: int, requests: int, expected: dict[str, str]) -> dict:
    """``clients`` threads each sending ``requests`` one-photo requests; every answer checked."""
    payloads = [(p.name, p.read_bytes()) for p in photos]
    latencies: list[float] = []
    wrong: list[str] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        with httpx.Client(timeout=60) as http:
            for i in range(requests):
                name, data = payloads[(k * requests + i) % len(payloads)]
                t = time.perf_counter()
                r = http.post(f"{url}/caption", files=[("image", (name, data))])
                dt = time.perf_counter() - t
                ok = r.status_code == 200 and r.json() == {"captions": [{"image": name, "caption": expected[name]}],
                                                           "errors": []}
                with lock:
                    latencies.append(dt)
                    if not ok:
                        wrong.append(f"{name}: {r.status_code} {r.text[:200]}")

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - t0
    latencies.sort()
    return {"clients": clients, "requests": len(latencies), "wrong": wrong, "wall_s": wall,
            "images_per_s": len(latencies) / wall, "p50_ms": 1000 * statistics.median(latencies),
            "p95_ms": 1000 * latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))]}


def test_load_every_request_answered_correctly(server, distinct, expected):
    batching = server.server.config.app.state.batcher.stats  # the app the server runs
    before = batching.batches, batching.images
    loaded = _load(server.url, distinct, clients=8, requests=25, expected=expected)
    assert loaded["requests"] == 200 and loaded["wrong"] == []
    batches, images = batching.batches - before[0], batching.images - before[1]
    assert images == 200
    assert batches < 200  # concurrent requests were captioned together
    serial = _load(server.url, distinct, clients=1, requests=25, expected=expected)
    assert serial["wrong"] == []
    report = {"concurrent": {k: v for k, v in loaded.items() if k != "wrong"}, "mean_batch": images / batches,
              "one_at_a_time": {k: v for k, v in serial.items() if k != "wrong"}}
    print("\nload test:", json.dumps(report, indent=1))


# -- the batcher on its own -------------------------------------------------------------------------------


class _Recorder:
    """A stand-in captioner: records each call's images and options, captions an image by its number."""

    def __init__(self, delay: float = 0.0):
        self.calls: list[tuple[list, dict]] = []
        self.delay = delay

    def caption(self, images, *, batch_size, show_progress, **decode):
        time.sleep(self.delay)
        self.calls.append((list(images), decode))
        return [f"image {i} {decode}" for i in images]


def test_batcher_groups_concurrent_jobs_and_keeps_order():
    rec = _Recorder(delay=0.05)
    b = DynamicBatcher(rec, max_batch=5, max_wait_ms=200, max_queue=20)
    b.start()
    try:
        futures = [b.submit([1, 2]), b.submit([3]), b.submit([4], {"strategy": "greedy"}), b.submit([5, 6, 7])]
        results = [f.result(timeout=10) for f in futures]
    finally:
        b.stop()
    assert results == [["image 1 {}", "image 2 {}"], ["image 3 {}"], ["image 4 {'strategy': 'greedy'}"],
                       ["image 5 {}", "image 6 {}", "image 7 {}"]]
    # the first batch takes jobs up to 5 images (1,2 | 3 | 4), split by options; [5,6,7] would overflow it
    assert rec.calls == [([1, 2, 3], {}), ([4], {"strategy": "greedy"}), ([5, 6, 7], {})]
    assert b.stats.batches == 3 and b.stats.images == 7 and b.stats.largest == 3


def test_batcher_refuses_beyond_its_queue_and_survives_a_failing_batch():
    class Failing(_Recorder):
        def caption(self, images, **kw):
            if "boom" in images:
                time.sleep(self.delay)
                raise RuntimeError("model exploded")
            return super().caption(images, **kw)

    b = DynamicBatcher(Failing(delay=0.2), max_batch=1, max_wait_ms=0, max_queue=2)
    b.start()
    try:
        first = b.submit(["boom"])
        time.sleep(0.05)  # taken by the worker: the queue is empty again
        queued = [b.submit(["a"]), b.submit(["b"])]
        with pytest.raises(QueueFull):
            b.submit(["c"])
        with pytest.raises(RuntimeError, match="model exploded"):
            first.result(timeout=10)
        assert [f.result(timeout=10) for f in queued] == [["image a {}"], ["image b {}"]]
        assert b.submit(["d"]).result(timeout=10) == ["image d {}"]
    finally:
        b.stop()


# -- the page in a real browser ---------------------------------------------------------------------------


class _CDP:
    """The few Chrome DevTools Protocol calls the page test needs, over the page target's websocket."""

    def __init__(self, ws_url: str):
        from websockets.sync.client import connect

        self.ws = connect(ws_url, max_size=None, open_timeout=20)
        self.next_id = 0

    def __call__(self, method: str, timeout: float = 30, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]
        raise TimeoutError(method)

    def js(self, expression: str):
        out = self("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in out:
            raise RuntimeError(out["exceptionDetails"])
        return out["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.1)
        raise TimeoutError(f"the page never satisfied: {expression}")


@pytest.fixture()
def browser(server, tmp_path):
    """Headless Chromium on the server's page, driven over the DevTools protocol."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium); the page test needs a browser")
    pytest.importorskip("websockets")
    profile = tmp_path / "profile"
    proc = subprocess.Popen([exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                             "--disable-dev-shm-usage", "--remote-debugging-port=0", f"--user-data-dir={profile}",
                             "--window-size=1100,800", f"{server.url}/"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cdp = None
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"Chromium did not start (exit status {proc.poll()})")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        pages = []
        while not pages:
            targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
            pages = [t for t in targets if t["type"] == "page" and t["url"].startswith(server.url)]
            if time.monotonic() > deadline:
                pytest.fail(f"Chromium opened no page of {server.url}: {targets}")
            time.sleep(0.1)
        cdp = _CDP(pages[0]["webSocketDebuggerUrl"])
        cdp("Runtime.enable")
        cdp.wait_for("document.readyState === 'complete' && document.getElementById('model').textContent"
                     ".startsWith('Checkpoint tiny-test-ckpt')")
        yield cdp
    finally:
        if cdp is not None:
            cdp.ws.close()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _settled(n: int) -> str:
    """JS: the result cards once there are ``n`` and none is pending, else false."""
    return f"(() => {{ const r = {_RESULTS_JS}; return r.length === {n} && r.every(x => x.state !== 'pending') && r; }})()"


_RESULTS_JS = """[...document.querySelectorAll('#results .result')].map(f => ({
    name: f.dataset.name, state: f.dataset.state,
    caption: (f.querySelector('.caption') || {}).textContent || null,
    error: (f.querySelector('.error') || {}).textContent || null,
    thumb: (f.querySelector('img') || {}).naturalWidth || 0}))"""


def test_page_uploads_through_the_file_input_and_shows_captions(browser, photos, zoo, expected, tmp_path):
    photo = photos[2]
    node = browser("DOM.querySelector", nodeId=browser("DOM.getDocument")["root"]["nodeId"], selector="#file")["nodeId"]
    browser("DOM.setFileInputFiles", nodeId=node, files=[str(photo), str(zoo / "truncated.jpg")])
    results = {r["name"]: r for r in browser.wait_for(_settled(2), timeout=90)}
    assert results[photo.name]["state"] == "done"
    assert results[photo.name]["caption"] == expected[photo.name]
    assert results[photo.name]["thumb"] > 0  # the thumbnail decoded in the browser
    assert results["truncated.jpg"]["state"] == "error" and "truncated" in results["truncated.jpg"]["error"]

    # the drop handler: a file dropped on the zone (made in the page from the photo's bytes)
    b64 = base64.b64encode(photos[3].read_bytes()).decode()
    browser.js(f"""(() => {{
        const bytes = Uint8Array.from(atob('{b64}'), c => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], '{photos[3].name}', {{type: 'image/jpeg'}}));
        document.getElementById('drop').dispatchEvent(new DragEvent('drop', {{dataTransfer: dt, bubbles: true}}));
    }})()""")
    dropped = {r["name"]: r for r in browser.wait_for(_settled(3), timeout=90)}[photos[3].name]
    assert dropped["state"] == "done" and dropped["caption"] == expected[photos[3].name]

    shot = base64.b64decode(browser("Page.captureScreenshot", format="png")["data"])
    from PIL import Image

    image = Image.open(io.BytesIO(shot))
    assert image.format == "PNG" and image.width >= 800
    (tmp_path / "page.png").write_bytes(shot)


# -- the command ------------------------------------------------------------------------------------------


@pytest.mark.slow  # a fresh Python process imports torch and loads the model: ~10-25 s on a busy machine
def test_cli_serves_until_interrupted(checkpoint, photos, expected):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "capdec", "serve", str(checkpoint), "--port", "0",
                             "--max-pixels", str(BOMB_LIMIT), "--max-wait-ms", "5"],
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        url, lines = None, []
        deadline = time.monotonic() + 120
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            if " on http://127.0.0.1:" in line:
                url = line.split(" on ", 1)[1].split("/ ", 1)[0]
        assert url, "".join(lines)
        # the socket is bound before the message; wait for the app to accept requests (bounded)
        for _ in range(200):
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        r = _post(url, [(photos[0].name, photos[0].read_bytes())])
        assert r.status_code == 200 and r.json()["captions"][0]["caption"] == expected[photos[0].name]
        assert "capdec" in httpx.get(url).text
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait(10)
    assert rc == 0


def test_cli_refuses_bad_settings(checkpoint, capsys):
    assert main(["serve", str(checkpoint), "--max-batch", "0"]) == 2
    assert "--max-batch must be ≥ 1" in capsys.readouterr().err
    assert main(["serve", str(checkpoint), "--port", "70000"]) == 2
    assert main(["serve", str(checkpoint), "--max-length", "99", "--port", "0"]) == 2
    assert "over the checkpoint's 16" in capsys.readouterr().err
