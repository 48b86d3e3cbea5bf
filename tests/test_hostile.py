"""Careless and hostile input through the real command line (issue 21, items 1-8).

Every case runs ``capdec.cli.main(argv)``, or the ``capdec`` command in a subprocess (its own session, with a
timeout, killed with its process group) where today's failure was a hang, an abort, or where a resource
limit must apply to capdec alone. Each asserts what the issue asks: nothing the user had is lost, and bad
input gets exit status 2 with one line naming the file (and place), never a traceback or a hang.

Device nodes: a write-through case uses a character device made in ``tmp_path`` (``mknod``, as root) with
/dev/full's numbers, so that code which wrongly renames a file over its target replaces only that copy.
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import stat
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import capdec
from capdec.cli import main
from raw_safetensors import nan_first_weight, read_raw, write_raw
from tiny_stores import captions

SRC = Path(capdec.__file__).resolve().parents[1]
TINY = ["--batch-size", "8", "--lm-dim", "32", "--lm-depth", "1", "--lm-heads", "2", "--mapper-depth", "1",
        "--prefix-length", "2", "--vocab-size", "200"]


# -- helpers ----------------------------------------------------------------------------------------------


_LOG_RECORD = re.compile(r"^\d\d:\d\d:\d\d (WARNING|INFO|DEBUG) capdec")


def one_line(err: str, *needles: str) -> str:
    """Besides log records (warnings), ``err`` is exactly one 'capdec CMD: error: ...' line containing each
    needle: no traceback, no paragraphs."""
    lines = [line for line in err.strip().splitlines() if not _LOG_RECORD.match(line)]
    assert len(lines) == 1 and lines[0].startswith("capdec ") and ": error: " in lines[0], err
    for needle in needles:
        assert needle in lines[0], (needle, err)
    return lines[0]


def cli(capsys, *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(["-q", *argv])
    return rc, capsys.readouterr().err


def run_capdec(*argv: str, timeout: float = 180, fsize: int | None = None, memory: int | None = None,
               cwd: Path | None = None, stdin=None, stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
    """``python -m capdec ARGV`` in its own session; killed (with its children) when it outlives ``timeout``.

    ``fsize``: RLIMIT_FSIZE in bytes for that process only (a write past it fails with EFBIG, even as root);
    ``memory``: its address space in bytes (RLIMIT_AS), so a case that would allocate without bound cannot
    take the machine's memory.
    """
    def limits() -> None:
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        if memory is not None:
            resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "CAPDEC_QUIET": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "capdec", "-q", *argv], stdout=stdout, stderr=subprocess.PIPE,
                            stdin=stdin, text=True, env=env, cwd=cwd, start_new_session=True, preexec_fn=limits)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        out, err = "", f"TIMEOUT after {timeout} s"
        proc.returncode = -1
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # nothing of it may outlive the test
        except ProcessLookupError:
            pass
        proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict[str, Path]:
    """A store of 120 captions embedded with the shipped toy CLIP, a tiny checkpoint trained 2 steps on it,
    and a toy-world picture, all made through the CLI."""
    from PIL import Image

    root = tmp_path_factory.mktemp("toy")
    corpus = root / "corpus.txt"
    corpus.write_text("".join(c + "\n" for c in captions(120)), encoding="utf-8")
    assert main(["-q", "embed", str(corpus), "--out", str(root / "store"), "--encoder", "toy"]) == 0
    assert main(["-q", "train", str(root / "store"), "--out", str(root / "ckpt"), "--max-steps", "2", *TINY]) == 0
    Image.new("RGB", (32, 32), (200, 30, 30)).save(root / "img.png")
    return {"root": root, "corpus": corpus, "store": root / "store", "ckpt": root / "ckpt", "img": root / "img.png"}


def copy_ckpt(toy, tmp_path: Path, name: str = "ck") -> Path:
    import shutil

    return Path(shutil.copytree(toy["ckpt"], tmp_path / name))


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


# -- item 1: --overwrite replaces only what capdec wrote ------------------------------------------------------


def user_dir(path: Path) -> Path:
    (path / "sub").mkdir(parents=True)
    (path / "important.txt").write_text("my notes")
    (path / "sub" / "data.csv").write_text("a,b\n")
    return path


def assert_untouched(path: Path) -> None:
    assert (path / "important.txt").read_text() == "my notes" and (path / "sub" / "data.csv").read_text() == "a,b\n"


def test_train_overwrite_refuses_a_directory_capdec_did_not_write(toy, tmp_path, capsys):
    out = user_dir(tmp_path / "mine")
    rc, err = cli(capsys, "train", str(toy["store"]), "--out", str(out), "--overwrite", "--max-steps", "1", *TINY)
    assert rc == 2
    one_line(err, str(out), "not a capdec checkpoint", "--overwrite")
    assert_untouched(out)


def test_train_overwrite_refuses_a_checkpoint_holding_a_users_file(toy, tmp_path, capsys):
    out = copy_ckpt(toy, tmp_path)
    (out / "important.txt").write_text("my notes")
    rc, err = cli(capsys, "train", str(toy["store"]), "--out", str(out), "--overwrite", "--max-steps", "1", "--dry-run",
                  *TINY)
    assert rc == 2 and (out / "important.txt").read_text() == "my notes"
    one_line(err, str(out), "important.txt")
    (out / "important.txt").unlink()  # a checkpoint capdec wrote, and nothing else: replaced
    rc, err = cli(capsys, "train", str(toy["store"]), "--out", str(out), "--overwrite", "--max-steps", "1", *TINY)
    assert rc == 0, err
    assert json.loads((out / "training" / "state.json").read_text())["step"] == 1


def test_kept_copies_beside_out_never_replace_a_users_directory(toy, tmp_path, capsys):
    user_dir(tmp_path / "run-best")
    rc, err = cli(capsys, "train", str(toy["store"]), "--out", str(tmp_path / "run"), "--keep-best",
                  "--max-steps", "1", "--dry-run", *TINY)
    assert rc == 2
    one_line(err, str(tmp_path / "run-best"), "--keep-best")
    assert_untouched(tmp_path / "run-best")


def test_the_training_memory_beside_out_never_replaces_a_users_directory(toy, tmp_path, capsys):
    user_dir(tmp_path / ".run.memory")  # where --save-memory writes the memory's rows while training
    rc, err = cli(capsys, "train", str(toy["store"]), "--out", str(tmp_path / "run"), "--save-memory",
                  "--max-steps", "1", *TINY)
    assert rc == 2
    one_line(err, str(tmp_path / ".run.memory"), "not the memory-rows store of a training run")
    assert_untouched(tmp_path / ".run.memory")
    rc, err = cli(capsys, "train", str(toy["store"]), "--out", str(tmp_path / "run2"), "--save-memory",
                  "--max-steps", "1", *TINY)
    assert rc == 0, err
    assert (tmp_path / "run2" / "memory").is_dir() and not (tmp_path / ".run2.memory").exists()


def test_import_overwrite_refuses_a_directory_capdec_did_not_write(tmp_path, tiny_gpt2_dir, tiny_hf_clip, capsys):
    import torch

    from test_clipcap import clipcap_state

    weights = tmp_path / "w.pt"
    torch.save(clipcap_state(tiny_gpt2_dir, "transformer"), weights)
    out = user_dir(tmp_path / "mine")
    rc, err = cli(capsys, "import", str(weights), "--out", str(out), "--overwrite", "--lm", str(tiny_gpt2_dir),
                  "--encoder", tiny_hf_clip)
    assert rc == 2
    one_line(err, str(out), "not a capdec checkpoint")
    assert_untouched(out)


def test_embed_overwrite_refuses_a_directory_capdec_did_not_write(toy, tmp_path, capsys):
    out = user_dir(tmp_path / "mine")
    rc, err = cli(capsys, "embed", str(toy["corpus"]), "--out", str(out), "--encoder", "toy", "--overwrite")
    assert rc == 2
    one_line(err, str(out))
    assert_untouched(out)


# -- item 2: outputs replace regular files only; devices, FIFOs and links are written through ------------------


@pytest.fixture
def full_device(tmp_path) -> Path:
    """A character device with /dev/full's numbers (every write: ENOSPC), private to the test."""
    if os.geteuid() != 0:
        pytest.skip("making a device node needs root")
    path = tmp_path / "full"
    os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 7))
    return path


