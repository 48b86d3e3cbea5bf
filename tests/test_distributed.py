"""Several processes, one result: torchrun training (DDP over gloo on CPU) and sharded embedding.

The equivalence checks compare against a single-process run of the same command: two ranks that take
halves of every global batch and normalise the loss by the global token count must end where one
process does, and a store embedded by two ranks must be byte-identical to one embedded by one.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from capdec import distributed
from capdec.cli import main
from capdec.errors import InputError

TINY = ["--prefix-length", "4", "--mapper-depth", "1", "--mapper-heads", "2", "--max-length", "24",
        "--lm-dim", "32", "--lm-depth", "2", "--lm-heads", "2", "--vocab-size", "400", "--dropout", "0"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- pure pieces ---------------------------------------------------------------------------------------
def test_shard_rows_split_every_batch_disjointly_and_completely():
    for n in (0, 1, 5, 32, 33):
        for world in (1, 2, 3, 4):
            parts = [list(range(n))[distributed.shard_rows(n, r, world)] for r in range(world)]
            assert sum(parts, []) == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_batch_not_divisible_by_world_size_is_refused():
    distributed.check_batch(32, 4)
    with pytest.raises(InputError, match="cannot be split evenly over 3 processes.*multiple of 3 .e.g. 30 or 33"):
        distributed.check_batch(32, 3)


def test_single_process_is_rank_0_of_1(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.info() == distributed.DistInfo(0, 1, 0) and not distributed.launched()
    assert distributed.init(torch.device("cpu")) == distributed.DistInfo()
    assert distributed.device_for("cpu") == torch.device("cpu")


def test_device_under_torchrun_follows_local_rank(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(InputError, match="CUDA_VISIBLE_DEVICES"):
        distributed.device_for("cuda:0")  # every rank would share one GPU
    if not torch.cuda.is_available():
        assert distributed.device_for("auto") == torch.device("cpu")
        with pytest.raises(InputError, match="no GPU"):
            distributed.device_for("cuda")


# -- training ------------------------------------------------------------------------------------------
def _val_loss(ckpt: Path) -> float:
    rows = [json.loads(r) for r in (ckpt / "metrics.jsonl").read_text().splitlines()]
    return [r["val_loss"] for r in rows if "val_loss" in r][-1]


def _torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
            "--nproc_per_node", str(nproc), "-m", "capdec", "-q", *args]


def _env(tmp_path) -> dict[str, str]:
    """One thread per rank; torchrun's own temp files (torchelastic_*) go under the test's tmp_path."""
    tmp = tmp_path / "tmp"
    tmp.mkdir(exist_ok=True)
    return {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp)}


def test_two_ranks_match_one_process_and_resume_on_one(tmp_path, hf_store):
    """2 gloo ranks == 1 process (val loss to 1e-3 relative); a killed 2-rank run resumes on 1 rank."""
    env = _env(tmp_path)
    common = ["--batch-size", "32", "--max-steps", "24", "--save-every", "8", "--eval-every", "24",
              "--log-every", "4", "--amp", "off", "--lr", "2e-3", "--seed", "5", *TINY]
    single = tmp_path / "single"
    assert main(["-q", "train", str(hf_store), "--out", str(single), *common]) == 0

    ddp = tmp_path / "ddp"
    subprocess.run(_torchrun(2, "train", str(hf_store), "--out", str(ddp), *common), check=True, env=env, timeout=300)
    one, two = _val_loss(single), _val_loss(ddp)
    assert abs(two - one) / one < 1e-3, (one, two)
    state = json.loads((ddp / "training" / "state.json").read_text())
    assert state["step"] == 24 and state["world_size"] == 2
    assert not list(tmp_path.glob("ddp*/**/*.tmp")), "only rank 0 writes"

    # a 2-rank run killed after its first checkpoint, resumed by a single process
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_torchrun(2, "train", str(hf_store), "--out", str(killed), *common), env=env,
                            start_new_session=True)
    state_file = killed / "training" / "state.json"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        try:
            if json.loads(state_file.read_text())["step"] >= 8:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks
    proc.wait()
    step = json.loads(state_file.read_text())["step"]
    assert 8 <= step < 24, "the run must be killed mid-way for this test to mean anything"
    assert main(["-q", "train", str(hf_store), "--out", str(killed), "--resume"]) == 0
    resumed = _val_loss(killed)
    assert abs(resumed - one) / one < 1e-3, (one, resumed)
    assert json.loads(state_file.read_text())["world_size"] == 1


def test_torchrun_refuses_a_batch_it_cannot_split(tmp_path, hf_store):
    env = _env(tmp_path)
    out = tmp_path / "c"
    proc = subprocess.run(_torchrun(2, "train", str(hf_store), "--out", str(out), "--batch-size", "33",
                                    "--max-steps", "1", *TINY), env=env, timeout=300, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "--batch-size 33 is the global batch and cannot be split evenly over 2 processes" in proc.stderr
    assert 'capdec/train.py", line' not in proc.stderr, "a clear message, not our traceback (torchrun adds its own)"
    assert not out.exists()


# -- embedding -------------------------------------------------------------------------------------------
def _embed_worker(rank: int, world: int, port: int, corpus: str, encoder_spec: str, out: str,
                  fail_after_shards: int | None, report: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from capdec.encoders import load_encoder
    from capdec.store import embed_corpus

    distributed.init(torch.device("cpu"))
    encoder = load_encoder(encoder_spec, device="cpu")
    if fail_after_shards is not None and rank == 1:
        # rank 1 dies after writing some shards (each shard is 2 encoder batches here)
        real, calls = encoder.encode_text, [0]

        def dying(texts, **kw):
            calls[0] += 1
            if calls[0] > 2 * fail_after_shards:
                raise RuntimeError("rank 1 killed")
            return real(texts, **kw)

        encoder.encode_text = dying
    store = embed_corpus(corpus, out, encoder, batch_size=16, shard_size=32, show_progress=False)
    if rank == 0:
        Path(report).write_text(json.dumps({"encoded": store.embed_run.encoded, "resumed": store.embed_run.resumed}))
    distributed.shutdown()


def _spawn_embed(world: int, corpus: Path, encoder: str, out: Path, report: Path, fail_after: int | None = None):
    # fork: the workers start with torch already imported (this process never touched CUDA)
    mp.start_processes(_embed_worker, args=(world, _free_port(), str(corpus), encoder, str(out), fail_after,
                                            str(report)), nprocs=world, join=True, start_method="fork")


def test_sharded_embed_equals_single_process_and_resumes_missing_shards(tmp_path, coco_caption_file, tiny_hf_clip):
    single = tmp_path / "single"
    assert main(["-q", "embed", str(coco_caption_file), "--out", str(single), "--encoder", tiny_hf_clip,
                 "--batch-size", "16", "--shard-size", "32"]) == 0

    out, report = tmp_path / "two", tmp_path / "report.json"
    with pytest.raises(Exception, match="rank 1 killed"):
        _spawn_embed(2, coco_caption_file, tiny_hf_clip, out, report, fail_after=1)
    partial = tmp_path / ".two.partial"
    left = sorted(p.name for p in partial.glob("shard-*.npy"))
    assert left and len(left) < 10 and not out.exists()

    # the rerun through the CLI under torchrun computes only the missing shards
    env = _env(tmp_path)
    proc = subprocess.run(_torchrun(2, "embed", str(coco_caption_file), "--out", str(out), "--encoder", tiny_hf_clip,
                                    "--batch-size", "16", "--shard-size", "32", "--device", "cpu"),
                          env=env, timeout=300, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    n = 300
    resumed = sum(min(32, n - 32 * int(name[6:12])) for name in left)
    assert f"{resumed} resumed" in proc.stdout and proc.stdout.count("embedded 300 captions") == 1, proc.stdout
    assert (out / "embeddings.npy").read_bytes() == (single / "embeddings.npy").read_bytes()
    assert (out / "captions.jsonl").read_bytes() == (single / "captions.jsonl").read_bytes()
    meta_a, meta_b = (json.loads((d / "meta.json").read_text()) for d in (single, out))
    meta_a.pop("created"), meta_b.pop("created")
    assert meta_a == meta_b
    assert not partial.exists()
    assert np.load(out / "embeddings.npy").shape == (n, 32)


def test_sharded_embed_counts_only_what_it_computed(tmp_path, coco_caption_file, tiny_hf_clip):
    """EmbedRun.encoded is the sum over ranks; a finished store is up to date for every rank."""
    out, report = tmp_path / "two", tmp_path / "report.json"
    _spawn_embed(2, coco_caption_file, tiny_hf_clip, out, report)
    assert json.loads(report.read_text()) == {"encoded": 300, "resumed": 0}
    _spawn_embed(2, coco_caption_file, tiny_hf_clip, out, report)
    assert json.loads(report.read_text()) == {"encoded": 0, "resumed": 0}
