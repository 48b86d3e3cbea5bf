"""Embedding store: ``embed_corpus`` (resume, no-op, refusal, atomicity), reading back, ``capdec embed``.

Uses a tiny random-weight transformers CLIP with the real CLIP tokenizer (``tests/tiny_models.py``) and
303 real COCO captions (``tests/data/coco_captions_sample.json``; MS-COCO captions, CC BY 4.0).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from capdec.cli import main
from capdec.corpus import captions_from_list, read_corpus
from capdec.encoders import EncoderMismatchError, load_encoder
from capdec.errors import InputError
from capdec.store import EmbeddingStore, embed_corpus, write_store
from tiny_models import make_tiny_hf_clip

DATA = Path(__file__).parent / "data"
COCO_SAMPLE = DATA / "coco_captions_sample.json"
N_SAMPLE = 303


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory) -> Path:
    return make_tiny_hf_clip(tmp_path_factory.mktemp("tiny_hf_clip"))


@pytest.fixture(scope="session")
def encoder(clip_dir):
    """float32: these tests compare values computed in different batches, which bf16 rounds differently
    (~1e-3); the default precision is tested on its own below."""
    torch.set_num_threads(1)
    return load_encoder(f"hf:{clip_dir}", device="cpu", precision="fp32")


@pytest.fixture(scope="session")
def reference(encoder, tmp_path_factory) -> EmbeddingStore:
    """An uninterrupted float32 run over the COCO sample (shards of 64, batches of 32)."""
    out = tmp_path_factory.mktemp("ref") / "store"
    return embed_corpus(COCO_SAMPLE, out, encoder, dtype="float32", batch_size=32, shard_size=64,
                        show_progress=False)


class Counting:
    """Wraps an encoder: counts encoded captions; raises ``exc`` on the ``fail_at``-th shard.

    ``embed_corpus`` tokenises a shard and encodes it with one ``encode_tokens`` call."""

    def __init__(self, inner, *, fail_at: int | None = None, exc: BaseException = KeyboardInterrupt(),
                 identity: dict | None = None):
        self.inner, self.fail_at, self.exc, self._identity = inner, fail_at, exc, identity
        self.calls = 0
        self.encoded = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    @property
    def identity(self):
        return self._identity if self._identity is not None else self.inner.identity

    def encode_tokens(self, tokens, **kwargs):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise self.exc
        self.encoded += len(tokens)
        return self.inner.encode_tokens(tokens, **kwargs)


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


# -- building and reading a store ---------------------------------------------------------------------

def test_store_contents_match_the_encoder(reference, encoder):
    store = EmbeddingStore.open(reference.path)
    corpus = read_corpus(COCO_SAMPLE)
    assert len(store) == N_SAMPLE and store.dim == encoder.dim == 32
    assert store.captions == corpus.captions
    assert store.records[0] == {"caption": corpus.captions[0], **corpus.meta[0]}
    assert store.embeddings.dtype == np.float32 and store.embeddings.shape == (N_SAMPLE, 32)
    assert isinstance(store.embeddings, np.memmap)
    direct = encoder.encode_text(corpus.captions[:64], batch_size=32)
    torch.testing.assert_close(store.tensor()[:64], direct, atol=1e-5, rtol=0)  # batching differs: float noise only
    torch.testing.assert_close(store.tensor(), encoder.encode_text(corpus.captions), atol=1e-5, rtol=0)
    assert store.tensor(torch.float16).dtype == torch.float16

    meta = json.loads((reference.path / "meta.json").read_text())
    assert meta["format"] == "capdec.embeddings/1"
    assert meta["encoder"] == encoder.spec and meta["encoder_identity"] == encoder.identity
    assert meta["count"] == N_SAMPLE and meta["dim"] == 32 and meta["normalized"] is True
    assert meta["dtype"] == "float32"
    assert meta["corpus"]["sha256"] == read_corpus(COCO_SAMPLE).sha256
    assert meta["corpus"]["format"] == "coco" and meta["corpus"]["dedupe"] is False
    assert meta["stats"] == {"read": N_SAMPLE, "empty_skipped": 0, "duplicates_removed": 0, "too_long": 0,
                             "truncated": 0}
    assert meta["capdec_version"] and meta["created"]
    assert store.encoder_spec == encoder.spec and store.encoder_identity == encoder.identity
    store.check_encoder(encoder)
    assert not (reference.path.parent / ".store.partial").exists()  # work dir cleaned up


def test_float16_on_disk(reference, encoder, tmp_path):
    store = embed_corpus(COCO_SAMPLE, tmp_path / "s16", encoder, batch_size=32, shard_size=64, show_progress=False)
    assert store.meta["dtype"] == "float16"
    assert np.load(tmp_path / "s16" / "embeddings.npy").dtype == np.float16
    np.testing.assert_allclose(store.embeddings.astype(np.float32), reference.embeddings, atol=1e-3, rtol=0)
    assert store.tensor().dtype == torch.float32
    size16 = (tmp_path / "s16" / "embeddings.npy").stat().st_size
    assert size16 < 0.55 * (reference.path / "embeddings.npy").stat().st_size


def test_truncation_is_counted_and_done_by_the_tokenizer(encoder, tmp_path):
    long_caption = " ".join(["a very long caption about a dog"] * 20)  # ~140 tokens > 77
    corpus = captions_from_list(["A dog.", long_caption, "A cat."])
    store = embed_corpus(corpus, tmp_path / "s", encoder, dtype="float32", show_progress=False)
    assert store.meta["stats"]["truncated"] == 1
    assert store.captions[1] == long_caption  # the stored text is never cut
    assert np.isfinite(store.embeddings).all()
    # what the tokenizer sees is the first 77 tokens: a longer tail changes nothing
    longer = long_caption + " and then much more text that falls beyond the context"
    torch.testing.assert_close(encoder.encode_text([longer]), store.tensor()[1:2], atol=1e-5, rtol=0)


# -- resume ---------------------------------------------------------------------------------------

def test_interrupted_run_resumes_and_matches_an_uninterrupted_run(reference, encoder, tmp_path, caplog):
    out = tmp_path / "store"
    partial = tmp_path / ".store.partial"
    # shards of 64 captions: shard 2 fails
    broken = Counting(encoder, fail_at=3)
    with pytest.raises(KeyboardInterrupt):
        embed_corpus(COCO_SAMPLE, out, broken, dtype="float32", batch_size=32, shard_size=64, show_progress=False)
    assert not out.exists()  # never half-written under the final name
    assert sorted(p.name for p in partial.glob("shard-*.npy")) == ["shard-000000.npy", "shard-000001.npy"]

    again = Counting(encoder)
    with caplog.at_level(logging.INFO, logger="capdec"):
        store = embed_corpus(COCO_SAMPLE, out, again, dtype="float32", batch_size=32, shard_size=64,
                             show_progress=False)
    assert "2 of 5 shards (128 captions) already embedded" in caplog.text
    assert again.encoded == N_SAMPLE - 128  # only the remaining shards were computed
    assert store.embed_run.encoded == N_SAMPLE - 128 and store.embed_run.resumed == 128
    assert np.array_equal(np.asarray(store.embeddings), np.asarray(reference.embeddings))
    assert store.captions == reference.captions
    assert not partial.exists()


def test_partial_from_another_encoder_is_discarded(encoder, tmp_path, caplog):
    out = tmp_path / "store"
    other = Counting(encoder, fail_at=3, identity={**encoder.identity, "weights_sha256": "something else"})
    with pytest.raises(KeyboardInterrupt):
        embed_corpus(COCO_SAMPLE, out, other, batch_size=32, shard_size=64, show_progress=False)
    assert (tmp_path / ".store.partial" / "shard-000000.npy").exists()
    again = Counting(encoder)
    with caplog.at_level(logging.WARNING, logger="capdec"):
        embed_corpus(COCO_SAMPLE, out, again, batch_size=32, shard_size=64, show_progress=False)
    assert "different corpus, encoder or shard size; starting over" in caplog.text
    assert again.encoded == N_SAMPLE


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    from capdec.encoders import load_encoder
    from capdec.store import embed_corpus

    enc = load_encoder("hf:" + sys.argv[1], device="cpu", precision="fp32")
    calls = 0
    original = enc.encode_tokens

    def encode_tokens(tokens, **kw):  # called once per shard
        global calls
        calls += 1
        if calls == 2:  # SIGKILL: no exception handler, no cleanup runs
            os.kill(os.getpid(), signal.SIGKILL)
        return original(tokens, **kw)

    enc.encode_tokens = encode_tokens
    embed_corpus(sys.argv[2], sys.argv[3], enc, dtype="float32", batch_size=32, shard_size=64,
                 show_progress=False)
""")