def test_an_output_on_a_full_device_fails_in_one_line_and_keeps_the_node(toy, tmp_path, full_device, capsys):
    for argv in (["corpus", "stats", str(toy["corpus"]), "--out", str(full_device)],
                 ["caption", str(toy["ckpt"]), str(toy["img"]), "--out", str(full_device)]):
        rc, err = cli(capsys, *argv)
        assert rc == 2
        one_line(err, str(full_device), "No space left on device")
        assert stat.S_ISCHR(os.lstat(full_device).st_mode), "the device node was replaced"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".full.")]  # no temporary file left


def test_an_output_through_a_symlink_replaces_the_file_it_points_to(toy, tmp_path, capsys):
    target = tmp_path / "real" / "stats.json"
    target.parent.mkdir()
    target.write_text("old")
    link = tmp_path / "stats.json"
    link.symlink_to(target)
    rc, err = cli(capsys, "corpus", "stats", str(toy["corpus"]), "--out", str(link))
    assert rc == 0, err
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert json.loads(target.read_text())["captions"] == 120


@pytest.mark.parametrize("command", ["caption", "corpus"])
def test_an_output_fifo_is_written_through_to_its_reader(toy, tmp_path, capsys, command):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()), daemon=True)
    reader.start()
    argv = {"caption": ["caption", str(toy["ckpt"]), str(toy["img"]), "--format", "jsonl"],
            "corpus": ["corpus", "stats", str(toy["corpus"])]}[command]
    rc, err = cli(capsys, *argv, "--out", str(fifo))
    if not got:  # the writer never opened the FIFO: let the reader finish
        with open(fifo, "w"):
            pass
    reader.join(timeout=60)
    assert rc == 0, err
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode), "the FIFO was replaced by a file"
    doc = json.loads(got[0])
    assert doc["image"] == str(toy["img"]) if command == "caption" else doc["captions"] == 120


