"""Vectors a user hands capdec: a caption-time shift or image mean (``capdec caption --shift / --image-mean``,
``capdec train --image-mean``), as a ``.npy`` array or JSON (a list, or calibrate's ``noise.json``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from capdec.errors import InputError
from capdec.io.text import read_json


def read_vector(path: str | os.PathLike, *, keys: Sequence[str] = ()) -> list[float]:
    """A 1-D vector from a ``.npy`` file, a JSON list, or a JSON object holding it under one of ``keys``
    (e.g. the ``offset``/``image_mean`` of ``capdec calibrate``'s noise.json)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"vector file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            value: Any = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise InputError(f"{path} is not a readable .npy array: {e}") from e
    elif suffix == ".json":
        value = read_json(path)
        if isinstance(value, dict):
            key = next((k for k in keys if value.get(k) is not None), None)
            if key is None:
                raise InputError(f"{path} holds a JSON object without a vector under "
                                 f"{' or '.join(repr(k) for k in keys) or 'a known key'}")
            value = value[key]
    else:
        raise InputError(f"{path}: vector files must be .npy or .json (a list, or calibrate's noise.json)")
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise InputError(f"{path} does not hold a list of numbers: {e}") from e
    arr = arr.squeeze()
    if arr.ndim != 1 or arr.size == 0:
        raise InputError(f"{path} must hold a 1-D vector, got shape {tuple(np.shape(value))}")
    if not np.isfinite(arr).all():
        raise InputError(f"{path} holds non-finite values")
    return arr.tolist()


__all__ = ["read_vector"]
