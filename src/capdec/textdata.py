"""Training rows over one or more embedding stores, read per batch (memory does not grow with the corpus).

Rows are numbered across the stores in order (store 0's rows first). A batch of row indices gives
its embeddings (gathered from the stores' memory maps; through an image store's row map, so its
captions share their image's stored row) and its token ids (from each store's
:mod:`capdec.tokencache`); captions are never held as Python strings while training.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from capdec.artifacts import own_dir, random_access, release
from capdec.encoders.base import check_identity
from capdec.errors import InputError
from capdec.tokencache import TokenCache, iter_captions, pad_batch, token_cache
from capdec.utils import progress

logger = logging.getLogger(__name__)

_CHUNK = 65536  # rows per pass when a whole split is read (means, memories)
ROWS_OF_STORES = "rows of stores"  # meta.json corpus format of the memory rows write_store makes beside --out


@dataclass
class TextData:
    """Caption embeddings of one or more stores (memory-mapped), their token caches, mixing weights."""

    stores: list[Any]  # EmbeddingStore objects
    encoder_spec: dict[str, Any]
    encoder_identity: dict[str, Any]
    sample_weights: torch.Tensor | None = None  # (n,) when mixing corpora with weights
    sources: list[str] | None = None
    starts: np.ndarray = field(init=False)  # (S + 1,) first row of each store, then n
    tokens: list[TokenCache] | None = None  # one per store, after :meth:`attach_tokenizer`
    modality: str = "text"  # of the embeddings: "text" (CapDec), "image" (paired images: ClipCap) or "mixed"
    _image_store: np.ndarray | None = field(init=False, repr=False)  # (S,) per store, when mixed

    def __post_init__(self) -> None:
        self.starts = np.concatenate([[0], np.cumsum([len(s) for s in self.stores])]).astype(np.int64)
        # in a mix of text and image stores, the image stores' rows (pseudo-pairs, paired images) get no noise
        self._image_store = np.array([getattr(s, "modality", "text") == "image" for s in self.stores]) \
            if self.modality == "mixed" else None
        for s in self.stores:
            random_access(s.vectors)
            if s.row_index is not None:
                random_access(s.row_index)

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def dim(self) -> int:
        return int(self.stores[0].dim)

    @property
    def dtype(self) -> torch.dtype:
        return torch.float16 if self.stores[0].vectors.dtype == np.float16 else torch.float32

    def _locate(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        which = np.searchsorted(self.starts, idx, side="right") - 1
        return which, idx - self.starts[which]

    def embeddings_at(self, idx: torch.Tensor | np.ndarray) -> torch.Tensor:
        """(b, d) embeddings of rows ``idx``, in the stored dtype (a copy)."""
        idx = np.asarray(idx, dtype=np.int64)
        out = np.empty((len(idx), self.dim), dtype=self.stores[0].vectors.dtype)
        which, local = self._locate(idx)
        for s in np.unique(which):
            store, sel = self.stores[s], which == s
            rows = local[sel]
            if store.row_index is not None:  # caption -> its image's stored row
                rows = np.asarray(store.row_index[rows], dtype=np.int64)
                release(store.row_index)
            order = np.argsort(rows, kind="stable")  # ascending reads from the memory map
            out[np.nonzero(sel)[0][order]] = store.vectors[rows[order]]  # fancy indexing copies out of the map
            release(store.vectors)
        return torch.from_numpy(out)

    def image_rows(self, idx: torch.Tensor | np.ndarray) -> np.ndarray | None:
        """In a mix of text and image stores, which rows of ``idx`` are image embeddings (bool, (b,)): they are
        the input as it will be at caption time and get no noise. None when the stores are of one modality."""
        if self._image_store is None:
            return None
        return self._image_store[self._locate(np.asarray(idx, dtype=np.int64))[0]]

    def attach_tokenizer(self, tokenizer: Any, *, build: bool = True, show_progress: bool | None = None) -> None:
        """Open (or build) each store's token cache for ``tokenizer``."""
        self.tokens = [token_cache(s, tokenizer, build=build, show_progress=show_progress) for s in self.stores]
        for cache in self.tokens:
            random_access(cache.ids)
            random_access(cache.offsets)

    def _need_tokens(self) -> list[TokenCache]:
        if self.tokens is None:
            raise RuntimeError("attach_tokenizer() first")
        return self.tokens

    def token_counts(self, idx: torch.Tensor | np.ndarray, max_length: int) -> np.ndarray:
        """Tokens each caption contributes to the loss: its ids cut to ``max_length - 1``, plus end-of-sequence."""
        idx = np.asarray(idx, dtype=np.int64)
        out = np.empty(len(idx), dtype=np.int64)
        which, local = self._locate(idx)
        for s in np.unique(which):
            sel = which == s
            out[sel] = self._need_tokens()[s].lengths(local[sel])
            release(self._need_tokens()[s].offsets)
        return np.minimum(out, max_length - 1) + 1

    def count_cut(self, idx: torch.Tensor | np.ndarray, max_length: int) -> int:
        """How many of the captions ``idx`` are longer than ``max_length - 1`` ids (cut in training)."""
        idx = np.asarray(idx, dtype=np.int64)
        total = 0
        for lo in range(0, len(idx), _CHUNK * 16):
            part = idx[lo : lo + _CHUNK * 16]
            which, local = self._locate(part)
            for s in np.unique(which):
                total += int((self._need_tokens()[s].lengths(local[which == s]) > max_length - 1).sum())
                release(self._need_tokens()[s].offsets)
        return total

    def tokens_at(self, idx: torch.Tensor | np.ndarray, *, max_length: int, eos: int,
                  pad: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded (b, t) ids with end-of-sequence, and mask; ``t`` trimmed to this batch's longest row."""
        idx = np.asarray(idx, dtype=np.int64)
        which, local = self._locate(idx)
        caches = self._need_tokens()
        rows = [caches[s].row(int(i)) for s, i in zip(which, local)]
        batch = pad_batch(rows, max_length=max_length, eos=eos, pad=pad)  # copies the rows out of the maps
        for s in np.unique(which):
            release(caches[s].ids)
            release(caches[s].offsets)
        return batch

    def iter_captions(self, idx: torch.Tensor | np.ndarray | None = None) -> Iterator[str]:
        """Stream the captions of rows ``idx`` (all rows if None) in row order, read from the stores' files."""
        keep = None
        if idx is not None:
            keep = np.zeros(len(self), dtype=bool)
            keep[np.asarray(idx, dtype=np.int64)] = True
        for s, store in enumerate(self.stores):
            part = None if keep is None else keep[self.starts[s] : self.starts[s + 1]]
            if store.path is None:
                yield from (r["caption"] for i, r in enumerate(store.records) if part is None or part[i])
            else:
                yield from iter_captions(store.path / "captions.jsonl", part)

    @property
    def captions(self) -> list[str]:
        """Every caption as a list (reads them all; training itself never does)."""
        return list(self.iter_captions())

    def mean_normalized(self, idx: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Mean of the L2-normalised embeddings of rows ``idx`` (float32), in one chunked pass."""
        from capdec.noise import normalize

        idx = np.asarray(idx, dtype=np.int64)
        total = torch.zeros(self.dim, dtype=torch.float64)
        for lo in range(0, len(idx), _CHUNK):
            total += normalize(self.embeddings_at(idx[lo : lo + _CHUNK]).float()).double().sum(0)
        return (total / max(1, len(idx))).float()

    def write_store(self, idx: torch.Tensor | np.ndarray, out_dir: str | os.PathLike, *,
                    show_progress: bool | None = None) -> Path:
        """Rows ``idx`` (L2-normalised, in the stored dtype) and their captions as an embedding store at
        ``out_dir``, written in chunks (memory: one chunk). A store already there of the same rows of the
        same stores is kept as it is."""
        from capdec.store import CAPTIONS, EMBEDDINGS, META, NpyWriter, _make_meta
        from capdec.utils import atomic_dir, read_artifact_json, write_json

        idx = np.asarray(idx, dtype=np.int64)
        assert (np.diff(idx) > 0).all(), "rows must be sorted and distinct (captions are read in row order)"
        out_dir = Path(out_dir)
        digest = hashlib.sha256(idx.tobytes())
        for s in self.stores:  # a re-made store changes its meta.json (its creation time at least)
            digest.update(hashlib.sha256((s.path / META).read_bytes()).digest() if s.path else b"memory")
        corpus = {"format": ROWS_OF_STORES, "stores": self.sources, "rows_sha256": digest.hexdigest()}
        try:
            if read_artifact_json(out_dir / META)["corpus"] == corpus and (out_dir / EMBEDDINGS).is_file():
                return out_dir
        except (OSError, ValueError, KeyError, TypeError):
            pass
        dtype = str(self.stores[0].vectors.dtype)
        meta = _make_meta(self.encoder_spec, self.encoder_identity, (len(idx), self.dim), dtype, corpus,
                          {"read": len(idx), "empty_skipped": 0, "duplicates_removed": 0, "truncated": None})
        with atomic_dir(out_dir, overwrite=True, replaceable=_rows_store, flag="a training run") as tmp:
            with open(tmp / EMBEDDINGS, "wb") as f, \
                    progress(total=len(idx), desc="memory rows", unit="row", show=show_progress) as bar:
                out = NpyWriter(f, (len(idx), self.dim), dtype)
                for lo in range(0, len(idx), _CHUNK):
                    out.write(self.gather(idx[lo : lo + _CHUNK], normalized=True).numpy())
                    bar.update(min(_CHUNK, len(idx) - lo))
                out.close()
            with open(tmp / CAPTIONS, "w", encoding="utf-8") as f:
                for caption in self.iter_captions(idx):  # in row order, as idx is sorted
                    f.write(json.dumps({"caption": caption}, ensure_ascii=False) + "\n")
            write_json(tmp / META, meta)  # last: its presence marks a complete store
        return out_dir

    def gather(self, idx: torch.Tensor | np.ndarray, *, normalized: bool = False) -> torch.Tensor:
        """(len(idx), d) embeddings in the stored dtype, read in chunks (memory: the result only).

        ``normalized``: L2-normalise each row (in float32, chunk by chunk) before storing it.
        """
        from capdec.noise import normalize

        idx = np.asarray(idx, dtype=np.int64)
        out = torch.empty((len(idx), self.dim), dtype=self.dtype)
        for lo in range(0, len(idx), _CHUNK):
            rows = self.embeddings_at(idx[lo : lo + _CHUNK])
            out[lo : lo + _CHUNK] = normalize(rows.float()).to(self.dtype) if normalized else rows
        return out


class CaptionTexts:
    """Captions of some rows as a re-iterable with a length (a tokenizer trainer's input), read lazily."""

    def __init__(self, data: TextData, idx: torch.Tensor | np.ndarray):
        self.data, self.idx = data, idx

    def __iter__(self) -> Iterator[str]:
        return self.data.iter_captions(self.idx)

    def __len__(self) -> int:
        return len(self.idx)


def load_text_data(stores: list[Any], mix_weights: list[float] | None = None) -> TextData:
    """Open the stores (paths or EmbeddingStore objects) and check they share one encoder."""
    from capdec.store import EmbeddingStore

    if not stores:
        raise InputError("no embedding store given")
    opened = [s if not isinstance(s, (str, os.PathLike)) else EmbeddingStore.open(s) for s in stores]
    first = opened[0]
    for s in opened[1:]:
        check_identity(first.encoder_identity, s.encoder_identity, what=f"embedding store {getattr(s, 'path', s)}")
        if s.dim != first.dim:
            raise InputError(f"embedding store {s.path} has dimension {s.dim}, {first.path} has {first.dim}")
    if mix_weights is not None:
        if len(mix_weights) != len(opened):
            raise InputError(f"{len(mix_weights)} mixing weights given for {len(opened)} stores")
        if any(w < 0 for w in mix_weights) or sum(mix_weights) <= 0:
            raise InputError("mixing weights must be ≥ 0 and not all 0")
    modalities = {getattr(s, "modality", "text") for s in opened}
    modality = modalities.pop() if len(modalities) == 1 else "mixed"
    if modality == "mixed":
        logger.info("mixing text and image embedding stores: the noise applies to the text stores' rows; the "
                    "image stores' rows are used as images are at caption time (normalised)")
    weights = None
    if mix_weights is not None:
        # each store gets a share of every epoch proportional to its weight, whatever its size
        weights = torch.cat([torch.full((len(s),), w / max(1, len(s))) for s, w in zip(opened, mix_weights)])
    return TextData(stores=opened, encoder_spec=first.encoder_spec, encoder_identity=first.encoder_identity,
                    sample_weights=weights, sources=[str(getattr(s, "path", None) or "<memory>") for s in opened],
                    modality=modality)


def _rows_store(path: Path) -> str | None:
    """None when ``path`` is a memory-rows store :meth:`TextData.write_store` wrote (its meta.json says so) and
    holds nothing else, else why it is not: only such a directory is replaced."""
    from capdec.store import CAPTIONS, EMBEDDINGS, META

    def recognised(meta: Any) -> bool:
        corpus = meta.get("corpus") if isinstance(meta, dict) else None
        return isinstance(corpus, dict) and corpus.get("format") == ROWS_OF_STORES

    return own_dir(path, marker=META, recognised=recognised, entries=(META, EMBEDDINGS, CAPTIONS),
                   kind="the memory-rows store of a training run", marked="its kind")


__all__ = ["CaptionTexts", "TextData", "load_text_data"]
