"""A text memory larger than RAM: rows read through a store's memory map (and unmapped once read), the
faiss ``ivfpq`` index whose candidates are re-scored exactly, and the training memory of a large corpus
written to disk instead of copied into the heap."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from capdec.memory import MemoryConfig, TextMemory, faiss_available
from capdec.memory.kernels import rescore
from capdec.store import EmbeddingStore

needs_faiss = pytest.mark.skipif(not faiss_available(), reason="faiss is not installed")


def _clustered(n: int, d: int, *, seed: int, clusters: int = 40) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(clusters, d, generator=g), dim=-1)
    return F.normalize(centres[torch.randint(0, clusters, (n,), generator=g)] + 0.3 * torch.randn(n, d, generator=g),
                       dim=-1)


def _store(path: Path, rows: torch.Tensor, dtype: str = "float16") -> Path:
    captions = [f"caption {i}" for i in range(len(rows))]
    EmbeddingStore.from_arrays(captions, rows, encoder_spec={"kind": "test"},
                               encoder_identity={"kind": "test", "dim": rows.shape[1]}).save(path, dtype=dtype)
    return path


def _mapped_kb(path: Path) -> int:
    """Resident kB of this process's memory mappings of the file ``path`` (/proc/self/smaps)."""
    total, inside, target = 0, False, str(path.resolve())
    with open("/proc/self/smaps", encoding="utf-8") as f:
        for line in f:
            first = line.split(maxsplit=1)[0] if line.strip() else ""
            if not first.endswith(":"):  # a mapping's header: addresses, permissions, offset, device, inode, path
                inside = line.rstrip("\n").endswith(target)
            elif inside and first == "Rss:":
                total += int(line.split()[1])
    return total


def _brute(q: torch.Tensor, m: torch.Tensor, k: int) -> np.ndarray:
    s = F.normalize(q.double(), dim=-1) @ m.double().T
    return np.argsort(-s.numpy(), axis=1, kind="stable")[:, :k]


def test_rescore_is_the_exact_top_k_of_the_candidates():
    g = torch.Generator().manual_seed(3)
    m = F.normalize(torch.randn(50, 12, generator=g), dim=-1)
    q = torch.randn(3, 12, generator=g)
    cand = torch.stack([torch.randperm(50, generator=g)[:10] for _ in range(3)])
    cand[1, 4:] = -1  # fewer candidates for the second query
    for k in (4, 12):
        s, idx = rescore(q, cand, m[cand.clamp(min=0)], k)
        for b in range(3):
            mine = [int(c) for c in cand[b] if c >= 0]
            cos = (F.normalize(q[b].double(), dim=0) @ m[mine].double().T).numpy()  # written out, not rescore's
            order = [mine[j] for j in np.argsort(-cos, kind="stable")][:k]
            assert idx[b, : len(order)].tolist() == order
            np.testing.assert_allclose(s[b, : len(order)].numpy(), np.sort(cos)[::-1][:k], atol=1e-6)
            assert (idx[b, len(order):] == -1).all() and torch.isinf(s[b, len(order):]).all()


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="reads /proc/self/smaps (Linux)")
def test_a_memory_over_a_store_reads_through_its_map_and_unmaps_what_it_read(tmp_path):
    """Search, projection and gather over a memory-mapped store give the in-memory results, and leave
    (almost) none of the 16 MB file mapped into this process: a pass over a store larger than RAM does
    not make it resident."""
    rows = _clustered(32768, 256, seed=1)
    path = _store(tmp_path / "store", rows)
    memory = TextMemory.from_store(path, config=MemoryConfig(chunk_size=4096))
    in_ram = TextMemory(np.load(path / "embeddings.npy"), config=MemoryConfig(chunk_size=4096))
    assert memory.mapped and not in_ram.mapped
    file_kb = (path / "embeddings.npy").stat().st_size // 1024
    q = F.normalize(rows[:5] + 0.1 * torch.randn(5, 256), dim=-1)
    got, want = memory.search(q, 7), in_ram.search(q, 7)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    assert _mapped_kb(path / "embeddings.npy") < file_kb // 16
    assert torch.equal(memory.project(q), in_ram.project(q))
    assert _mapped_kb(path / "embeddings.npy") < file_kb // 16
    idx = torch.randint(0, len(rows), (2000,))
    assert torch.equal(memory.gather(idx), in_ram.gather(idx))
    assert _mapped_kb(path / "embeddings.npy") < file_kb // 16
    # the kernels read every row (what was unmapped is mapped again on the next read)
    np.testing.assert_array_equal(got[1].numpy(), _brute(q, rows.half().float(), 7))


