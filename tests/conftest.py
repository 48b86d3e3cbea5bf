"""Shared fixtures: tiny real models (session-scoped, built once) and real COCO caption text."""

from __future__ import annotations

import json
import lzma
import os
import shutil
from pathlib import Path

import pytest
import torch

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1") or 1))

COCO_DATA = Path(__file__).resolve().parent / "data" / "coco"  # real COCO captions and photos (see its README)


@pytest.fixture(scope="session")
def coco_dir(tmp_path_factory) -> Path:
    """tests/data/coco unpacked into a session folder: the caption files decompressed (``*.json``), the
    17 CC-licensed photos and their ``captions.json`` / ``images_meta.json`` copied to ``images/``."""
    out = tmp_path_factory.mktemp("coco")
    for packed in sorted(COCO_DATA.glob("*.json.xz")):
        (out / packed.name.removesuffix(".xz")).write_bytes(lzma.decompress(packed.read_bytes()))
    shutil.copytree(COCO_DATA / "images", out / "images")
    return out


@pytest.fixture(scope="session")
def coco_caption_file(coco_dir, tmp_path_factory) -> Path:
    """A text corpus of 300 real COCO captions (MS-COCO captions, CC BY 4.0), one per line."""
    anns = json.loads((coco_dir / "captions_val2017.json").read_text())["annotations"]
    anns = sorted(anns, key=lambda a: a["id"])[:300]
    path = tmp_path_factory.mktemp("corpus") / "coco300.txt"
    path.write_text("".join(a["caption"].strip() + "\n" for a in anns), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_hf_clip(tmp_path_factory) -> str:
    """Spec string of a tiny random transformers CLIP saved like a local snapshot."""
    from tiny_models import make_tiny_hf_clip

    return f"hf:{make_tiny_hf_clip(tmp_path_factory.mktemp('hf_clip'))}"


@pytest.fixture(scope="session")
def tiny_open_clip(tmp_path_factory) -> str:
    """Spec string of a tiny random open_clip model saved like a local copy."""
    pytest.importorskip("open_clip")
    from tiny_models import make_tiny_open_clip

    return make_tiny_open_clip(tmp_path_factory.mktemp("open_clip"))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, coco_caption_file) -> Path:
    """A tiny random GPT-2 with a corpus-trained tokenizer, saved like a local Hugging Face LM."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from capdec.model.lm import train_tokenizer

    out = tmp_path_factory.mktemp("gpt2")
    tok = train_tokenizer(coco_caption_file.read_text().splitlines(), vocab_size=400)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                               eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def hf_store(tmp_path_factory, coco_caption_file, tiny_hf_clip) -> Path:
    """An embedding store of 300 real COCO captions made with the tiny HF CLIP through the CLI."""
    from capdec.cli import main

    out = tmp_path_factory.mktemp("stores") / "hf"
    assert main(["-q", "embed", str(coco_caption_file), "--out", str(out), "--encoder", tiny_hf_clip]) == 0
    return out


@pytest.fixture(scope="session")
def photo_dataset(coco_dir, tmp_path_factory):
    """The 17 COCO photos (CC BY / CC BY-SA) with their real captions: a JSONL {image, caption} dataset
    (+ one corrupt and one missing image), a Karpathy-split file and a COCO annotation file of them."""
    photos = coco_dir / "images"
    caps = json.loads((photos / "captions.json").read_text())
    meta = json.loads((photos / "images_meta.json").read_text())
    root = tmp_path_factory.mktemp("photos")
    for name in caps:
        shutil.copy(photos / name, root / name)
    (root / "broken.jpg").write_bytes(b"not a jpeg at all")
    rows = [{"image": name, "caption": c, "image_id": meta[name]["image_id"]} for name, cs in caps.items() for c in cs]
    rows += [{"image": "broken.jpg", "caption": "a broken file"}, {"image": "missing.jpg", "caption": "nothing"}]
    jsonl = root / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # the Karpathy layout (dataset_coco.json): filepath/filename, split, sentences[].raw, cocoid
    karpathy = root / "dataset_coco.json"
    karpathy.write_text(json.dumps({"dataset": "coco", "images": [
        {"filepath": "val2014", "filename": n, "cocoid": meta[n]["image_id"], "imgid": i,
         "split": "test" if meta[n]["in_karpathy_test"] else ("restval" if i % 2 else "train"),
         "sentences": [{"raw": c, "tokens": c.lower().split()} for c in cs]} for i, (n, cs) in enumerate(caps.items())]}))
    coco = root / "coco.json"
    coco.write_text(json.dumps({
        "images": [{"id": meta[n]["image_id"], "file_name": n} for n in caps],
        "annotations": [{"id": k, "image_id": meta[n]["image_id"], "caption": c}
                        for k, (n, c) in enumerate((n, c) for n, cs in caps.items() for c in cs)]}))
    return {"root": root, "jsonl": jsonl, "coco": coco, "karpathy": karpathy, "captions": caps, "meta": meta}