@pytest.mark.parametrize("path", ["/dev/fd/1", "/proc/self/fd/1"])
def test_an_open_descriptor_is_written_to_without_truncating(toy, tmp_path, path):
    # /dev/stdout is this kind of path too (a link to /proc/self/fd/1); it is not used here, so that code
    # which wrongly renamed a file over its target could not replace the machine's /dev/stdout
    log = tmp_path / "log.txt"
    log.write_text("earlier line\n")
    with open(log, "a") as out:  # as the shell's >> opens it
        done = run_capdec("corpus", "stats", str(toy["corpus"]), "--out", path, stdout=out)
    assert done.returncode == 0, done.stderr
    text = log.read_text()
    assert text.startswith("earlier line\n")  # appended after, not truncated
    assert json.JSONDecoder().raw_decode(text.split("\n", 1)[1])[0]["captions"] == 120


def test_an_output_that_is_a_directory_is_refused(toy, tmp_path, capsys):
    rc, err = cli(capsys, "corpus", "stats", str(toy["corpus"]), "--out", str(tmp_path))
    assert rc == 2
    one_line(err, str(tmp_path), "directory")


# -- item 3: a failed write leaves no truncated output; killed saves are cleaned up ---------------------------


@pytest.mark.parametrize("command", ["caption", "evaluate", "corpus"])
def test_a_failed_write_keeps_the_old_output_and_is_one_line(toy, tmp_path, command):
    out = tmp_path / "out.jsonl"
    out.write_text("the old results\n")
    images = []
    for i in range(4):  # enough rows to pass the 100-byte limit
        images.append(tmp_path / f"im{i}.png")
        os.link(toy["img"], images[-1])
    preds, refs = tmp_path / "p.json", tmp_path / "r.json"
    preds.write_text(json.dumps([{"image_id": i, "caption": "a red dog on a street"} for i in range(4)]))
    refs.write_text(json.dumps({"images": [{"id": i, "file_name": f"{i}.jpg"} for i in range(4)],
                                "annotations": [{"image_id": i, "id": i, "caption": "a red dog"} for i in range(4)]}))
    argv = {"caption": ["caption", str(toy["ckpt"]), *map(str, images), "--out", str(out)],
            "evaluate": ["evaluate", str(preds), "--references", str(refs), "--metrics", "bleu", "--tokenizer",
                         "simple", "--out", str(out)],
            "corpus": ["corpus", "stats", str(toy["corpus"]), "--out", str(out)]}[command]
    done = run_capdec(*argv, fsize=100)
    assert done.returncode == 2, done.stderr
    one_line(done.stderr, str(out), "File too large")
    assert out.read_text() == "the old results\n"
    assert sorted(p.name for p in tmp_path.iterdir() if "out.jsonl" in p.name) == ["out.jsonl"]  # no partial/temp


