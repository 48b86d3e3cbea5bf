"""The artefact layer: what capdec writes for itself and reads back, done one way.

Embedding stores (:mod:`capdec.store`), text memories (:mod:`capdec.memory`), noise files
(:mod:`capdec.calibrate`) and checkpoints (:mod:`capdec.checkpoint`) are written atomically
(:func:`capdec.utils.atomic_dir` for directories, :func:`capdec.utils.write_json` for files: a crash
leaves the old version or nothing) with a ``format`` id (``capdec.<kind>/<version>``) in their
metadata, and read back through the checks here: the metadata parses and names the expected format
(:func:`read_meta`), the matrix has the recorded shape (:func:`load_matrix`), caption rows are one
JSON object per line and as many as the embeddings (:func:`read_rows`), and embedding rows are finite
and L2-normalised (:func:`check_rows`). Matrices read through memory maps are told they are read at
random (:func:`random_access`) and their pages are unmapped after each read (:func:`release`), so a
store far larger than memory never becomes this process's resident memory.

User files (corpora, references, predictions, configs) are the input layer's (:mod:`capdec.io`).
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import os
import re
import struct
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from capdec.config_base import short_repr, type_error
from capdec.errors import InputError
from capdec.io.text import MAX_CAPTION_CHARS, at_line, cut_caption, decode_json
from capdec.utils import read_artifact_json

logger = logging.getLogger(__name__)

MAX_HEADER_BYTES = 100 << 20  # a safetensors header (JSON: names, dtypes, shapes) of more is no weights file
SAFETENSORS_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                      "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}

NORM_TOLERANCE = 1e-2  # |row norm - 1| allowed for "L2-normalised" (fp16 storage rounds)
_CHUNK = 65536  # rows per norm check: flat memory for a memory-mapped million-row matrix


def jsonable(obj: Any, *, sort_keys: bool = False) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists), for comparing with recorded metadata."""
    return json.loads(json.dumps(obj, sort_keys=sort_keys))


def read_meta(path: str | os.PathLike, *, redo: str) -> Any:
    """Parse an artefact's JSON metadata file; a damaged one is an :class:`InputError` saying ``redo``."""
    path = Path(path)
    try:
        return read_artifact_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e}); {redo}") from e


def own_dir(path: str | os.PathLike, *, marker: str, recognised: Callable[[Any], bool], entries: Collection[str],
            kind: str, marked: str) -> str | None:
    """None when the directory ``path`` is one capdec wrote: its ``marker`` file (JSON) says so (``recognised`` of
    its contents) and it holds no entry but ``entries`` (what capdec writes in one); else why it is not, naming
    ``kind`` (and ``marked``, what the marker should say) or the first entries capdec did not write. What
    ``--overwrite`` may replace (:func:`capdec.output.check_replaceable`)."""
    path = Path(path)
    try:
        ours = recognised(read_artifact_json(path / marker))
    except (OSError, ValueError):  # absent, unreadable or not JSON (a JSONDecodeError, a UnicodeDecodeError)
        ours = False
    if not ours:
        return f"exists and is not {kind} (no {marker} of {marked})"
    foreign = sorted(p.name for p in path.iterdir() if p.name not in entries)
    if foreign:
        return (f"is {kind} that also holds what capdec did not write there "
                f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''})")
    return None


def check_fields(obj: Any, where: str | os.PathLike, kinds: dict[str, Any], *, redo: str) -> dict[str, Any]:
    """``obj`` must be a JSON object whose fields named in ``kinds`` have those types (a missing field is None).

    The kinds are :func:`capdec.config_base.type_error`'s (``int``, ``float``: finite, ``str``, ``dict``,
    ``list[str]``, ``X | None``), so an edited or crafted file is refused before a value is used.
    """
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object, got {short_repr(obj)}; {redo}")
    for key, kind in kinds.items():
        wrong = type_error(obj.get(key), kind)
        if wrong:
            got = short_repr(obj[key]) if key in obj else "nothing"
            raise InputError(f"{where}: {key!r} must be {wrong}, got {got}; {redo}")
    return obj


def check_count(value: int, name: str, where: str | os.PathLike, *, redo: str, low: int = 0,
                high: int = 1 << 40) -> int:
    """A recorded size (a row count, a dimension) within ``[low, high]``."""
    if not low <= value <= high:
        raise InputError(f"{where}: {name!r} must be from {low} to {high}, got {value}; {redo}")
    return value


