"""capdec.memory.persistence: a saved memory is an index over an embedding store; legacy and store directories load."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from capdec.errors import InputError
from capdec.memory import MemoryConfig, TextMemory, faiss_available

needs_faiss = pytest.mark.skipif(not faiss_available(), reason="faiss is not installed")


def _unit(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


@pytest.mark.parametrize("with_index", [False, pytest.param(True, marks=needs_faiss)])
def test_save_load_round_trip(tmp_path, with_index):
    m = _unit(500, 16, seed=9).half()
    captions = [f"a caption number {i} é" for i in range(500)]
    identity = {"name": "toy", "dim": 16}
    memory = TextMemory(m, captions, identity, config=MemoryConfig(nprobe=5))
    if with_index:
        memory.faiss_index("flat", show_progress=False)
    memory.save(tmp_path / "mem")
    assert json.loads((tmp_path / "mem" / "meta.json").read_text())["count"] == 500
    back = TextMemory.load(tmp_path / "mem")
    assert back.dtype == "float16" and len(back) == 500 and back.dim == 16
    assert torch.equal(back.embeddings, m) and back.captions == captions
    assert back.encoder_identity == identity and back.config.nprobe == 5
    assert ("flat" in back._faiss) == with_index
    q = torch.randn(4, 16)
    assert torch.equal(back.search(q, 3, backend="torch")[1], memory.search(q, 3, backend="torch")[1])
    if with_index:
        assert torch.equal(back.search(q, 3, backend="faiss")[1], memory.search(q, 3, backend="torch")[1])
    with pytest.raises(InputError, match="already exists"):
        memory.save(tmp_path / "mem")
    memory.save(tmp_path / "mem", overwrite=True, dtype="float32")
    assert TextMemory.load(tmp_path / "mem").dtype == "float32"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "precious.txt").write_text("x")
    with pytest.raises(InputError, match="not a text memory"):
        memory.save(tmp_path / "other", overwrite=True)
    assert (tmp_path / "other" / "precious.txt").exists()
    # a memory capdec wrote, with a user's file put in it, is not replaced either (the file would go with it)
    mine = tmp_path / "mem" / "notes.txt"
    mine.write_text("mine")
    before = {f.name: f.read_bytes() for f in (tmp_path / "mem").iterdir() if f.is_file()}
    with pytest.raises(InputError, match=r"also holds what capdec did not write there \(notes.txt\)"):
        memory.save(tmp_path / "mem", overwrite=True)
    assert {f.name: f.read_bytes() for f in (tmp_path / "mem").iterdir() if f.is_file()} == before
    mine.unlink()
    memory.save(tmp_path / "mem", overwrite=True)  # as capdec wrote it: replaced
    no_caps = TextMemory(m).save(tmp_path / "nocaps")
    assert TextMemory.load(no_caps).captions is None


def test_from_store(tmp_path):
    from capdec.store import EmbeddingStore

    m = _unit(40, 8, seed=10)
    captions = [f"c{i}" for i in range(40)]
    spec, identity = {"backend": "toy"}, {"backend": "toy", "dim": 8}
    store = EmbeddingStore.from_arrays(captions, m, encoder_spec=spec, encoder_identity=identity)
    saved = store.save(tmp_path / "store", dtype="float16")
    for source in (saved, tmp_path / "store"):
        memory = TextMemory.from_store(source)
        assert len(memory) == 40 and memory.dtype == "float16" and memory.encoder_identity == identity
        assert memory.captions == captions
        assert memory.search(m[:2], 1)[1].flatten().tolist() == [0, 1]
    assert TextMemory.load(tmp_path / "store").captions == captions  # load() also reads stores


def test_a_saved_memory_is_an_index_over_a_store(tmp_path):
    """Saving a memory read from a store writes only meta.json naming that store (path + fingerprint):
    no second copy of the rows; a memory of arrays keeps its rows as an ordinary store in MEM/store/."""
    import hashlib

    from capdec.store import EmbeddingStore

    m = _unit(30, 8, seed=11)
    captions = [f"caption {i}" for i in range(30)]
    identity = {"backend": "toy", "dim": 8}
    EmbeddingStore.from_arrays(captions, m, encoder_spec={"backend": "toy"}, encoder_identity=identity).save(
        tmp_path / "store", dtype="float32")
    TextMemory.from_store(tmp_path / "store", config=MemoryConfig(nprobe=3)).save(tmp_path / "mem")
    assert sorted(p.name for p in (tmp_path / "mem").iterdir()) == ["meta.json"]
    meta = json.loads((tmp_path / "mem" / "meta.json").read_text())
    assert meta["format"] == "capdec.memory/2" and meta["store"] == str((tmp_path / "store").resolve())
    assert meta["store_meta_sha256"] == hashlib.sha256((tmp_path / "store" / "meta.json").read_bytes()).hexdigest()
    back = TextMemory.load(tmp_path / "mem")
    assert torch.equal(back.embeddings, m) and back.captions == captions and back.config.nprobe == 3
    assert back.encoder_identity == identity

    # a memory of arrays holds its rows: MEM/store/ is a store 'capdec embed' would have written
    TextMemory(m, captions, identity).save(tmp_path / "own")
    assert EmbeddingStore.open(tmp_path / "own" / "store").captions == captions
    assert TextMemory.load(tmp_path / "own").captions == captions
    moved = tmp_path / "moved"
    (tmp_path / "own").rename(moved)  # self-contained: still loads after a move
    assert torch.equal(TextMemory.load(moved).embeddings, m)

    # the store re-made (other rows, same shape) or gone: refused, not silently mismatched
    EmbeddingStore.from_arrays(captions[::-1], m.flip(0), encoder_spec={"backend": "toy"},
                               encoder_identity=identity).save(tmp_path / "store", dtype="float32", overwrite=True)
    with pytest.raises(InputError, match="re-made since this memory was saved"):
        TextMemory.load(tmp_path / "mem")
    import shutil

    shutil.rmtree(tmp_path / "store")
    with pytest.raises(InputError, match="is missing"):
        TextMemory.load(tmp_path / "mem")
