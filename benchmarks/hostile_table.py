"""Issue 21's careless and hostile inputs run through two capdec source trees, side by side: the table of
what each does (exit status, first line of stderr, time, peak RSS, and what became of the user's data).

    python benchmarks/hostile_table.py --before /tmp/before_harden/src --after src --json out.json --markdown out.md

Each case runs ``python -m capdec -q ARGV`` with ``PYTHONPATH`` set to one tree, in its own session and a
fresh temporary directory, under a timeout (the session is killed at the end) and where a case could take
the machine's memory an address-space limit (RLIMIT_AS). Device nodes are private copies made in the
temporary directory (``mknod``, as root; the case is skipped otherwise), and ``/dev/stdout`` is exercised as
``/dev/fd/1`` (the same kind of path: a link into /proc/self/fd) so that a tree which renames files over its
output can never replace the machine's ``/dev/stdout``. Hub cases run with ``HF_HUB_OFFLINE=1`` and
``HF_HOME`` in the temporary directory. A save "killed mid-way" is a SIGKILL from inside
``safetensors.torch.save_model`` (a ``sitecustomize`` hook this script writes), so both trees are killed at
the same point. Each tree builds its own fixtures (a toy-encoder store and a tiny checkpoint) with its own
``embed`` and ``train``; the ClipCap ``.pt`` files for ``import`` are built once with ``--after``'s test helpers
(``--after``/../tests).

Prints the JSON (a list of rows) to stdout; ``--markdown`` also writes the table. Not a timed test.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import select
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from raw_safetensors import nan_first_weight  # noqa: E402

TINY = ["--batch-size", "8", "--lm-dim", "32", "--lm-depth", "1", "--lm-heads", "2", "--mapper-depth", "1",
        "--prefix-length", "2", "--vocab-size", "200"]
DEEP = "[" * 100_000 + "]" * 100_000
GIB = 1 << 30

KILL_HOOK = '''
import os, signal
if os.environ.get("HOSTILE_KILL_IN_SAVE"):
    import safetensors.torch as _st
    def _killed(model, filename, *a, **k):
        with open(filename, "wb") as f:
            f.write(b"\\0" * 4096)
        os.kill(os.getpid(), signal.SIGKILL)
    _st.save_model = _killed
'''


def words(i: int) -> str:
    animals = ["dog", "cat", "horse", "bird", "cow", "sheep"]
    colours = ["red", "blue", "green", "black", "white"]
    places = ["on a street", "in a field", "near a river", "on a beach"]
    return f"a {colours[i % 5]} {animals[i % 6]} {places[i % 4]}"


class Side:
    """One source tree: runs its capdec, and its fixtures (store, checkpoint) built with its own commands."""

    def __init__(self, name: str, src: Path, work: Path, hook_dir: Path):
        self.name, self.src, self.work, self.hook_dir = name, src, work, hook_dir

    def env(self, kill_in_save: bool = False) -> dict[str, str]:
        env = {**os.environ, "PYTHONPATH": f"{self.hook_dir}{os.pathsep}{self.src}", "OMP_NUM_THREADS": "1",
               "CAPDEC_QUIET": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(self.work / "hf_home"),
               "TMPDIR": str(self.work / "tmp")}
        env.pop("HOSTILE_KILL_IN_SAVE", None)
        if kill_in_save:
            env["HOSTILE_KILL_IN_SAVE"] = "1"
        return env

    def run(self, argv: list[str], *, cwd: Path, timeout: float = 120, memory: int | None = None,
            fsize: int | None = None, stdout_file: Path | None = None, kill_in_save: bool = False) -> dict:
        def limits() -> None:
            if memory is not None:
                resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
            if fsize is not None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

        # stderr through a pipe: a file would fall under the case's own RLIMIT_FSIZE
        out_f = open(stdout_file, "a") if stdout_file else open(os.devnull, "w")
        chunks: list[bytes] = []
        start = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "capdec", "-q", *argv], stdout=out_f,
                                stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, cwd=cwd,
                                env=self.env(kill_in_save), start_new_session=True, preexec_fn=limits)
        reader = threading.Thread(target=lambda: chunks.append(proc.stderr.read()), daemon=True)
        reader.start()
        timed_out = threading.Event()

        def kill() -> None:
            timed_out.set()
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        timer = threading.Timer(timeout, kill)
        timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        elapsed = time.monotonic() - start
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # nothing it started outlives it
        except ProcessLookupError:
            pass
        out_f.close()
        reader.join(10)
        proc.stderr.close()
        err = b"".join(chunks).decode(errors="replace")
        lines = [line for line in err.splitlines() if line.strip()]
        said = [line for line in lines if not _is_log_record(line)]
        shown = said or lines
        first = shown[0] if shown else ""
        if first.startswith("Traceback"):
            first = f"Traceback ... {lines[-1]}"
        if timed_out.is_set():
            first = f"(killed after {timeout:.0f} s timeout) {first}".strip()
        return {"rc": proc.returncode, "stderr": first[:220], "stderr_lines": len(said), "seconds": round(elapsed, 1),
                "peak_rss_mb": round(usage.ru_maxrss / 1024), "timed_out": timed_out.is_set()}

    def fixtures(self) -> dict[str, Path]:
        """corpus.txt (120 captions), a toy store, a checkpoint trained 2 steps, a picture."""
        from PIL import Image

        root = self.work / "fixtures"
        root.mkdir(parents=True)
        (self.work / "tmp").mkdir(exist_ok=True)
        corpus = root / "corpus.txt"
        corpus.write_text("".join(words(i) + "\n" for i in range(120)))
        for argv in (["embed", str(corpus), "--out", str(root / "store"), "--encoder", "toy"],
                     ["train", str(root / "store"), "--out", str(root / "ckpt"), "--max-steps", "2", *TINY]):
            done = self.run(argv, cwd=root, timeout=600)
            if done["rc"] != 0:
                raise SystemExit(f"{self.name}: fixture {argv[0]} failed: {done}")
        Image.new("RGB", (32, 32), (200, 30, 30)).save(root / "img.png")
        return {"corpus": corpus, "store": root / "store", "ckpt": root / "ckpt", "img": root / "img.png"}


def _is_log_record(line: str) -> bool:
    """A logging record or a progress bar (not what the command says about the case)."""
    if "%|" in line or "it/s]" in line:
        return True
    return len(line) > 9 and line[2] == ":" and line[5] == ":" and " capdec" in line[:40] and (
        "WARNING" in line[:20] or "INFO" in line[:20])


# -- helpers for the cases --------------------------------------------------------------------------------------


def user_dir(path: Path) -> Path:
    (path / "sub").mkdir(parents=True)
    (path / "important.txt").write_text("my notes")
    (path / "sub" / "data.csv").write_text("a,b\n")
    return path


def user_dir_state(path: Path) -> str:
    ok = (path / "important.txt").is_file() and (path / "sub" / "data.csv").is_file()
    return "user's files kept" if ok else "USER'S FILES DELETED"


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def copy(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst)) if src.is_dir() else Path(shutil.copy(src, dst))


def kind_of(path: Path) -> str:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return "gone"
    for test, name in ((stat.S_ISLNK, "symlink"), (stat.S_ISCHR, "char device"), (stat.S_ISFIFO, "FIFO"),
                       (stat.S_ISREG, "regular file"), (stat.S_ISDIR, "directory")):
        if test(mode):
            return name
    return "other"


def fifo_reader(path: Path):
    """Open the FIFO for reading without blocking, collect what is written until ``stop`` is set."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    got, stop = bytearray(), threading.Event()

    def loop() -> None:
        while True:
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                chunk = os.read(fd, 65536)
                got.extend(chunk)
                if chunk:
                    continue
            if stop.is_set():
                break
            time.sleep(0.05)
        os.close(fd)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return got, stop, thread


