"""A text memory on disk: an index over an embedding store, not a second copy of its format.

Layout::

    MEM/meta.json          capdec.memory/2: the store (a path, and the sha256 of its meta.json so a re-made
                           store is noticed), the search config, which faiss indexes are saved
    MEM/store/             only when the memory holds its own rows (a memory of in-memory arrays, a
                           checkpoint's memory/): an ordinary embedding store (capdec.store)
    MEM/index-*.faiss      optional faiss indexes

Embeddings and captions are read through :mod:`capdec.store` (the artefact layer's checks).
``capdec.memory/1`` directories (embeddings.npy + captions.jsonl beside meta.json, before 0.x) still
load. :func:`open_memory_dir` reads a directory into the arguments of a
:class:`~capdec.memory.TextMemory`; :func:`save_memory` writes one.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from capdec.artifacts import check_count, check_fields, load_matrix, own_dir, read_meta, read_rows
from capdec.configs import MAX_DIM, MemoryConfig
from capdec.errors import InputError
from capdec.memory.faiss_index import write_index
from capdec.utils import atomic_dir, write_json

logger = logging.getLogger(__name__)

FORMAT = "capdec.memory/2"
LEGACY_FORMAT = "capdec.memory/1"
META, EMBEDDINGS, CAPTIONS = "meta.json", "embeddings.npy", "captions.jsonl"
OWN_STORE = "store"  # the subdirectory of a memory that holds its own rows
INDEX_FILES = {"flat": "index-flat.faiss", "ivf": "index-ivf.faiss", "ivfpq": "index-ivfpq.faiss"}
DTYPES = ("float16", "float32")


@dataclass
class SavedMemory:
    """A memory directory (or an embedding store) opened: its rows (memory-mapped unless asked otherwise)
    and what :class:`~capdec.memory.TextMemory` needs besides; captions are read on first use."""

    embeddings: np.ndarray
    source: str  # where it came from, for messages
    encoder_identity: dict[str, Any] | None = None
    encoder_spec: dict[str, Any] | None = None
    config: MemoryConfig | None = None  # the recorded search settings (None: an embedding store records none)
    caption_loader: Callable[[], list[str]] | None = None
    store_path: Path | None = None  # the embedding store the rows are read from, if one
    validate: bool = False  # check the row norms (a store that does not record them as normalised)
    faiss_files: dict[str, Path] = field(default_factory=dict)  # index kind -> saved faiss index


def store_rows(store: Any) -> SavedMemory:
    """The rows and captions of an :class:`~capdec.store.EmbeddingStore` (on disk or in memory)."""
    return SavedMemory(embeddings=store.embeddings,
                       source=str(store.path) if store.path is not None else "(in-memory embedding store)",
                       encoder_identity=store.encoder_identity, encoder_spec=store.encoder_spec,
                       caption_loader=lambda: store.captions,
                       store_path=store.path.resolve() if store.path is not None else None,
                       validate=not store.meta.get("normalized", False))


def open_memory_dir(path: str | os.PathLike, *, config: MemoryConfig | None = None, mmap: bool = True) -> SavedMemory:
    """Read a directory written by :func:`save_memory`, a ``capdec.memory/1`` one, or an embedding store.

    ``config`` overrides the search settings recorded there.
    """
    from capdec.store import EmbeddingStore

    path = Path(path)
    if not (path / META).is_file():
        raise InputError(f"{path}: not a text memory (no {META}); make one with TextMemory.save, or pass an "
                         f"embedding store made by 'capdec embed'")
    meta = read_meta(path / META, redo="re-create the memory")
    fmt = meta.get("format") if isinstance(meta, dict) else None
    if isinstance(fmt, str) and fmt.startswith("capdec.embeddings/"):
        saved = store_rows(EmbeddingStore.open(path, mmap=mmap))
        saved.config = config
        return saved
    if fmt in (FORMAT, LEGACY_FORMAT):
        redo = "re-create the memory"
        check_fields(meta, path / META, {"count": int, "dim": int, "encoder": dict | None,
                                         "encoder_identity": dict | None, "config": dict | None,
                                         "store": str | None, "store_meta_sha256": str | None}, redo=redo)
        check_count(meta["count"], "count", path / META, redo=redo)
        check_count(meta["dim"], "dim", path / META, low=1, high=MAX_DIM, redo=redo)
    if fmt == LEGACY_FORMAT:
        saved = _open_legacy(path, meta, mmap=mmap)
    elif fmt == FORMAT:
        saved = store_rows(_open_store(path, meta, mmap=mmap))
        saved.encoder_identity, saved.encoder_spec = meta.get("encoder_identity"), meta.get("encoder")
        if not meta.get("captions", True):
            saved.caption_loader = None  # the store's rows are placeholders
    else:
        raise InputError(f"{path / META}: format {fmt!r} is not a text memory ({FORMAT!r}) or embedding store")
    saved.config = config or MemoryConfig.from_dict(meta.get("config"), where=str(path / META))
    saved.source = str(path)
    saved.faiss_files = {kind: path / name for kind, name in INDEX_FILES.items() if (path / name).is_file()}
    return saved


def _open_legacy(path: Path, meta: dict[str, Any], *, mmap: bool) -> SavedMemory:
    """A ``capdec.memory/1`` directory: its own embeddings.npy (+ captions.jsonl) beside meta.json."""
    count = int(meta["count"])
    emb = load_matrix(path / EMBEDDINGS, (count, int(meta["dim"])), mmap=mmap, redo="re-create the memory",
                      meta_name=META)
    loader = None
    if meta.get("captions"):
        if not (path / CAPTIONS).is_file():
            raise InputError(f"{path}: {CAPTIONS} is missing though {META} lists captions; re-create the memory")
        loader = lambda: [r["caption"] for r in read_rows(path / CAPTIONS, count,  # noqa: E731
                                                         redo="re-create the memory", holder="the memory")]
    return SavedMemory(embeddings=emb, source=str(path), encoder_identity=meta.get("encoder_identity"),
                       encoder_spec=meta.get("encoder"), caption_loader=loader)


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


def save_memory(memory: Any, path: str | os.PathLike, *, overwrite: bool = False, dtype: str | None = None,
                index: bool = True, reference: bool | None = None) -> Path:
    """Write ``memory`` (a :class:`~capdec.memory.TextMemory`) as a directory; see
    :meth:`~capdec.memory.TextMemory.save`."""
    path = Path(path)
    dtype = dtype or memory.dtype
    if dtype not in DTYPES:
        raise InputError(f"unknown memory dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    if path.exists() and not overwrite:
        raise InputError(f"{path} already exists; pass overwrite=True to replace it, or choose another path")
    why = _not_replaceable(path) if path.exists() else None
    if why:  # never delete a directory we did not make, nor what a user put in one we did
        raise InputError(f"{path} {why}; choose another path or remove it yourself")
    store_dir = memory.store_path
    if reference and store_dir is None:
        raise InputError("this memory is not read from an embedding store on disk: it can only be saved with "
                         "its rows (reference=False)")
    if reference is False or store_dir is None or dtype != memory.dtype or store_dir.is_relative_to(path.resolve()):
        store_dir = None  # the rows are written into path/store/ (also when saved over the directory they are in)
    from capdec import __version__

    indexes = memory.faiss_indexes if index else {}
    meta = {
        "format": FORMAT, "dim": memory.dim, "count": len(memory), "dtype": dtype,
        "store": str(store_dir) if store_dir is not None else OWN_STORE,
        "store_meta_sha256": None, "captions": memory.has_captions,
        "encoder": memory.encoder_spec, "encoder_identity": memory.encoder_identity,
        "config": memory.config.to_dict(), "faiss_indexes": sorted(indexes), "source": memory.source,
        "capdec_version": __version__, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    with atomic_dir(path, overwrite=overwrite) as tmp:
        if store_dir is None and memory.store_path is not None and dtype == memory.dtype and memory.has_captions:
            _link_store(memory.store_path, tmp / OWN_STORE)  # its rows and captions as they are: nothing is read
        elif store_dir is None:
            memory.as_store().save(tmp / OWN_STORE, dtype=dtype)
        meta["store_meta_sha256"] = _sha256(Path(tmp / OWN_STORE if store_dir is None else store_dir) / META)
        for kind, idx in indexes.items():
            write_index(idx, tmp / INDEX_FILES[kind])
        write_json(tmp / META, meta)  # last: its presence marks a complete memory
    logger.info("saved text memory (%d x %d %s) to %s%s", len(memory), memory.dim, dtype, path,
                f" (an index over the store {store_dir})" if store_dir is not None else "")
    return path


def _link_store(src: Path, dst: Path) -> None:
    """The files of the embedding store ``src`` in ``dst``: hard links (store files are never changed in
    place, only replaced), or copies across file systems. Its token caches are left out."""
    from capdec.store import CAPTIONS as STORE_CAPTIONS
    from capdec.store import EMBEDDINGS as STORE_EMBEDDINGS
    from capdec.store import META as STORE_META
    from capdec.store import ROWS as STORE_ROWS

    dst.mkdir()
    for name in (STORE_EMBEDDINGS, STORE_ROWS, STORE_CAPTIONS, STORE_META):
        if (src / name).is_file():
            try:
                os.link(src / name, dst / name)
            except OSError:
                shutil.copyfile(src / name, dst / name)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _not_replaceable(path: Path) -> str | None:
    """None when ``overwrite`` may replace ``path``: an empty directory, or a text memory capdec wrote (its meta.json
    says so) holding nothing else; else why not."""
    if not path.is_dir():
        return "exists and is not a directory"
    if not any(path.iterdir()):
        return None
    return own_dir(path, marker=META, entries={META, EMBEDDINGS, CAPTIONS, OWN_STORE, *INDEX_FILES.values()},
                   recognised=lambda m: isinstance(m, dict) and m.get("format") in (FORMAT, LEGACY_FORMAT),
                   kind="a text memory", marked=f"format {FORMAT}")


__all__ = ["FORMAT", "LEGACY_FORMAT", "SavedMemory", "open_memory_dir", "save_memory", "store_rows"]
