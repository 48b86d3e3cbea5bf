"""The embedding store: a corpus's normalised CLIP text embeddings on disk.

A store is a directory::

    STORE/
      meta.json         format "capdec.embeddings/1", encoder spec + identity, dim, count, dtype,
                        precision (what the text tower computed in: float32, bfloat16, float16),
                        corpus provenance (paths, sha256, reader options), stats, capdec version
      embeddings.npy    (count, dim) float16 or float32, L2-normalised rows
      captions.jsonl    one {"caption": ..., **metadata} per row, aligned with embeddings.npy
      rows.npy          only in an image store (below): each caption's row of embeddings.npy
      token-cache/      written by training (capdec.tokencache): the captions' token ids, one <key>/ per tokenizer

``--overwrite`` (``overwrite=True``) replaces a store holding these names only (:func:`replaceable`); a
directory holding anything else (a user's notes, another tool's output) is refused, naming it.

An *image* store (``modality`` "image", format ``capdec.embeddings/2``, made by
:func:`capdec.image_store.embed_image_dataset`) holds one embedding per image and several captions per
image: ``embeddings.npy`` has ``rows`` rows (one per image) and ``rows.npy`` maps each caption to its
image's row, so no embedding is stored once per caption. Opened, it reads like a text store: ``embeddings``
is then a (count, dim) per-caption :class:`RowView` that reads through the row map on demand (nothing is
copied per caption), ``vectors`` the stored rows.

:func:`embed_corpus` builds one. Work goes to a hidden sibling ``.STORE.partial/`` in shards of
``shard_size`` captions, each written atomically, so an interrupted run resumes where it stopped;
the finished store is assembled under a temporary name and renamed, so ``STORE`` is either absent, the
old store, or the complete new one — never half-written.

:class:`EmbeddingStore` reads one back (``EmbeddingStore.open(path)``); :func:`write_store` and
:meth:`EmbeddingStore.from_arrays` cover code that already has embeddings in memory.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from capdec import distributed
from capdec.artifacts import (
    check_count,
    check_fields,
    check_rows,
    jsonable,
    load_matrix,
    own_dir,
    read_meta,
    read_rows,
    write_rows,
)
from capdec.configs import MAX_DIM
from capdec.corpus import Corpus, captions_sha256, read_corpus
from capdec.encoders.base import EncoderError, check_identity
from capdec.errors import InputError
from capdec.output import check_replaceable
from capdec.tokencache import CACHE_DIR as TOKEN_CACHE
from capdec.utils import atomic_dir, progress, read_artifact_json, write_json

logger = logging.getLogger(__name__)

FORMAT = "capdec.embeddings/1"
ROWS_FORMAT = "capdec.embeddings/2"  # a store with a caption -> row map (image stores); /1 readers refuse it
MODALITIES = ("text", "image")
_PARTIAL_FORMAT = "capdec.embeddings.partial/1"
DTYPES = ("float16", "float32")
META, EMBEDDINGS, CAPTIONS, ROWS = "meta.json", "embeddings.npy", "captions.jsonl", "rows.npy"
# what a store directory holds (the module docstring); a directory holding anything else is never replaced
STORE_ENTRIES = frozenset({META, EMBEDDINGS, CAPTIONS, ROWS, TOKEN_CACHE})
# rows whose norm is further than this from 1 mean the caller forgot to normalise (fp16 is ~1e-3 off)


@dataclass
class EmbedRun:
    """What one :func:`embed_corpus` call did (attached to the store it returns as ``.embed_run``)."""

    encoded: int  # captions encoded by this call
    resumed: int  # captions taken from shards of an earlier, interrupted run
    up_to_date: bool  # the store already existed for this corpus + encoder; nothing was done
    seconds: float


class RowView:
    """The (count, dim) per-caption embeddings of a store with a row map, read through the map on demand.

    Indexing gathers the rows asked for (an int gives one (dim,) row; a slice, list or array of
    captions gives a (k, dim) copy); ``np.asarray(view)`` reads every caption's row, in chunks.
    """

    def __init__(self, vectors: np.ndarray, row_index: np.ndarray):
        self.vectors, self.row_index = vectors, row_index
        self.shape = (len(row_index), int(vectors.shape[1]))
        self.dtype = vectors.dtype
        self.ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        cols = slice(None)
        if isinstance(key, tuple):
            key, cols = key
        return np.array(self.vectors[np.asarray(self.row_index[key])], copy=True)[..., cols]

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        out = np.empty(self.shape, dtype=dtype or self.dtype)
        for lo in range(0, len(self), 65536):
            out[lo : lo + 65536] = self[lo : lo + 65536]
        return out

    def __repr__(self) -> str:
        return f"RowView(captions={self.shape[0]}, rows={len(self.vectors)}, dim={self.shape[1]}, dtype={self.dtype})"


class EmbeddingStore:
    """Embeddings + captions + metadata; from disk (:meth:`open`) or memory (:meth:`from_arrays`)."""

    def __init__(self, meta: dict[str, Any], embeddings: np.ndarray, *, path: Path | None = None,
                 records: list[dict[str, Any]] | None = None, row_index: np.ndarray | None = None):
        self.meta = meta
        self.vectors = embeddings  # the stored rows: (count, dim), or (rows, dim) with a row index
        self.row_index = row_index  # (count,) caption -> row of ``vectors``; None: one row per caption
        # (count, dim) per caption: a read-only memory map of a text store; a view through the row index
        self.embeddings = embeddings if row_index is None else RowView(embeddings, row_index)
        self.path = path
        self._records = records
        self.embed_run: EmbedRun | None = None

    # -- reading --------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, *, mmap: bool = True) -> EmbeddingStore:
        """Open a store directory; ``mmap=False`` reads the embeddings into memory."""
        path = Path(path)
        partial = path.parent / f".{path.name}.partial"
        hint = f" (an unfinished run left {partial}; rerun 'capdec embed' to resume it)" if partial.exists() else ""
        if not path.is_dir():
            raise InputError(f"{path}: no such embedding store (a directory made by 'capdec embed'){hint}")
        if not (path / META).is_file():
            raise InputError(f"{path}: not an embedding store, no {META}{hint}; create one with 'capdec embed'")
        # until meta.json names a store format, --overwrite does not replace the directory (replaceable)
        meta = read_meta(path / META, redo="the store is damaged; remove it and make it again")
        fmt = meta.get("format") if isinstance(meta, dict) else None
        if fmt not in (FORMAT, ROWS_FORMAT):
            if isinstance(fmt, str) and fmt.startswith("capdec.embeddings/"):
                raise InputError(f"{path}: embedding store format {fmt!r} is not supported by this capdec "
                                 f"(it reads {FORMAT!r} and {ROWS_FORMAT!r}); upgrade capdec, or remove the store and "
                                 f"make it again")
            raise InputError(f"{path / META}: not an embedding store meta file (format {fmt!r}, "
                             f"expected {FORMAT!r})")
        redo = _redo(meta, path)
        missing = [k for k in ("encoder", "encoder_identity", "dim", "count", *(("rows",) if fmt == ROWS_FORMAT else ()))
                   if k not in meta]
        if missing:
            raise InputError(f"{path / META}: incomplete, missing {', '.join(missing)}; {redo}")
        check_fields(meta, path / META, {"encoder": dict, "encoder_identity": dict, "dim": int, "count": int,
                                         "rows": int | None, "dtype": str | None, "modality": str | None,
                                         "corpus": dict | None, "stats": dict | None}, redo=redo)
        check_count(meta["dim"], "dim", path / META, low=1, high=MAX_DIM, redo=redo)
        for key in ("count", "rows"):
            if key in meta:
                check_count(meta[key], key, path / META, redo=redo)
        if meta.get("modality", "text") not in MODALITIES:
            raise InputError(f"{path / META}: modality must be one of {', '.join(MODALITIES)}, got "
                             f"{meta['modality']!r}; {redo}")
        for name in (EMBEDDINGS, CAPTIONS):
            if not (path / name).is_file():
                raise InputError(f"{path}: incomplete embedding store, {name} is missing; {redo}")
        n_rows = int(meta["rows"]) if fmt == ROWS_FORMAT else int(meta["count"])
        embeddings = load_matrix(path / EMBEDDINGS, (n_rows, int(meta["dim"])), mmap=mmap, redo=redo,
                                 meta_name=META)
        row_index = (_read_row_index(path, int(meta["count"]), n_rows, mmap=mmap, redo=redo) if fmt == ROWS_FORMAT
                     else None)
        return cls(meta, embeddings, path=path, row_index=row_index)

    @classmethod
    def from_arrays(cls, captions: Sequence[str] | Corpus, embeddings: np.ndarray | torch.Tensor, *,
                    encoder: Any = None, encoder_spec: dict[str, Any] | None = None,
                    encoder_identity: dict[str, Any] | None = None,
                    records: Sequence[dict[str, Any]] | None = None,
                    stats: dict[str, Any] | None = None, row_index: Sequence[int] | np.ndarray | None = None,
                    modality: str = "text") -> EmbeddingStore:
        """An in-memory store for embeddings computed elsewhere (rows must be L2-normalised).

        ``row_index`` (one entry per caption) makes ``embeddings`` one row per *image*, shared by that
        image's captions; ``modality`` ("text" or "image") says what the embeddings are of.

        Give either ``encoder`` (an :class:`~capdec.encoders.Encoder`) or its ``encoder_spec`` and
        ``encoder_identity``. ``captions`` may be a :class:`Corpus`, whose metadata and provenance are
        kept; ``records`` are extra per-row metadata for a plain list. ``stats`` defaults to the
        corpus's counts plus ``truncated`` (asked of ``encoder``; None when only a spec is given).
        """
        if encoder is not None:
            encoder_spec, encoder_identity = encoder.spec, encoder.identity
        if encoder_spec is None or encoder_identity is None:
            raise TypeError("from_arrays needs encoder=, or both encoder_spec= and encoder_identity=")
        if isinstance(captions, Corpus):
            if records is not None:
                raise TypeError("records= is taken from the Corpus; do not pass both")
            caption_list, records, corpus_info = captions.captions, captions.meta, captions.describe()
            stats = stats if stats is not None else captions.stats.as_dict()
        else:
            caption_list = list(captions)
            corpus_info = {"paths": [], "captions_sha256": captions_sha256(caption_list), "format": "memory"}
            stats = stats if stats is not None else {"read": len(caption_list), "empty_skipped": 0,
                                                     "duplicates_removed": 0}
        if "truncated" not in stats:  # None: no encoder to ask
            stats = {**stats, "truncated": int(encoder.count_truncated(caption_list)) if encoder is not None else None}
        if not all(isinstance(c, str) for c in caption_list):
            raise InputError("captions must be strings")
        if records is not None and len(records) != len(caption_list):
            raise InputError(f"{len(records)} records for {len(caption_list)} captions")
        if isinstance(embeddings, torch.Tensor):
            embeddings = embeddings.detach().cpu().float().numpy()
        embeddings = np.asarray(embeddings)
        if modality not in MODALITIES:
            raise InputError(f"modality must be one of {', '.join(MODALITIES)}, got {modality!r}")
        if row_index is not None:
            row_index = np.asarray(row_index, dtype=np.int64)
            if row_index.shape != (len(caption_list),):
                raise InputError(f"row_index has shape {row_index.shape}, expected one row per caption "
                                 f"({len(caption_list)},)")
            if len(row_index) and (row_index.min() < 0 or row_index.max() >= len(embeddings)):
                raise InputError(f"row_index points outside the {len(embeddings)} embedding rows")
        if embeddings.ndim != 2 or (row_index is None and embeddings.shape[0] != len(caption_list)):
            raise InputError(f"embeddings of shape {tuple(embeddings.shape)} do not match "
                             f"{len(caption_list)} captions; expected ({len(caption_list)}, dim)")
        if embeddings.dtype not in (np.float16, np.float32):
            embeddings = embeddings.astype(np.float32)
        check_rows(embeddings, "embeddings")
        rows = [{"caption": c, **{k: v for k, v in (records[i] if records is not None else {}).items()
                                  if k != "caption"}}
                for i, c in enumerate(caption_list)]
        meta = _make_meta(encoder_spec, encoder_identity, (len(caption_list), embeddings.shape[1]),
                          str(embeddings.dtype), corpus_info, stats)
        if modality != "text":
            meta["modality"] = modality
        if row_index is not None:
            meta.update(format=ROWS_FORMAT, rows=int(embeddings.shape[0]))
        return cls(meta, embeddings, records=rows, row_index=row_index)

    @property
    def records(self) -> list[dict[str, Any]]:
        """One dict per row: ``{"caption": ..., **metadata}`` (loaded on first use)."""
        if self._records is None:
            self._records = read_rows(self.path / CAPTIONS, len(self), redo=_redo(self.meta, self.path))
        return self._records

    @property
    def captions(self) -> list[str]:
        return [r["caption"] for r in self.records]

    @property
    def encoder_spec(self) -> dict[str, Any]:
        return self.meta["encoder"]

    @property
    def encoder_identity(self) -> dict[str, Any]:
        return self.meta["encoder_identity"]

    @property
    def modality(self) -> str:
        """What the embeddings are of: "text" (captions; CapDec) or "image" (paired images; ClipCap)."""
        return str(self.meta.get("modality", "text"))

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def dtype(self) -> str:
        return str(self.meta.get("dtype", self.embeddings.dtype))

    def __len__(self) -> int:
        return int(self.meta["count"])

    def tensor(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """All embeddings as a (count, dim) CPU tensor (a copy, safe to modify)."""
        return torch.from_numpy(np.array(self.embeddings, dtype=np.float32)).to(dtype)

    def check_encoder(self, encoder: Any) -> None:
        """Raise :class:`~capdec.encoders.EncoderMismatchError` unless ``encoder`` made these embeddings."""
        check_identity(self.encoder_identity, encoder.identity, what=f"embedding store {self.path or '(memory)'}")

    # -- writing --------------------------------------------------------------------------------
    def save(self, out_dir: str | os.PathLike, *, dtype: str | None = None, overwrite: bool = False) -> EmbeddingStore:
        """Write this store to ``out_dir`` atomically and return the store opened from there."""
        dtype = dtype or self.dtype
        _check_dtype(dtype)
        out_dir = Path(out_dir)
        replace = _check_target(out_dir, overwrite=overwrite, what=None)
        meta = {**self.meta, "dtype": dtype}
        with atomic_dir(out_dir, overwrite=replace, replaceable=replaceable) as tmp:
            arr = np.lib.format.open_memmap(tmp / EMBEDDINGS, mode="w+", dtype=dtype, shape=self.vectors.shape)
            for lo in range(0, len(self.vectors), 65536):
                arr[lo : lo + 65536] = self.vectors[lo : lo + 65536]
            arr.flush()
            del arr
            if self.row_index is not None:
                np.save(tmp / ROWS, self.row_index, allow_pickle=False)
            write_rows(tmp / CAPTIONS, self.records)
            write_json(tmp / META, meta)  # last: its presence marks a complete store
        return EmbeddingStore.open(out_dir)

    def __repr__(self) -> str:
        return (f"EmbeddingStore({str(self.path) if self.path else 'memory'}, count={len(self)}, dim={self.dim}, "
                f"dtype={self.dtype}, encoder={self.encoder_spec})")


def write_store(out_dir: str | os.PathLike, captions: Sequence[str] | Corpus, embeddings: np.ndarray | torch.Tensor,
                encoder: Any, *, records: Sequence[dict[str, Any]] | None = None, dtype: str = "float16",
                stats: dict[str, Any] | None = None, overwrite: bool = False) -> EmbeddingStore:
    """Write embeddings computed elsewhere as a store (see :meth:`EmbeddingStore.from_arrays`)."""
    store = EmbeddingStore.from_arrays(captions, embeddings, encoder=encoder, records=records, stats=stats)
    return store.save(out_dir, dtype=dtype, overwrite=overwrite)


def embed_corpus(corpus_or_path: Corpus | str | os.PathLike | Sequence[str | os.PathLike],
                 out_dir: str | os.PathLike, encoder: Any, *, dtype: str = "float16", batch_size: int = 256,
                 shard_size: int = 4096, overwrite: bool = False, show_progress: bool | None = None,
                 **reader_opts: Any) -> EmbeddingStore:
    """Embed a corpus with ``encoder`` into the store ``out_dir``; resumable and atomic.

    ``corpus_or_path`` is a :class:`Corpus` or one or several corpus files, read with
    :func:`capdec.corpus.read_corpus` and ``reader_opts`` (``format``, ``field``, ``column``,
    ``dedupe``). If ``out_dir`` already holds a store for the same captions, encoder and dtype, nothing
    is done; a store made from anything else is an error unless ``overwrite=True`` (the old store stays
    in place until the new one is complete).
    """
    start = time.perf_counter()
    _check_dtype(dtype)
    if batch_size < 1 or shard_size < 1:
        raise InputError(f"batch_size and shard_size must be positive (got {batch_size}, {shard_size})")
    if isinstance(corpus_or_path, Corpus):
        if reader_opts:
            raise TypeError(f"reader options {sorted(reader_opts)} only apply when reading files")
        corpus = corpus_or_path
    elif isinstance(corpus_or_path, (list, tuple)) and corpus_or_path and not all(
            isinstance(p, (str, os.PathLike)) for p in corpus_or_path):
        raise TypeError("corpus_or_path must be a Corpus or corpus file path(s); for captions in memory "
                        "use capdec.corpus.captions_from_list")
    else:
        corpus = read_corpus(corpus_or_path, **reader_opts)
    where = ", ".join(corpus.paths) or "the in-memory corpus"
    if not corpus.captions:
        raise InputError(f"no captions to embed in {where} ({corpus.stats.read} read, "
                         f"{corpus.stats.empty_skipped} empty)")

    out_dir = Path(out_dir)
    identity = jsonable(encoder.identity)  # compared with what JSON files recorded
    precision = encoder.text_precision
    wanted = {"captions_sha256": corpus.captions_sha256, "encoder_identity": identity, "dtype": dtype,
              "precision": precision}
    replace = _check_target(out_dir, overwrite=overwrite, what=wanted)
    if replace is None:  # already up to date
        store = EmbeddingStore.open(out_dir)
        logger.info("%s is up to date (%d captions, same corpus and encoder); nothing to do", out_dir, len(store))
        store.embed_run = EmbedRun(encoded=0, resumed=0, up_to_date=True, seconds=time.perf_counter() - start)
        return store

    partial = out_dir.parent / f".{out_dir.name}.partial"
    manifest = {"format": _PARTIAL_FORMAT, "captions_sha256": corpus.captions_sha256,
                "encoder_identity": identity, "precision": precision, "count": len(corpus), "dim": int(encoder.dim),
                "shard_size": shard_size}
    dist_info = distributed.info()
    n = len(corpus)
    shards = [(lo, min(lo + shard_size, n)) for lo in range(0, n, shard_size)]
    done, todo = plan_shards(partial, manifest, len(shards),
                             lambda i: load_shard(partial, i, shards[i][1] - shards[i][0], encoder.dim) is not None)
    resumed = sum(shards[i][1] - shards[i][0] for i in done)
    if done and dist_info.is_main:
        logger.info("resuming %s: %d of %d shards (%d captions) already embedded", out_dir, len(done),
                    len(shards), resumed)
    mine = sum(shards[i][1] - shards[i][0] for i in todo)
    encoded = 0
    bar_kw = ({"total": n, "initial": resumed} if not dist_info.enabled
              else {"total": mine, "desc": f"embed (rank 0 of {dist_info.world_size})"})
    with progress(**{"desc": "embed", "unit": "caption", **bar_kw},
                  show=show_progress if dist_info.is_main else False) as bar:
        for i in todo:
            lo, hi = shards[i]
            # a shard is tokenised once and encoded in batches of similar length: what a shard holds does not
            # depend on the number of processes or on resuming, so neither do the bytes of the store
            tokens = encoder.tokenize_text(corpus.captions[lo:hi])
            shard = encoder.encode_tokens(tokens, batch_size=batch_size, on_batch=bar.update).numpy()
            encoded += hi - lo
            if shard.shape != (hi - lo, encoder.dim):
                raise EncoderError(f"encoder returned shape {shard.shape} for {hi - lo} captions, expected "
                                   f"({hi - lo}, {encoder.dim})")
            if not np.isfinite(shard).all():
                bad = lo + int(np.nonzero(~np.isfinite(shard).all(axis=1))[0][0])
                raise EncoderError(f"encoder returned non-finite values for caption {bad} "
                                   f"({corpus.captions[bad][:80]!r}); try --precision fp32")
            save_shard(partial, i, shard, truncated=tokens.truncated)
    if dist_info.enabled:
        encoded = int(distributed.all_reduce_sum(torch.tensor([encoded])).item())  # waits for every rank's shards

    if dist_info.is_main:
        truncated = sum(int(shard_info(partial, i)["truncated"]) for i in range(len(shards)))
        if truncated:
            logger.warning("%d of %d captions were longer than the encoder's context (%s tokens) and were "
                           "truncated by its tokenizer", truncated, n, getattr(encoder, "context_length", "?"))
        meta = _make_meta(encoder.spec, encoder.identity, (n, int(encoder.dim)), dtype, corpus.describe(),
                          {**corpus.stats.as_dict(), "truncated": truncated})
        meta["precision"] = precision
        with atomic_dir(out_dir, overwrite=replace, replaceable=replaceable) as tmp:
            arr = np.lib.format.open_memmap(tmp / EMBEDDINGS, mode="w+", dtype=dtype, shape=(n, int(encoder.dim)))
            for i, (lo, hi) in enumerate(shards):
                arr[lo:hi] = load_shard(partial, i, hi - lo, encoder.dim)
            arr.flush()
            del arr
            write_rows(tmp / CAPTIONS, [{"caption": c, **m} for c, m in zip(corpus.captions, corpus.meta)])
            write_json(tmp / META, meta)  # last: its presence marks a complete store
        shutil.rmtree(partial, ignore_errors=True)
    distributed.barrier()  # the store is complete before any rank returns it

    seconds = time.perf_counter() - start
    store = EmbeddingStore.open(out_dir)
    logger.info("embedded %d captions into %s in %.1f s (%d resumed, %d truncated)", n, out_dir, seconds,
                resumed, store.meta["stats"]["truncated"])
    store.embed_run = EmbedRun(encoded=encoded, resumed=resumed, up_to_date=False, seconds=seconds)
    return store


# -- helpers ------------------------------------------------------------------------------------


class NpyWriter:
    """A ``.npy`` file of known shape written block of rows by block (memory: one block).

    Written through a file, not a memory map: a written map's dirty pages would count as this process's
    memory until the kernel writes them back.
    """

    def __init__(self, f: BinaryIO, shape: tuple[int, ...], dtype: str | np.dtype):
        self.f, self.dtype, self.rows, self.written = f, np.dtype(dtype), shape[0], 0
        np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                 "fortran_order": False, "shape": shape})

    def write(self, block: np.ndarray) -> None:
        self.f.write(np.ascontiguousarray(block, dtype=self.dtype).tobytes())
        self.written += len(block)

    def close(self) -> None:
        assert self.written == self.rows, (self.written, self.rows)


def _make_meta(spec: dict[str, Any], identity: dict[str, Any], shape: tuple[int, ...], dtype: str,
               corpus: dict[str, Any], stats: dict[str, Any]) -> dict[str, Any]:
    from capdec import __version__

    return {
        "format": FORMAT,
        "encoder": spec,
        "encoder_identity": identity,
        "dim": int(shape[1]),
        "count": int(shape[0]),
        "normalized": True,
        "dtype": dtype,
        "corpus": corpus,
        "stats": stats,
        "capdec_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise InputError(f"unknown store dtype {dtype!r}; use one of {', '.join(DTYPES)}")


def check_out_dir(out_dir: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Raise :class:`InputError` unless :meth:`EmbeddingStore.save` may write ``out_dir``: absent, an empty
    directory or, with ``overwrite``, an embedding store holding nothing else (:func:`replaceable`). Anything
    else is never replaced. For a command to check its output before the work, as ``save`` checks again when it
    writes."""
    _check_target(Path(out_dir), overwrite=overwrite, what=None)


