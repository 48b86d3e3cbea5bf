"""Several processes, one result: torchrun training (DDP over gloo on CPU) and sharded embedding.

The equivalence checks compare against a single-process run of the same command: two ranks that take
halves of every global batch and normalise the loss by the global token count must end with the weights,
Adam moments and losses one process has (to float rounding), and a store embedded by two ranks must be
byte-identical to one embedded by one. With dropout on, ranks run in-process (forked) so that their
masks can be read.
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
from safetensors.torch import load_file

import processes
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
# Tolerances, measured on this test's runs (24 steps, fp32, dropout 0, no gradient clipping):
# 1 process vs 2 ranks differ by float rounding only: weights by at most 7e-6, Adam's first moment by
# 9e-6 of its norm, train losses by 9e-8 relative, the validation loss by 0. Three planted bugs gave:
#   loss averaged per rank (not over the global token count)  weights 4e-3, val loss 5e-5 relative
#   each rank drawing noise for its own rows only              weights 4e-2, val loss 6e-6
#   the world-size factor dropped from the loss                weights 6e-4, Adam moments 50% off
# Gradient clipping is off: a clipped gradient has the same norm at any scale, so it would hide the last one.
WEIGHTS_ATOL = 5e-5
MOMENT_RTOL = 1e-4
LOSS_RTOL = 1e-6


def _losses(ckpt: Path) -> tuple[list[float], float]:
    """(train loss of every log row, last validation loss) from metrics.jsonl."""
    rows = [json.loads(r) for r in (ckpt / "metrics.jsonl").read_text().splitlines()]
    return [r["train_loss"] for r in rows if "train_loss" in r], [r["val_loss"] for r in rows if "val_loss" in r][-1]


def _assert_trained_alike(a: Path, b: Path) -> None:
    """Checkpoints ``a`` and ``b`` hold the same training: final weights, Adam's moments, losses."""
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=WEIGHTS_ATOL, msg=lambda m, k=k: f"{k}: {m}")
    # Adam's moments are running averages of the gradient and its square: a gradient's scale shows as is
    sa, sb = (torch.load(c / "training" / "optimizer.pt", weights_only=True)["optimizer"]["state"] for c in (a, b))
    assert sa.keys() == sb.keys()
    for i in sa:
        for name in ("exp_avg", "exp_avg_sq"):
            x, y = sa[i][name], sb[i][name]
            assert float((y - x).norm()) <= MOMENT_RTOL * float(x.norm()), (i, name, float((y - x).norm() / x.norm()))
    (ta, va), (tb, vb) = _losses(a), _losses(b)
    assert len(ta) == len(tb) and all(abs(y - x) <= LOSS_RTOL * x for x, y in zip(ta, tb)), (ta, tb)
    assert abs(vb - va) <= LOSS_RTOL * va, (va, vb)


def _torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
            "--nproc_per_node", str(nproc), "-m", "capdec", "-q", *args]


def _env(tmp_path) -> dict[str, str]:
    """One thread per rank; torchrun's own temp files (torchelastic_*) go under the test's tmp_path."""
    tmp = tmp_path / "tmp"
    tmp.mkdir(exist_ok=True)
    return {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp)}