# -- the cases: each (id, item, what, fn(side, fx, case_dir) -> row fields) ---------------------------------------------


def case_train_overwrite(side, fx, d):
    out = user_dir(d / "mine")
    r = side.run(["train", str(fx["store"]), "--out", str(out), "--overwrite", "--max-steps", "1", *TINY], cwd=d)
    return r | {"effect": user_dir_state(out)}


def case_import_overwrite(side, fx, d):
    out = user_dir(d / "mine")
    r = side.run(["import", str(fx["pt_clean"]), "--out", str(out), "--overwrite", "--lm", str(fx["gpt2"]),
                  "--encoder", fx["clip"]], cwd=d)
    return r | {"effect": user_dir_state(out)}


def case_embed_overwrite(side, fx, d):
    out = user_dir(d / "mine")
    r = side.run(["embed", str(fx["corpus"]), "--out", str(out), "--encoder", "toy", "--overwrite"], cwd=d)
    return r | {"effect": user_dir_state(out)}


def case_embed_overwrite_store(side, fx, d):
    out = user_dir(copy(fx["store"], d / "store"))  # a store capdec wrote (training gave it a token cache), plus notes
    r = side.run(["embed", str(fx["corpus"]), "--out", str(out), "--encoder", "toy", "--overwrite"], cwd=d)
    return r | {"effect": user_dir_state(out)}