def test_temporary_directories_of_a_killed_save_are_removed_by_the_next_run(toy, tmp_path):
    import socket

    dead = subprocess.Popen(["true"])
    dead.wait()  # a process id that no longer runs
    host = "".join(c if c.isalnum() or c == "-" else "-" for c in socket.gethostname())[:64]
    out = tmp_path / "run"
    stale = tmp_path / f".run.{dead.pid}@{host}.abcd1234.tmp"  # what a save killed mid-write leaves
    (stale / "tokenizer").mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"\0" * 1000)
    live = tmp_path / f".run.{os.getpid()}@{host}.efgh5678.tmp"  # a running process's: kept
    live.mkdir()
    other = tmp_path / f".run.{dead.pid}@another-host.ijkl9012.tmp"  # another machine's (a shared disk): kept
    other.mkdir()
    done = run_capdec("train", str(toy["store"]), "--out", str(out), "--max-steps", "1", *TINY)
    assert done.returncode == 0, done.stderr
    assert not stale.exists() and live.exists() and other.exists()


# -- item 4: every user file is validated: one line, exit 2 ------------------------------------------------------


DEEP = "[" * 100_000 + "]" * 100_000


def test_json_nested_100k_deep_is_one_line_everywhere(toy, tmp_path, capsys):
    deep = tmp_path / "deep.json"
    deep.write_text(DEEP)
    deep_jsonl = tmp_path / "deep.jsonl"
    deep_jsonl.write_text('{"caption": "a dog"}\n' + DEEP + "\n")
    images = tmp_path / "images"
    images.mkdir()
    store = tmp_path / "store"
    import shutil

    shutil.copytree(toy["store"], store)
    (store / "meta.json").write_text(DEEP)
    cases = [
        (["embed", str(deep), "--out", str(tmp_path / "s1"), "--encoder", "toy"], "deep.json: line 1 column 101"),
        (["embed", str(deep_jsonl), "--out", str(tmp_path / "s2"), "--encoder", "toy"], "deep.jsonl: line 2 column 101"),
        (["evaluate", str(deep), "--references", str(deep)], "deep.json: line 1 column 101"),
        (["calibrate", str(deep), "--encoder", "toy", "--out", str(tmp_path / "n.json")], "deep.json: line 1"),
        (["corpus", "stats", str(deep)], "deep.json: line 1 column 101"),
        (["corpus", "rebalance-gender", str(deep), "--out", str(tmp_path / "o.json")], "deep.json: line 1"),
        (["caption", str(toy["ckpt"]), "--dataset", str(deep), "--images-root", str(images)], "deep.json: line 1"),
        (["caption", str(toy["ckpt"]), str(toy["img"]), "--image-ids", str(deep)], "deep.json: line 1"),
        (["train", str(store), "--out", str(tmp_path / "c"), "--dry-run"], "meta.json"),
        (["train", str(toy["store"]), "--out", str(tmp_path / "c"), "--config", str(deep), "--dry-run"], "deep.json"),
    ]
    for argv, where in cases:
        rc, err = cli(capsys, *argv)
        assert rc == 2, (argv, err)
        one_line(err, where)


