"""Pseudo-pairs (``capdec calibrate --pseudo-pairs``): unlabelled images, each with its K nearest training
captions, as an image embedding store to train on next to the text store.

The toy world's mini-CLIP (``load_encoder("toy")``) embeds rendered toy scenes and toy captions; the nearest
captions are checked against a brute-force cosine written here in numpy from the store's own rows.
"""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest

from capdec.calibrate import (
    PSEUDO_PAIRS,
    calibrate,
    encode_images,
    nearest_captions,
    pseudo_pair_store,
    unlabelled_images,
)
from capdec.cli import main
from capdec.encoders import load_encoder
from capdec.errors import InputError
from capdec.lab import toyworld
from capdec.store import EmbeddingStore, write_store
from capdec.textdata import load_text_data

N_UNLABELLED, N_PAIRED = 10, 3


@pytest.fixture(scope="module")
def encoder():
    return load_encoder("toy", device="cpu")


@pytest.fixture(scope="module")
def world(tmp_path_factory, encoder):
    """A text store of distinct toy captions (float16, as 'capdec embed' writes it), a folder of unlabelled and
    paired scene images, and a pairs file for the paired ones."""
    root = tmp_path_factory.mktemp("pseudo")
    captions = list(dict.fromkeys(toyworld.corpus(300, seed=0)))  # distinct: no tied rows
    text = write_store(root / "text", captions, encoder.encode_text(captions), encoder)
    images = root / "images"
    images.mkdir()
    unlabelled, _ = toyworld.paired(N_UNLABELLED, seed=3, split="train")
    paired, refs = toyworld.test_set(N_PAIRED, seed=4, split="train", n_refs=5)
    for i, im in enumerate(unlabelled):
        im.save(images / f"u{i:02d}.png")
    lines = []
    for i, (im, cs) in enumerate(zip(paired, refs)):
        im.save(images / f"p{i}.png")
        lines += [json.dumps({"image": str(images / f"p{i}.png"), "caption": c}) for c in cs]
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return {"root": root, "text": text, "images": images, "pairs": root / "pairs.jsonl",
            "unlabelled": sorted(images.glob("u*.png")), "paired": sorted(images.glob("p*.png"))}