@needs_faiss
def test_ivfpq_candidates_are_rescored_exactly(tmp_path):
    m = _clustered(12000, 32, seed=7)
    path = _store(tmp_path / "store", m)
    q = F.normalize(m[:60] + 0.1 * torch.randn(60, 32, generator=torch.Generator().manual_seed(8)), dim=-1)
    exact_s, exact = TextMemory.from_store(path).search(q, 5, backend="torch")

    def recall(idx: torch.Tensor) -> float:
        return float(np.mean([len(set(a) & set(b)) / 5 for a, b in zip(idx.tolist(), exact.tolist())]))

    for nprobe in (8, 16):  # as good as inverted lists holding the rows themselves, from 4-byte codes
        memory = TextMemory.from_store(path, config=MemoryConfig(index="ivfpq", nlist=32, nprobe=nprobe, pq_m=4))
        s, idx = memory.search(q, 5, backend="faiss")
        rows = TextMemory.from_store(path, config=MemoryConfig(index="ivf", nlist=32, nprobe=nprobe))
        assert recall(idx) >= recall(rows.search(q, 5, backend="faiss")[1]) - 0.03 and recall(idx) > 0.85
        found = idx == exact
        torch.testing.assert_close(s[found], exact_s[found], atol=1e-6, rtol=0)  # exact cosines, not code distances
    assert memory.mapped
    # every row a candidate: the exact search's cosines (and rows, up to float ties)
    memory.config = MemoryConfig(index="ivfpq", nlist=32, nprobe=32, pq_m=4, rerank=12000 // 5)
    s, idx = memory.search(q, 5, backend="faiss")
    torch.testing.assert_close(s, exact_s, atol=1e-6, rtol=0)
    assert (idx == exact).float().mean() > 0.99
    # a caption's own row is never its neighbour
    own = torch.arange(60)
    _, idx = memory.search(m[:60], 3, exclude=own, backend="faiss")
    assert not (idx == own[:, None]).any() and (idx >= 0).all()
    # the index holds 4-byte codes, not the rows
    assert memory.faiss_indexes["ivfpq"].ntotal == 12000
    assert memory.nbytes - m.half().numel() * 2 < 12000 * (4 + 8) + 32 * 32 * 4 * 2


@needs_faiss
def test_a_mapped_memory_is_saved_by_linking_its_store_and_loads_its_ivfpq_index(tmp_path):
    path = _store(tmp_path / "store", _clustered(12000, 32, seed=2))
    memory = TextMemory.from_store(path, config=MemoryConfig(index="ivfpq", nlist=16, nprobe=4))
    q = torch.randn(4, 32)
    before = memory.search(q, 5, backend="faiss")
    memory.save(tmp_path / "mem", reference=False)  # self-contained, as a checkpoint's memory/
    own = tmp_path / "mem" / "store"
    for name in ("embeddings.npy", "captions.jsonl", "meta.json"):
        assert (own / name).read_bytes() == (path / name).read_bytes()
        assert (own / name).stat().st_ino == (path / name).stat().st_ino  # a hard link: nothing copied
    assert (tmp_path / "mem" / "index-ivfpq.faiss").is_file()
    back = TextMemory.load(tmp_path / "mem")
    assert back.mapped and "ivfpq" in back.faiss_indexes and back.config.index == "ivfpq"
    after = back.search(q, 5, backend="faiss")
    assert torch.equal(after[1], before[1]) and torch.equal(after[0], before[0])
    assert back.captions[:2] == ["caption 0", "caption 1"]


TINY = ["--prefix-length", "4", "--mapper-depth", "1", "--mapper-heads", "2", "--max-length", "24", "--lm-dim", "32",
        "--lm-depth", "1", "--lm-heads", "2", "--vocab-size", "400", "--max-steps", "3", "--batch-size", "16"]


def _in_file_map(t: torch.Tensor, path: Path) -> bool:
    """Whether the tensor's data lies in this process's memory mapping of the file ``path`` (/proc/self/maps)."""
    ptr, target = t.data_ptr(), str(path.resolve())
    with open("/proc/self/maps", encoding="utf-8") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].rstrip("\n") == target:
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                if lo <= ptr < hi:
                    return True
    return False


def _in_heap_memory(model, data, train_idx, out_dir, dist_info, show_progress):
    """The training memory as capdec built it before: the training rows gathered into one tensor."""
    from capdec.retrieval import RetrievalContext

    memory = TextMemory(data.gather(train_idx, normalized=True), None, data.encoder_identity, validate=False,
                        caption_loader=lambda: list(data.iter_captions(train_idx)))
    return memory, RetrievalContext(memory, model) if model.config.retrieval_k else None