def test_a_5000_digit_integer_is_one_line(toy, tmp_path, capsys):
    big = "9" * 5000
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(f'{{"caption": "a dog", "id": {big}}}\n')
    preds = tmp_path / "p.json"
    preds.write_text(f'[{{"image_id": {big}, "caption": "a dog"}}]')
    for argv, where in ((["embed", str(corpus), "--out", str(tmp_path / "s"), "--encoder", "toy"], "c.jsonl: line 1"),
                        (["evaluate", str(preds), "--references", str(preds)], "p.json: line 1 column 15")):
        rc, err = cli(capsys, *argv)
        assert rc == 2
        one_line(err, where, "5000 digits")


@pytest.mark.parametrize("value", ["[257]", "null", "true", '{"id": 257}'])
def test_image_ids_of_the_wrong_type_are_refused(toy, tmp_path, capsys, value):
    ids = tmp_path / "ids.json"
    ids.write_text(f'{{"{toy["img"].name}": {value}}}')
    rc, err = cli(capsys, "caption", str(toy["ckpt"]), str(toy["img"]), "--image-ids", str(ids), "--format", "coco",
                  "--out", str(tmp_path / "c.json"))
    assert rc == 2 and not (tmp_path / "c.json").exists()
    one_line(err, "ids.json", "image id must be a number or a string")


def test_a_non_utf8_id_list_names_line_and_column(toy, tmp_path, capsys):
    ids = tmp_path / "ids.tsv"
    ids.write_bytes(b"img.png\t1\nother.png\t2\nb\xe9d.png\t3\n")
    rc, err = cli(capsys, "caption", str(toy["ckpt"]), str(toy["img"]), "--image-ids", str(ids))
    assert rc == 2
    one_line(err, "ids.tsv: line 3 column 2: not valid UTF-8 (byte 0xe9)")
    listing = tmp_path / "images.txt"
    listing.write_bytes(b"img.png\n\xff.png\n")
    rc, err = cli(capsys, "caption", str(toy["ckpt"]), f"@{listing}")
    assert rc == 2
    one_line(err, "images.txt: line 2 column 1: not valid UTF-8")


@pytest.mark.parametrize("config, message", [
    ({"lr": "abc"}, "lr must be a finite number, got 'abc'"),
    ("NaN", "NaN is not a JSON value"),
    ({"epochs": "2"}, "epochs must be an integer, got '2'"),
    ({"epochs": 2.5}, "epochs must be an integer, got 2.5"),
    ({"batch_size": [8]}, "batch_size must be an integer, got [8]"),
    ({"mix_weights": [1, "a"]}, "mix_weights must be a list, each item a finite number"),
    ({"keep_best": 1}, "keep_best must be true or false, got 1"),
    ({"dropout": 2}, "dropout must be in [0, 1), got 2"),
    ({"prefix_length": 1000000}, "prefix_length must be from 1 to 4096, got 1000000"),
    ({"schedule": "sometimes"}, "schedule must be one of"),
])
def test_wrong_types_and_values_in_a_config_file_are_refused(toy, tmp_path, capsys, config, message):
    path = tmp_path / "config.json"
    path.write_text('{"lr": NaN}' if config == "NaN" else json.dumps(config))
    rc, err = cli(capsys, "train", str(toy["store"]), "--out", str(tmp_path / "c"), "--config", str(path),
                  "--dry-run")
    assert rc == 2
    one_line(err, "config.json", message)


@pytest.mark.parametrize("flags, message", [
    (["--dropout", "2"], "dropout must be in [0, 1), got 2.0"),
    (["--dropout", "nan"], "dropout must be a finite number, got nan"),
    (["--vocab-size", "1000000000000"], "vocab_size must be from 16 to 1000000"),
    (["--lr", "inf"], "lr must be a finite number"),
    (["--seed", "-1"], "seed must be from 0 to"),
])
def test_out_of_range_flags_are_refused_before_anything_runs(toy, tmp_path, capsys, flags, message):
    rc, err = cli(capsys, "train", str(toy["store"]), "--out", str(tmp_path / "c"), "--dry-run", *flags)
    assert rc == 2
    one_line(err, message)