@pytest.mark.slow  # a fresh interpreter importing torch + transformers: ~10-20 s on a busy machine
def test_killed_process_leaves_no_store_and_the_rerun_resumes(reference, encoder, clip_dir, tmp_path):
    out = tmp_path / "store"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(clip_dir), str(COCO_SAMPLE), str(out)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    assert not out.exists()
    assert (tmp_path / ".store.partial" / "shard-000000.npy").exists()
    again = Counting(encoder)
    store = embed_corpus(COCO_SAMPLE, out, again, dtype="float32", batch_size=32, shard_size=64,
                         show_progress=False)
    assert again.encoded == N_SAMPLE - 64
    assert np.array_equal(np.asarray(store.embeddings), np.asarray(reference.embeddings))


# -- existing stores --------------------------------------------------------------------------------

def test_finished_store_is_a_no_op(reference, encoder, caplog):
    before = snapshot(reference.path)
    mtimes = [p.stat().st_mtime_ns for p in reference.path.iterdir()]
    counting = Counting(encoder)
    with caplog.at_level(logging.INFO, logger="capdec"):
        store = embed_corpus(COCO_SAMPLE, reference.path, counting, dtype="float32", show_progress=False)
    assert counting.encoded == 0 and store.embed_run.up_to_date
    assert "is up to date" in caplog.text
    assert snapshot(reference.path) == before
    assert [p.stat().st_mtime_ns for p in reference.path.iterdir()] == mtimes