def replaceable(path: str | os.PathLike) -> str | None:
    """None when the directory ``path`` is an embedding store capdec wrote (its ``meta.json`` says so) holding only
    what capdec writes in one (:data:`STORE_ENTRIES`), else why it is not: ``overwrite`` replaces only such a
    directory (or an empty one), damaged or not (a file of it missing or truncated is no entry capdec did not
    write)."""
    return own_dir(path, marker=META, entries=STORE_ENTRIES, recognised=_recognised, kind="a capdec embedding store",
                   marked=f"format {FORMAT} or {ROWS_FORMAT}")


def _recognised(meta: Any) -> bool:
    """Whether a parsed ``meta.json`` names a store format this capdec writes (what --overwrite may replace)."""
    return isinstance(meta, dict) and meta.get("format") in (FORMAT, ROWS_FORMAT)


def _marked(path: Path) -> bool:
    """Whether ``path``'s ``meta.json`` names a store format (whatever else the directory holds)."""
    try:
        return _recognised(read_artifact_json(path / META))
    except (OSError, ValueError):
        return False


def _redo(meta: Any, path: Path) -> str:
    """What to do about the damaged store ``path`` whose ``meta`` names a store format: make it again over it
    (--overwrite replaces such a store, damaged or not: :func:`_check_target`), with the command that made it."""
    corpus = meta.get("corpus") if isinstance(meta, dict) else None
    pseudo = isinstance(corpus, dict) and corpus.get("format") == "pseudo-pairs"  # calibrate.PSEUDO_PAIRS
    again = f"capdec calibrate ... --pseudo-pairs {path}" if pseudo else f"capdec embed ... --out {path}"
    return f"the store is damaged; re-create it with '{again} --overwrite'"


