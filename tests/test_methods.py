"""Beyond CapDec: projection (DeCap), centering (C3), retrieval (IFCap), through the CLI, and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from capdec.caption import Captioner
from capdec.checkpoint import load_checkpoint
from capdec.cli import main
from capdec.retrieval import frequent_words

TINY = ["--prefix-length", "4", "--mapper-depth", "1", "--mapper-heads", "2", "--max-length", "24", "--lm-dim", "32",
        "--lm-depth", "1", "--lm-heads", "2", "--vocab-size", "400", "--epochs", "2", "--batch-size", "32"]


@pytest.fixture(scope="module")
def photos(coco_dir, tmp_path_factory) -> Path:
    """Three real CC-licensed COCO photos (attribution: tests/data/coco/README.md)."""
    import shutil

    d = tmp_path_factory.mktemp("photos")
    for p in sorted((coco_dir / "images").glob("*.jpg"))[:3]:
        shutil.copy(p, d / p.name)
    return d


def caption_jsonl(ckpt: Path, photos: Path, *extra: str) -> list[dict]:
    out = ckpt.parent / f"{ckpt.name}-captions.jsonl"
    assert main(["-q", "caption", str(ckpt), str(photos), "--out", str(out), "--strategy", "greedy",
                 "--max-length", "8", *extra]) == 0
    return [json.loads(r) for r in out.read_text().splitlines()]


def test_projection_saved_memory_and_caption_override(tmp_path, hf_store, photos):
    ckpt = tmp_path / "proj"
    assert main(["-q", "train", str(hf_store), "--out", str(ckpt), "--project", "--tau", "0.05", *TINY]) == 0
    ck = load_checkpoint(ckpt, device="cpu")
    assert ck.inference.project and ck.inference.tau == 0.05
    assert ck.memory is not None and len(ck.memory) == ck.config["data"]["train"]
    # the projected query is a softmax mix of memory rows: it lies in their span, unlike the raw image embedding
    v = torch.nn.functional.normalize(torch.randn(3, ck.model_config.embed_dim), dim=-1)
    q = Captioner(ck).prepare(v)
    raw = Captioner(ck, project=False).prepare(v)
    nearest = ck.memory.search(q, 1)[0][:, 0]
    assert (nearest > ck.memory.search(raw, 1)[0][:, 0]).all()
    rows = caption_jsonl(ckpt, photos)
    assert len(rows) == 3 and all(isinstance(r["caption"], str) for r in rows)
    # a store can serve as the memory at caption time, and projection can be switched off
    assert len(caption_jsonl(ckpt, photos, "--memory", str(hf_store), "--no-project")) == 3


def test_centering_records_means_and_needs_image_mean(tmp_path, hf_store, photos):
    dim = json.loads((hf_store / "meta.json").read_text())["dim"]
    mean_file = tmp_path / "image_mean.npy"
    np.save(mean_file, np.full(dim, 0.01, dtype=np.float32))
    ckpt = tmp_path / "c3"
    assert main(["-q", "train", str(hf_store), "--out", str(ckpt), "--center", "--image-mean", str(mean_file),
                 *TINY]) == 0
    ck = load_checkpoint(ckpt, device="cpu")
    assert ck.noise.center and len(ck.noise.text_mean) == dim
    assert ck.inference.image_mean == pytest.approx([0.01] * dim)
    assert len(caption_jsonl(ckpt, photos)) == 3


def test_retrieval_with_entities_trains_and_captions(tmp_path, hf_store, photos):
    ckpt = tmp_path / "ifcap"
    assert main(["-q", "train", str(hf_store), "--out", str(ckpt), "--retrieval-k", "4", "--entity-slots", "2",
                 *TINY]) == 0
    ck = load_checkpoint(ckpt, device="cpu")
    assert ck.model_config.retrieval_k == 4 and ck.model_config.entity_slots == 2
    assert ck.model.fusion is not None and (ckpt / "memory" / "store" / "captions.jsonl").is_file()
    prefix = Captioner(ck).prefix(torch.nn.functional.normalize(torch.randn(2, ck.model_config.embed_dim), dim=-1))
    assert prefix.shape[1] == ck.model_config.prefix_length + 2
    assert len(caption_jsonl(ckpt, photos)) == 3


def test_frequent_words_filters_by_count_and_stopwords():
    groups = [["a red circle and a blue square", "the red circle", "a red star"], ["one cat", "two dogs"]]
    assert frequent_words(groups, slots=3, min_count=2) == [["red", "circle"], []]


@pytest.mark.parametrize("flags,message", [
    (["--entity-slots", "2"], "entity_slots needs retrieval (retrieval_k > 0)"),  # ModelConfig's own check
    (["--center", "--noise-file", "x.json", "--use-offset"], "cannot be combined"),
    (["--center"], "--center needs --image-mean"),
    (["--project", "--center", "--image-mean", "m.npy"], "cannot be combined"),
    (["--image-mean", "m.npy"], "only makes sense with --center"),
    (["--resume", "--init-from", "x"], "cannot be combined"),
    (["--tau", "0"], "tau (the projection temperature) must be > 0"),  # InferenceConfig's own check
])
def test_invalid_combinations_are_refused(tmp_path, hf_store, capsys, flags, message):
    out = tmp_path / "never"
    assert main(["train", str(hf_store), "--out", str(out), *flags, *TINY]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_retrieval_checkpoint_without_memory_is_refused_clearly(tmp_path, hf_store, photos, capsys):
    import shutil

    ckpt = tmp_path / "ifcap"
    assert main(["-q", "train", str(hf_store), "--out", str(ckpt), "--retrieval-k", "2", *TINY]) == 0
    shutil.rmtree(ckpt / "memory")
    code = main(["caption", str(ckpt), str(photos), "--strategy", "greedy"])
    assert code == 2 and "memory" in capsys.readouterr().err
