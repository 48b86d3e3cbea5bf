"""capdec.memory: exact search against brute force, exclusion, chunking, DeCap projection, faiss, captions.

Saving and loading: tests/test_memory_persistence.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from capdec.errors import InputError
from capdec.memory import (
    MemoryConfig,
    TextMemory,
    cosine_topk,
    faiss_available,
    project_exact,
    topk_mass_bound,
)

needs_faiss = pytest.mark.skipif(not faiss_available(), reason="faiss is not installed")


def _unit(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def _brute_topk(q: torch.Tensor, m: torch.Tensor, k: int, exclude: torch.Tensor | None = None):
    s = F.normalize(q.double(), dim=-1) @ m.double().T  # (b, n)
    if exclude is not None:
        s[torch.arange(len(q)), exclude] = -np.inf
    order = np.argsort(-s.numpy(), axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s.numpy(), order, axis=1), order


@pytest.fixture(scope="module")
def data():
    return _unit(3000, 48, seed=1), torch.randn(7, 48, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("backend", ["torch", pytest.param("faiss", marks=needs_faiss)])
def test_search_matches_brute_force(data, backend):
    m, q = data
    memory = TextMemory(m, config=MemoryConfig(backend=backend))
    scores, idx = memory.search(q, 10)
    ref_s, ref_i = _brute_topk(q, m, 10)
    assert scores.shape == idx.shape == (7, 10) and scores.dtype == torch.float32 and idx.dtype == torch.long
    assert (idx.numpy() == ref_i).all()
    np.testing.assert_allclose(scores.numpy(), ref_s, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", pytest.param("faiss", marks=needs_faiss)])
def test_search_float16_storage(data, backend):
    m, q = data
    m16 = m.half()
    scores, idx = TextMemory(m16.numpy(), config=MemoryConfig(backend=backend)).search(q, 5)
    ref_s, ref_i = _brute_topk(q, m16.float(), 5)  # the stored (rounded) vectors are the memory
    assert (idx.numpy() == ref_i).all()
    np.testing.assert_allclose(scores.numpy(), ref_s, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", pytest.param("faiss", marks=needs_faiss)])
def test_exclude_drops_own_row(data, backend):
    m, _ = data
    memory = TextMemory(m, config=MemoryConfig(backend=backend, chunk_size=700))
    own = torch.tensor([0, 5, 699, 700, 2999])
    q = m[own] + 0.01 * torch.randn(5, 48)  # noised copies: each row's nearest item is itself
    _, plain = memory.search(q, 4)
    assert (plain[:, 0] == own).all()
    scores, idx = memory.search(q, 4, exclude=own)
    ref_s, ref_i = _brute_topk(q, m, 4, exclude=own)
    assert (idx.numpy() == ref_i).all() and not (idx == own[:, None]).any()
    np.testing.assert_allclose(scores.numpy(), ref_s, atol=1e-5)
    # negative entries exclude nothing; 2-D exclusion drops several rows
    _, idx2 = memory.search(q, 4, exclude=torch.tensor([[-1, -1]] * 5))
    assert (idx2 == plain).all()
    _, idx3 = memory.search(q, 4, exclude=plain[:, :2])
    assert (idx3[:, :2] == plain[:, 2:]).all()


def test_exclude_more_than_available_pads():
    m = _unit(3, 8)
    scores, idx = TextMemory(m).search(m, 3, exclude=torch.arange(3))
    assert (idx[:, 2] == -1).all() and torch.isinf(scores[:, 2]).all()
    assert (idx[:, :2] >= 0).all() and not (idx[:, :2] == torch.arange(3)[:, None]).any()


def test_chunking_is_identical(data):
    m, q = data
    full_s, full_i = cosine_topk(q, m, 20, chunk_size=len(m))
    for chunk in (5, 7, 256, 2999):
        s, i = cosine_topk(q, m, 20, chunk_size=chunk)
        assert torch.equal(i, full_i)
        torch.testing.assert_close(s, full_s, rtol=0, atol=1e-6)
    full = project_exact(q, m, tau=0.05, chunk_size=len(m))
    for chunk in (5, 7, 256):
        torch.testing.assert_close(project_exact(q, m, tau=0.05, chunk_size=chunk), full, rtol=0, atol=1e-6)
    # float16 storage goes through the reused conversion buffer
    m16 = m.half()
    torch.testing.assert_close(cosine_topk(q, m16, 20, chunk_size=100)[0], cosine_topk(q, m16.float(), 20)[0])


def test_projection_closed_form():
    m, q = _unit(200, 16, seed=3), torch.randn(5, 16)
    for tau in (0.01, 0.1, 1.0):
        w = torch.softmax((F.normalize(q.double(), dim=-1) @ m.double().T) / tau, dim=-1)  # (b, n)
        ref = F.normalize(w @ m.double(), dim=-1)
        out = TextMemory(m, config=MemoryConfig(chunk_size=33)).project(q, tau=tau)
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(out.norm(dim=-1), torch.ones(5))


def test_projection_small_tau_gives_nearest_item(data):
    m, q = data
    memory = TextMemory(m)
    _, nearest = memory.search(q, 1)
    out = memory.project(q, tau=1e-6)
    torch.testing.assert_close(out, m[nearest[:, 0]], atol=1e-6, rtol=0)
    # and a large tau tends to the (normalised) memory mean
    torch.testing.assert_close(memory.project(q, tau=1e4), F.normalize(m.mean(0), dim=0).expand(7, -1),
                               atol=1e-3, rtol=0)


@pytest.mark.parametrize("backend", ["torch", pytest.param("faiss", marks=needs_faiss)])
def test_topk_projection_matches_exact(backend):
    # clustered memory, queries near clusters (like image embeddings near their captions)
    g = torch.Generator().manual_seed(4)
    centres = _unit(50, 64, seed=5)
    m = F.normalize(centres[torch.randint(0, 50, (20000,), generator=g)] + 0.15 * torch.randn(20000, 64, generator=g),
                    dim=-1)
    q = F.normalize(centres[:16] + 0.2 * torch.randn(16, 64, generator=g), dim=-1)
    memory = TextMemory(m, config=MemoryConfig(backend=backend))
    exact = memory.project(q, tau=0.01)
    approx = memory.project(q, tau=0.01, k=256)
    cos = (exact * approx).sum(-1)
    assert cos.min() > 1 - 1e-5, cos
    # the neglected weight really is tiny, and the bound holds
    s = q @ m.T
    w = torch.softmax(s / 0.01, dim=-1)
    neglected = 1 - w.topk(256, dim=-1).values.sum(-1)
    bound = topk_mass_bound(s.topk(256, dim=-1).values, len(m), tau=0.01)
    assert (neglected < 1e-4).all() and (neglected <= bound + 1e-6).all() and (bound < 1e-3).all()
    # while k=1 is just the nearest item (and differs from the exact projection)
    top1 = memory.project(q, tau=0.01, k=1)
    assert ((exact * top1).sum(-1) < 1 - 1e-4).any()


def test_topk_projection_warns_when_k_too_small(caplog):
    m = _unit(2000, 8, seed=11)  # low-dimensional random rows: cosines fall slowly
    memory = TextMemory(m)
    with caplog.at_level("WARNING", logger="capdec.memory"):
        memory.project(torch.randn(2, 8), tau=0.05, k=4)
        memory.project(torch.randn(2, 8), tau=0.05, k=4)
    assert sum("raise k or use k=None" in r.message for r in caplog.records) == 1  # once per memory
    # the bound is honest here too
    q = F.normalize(torch.randn(4, 8), dim=-1)
    s = q @ m.T
    neglected = 1 - torch.softmax(s / 0.05, dim=-1).topk(4, dim=-1).values.sum(-1)
    assert (neglected <= topk_mass_bound(s.topk(4, dim=-1).values, 2000, tau=0.05) + 1e-6).all()
    assert (neglected > 0.01).all()


def test_projection_follows_query_dtype_and_device():
    m = _unit(100, 8).half()
    q = torch.randn(3, 8, dtype=torch.float64)
    memory = TextMemory(m)
    for k in (None, 10):
        out = memory.project(q, k=k)
        assert out.dtype == torch.float64 and out.device == q.device and out.shape == (3, 8)
    assert memory.project(q.half()).dtype == torch.float16


def test_gather_and_captions():
    m = _unit(10, 4)
    memory = TextMemory(m, [f"caption {i}" for i in range(10)])
    idx = torch.tensor([[3, -1], [0, 9]])
    rows = memory.gather(idx)
    assert rows.shape == (2, 2, 4)
    torch.testing.assert_close(rows[0, 0], m[3])
    assert (rows[0, 1] == 0).all()
    assert memory.captions_at(idx) == [["caption 3"], ["caption 0", "caption 9"]]


def test_neighbours_table():
    m = _unit(300, 16, seed=6)
    memory = TextMemory(m)
    scores, idx = memory.neighbours(3, batch_size=64, show_progress=False)
    ref_s, ref_i = _brute_topk(m, m, 3, exclude=torch.arange(300))
    assert (idx.numpy() == ref_i).all()
    np.testing.assert_allclose(scores.numpy(), ref_s, atol=1e-5)


@needs_faiss
def test_ivf_index_recall():
    g = torch.Generator().manual_seed(7)
    centres = _unit(40, 32, seed=8)
    m = F.normalize(centres[torch.randint(0, 40, (8000,), generator=g)] + 0.3 * torch.randn(8000, 32, generator=g),
                    dim=-1)
    q = F.normalize(m[:50] + 0.1 * torch.randn(50, 32, generator=g), dim=-1)
    exact_s, exact = TextMemory(m.half()).search(q, 5)
    memory = TextMemory(m.half(), config=MemoryConfig(index="ivf", nlist=32, nprobe=8))
    assert memory._resolve_backend(None) == "torch"  # auto: a small memory is searched exactly
    _, idx = memory.search(q, 5, backend="faiss")
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(idx.tolist(), exact.tolist())])
    assert recall > 0.6, recall  # approximate, but mostly right
    memory.config = MemoryConfig(index="ivf", nlist=32, nprobe=32)  # every list scanned: exact again
    s, idx = memory.search(q, 5, backend="faiss")
    assert torch.equal(idx, exact)
    torch.testing.assert_close(s, exact_s, atol=1e-6, rtol=0)  # float16 rows stored as they are


def test_auto_backend(monkeypatch):
    import capdec.memory.text_memory as mem

    memory = TextMemory(_unit(300, 8), config=MemoryConfig(index="ivf", nlist=4))
    assert memory._resolve_backend(None) == "torch"
    monkeypatch.setattr(mem, "AUTO_IVF_MIN_ROWS", 200)
    assert memory._resolve_backend(None) == ("faiss")
    assert TextMemory(_unit(300, 8))._resolve_backend(None) == "torch"  # exact search stays on torch
    assert memory._resolve_backend("torch") == "torch"


def test_errors_are_actionable(tmp_path):
    memory = TextMemory(_unit(20, 8), encoder_spec={"backend": "toy"})
    with pytest.raises(InputError, match=r"dimension 16 .* 8-d"):
        memory.search(torch.randn(2, 16), 3)
    with pytest.raises(InputError, match="dimension 16"):
        memory.project(torch.randn(2, 16))
    with pytest.raises(InputError, match="queries\\[None\\]"):
        memory.search(torch.randn(8), 3)
    with pytest.raises(InputError, match="k=21 is more than the 20"):
        memory.search(torch.randn(2, 8), 21)
    with pytest.raises(InputError, match="tau"):
        memory.project(torch.randn(2, 8), tau=0)
    with pytest.raises(InputError, match="NaN"):
        memory.search(torch.full((1, 8), float("nan")), 1)
    with pytest.raises(InputError, match="not L2-normalised"):
        TextMemory(torch.randn(20, 8) * 3)
    with pytest.raises(InputError, match="exclude must have shape"):
        memory.search(torch.randn(2, 8), 3, exclude=torch.tensor([1, 2, 3]))
    with pytest.raises(InputError, match="backend"):
        MemoryConfig(backend="annoy")
    with pytest.raises(InputError, match="ivf"):
        MemoryConfig(backend="torch", index="ivf")
    with pytest.raises(InputError, match="not a text memory"):
        TextMemory.load(tmp_path)


def test_captions_come_from_a_loader_on_first_use():
    """A caption loader (a training corpus, a store's captions.jsonl) is called once, when captions are needed."""
    calls = []

    def loader():
        calls.append(1)
        return [f"caption {i}" for i in range(10)]

    memory = TextMemory(_unit(10, 8), caption_loader=loader)
    assert memory.has_captions and calls == []
    assert memory.search(_unit(1, 8), 2)[0].shape == (1, 2) and calls == []  # searching needs no captions
    assert memory.captions_at(torch.tensor([[3, -1]])) == [["caption 3"]]
    assert memory.captions[9] == "caption 9" and calls == [1]
    assert not TextMemory(_unit(10, 8)).has_captions
    with pytest.raises(InputError, match="not both"):
        TextMemory(_unit(10, 8), ["x"] * 10, caption_loader=loader)
    with pytest.raises(InputError, match="9 captions for 10 embeddings"):
        _ = TextMemory(_unit(10, 8), caption_loader=lambda: ["x"] * 9).captions