def _kill_torchrun(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun, its ranks (each in a session of its own: killing torchrun's group would leave them
    training and writing checkpoints) and theirs, and wait until all are gone."""
    ranks = processes.children(proc.pid)
    assert len(ranks) == 2, f"expected torchrun's 2 ranks among its children, found {ranks}"
    assert set(ranks) <= set(processes.kill_tree(proc))


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="finds torchrun's ranks through Linux's /proc")
def test_a_torchrun_that_times_out_leaves_no_rank_running(tmp_path):
    """processes.run kills torchrun's ranks too (each leads a session of its own) when the command times out."""
    script = tmp_path / "rank.py"
    script.write_text("import os, pathlib, time\n"
                      "pathlib.Path(os.environ['PIDS'], os.environ['RANK']).write_text(str(os.getpid()))\n"
                      "time.sleep(600)\n")
    pids = tmp_path / "pids"
    pids.mkdir()
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "2",
            str(script)]
    with pytest.raises(subprocess.TimeoutExpired):
        processes.run(argv, timeout=25, env={**_env(tmp_path), "PIDS": str(pids)}, capture_output=True)
    ranks = [int(p.read_text()) for p in pids.iterdir()]
    assert len(ranks) == 2, "the ranks must have started for this test to mean anything"
    assert not [pid for pid in ranks if processes.alive(pid)]


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="finds torchrun's ranks through Linux's /proc")
def test_two_ranks_match_one_process_and_resume_on_one(tmp_path, hf_store):
    """2 gloo ranks train what 1 process does (weights, Adam moments, losses); a 2-rank run killed
    mid-way, its ranks gone, resumes on 1 process to the same result."""
    env = _env(tmp_path)
    common = ["--batch-size", "32", "--max-steps", "24", "--save-every", "8", "--eval-every", "24",
              "--log-every", "4", "--amp", "off", "--lr", "2e-3", "--grad-clip", "0", "--seed", "5", *TINY]
    single = tmp_path / "single"
    assert main(["-q", "train", str(hf_store), "--out", str(single), *common]) == 0

    ddp = tmp_path / "ddp"
    processes.run(_torchrun(2, "train", str(hf_store), "--out", str(ddp), *common), check=True, env=env, timeout=300)
    _assert_trained_alike(single, ddp)
    state = json.loads((ddp / "training" / "state.json").read_text())
    assert state["step"] == 24 and state["world_size"] == 2
    assert not list(tmp_path.glob("ddp*/**/*.tmp")), "only rank 0 writes"

    # a 2-rank run killed after its first checkpoint, resumed by a single process
    killed = tmp_path / "killed"
    state_file = killed / "training" / "state.json"
    with processes.spawned(_torchrun(2, "train", str(hf_store), "--out", str(killed), *common), env=env) as proc:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            try:
                if json.loads(state_file.read_text())["step"] >= 8:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.05)
        _kill_torchrun(proc)
    step = json.loads(state_file.read_text())["step"]
    assert 8 <= step < 24, "the run must be killed mid-way for this test to mean anything"
    assert main(["-q", "train", str(hf_store), "--out", str(killed), "--resume"]) == 0
    assert json.loads(state_file.read_text())["world_size"] == 1
    _assert_trained_alike(single, killed)


def _train_worker(rank: int, world: int, port: int, argv: list[str], stop_at_step: int | None,
                  mask_file: str | None) -> None:
    """One rank of a training run started in-process (as torchrun would set it up)."""
    processes.die_with_parent(signal.SIGKILL)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import capdec.train.loop

    if stop_at_step is not None:  # every rank stops dead at this step, as a kill would stop it
        step = capdec.train.loop._train_step

        def step_or_stop(**kw):
            if kw["step"] == stop_at_step:
                os._exit(0)
            return step(**kw)

        capdec.train.loop._train_step = step_or_stop
    masks: list[torch.Tensor] = []
    if mask_file is not None:  # the first dropout mask this rank draws in training
        def record(module, args, output):
            if isinstance(module, torch.nn.Dropout) and module.training and not masks:
                masks.append((output == 0) & (args[0] != 0))

        torch.nn.modules.module.register_module_forward_hook(record)
    assert main(argv) == 0
    if mask_file is not None:
        torch.save(masks[0], mask_file.format(rank=rank))


def _spawn_train(argv: list[str], *, stop_at_step: int | None = None, mask_file: str | None = None) -> None:
    mp.start_processes(_train_worker, args=(2, _free_port(), argv, stop_at_step, mask_file), nprocs=2, join=True,
                       start_method="fork")