def _eval_files(d: Path) -> tuple[Path, Path]:
    preds, refs = d / "p.json", d / "r.json"
    preds.write_text(json.dumps([{"image_id": i, "caption": "a red dog on a street"} for i in range(4)]))
    refs.write_text(json.dumps({"images": [{"id": i, "file_name": f"{i}.jpg"} for i in range(4)],
                                "annotations": [{"image_id": i, "id": i, "caption": "a red dog"} for i in range(4)]}))
    return preds, refs


def case_full_device(side, fx, d):
    if os.geteuid() != 0:
        return {"rc": None, "stderr": "skipped: mknod needs root", "effect": ""}
    dev = d / "full"
    os.mknod(dev, stat.S_IFCHR | 0o666, os.makedev(1, 7))  # /dev/full's numbers, private to this directory
    preds, refs = _eval_files(d)
    r = side.run(["evaluate", str(preds), "--references", str(refs), "--metrics", "bleu", "--tokenizer", "simple",
                  "--out", str(dev)], cwd=d)
    left = [p.name for p in d.iterdir() if p.name.startswith(".full")]
    return r | {"effect": f"output is now a {kind_of(dev)}" + (f"; temp files left {left}" if left else "")}


def case_symlink(side, fx, d):
    (d / "real").mkdir()
    target = d / "real" / "stats.json"
    target.write_text("old")
    link = d / "stats.json"
    link.symlink_to(target)
    r = side.run(["corpus", "stats", str(fx["corpus"]), "--out", str(link)], cwd=d)
    updated = target.read_text() != "old"
    return r | {"effect": f"link is now a {kind_of(link)}; the file it pointed to "
                          f"{'was written' if updated else 'still holds the old text'}"}


def case_fifo(side, fx, d):
    fifo = d / "pipe"
    os.mkfifo(fifo)
    got, stop, thread = fifo_reader(fifo)
    r = side.run(["caption", str(fx["ckpt"]), str(fx["img"]), "--format", "jsonl", "--out", str(fifo)], cwd=d,
                 timeout=120)
    stop.set()
    thread.join(5)
    return r | {"effect": f"output is now a {kind_of(fifo)}; the reader got {len(got)} bytes"}


def case_fifo_stats(side, fx, d):
    fifo = d / "pipe"
    os.mkfifo(fifo)
    got, stop, thread = fifo_reader(fifo)
    r = side.run(["corpus", "stats", str(fx["corpus"]), "--out", str(fifo)], cwd=d, timeout=120)
    stop.set()
    thread.join(5)
    return r | {"effect": f"output is now a {kind_of(fifo)}; the reader got {len(got)} bytes"}


