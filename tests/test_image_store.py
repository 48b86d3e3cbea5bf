"""Image-embedding stores (``capdec embed --modality image``) and the supervised baseline (``capdec train``).

Real COCO photos (CC BY / CC BY-SA, see tests/data/coco/README.md) with their real
captions, encoded by a tiny random CLIP built like a user's local copy.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from capdec.cli import main
from capdec.errors import InputError
from capdec.io import read_image_dataset
from capdec.store import EmbeddingStore


@pytest.fixture(scope="module")
def photo_dataset(coco_dir, tmp_path_factory):
    """A JSONL {image, caption} dataset of the 17 photos + one corrupt and one missing image, and a COCO
    annotation file of the same photos."""
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


def test_read_image_dataset_formats(photo_dataset, coco_dir):
    ds = read_image_dataset(photo_dataset["jsonl"])
    assert len(ds) == 19 and ds.n_captions == 17 * 5 + 2
    assert ds.images[0].file == str(photo_dataset["root"] / "COCO_val2014_000000000257.jpg")
    assert ds.images[0].image_id == 257 and len(ds.images[0].captions) == 5
    coco = read_image_dataset(photo_dataset["coco"], images_root=photo_dataset["root"])
    assert [r.captions for r in coco.images] == [r.captions for r in ds.images[:17]]
    refs = read_image_dataset(coco_dir / "karpathy_test_refs.json", images_root=coco_dir / "images")
    assert len(refs) == 1097 and all(len(r.captions) == 5 for r in refs.images)
    # Karpathy: the test split is the 5 Karpathy-test photos; train = train + restval; ids are cocoids
    test = read_image_dataset(photo_dataset["karpathy"], split="test", images_root=photo_dataset["root"])
    in_test = [n for n in photo_dataset["captions"] if photo_dataset["meta"][n]["in_karpathy_test"]]
    assert len(test) == len(in_test) == 5
    assert [r.image_id for r in test.images] == [photo_dataset["meta"][n]["image_id"] for n in in_test]
    assert test.images[0].file == str(photo_dataset["root"] / in_test[0])  # val2014/ absent: the flat folder
    train = read_image_dataset(photo_dataset["karpathy"], split="train", images_root=photo_dataset["root"])
    assert len(train) == 12 and train.images[0].captions == [" ".join(c.split()) for c in
                                                             photo_dataset["captions"][train.images[0].file.rsplit("/", 1)[-1]]]
    with pytest.raises(InputError, match="no splits"):
        read_image_dataset(photo_dataset["coco"], split="train")
    with pytest.raises(InputError, match="has no 'split' field"):
        read_image_dataset(photo_dataset["jsonl"], split="train")


def test_embed_image_store(photo_dataset, tiny_hf_clip, tmp_path, capsys):
    from capdec.encoders import load_encoder
    from capdec.images import load_image

    out = tmp_path / "img_store"
    assert main(["embed", str(photo_dataset["jsonl"]), "--modality", "image", "--out", str(out),
                 "--encoder", tiny_hf_clip, "--dtype", "float32", "--batch-size", "4"]) == 0
    printed = capsys.readouterr().out
    assert "embedded 17 images (85 captions; 2 unreadable images skipped)" in printed
    assert "broken.jpg" in printed and "missing.jpg" in printed
    store = EmbeddingStore.open(out)
    assert store.modality == "image" and store.meta["format"] == "capdec.embeddings/2"
    # one stored row per image, not per caption
    assert np.load(out / "embeddings.npy").shape == (17, store.dim) and len(store) == 85
    assert store.embeddings.shape == (85, store.dim)
    skipped = {s["image"].rsplit("/", 1)[-1] for s in store.meta["stats"]["skipped_images"]}
    assert skipped == {"broken.jpg", "missing.jpg"}
    # each caption's embedding is its own image's embedding, computed here independently
    enc = load_encoder(tiny_hf_clip, device="cpu")
    names = list(photo_dataset["captions"])
    expect = enc.encode_image([load_image(photo_dataset["root"] / n) for n in names]).numpy()
    for i, rec in enumerate(store.records):
        j = names.index(rec["image"].rsplit("/", 1)[-1])
        assert rec["caption"] in [" ".join(c.split()) for c in photo_dataset["captions"][names[j]]]
        np.testing.assert_allclose(store.embeddings[i], expect[j], atol=1e-5)
    # a rerun is a no-op; the COCO annotation file gives the same store content
    assert main(["-q", "embed", str(photo_dataset["jsonl"]), "--modality", "image", "--out", str(out),
                 "--encoder", tiny_hf_clip, "--dtype", "float32"]) == 0
    assert "up to date" in capsys.readouterr().out
    coco_out = tmp_path / "coco_store"
    assert main(["-q", "embed", str(photo_dataset["coco"]), "--modality", "image", "--images-root",
                 str(photo_dataset["root"]), "--out", str(coco_out), "--encoder", tiny_hf_clip,
                 "--dtype", "float32"]) == 0
    coco_store = EmbeddingStore.open(coco_out)
    assert coco_store.captions == store.captions
    np.testing.assert_allclose(coco_store.embeddings, store.embeddings, atol=1e-6)
    # a damaged row map is refused with a message
    np.save(coco_out / "rows.npy", np.arange(3))
    with pytest.raises(InputError, match="rows.npy: expected 85 row numbers"):
        EmbeddingStore.open(coco_out)
    assert main(["embed", str(photo_dataset["jsonl"]), "--split", "train", "--out", str(tmp_path / "x"),
                 "--encoder", tiny_hf_clip]) == 2


def test_supervised_then_text_finetune(photo_dataset, tiny_hf_clip, hf_store, tmp_path, capsys):
    from capdec.checkpoint import read_config

    img = tmp_path / "img_store"
    assert main(["-q", "embed", str(photo_dataset["jsonl"]), "--modality", "image", "--out", str(img),
                 "--encoder", tiny_hf_clip]) == 0
    model = ["--lm-dim", "32", "--lm-depth", "1", "--lm-heads", "2", "--vocab-size", "300", "--mapper", "mlp",
             "--prefix-length", "2", "--max-length", "40", "--batch-size", "16", "--log-every", "2"]
    sup = tmp_path / "clipcap"
    capsys.readouterr()
    assert main(["train", str(img), "--out", str(sup), "--max-steps", "4", *model]) == 0
    assert "training on image embeddings (supervised, ClipCap) with noise variance 0 (no noise" in capsys.readouterr().err
    cfg = read_config(sup)
    assert cfg["noise"]["variance"] == 0.0 and cfg["data"]["modality"] == "image"
    # noise only when asked
    noisy = tmp_path / "clipcap_noisy"
    assert main(["-q", "train", str(img), "--out", str(noisy), "--max-steps", "2", "--noise-variance", "0.01",
                 *model]) == 0
    assert read_config(noisy)["noise"]["variance"] == 0.01
    # the paper's recipe: pre-train on images, fine-tune on text
    tuned = tmp_path / "tuned"
    assert main(["-q", "train", str(hf_store), "--out", str(tuned), "--init-from", str(sup), "--max-steps", "3",
                 "--batch-size", "16"]) == 0
    cfg = read_config(tuned)
    assert cfg["init_from"] == str(sup) and cfg["noise"]["variance"] == 0.016 and cfg["data"]["modality"] == "text"
    from safetensors.torch import load_file

    before, after = load_file(sup / "model.safetensors"), load_file(tuned / "model.safetensors")
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)


def test_a_recipe_on_an_image_store_trains_without_noise(tmp_path):
    """ClipCap is trained on the embeddings it will caption: a recipe's ε (0.016) is CapDec's text-only
    setting and must not reach an image store; an explicit --noise-variance still does."""
    from capdec.checkpoint import read_config
    from tiny_stores import make_store

    img = make_store(tmp_path / "img", n=60, modality="image")
    tiny = ["--lm", "scratch", "--lm-dim", "32", "--lm-depth", "1", "--lm-heads", "2", "--vocab-size", "300",
            "--prefix-length", "2", "--clip-length", "2", "--mapper-depth", "1", "--max-steps", "1",
            "--batch-size", "8", "--no-keep-epochs", "--no-keep-best"]
    assert main(["-q", "train", str(img), "--recipe", "capdec-coco", "--out", str(tmp_path / "a"), *tiny]) == 0
    cfg = read_config(tmp_path / "a")
    assert cfg["noise"]["variance"] == 0.0
    assert (cfg["train"]["weight_decay"], cfg["model"]["mapper"]) == (0.0, "transformer")  # the rest of the recipe
    assert main(["-q", "train", str(img), "--recipe", "capdec-coco", "--noise-variance", "0.016", "--out",
                 str(tmp_path / "b"), *tiny]) == 0
    assert read_config(tmp_path / "b")["noise"]["variance"] == 0.016
