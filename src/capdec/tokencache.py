"""Token ids of a store's captions, computed once and memory-mapped: what training reads per batch.

Tokenising a corpus is the slow, memory-hungry part of preparing a training run (a list of Python
strings and a padded int64 matrix grow with the corpus). Instead, the first run with a given
(store, tokenizer) pair streams ``captions.jsonl`` once through the tokenizer and writes, beside the
store::

    STORE/token-cache/<key>/
      meta.json     format "capdec.token-cache/1", key, count, tokens, dtype, tokenizer + store identity
      ids.bin       every caption's raw token ids back to back (uint16 when the vocabulary has < 65536
                    tokens, else int32); no end-of-sequence, no cut: those are applied per batch
      offsets.npy   (count + 1,) int64: caption i is ids[offsets[i]:offsets[i + 1]]

``key`` hashes the store's caption digest and the tokenizer's full definition, so another tokenizer
(or a re-embedded corpus) gets its own cache and a stale one is never read. Later runs reuse it. A
store directory that is not writable keeps its cache under ``$CAPDEC_CACHE_DIR`` (default
``~/.cache/capdec``) instead. The directory is written atomically: a crash leaves no half cache.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from capdec.artifacts import check_count, check_fields, iter_rows, read_meta
from capdec.configs import MAX_TOKENS
from capdec.errors import InputError
from capdec.utils import atomic_dir, progress, write_json

logger = logging.getLogger(__name__)

FORMAT = "capdec.token-cache/1"
META, IDS, OFFSETS = "meta.json", "ids.bin", "offsets.npy"
CACHE_DIR = "token-cache"  # in a store (or the user cache): one <key>/ per tokenizer
_BATCH = 8192  # captions per tokenizer call while building


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of everything that decides a tokenizer's ids (vocabulary, merges, normaliser, added tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        payload = backend.to_str()
    else:  # a slow (Python) tokenizer: its vocabulary and options
        payload = json.dumps([type(tokenizer).__name__, sorted(tokenizer.get_vocab().items()),
                              {k: str(v) for k, v in sorted(getattr(tokenizer, "init_kwargs", {}).items())}])
    return hashlib.sha256(payload.encode()).hexdigest()


def store_fingerprint(store: Any) -> str:
    corpus = store.meta.get("corpus") or {}
    digest = corpus.get("captions_sha256")
    if digest is None:  # an old or hand-made store: fall back to the captions file itself
        from capdec.utils import sha256_file

        digest = sha256_file(Path(store.path) / "captions.jsonl")
    return f"{digest}:{len(store)}"


def cache_key(store: Any, tokenizer: Any) -> str:
    return hashlib.sha256(f"{store_fingerprint(store)}|{tokenizer_fingerprint(tokenizer)}".encode()).hexdigest()[:20]


def id_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size < 65536 else np.dtype(np.int32)


class TokenCache:
    """Raw token ids of ``count`` captions: ``ids[offsets[i]:offsets[i+1]]`` (memory-mapped from disk)."""

    def __init__(self, ids: np.ndarray, offsets: np.ndarray, *, path: Path | None = None):
        self.ids = ids
        self.offsets = offsets
        self.path = path

    @classmethod
    def open(cls, path: str | os.PathLike) -> TokenCache:
        path = Path(path)
        meta = read_meta(path / META, redo="delete the directory to rebuild it")
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise InputError(f"{path}: not a token cache; delete it to rebuild")
        redo = "delete the directory to rebuild it"
        check_fields(meta, path / META, {"count": int, "tokens": int, "dtype": str}, redo=redo)
        for key in ("count", "tokens"):
            check_count(meta[key], key, path / META, redo=redo)
        if meta["dtype"] not in ("uint16", "int32"):
            raise InputError(f"{path / META}: dtype must be uint16 or int32, got {meta['dtype']!r}; {redo}")
        ids = np.memmap(path / IDS, dtype=np.dtype(meta["dtype"]), mode="r", shape=(int(meta["tokens"]),)) \
            if int(meta["tokens"]) else np.zeros(0, dtype=meta["dtype"])
        offsets = np.load(path / OFFSETS, mmap_mode="r", allow_pickle=False)
        if offsets.shape != (int(meta["count"]) + 1,) or int(offsets[-1]) != int(meta["tokens"]):
            raise InputError(f"{path}: damaged token cache (offsets do not match {META}); delete it to rebuild")
        return cls(ids, offsets, path=path)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self, idx: np.ndarray) -> np.ndarray:
        """Raw token counts of captions ``idx`` (int64)."""
        idx = np.asarray(idx, dtype=np.int64)
        return np.asarray(self.offsets[idx + 1]) - np.asarray(self.offsets[idx])

    def row(self, i: int) -> np.ndarray:
        return np.asarray(self.ids[int(self.offsets[i]) : int(self.offsets[i + 1])])


def cache_dir_for(store: Any, tokenizer: Any) -> Path:
    """Where the cache of (store, tokenizer) lives: in the store, or the user cache if that is read-only."""
    key = cache_key(store, tokenizer)
    inside = Path(store.path) / CACHE_DIR / key
    if inside.is_dir() or os.access(store.path, os.W_OK):
        return inside
    root = Path(os.environ.get("CAPDEC_CACHE_DIR", Path.home() / ".cache" / "capdec"))
    return root / CACHE_DIR / key


def token_cache(store: Any, tokenizer: Any, *, build: bool = True, show_progress: bool | None = None) -> TokenCache:
    """The token cache of ``store`` under ``tokenizer``: opened if present, else built (``build=True``).

    An in-memory store (no ``path``) is tokenised into memory.
    """
    if store.path is None:
        return _build_arrays(_iter_store_captions(store), len(store), tokenizer, show_progress=show_progress)
    where = cache_dir_for(store, tokenizer)
    if (where / META).is_file():
        return TokenCache.open(where)
    if not build:
        raise InputError(f"no token cache at {where}")
    vocab = len(tokenizer)
    meta = {"format": FORMAT, "key": where.name, "count": len(store), "dtype": id_dtype(vocab).name,
            "vocab_size": vocab, "store": str(store.path), "store_fingerprint": store_fingerprint(store),
            "tokenizer_sha256": tokenizer_fingerprint(tokenizer)}
    logger.info("building the token cache of %s (%d captions) at %s", store.path, len(store), where)
    try:
        with atomic_dir(where) as tmp:
            offsets = np.lib.format.open_memmap(tmp / OFFSETS, mode="w+", dtype=np.int64, shape=(len(store) + 1,))
            with open(tmp / IDS, "wb") as f:
                total = _stream(_iter_store_captions(store), len(store), tokenizer, offsets,
                                lambda a: f.write(a.tobytes()), show_progress=show_progress)
            offsets.flush()
            del offsets
            write_json(tmp / META, {**meta, "tokens": total})  # last: marks a complete cache
    except FileExistsError:  # another process (a rank on another node) finished it first
        pass
    return TokenCache.open(where)


def _build_arrays(captions: Iterator[str], n: int, tokenizer: Any, *, show_progress: bool | None) -> TokenCache:
    offsets = np.zeros(n + 1, dtype=np.int64)
    parts: list[np.ndarray] = []
    _stream(captions, n, tokenizer, offsets, parts.append, show_progress=show_progress)
    ids = np.concatenate(parts) if parts else np.zeros(0, dtype=id_dtype(len(tokenizer)))
    return TokenCache(ids, offsets)


def _stream(captions: Iterator[str], n: int, tokenizer: Any, offsets: np.ndarray, write, *,
            show_progress: bool | None) -> int:
    """Tokenise ``captions`` in batches, handing each batch's ids to ``write`` and filling ``offsets``."""
    dtype = id_dtype(len(tokenizer))
    encode = _batch_encoder(tokenizer)
    offsets[0] = 0
    done, total, cut = 0, 0, 0
    with progress(total=n, desc="tokenize", unit="caption", show=show_progress) as bar:
        while batch := list(itertools.islice(captions, _BATCH)):
            enc = encode(batch)
            if any(len(x) > MAX_TOKENS for x in enc):  # no model reads more (ModelConfig.max_length's bound)
                cut += sum(len(x) > MAX_TOKENS for x in enc)
                enc = [x[:MAX_TOKENS] for x in enc]
            lens = np.fromiter((len(x) for x in enc), dtype=np.int64, count=len(enc))
            flat = np.fromiter(itertools.chain.from_iterable(enc), dtype=np.int64, count=int(lens.sum()))
            if flat.size and (flat.min() < 0 or flat.max() > np.iinfo(dtype).max):
                raise InputError(f"token id {int(flat.max())} does not fit the cache dtype {dtype.name}")
            write(flat.astype(dtype))
            offsets[done + 1 : done + 1 + len(enc)] = total + np.cumsum(lens)
            total += int(lens.sum())
            done += len(enc)
            bar.update(len(enc))
    if done != n:
        raise InputError(f"the store lists {n} captions but {done} were read; the store is damaged, re-create it")
    if cut:
        logger.warning("%d caption(s) of more than %d tokens were cut to that length", cut, MAX_TOKENS)
    return total


