"""Image-embedding stores (``capdec embed --modality image``) and the supervised baseline (``capdec train``).

Real COCO photos (CC BY / CC BY-SA, see tests/data/coco/README.md) with their real captions (the
``photo_dataset`` fixture), encoded by a tiny random CLIP built like a user's local copy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from capdec.cli import main
from capdec.errors import InputError
from capdec.io import read_image_dataset
from capdec.store import EmbeddingStore


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
    assert "trained with capdec **on image embeddings paired with captions**" in (sup / "README.md").read_text()
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
    assert "trained **on text only** with capdec" in (tuned / "README.md").read_text()
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


# -- a pipeline that resumes and streams ----------------------------------------------------------------
KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from capdec.cli import main
    from capdec.encoders.hf import HFEncoder

    real, calls = HFEncoder._encode_pixel_batch, [0]

    def dying(self, pixels):
        calls[0] += 1
        if calls[0] > int(sys.argv[1]):  # SIGKILL: no exception handler, no cleanup runs
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, pixels)

    HFEncoder._encode_pixel_batch = dying
    main(["-q", "embed", *sys.argv[2:]])
""")


def store_files(directory: Path) -> dict[str, object]:
    """A store's files as bytes (meta.json parsed, without its creation time)."""
    meta = json.loads((directory / "meta.json").read_text())
    meta.pop("created")
    return {"meta": meta, **{name: (directory / name).read_bytes()
                             for name in ("embeddings.npy", "rows.npy", "captions.jsonl")}}


def test_killed_image_embed_resumes_to_the_uninterrupted_store(photo_dataset, tiny_hf_clip, tmp_path, capsys,
                                                               monkeypatch):
    """SIGKILL mid-run, rerun: only the missing shards are encoded and every file is byte-identical to the
    store of an uninterrupted run (which loaded the images without worker processes)."""
    from capdec.encoders.hf import HFEncoder

    # 19 images (17 photos, then a corrupt and a missing file): shards of 4 images, batches of 2
    args = [str(photo_dataset["jsonl"]), "--modality", "image", "--encoder", tiny_hf_clip, "--batch-size", "2",
            "--shard-size", "4", "--dtype", "float32"]
    whole = tmp_path / "whole"
    assert main(["-q", "embed", *args, "--out", str(whole), "--workers", "0"]) == 0

    out = tmp_path / "store"
    # a $TMPDIR too long for a Unix socket's path: the workers must not need one to hand over their batches
    tmp = tmp_path / ("a-long-temporary-directory-name-" * 4)
    tmp.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp)}
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, "5", *args, "--out", str(out), "--workers", "2"],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == -9, proc.stderr
    assert not out.exists()  # killed in the third shard's second batch: two shards were written
    partial = tmp_path / ".store.partial"
    assert sorted(p.name for p in partial.glob("shard-*.npy")) == ["shard-000000.npy", "shard-000001.npy"]

    encoded = []
    real = HFEncoder._encode_pixel_batch
    monkeypatch.setattr(HFEncoder, "_encode_pixel_batch", lambda self, x: encoded.append(len(x)) or real(self, x))
    capsys.readouterr()
    assert main(["embed", *args, "--out", str(out), "--workers", "1"]) == 0
    assert "embedded 17 images (85 captions; 2 unreadable images skipped; 8 resumed)" in capsys.readouterr().out
    # shards 2-4 only, in batches that start at shard starts: [8, 10), [10, 12), ..., then 16 (17 is corrupt)
    assert encoded == [2, 2, 2, 2, 1]
    assert store_files(out) == store_files(whole)
    assert not partial.exists()


def _many_captions_dataset(root: Path, n_images: int, per_image: int) -> Path:
    """``n_images`` small PNGs, each with ``per_image`` distinct captions, as a JSONL {image, caption} dataset."""
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n_images):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / f"{i}.png")
        lines += [json.dumps({"image": f"{i}.png", "caption": f"picture {i} seen in way {j}"}) for j in range(per_image)]
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return root / "pairs.jsonl"


def test_image_store_streams_without_a_per_caption_copy(tmp_path):
    """Embedding, opening and reading batches of an image store whose 48 images have 80,000 captions allocate
    far less than one embedding per caption (the per-caption matrix alone would be 41 MB in float32)."""
    from capdec.encoders import load_encoder
    from capdec.image_store import embed_image_dataset
    from capdec.images import load_image
    from capdec.textdata import load_text_data

    n_images, per_image = 48, 1667
    dataset = read_image_dataset(_many_captions_dataset(tmp_path, n_images, per_image))
    encoder = load_encoder("toy", device="cpu")
    per_caption_bytes = n_images * per_image * encoder.dim * 4
    tracemalloc.start()
    try:
        store = embed_image_dataset(dataset, tmp_path / "store", encoder, dtype="float32", batch_size=16,
                                    shard_size=32, num_workers=0, show_progress=False)
        data = load_text_data([tmp_path / "store"])
        idx = np.random.default_rng(1).integers(0, len(data), 1024)
        batch = data.embeddings_at(idx).numpy()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(store) == n_images * per_image and len(store.vectors) == n_images
    assert peak < per_caption_bytes / 8, f"peak {peak / 1e6:.1f} MB of Python/numpy allocations"
    # caption i's row is the embedding of its own image, computed here without the store
    expect = encoder.encode_image([load_image(tmp_path / f"{i}.png") for i in range(n_images)]).numpy()
    np.testing.assert_allclose(batch, expect[idx // per_image], atol=1e-6)