def test_store_from_another_corpus_or_encoder_is_refused(reference, encoder, tmp_path):
    before = snapshot(reference.path)
    with pytest.raises(InputError, match=r"different corpus \(or reader options\).*--overwrite"):
        embed_corpus(COCO_SAMPLE, reference.path, encoder, dtype="float32", dedupe=True, show_progress=False)
    other = Counting(encoder, identity={**encoder.identity, "weights_sha256": "0" * 16})
    with pytest.raises(InputError, match="different encoder"):
        embed_corpus(COCO_SAMPLE, reference.path, other, dtype="float32", show_progress=False)
    with pytest.raises(InputError, match=r"dtype float32 \(asked for float16\)"):
        embed_corpus(COCO_SAMPLE, reference.path, encoder, dtype="float16", show_progress=False)
    assert snapshot(reference.path) == before


def test_the_text_precision_is_recorded_and_never_mixed(clip_dir, reference, encoder, tmp_path, caplog):
    bf16 = load_encoder(f"hf:{clip_dir}", device="cpu", precision="bf16")
    out, opts = tmp_path / "store", {"dtype": "float32", "batch_size": 32, "shard_size": 64, "show_progress": False}
    # shards of an interrupted bf16 run are not resumed by a float32 run
    with pytest.raises(KeyboardInterrupt):
        embed_corpus(COCO_SAMPLE, out, Counting(bf16, fail_at=2), **opts)
    with caplog.at_level(logging.WARNING, logger="capdec"):
        store = embed_corpus(COCO_SAMPLE, out, encoder, **opts)
    assert "starting over" in caplog.text and store.embed_run.resumed == 0
    assert store.meta["precision"] == "float32" == reference.meta["precision"]
    assert np.array_equal(np.asarray(store.embeddings), np.asarray(reference.embeddings))

    with pytest.raises(InputError, match=r"text computed in float32 \(asked for bfloat16; --precision\)"):
        embed_corpus(COCO_SAMPLE, out, bf16, **opts)
    store = embed_corpus(COCO_SAMPLE, out, bf16, overwrite=True, **opts)
    assert store.meta["precision"] == "bfloat16"
    assert (store.tensor() * reference.tensor()).sum(1).min() >= 0.999

    # a store made before the precision was recorded is up to date for any precision
    meta = json.loads((out / "meta.json").read_text())
    del meta["precision"]
    (out / "meta.json").write_text(json.dumps(meta))
    assert embed_corpus(COCO_SAMPLE, out, encoder, **opts).embed_run.up_to_date