def case_dev_fd(side, fx, d):
    log = d / "log.txt"
    log.write_text("earlier line\n")
    r = side.run(["corpus", "stats", str(fx["corpus"]), "--out", "/dev/fd/1"], cwd=d, stdout_file=log)
    text = log.read_text()
    if not text.startswith("earlier line\n"):
        effect = f"EARLIER CONTENT LOST ({len(text)} bytes now)"
    else:
        effect = "earlier content kept, " + ("output appended" if len(text) > 13 else "nothing written")
    return r | {"effect": effect}


def case_failed_write(side, fx, d):
    out = d / "out.jsonl"
    out.write_text("the old results\n")
    images = []
    for i in range(4):
        images.append(d / f"im{i}.png")
        shutil.copy(fx["img"], images[-1])
    r = side.run(["caption", str(fx["ckpt"]), *map(str, images), "--out", str(out)], cwd=d, fsize=100)
    kept = out.read_bytes() == b"the old results\n"
    extra = sorted(p.name for p in d.iterdir() if "out.jsonl" in p.name and p.name != "out.jsonl")
    return r | {"effect": ("old output kept" if kept else f"OLD OUTPUT LOST (now {out.stat().st_size} bytes)")
                + (f"; left {extra}" if extra else "")}


def case_killed_save(side, fx, d):
    argv = ["train", str(fx["store"]), "--out", str(d / "run"), "--max-steps", "1", *TINY]
    killed = side.run(argv, cwd=d, kill_in_save=True)
    left = sorted(p.name for p in d.iterdir() if p.name.startswith(".run"))
    r = side.run(argv, cwd=d)
    after = sorted(p.name for p in d.iterdir() if p.name.startswith(".run"))
    return r | {"effect": f"killed save (rc {killed['rc']}) left {len(left)} temp dir(s); after the rerun "
                          f"{len(after)} remain"}


def _deep_cases():
    def embed(side, fx, d):
        (d / "deep.json").write_text(DEEP)
        return side.run(["embed", str(d / "deep.json"), "--out", str(d / "s"), "--encoder", "toy"], cwd=d)

    def evaluate(side, fx, d):
        (d / "deep.json").write_text(DEEP)
        return side.run(["evaluate", str(d / "deep.json"), "--references", str(d / "deep.json")], cwd=d)

    def calibrate(side, fx, d):
        (d / "deep.json").write_text(DEEP)
        return side.run(["calibrate", str(d / "deep.json"), "--encoder", "toy", "--out", str(d / "n.json")], cwd=d)

    def corpus(side, fx, d):
        (d / "deep.json").write_text(DEEP)
        return side.run(["corpus", "stats", str(d / "deep.json")], cwd=d)

    def dataset(side, fx, d):
        (d / "deep.json").write_text(DEEP)
        (d / "images").mkdir()
        return side.run(["caption", str(fx["ckpt"]), "--dataset", str(d / "deep.json"), "--images-root",
                         str(d / "images")], cwd=d)

    def store_meta(side, fx, d):
        store = copy(fx["store"], d / "store")
        (store / "meta.json").write_text(DEEP)
        return side.run(["train", str(store), "--out", str(d / "c"), "--max-steps", "1", *TINY], cwd=d)

    return [("deep JSON (100k levels): embed", embed), ("deep JSON: evaluate", evaluate),
            ("deep JSON: calibrate", calibrate), ("deep JSON: corpus stats", corpus),
            ("deep JSON: caption --dataset", dataset), ("deep JSON: store meta.json (train)", store_meta)]


def case_big_int(side, fx, d):
    (d / "c.jsonl").write_text(f'{{"caption": "a dog", "id": {"9" * 5000}}}\n')
    return side.run(["embed", str(d / "c.jsonl"), "--out", str(d / "s"), "--encoder", "toy"], cwd=d)


def case_big_int_eval(side, fx, d):
    (d / "p.json").write_text(f'[{{"image_id": {"9" * 5000}, "caption": "a dog"}}]')
    return side.run(["evaluate", str(d / "p.json"), "--references", str(d / "p.json")], cwd=d)


