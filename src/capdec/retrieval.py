"""Retrieval augmentation (IFCap): what the decoder gets besides the query embedding.

For a query (a noised caption embedding in training, an image embedding at inference) the k nearest
training captions are retrieved from a :class:`capdec.memory.TextMemory`. Their embeddings feed the
model's fusion module, and the words that recur among them (entity filtering by frequency) become
extra prefix vectors the decoder can copy from.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

# Function words never count as entities (the toy world and COCO captions alike).
STOPWORDS = frozenset("""
a an the of on in at to and or with without is are was were be been being there here this that these those
it its his her their them they he she we you i one some any each every other another next near by from up down
over under into onto out off as for than then very while who whom which what where when how all both few more most
has have had do does did not no nor so too can will just while against between through during before after
above below left right side top bottom front behind middle center picture image photo shows showing shown
""".split())

_WORD = re.compile(r"[^\W\d_]+", re.UNICODE)


def caption_words(caption: str) -> list[str]:
    """Lowercased alphabetic words of a caption, in order."""
    return _WORD.findall(caption.lower())


def frequent_words(groups: Sequence[Sequence[str]], *, slots: int, min_count: int) -> list[list[str]]:
    """For each group of retrieved captions: up to ``slots`` non-stopwords found in ≥ ``min_count`` of them.

    Ordered by how many captions contain the word, then by first appearance (deterministic).
    """
    out = []
    for captions in groups:
        counts: Counter[str] = Counter()
        first: dict[str, int] = {}
        for cap in captions:
            for w in dict.fromkeys(caption_words(cap)):  # each word once per caption
                if w in STOPWORDS or len(w) < 2:
                    continue
                counts[w] += 1
                first.setdefault(w, len(first))
        keep = [w for w, c in counts.items() if c >= min_count]
        keep.sort(key=lambda w: (-counts[w], first[w]))
        out.append(keep[:slots])
    return out


class RetrievalContext:
    """Turns queries into the model's extra inputs: ``retrieved`` and ``entity_ids``.

    ``memory`` is a :class:`capdec.memory.TextMemory` with captions; ``model`` a CapDecModel whose
    config sets ``retrieval_k``, ``entity_slots`` and ``entity_min_count``.
    """

    def __init__(self, memory: Any, model: Any, *, word_tokens: int = 4):
        cfg = model.config
        if cfg.entity_slots and getattr(memory, "captions", None) is None:
            raise ValueError("entity prompts need the memory's captions")
        self.memory, self.k = memory, cfg.retrieval_k
        self.slots, self.min_count = cfg.entity_slots, cfg.entity_min_count
        self.tokenizer, self.word_tokens = model.tokenizer, word_tokens
        self._word_ids: dict[str, list[int]] = {}

    def _ids(self, word: str) -> list[int]:
        if word not in self._word_ids:
            ids = self.tokenizer(" " + word, add_special_tokens=False)["input_ids"][: self.word_tokens]
            self._word_ids[word] = ids
        return self._word_ids[word]

    def __call__(self, queries: torch.Tensor, *, exclude: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if not self.k:
            return {}
        _, idx = self.memory.search(queries.float(), self.k, exclude=exclude)  # (b, k); -1 = none left
        out = {"retrieved": self.memory.gather(idx, device=queries.device)}  # (b, k, d), zeros for -1
        if self.slots:
            words = frequent_words(self.memory.captions_at(idx), slots=self.slots, min_count=self.min_count)
            ids = torch.full((len(words), self.slots, self.word_tokens), -1, dtype=torch.long)
            for i, ws in enumerate(words):
                for j, w in enumerate(ws):
                    t = self._ids(w)
                    ids[i, j, : len(t)] = torch.tensor(t)
            out["entity_ids"] = ids.to(queries.device)  # (b, m, w)
        return out
