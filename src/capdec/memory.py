"""A memory of training-caption text embeddings: nearest-neighbour search and DeCap projection.

Two later methods use such a memory ``M`` (n captions, d dims, L2-normalised rows):

- **DeCap** (ICLR 2023) replaces an image embedding ``v`` by its projection into the text cone,
  ``normalize(Σ_i softmax(cos(v, M) / τ)_i · M_i)`` with ``τ ≈ 0.01`` (:meth:`TextMemory.project`).
- **IFCap** (EMNLP 2024) retrieves the k nearest training captions of a noised text embedding during
  training (excluding the caption itself) and of the image embedding at inference, and fuses them with
  the query (:meth:`TextMemory.search`, :meth:`TextMemory.neighbours`, :meth:`TextMemory.gather`).

::

    memory = TextMemory.from_store("stores/coco-train")          # memory-mapped, nothing copied
    scores, idx = memory.search(image_emb, k=5)                   # (b, 5) cosines, (b, 5) row indices
    v = memory.project(image_emb, tau=0.01)                       # (b, d), exact over all n
    v = memory.project(image_emb, tau=0.01, k=256)                # softmax over the top 256 only
    memory.save("memories/coco-train")                            # meta.json naming the store (+ faiss index)

Exact search and projection run in torch over chunks of the memory (float32 maths whatever the
storage dtype), so a 1M x 512 float16 memory needs its 1 GB plus ~100 MB of work space (measured).
With faiss installed, ``backend="faiss"`` uses an exact ``IndexFlatIP`` (``index="flat"``; a float32
copy of the memory) or an approximate inverted-file index (``index="ivf"``; ``nlist ≈ 4·√n`` lists,
``nprobe`` of them scanned per query) for very large memories -- check its recall on your data
(benchmarks/memory_1m.py prints recall@5 against exact search for a few ``nprobe``).

**Why top-k projection is safe.** With cosines ``s_1 ≥ s_2 ≥ ...`` the weight of item ``j`` relative
to the best one is ``exp(-(s_1 - s_j) / τ)``; with τ = 0.01 an item 0.1 below the best weighs
``e^-10 ≈ 5e-5`` of it, one 0.2 below ``2e-9``. So everything outside the top ``k`` together weighs at
most ``(n - k) · exp(-(s_1 - s_k) / τ)`` of the total (:func:`topk_mass_bound`): once the cosines fall
by ~0.25 within the top few hundred, ``k=256`` reproduces the exact projection to float precision at
the cost of one top-k search instead of a second pass over the memory. The tests check this on
clustered data; on the 1M synthetic benchmark the 256th cosine sits 0.28 below the best and top-256
agrees with the exact projection to a cosine of 1 - 1e-7. Real CLIP memories could not be measured
here: :meth:`TextMemory.project` logs a warning when the bound exceeds 1e-3 (raise ``k``, or use
``k=None``).

Notation: b - batch of queries, n - memory rows, c - rows in one chunk, d - embedding dim, k - results.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from capdec.artifacts import check_rows, load_matrix, read_meta, read_rows
from capdec.configs import MEMORY_BACKENDS as BACKENDS
from capdec.configs import MEMORY_INDEXES as INDEXES
from capdec.configs import MemoryConfig
from capdec.errors import InputError
from capdec.utils import atomic_dir, progress, read_json, write_json

logger = logging.getLogger(__name__)

# A saved memory is an index over an embedding store, not a second copy of the format:
#   MEM/meta.json          capdec.memory/2: the store (a path, and the sha256 of its meta.json so a re-made
#                          store is noticed), the search config, which faiss indexes are saved
#   MEM/store/             only when the memory holds its own rows (a memory of in-memory arrays, a
#                          checkpoint's memory/): an ordinary embedding store (capdec.store)
#   MEM/index-*.faiss      optional faiss indexes
# Embeddings and captions are read through capdec.store (the artefact layer's checks). capdec.memory/1
# directories (embeddings.npy + captions.jsonl beside meta.json, before 0.x) still load.
FORMAT = "capdec.memory/2"
LEGACY_FORMAT = "capdec.memory/1"
META, EMBEDDINGS, CAPTIONS = "meta.json", "embeddings.npy", "captions.jsonl"
OWN_STORE = "store"  # the subdirectory of a memory that holds its own rows
INDEX_FILES = {"flat": "index-flat.faiss", "ivf": "index-ivf.faiss"}
DTYPES = ("float16", "float32")

# backend="auto" uses faiss only for an IVF index over at least this many rows. Exact search stays on
# torch: benchmarks/memory_1m.py (1M x 512 float16, one shared core) measured torch at 0.55 s per
# batch-1 query and 4.2 s per batch of 64, faiss IndexFlatIP at 0.41 s and 24 s (no batching gain in
# the faiss-cpu wheel) after a 16 s build of a 2 GB float32 copy -- not worth doing behind a user's back.
AUTO_IVF_MIN_ROWS = 100_000
# work space per chunk (the float32 copy of the rows and the (b, c) scores); small enough to stay in cache
CHUNK_BYTES = 16 << 20
# row norms further than this from 1 mean the caller forgot to normalise (float16 is ~1e-3 off)


# -- pure functions over tensors -------------------------------------------------------------------

def default_chunk_size(dim: int, batch: int) -> int:
    """Rows per chunk so that the float32 rows plus the (batch, rows) scores take about CHUNK_BYTES."""
    return max(1024, CHUNK_BYTES // (4 * (dim + batch)))


def iter_chunks(memory: torch.Tensor, device: torch.device, chunk_size: int) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(start, rows)`` with ``rows`` a float32 (c, d) block of ``memory`` on ``device``.

    A CPU float16 memory is converted into one reused buffer (fast, no allocation per chunk), so a
    yielded block is only valid until the next one; float32 blocks on the right device are views.
    """
    n, d = memory.shape
    if memory.device == device and memory.dtype == torch.float32:
        for lo in range(0, n, chunk_size):
            yield lo, memory[lo : lo + chunk_size]
        return
    buf = torch.empty(min(chunk_size, n), d, dtype=torch.float32, device=device) if device.type == "cpu" else None
    for lo in range(0, n, chunk_size):
        rows = memory[lo : lo + chunk_size]
        if buf is not None and memory.device.type == "cpu":
            out = buf[: rows.shape[0]]
            out.copy_(rows)
            yield lo, out
        else:
            yield lo, rows.to(device=device, dtype=torch.float32, non_blocking=True)


