"""The tiny-scale twin of docs/reproduce.md: the paper's recipe through the CLI, end to end.

The same commands as the COCO section of docs/reproduce.md (embed the Karpathy train and val splits,
``capdec train --recipe capdec-coco``, caption the test split, evaluate against it), on
``tests/data/karpathy_coco_small.json`` (real COCO captions; the test images are the CC-licensed
Karpathy-test photos of tests/data/coco/images) with a tiny random CLIP and a tiny GPT-2 standing in
for RN50x4 and GPT-2, and sizes / steps overridden by flags so it runs in seconds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from capdec.cli import main

KARPATHY = Path(__file__).parent / "data" / "karpathy_coco_small.json"
TEST_IDS = [60623, 189806, 314251, 351530, 479030]
TINY = ["--prefix-length", "4", "--clip-length", "4", "--mapper-depth", "1", "--max-length", "20",
        "--epochs", "2", "--batch-size", "16", "--warmup-steps", "2", "--lr", "1e-3"]


def test_recipe_end_to_end_on_a_karpathy_file(tmp_path, coco_dir, tiny_hf_clip, tiny_gpt2_dir):
    root = tmp_path / "coco"  # as COCO's images unpack: val2014/COCO_val2014_*.jpg
    (root / "val2014").mkdir(parents=True)
    for i in TEST_IDS:
        src = next(p for p in (coco_dir / "images").iterdir() if p.stem.endswith(f"{i:012d}"))
        shutil.copy(src, root / "val2014" / f"COCO_val2014_{i:012d}.jpg")

    train, val, ckpt = tmp_path / "train_store", tmp_path / "val_store", tmp_path / "capdec_coco"
    assert main(["-q", "embed", str(KARPATHY), "--split", "train", "--encoder", tiny_hf_clip, "--out", str(train)]) == 0
    assert main(["-q", "embed", str(KARPATHY), "--split", "val", "--encoder", tiny_hf_clip, "--out", str(val)]) == 0
    assert json.loads((train / "meta.json").read_text())["count"] == 250  # train + restval: 50 images × 5

    assert main(["-q", "train", str(train), "--recipe", "capdec-coco", "--val-store", str(val),
                 "--lm", str(tiny_gpt2_dir), "--out", str(ckpt), *TINY]) == 0
    config = json.loads((ckpt / "config.json").read_text())
    model, opt = config["model"], config["train"]
    # the recipe's values where no flag was given ...
    assert (model["mapper"], model["mapper_variant"], model["mapper_heads"], model["freeze_lm"]) == \
        ("transformer", "clipcap", 8, False)
    assert (opt["weight_decay"], opt["grad_clip"], opt["schedule"]) == (0.0, 0.0, "linear")
    assert config["noise"]["variance"] == 0.016 and config["noise"]["normalize"] is True
    # ... and the flags' where they were
    assert (model["prefix_length"], model["mapper_depth"], opt["batch_size"], opt["epochs"]) == (4, 1, 16, 2)
    assert model["lm"] == str(tiny_gpt2_dir)
    assert config["data"]["val"] == 40 and opt["val_store"] == str(val)  # validated on the val split's captions
    for kept in ("epoch001", "epoch002", "best"):
        assert (tmp_path / f"capdec_coco-{kept}" / "model.safetensors").is_file()
    best = json.loads((tmp_path / "capdec_coco-best" / "config.json").read_text())
    rows = [json.loads(r) for r in (ckpt / "metrics.jsonl").read_text().splitlines()]
    assert best["val_loss"] == min(r["val_loss"] for r in rows if "val_loss" in r)

    preds = tmp_path / "preds.json"
    assert main(["-q", "caption", str(ckpt), "--dataset", str(KARPATHY), "--split", "test", "--images-root",
                 str(root), "--out", str(preds), "--device", "cpu", "--workers", "0", "--beam-size", "2"]) == 0
    assert sorted(p["image_id"] for p in json.loads(preds.read_text())) == TEST_IDS  # the dataset's ids

    metrics = tmp_path / "metrics.json"
    assert main(["-q", "evaluate", str(preds), "--references", str(KARPATHY), "--split", "test", "--strict",
                 "--metrics", "Bleu,ROUGE_L,CIDEr", "--out", str(metrics)]) == 0
    scores = json.loads(metrics.read_text())
    assert scores["n_images"] == 5 and all(isinstance(scores[k], float) for k in ("Bleu_4", "ROUGE_L", "CIDEr"))


def test_recipe_values_yield_to_explicit_flags_and_a_missing_image_is_skipped(tmp_path, coco_dir, tiny_hf_clip,
                                                                              tiny_gpt2_dir, capsys):
    store, ckpt = tmp_path / "store", tmp_path / "ckpt"
    assert main(["-q", "embed", str(KARPATHY), "--split", "val", "--encoder", tiny_hf_clip, "--out", str(store)]) == 0
    # a fine-tuning recipe without a checkpoint to fine-tune
    assert main(["train", str(store), "--recipe", "capdec-style", "--out", str(ckpt)]) == 2
    assert "--init-from" in capsys.readouterr().err
    assert main(["-q", "train", str(store), "--recipe", "capdec-flickr30k", "--lm", str(tiny_gpt2_dir), "--out",
                 str(ckpt), "--weight-decay", "0.01", "--no-keep-epochs", "--val-fraction", "0.2", *TINY,
                 "--batch-size", "30"]) == 0
    opt = json.loads((ckpt / "config.json").read_text())["train"]
    assert (opt["weight_decay"], opt["batch_size"], opt["keep_epochs"], opt["keep_best"]) == (0.01, 30, False, True)
    assert not list(tmp_path.glob("ckpt-epoch*")) and (tmp_path / "ckpt-best").is_dir()

    root = tmp_path / "coco"  # only one of the five test images is there
    (root / "val2014").mkdir(parents=True)
    shutil.copy(coco_dir / "images" / "COCO_val2014_000000060623.jpg", root / "val2014")
    out = tmp_path / "preds.jsonl"
    assert main(["caption", str(ckpt), "--dataset", str(KARPATHY), "--images-root", str(root), "--out", str(out),
                 "--device", "cpu", "--workers", "0", "--strategy", "greedy"]) == 1  # 1: some images skipped
    err = capsys.readouterr().err
    assert "skipped 4" in err and "COCO_val2014_000000189806.jpg: not found under --images-root" in err
    assert [json.loads(r)["image_id"] for r in out.read_text().splitlines()] == [60623]
    with pytest.raises(SystemExit) as exit_:  # argparse's usage error: the known splits are listed
        main(["caption", str(ckpt), "--dataset", str(KARPATHY), "--split", "dev", "--images-root", str(root)])
    assert exit_.value.code == 2 and "invalid choice: 'dev'" in capsys.readouterr().err


def test_a_noise_file_keeps_its_variance_under_a_recipe(tmp_path):
    from capdec.calibrate import NOISE_FORMAT
    from capdec.train import plan_training
    from tiny_stores import make_store

    store = make_store(tmp_path / "store")
    noise = tmp_path / "noise.json"
    noise.write_text(json.dumps({"format": NOISE_FORMAT, "epsilon": 0.2, "variance": 0.04, "dim": 16}))
    plan = plan_training(store, tmp_path / "ckpt", recipe="capdec-coco", noise_file=noise,
                         options={"batch_size": 8, "lm": "scratch"})
    assert plan.noise.variance == pytest.approx(0.04) and plan.sources["noise.variance"] == "noise file"
    assert (plan.config.batch_size, plan.config.weight_decay, plan.model_config.prefix_length) == (8, 0.0, 40)


def test_train_help_lists_the_recipes(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in ("capdec-coco", "capdec-flickr30k", "capdec-style"))


def test_batch_sizes_are_the_released_train_pys_and_the_docs_say_so():
    """DavidHuji/CapDec train.py: ``--data COCO`` sets ``args.bs = 30``, ``--data FLICKR`` ``args.bs = 16``.
    The recipes use them, and docs/reproduce.md quotes the same values."""
    import re

    from capdec.recipes import RECIPES

    assert RECIPES["capdec-coco"].train["batch_size"] == 30
    assert RECIPES["capdec-flickr30k"].train["batch_size"] == 16
    doc = (Path(__file__).resolve().parents[1] / "docs" / "reproduce.md").read_text()
    quoted = [int(n) for n in re.findall(r"args\.bs = (\d+)", doc)]
    assert quoted == [RECIPES["capdec-coco"].train["batch_size"], RECIPES["capdec-flickr30k"].train["batch_size"]]
    assert "| epochs / batch | 10 / 30 |" in doc
