"""Small embedding stores written to disk without an encoder: random unit rows under a made-up encoder.

For tests of what reads stores without running a model on them (the training planner, resume and
refusals): the rows are as a store holds them (L2-normalised, float32), the captions are short
distinct English sentences, and ``modality="image"`` gives an image store (one row per image, shared
by its ``captions_per_image`` captions) as ``capdec embed --modality image`` writes it.

Usage in tests (``tests/`` is on ``sys.path`` via ``pythonpath`` in pyproject)::

    from tiny_stores import make_store
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

ENCODER_SPEC = {"kind": "test", "name": "random-unit-rows"}
COLOURS = ["red", "blue", "green", "yellow", "black", "white"]
THINGS = ["dog", "cat", "bus", "horse", "bird", "boat", "train"]
PLACES = ["on a street", "in a field", "near the water", "in a kitchen", "under a tree"]


def captions(n: int) -> list[str]:
    """``n`` distinct captions (at most 210)."""
    combos = list(itertools.product(COLOURS, THINGS, PLACES))
    if n > len(combos):
        raise ValueError(f"at most {len(combos)} captions")
    return [f"a {c} {t} {p}" for c, t, p in combos[:n]]


def make_store(path: str | Path, *, n: int = 60, dim: int = 16, modality: str = "text", seed: int = 0,
               captions_per_image: int = 5) -> Path:
    """Write a store of ``n`` captions to ``path`` and return ``path``."""
    from capdec.store import EmbeddingStore

    texts = captions(n)
    rows = n if modality == "text" else -(-n // captions_per_image)
    vectors = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    row_index = None if modality == "text" else np.arange(n) // captions_per_image
    store = EmbeddingStore.from_arrays(texts, vectors, encoder_spec=ENCODER_SPEC,
                                       encoder_identity={**ENCODER_SPEC, "dim": dim}, row_index=row_index,
                                       modality=modality)
    store.save(path)
    return Path(path)