def _check_target(out_dir: Path, *, overwrite: bool, what: dict[str, Any] | None) -> bool | None:
    """Decide what to do with an existing ``out_dir``.

    Returns False (nothing there, build it), True (replace an old store / empty dir) or None (a
    store matching ``what`` exists: nothing to do). Refuses anything that is not a store, and with ``overwrite``
    a store holding anything capdec did not write there (:func:`replaceable`). A store capdec wrote that no longer
    opens (a file missing or truncated) is replaced with ``overwrite``, without being opened.
    """
    if not out_dir.exists():
        return False
    if not out_dir.is_dir():
        raise InputError(f"{out_dir} exists and is not a directory; choose another output path")
    if not any(out_dir.iterdir()):
        return True
    why = replaceable(out_dir)
    if overwrite and why is None:  # a store capdec wrote, holding nothing else: replaced, damaged or not
        return True
    try:
        existing = EmbeddingStore.open(out_dir)
    except InputError as e:
        if why is None:  # a damaged store capdec wrote: the error says to make it again with --overwrite
            raise
        if _marked(out_dir):  # a damaged store that also holds a user's files: refused, naming them
            check_replaceable(out_dir, replaceable)
        # never delete a directory we did not make, even with overwrite
        raise InputError(f"{out_dir} exists and is not a complete embedding store ({e}); choose another "
                         f"output path or remove it yourself") from e
    if overwrite:
        check_replaceable(out_dir, replaceable)  # holds what capdec did not write: refused, naming it
        return True
    if what is not None:
        diffs = []
        if existing.meta.get("corpus", {}).get("captions_sha256") != what["captions_sha256"]:
            diffs.append("a different corpus (or reader options)")
        if existing.encoder_identity != what["encoder_identity"]:
            diffs.append(f"a different encoder ({existing.encoder_spec})")
        if existing.dtype != what["dtype"]:
            diffs.append(f"dtype {existing.dtype} (asked for {what['dtype']})")
        made_in = existing.meta.get("precision")  # absent in stores made before it was recorded
        if made_in is not None and made_in != what["precision"]:
            diffs.append(f"text computed in {made_in} (asked for {what['precision']}; --precision)")
        if not diffs:
            return None
        raise InputError(f"{out_dir} already holds an embedding store made from {' and '.join(diffs)}; "
                         f"pass overwrite=True (--overwrite) to replace it, or choose another output path")
    raise InputError(f"{out_dir} already holds an embedding store; pass overwrite=True (--overwrite) to replace it")