def _ids_case(value: str):
    def run(side, fx, d):
        (d / "ids.json").write_text(f'{{"{fx["img"].name}": {value}}}')
        r = side.run(["caption", str(fx["ckpt"]), str(fx["img"]), "--image-ids", str(d / "ids.json"), "--format",
                      "coco", "--out", str(d / "c.json")], cwd=d)
        return r | {"effect": "output written" if (d / "c.json").exists() else "no output"}
    return run


def _config_case(text: str):
    def run(side, fx, d):
        (d / "config.json").write_text(text)
        return side.run(["train", str(fx["store"]), "--out", str(d / "c"), "--config", str(d / "config.json"),
                         "--max-steps", "1", *TINY], cwd=d)
    return run


def _flag_case(*flags: str, memory: int | None = None):
    def run(side, fx, d):
        return side.run(["train", str(fx["store"]), "--out", str(d / "c"), "--max-steps", "1", *TINY, *flags],
                        cwd=d, memory=memory)
    return run


def case_nosuchuser_encoder(side, fx, d):
    return side.run(["embed", str(fx["corpus"]), "--out", str(d / "s"), "--encoder", "hf:~nosuchuser/clip"], cwd=d)


def case_nosuchuser_input(side, fx, d):
    return side.run(["embed", "~nosuchuser/x", "--out", str(d / "s"), "--encoder", "toy"], cwd=d)


def case_non_utf8_ids(side, fx, d):
    (d / "ids.tsv").write_bytes(b"img.png\t1\nother.png\t2\nb\xe9d.png\t3\n")
    return side.run(["caption", str(fx["ckpt"]), str(fx["img"]), "--image-ids", str(d / "ids.tsv")], cwd=d)


def _ckpt_case(change, *, memory: int | None = None, timeout: float = 120):
    def run(side, fx, d):
        ckpt = copy(fx["ckpt"], d / "ck")
        change(ckpt)
        return side.run(["caption", str(ckpt), str(fx["img"])], cwd=d, memory=memory, timeout=timeout)
    return run


def _model(**values):
    return lambda ck: edit_json(ck / "config.json", lambda c: c["model"].update(values))


def _weights(damage):
    return lambda ck: damage(ck / "model.safetensors")


def case_store_meta_type(side, fx, d):
    store = copy(fx["store"], d / "store")
    edit_json(store / "meta.json", lambda m: m.update(dim="128"))
    return side.run(["train", str(store), "--out", str(d / "c"), "--max-steps", "1", *TINY], cwd=d)


def _state_case(values):
    def run(side, fx, d):
        ckpt = copy(fx["ckpt"], d / "ck")
        edit_json(ckpt / "training" / "state.json", lambda s: s.update(values))
        return side.run(["train", str(fx["store"]), "--out", str(ckpt), "--resume", "--max-steps", "3"], cwd=d)
    return run


def case_optimizer_pickle(side, fx, d):
    ckpt = copy(fx["ckpt"], d / "ck")
    shutil.copy(fx["pt_optimizer_code"], ckpt / "training" / "optimizer.pt")
    r = side.run(["train", str(fx["store"]), "--out", str(ckpt), "--resume", "--max-steps", "3"], cwd=d)
    return r | {"effect": "THE PICKLE'S CODE RAN" if (d / "ran").exists() else "no code ran"}


def _import_case(key: str):
    def run(side, fx, d):
        r = side.run(["import", str(fx[key]), "--out", str(d / "imp"), "--lm", str(fx["gpt2"]), "--encoder",
                      fx["clip"]], cwd=d)
        return r | {"effect": ("THE PICKLE'S CODE RAN" if (d / "ran").exists() else "no code ran")
                    + ("; a checkpoint was written" if (d / "imp").exists() else "")}
    return run


