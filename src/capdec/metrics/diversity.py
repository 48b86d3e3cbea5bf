"""Diversity diagnostics of generated captions: the "same caption for every image" failure, measured.

A text-only decoder that has not bridged the modality gap tends to produce a handful of generic
captions, or to recite training captions verbatim; n-gram metrics against references hide both.
:func:`caption_diversity` reports

- ``distinct_captions`` and ``distinct_share`` (distinct captions / images; 1.0 = every image its own caption),
- ``most_common_caption`` with its ``count`` and ``share`` of the images,
- ``vocabulary``: distinct words used across all captions, and ``mean_words`` per caption,
- with a training corpus: ``copied_from_training`` and ``copied_share``, the captions that appear
  verbatim in it.

Two captions are "the same" when their lowercased words are (punctuation and case ignored: "A dog on
a bed." equals "a dog on a bed"); words are :func:`capdec.corpus_tools.words`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from capdec.corpus_tools import words


def caption_key(caption: str) -> str:
    """The form two captions are compared in: lowercased words joined by one space."""
    return " ".join(words(caption))


def caption_diversity(captions: Mapping[Any, str] | Sequence[str], *,
                      training: Iterable[str] | None = None) -> dict[str, Any]:
    """Diversity statistics of one caption per image (see the module docstring)."""
    caps = list(captions.values()) if isinstance(captions, Mapping) else list(captions)
    keys = [caption_key(c) for c in caps]
    counts = Counter(keys)
    n = len(caps)
    out: dict[str, Any] = {"images": n, "distinct_captions": len(counts),
                           "distinct_share": round(len(counts) / n, 6) if n else None}
    if counts:
        top, top_n = counts.most_common(1)[0]
        example = next(c for c, k in zip(caps, keys) if k == top)
        out.update(most_common_caption=example, most_common_count=top_n, most_common_share=round(top_n / n, 6))
    vocab: set[str] = set()
    n_words = 0
    for k in keys:
        ws = k.split()
        vocab.update(ws)
        n_words += len(ws)
    out["vocabulary"] = len(vocab)
    out["mean_words"] = round(n_words / n, 4) if n else None
    if training is not None:
        seen = {caption_key(t) for t in training}
        copied = sum(1 for k in keys if k in seen)
        out.update(training_distinct_captions=len(seen), copied_from_training=copied,
                   copied_share=round(copied / n, 6) if n else None)
    return out


__all__ = ["caption_diversity", "caption_key"]