def read_safetensors_header(path: str | os.PathLike, *, redo: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The tensors a ``.safetensors`` file holds, ``{name: (dtype, shape)}``, checked without reading them.

    The format: 8 bytes (little-endian header length N), N bytes of JSON ``{name: {dtype, shape,
    data_offsets: [begin, end]}, "__metadata__": {...}}``, then the data. An empty or truncated file, a header
    length past the file's end (or over :data:`MAX_HEADER_BYTES`), a header that is no such JSON, or a tensor
    whose bytes do not fit its dtype and shape or lie outside the file is an :class:`InputError`.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise InputError(f"{path}: {size} bytes, too short for a safetensors file; {redo}")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise InputError(f"{path}: its header says it is {n} bytes long, but the file has {size - 8} after the "
                             f"length (truncated or not a safetensors file); {redo}")
        raw = f.read(n)
    try:
        header = decode_json(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: the safetensors header is not valid JSON ({e}); {redo}") from e
    if not isinstance(header, dict):
        raise InputError(f"{path}: the safetensors header is not a JSON object; {redo}")
    data = size - 8 - n
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        ok = (isinstance(entry, dict) and isinstance(entry.get("dtype"), str) and entry["dtype"] in SAFETENSORS_DTYPES
              and not type_error(entry.get("shape"), list[int]) and all(d >= 0 for d in entry["shape"])
              and not type_error(entry.get("data_offsets"), list[int]) and len(entry["data_offsets"]) == 2)
        if not ok:
            raise InputError(f"{path}: tensor {name!r} has no valid dtype, shape and data_offsets in the header; "
                             f"{redo}")
        begin, end = entry["data_offsets"]
        numel = math.prod(entry["shape"])
        if not 0 <= begin <= end <= data or end - begin != numel * SAFETENSORS_DTYPES[entry["dtype"]]:
            raise InputError(f"{path}: tensor {name!r} ({entry['dtype']} {tuple(entry['shape'])}) does not fit its "
                             f"bytes {begin}..{end} of the {data} after the header (truncated or altered); {redo}")
        tensors[name] = (entry["dtype"], tuple(entry["shape"]))
    return tensors


_BLOCKED_GLOBAL = re.compile(r"GLOBAL (\S+)")


def load_tensors(path: str | os.PathLike, *, what: str) -> Any:
    """``torch.load`` of plain tensors and containers only (``weights_only=True``): a file that would run code
    or is damaged is refused in one line naming it (torch's own text is several paragraphs)."""
    import pickle
    import zipfile

    import torch

    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = _BLOCKED_GLOBAL.search(str(e))
        why = f"it calls {found.group(1)}" if found else " ".join(str(e).split())[:160]
        raise InputError(f"{path}: refused: loading it would run code or build objects other than tensors ({why}); "
                         f"{what} holds plain tensors only") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise InputError(f"{path}: not a readable PyTorch tensor file ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:160]}); {what}") from None


def load_matrix(path: str | os.PathLike, shape: tuple[int, int], *, mmap: bool, redo: str,
                meta_name: str = "meta.json") -> np.ndarray:
    """A ``.npy`` matrix (memory-mapped unless ``mmap=False``) that must have ``shape``."""
    path = Path(path)
    try:
        array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise InputError(f"{path}: cannot be read as a .npy array ({e}); {redo}") from e
    if array.shape != tuple(shape):
        raise InputError(f"{path}: shape {array.shape} but {meta_name} says {tuple(shape)}; {redo}")
    return array


def write_rows(path: str | os.PathLike, records: Sequence[dict[str, Any]]) -> None:
    """One JSON object per line (the ``captions.jsonl`` of stores and memories)."""
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False))
            f.write("\n")