def case_long_caption(side, fx, d):
    corpus = d / "c.txt"
    corpus.write_text("".join(words(i) + "\n" for i in range(60)) + "word " * 4_000_000 + "\n")  # one 20 MB line
    r1 = side.run(["embed", str(corpus), "--out", str(d / "s"), "--encoder", "toy"], cwd=d)
    if r1["rc"] != 0:
        return r1 | {"effect": "embed failed"}
    stored = (d / "s" / "captions.jsonl").stat().st_size
    r = side.run(["train", str(d / "s"), "--out", str(d / "c"), "--max-steps", "2", *TINY], cwd=d, timeout=300)
    return r | {"effect": f"captions.jsonl {stored / 1e6:.2f} MB; embed peak RSS {r1['peak_rss_mb']} MB, train "
                          f"peak RSS {r['peak_rss_mb']} MB"}


def _loop_tree(d: Path, img: Path) -> Path:
    root = d / "photos"
    (root / "a").mkdir(parents=True)
    shutil.copy(img, root / "a" / "x.png")
    for name, target in (("up1", ".."), ("up2", ".."), ("up3", "../..")):
        (root / "a" / name).symlink_to(target)
    return root


def case_loop_glob(side, fx, d):
    root = _loop_tree(d, fx["img"])
    return side.run(["caption", str(fx["ckpt"]), f"{root}/**/*.png", "--recursive"], cwd=d, timeout=60)


def case_loop_dir(side, fx, d):
    root = _loop_tree(d, fx["img"])
    return side.run(["caption", str(fx["ckpt"]), str(root), "--recursive"], cwd=d, timeout=60)


def _hub_cache(side) -> None:
    """The cache folders of a repo org/name, empty (as after a failed download)."""
    for sub in ("refs", "snapshots"):
        (side.work / "hf_home" / "hub" / "models--org--name" / sub).mkdir(parents=True, exist_ok=True)


def case_hub_revision(side, fx, d):
    _hub_cache(side)
    return side.run(["caption", f"org/name@{fx['ckpt']}", str(fx["img"])], cwd=d)


def case_hub_dotdot(side, fx, d):
    _hub_cache(side)
    return side.run(["caption", "org/name@../../x", str(fx["img"])], cwd=d)