def plan_shards(partial: Path, manifest: dict[str, Any], n_shards: int,
                complete: Callable[[int], bool]) -> tuple[set[int], list[int]]:
    """The shards an earlier run finished (``complete(i)``), and this rank's share of the others.

    Under torchrun rank 0 alone prepares the partial directory ``partial`` (kept when its manifest
    matches, else started over) and looks at it; every rank gets its answer. The rest are dealt out
    round-robin, so the ranks split the work and each shard is computed by one rank.
    """
    dist_info = distributed.info()
    done = None
    if dist_info.is_main:
        _prepare_partial(partial, manifest)
        done = {i for i in range(n_shards) if complete(i)}
    done = distributed.broadcast_object(done)  # also a barrier: the partial dir exists from here on
    return done, [i for i in range(n_shards) if i not in done][dist_info.rank :: dist_info.world_size]


def _prepare_partial(partial: Path, manifest: dict[str, Any]) -> None:
    if partial.exists():
        try:
            old = read_artifact_json(partial / "manifest.json")
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            old = None
        if old == manifest:
            return
        logger.warning("%s is left from an unfinished run with a different corpus, encoder or shard size; "
                       "starting over", partial)
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    write_json(partial / "manifest.json", manifest)


def _shard_path(partial: Path, i: int) -> Path:
    return partial / f"shard-{i:06d}.npy"