def brute_force_nearest(v: np.ndarray, store: EmbeddingStore, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Cosine of every image to every stored caption row (float64, numpy), and each image's k nearest rows."""
    rows = np.asarray(store.embeddings, dtype=np.float64)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    v = v / np.linalg.norm(v, axis=1, keepdims=True)
    cos = v @ rows.T  # (n, count)
    return cos, np.argsort(-cos, axis=1, kind="stable")[:, :k]


def test_nearest_captions_are_the_brute_force_nearest(encoder, world):
    store = world["text"]
    v = encode_images(encoder, world["unlabelled"])
    got = nearest_captions(v, store, 4).numpy()
    cos, expect = brute_force_nearest(v.numpy(), store, 4)
    assert got.shape == (N_UNLABELLED, 4) and got.dtype == np.int64
    # nearest first; the float32 search and this float64 one agree (neighbours here are >= 1e-3 apart in cosine)
    assert np.diff(-np.sort(-cos, axis=1)[:, :5], axis=1).max() < -1e-4
    np.testing.assert_array_equal(got, expect)
    assert nearest_captions(v, store, 10_000).shape == (N_UNLABELLED, len(store))  # k is cut to the store
    with pytest.raises(InputError, match="must be >= 1"):
        nearest_captions(v, store, 0)


def test_pseudo_pair_store_rows_records_and_provenance(encoder, world):
    store, k = world["text"], 3
    v = encode_images(encoder, world["unlabelled"])
    names = [p.name for p in world["unlabelled"]]
    pairs = pseudo_pair_store(v, store, k, names=names, source="unlabelled/")
    _, nearest = brute_force_nearest(v.numpy(), store, k)

    assert pairs.modality == "image" and pairs.path is None
    assert len(pairs) == N_UNLABELLED * k and pairs.vectors.shape == (N_UNLABELLED, encoder.dim)
    # the dtype 'capdec embed --modality image' writes by default
    from capdec.image_store import embed_image_dataset

    assert pairs.dtype == pairs.vectors.dtype == inspect.signature(embed_image_dataset).parameters["dtype"].default
    np.testing.assert_array_equal(pairs.vectors, v.numpy().astype(np.float16))  # one row per image
    np.testing.assert_array_equal(pairs.row_index, np.arange(N_UNLABELLED * k) // k)  # image i: rows ik..ik+k-1
    owner = np.arange(len(pairs)) // k
    np.testing.assert_array_equal(np.asarray(pairs.embeddings), v.numpy().astype(np.float16)[owner])
    assert [r["image"] for r in pairs.records] == [names[i] for i in owner]
    rows = np.array([r["store_row"] for r in pairs.records])
    np.testing.assert_array_equal(rows.reshape(N_UNLABELLED, k), nearest)  # image i's k nearest, nearest first
    assert pairs.captions == [store.captions[j] for j in rows]
    assert pairs.encoder_identity == store.encoder_identity and pairs.encoder_spec == store.encoder_spec
    corpus = pairs.meta["corpus"]
    assert corpus["format"] == PSEUDO_PAIRS and corpus["neighbours"] == k and corpus["images"] == N_UNLABELLED
    assert corpus["text_store"] == str(store.path) and corpus["paths"] == ["unlabelled/"]
    assert f"{k} nearest captions" in corpus["description"] and str(store.path) in corpus["description"]
    # without names, an image is its index
    assert [r["image"] for r in pseudo_pair_store(v[:2], store, 1).records] == [0, 1]
    with pytest.raises(InputError, match="image names"):
        pseudo_pair_store(v, store, k, names=names[:-1])
    with pytest.raises(InputError, match="must be >= 1"):
        pseudo_pair_store(v, store, 0)


def test_saved_store_reopens_identically_and_loads_as_training_data(encoder, world, tmp_path):
    store = world["text"]
    v = encode_images(encoder, world["unlabelled"])
    pairs = pseudo_pair_store(v, store, 2, names=[str(p) for p in world["unlabelled"]])
    pairs.save(tmp_path / "pseudo")
    back = EmbeddingStore.open(tmp_path / "pseudo")
    assert back.meta == pairs.meta and back.records == pairs.records
    assert back.modality == "image" and back.dtype == "float16"
    np.testing.assert_array_equal(back.vectors, pairs.vectors)
    np.testing.assert_array_equal(back.row_index, pairs.row_index)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    with pytest.raises(InputError, match="not a complete embedding store"):
        pairs.save(mine, overwrite=True)  # a directory that is not a store is never replaced
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]

    data = load_text_data([store.path, tmp_path / "pseudo"])
    assert len(data) == len(store) + 2 * N_UNLABELLED
    own = np.arange(len(store), len(data))  # the pseudo-pairs' rows, after the text store's
    np.testing.assert_array_equal(data.embeddings_at(own).numpy(), v.numpy().astype(np.float16)[np.arange(20) // 2])
    assert list(data.iter_captions(own)) == pairs.captions


def test_calibrate_takes_the_images_embeddings_instead_of_the_images(encoder, world):
    """The CLI encodes the unlabelled images once and gives their embeddings to calibrate and the pseudo-pairs."""
    paired = world["paired"]
    refs = [[json.loads(line)["caption"] for line in world["pairs"].read_text().splitlines()[5 * i:5 * i + 5]]
            for i in range(N_PAIRED)]
    every = sorted(world["images"].glob("*.png"))  # the paired images too: they count once
    kept = unlabelled_images(every, paired)
    assert kept == world["unlabelled"]
    opts = {"text_store": world["text"], "gap_rank": 4, "gap_neighbours": 3, "gap_shrinkage": 0.0}
    from_paths = calibrate(encoder, paired, refs, extra_images=every, **opts)
    from_embeddings = calibrate(encoder, paired, refs, extra_images=encode_images(encoder, kept), **opts)
    assert from_paths["n_images"] == from_embeddings["n_images"] == N_PAIRED + N_UNLABELLED
    for key in ("image_mean", "offset", "gap_factor", "gap_diag"):
        np.testing.assert_allclose(from_embeddings[key], from_paths[key], atol=1e-9, err_msg=key)


class CountingEncoder:
    """The toy encoder, counting the images it encodes."""

    def __init__(self, encoder):
        self.encoder, self.images = encoder, 0

    def __getattr__(self, name):
        return getattr(self.encoder, name)

    def encode_image(self, images):
        self.images += len(images)
        return self.encoder.encode_image(images)


@pytest.fixture
def counting(monkeypatch, encoder):
    import capdec.encoders

    spy = CountingEncoder(encoder)
    spy.loaded = 0

    def load(*args, **kwargs):
        spy.loaded += 1
        return spy

    monkeypatch.setattr(capdec.encoders, "load_encoder", load)
    return spy


def test_cli_writes_pseudo_pairs_that_train_with_the_text_store(world, tmp_path, counting, capsys):
    noise, pseudo = tmp_path / "noise.json", tmp_path / "pseudo"
    argv = ["-q", "calibrate", str(world["pairs"]), "--encoder", "toy", "--device", "cpu", "--images",
            str(world["images"]), "--store", str(world["text"].path), "--gap-rank", "4", "--gap-neighbours", "3",
            "--pseudo-pairs", str(pseudo), "--out", str(noise)]
    assert main([*argv, "--pseudo-k", "2"]) == 0
    assert f"pseudo-pairs: {N_UNLABELLED} images x 2 nearest captions -> {pseudo}" in capsys.readouterr().out
    assert counting.images == N_PAIRED + N_UNLABELLED  # each image encoded once
    stats = json.loads(noise.read_text())
    assert stats["n_images"] == N_PAIRED + N_UNLABELLED and stats["pseudo_pairs"] == str(pseudo)

    store = EmbeddingStore.open(pseudo)
    assert store.modality == "image" and len(store) == 2 * N_UNLABELLED and store.dtype == "float16"
    # the unlabelled images only (the paired ones in the same folder are left out), each with its 2 nearest
    assert [r["image"] for r in store.records[::2]] == [str(p) for p in world["unlabelled"]]
    v = encode_images(counting.encoder, world["unlabelled"])
    np.testing.assert_array_equal(store.vectors, v.numpy().astype(np.float16))
    _, nearest = brute_force_nearest(v.numpy(), world["text"], 2)
    rows = np.array([r["store_row"] for r in store.records]).reshape(N_UNLABELLED, 2)
    np.testing.assert_array_equal(rows, nearest)
    assert store.captions == [world["text"].captions[j] for j in rows.reshape(-1)]
    data = load_text_data([world["text"].path, pseudo])
    assert len(data) == len(world["text"]) + 2 * N_UNLABELLED

    # an existing store is replaced only with --overwrite
    before = (pseudo / "meta.json").read_bytes()
    assert main([*argv, "--pseudo-k", "1"]) == 2
    assert "already holds an embedding store" in capsys.readouterr().err
    assert (pseudo / "meta.json").read_bytes() == before
    assert main([*argv, "--pseudo-k", "1", "--overwrite"]) == 0
    assert len(EmbeddingStore.open(pseudo)) == N_UNLABELLED


@pytest.mark.parametrize("overwrite", [False, True])
def test_cli_never_writes_over_a_users_directory(world, tmp_path, counting, capsys, overwrite):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    noise = tmp_path / "noise.json"
    argv = ["-q", "calibrate", str(world["pairs"]), "--encoder", "toy", "--images", str(world["images"]),
            "--store", str(world["text"].path), "--pseudo-pairs", str(mine), "--out", str(noise)]
    assert main(argv + ["--overwrite"] * overwrite) == 2
    err = capsys.readouterr().err
    assert "is not a complete embedding store" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"] and (mine / "notes.txt").read_text() == "my notes"
    assert not noise.exists() and counting.loaded == 0  # refused before any work


def test_cli_pseudo_pair_flags_are_checked(world, tmp_path, counting, capsys):
    noise = tmp_path / "noise.json"
    base = ["-q", "calibrate", str(world["pairs"]), "--encoder", "toy", "--out", str(noise)]
    images, store, out = ["--images", str(world["images"])], ["--store", str(world["text"].path)], tmp_path / "p"
    paired_only = tmp_path / "paired_only"  # a folder of the paired images alone
    paired_only.mkdir()
    for p in world["paired"]:
        (paired_only / p.name).write_bytes(p.read_bytes())
    only_pairs = tmp_path / "pairs.jsonl"
    only_pairs.write_text(world["pairs"].read_text().replace(str(world["images"]), str(paired_only)))
    for flags, message in (
            ([*store, "--pseudo-pairs", str(out)], "--pseudo-pairs needs --images (the unlabelled images) and --store"),
            ([*images, "--pseudo-pairs", str(out)], "--pseudo-pairs needs --images (the unlabelled images) and --store"),
            ([*images, *store, "--pseudo-pairs", str(out), "--pseudo-k", "0"], "--pseudo-k must be >= 1, got 0"),
            ([*images, *store, "--pseudo-k", "3"], "--pseudo-k applies to --pseudo-pairs"),
            ([*images, *store, "--overwrite"], "--overwrite applies to --pseudo-pairs"),
            ([*images, *store, "--pseudo-pairs", str(world["text"].path), "--overwrite"], "is the --store it pairs"),
            (["--images", str(paired_only), *store, "--pseudo-pairs", str(out)], "every image of --images")):
        argv = base + flags
        if paired_only.name in flags[1]:
            argv[2] = str(only_pairs)
        assert main(argv) == 2, flags
        err = capsys.readouterr().err
        assert message in err, (flags, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not noise.exists() and not out.exists() and counting.loaded == 0
    assert len(EmbeddingStore.open(world["text"].path)) == len(world["text"])


def test_the_users_workflow_calibrate_then_train_on_captions_and_pseudo_pairs_then_caption(world, tmp_path, capsys):
    """README's commands: calibrate (gap + pseudo-pairs), train on the text store and the pseudo-pairs with the
    gap noise, caption images. The run records both stores, a mixed modality and the gap noise."""
    noise, pseudo, ckpt = tmp_path / "noise.json", tmp_path / "pseudo", tmp_path / "ckpt"
    assert main(["-q", "calibrate", str(world["pairs"]), "--encoder", "toy", "--device", "cpu", "--images",
                 str(world["images"]), "--store", str(world["text"].path), "--gap-rank", "4", "--gap-neighbours", "3",
                 "--pseudo-pairs", str(pseudo), "--out", str(noise)]) == 0
    tiny = ["--batch-size", "8", "--lm-dim", "32", "--lm-depth", "1", "--lm-heads", "2", "--mapper-depth", "1",
            "--prefix-length", "2", "--vocab-size", "200", "--max-steps", "2"]
    assert main(["-q", "train", str(world["text"].path), str(pseudo), "--out", str(ckpt), "--noise-file", str(noise),
                 "--noise-shape", "gap", "--use-offset", *tiny]) == 0
    config = json.loads((ckpt / "config.json").read_text())
    assert config["data"]["stores"] == [str(world["text"].path), str(pseudo)]
    assert config["data"]["modality"] == "mixed" and config["data"]["count"] == len(world["text"]) + 5 * N_UNLABELLED
    assert config["noise"]["shape"] == "gap" and config["noise"]["offset"] is not None
    assert "trained with capdec on **captions and image embeddings together**" in (ckpt / "README.md").read_text()
    capsys.readouterr()
    out = tmp_path / "captions.jsonl"
    assert main(["-q", "caption", str(ckpt), *map(str, world["unlabelled"][:3]), "--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 3