def test_paths_of_an_unknown_users_home_are_one_line(toy, tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"image": "~nosuchuser/a.png", "caption": "a dog"}\n')
    for argv, needle in ((["embed", str(toy["corpus"]), "--out", str(tmp_path / "s"), "--encoder",
                           "hf:~nosuchuser/clip"], "~nosuchuser/clip"),
                         (["calibrate", str(pairs), "--encoder", "toy", "--out", str(tmp_path / "n.json")],
                          "~nosuchuser/a.png"),
                         (["embed", "~nosuchuser/x", "--out", str(tmp_path / "s"), "--encoder", "toy"], "~nosuchuser/x")):
        rc, err = cli(capsys, *argv)
        assert rc == 2
        one_line(err, needle)


# -- item 5: crafted artefacts are refused before anything is allocated ------------------------------------


def test_a_huge_prefix_length_in_a_checkpoint_is_refused_at_once(toy, tmp_path):
    ckpt = copy_ckpt(toy, tmp_path)
    edit_json(ckpt / "config.json", lambda c: c["model"].update(prefix_length=1_000_000))
    # today: builds a mapper of 1e6 prefix vectors (16 GB of weights) before the weights file is read
    done = run_capdec("caption", str(ckpt), str(toy["img"]), timeout=120, memory=6 << 30)
    assert done.returncode == 2, done.stderr
    one_line(done.stderr, "config.json: model: prefix_length must be from 1 to 4096, got 1000000")


def test_serve_refuses_a_crafted_checkpoint_at_start_with_the_same_check(toy, tmp_path):
    """serve loads through load_checkpoint: the bound on prefix_length stops it before a mapper is built."""
    ckpt = copy_ckpt(toy, tmp_path)
    edit_json(ckpt / "config.json", lambda c: c["model"].update(prefix_length=1_000_000))
    done = run_capdec("serve", str(ckpt), "--port", "0", timeout=120, memory=6 << 30)
    assert done.returncode == 2, done.stderr
    one_line(done.stderr, "config.json: model: prefix_length must be from 1 to 4096, got 1000000")
    nan = copy_ckpt(toy, tmp_path, "nan")
    nan_first_weight(nan / "model.safetensors")
    done = run_capdec("serve", str(nan), "--port", "0", timeout=120)
    assert done.returncode == 2, done.stderr
    one_line(done.stderr, "model.safetensors", "NaN or infinite values")