def iter_rows(path: str | os.PathLike, *, redo: str) -> Iterator[dict[str, Any]]:
    """The records of a ``captions.jsonl`` one at a time (a streaming read: nothing is kept).

    A caption over :data:`~capdec.io.text.MAX_CAPTION_CHARS` characters (which capdec never writes: a store
    made by an older version, or edited) is cut to that length, with a warning for the first.
    """
    path = Path(path)
    warned = False
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            try:
                record = decode_json(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{at_line(path, lineno, e.colno)}: not valid JSON ({e.msg}); {redo}") from e
            if not isinstance(record, dict) or not isinstance(record.get("caption"), str):
                raise InputError(f"{at_line(path, lineno)}: expected an object with a 'caption' string; {redo}")
            if len(record["caption"]) > MAX_CAPTION_CHARS:
                record["caption"] = cut_caption(record["caption"])
                if not warned:
                    logger.warning("%s: a caption of over %d characters was cut to that length (and any "
                                   "later ones)", at_line(path, lineno), MAX_CAPTION_CHARS)
                    warned = True
            yield record


def read_rows(path: str | os.PathLike, count: int, *, redo: str, holder: str = "the store") -> list[dict[str, Any]]:
    """The ``count`` records of a ``captions.jsonl``, each an object with a ``caption`` string."""
    records = list(iter_rows(path, redo=redo))
    if len(records) != count:
        raise InputError(f"{path}: {len(records)} captions but {holder} holds {count} embeddings; {redo}")
    return records


def read_jsonl(path: str | os.PathLike) -> list[Any]:
    """Every non-blank line of a JSON Lines log capdec wrote (``metrics.jsonl``), parsed."""
    return [decode_json(line, allow_nan=True) for line in Path(path).read_text(encoding="utf-8").splitlines()
            if line.strip()]


def check_rows(embeddings: Any, what: str) -> None:
    """Rows must be finite and L2-normalised (``what`` names them in the error: "x.npy: embeddings").

    ``embeddings`` is a numpy array or a torch tensor (any float dtype), checked in chunks so a
    memory map is never read whole into float32.
    """
    if embeddings.ndim != 2 or 0 in embeddings.shape:
        return
    n = embeddings.shape[0]
    lo_norm, hi_norm = math.inf, -math.inf
    for lo in range(0, n, _CHUNK):
        chunk = embeddings[lo : lo + _CHUNK]
        if isinstance(chunk, np.ndarray):
            norms = np.linalg.norm(chunk.astype(np.float32), axis=1)
            finite, low, high = bool(np.isfinite(norms).all()), float(norms.min()), float(norms.max())
        else:  # a torch tensor
            norms = chunk.float().norm(dim=1)
            finite, low, high = bool(norms.isfinite().all()), norms.min().item(), norms.max().item()
        if not finite:
            raise InputError(f"{what} contain NaN or infinite values")
        lo_norm, hi_norm = min(lo_norm, low), max(hi_norm, high)
    if max(abs(lo_norm - 1), abs(hi_norm - 1)) > NORM_TOLERANCE:
        raise InputError(f"{what} are not L2-normalised (row norms from {lo_norm:.3f} to {hi_norm:.3f}); "
                         f"normalise them first (torch.nn.functional.normalize(x, dim=-1))")


# -- memory maps -------------------------------------------------------------------------------------


def file_map(array: Any) -> mmap.mmap | None:
    """The memory map a numpy array reads from (a store's ``np.load(mmap_mode="r")`` matrix), or None."""
    mm = getattr(array, "_mmap", None)
    if mm is None and isinstance(getattr(array, "base", None), mmap.mmap):
        mm = array.base
    return mm if hasattr(mm, "madvise") else None


def random_access(array: Any) -> None:
    """Tell the kernel a memory map is read at random rows (no read-ahead around each page touched)."""
    mm = file_map(array)
    if mm is not None and hasattr(mmap, "MADV_RANDOM"):
        mm.madvise(mmap.MADV_RANDOM)


def release(array: Any, lo: int | None = None, hi: int | None = None) -> None:
    """Unmap the pages of a memory map this process has touched (rows ``lo:hi`` only, when given); the
    data stays in the page cache, and reading it again maps it again.

    Reading one row maps its whole page-cache folio (up to 2 MB on recent kernels), so a few thousand
    random rows, or one pass over a matrix, would make a store's whole file resident and count in this
    process's RSS. Rows are copied out of the map before use, so dropping the mappings after each read
    costs only a page-table walk (~0.5 ms for a whole store).
    """
    mm = file_map(array)
    if mm is None or not hasattr(mmap, "MADV_DONTNEED"):
        return
    start, length = 0, len(mm)
    if lo is not None:
        # where the array's data sits in the mapping (the .npy header comes first)
        offset = array.ctypes.data - np.frombuffer(mm, dtype=np.uint8, count=1).ctypes.data
        first = offset + lo * array.strides[0]
        last = min(len(mm), offset + (array.shape[0] if hi is None else hi) * array.strides[0])
        start = first - first % mmap.PAGESIZE
        length = last - start
        if length <= 0:
            return
    try:
        mm.madvise(mmap.MADV_DONTNEED, start, length)
    except (OSError, ValueError):  # not supported for this mapping: nothing to release
        pass