def save_shard(partial: Path, i: int, shard: np.ndarray, **info: Any) -> None:
    """Write shard ``i`` (float32 rows) and its JSON sidecar (``count`` plus ``info``) atomically."""
    # the sidecar first, the array last: an existing .npy means a complete shard
    write_json(partial / f"shard-{i:06d}.json", {"count": int(shard.shape[0]), **info})
    path = _shard_path(partial, i)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, shard, allow_pickle=False)
    os.replace(tmp, path)


def load_shard(partial: Path, i: int, rows: int, dim: int) -> np.ndarray | None:
    """Shard ``i`` as written by :func:`save_shard`, or None when missing, unreadable or not (rows, dim)."""
    path = _shard_path(partial, i)
    if not path.is_file() or not (partial / f"shard-{i:06d}.json").is_file():
        return None
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        logger.warning("unreadable shard %s (%s); recomputing it", path, e)
        return None
    if arr.shape != (rows, dim) or arr.dtype != np.float32:
        logger.warning("shard %s has shape %s %s, expected (%d, %d) float32; recomputing it",
                       path, arr.shape, arr.dtype, rows, dim)
        return None
    return arr


def shard_info(partial: Path, i: int) -> dict[str, Any]:
    """The sidecar of shard ``i`` (``count`` and what :func:`save_shard` was given)."""
    return read_artifact_json(partial / f"shard-{i:06d}.json")


def _read_row_index(path: Path, count: int, n_rows: int, *, redo: str, mmap: bool = True) -> np.ndarray:
    try:
        rows = np.load(path / ROWS, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise InputError(f"{path / ROWS}: missing or unreadable ({e}); {redo}") from e
    ok = rows.shape == (count,) and rows.dtype.kind in "iu"
    for lo in range(0, count if ok else 0, 1 << 20):  # in chunks: a memory map is never read whole
        chunk = rows[lo : lo + (1 << 20)]
        ok = ok and chunk.min() >= 0 and chunk.max() < n_rows
    if not ok:
        raise InputError(f"{path / ROWS}: expected {count} row numbers in [0, {n_rows}), got shape "
                         f"{rows.shape} {rows.dtype}; {redo}")
    return rows


__all__ = ["DTYPES", "FORMAT", "MODALITIES", "ROWS_FORMAT", "STORE_ENTRIES", "EmbedRun", "EmbeddingStore",
           "check_out_dir", "embed_corpus", "replaceable", "write_store"]