@pytest.mark.parametrize("section, change, message", [
    ("model", {"prefix_length": "2"}, "model: prefix_length must be an integer, got '2'"),
    ("model", {"mapper_depth": 3}, "'mapper.transformer.layers.1"),  # sizes within bounds but not the file's
    ("model", {"prefix_length": 4000}, "'mapper.prefix_const' has shape (2, 32) but its config makes (4000, 32)"),
    ("model", {"embed_dim": [128]}, "model: embed_dim must be an integer"),
    ("model", {"lm_config": {"model_type": "gpt2", "n_layer": 100000}}, "lm_config n_layer must be an integer from 1"),
    ("model", {"dropout": float("nan")}, "model: dropout must be a finite number, got nan"),
    ("inference", {"tau": float("nan")}, "inference: tau must be a finite number, got nan"),
    ("inference", {"shift": [0.1, "x"]}, "inference: shift must be a list, each item a finite number"),
    ("noise", {"variance": -1}, "noise variance must be a finite number"),
    ("noise", {"shape": "gap", "gap_diag": [0.1] * 5, "gap_factor": [[0.1] * 3]}, "each row of gap_factor must"),
    ("noise", {"shape": "gap", "gap_diag": [-1.0] * 2, "gap_factor": [[0.1] * 2]}, "gap_diag holds variances"),
    ("encoder", None, "'encoder' must be an object"),
])
def test_wrong_types_and_sizes_in_a_checkpoint_config_are_refused(toy, tmp_path, capsys, section, change, message):
    ckpt = copy_ckpt(toy, tmp_path)
    if change is None:
        edit_json(ckpt / "config.json", lambda c: c.update({section: "toy"}))
    else:
        edit_json(ckpt / "config.json", lambda c: c[section].update(change))
    if "lm_config" in (change or {}):  # unchecked, 100,000 layers would be built: in a process with a memory limit
        done = run_capdec("caption", str(ckpt), str(toy["img"]), timeout=120, memory=4 << 30)
        rc, err = done.returncode, done.stderr
    else:
        rc, err = cli(capsys, "caption", str(ckpt), str(toy["img"]))
    assert rc == 2, err
    one_line(err, str(ckpt), message)


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(b""), "0 bytes, too short for a safetensors file"),
    (lambda p: p.write_bytes(p.read_bytes()[:3000]), "truncated or not a safetensors file"),
    (lambda p: p.write_bytes(struct.pack("<Q", 10**15) + p.read_bytes()[8:]), "its header says it is 1000000000000000"),
    (lambda p: write_raw(p, json.loads(DEEP[:400] + DEEP[-400:]), b""), "header is not"),
    (lambda p: write_raw(p, {**read_raw(p)[0], "extra.weight": {"dtype": "F32", "shape": [1],
                                                                        "data_offsets": [0, 4]}}, read_raw(p)[1]),
     "'extra.weight'"),
    (lambda p: write_raw(p, {k: ({**v, "shape": [v["shape"][0] + 1, *v["shape"][1:]]}
                                          if k == "mapper.linear.weight" else v) for k, v in read_raw(p)[0].items()},
                                  read_raw(p)[1]), "does not fit its bytes"),
    (nan_first_weight, "NaN or infinite values"),
])
def test_damaged_weights_are_refused_in_one_line(toy, tmp_path, capsys, damage, message):
    ckpt = copy_ckpt(toy, tmp_path)
    damage(ckpt / "model.safetensors")
    rc, err = cli(capsys, "caption", str(ckpt), str(toy["img"]))
    assert rc == 2
    one_line(err, "model.safetensors", message)


@pytest.mark.parametrize("change, message", [
    ({"dim": "128"}, "'dim' must be an integer"),
    ({"count": [120]}, "'count' must be an integer"),
    ({"dim": 10**12}, "'dim' must be from 1 to 16384"),
    ({"encoder_identity": None}, "'encoder_identity' must be an object"),
])
def test_wrong_types_in_store_meta_are_refused(toy, tmp_path, capsys, change, message):
    import shutil

    store = Path(shutil.copytree(toy["store"], tmp_path / "store"))
    edit_json(store / "meta.json", lambda m: m.update(change))
    rc, err = cli(capsys, "train", str(store), "--out", str(tmp_path / "c"), "--dry-run")
    assert rc == 2
    one_line(err, "meta.json", message)


@pytest.mark.parametrize("change, message", [
    ({"step": "2"}, "'step' must be an integer"),
    ({"peak_lr": float("nan")}, "'peak_lr' must be a finite number"),
    ({"total_steps": -5}, "'total_steps' must be from 0"),
])
def test_wrong_types_in_state_json_are_refused_on_resume(toy, tmp_path, capsys, change, message):
    ckpt = copy_ckpt(toy, tmp_path)
    edit_json(ckpt / "training" / "state.json", lambda s: s.update(change))
    rc, err = cli(capsys, "train", str(toy["store"]), "--out", str(ckpt), "--resume", "--max-steps", "3")
    assert rc == 2
    one_line(err, "state.json", message)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo ran > /dev/null",))


def test_an_optimizer_state_that_would_run_code_is_one_line(toy, tmp_path, capsys):
    import torch

    ckpt = copy_ckpt(toy, tmp_path)
    torch.save({"optimizer": _RunsCode()}, ckpt / "training" / "optimizer.pt")
    rc, err = cli(capsys, "train", str(toy["store"]), "--out", str(ckpt), "--resume", "--max-steps", "3")
    assert rc == 2
    one_line(err, "optimizer.pt: refused", "system")


# -- item 6: a caption line is capped when read ---------------------------------------------------------------


