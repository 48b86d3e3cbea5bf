"""capdec train: the loop, the CLI end to end on real caption text, resume, and refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import processes
from capdec.checkpoint import load_checkpoint
from capdec.cli import main
from capdec.train import TrainConfig, epoch_order, lr_at, split_indices

TINY_MAPPER = ["--prefix-length", "4", "--mapper-depth", "1", "--mapper-heads", "2", "--max-length", "24"]
TINY_MODEL = [*TINY_MAPPER, "--lm-dim", "32", "--lm-depth", "2", "--lm-heads", "2", "--vocab-size", "400"]


def losses(ckpt: Path) -> tuple[list[float], list[float]]:
    rows = [json.loads(r) for r in (ckpt / "metrics.jsonl").read_text().splitlines()]
    return [r["train_loss"] for r in rows if "train_loss" in r], [r["val_loss"] for r in rows if "val_loss" in r]


# -- pure pieces ---------------------------------------------------------------------------------------
def test_lr_schedule_warms_up_then_decays():
    lrs = [lr_at(s, peak=1.0, warmup=10, total=100, schedule="linear") for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] < 0.02
    cos = [lr_at(s, peak=1.0, warmup=0, total=100, schedule="cosine") for s in (0, 50, 99)]
    assert cos[0] == pytest.approx(1.0) and cos[1] == pytest.approx(0.5) and cos[2] < 0.01
    assert lr_at(70, peak=3e-4, warmup=5, total=100, schedule="constant") == 3e-4


def test_epoch_order_is_seeded_and_weighted():
    assert torch.equal(epoch_order(50, 3, seed=1), epoch_order(50, 3, seed=1))
    assert not torch.equal(epoch_order(50, 3, seed=1), epoch_order(50, 4, seed=1))
    assert sorted(epoch_order(50, 0, seed=0).tolist()) == list(range(50))
    w = torch.tensor([1.0] * 10 + [0.0] * 40)
    assert epoch_order(50, 0, seed=0, weights=w).max() < 10


def test_split_is_deterministic_and_disjoint():
    tr, va = split_indices(1000, TrainConfig(val_fraction=0.1, seed=3))
    tr2, va2 = split_indices(1000, TrainConfig(val_fraction=0.1, seed=3))
    assert torch.equal(tr, tr2) and torch.equal(va, va2)
    assert len(va) == 100 and not set(tr.tolist()) & set(va.tolist())


# -- end to end through the CLI ------------------------------------------------------------------------
@pytest.mark.parametrize("decoder", ["scratch", "hf_lm"])
def test_embed_then_train_hf_clip_loss_falls(tmp_path, hf_store, tiny_gpt2_dir, decoder):
    out = tmp_path / "ckpt"
    model = [*TINY_MAPPER, "--lm", str(tiny_gpt2_dir), "--lr", "1e-3"] if decoder == "hf_lm" else [*TINY_MODEL, "--lr", "2e-3"]
    assert main(["-q", "train", str(hf_store), "--out", str(out), "--epochs", "6", "--batch-size", "32",
                 "--log-every", "3", "--noise-variance", "0.016", *model]) == 0
    train_losses, val_losses = losses(out)
    assert train_losses[-1] < train_losses[0] - 0.5
    assert val_losses[-1] < val_losses[0]
    ckpt = load_checkpoint(out, device="cpu")
    cfg = ckpt.config
    assert cfg["format"] == "capdec.checkpoint/1"
    assert cfg["encoder"]["kind"] == "hf" and cfg["encoder_identity"]["dim"] == 32
    assert cfg["noise"]["variance"] == 0.016
    assert cfg["train"]["epochs"] == 6 and cfg["model"]["prefix_length"] == 4
    assert cfg["model"]["lm"] == ("scratch" if decoder == "scratch" else str(tiny_gpt2_dir))
    assert ckpt.model.tokenizer.eos_token_id is not None
    assert not list(out.glob("*.pkl")) and (out / "model.safetensors").is_file()


def test_embed_then_train_open_clip(tmp_path, coco_caption_file, tiny_open_clip):
    store, out = tmp_path / "store", tmp_path / "ckpt"
    assert main(["-q", "embed", str(coco_caption_file), "--out", str(store), "--encoder", tiny_open_clip]) == 0
    assert main(["-q", "train", str(store), "--out", str(out), "--epochs", "5", "--batch-size", "32",
                 "--log-every", "3", "--mapper", "mlp", "--lr", "2e-3", *TINY_MODEL]) == 0
    train_losses, _ = losses(out)
    assert train_losses[-1] < train_losses[0] - 0.5
    assert load_checkpoint(out, device="cpu").config["encoder"]["kind"] == "open_clip"


# -- resume ------------------------------------------------------------------------------------------
def _train_cmd(store: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "capdec", "-q", "train", str(store), "--out", str(out), "--epochs", "4",
            "--batch-size", "16", "--save-every", "5", "--dropout", "0.1", "--lr", "1e-3", *TINY_MODEL, *extra]


def test_resume_after_kill_matches_uninterrupted_run(tmp_path, hf_store):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full = tmp_path / "full"
    subprocess.run(_train_cmd(hf_store, full), check=True, env=env, timeout=300)

    killed = tmp_path / "killed"
    state = killed / "training" / "state.json"
    with processes.spawned(_train_cmd(hf_store, killed), env=env) as proc:  # killed however the test ends
        deadline = time.time() + 240
        while time.time() < deadline:
            try:
                if json.loads(state.read_text())["step"] >= 10:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    step = json.loads(state.read_text())["step"]
    total = json.loads((full / "training" / "state.json").read_text())["step"]
    assert 10 <= step < total, "the run must be killed mid-way for this test to mean anything"

    subprocess.run(_train_cmd(hf_store, killed, "--resume"), check=True, env=env, timeout=300)
    a, b = load_file(full / "model.safetensors"), load_file(killed / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    rows = [json.loads(r)["step"] for r in (killed / "metrics.jsonl").read_text().splitlines()]
    assert rows == sorted(rows) and len(rows) == len(set(rows)), "metrics.jsonl must not repeat steps after resume"


# -- refusals and failures -------------------------------------------------------------------------------
def test_refuses_store_from_another_encoder(tmp_path, hf_store, tiny_open_clip, capsys):
    code = main(["train", str(hf_store), "--out", str(tmp_path / "c"), "--encoder", tiny_open_clip, *TINY_MODEL])
    assert code == 2
    err = capsys.readouterr().err
    assert "different encoder" in err and not (tmp_path / "c").exists()


def test_refuses_existing_output_without_resume_or_overwrite(tmp_path, hf_store, capsys):
    out = tmp_path / "c"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert main(["train", str(hf_store), "--out", str(out), "--max-steps", "1", *TINY_MODEL]) == 2
    assert "--resume" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "precious"


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, hf_store, capsys):
    out = tmp_path / "c"
    code = main(["train", str(hf_store), "--out", str(out), "--epochs", "50", "--batch-size", "16",
                 "--save-every", "1", "--lr", "1e12", "--warmup-steps", "0", "--schedule", "constant",
                 "--grad-clip", "0", *TINY_MODEL])
    assert code == 2
    err = capsys.readouterr().err
    assert "loss became" in err and "last good checkpoint" in err
    ckpt = load_checkpoint(out, device="cpu")  # still loadable
    assert all(torch.isfinite(p).all() for p in ckpt.model.parameters())


# -- resume with new options (nanoGPT: the architecture from the checkpoint, the rest as given) -----------
def _state(ckpt: Path) -> dict:
    return json.loads((ckpt / "training" / "state.json").read_text())


def test_resume_applies_the_options_given_and_refuses_fixed_ones(tmp_path, hf_store, capsys):
    out = tmp_path / "c"
    run = ["train", str(hf_store), "--out", str(out), "--batch-size", "16", "--log-every", "1", "--schedule",
           "constant", "--warmup-steps", "0", *TINY_MODEL]
    assert main(["-q", *run, "--max-steps", "2", "--lr", "1e-3"]) == 0
    assert _state(out)["step"] == 2
    capsys.readouterr()
    # the budget extends the run, a new learning rate and weight decay apply from the resume point on
    assert main([*run, "--resume", "--max-steps", "4", "--lr", "5e-4", "--weight-decay", "0.5"]) == 0
    err = capsys.readouterr().err
    assert "max_steps: 2 -> 4" in err and "lr: 0.001 -> 0.0005" in err
    assert _state(out)["step"] == 4
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["lr"]) for r in rows if "lr" in r] == [(1, 1e-3), (2, 1e-3), (3, 5e-4), (4, 5e-4)]
    groups = torch.load(out / "training" / "optimizer.pt", weights_only=True)["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.5, 0.0]
    recorded = json.loads((out / "config.json").read_text())["train"]
    assert (recorded["max_steps"], recorded["lr"], recorded["weight_decay"]) == (4, 5e-4, 0.5)
    # what cannot change on resume is refused, by name, and nothing is written
    before = (out / "model.safetensors").read_bytes()
    for flag, value, name in [("--batch-size", "8", "batch_size"), ("--lm-dim", "64", "lm_dim"),
                              ("--noise-variance", "0.1", "noise_variance"), ("--seed", "3", "seed")]:
        assert main([*run, "--resume", "--max-steps", "6", flag, value]) == 2, flag
        assert name in capsys.readouterr().err, flag
    assert (out / "model.safetensors").read_bytes() == before and _state(out)["step"] == 4