def _spy_memory(monkeypatch) -> list[dict]:
    """Records the memory each training run uses, and whether its rows are in a file mapping, while it runs."""
    import capdec.train.loop as loop

    seen = []
    real = loop._Run.__init__

    def spy(self, *args, **kwargs):
        memory = kwargs["memory"]
        rows = memory.store_path / "embeddings.npy" if memory.store_path else None
        seen.append({"memory": memory, "in_file_map": rows is not None and _in_file_map(memory._emb, rows)})
        real(self, *args, **kwargs)

    monkeypatch.setattr(loop._Run, "__init__", spy)
    return seen


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc/self/maps (Linux)")
def test_retrieval_and_projection_read_the_memory_off_the_heap_with_the_in_heap_results(tmp_path, hf_store,
                                                                                      monkeypatch):
    """--retrieval-k and --project: in training the memory's rows are a memory map of a store written beside
    --out (not a tensor in the heap), at caption time a map of the checkpoint's memory/store; trained
    weights, losses, saved rows, projections and captions are those of the in-heap memory."""
    from safetensors.torch import load_file

    import capdec.train.loop as loop
    from capdec.caption import Captioner
    from capdec.checkpoint import load_checkpoint
    from capdec.cli import main

    seen = _spy_memory(monkeypatch)
    args = [*TINY, "--retrieval-k", "3", "--project", "--tau", "0.05"]
    assert main(["-q", "train", str(hf_store), "--out", str(tmp_path / "off"), *args]) == 0
    monkeypatch.setattr(loop, "_training_memory", _in_heap_memory)
    assert main(["-q", "train", str(hf_store), "--out", str(tmp_path / "in"), *args]) == 0
    off, in_heap = seen
    assert off["memory"].mapped and off["in_file_map"], "the training memory was copied into the heap"
    assert off["memory"].store_path == (tmp_path / ".off.memory").resolve() and not (tmp_path / ".off.memory").exists()
    assert not in_heap["memory"].mapped and not in_heap["in_file_map"]
    losses = [[json.loads(r).get("train_loss") for r in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
              for d in ("off", "in")]
    assert losses[0] == losses[1] and any(x is not None for x in losses[0])
    weights = [load_file(tmp_path / d / "model.safetensors") for d in ("off", "in")]
    assert weights[0].keys() == weights[1].keys() and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    for name in ("embeddings.npy", "captions.jsonl"):
        assert (tmp_path / "off/memory/store" / name).read_bytes() == (tmp_path / "in/memory/store" / name).read_bytes()
    # caption time: the checkpoint's memory is mapped, and gives what the same rows in the heap give
    ck = load_checkpoint(tmp_path / "off", device="cpu")
    assert ck.memory.mapped and _in_file_map(ck.memory._emb, tmp_path / "off/memory/store/embeddings.npy")
    heap = TextMemory.load(tmp_path / "off" / "memory", mmap=False)
    assert not heap.mapped
    v = F.normalize(torch.randn(4, ck.model_config.embed_dim, generator=torch.Generator().manual_seed(0)), dim=-1)
    mapped_c, heap_c = Captioner(ck), Captioner(ck, memory=heap)
    assert torch.equal(mapped_c.prepare(v), heap_c.prepare(v))
    got = mapped_c.caption_embeddings(v, show_progress=False)
    assert got == heap_c.caption_embeddings(v, show_progress=False)
    assert got == Captioner(load_checkpoint(tmp_path / "in", device="cpu")).caption_embeddings(v, show_progress=False)


def test_a_large_training_memory_is_searched_through_ivfpq(tmp_path, hf_store, monkeypatch):
    """Above AUTO_IVF_MIN_ROWS the training memory (still a map of the rows written beside --out) is searched
    through faiss's ivfpq index when faiss is installed; the checkpoint keeps the rows and the index."""
    import capdec.memory
    import capdec.memory.text_memory
    from capdec.cli import main
    from capdec.configs import TrainConfig
    from capdec.train.schedule import split_indices

    for module in (capdec.memory, capdec.memory.text_memory):  # where training and search read the threshold
        monkeypatch.setattr(module, "AUTO_IVF_MIN_ROWS", 100)
    seen = _spy_memory(monkeypatch)
    ckpt = tmp_path / "ifcap"
    assert main(["-q", "train", str(hf_store), "--out", str(ckpt), *TINY, "--retrieval-k", "3"]) == 0
    memory = seen[0]["memory"]
    assert memory.mapped and seen[0]["in_file_map"]
    assert memory.config.index == ("ivfpq" if faiss_available() else "flat")
    assert not (tmp_path / ".ifcap.memory").exists()
    # the saved rows: the training split's rows of the store, L2-normalised, with their captions
    config = json.loads((ckpt / "config.json").read_text())
    store = EmbeddingStore.open(hf_store)
    train_idx, _ = split_indices(len(store), TrainConfig.from_dict(config["train"]))
    saved = EmbeddingStore.open(ckpt / "memory" / "store")
    assert len(saved) == len(train_idx) == config["data"]["train"]
    expect = np.asarray(store.embeddings, dtype=np.float32)[train_idx.numpy()]
    expect /= np.linalg.norm(expect, axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(saved.embeddings, dtype=np.float32), expect, atol=1e-3)
    assert saved.captions == [store.captions[i] for i in train_idx.tolist()]
    if faiss_available():
        assert (ckpt / "memory" / "index-ivfpq.faiss").is_file()