def test_overwrite_replaces_and_failed_runs_leave_the_old_store(encoder, tmp_path):
    out = tmp_path / "store"
    txt = tmp_path / "c.txt"
    txt.write_text("A dog.\nA cat.\nA bird.\n")
    embed_corpus(txt, out, encoder, show_progress=False)
    before = snapshot(out)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"caption": "ok"}\n{"caption": \n')
    with pytest.raises(InputError, match=r"bad\.jsonl: line 2"):
        embed_corpus(bad, out, encoder, overwrite=True, show_progress=False)
    failing = Counting(encoder, fail_at=2, exc=RuntimeError("GPU fell over"))
    with pytest.raises(RuntimeError, match="GPU fell over"):
        embed_corpus(COCO_SAMPLE, out, failing, overwrite=True, shard_size=64, show_progress=False)
    assert snapshot(out) == before
    assert EmbeddingStore.open(out).captions == ["A dog.", "A cat.", "A bird."]

    store = embed_corpus(COCO_SAMPLE, out, encoder, overwrite=True, batch_size=64, show_progress=False)
    assert len(store) == N_SAMPLE
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no leftovers


def test_a_directory_that_is_not_a_store_is_never_replaced(encoder, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    for overwrite in (False, True):
        with pytest.raises(InputError, match="not a complete embedding store"):
            embed_corpus(COCO_SAMPLE, out, encoder, overwrite=overwrite, show_progress=False)
    assert (out / "notes.txt").read_text() == "precious"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert len(embed_corpus(COCO_SAMPLE, empty, encoder, show_progress=False)) == N_SAMPLE


def test_bad_arguments(encoder, tmp_path):
    with pytest.raises(InputError, match="unknown store dtype 'bfloat16'"):
        embed_corpus(COCO_SAMPLE, tmp_path / "s", encoder, dtype="bfloat16")
    with pytest.raises(InputError, match="no captions to embed"):
        embed_corpus(captions_from_list(["", " "]), tmp_path / "s", encoder)
    with pytest.raises(TypeError, match="captions_from_list"):
        embed_corpus(["A dog.", 3], tmp_path / "s", encoder)
    assert not (tmp_path / "s").exists()


# -- opening damaged or foreign directories ---------------------------------------------------------

def _copy_store(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for name, data in snapshot(src).items():
        (dst / name).write_bytes(data)
    return dst


def test_open_gives_clear_errors(reference, tmp_path):
    with pytest.raises(InputError, match="no such embedding store"):
        EmbeddingStore.open(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(InputError, match="not an embedding store, no meta.json.*capdec embed"):
        EmbeddingStore.open(tmp_path / "plain")

    newer = _copy_store(reference.path, tmp_path / "newer")
    meta = json.loads((newer / "meta.json").read_text())
    (newer / "meta.json").write_text(json.dumps({**meta, "format": "capdec.embeddings/3"}))
    with pytest.raises(InputError, match="format 'capdec.embeddings/3' is not supported.*upgrade capdec"):
        EmbeddingStore.open(newer)

    foreign = _copy_store(reference.path, tmp_path / "foreign")
    (foreign / "meta.json").write_text(json.dumps({"format": "something/1"}))
    with pytest.raises(InputError, match="not an embedding store meta file"):
        EmbeddingStore.open(foreign)

    incomplete = _copy_store(reference.path, tmp_path / "incomplete")
    (incomplete / "embeddings.npy").unlink()
    with pytest.raises(InputError, match="incomplete embedding store, embeddings.npy is missing"):
        EmbeddingStore.open(incomplete)

    short = _copy_store(reference.path, tmp_path / "short")
    np.save(short / "embeddings.npy", np.zeros((10, 32), np.float32))
    with pytest.raises(InputError, match=r"shape \(10, 32\) but meta.json says \(303, 32\)"):
        EmbeddingStore.open(short)

    fewer = _copy_store(reference.path, tmp_path / "fewer")
    lines = (fewer / "captions.jsonl").read_text().splitlines()[:-1]
    (fewer / "captions.jsonl").write_text("\n".join(lines) + "\n")
    store = EmbeddingStore.open(fewer)
    with pytest.raises(InputError, match="302 captions but the store holds 303 embeddings"):
        _ = store.captions


def test_open_hints_at_an_unfinished_run(encoder, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        embed_corpus(COCO_SAMPLE, tmp_path / "store", Counting(encoder, fail_at=2), shard_size=64,
                     show_progress=False)
    with pytest.raises(InputError, match=r"unfinished run left .*\.store\.partial"):
        EmbeddingStore.open(tmp_path / "store")


def test_check_encoder_refuses_another_encoder(reference, encoder):
    other = Counting(encoder, identity={**encoder.identity, "dim": 64})
    with pytest.raises(EncoderMismatchError, match="dim"):
        reference.check_encoder(other)


# -- embeddings computed elsewhere ------------------------------------------------------------------

def test_write_store_and_from_arrays(encoder, tmp_path):
    captions = ["A dog.", "A cat.", "A bird."]
    emb = encoder.encode_text(captions)
    store = write_store(tmp_path / "s", captions, emb, encoder, records=[{"image_id": i} for i in range(3)],
                        dtype="float32")
    assert store.path == tmp_path / "s"
    assert store.records[2] == {"caption": "A bird.", "image_id": 2}
    assert torch.equal(store.tensor(), emb)
    assert store.meta["corpus"]["format"] == "memory" and store.encoder_identity == encoder.identity
    assert store.meta["stats"] == {"read": 3, "empty_skipped": 0, "duplicates_removed": 0, "truncated": 0}

    corpus = captions_from_list(["A dog.", "", "A cat."])
    mem = EmbeddingStore.from_arrays(corpus, encoder.encode_text(corpus.captions).numpy(),
                                     encoder_spec=encoder.spec, encoder_identity=encoder.identity)
    assert mem.path is None and len(mem) == 2
    assert mem.meta["stats"] == {"read": 3, "empty_skipped": 1, "duplicates_removed": 0, "too_long": 0,
                              "truncated": None}
    saved = mem.save(tmp_path / "m")  # keeps the in-memory dtype unless told otherwise
    assert saved.meta["dtype"] == "float32" and saved.captions == ["A dog.", "A cat."]
    with pytest.raises(InputError, match="already holds an embedding store"):
        mem.save(tmp_path / "m")
    half = mem.save(tmp_path / "m", dtype="float16", overwrite=True)
    assert half.embeddings.dtype == np.float16 and half.meta["dtype"] == "float16"

    with pytest.raises(InputError, match="not L2-normalised"):
        write_store(tmp_path / "x", captions, emb * 3, encoder)
    with pytest.raises(InputError, match=r"do not match 2 captions"):
        write_store(tmp_path / "x", captions[:2], emb, encoder)
    with pytest.raises(TypeError, match="encoder"):
        EmbeddingStore.from_arrays(captions, emb)
    assert not (tmp_path / "x").exists()


# -- the command line -------------------------------------------------------------------------------

def test_cli_embed(clip_dir, reference, tmp_path, capsys):
    out = tmp_path / "store"
    argv = ["embed", str(COCO_SAMPLE), "--out", str(out), "--encoder", f"hf:{clip_dir}", "--dtype", "float32",
            "--batch-size", "32", "--shard-size", "64", "--device", "cpu", "--precision", "fp32"]
    assert main(["-q", *argv]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"embedded {N_SAMPLE} captions (0 empty skipped, 0 duplicates removed, 0 truncated)")
    assert line.endswith(f"-> {out}")
    store = EmbeddingStore.open(out)
    assert np.array_equal(np.asarray(store.embeddings), np.asarray(reference.embeddings))

    assert main(["-q", *argv]) == 0
    assert "is up to date" in capsys.readouterr().out

    assert main(["-q", *argv, "--dedupe"]) == 2
    assert "different corpus" in capsys.readouterr().err
    assert main(["-q", *argv, "--dedupe", "--overwrite"]) == 0
    assert f"embedded {N_SAMPLE - 25} captions (0 empty skipped, 25 duplicates removed" in capsys.readouterr().out


def test_cli_embed_jsonl_field_and_errors(clip_dir, tmp_path, capsys):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "A dog."}\n{"text": ""}\n{"text": "A  dog."}\n{"text": "A cat."}\n')
    out = tmp_path / "store"
    base = ["-q", "embed", str(corpus), "--out", str(out), "--encoder", f"hf:{clip_dir}", "--device", "cpu"]
    assert main(base) == 2
    assert "c.jsonl: line 1: no field 'caption'" in capsys.readouterr().err
    assert main([*base, "--field", "text", "--dedupe"]) == 0
    assert "embedded 2 captions (1 empty skipped, 1 duplicates removed, 0 truncated)" in capsys.readouterr().out
    assert main([*base[:-4], "--encoder", str(tmp_path / "nowhere"), "--overwrite"]) == 2
    assert "error" in capsys.readouterr().err
    assert EmbeddingStore.open(out).captions == ["A dog.", "A cat."]
