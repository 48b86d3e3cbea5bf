"""``--overwrite`` replaces an embedding store capdec wrote, and nothing a user put in its directory.

A store directory holds ``meta.json``, ``embeddings.npy``, ``captions.jsonl``, ``rows.npy`` (image and pseudo-pair
stores) and ``token-cache/`` (written by training); an interrupted embed keeps its shards in the sibling
``.STORE.partial/``. Stores here are made by the real commands with the shipped toy CLIP (a text store that
training gave a token cache, an image store whose embed was interrupted and resumed), and every file of a
refused directory is hashed before and after.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from capdec.cli import main
from capdec.encoders import load_encoder
from capdec.encoders.toy import ToyEncoder
from capdec.errors import InputError
from capdec.lab import toyworld
from capdec.store import EmbeddingStore, embed_corpus, write_store
from test_hostile import TINY, cli, one_line

N_PAIRED, N_UNLABELLED = 7, 3


def tree(path: Path) -> dict[str, str]:
    """Every entry under ``path``: a file's sha256, "dir" for a directory."""
    return {str(p.relative_to(path)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*"))}


def add_users_files(store: Path) -> None:
    (store / "notes.txt").write_text("my notes on this store")
    (store / "zz-other-tool").mkdir()
    (store / "zz-other-tool" / "out.csv").write_text("a,b\n")


def ls(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


@pytest.fixture(scope="module")
def encoder():
    return load_encoder("toy", device="cpu")


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    """Through the CLI: two caption corpora; a text store of the first that training gave its token cache; a
    dataset of toy scenes with captions (and unlabelled scenes beside them) and its image store, embedded in
    shards of 2 images, interrupted after 2 batches and resumed, then trained on (a token cache too)."""
    root = tmp_path_factory.mktemp("made")
    for name, seed in (("a.txt", 0), ("b.txt", 1)):
        (root / name).write_text("\n".join(toyworld.corpus(40, seed=seed)) + "\n")
    assert main(["-q", "embed", str(root / "a.txt"), "--out", str(root / "text"), "--encoder", "toy"]) == 0
    assert main(["-q", "train", str(root / "text"), "--out", str(root / "ck"), "--max-steps", "1", *TINY]) == 0

    images = root / "images"
    images.mkdir()
    scenes, refs = toyworld.test_set(N_PAIRED, seed=4, split="train", n_refs=3)
    lines = []
    for i, (im, cs) in enumerate(zip(scenes, refs)):
        im.save(images / f"p{i}.png")
        lines += [json.dumps({"image": f"p{i}.png", "caption": c}) for c in cs]
    (images / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    (images / "fewer.jsonl").write_text("\n".join(lines[:6]) + "\n")  # another dataset: 2 of the images
    for i, im in enumerate(toyworld.paired(N_UNLABELLED, seed=3, split="train")[0]):
        im.save(images / f"u{i}.png")

    args = ["-q", "embed", str(images / "pairs.jsonl"), "--modality", "image", "--encoder", "toy", "--batch-size",
            "2", "--shard-size", "2", "--workers", "0", "--out", str(root / "image")]
    real, calls = ToyEncoder._encode_pixel_batch, [0]

    def dying(self, pixels):
        calls[0] += 1
        if calls[0] > 2:
            raise RuntimeError("the encoder fell over")
        return real(self, pixels)

    ToyEncoder._encode_pixel_batch = dying
    try:
        with pytest.raises(RuntimeError, match="fell over"):
            main(args)
    finally:
        ToyEncoder._encode_pixel_batch = real
    assert ls(root / ".image.partial") == ["manifest.json", "shard-000000.json", "shard-000000.npy",
                                           "shard-000001.json", "shard-000001.npy"]
    assert main(args) == 0
    assert not (root / ".image.partial").exists()
    assert main(["-q", "train", str(root / "image"), "--out", str(root / "ck_image"), "--max-steps", "1",
                 *TINY]) == 0
    # what capdec wrote into them: every name a store can hold
    assert ls(root / "text") == ["captions.jsonl", "embeddings.npy", "meta.json", "token-cache"]
    assert ls(root / "image") == ["captions.jsonl", "embeddings.npy", "meta.json", "rows.npy", "token-cache"]
    return {"root": root, "a": root / "a.txt", "b": root / "b.txt", "text": root / "text", "image": root / "image",
            "images": images, "pairs": images / "pairs.jsonl", "fewer": images / "fewer.jsonl"}


def copy(src: Path, tmp_path: Path, name: str = "store") -> Path:
    return Path(shutil.copytree(src, tmp_path / name))


# -- refused: a store holding what capdec did not write there --------------------------------------------------


@pytest.mark.parametrize("modality", ["text", "image"])
def test_embed_overwrite_refuses_a_store_holding_a_users_file(made, tmp_path, capsys, modality):
    store = copy(made[modality], tmp_path)
    add_users_files(store)
    before, beside = tree(store), ls(tmp_path)
    argv = ([str(made["b"]), "--encoder", "toy"] if modality == "text" else
            [str(made["fewer"]), "--modality", "image", "--encoder", "toy", "--workers", "0"])
    rc, err = cli(capsys, "embed", *argv, "--out", str(store), "--overwrite")
    assert rc == 2
    one_line(err, str(store), "notes.txt", "--overwrite")
    assert tree(store) == before and ls(tmp_path) == beside  # every byte kept; no partial or temporary sibling
    (store / "notes.txt").unlink()
    shutil.rmtree(store / "zz-other-tool")
    rc, err = cli(capsys, "embed", *argv, "--out", str(store), "--overwrite")
    assert rc == 0, err  # what capdec wrote, and nothing else: replaced
    assert ls(store) == (["captions.jsonl", "embeddings.npy", "meta.json"] if modality == "text"
                         else ["captions.jsonl", "embeddings.npy", "meta.json", "rows.npy"])


def test_save_overwrite_refuses_a_store_holding_a_users_file(made, encoder, tmp_path):
    store = copy(made["text"], tmp_path)
    (store / "notes.txt").write_text("my notes")
    before = tree(store)
    captions = ["a red dog", "a blue cat"]
    new = EmbeddingStore.from_arrays(captions, encoder.encode_text(captions), encoder=encoder)
    with pytest.raises(InputError, match=rf"^{store}: is a capdec embedding store that also holds what capdec did "
                                         rf"not write there \(notes.txt\); --overwrite"):
        new.save(store, overwrite=True)
    with pytest.raises(InputError, match="notes.txt"):
        write_store(store, captions, encoder.encode_text(captions), encoder, overwrite=True)
    assert tree(store) == before
    (store / "notes.txt").unlink()
    assert new.save(store, overwrite=True).captions == captions


@pytest.mark.parametrize("modality", ["text", "image"])
def test_a_file_added_while_embedding_is_never_deleted(made, encoder, tmp_path, modality):
    """The store was capdec's alone when the embed started; a file the user puts there while it runs is seen when
    the new store is swapped in: refused, nothing deleted (the finished shards are kept for a rerun)."""
    from capdec.image_store import embed_image_dataset

    store = copy(made[modality], tmp_path)

    class AddingAFile:
        """The toy encoder, writing a user's file into the store as it encodes."""

        def __init__(self, encoder):
            self.encoder = encoder

        def __getattr__(self, name):
            return getattr(self.encoder, name)

        def encode_tokens(self, *args, **kwargs):
            (store / "notes.txt").write_text("written while capdec embeds")
            return self.encoder.encode_tokens(*args, **kwargs)

        def encode_pixels(self, *args, **kwargs):
            (store / "notes.txt").write_text("written while capdec embeds")
            return self.encoder.encode_pixels(*args, **kwargs)

    before = {**tree(store), "notes.txt": hashlib.sha256(b"written while capdec embeds").hexdigest()}
    with pytest.raises(InputError, match=rf"^{store}: .*\(notes.txt\)"):
        if modality == "text":
            embed_corpus(made["b"], store, AddingAFile(encoder), overwrite=True, show_progress=False)
        else:
            embed_image_dataset(made["fewer"], store, AddingAFile(encoder), overwrite=True, num_workers=0,
                                show_progress=False)
    assert tree(store) == before
    assert ls(tmp_path) == [".store.partial", "store"]  # no temporary directory left, the shards for a rerun


def test_calibrate_pseudo_pairs_overwrite_refuses_a_store_holding_a_users_file(made, tmp_path, capsys, monkeypatch):
    import capdec.encoders

    loaded, real = [], capdec.encoders.load_encoder
    monkeypatch.setattr(capdec.encoders, "load_encoder", lambda *a, **k: loaded.append(a) or real(*a, **k))
    pseudo, noise = tmp_path / "pseudo", tmp_path / "noise.json"
    argv = ["calibrate", str(made["pairs"]), "--encoder", "toy", "--images", str(made["images"]), "--store",
            str(made["text"]), "--gap-rank", "2", "--gap-neighbours", "2", "--pseudo-pairs", str(pseudo),
            "--out", str(noise)]
    rc, err = cli(capsys, *argv)
    assert rc == 0, err
    assert ls(pseudo) == ["captions.jsonl", "embeddings.npy", "meta.json", "rows.npy"]
    add_users_files(pseudo)
    before, noise_before = tree(pseudo), noise.read_bytes()
    loaded.clear()
    rc, err = cli(capsys, *argv, "--pseudo-k", "1", "--overwrite")
    assert rc == 2
    one_line(err, str(pseudo), "notes.txt")
    assert tree(pseudo) == before and noise.read_bytes() == noise_before
    assert loaded == []  # refused before any work (no encoder loaded, no image encoded)
    (pseudo / "notes.txt").unlink()
    shutil.rmtree(pseudo / "zz-other-tool")
    rc, err = cli(capsys, *argv, "--pseudo-k", "1", "--overwrite")
    assert rc == 0, err
    assert len(EmbeddingStore.open(pseudo)) == N_UNLABELLED


# -- replaced: what capdec wrote, and nothing else ------------------------------------------------------------


def test_a_text_store_with_its_token_cache_is_replaced(made, tmp_path, capsys):
    store = copy(made["text"], tmp_path)
    rc, err = cli(capsys, "embed", str(made["b"]), "--out", str(store), "--encoder", "toy", "--overwrite")
    assert rc == 0, err
    assert EmbeddingStore.open(store).captions == list(dict.fromkeys(made["b"].read_text().splitlines()))
    assert ls(store) == ["captions.jsonl", "embeddings.npy", "meta.json"]  # the old store's cache went with it


def test_a_resumed_image_store_with_its_token_cache_is_replaced(made, tmp_path, capsys):
    store = copy(made["image"], tmp_path)
    rc, err = cli(capsys, "embed", str(made["fewer"]), "--modality", "image", "--encoder", "toy", "--workers", "0",
                  "--out", str(store), "--overwrite")
    assert rc == 0, err
    new = EmbeddingStore.open(store)
    assert len(new.vectors) == 2 and len(new) == 6
    np.testing.assert_array_equal(new.row_index, [0, 0, 0, 1, 1, 1])
    assert ls(store) == ["captions.jsonl", "embeddings.npy", "meta.json", "rows.npy"]


# -- replaced: a damaged store capdec wrote (a file missing or truncated outside capdec's atomic writes) -----------

DAMAGES = {  # name -> (store, how it is damaged, the file the errors name)
    "embeddings.npy missing": ("text", lambda s: (s / "embeddings.npy").unlink(), "embeddings.npy"),
    "embeddings.npy truncated": ("text", lambda s: truncate(s / "embeddings.npy"), "embeddings.npy"),
    "captions.jsonl missing": ("text", lambda s: (s / "captions.jsonl").unlink(), "captions.jsonl"),
    "rows.npy missing": ("image", lambda s: (s / "rows.npy").unlink(), "rows.npy"),
}


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def embed_argv(made, modality: str) -> list[str]:
    """The embed that made ``made[modality]``."""
    return ([str(made["a"]), "--encoder", "toy"] if modality == "text" else
            [str(made["pairs"]), "--modality", "image", "--encoder", "toy", "--workers", "0"])


def assert_same_store(path: Path, fresh: Path) -> None:
    new, old = EmbeddingStore.open(path), EmbeddingStore.open(fresh)
    assert new.meta["count"] == old.meta["count"] > 0 and new.captions == old.captions
    np.testing.assert_array_equal(np.asarray(new.vectors), np.asarray(old.vectors))
    if old.row_index is not None:
        np.testing.assert_array_equal(new.row_index, old.row_index)


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_embed_overwrite_replaces_a_damaged_store(made, tmp_path, capsys, damage):
    modality, spoil, name = DAMAGES[damage]
    store = copy(made[modality], tmp_path)
    spoil(store)
    rc, err = cli(capsys, "train", str(store), "--out", str(tmp_path / "ck"), "--max-steps", "1", *TINY)
    assert rc == 2  # opening it says what to do: the embed that made it, with --overwrite
    one_line(err, name, f"re-create it with 'capdec embed ... --out {store} --overwrite'")
    before = tree(store)
    rc, err = cli(capsys, "embed", *embed_argv(made, modality), "--out", str(store))
    assert rc == 2  # without --overwrite: refused, nothing touched
    one_line(err, str(store), name, "--overwrite")
    assert tree(store) == before
    rc, err = cli(capsys, "embed", *embed_argv(made, modality), "--out", str(store), "--overwrite")
    assert rc == 0, err
    assert_same_store(store, made[modality])  # the store that embed makes (made[modality]), its cache aside
    assert ls(store) == [n for n in ls(made[modality]) if n != "token-cache"]
    assert ls(tmp_path) == ["store"]  # no partial or temporary sibling left


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_store_holding_a_users_file_is_refused(made, tmp_path, capsys, damage):
    modality, spoil, _ = DAMAGES[damage]
    store = copy(made[modality], tmp_path)
    spoil(store)
    add_users_files(store)
    before = tree(store)
    for overwrite in ([], ["--overwrite"]):
        rc, err = cli(capsys, "embed", *embed_argv(made, modality), "--out", str(store), *overwrite)
        assert rc == 2
        one_line(err, str(store), "notes.txt", "--overwrite replaces only what capdec wrote")
        assert tree(store) == before and ls(tmp_path) == ["store"]  # refused before the work


def test_calibrate_overwrite_replaces_a_damaged_pseudo_pair_store(made, tmp_path, capsys):
    pseudo, fresh = tmp_path / "pseudo", tmp_path / "fresh"
    argv = ["calibrate", str(made["pairs"]), "--encoder", "toy", "--images", str(made["images"]), "--store",
            str(made["text"]), "--gap-rank", "2", "--gap-neighbours", "2", "--out", str(tmp_path / "noise.json")]
    rc, err = cli(capsys, *argv, "--pseudo-pairs", str(pseudo))
    assert rc == 0, err
    shutil.copytree(pseudo, fresh)
    (pseudo / "embeddings.npy").unlink()
    rc, err = cli(capsys, "train", str(made["text"]), str(pseudo), "--out", str(tmp_path / "ck"), "--max-steps", "1",
                  *TINY)
    assert rc == 2  # the command that made it, with --overwrite
    one_line(err, "embeddings.npy", f"re-create it with 'capdec calibrate ... --pseudo-pairs {pseudo} --overwrite'")
    rc, err = cli(capsys, *argv, "--pseudo-pairs", str(pseudo))
    assert rc == 2
    one_line(err, str(pseudo), "embeddings.npy", "--overwrite")
    rc, err = cli(capsys, *argv, "--pseudo-pairs", str(pseudo), "--overwrite")
    assert rc == 0, err
    assert_same_store(pseudo, fresh)


def test_the_lab_remakes_a_damaged_store_it_would_reuse(made, encoder, tmp_path):
    from capdec.corpus import captions_from_list
    from capdec.lab.experiment import embed_store

    store = copy(made["text"], tmp_path)
    captions = EmbeddingStore.open(store).captions
    truncate(store / "captions.jsonl")
    embed_store(store, captions_from_list(captions), encoder.encode_text, encoder)
    new = EmbeddingStore.open(store)  # made again, not reused: the truncated captions.jsonl would not read
    assert new.captions == captions
    np.testing.assert_array_equal(np.asarray(new.embeddings), encoder.encode_text(captions).numpy())
