"""capdec: text-only image captioning with noise-injected CLIP embeddings.

Data flow, one module each: corpus (``capdec.corpus``) -> embeddings (``capdec.store``) ->
training (``capdec.train``) -> checkpoint (``capdec.checkpoint``) -> captions
(``capdec.caption``) -> metrics (``capdec.metrics``).

The public API is imported lazily so that ``import capdec`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "load_encoder": "capdec.encoders",
    "read_corpus": "capdec.corpus",
    "embed_corpus": "capdec.store",
    "EmbeddingStore": "capdec.store",
    "train": "capdec.train",
    "TrainConfig": "capdec.train",
    "NoiseConfig": "capdec.noise",
    "load_checkpoint": "capdec.checkpoint",
    "Captioner": "capdec.caption",
    "evaluate": "capdec.metrics",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'capdec' has no attribute {name!r}")