def _batch_encoder(tokenizer: Any):
    """captions -> id lists, as ``tokenizer(captions, add_special_tokens=False)["input_ids"]`` gives them.

    A fast tokenizer's Rust backend is called directly (without offsets when it can): the Python
    wrapper's per-caption bookkeeping costs more than the tokenisation itself.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return lambda batch: tokenizer(batch, add_special_tokens=False)["input_ids"]
    fn = getattr(backend, "encode_batch_fast", None) or backend.encode_batch
    return lambda batch: [e.ids for e in fn(batch, add_special_tokens=False)]


def _iter_store_captions(store: Any) -> Iterator[str]:
    if store.path is None:
        yield from (r["caption"] for r in store.records)
        return
    yield from iter_captions(Path(store.path) / "captions.jsonl")


def iter_captions(path: Path, keep: np.ndarray | None = None) -> Iterator[str]:
    """Stream the captions of a store's ``captions.jsonl`` (only rows where ``keep`` is True, if given)."""
    rows = iter_rows(path, redo="the store is damaged, re-create it")
    for i, row in enumerate(rows):
        if keep is None or keep[i]:
            yield row["caption"]


def pad_batch(rows: Sequence[np.ndarray], *, max_length: int, eos: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw id rows -> right-padded (b, t) ids with end-of-sequence appended, and the mask.

    Each row is cut to ``max_length - 1`` ids before the end-of-sequence; ``t`` is the longest row of
    *this* batch (padding trimmed per batch), so a batch of short captions costs a short sequence.
    """
    cap = max_length - 1
    t = max((min(len(r), cap) + 1 for r in rows), default=1)
    ids = np.full((len(rows), t), pad, dtype=np.int64)
    mask = np.zeros((len(rows), t), dtype=np.int64)
    for i, r in enumerate(rows):
        k = min(len(r), cap)
        ids[i, :k] = r[:k]
        ids[i, k] = eos
        mask[i, : k + 1] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


__all__ = ["FORMAT", "TokenCache", "cache_dir_for", "cache_key", "iter_captions", "pad_batch", "token_cache",
           "tokenizer_fingerprint"]