CASES = [
    ("train --overwrite on a user's directory", 1, case_train_overwrite),
    ("import --overwrite on a user's directory", 1, case_import_overwrite),
    ("embed --overwrite on a user's directory", 1, case_embed_overwrite),
    ("embed --overwrite on a store holding a user's files", 1, case_embed_overwrite_store),
    ("evaluate --out a /dev/full-like char device", 2, case_full_device),
    ("corpus stats --out a symlink", 2, case_symlink),
    ("caption --out a FIFO", 2, case_fifo),
    ("corpus stats --out a FIFO", 2, case_fifo_stats),
    ("corpus stats --out /dev/fd/1 (as /dev/stdout), stdout appending to a file", 2, case_dev_fd),
    ("caption --out OUT, write fails after 100 bytes (RLIMIT_FSIZE)", 3, case_failed_write),
    ("train killed inside its save, then run again", 3, case_killed_save),
    *[(what, 4, fn) for what, fn in _deep_cases()],
    ("5000-digit integer: embed (jsonl id)", 4, case_big_int),
    ("5000-digit integer: evaluate (image_id)", 4, case_big_int_eval),
    ("image id of the wrong type: [257]", 4, _ids_case("[257]")),
    ("image id of the wrong type: null", 4, _ids_case("null")),
    ('--config {"lr": "abc"}', 4, _config_case('{"lr": "abc"}')),
    ('--config {"lr": NaN}', 4, _config_case('{"lr": NaN}')),
    ('--config {"epochs": "2"}', 4, _config_case('{"epochs": "2"}')),
    ('--config {"batch_size": [8]}', 4, _config_case('{"batch_size": [8]}')),
    ("--dropout 2", 4, _flag_case("--dropout", "2")),
    ("--vocab-size 1e12 (4 GB address-space limit)", 4, _flag_case("--vocab-size", "1000000000000", memory=4 * GIB)),
    ("embed --encoder hf:~nosuchuser/clip", 4, case_nosuchuser_encoder),
    ("embed ~nosuchuser/x", 4, case_nosuchuser_input),
    ("caption --image-ids: non-UTF-8 id list", 4, case_non_utf8_ids),
    ("checkpoint prefix_length 1e6 (6 GB limit, 60 s)", 5, _ckpt_case(_model(prefix_length=1_000_000),
                                                                       memory=6 * GIB, timeout=60)),
    ("checkpoint lm_dim 1e6 (6 GB limit, 60 s)", 5, _ckpt_case(_model(lm_dim=1_000_000, lm_heads=1),
                                                                memory=6 * GIB, timeout=60)),
    ("checkpoint mapper_depth 1e5 (6 GB limit, 60 s)", 5, _ckpt_case(_model(mapper_depth=100_000),
                                                                      memory=6 * GIB, timeout=60)),
    ('checkpoint prefix_length "2"', 5, _ckpt_case(_model(prefix_length="2"))),
    ("checkpoint dropout NaN", 5, _ckpt_case(_model(dropout=float("nan")))),
    ("checkpoint inference tau NaN", 5, _ckpt_case(
        lambda ck: edit_json(ck / "config.json", lambda c: c["inference"].update(tau=float("nan"))))),
    ('store meta.json "dim": "128"', 5, case_store_meta_type),
    ('state.json "step": "2" (resume)', 5, _state_case({"step": "2"})),
    ("state.json peak_lr NaN (resume)", 5, _state_case({"peak_lr": float("nan")})),
    ("model.safetensors empty", 5, _ckpt_case(_weights(lambda p: p.write_bytes(b"")))),
    ("model.safetensors truncated to 3000 bytes", 5, _ckpt_case(_weights(lambda p: p.write_bytes(p.read_bytes()[:3000])))),
    ("model.safetensors header length 1e15", 5, _ckpt_case(_weights(
        lambda p: p.write_bytes(struct.pack("<Q", 10**15) + p.read_bytes()[8:])))),
    ("model.safetensors with a NaN weight", 5, _ckpt_case(_weights(nan_first_weight))),
    ("import: a .pt with a NaN tensor", 5, _import_case("pt_nan")),
    ("import: a .pt pickle that would run code", 5, _import_case("pt_code")),
    ("resume: optimizer.pt pickle that would run code", 5, case_optimizer_pickle),
    ("a 20 MB caption line: embed, then train 2 steps", 6, case_long_caption),
    ("caption 'ROOT/**/*.png' --recursive over 3 symlink loops (60 s)", 7, case_loop_glob),
    ("caption ROOT --recursive over 3 symlink loops (60 s)", 7, case_loop_dir),
    ("caption org/name@/abs/path/to/a/checkpoint (Hub offline, the repo's cache folders exist)", 8,
     case_hub_revision),
    ("caption org/name@../../x (Hub offline)", 8, case_hub_dotdot),
]


# -- ClipCap .pt files for import (built once, with --after's test helpers) ----------------------------------------

PT_BUILDER = r'''
import json, os, sys, torch
from pathlib import Path
sys.path.insert(0, sys.argv[2])
out = Path(sys.argv[1])
from transformers import GPT2Config, GPT2LMHeadModel
from capdec.model.lm import train_tokenizer
from tiny_models import make_tiny_hf_clip
from test_clipcap import clipcap_state
words = sys.argv[3:]
tok = train_tokenizer(words, vocab_size=300)
torch.manual_seed(0)
gpt2 = out / "gpt2"
GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                           eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)).save_pretrained(gpt2)
tok.save_pretrained(gpt2)
clip = make_tiny_hf_clip(out / "clip")
state = clipcap_state(gpt2, "transformer")
torch.save(state, out / "clean.pt")
bad = dict(state)
k = next(iter(bad))
bad[k] = bad[k].clone(); bad[k].view(-1)[0] = float("nan")
torch.save(bad, out / "nan.pt")
class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch ran",))
torch.save({**state, "extra": RunsCode()}, out / "code.pt")
torch.save({"optimizer": RunsCode()}, out / "optimizer_code.pt")
print(json.dumps({"gpt2": str(gpt2), "clip": f"hf:{clip}"}))
'''


