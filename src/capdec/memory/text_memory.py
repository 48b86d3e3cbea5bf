"""The text memory: (n, d) training-caption embeddings searched and projected onto (:class:`TextMemory`).

The maths lives in :mod:`capdec.memory.kernels` (exact, torch) and :mod:`capdec.memory.faiss_index`;
the directory format in :mod:`capdec.memory.persistence`. This module holds the rows, their captions
and the search settings, and picks the backend.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from capdec.artifacts import check_rows, file_map, release
from capdec.configs import MEMORY_BACKENDS as BACKENDS
from capdec.configs import MemoryConfig
from capdec.errors import InputError
from capdec.memory.faiss_index import build_faiss_index, faiss_available, faiss_topk, index_nbytes, read_index
from capdec.memory.kernels import (
    Release,
    check_tau,
    cosine_topk,
    project_candidates,
    project_exact,
    rescore,
    topk_mass_bound,
)
from capdec.memory.persistence import SavedMemory, open_memory_dir, save_memory, store_rows
from capdec.utils import progress

logger = logging.getLogger(__name__)

# backend="auto" uses faiss only for an IVF index over at least this many rows. Exact search stays on
# torch: benchmarks/memory_1m.py (1M x 512 float16, one shared core) measured torch at 0.55 s per
# batch-1 query and 4.2 s per batch of 64, faiss IndexFlatIP at 0.41 s and 24 s (no batching gain in
# the faiss-cpu wheel) after a 16 s build of a 2 GB float32 copy -- not worth doing behind a user's back.
AUTO_IVF_MIN_ROWS = 100_000
# an ivfpq search re-scores at least this many candidates exactly: product-quantised codes rank near neighbours
# of clustered data too roughly for fewer (4-byte codes at d=32: recall@5 0.79 with 64, 0.97 with 250)
RESCORED_MIN = 256
RESCORED_ROWS = 16384  # candidate rows re-scored at once (32 MB in float32 at d=512)
GATHER_ROWS = 64  # rows of a memory-mapped memory read between two unmappings (at most ~128 MB mapped)


class TextMemory:
    """(n, d) L2-normalised text embeddings (float16 or float32), optionally with their captions.

    ``embeddings`` may be a numpy array or a tensor. A memory map (an embedding store's matrix) is used in
    place, never copied, and its pages are unmapped as soon as they are read, so a memory far larger than
    RAM is searched with a resident footprint of one chunk (plus a faiss ``ivfpq`` index: a few dozen
    bytes a row).
    ``captions`` are the rows' captions, or ``caption_loader`` a function returning them, called on
    first use of :attr:`captions` (a large corpus is then never read unless needed). ``store_path`` is
    the embedding store on disk the rows come from: :meth:`save` then only refers to it.
    ``validate=False`` skips the row-norm check (it reads the whole memory once).
    """

    def __init__(self, embeddings: np.ndarray | torch.Tensor, captions: Sequence[str] | None = None,
                 encoder_identity: dict[str, Any] | None = None, *, encoder_spec: dict[str, Any] | None = None,
                 config: MemoryConfig | None = None, validate: bool = True, source: str | None = None,
                 caption_loader: Callable[[], Sequence[str]] | None = None, store_path: Path | None = None):
        self.source = source or "(memory)"  # where it came from, for messages
        self._emb = _as_tensor(embeddings, self.source)  # (n, d)
        # the memory map the rows are read from, when they are (released after each read)
        self._map = embeddings if (isinstance(embeddings, np.ndarray) and file_map(embeddings) is not None
                                   and self._emb.data_ptr() == embeddings.ctypes.data) else None
        if validate:
            check_rows(self._emb, f"{self.source}: embeddings")
        if captions is not None and caption_loader is not None:
            raise InputError("give a text memory its captions or a caption_loader, not both")
        self._captions: list[str] | None = None
        self._caption_loader = caption_loader
        if captions is not None:
            self._set_captions(list(captions))
        self.encoder_identity = encoder_identity
        self.encoder_spec = encoder_spec
        self.config = config or MemoryConfig()
        self.store_path = store_path  # the embedding store on disk the rows are read from, if any
        self._faiss: dict[str, Any] = {}  # index kind -> built/loaded faiss index
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
        saved = store_rows(store)
        saved.config = config
        return cls._from_saved(saved)

    @classmethod
    def load(cls, path: str | os.PathLike, *, config: MemoryConfig | None = None, mmap: bool = True) -> TextMemory:
        """Read a directory written by :meth:`save` (or an embedding store directory).

        ``config`` overrides the search settings recorded there. A saved faiss index is loaded when
        faiss is installed (and rebuilt on demand otherwise).
        """
        return cls._from_saved(open_memory_dir(path, config=config, mmap=mmap))

    @classmethod
    def _from_saved(cls, saved: SavedMemory) -> TextMemory:
        memory = cls(saved.embeddings, None, saved.encoder_identity, encoder_spec=saved.encoder_spec,
                     config=saved.config, validate=saved.validate, source=saved.source,
                     caption_loader=saved.caption_loader, store_path=saved.store_path)
        if faiss_available():
            for kind, file in saved.faiss_files.items():
                memory._faiss[kind] = read_index(file, (len(memory), memory.dim))
        return memory

    def save(self, path: str | os.PathLike, *, overwrite: bool = False, dtype: str | None = None,
             index: bool = True, reference: bool | None = None) -> Path:
        """Write the memory directory (``meta.json`` and, with ``index``, the faiss indexes built so far)
        atomically: a crash leaves no half-written directory.

        A memory over an embedding store on disk (:meth:`from_store`, :meth:`load`) only *refers* to
        that store (its path and fingerprint): nothing is copied. Otherwise (``reference=False``, or a
        memory of in-memory arrays) its rows are written as an embedding store in ``path/store/``, so
        the directory is self-contained (a checkpoint's ``memory/`` is always). Layout:
        :mod:`capdec.memory.persistence`.
        """
        return save_memory(self, path, overwrite=overwrite, dtype=dtype, index=index, reference=reference)

    def as_store(self):
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
    def mapped(self) -> bool:
        """Whether the rows are read from a memory-mapped file (not held in RAM)."""
        return self._map is not None

    @property
    def nbytes(self) -> int:
        """Bytes of the embeddings plus any faiss indices held."""
        return self._emb.numel() * self._emb.element_size() + sum(index_nbytes(i) for i in self._faiss.values())

    @property
    def embeddings(self) -> torch.Tensor:
        """The (n, d) embeddings in their storage dtype (a read-only view: do not modify)."""
        return self._emb

    @property
    def captions(self) -> list[str] | None:
        """The captions aligned with the rows, or None when the memory was built without them."""
        if self._captions is None and self._caption_loader is not None:
            self._set_captions(list(self._caption_loader()))
            self._caption_loader = None
        return self._captions

    @property
    def has_captions(self) -> bool:
        """Whether the rows have captions (without reading them)."""
        return self._captions is not None or self._caption_loader is not None

    @property
    def faiss_indexes(self) -> dict[str, Any]:
        """The faiss indexes built or loaded so far, by kind (``flat``, ``ivf``); a copy of the table."""
        return dict(self._faiss)

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
        other = TextMemory(self._emb.to(device), self._captions, self.encoder_identity,
                           encoder_spec=self.encoder_spec, config=self.config, validate=False, source=self.source,
                           caption_loader=self._caption_loader)
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
            idx, kind = self.faiss_index(), self.config.index
            nprobe = self.config.nprobe if kind in ("ivf", "ivfpq") else None
            if kind != "ivfpq":
                return faiss_topk(idx, queries, k, exclude=exclude, nprobe=nprobe)
            # quantised codes rank the candidates roughly; their exact cosines, from the rows, decide
            fetch = min(len(self), max(k * self.config.rerank, RESCORED_MIN))
            _, candidates = faiss_topk(idx, queries, fetch, exclude=exclude, nprobe=nprobe)
            step = max(1, RESCORED_ROWS // fetch)  # queries whose candidates are read at once
            parts = [rescore(queries[lo : lo + step], candidates[lo : lo + step],
                             self.gather(candidates[lo : lo + step], device=queries.device), k)
                     for lo in range(0, len(queries), step)]
            return torch.cat([s for s, _ in parts]), torch.cat([i for _, i in parts])
        return cosine_topk(queries, self._memory_for(queries), k, exclude=exclude, chunk_size=self.config.chunk_size,
                           release=self._release)

    def project(self, queries: torch.Tensor, *, tau: float = 0.01, k: int | None = None,
                backend: str | None = None) -> torch.Tensor:
        """DeCap projection of ``queries`` (b, d) into the span of the memory: (b, d), L2-normalised.

        ``k=None``: exact softmax over all n rows (chunked, running log-sum-exp; torch). With ``k``, the
        softmax runs over the top-``k`` neighbours only (found by :meth:`search` with ``backend``): see
        the module notes for why ``k`` of a few hundred matches the exact result at ``tau=0.01``.
        Device and dtype follow the queries.
        """
        queries = self._check_queries(queries)
        check_tau(tau)
        if k is None:
            return project_exact(queries, self._memory_for(queries), tau=tau, chunk_size=self.config.chunk_size,
                                 release=self._release)
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
        if self._map is None:
            rows = self._emb[flat.clamp(min=0)].to(device=device, dtype=dtype)  # (numel, d)
        else:
            # a few rows at a time, unmapped after each: a row read maps its whole page-cache folio (up to
            # 2 MB), so thousands of scattered rows at once would map most of a large store
            rows = torch.empty(len(flat), self.dim, device=device, dtype=dtype)
            for lo in range(0, len(flat), GATHER_ROWS):
                rows[lo : lo + GATHER_ROWS] = self._emb[flat[lo : lo + GATHER_ROWS].clamp(min=0)]
                release(self._map)
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
                if self._release is not None:
                    self._release(lo, hi)
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
                                                  train_size=self.config.train_size, pq_m=self.config.pq_m,
                                                  show_progress=show_progress, release=self._release)
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
        if self.config.index in ("ivf", "ivfpq") and len(self) >= AUTO_IVF_MIN_ROWS:  # small: exact is cheap
            return "faiss"
        return "torch"

    @property
    def _release(self) -> Release | None:
        """Unmaps rows lo:hi of a memory-mapped memory once read (None for rows held in memory)."""
        if self._map is None:
            return None
        return lambda lo, hi: release(self._map, lo, hi)

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


__all__ = ["AUTO_IVF_MIN_ROWS", "TextMemory"]
