"""The artefact layer: what capdec writes for itself and reads back, done one way.

Embedding stores (:mod:`capdec.store`), text memories (:mod:`capdec.memory`), noise files
(:mod:`capdec.calibrate`) and checkpoints (:mod:`capdec.checkpoint`) are written atomically
(:func:`capdec.utils.atomic_dir` for directories, :func:`capdec.utils.write_json` for files: a crash
leaves the old version or nothing) with a ``format`` id (``capdec.<kind>/<version>``) in their
metadata, and read back through the checks here: the metadata parses and names the expected format
(:func:`read_meta`), the matrix has the recorded shape (:func:`load_matrix`), caption rows are one
JSON object per line and as many as the embeddings (:func:`read_rows`), and embedding rows are finite
and L2-normalised (:func:`check_rows`).

User files (corpora, references, predictions, configs) are the input layer's (:mod:`capdec.io`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from capdec.errors import InputError
from capdec.utils import read_artifact_json

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
    """The records of a ``captions.jsonl`` one at a time (a streaming read: nothing is kept)."""
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{lineno}: not valid JSON ({e.msg}); {redo}") from e
            if not isinstance(record, dict) or not isinstance(record.get("caption"), str):
                raise InputError(f"{path}:{lineno}: expected an object with a 'caption' string; {redo}")
            yield record


def read_rows(path: str | os.PathLike, count: int, *, redo: str, holder: str = "the store") -> list[dict[str, Any]]:
    """The ``count`` records of a ``captions.jsonl``, each an object with a ``caption`` string."""
    records = list(iter_rows(path, redo=redo))
    if len(records) != count:
        raise InputError(f"{path}: {len(records)} captions but {holder} holds {count} embeddings; {redo}")
    return records


def read_jsonl(path: str | os.PathLike) -> list[Any]:
    """Every non-blank line of a JSON Lines log capdec wrote (``metrics.jsonl``), parsed."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


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