def build_pt_files(after_src: Path, root: Path) -> dict:
    root.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(after_src), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", PT_BUILDER, str(root), str(after_src.parent / "tests"),
                           *[words(i) for i in range(200)]], env=env, capture_output=True, text=True, timeout=600,
                          cwd=root)
    if done.returncode != 0:
        raise SystemExit(f"building the import files failed:\n{done.stderr[-3000:]}")
    paths = json.loads(done.stdout.strip().splitlines()[-1])
    return {"gpt2": Path(paths["gpt2"]), "clip": paths["clip"], "pt_clean": root / "clean.pt",
            "pt_nan": root / "nan.pt", "pt_code": root / "code.pt", "pt_optimizer_code": root / "optimizer_code.pt"}


_TEMP = re.compile(r"/tmp/hostile_table\.[^/\s]+/(?:before|after|import)/(?:case\d+/)?")


def markdown(rows: list[dict]) -> str:
    """The table (temporary paths shortened to …/)."""
    def cell(r: dict) -> str:
        if r.get("rc") is None:
            return r.get("stderr", "")
        text = f"exit {r['rc']}" + (" (timeout)" if r.get("timed_out") else "")
        text += f", {r['seconds']} s, {r['peak_rss_mb']} MB"
        if r.get("stderr"):
            said = _TEMP.sub("…/", r["stderr"]).replace("|", "/").replace("`", "")
            text += f": `{said[:170]}{'…' if len(said) > 170 else ''}`"
        if r.get("stderr_lines", 0) > 1:
            text += f" ({r['stderr_lines']} lines)"
        if r.get("effect"):
            text += f"; {r['effect']}"
        return _TEMP.sub("…/", text)

    out = ["| item | case | before | after |", "|---|---|---|---|"]
    for row in rows:
        out.append(f"| {row['item']} | {row['case']} | {cell(row['before'])} | {cell(row['after'])} |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", type=Path, help="src/ of the tree before the change")
    ap.add_argument("--render", type=Path, metavar="JSON", help="only write --markdown from an earlier --json")
    ap.add_argument("--after", type=Path, default=REPO / "src", help="src/ of the tree after (default: this one)")
    ap.add_argument("--only", nargs="*", help="run only the cases whose name contains one of these")
    ap.add_argument("--markdown", type=Path, help="also write the table here")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args()
    if args.render:
        if not args.markdown:
            ap.error("--render needs --markdown")
        args.markdown.write_text(markdown(json.loads(args.render.read_text())["rows"]))
        return
    if args.before is None:
        ap.error("--before is required")
    work = Path(tempfile.mkdtemp(prefix="hostile_table."))
    hook = work / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(KILL_HOOK)
    rows: list[dict] = []
    try:
        cases = [c for c in CASES if not args.only or any(s in c[0] for s in args.only)]
        shared = build_pt_files(args.after.resolve(), work / "import")
        sides = {}
        for name, src in (("before", args.before.resolve()), ("after", args.after.resolve())):
            side = Side(name, src, work / name, hook)
            sides[name] = (side, side.fixtures() | shared)
        for i, (what, item, fn) in enumerate(cases):
            row = {"item": item, "case": what}
            for name, (side, fx) in sides.items():
                d = side.work / f"case{i:02d}"
                d.mkdir()
                try:
                    row[name] = fn(side, fx, d)
                except Exception as e:  # the script's own check failed: record it, go on with the next case
                    row[name] = {"rc": None, "stderr": f"(table script error: {type(e).__name__}: {e})"[:220]}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    record = {"command": " ".join(sys.argv), "host": socket.gethostname(), "before": str(args.before),
              "after": str(args.after), "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(record, indent=1) + "\n")
    if args.markdown:
        args.markdown.write_text(markdown(rows))
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