def test_a_20_mb_caption_line_is_cut_when_read_and_counted(tmp_path, capsys):
    from capdec.io.text import MAX_CAPTION_CHARS
    from capdec.store import EmbeddingStore

    corpus = tmp_path / "c.txt"
    corpus.write_text("a dog on a street\n" + "word " * 4_000_000 + "\na cat\n", encoding="utf-8")  # 20 MB
    rc, err = cli(capsys, "embed", str(corpus), "--out", str(tmp_path / "s"), "--encoder", "toy")
    assert rc == 0, err
    store = EmbeddingStore.open(tmp_path / "s")
    assert max(map(len, store.captions)) <= MAX_CAPTION_CHARS and len(store.captions[1]) > MAX_CAPTION_CHARS - 10
    assert store.meta["stats"]["too_long"] == 1
    assert os.path.getsize(tmp_path / "s" / "captions.jsonl") < 10_000


def test_a_long_caption_in_a_crafted_store_is_cut_when_read(toy, tmp_path):
    import shutil

    from capdec.io.text import MAX_CAPTION_CHARS
    from capdec.store import EmbeddingStore

    store = Path(shutil.copytree(toy["store"], tmp_path / "store"))
    rows = (store / "captions.jsonl").read_text().splitlines()
    rows[3] = json.dumps({"caption": "x" * 5_000_000})
    (store / "captions.jsonl").write_text("\n".join(rows) + "\n")
    assert len(EmbeddingStore.open(store).captions[3]) == MAX_CAPTION_CHARS


def test_the_token_cache_keeps_at_most_max_tokens_of_a_caption(toy, tmp_path):
    import shutil

    from capdec.configs import MAX_TOKENS
    from capdec.model.lm import train_tokenizer
    from capdec.store import EmbeddingStore
    from capdec.tokencache import token_cache

    store = Path(shutil.copytree(toy["store"], tmp_path / "store"))
    rows = (store / "captions.jsonl").read_text().splitlines()
    emoji = "".join(chr(0x1F600 + i % 80) for i in range(4000))  # 4000 characters, 16,000 bytes: no merges
    rows[5] = json.dumps({"caption": emoji}, ensure_ascii=False)
    (store / "captions.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    opened = EmbeddingStore.open(store)
    tokenizer = train_tokenizer(captions(120), vocab_size=300)
    assert len(tokenizer(opened.captions[5])["input_ids"]) > MAX_TOKENS  # a byte-level BPE: a token per byte
    cache = token_cache(opened, tokenizer, show_progress=False)
    assert int(cache.lengths([5])[0]) == MAX_TOKENS and int(cache.lengths([4])[0]) < 20


# -- item 7: symlink loops ----------------------------------------------------------------------------------------


def test_recursive_globs_and_directories_terminate_on_symlink_loops(toy, tmp_path):
    root = tmp_path / "photos"
    (root / "a").mkdir(parents=True)
    os.link(toy["img"], root / "a" / "x.png")
    for name, target in (("up1", ".."), ("up2", ".."), ("up3", "../..")):  # glob.glob: 3^40 paths
        (root / "a" / name).symlink_to(target)
    for pattern in (f"{root}/**/*.png", str(root)):
        done = run_capdec("caption", str(toy["ckpt"]), pattern, "--recursive", timeout=120)
        assert done.returncode == 0, done.stderr
        assert [json.loads(line)["image"] for line in done.stdout.splitlines()] == [str(root / "a" / "x.png")]


# -- item 8: Hub revisions ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["org/name@/etc", "org/name@../../x", "org/name@a/../../b", "org/name@.hidden",
                                  "org/name@v1.lock", "org/name@a//b", "org/name@ref with space"])
def test_a_hub_revision_outside_the_cache_is_refused_before_the_hub_is_called(toy, capsys, monkeypatch, spec):
    import huggingface_hub

    def never(*args, **kwargs):
        raise AssertionError(f"huggingface_hub was called: {args} {kwargs}")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", never)
    rc, err = cli(capsys, "caption", spec, str(toy["img"]))
    assert rc == 2
    one_line(err, "is not a branch, tag or commit name")