def test_dropout_ranks_draw_their_own_masks_and_a_resumed_run_continues_the_stream(tmp_path, hf_store):
    """With dropout on, the 2 ranks' masks differ (one seed for both would drop the same units of
    their rows), and a run stopped after its step-8 checkpoint and resumed ends where an uninterrupted run
    does: step t's masks depend on (seed, t, rank), not on how the process got to step t."""
    common = ["-q", "train", str(hf_store), "--batch-size", "32", "--max-steps", "24", "--save-every", "8",
              "--eval-every", "24", "--log-every", "4", "--amp", "off", "--lr", "2e-3", "--seed", "5",
              *TINY, "--dropout", "0.3"]
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    _spawn_train([*common, "--out", str(full)], mask_file=str(tmp_path / "mask{rank}.pt"))
    m0, m1 = (torch.load(tmp_path / f"mask{r}.pt") for r in (0, 1))
    assert m0.shape == m1.shape and m0.shape[0] == 16  # each rank's half of the batch
    for m in (m0, m1):
        assert abs(float(m.float().mean()) - 0.3) < 0.05  # units dropped at the rate asked for
    agree = float((m0 == m1).float().mean())
    assert agree < 0.7, f"the ranks' masks agree on {agree:.0%} of units (independent masks: ~58%)"

    _spawn_train([*common, "--out", str(stopped)], stop_at_step=12)
    assert json.loads((stopped / "training" / "state.json").read_text())["step"] == 8
    _spawn_train(["-q", "train", str(hf_store), "--out", str(stopped), "--resume"])
    a, b = load_file(full / "model.safetensors"), load_file(stopped / "model.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    assert _losses(full) == _losses(stopped)


def test_torchrun_refuses_a_batch_it_cannot_split(tmp_path, hf_store):
    env = _env(tmp_path)
    out = tmp_path / "c"
    proc = processes.run(_torchrun(2, "train", str(hf_store), "--out", str(out), "--batch-size", "33",
                                    "--max-steps", "1", *TINY), env=env, timeout=300, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "--batch-size 33 is the global batch and cannot be split evenly over 2 processes" in proc.stderr
    assert 'capdec/train/' not in proc.stderr, "a clear message, not our traceback (torchrun adds its own)"
    assert not out.exists()


# -- embedding -------------------------------------------------------------------------------------------
def _embed_worker(rank: int, world: int, port: int, corpus: str, encoder_spec: str, out: str,
                  fail_after_shards: int | None, report: str) -> None:
    processes.die_with_parent(signal.SIGKILL)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from capdec.encoders import load_encoder
    from capdec.store import embed_corpus

    distributed.init(torch.device("cpu"))
    encoder = load_encoder(encoder_spec, device="cpu")
    if fail_after_shards is not None and rank == 1:
        # rank 1 dies after writing some shards (embed_corpus encodes a shard with one encode_tokens call)
        real, calls = encoder.encode_tokens, [0]

        def dying(tokens, **kw):
            calls[0] += 1
            if calls[0] > fail_after_shards:
                raise RuntimeError("rank 1 killed")
            return real(tokens, **kw)

        encoder.encode_tokens = dying
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
    proc = processes.run(_torchrun(2, "embed", str(coco_caption_file), "--out", str(out), "--encoder", tiny_hf_clip,
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


def test_image_store_under_torchrun_equals_single_process(tmp_path, photo_dataset, tiny_hf_clip):
    """Two ranks (each with a decoding worker process) share an image dataset's shards; rank 0 assembles a
    store byte-identical to a single process's."""
    args = [str(photo_dataset["jsonl"]), "--modality", "image", "--encoder", tiny_hf_clip, "--batch-size", "2",
            "--shard-size", "3"]
    single = tmp_path / "single"
    assert main(["-q", "embed", *args, "--out", str(single), "--workers", "0"]) == 0
    out = tmp_path / "two"
    proc = processes.run(_torchrun(2, "embed", *args, "--out", str(out), "--workers", "1", "--device", "cpu"),
                          env=_env(tmp_path), timeout=300, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    for name in ("embeddings.npy", "rows.npy", "captions.jsonl"):
        assert (out / name).read_bytes() == (single / name).read_bytes(), name
    meta_a, meta_b = (json.loads((d / "meta.json").read_text()) for d in (single, out))
    meta_a.pop("created"), meta_b.pop("created")
    assert meta_a == meta_b and meta_b["stats"]["images"] == 17
    assert not (tmp_path / ".two.partial").exists()