def cosine_topk(queries: torch.Tensor, memory: torch.Tensor, k: int, *, exclude: torch.Tensor | None = None,
                chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` cosine similarities of ``queries`` (b, d) against the rows of ``memory`` (n, d).

    ``memory`` rows must be L2-normalised (any float dtype, any device); queries are normalised here.
    ``exclude`` (b,) or (b, m) holds row indices to leave out of each query's results (negative = none).
    Returns ``(scores, indices)``, both (b, k), best first, float32 and int64 on the queries' device;
    where fewer than ``k`` rows remain the tail is score ``-inf``, index ``-1``.
    """
    b, device = queries.shape[0], queries.device
    q = F.normalize(queries.float(), dim=-1)  # (b, d)
    ex = _exclude_matrix(exclude, b, device)
    chunk_size = chunk_size or default_chunk_size(memory.shape[1], b)
    best_s = torch.empty(b, 0, device=device)
    best_i = torch.empty(b, 0, dtype=torch.long, device=device)
    for lo, rows in iter_chunks(memory, device, chunk_size):
        s = q @ rows.T  # (b, c)
        if ex is not None:
            _mask_excluded(s, ex, lo)
        s, i = s.topk(min(k, s.shape[1]), dim=1)  # (b, <=k)
        best_s, pos = torch.cat([best_s, s], dim=1).topk(min(k, best_s.shape[1] + s.shape[1]), dim=1)
        best_i = torch.cat([best_i, i + lo], dim=1).gather(1, pos)
    if best_s.shape[1] < k:  # only possible when k > n
        pad = k - best_s.shape[1]
        best_s = torch.cat([best_s, best_s.new_full((b, pad), -math.inf)], dim=1)
        best_i = torch.cat([best_i, best_i.new_full((b, pad), -1)], dim=1)
    best_i = best_i.masked_fill(best_s == -math.inf, -1)
    return best_s, best_i


def project_exact(queries: torch.Tensor, memory: torch.Tensor, *, tau: float = 0.01,
                  chunk_size: int | None = None) -> torch.Tensor:
    """DeCap projection ``normalize(Σ_i softmax(cos(v, M) / τ)_i · M_i)`` over every row of ``memory``.

    The softmax runs chunk by chunk with a running log-sum-exp (maximum, rescaled sum and weighted
    sum), so no (b, n) matrix is formed. Float32 maths; the result has the queries' device and dtype.
    """
    _check_tau(tau)
    b, d = queries.shape
    device = queries.device
    q = F.normalize(queries.float(), dim=-1)  # (b, d)
    chunk_size = chunk_size or default_chunk_size(d, b)
    run_max = torch.full((b, 1), -math.inf, device=device)
    run_sum = torch.zeros(b, 1, device=device)
    acc = torch.zeros(b, d, device=device)
    for _, rows in iter_chunks(memory, device, chunk_size):
        s = (q @ rows.T) / tau  # (b, c)
        new_max = torch.maximum(run_max, s.amax(dim=1, keepdim=True))
        scale = torch.exp(run_max - new_max)  # (b, 1); 0 on the first chunk
        e = torch.exp(s - new_max)  # (b, c)
        acc = acc * scale + e @ rows  # (b, d)
        run_sum = run_sum * scale + e.sum(dim=1, keepdim=True)
        run_max = new_max
    return F.normalize(acc / run_sum, dim=-1).to(queries.dtype)


def project_candidates(scores: torch.Tensor, items: torch.Tensor, *, tau: float = 0.01) -> torch.Tensor:
    """DeCap projection restricted to given candidates: ``normalize(Σ_j softmax(scores / τ)_j · items_j)``.

    ``scores`` (b, k) are the candidates' cosines (``-inf`` = no candidate), ``items`` (b, k, d) their
    embeddings. Used with the top-k of :func:`cosine_topk` / :meth:`TextMemory.search`.
    """
    _check_tau(tau)
    w = torch.softmax(scores.float() / tau, dim=-1)  # (b, k)
    out = torch.einsum("bk,bkd->bd", w, items.float())
    return F.normalize(out, dim=-1)


def topk_mass_bound(scores: torch.Tensor, n: int, *, tau: float = 0.01) -> torch.Tensor:
    """Upper bound on the softmax weight a top-k projection leaves out, per query: (b,).

    ``scores`` (b, k) are the top-k cosines, best first. Every row outside them scores at most
    ``s_k``, so their total weight is at most ``(n - k) · exp((s_k - s_1) / τ)`` times the best
    row's weight, itself at most the total.
    """
    k = scores.shape[1]
    if n <= k:
        return scores.new_zeros(scores.shape[0])
    gap = (scores[:, 0] - scores[:, -1]).float().clamp(min=0)  # -inf padding: no rows left, gap inf
    return ((n - k) * torch.exp(-gap / tau)).clamp(max=1.0)


def _check_tau(tau: float) -> None:
    if not (isinstance(tau, (int, float)) and tau > 0 and math.isfinite(tau)):
        raise InputError(f"projection temperature tau must be a positive number (got {tau!r}); DeCap uses 0.01")


def _exclude_matrix(exclude: torch.Tensor | Sequence[int] | None, b: int, device: torch.device) -> torch.Tensor | None:
    if exclude is None:
        return None
    ex = torch.as_tensor(exclude, device=device)
    if ex.dtype.is_floating_point or ex.dtype == torch.bool:
        raise InputError(f"exclude must hold integer row indices (got dtype {ex.dtype})")
    ex = ex.long()
    if ex.ndim == 1:
        ex = ex[:, None]
    if ex.ndim != 2 or ex.shape[0] != b:
        raise InputError(f"exclude must have shape ({b},) or ({b}, m) for {b} queries (got {tuple(ex.shape)})")
    return ex


def _mask_excluded(s: torch.Tensor, ex: torch.Tensor, lo: int) -> None:
    """Set ``s[r, ex[r, j] - lo] = -inf`` where that index falls in this chunk (in place)."""
    local = ex - lo
    inside = (local >= 0) & (local < s.shape[1])  # (b, m)
    r, j = inside.nonzero(as_tuple=True)
    if r.numel():
        s[r, local[r, j]] = -math.inf


# -- faiss -----------------------------------------------------------------------------------------

def _import_faiss():
    # faiss logs its SIMD-library probing at INFO ("Could not load library with AVX2 support ..."): noise
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    try:
        import faiss
    except ImportError as e:
        raise InputError("the faiss memory backend needs faiss: pip install 'capdec[faiss]' (faiss-cpu), "
                         "or use backend='torch'") from e
    return faiss


def faiss_available() -> bool:
    try:
        _import_faiss()
    except InputError:
        return False
    return True


def default_nlist(n: int) -> int:
    """IVF list count: about 4·√n (at least 1, at most n / 39 so every list can be trained)."""
    return max(1, min(int(round(4 * math.sqrt(n))), n // 39 or 1))


def build_faiss_index(memory: torch.Tensor, *, index: str = "flat", nlist: int | None = None,
                      train_size: int | None = None, seed: int = 0, show_progress: bool | None = None):
    """A faiss inner-product index over ``memory`` (n, d) rows (CPU tensor, any float dtype).

    ``flat``: exact ``IndexFlatIP`` (a float32 copy: 4·n·d bytes). ``ivf``: ``nlist`` spherical k-means
    lists trained on ``train_size`` sampled rows; rows are stored as float16 (exact for a float16
    memory, 2·n·d bytes) or float32 to match the memory. Rows are added in chunks behind a progress bar.
    """
    faiss = _import_faiss()
    if index not in INDEXES:
        raise InputError(f"unknown faiss index {index!r}; use one of {', '.join(INDEXES)}")
    n, d = memory.shape
    memory = memory.cpu()
    start = time.perf_counter()
    if index == "flat":
        idx = faiss.IndexFlatIP(d)
    else:
        nlist = nlist or default_nlist(n)
        if nlist > n:
            raise InputError(f"ivf index: nlist={nlist} is more than the {n} memory rows; use a smaller nlist "
                             f"or index='flat'")
        storage = "SQfp16" if memory.dtype in (torch.float16, torch.bfloat16) else "Flat"
        idx = faiss.index_factory(d, f"IVF{nlist},{storage}", faiss.METRIC_INNER_PRODUCT)
        ivf = faiss.extract_index_ivf(idx)
        ivf.by_residual = False  # store the rows themselves: float16 rows stay exact (residuals would not)
        ivf.cp.spherical = True  # centroids on the sphere, like the data
        ivf.cp.niter = 10
        ivf.cp.seed = seed
        train_size = min(n, train_size or 50 * nlist)
        ivf.cp.max_points_per_centroid = max(1, -(-train_size // nlist))  # we sample; faiss should not
        g = torch.Generator().manual_seed(seed)
        sample = torch.randperm(n, generator=g)[:train_size].sort().values
        logger.info("training an IVF%d faiss index on %d of %d rows (d=%d)", nlist, train_size, n, d)
        idx.train(np.ascontiguousarray(memory[sample].float().numpy()))
    step = 65536
    with progress(total=n, desc=f"faiss {index} index", unit="row", show=show_progress) as bar:
        for lo in range(0, n, step):
            idx.add(np.ascontiguousarray(memory[lo : lo + step].float().numpy()))
            bar.update(min(step, n - lo))
    logger.info("built a faiss %s index over %d rows in %.1f s", index, n, time.perf_counter() - start)
    return idx


def faiss_topk(idx, queries: torch.Tensor, k: int, *, exclude: torch.Tensor | None = None,
               nprobe: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`cosine_topk` through a faiss inner-product index (same outputs; approximate for IVF)."""
    faiss = _import_faiss()
    b, device = queries.shape[0], queries.device
    q = F.normalize(queries.detach().float(), dim=-1).cpu().numpy()
    ex = _exclude_matrix(exclude, b, torch.device("cpu"))
    extra = 0 if ex is None else ex.shape[1]
    fetch = min(k + extra, idx.ntotal)
    params = faiss.SearchParametersIVF(nprobe=nprobe) if nprobe is not None else None
    s, i = idx.search(np.ascontiguousarray(q), fetch, params=params)
    s, i = torch.from_numpy(s), torch.from_numpy(i)  # (b, fetch)
    drop = i < 0
    if ex is not None:
        drop |= (i[:, :, None] == ex[:, None, :]).any(dim=-1)
    s = s.masked_fill(drop, -math.inf)
    if fetch < k:
        s = torch.cat([s, s.new_full((b, k - fetch), -math.inf)], dim=1)
        i = torch.cat([i, i.new_full((b, k - fetch), -1)], dim=1)
    s, pos = s.topk(k, dim=1)  # excluded ones sink to the end; order otherwise kept
    i = i.gather(1, pos).masked_fill(s == -math.inf, -1)
    return s.to(device), i.to(device)


# -- the memory ------------------------------------------------------------------------------------

class TextMemory:
    """(n, d) L2-normalised text embeddings (float16 or float32), optionally with their captions.

    ``embeddings`` may be a numpy array (a memory map is used in place, not copied) or a tensor.
    ``validate=False`` skips the row-norm check (it reads the whole memory once).
    """

    def __init__(self, embeddings: np.ndarray | torch.Tensor, captions: Sequence[str] | None = None,
                 encoder_identity: dict[str, Any] | None = None, *, encoder_spec: dict[str, Any] | None = None,
                 config: MemoryConfig | None = None, validate: bool = True, source: str | None = None):
        self.source = source or "(memory)"  # where it came from, for messages
        self._emb = _as_tensor(embeddings, self.source)  # (n, d)
        if validate:
            check_rows(self._emb, f"{self.source}: embeddings")
        self._captions: list[str] | None = None
        self._caption_loader: Callable[[], list[str]] | None = None
        if captions is not None:
            self._set_captions(list(captions))
        self.encoder_identity = encoder_identity
        self.encoder_spec = encoder_spec
        self.config = config or MemoryConfig()
        self._faiss: dict[str, Any] = {}  # index kind -> built/loaded faiss index
        self._store_path: Path | None = None  # the embedding store on disk the rows are read from, if any
        self._warned_transfer = False
        self._warned_topk = False

    # -- constructors --------------------------------------------------------------------------
    @classmethod
    def from_store(cls, store_or_path: Any, *, config: MemoryConfig | None = None, mmap: bool = True) -> TextMemory:
        """A memory over an embedding store (an :class:`~capdec.store.EmbeddingStore` or its directory).

        The embeddings are used in place (memory-mapped when opened from disk); captions are read on
        first use of :attr:`captions`.
        """
        from capdec.store import EmbeddingStore

        store = store_or_path if isinstance(store_or_path, EmbeddingStore) else EmbeddingStore.open(store_or_path,
                                                                                                     mmap=mmap)
        source = str(store.path) if store.path is not None else "(in-memory embedding store)"
        memory = cls(store.embeddings, None, store.encoder_identity, encoder_spec=store.encoder_spec,
                     config=config, validate=not store.meta.get("normalized", False), source=source)
        memory._caption_loader = lambda: store.captions
        memory._store_path = store.path.resolve() if store.path is not None else None
        return memory

    @classmethod
    def load(cls, path: str | os.PathLike, *, config: MemoryConfig | None = None, mmap: bool = True) -> TextMemory:
        """Read a directory written by :meth:`save` (or an embedding store directory).

        ``config`` overrides the search settings recorded there. A saved faiss index is loaded when
        faiss is installed (and rebuilt on demand otherwise).
        """
        path = Path(path)
        if not (path / META).is_file():
            raise InputError(f"{path}: not a text memory (no {META}); make one with TextMemory.save, or pass an "
                             f"embedding store made by 'capdec embed'")
        meta = read_meta(path / META, redo="re-create the memory")
        fmt = meta.get("format") if isinstance(meta, dict) else None
        if isinstance(fmt, str) and fmt.startswith("capdec.embeddings/"):
            return cls.from_store(path, config=config, mmap=mmap)
        if fmt == LEGACY_FORMAT:
            memory = cls._load_legacy(path, meta, mmap=mmap)
        elif fmt == FORMAT:
            store = _open_store(path, meta, mmap=mmap)
            memory = cls.from_store(store, mmap=mmap)
            memory.encoder_identity, memory.encoder_spec = meta.get("encoder_identity"), meta.get("encoder")
            if not meta.get("captions", True):
                memory._caption_loader = None  # the store's rows are placeholders
        else:
            raise InputError(f"{path / META}: format {fmt!r} is not a text memory ({FORMAT!r}) or embedding store")
        memory.config = config or MemoryConfig.from_dict(meta.get("config"), where=str(path / META))
        memory.source = str(path)
        for kind, name in INDEX_FILES.items():
            if (path / name).is_file() and faiss_available():
                memory._faiss[kind] = _read_faiss_index(path / name, memory)
        return memory

    @classmethod
    def _load_legacy(cls, path: Path, meta: dict[str, Any], *, mmap: bool) -> TextMemory:
        """A ``capdec.memory/1`` directory: its own embeddings.npy (+ captions.jsonl) beside meta.json."""
        emb = load_matrix(path / EMBEDDINGS, (int(meta["count"]), int(meta["dim"])), mmap=mmap,
                          redo="re-create the memory", meta_name=META)
        memory = cls(emb, None, meta.get("encoder_identity"), encoder_spec=meta.get("encoder"), validate=False,
                     source=str(path))
        if meta.get("captions"):
            if not (path / CAPTIONS).is_file():
                raise InputError(f"{path}: {CAPTIONS} is missing though {META} lists captions; re-create the memory")
            memory._caption_loader = lambda: [r["caption"] for r in read_rows(path / CAPTIONS, len(memory), redo="re-create the memory", holder="the memory")]
        return memory

    def save(self, path: str | os.PathLike, *, overwrite: bool = False, dtype: str | None = None,
             index: bool = True, reference: bool | None = None) -> Path:
        """Write the memory directory (``meta.json`` and, with ``index``, the faiss indexes built so far)
        atomically: a crash leaves no half-written directory.

        A memory over an embedding store on disk (:meth:`from_store`, :meth:`load`) only *refers* to
        that store (its path and fingerprint): nothing is copied. Otherwise (``reference=False``, or a
        memory of in-memory arrays) its rows are written as an embedding store in ``path/store/``, so
        the directory is self-contained (a checkpoint's ``memory/`` is always).
        """
        path = Path(path)
        dtype = dtype or self.dtype
        if dtype not in DTYPES:
            raise InputError(f"unknown memory dtype {dtype!r}; use one of {', '.join(DTYPES)}")
        if path.exists() and not overwrite:
            raise InputError(f"{path} already exists; pass overwrite=True to replace it, or choose another path")
        if path.exists() and not _is_memory_dir(path):  # never delete a directory we did not make
            raise InputError(f"{path} exists and is not a text memory; choose another path or remove it yourself")
        store_dir = self._store_path
        if reference and store_dir is None:
            raise InputError("this memory is not read from an embedding store on disk: it can only be saved with "
                             "its rows (reference=False)")
        if reference is False or store_dir is None or dtype != self.dtype or store_dir.is_relative_to(path.resolve()):
            store_dir = None  # the rows are written into path/store/ (also when saved over the directory they are in)
        from capdec import __version__

        meta = {
            "format": FORMAT, "dim": self.dim, "count": len(self), "dtype": dtype,
            "store": str(store_dir) if store_dir is not None else OWN_STORE,
            "store_meta_sha256": None, "captions": self._captions is not None or self._caption_loader is not None,
            "encoder": self.encoder_spec, "encoder_identity": self.encoder_identity, "config": self.config.to_dict(),
            "faiss_indexes": sorted(self._faiss) if index else [], "source": self.source,
            "capdec_version": __version__, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        with atomic_dir(path, overwrite=overwrite) as tmp:
            if store_dir is None:
                self._own_store().save(tmp / OWN_STORE, dtype=dtype)
            meta["store_meta_sha256"] = _sha256(Path(tmp / OWN_STORE if store_dir is None else store_dir) / META)
            if index and self._faiss:
                faiss = _import_faiss()
                for kind, idx in self._faiss.items():
                    faiss.write_index(idx, str(tmp / INDEX_FILES[kind]))
            write_json(tmp / META, meta)  # last: its presence marks a complete memory
        logger.info("saved text memory (%d x %d %s) to %s%s", len(self), self.dim, dtype, path,
                    f" (an index over the store {store_dir})" if store_dir is not None else "")
        return path

    def _own_store(self):
        """These rows (and captions: empty placeholders when unknown) as an in-memory embedding store."""
        from capdec.store import EmbeddingStore

        captions = self.captions
        return EmbeddingStore.from_arrays(captions if captions is not None else [""] * len(self), self._emb,
                                          encoder_spec=self.encoder_spec or {},
                                          encoder_identity=self.encoder_identity or {})

    # -- properties ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._emb.shape[0]

    @property
    def dim(self) -> int:
        return self._emb.shape[1]

    @property
    def dtype(self) -> str:
        return str(self._emb.dtype).removeprefix("torch.")

    @property
    def device(self) -> torch.device:
        return self._emb.device

    @property
    def nbytes(self) -> int:
        """Bytes of the embeddings plus any faiss indices held."""
        return self._emb.numel() * self._emb.element_size() + sum(_faiss_nbytes(i) for i in self._faiss.values())

    @property
    def embeddings(self) -> torch.Tensor:
        """The (n, d) embeddings in their storage dtype (a read-only view: do not modify)."""
        return self._emb

    @property
    def captions(self) -> list[str] | None:
        """The captions aligned with the rows, or None when the memory was built without them."""
        if self._captions is None and self._caption_loader is not None:
            self._set_captions(self._caption_loader())
            self._caption_loader = None
        return self._captions

    def _set_captions(self, captions: list[str]) -> None:
        if len(captions) != len(self):
            raise InputError(f"{self.source}: {len(captions)} captions for {len(self)} embeddings")
        self._captions = captions

    def __repr__(self) -> str:
        return (f"TextMemory({self.source}, count={len(self)}, dim={self.dim}, dtype={self.dtype}, "
                f"device={self.device}, backend={self.config.backend}, index={self.config.index})")

    def to(self, device: str | torch.device) -> TextMemory:
        """This memory with its embeddings on ``device`` (e.g. a GPU, to search GPU queries fast)."""
        device = torch.device(device)
        if device == self.device:
            return self
        other = TextMemory(self._emb.to(device), None, self.encoder_identity, encoder_spec=self.encoder_spec,
                           config=self.config, validate=False, source=self.source)
        other._captions, other._caption_loader = self._captions, self._caption_loader
        if device.type == "cpu":
            other._faiss = self._faiss
        return other

    def check_encoder(self, encoder: Any) -> None:
        """Raise :class:`~capdec.encoders.EncoderMismatchError` unless ``encoder`` made this memory."""
        from capdec.encoders.base import check_identity

        if self.encoder_identity is None:
            logger.warning("text memory %s records no encoder; cannot check it matches %s", self.source,
                           getattr(encoder, "spec", encoder))
            return
        check_identity(self.encoder_identity, encoder.identity, what=f"text memory {self.source}")

    # -- search and projection -----------------------------------------------------------------
    def search(self, queries: torch.Tensor, k: int, *, exclude: torch.Tensor | None = None,
               backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` cosine neighbours of ``queries`` (b, d): ``(scores, indices)``, each (b, k), best first.

        ``exclude[i]`` is a row index (or a row of indices, negative = none) never returned for query
        ``i`` — its own caption during training. Scores are float32, indices int64, on the queries'
        device; when fewer than ``k`` rows are available the tail is ``-inf`` / ``-1``.
        ``backend`` overrides the configured one for this call.
        """
        queries = self._check_queries(queries)
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise InputError(f"k must be a positive integer (got {k!r})")
        if k > len(self):
            raise InputError(f"k={k} is more than the {len(self)} captions in the text memory {self.source}")
        backend = self._resolve_backend(backend)
        if backend == "faiss":
            idx = self.faiss_index()
            return faiss_topk(idx, queries, k, exclude=exclude,
                              nprobe=self.config.nprobe if self.config.index == "ivf" else None)
        return cosine_topk(queries, self._memory_for(queries), k, exclude=exclude, chunk_size=self.config.chunk_size)

    def project(self, queries: torch.Tensor, *, tau: float = 0.01, k: int | None = None,
                backend: str | None = None) -> torch.Tensor:
        """DeCap projection of ``queries`` (b, d) into the span of the memory: (b, d), L2-normalised.

        ``k=None``: exact softmax over all n rows (chunked, running log-sum-exp; torch). With ``k``, the
        softmax runs over the top-``k`` neighbours only (found by :meth:`search` with ``backend``): see
        the module notes for why ``k`` of a few hundred matches the exact result at ``tau=0.01``.
        Device and dtype follow the queries.
        """
        queries = self._check_queries(queries)
        _check_tau(tau)
        if k is None:
            return project_exact(queries, self._memory_for(queries), tau=tau, chunk_size=self.config.chunk_size)
        scores, idx = self.search(queries, min(k, len(self)), backend=backend)
        if not self._warned_topk:
            bound = topk_mass_bound(scores, len(self), tau=tau).max().item()
            if bound > 1e-3:
                logger.warning("top-%d projection over %d rows may leave out up to %.2g of the softmax weight "
                               "(cosines fall too little within the top %d at tau=%g); raise k or use k=None "
                               "for the exact projection", k, len(self), bound, k, tau)
                self._warned_topk = True
        out = project_candidates(scores, self.gather(idx, device=queries.device), tau=tau)
        return out.to(queries.dtype)

    def gather(self, indices: torch.Tensor, *, device: str | torch.device | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Embeddings of rows ``indices`` (any shape; ``-1`` gives zeros): shape ``indices.shape + (d,)``."""
        indices = torch.as_tensor(indices)
        device = torch.device(device) if device is not None else indices.device
        flat = indices.reshape(-1).to(self.device)
        valid = flat >= 0
        rows = self._emb[flat.clamp(min=0)].to(device=device, dtype=dtype)  # (numel, d)
        rows = rows * valid.to(device=device, dtype=dtype)[:, None]
        return rows.reshape(*indices.shape, self.dim)

    def captions_at(self, indices: torch.Tensor) -> list[list[str]]:
        """Captions of a (b, k) index matrix (``-1`` entries skipped), for entity filtering and display."""
        captions = self.captions
        if captions is None:
            raise InputError(f"text memory {self.source} has no captions; build it from an embedding store or "
                             f"pass captions=")
        return [[captions[j] for j in row if j >= 0] for row in torch.as_tensor(indices).tolist()]

    def neighbours(self, k: int, *, batch_size: int = 1024, backend: str | None = None,
                   show_progress: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's ``k`` nearest other rows (itself excluded): ``(scores, indices)``, each (n, k), on CPU.

        The retrieval table for IFCap-style training from clean embeddings, computed once.
        """
        n = len(self)
        scores = torch.empty(n, k)
        indices = torch.empty(n, k, dtype=torch.long)
        with progress(total=n, desc="neighbours", unit="row", show=show_progress) as bar:
            for lo in range(0, n, batch_size):
                hi = min(lo + batch_size, n)
                q = self._emb[lo:hi].float()
                s, i = self.search(q, k, exclude=torch.arange(lo, hi, device=q.device), backend=backend)
                scores[lo:hi], indices[lo:hi] = s.cpu(), i.cpu()
                bar.update(hi - lo)
        return scores, indices

    def faiss_index(self, index: str | None = None, *, show_progress: bool | None = None):
        """The faiss index of kind ``index`` (default: the configured one), built on first use."""
        kind = index or self.config.index
        if kind not in self._faiss:
            if self.device.type != "cpu":
                raise InputError("faiss indices are built from a CPU memory; use memory.to('cpu') or backend='torch'")
            self._faiss[kind] = build_faiss_index(self._emb, index=kind, nlist=self.config.nlist,
                                                  train_size=self.config.train_size, show_progress=show_progress)
        return self._faiss[kind]

    def drop_faiss_index(self, index: str | None = None) -> None:
        """Free a built faiss index (all of them with ``None``)."""
        if index is None:
            self._faiss.clear()
        else:
            self._faiss.pop(index, None)

    # -- helpers -------------------------------------------------------------------------------
    def _check_queries(self, queries: torch.Tensor) -> torch.Tensor:
        if not isinstance(queries, torch.Tensor):
            queries = torch.as_tensor(np.asarray(queries))
        if queries.ndim == 1:
            raise InputError(f"queries must be a (batch, {self.dim}) matrix; got a vector of shape "
                             f"{tuple(queries.shape)} (use queries[None])")
        if queries.ndim != 2 or not queries.is_floating_point():
            raise InputError(f"queries must be a floating (batch, {self.dim}) matrix (got shape "
                             f"{tuple(queries.shape)}, dtype {queries.dtype})")
        if queries.shape[1] != self.dim:
            what = f" made with {self.encoder_spec}" if self.encoder_spec else ""
            raise InputError(f"queries have dimension {queries.shape[1]} but the text memory {self.source}{what} "
                             f"holds {self.dim}-d embeddings; embed with the encoder the memory was built with")
        if not torch.isfinite(queries).all():
            raise InputError("queries contain NaN or infinite values")
        return queries

    def _resolve_backend(self, backend: str | None) -> str:
        backend = backend or self.config.backend
        if backend not in BACKENDS:
            raise InputError(f"unknown memory backend {backend!r}; use one of {', '.join(BACKENDS)}")
        if backend != "auto":
            return backend
        if self.config.index == "ivf" and len(self) >= AUTO_IVF_MIN_ROWS:  # small memories: exact is cheap
            return "faiss"
        return "torch"

    def _memory_for(self, queries: torch.Tensor) -> torch.Tensor:
        if queries.device != self.device and not self._warned_transfer:
            logger.warning("text memory is on %s but queries are on %s: every call copies the memory; "
                           "use memory.to(%r) once", self.device, queries.device, str(queries.device))
            self._warned_transfer = True
        return self._emb


# -- helpers ---------------------------------------------------------------------------------------

def _as_tensor(embeddings: np.ndarray | torch.Tensor, source: str) -> torch.Tensor:
    if isinstance(embeddings, torch.Tensor):
        t = embeddings.detach()
    else:
        arr = np.asarray(embeddings) if not isinstance(embeddings, np.ndarray) else embeddings
        if arr.dtype not in (np.float16, np.float32):
            arr = arr.astype(np.float32)
        with warnings.catch_warnings():  # a read-only memory map: we never write through it
            warnings.filterwarnings("ignore", message=".*not writable.*")
            t = torch.from_numpy(arr)
    if t.ndim != 2 or t.shape[0] == 0 or t.shape[1] == 0:
        raise InputError(f"{source}: a text memory needs a non-empty (n, d) matrix (got shape {tuple(t.shape)})")
    if t.dtype not in (torch.float16, torch.float32, torch.bfloat16):
        t = t.float()
    return t


def _open_store(path: Path, meta: dict[str, Any], *, mmap: bool):
    """The embedding store a ``capdec.memory/2`` directory indexes, checked against its fingerprint."""
    from capdec.store import EmbeddingStore

    where = Path(meta.get("store") or OWN_STORE)
    store_dir = where if where.is_absolute() else path / where
    if not (store_dir / META).is_file():
        raise InputError(f"{path}: the embedding store this memory indexes, {store_dir}, is missing; restore it, "
                         f"or re-create the memory")
    if meta.get("store_meta_sha256") and _sha256(store_dir / META) != meta["store_meta_sha256"]:
        raise InputError(f"{path}: the embedding store {store_dir} was re-made since this memory was saved (its "
                         f"{META} differs); re-create the memory (its faiss index would not match)")
    store = EmbeddingStore.open(store_dir, mmap=mmap)
    if (len(store), store.dim) != (int(meta["count"]), int(meta["dim"])):
        raise InputError(f"{path}: the store {store_dir} holds {len(store)} x {store.dim} embeddings but {META} "
                         f"says {meta['count']} x {meta['dim']}; re-create the memory")
    return store


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _is_memory_dir(path: Path) -> bool:
    if not path.is_dir():
        return False
    if not any(path.iterdir()):
        return True
    try:
        return read_json(path / META).get("format") in (FORMAT, LEGACY_FORMAT)
    except (OSError, ValueError, AttributeError):
        return False


def _read_faiss_index(path: Path, memory: TextMemory):
    faiss = _import_faiss()
    idx = faiss.read_index(str(path))
    if idx.ntotal != len(memory) or idx.d != memory.dim:
        raise InputError(f"{path}: faiss index of {idx.ntotal} x {idx.d} does not match the memory's "
                         f"{len(memory)} x {memory.dim}; delete it (it is rebuilt on demand)")
    return idx


def _faiss_nbytes(idx) -> int:
    """Approximate bytes held by a faiss index (its stored vectors)."""
    try:
        import faiss

        ivf = faiss.extract_index_ivf(idx)
        return int(ivf.ntotal * (ivf.code_size + 8) + ivf.nlist * ivf.d * 4)
    except (ImportError, RuntimeError):
        return int(idx.ntotal * idx.d * 4)


__all__ = ["FORMAT", "MemoryConfig", "TextMemory", "build_faiss_index", "cosine_topk", "default_nlist",
           "faiss_available", "faiss_topk", "project_candidates", "project_exact", "topk_mass_bound"]
