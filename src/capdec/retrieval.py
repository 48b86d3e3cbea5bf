"""Retrieval augmentation (IFCap, Lee et al., EMNLP 2024): what the decoder gets besides the query embedding.

For a query (a noised caption embedding in training, an image embedding at inference) the k nearest
training captions are retrieved from a :class:`capdec.memory.TextMemory`. Their embeddings feed the
model's fusion module. IFCap's *image-like retrieval* makes the training query look like an image's:
the caption's embedding plus isotropic noise of its own variance (``retrieval_variance``, IFCap 0.04),
and the caption itself is never retrieved.

Entities (IFCap / ViECap hard prompts, ``entity_prompt``): the words of a caption found in an entity
vocabulary. Training prompts the decoder with the caption's own entities, each left out with
probability ``entity_mask``; at caption time IFCap's *frequency-based entity filtering* counts the
entity occurrences among the image's ``entity_retrieve`` nearest captions and keeps those seen at
least ``entity_threshold`` times. The prompt "There are e1, e2 in image." ("There are something in
image." without entities) follows the soft prefix as ordinary tokens (IFCap's ``soft_prompt_first``)
and is never scored. IFCap finds nouns with NLTK's tagger and lemmatiser; here a vocabulary file
names them and a plural is matched to its singular.

capdec's earlier approximation (``entity_slots``) is kept for its checkpoints: words frequent among
the k retrieved captions become extra prefix vectors.
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


PROMPT_HEAD, PROMPT_TAIL, NO_ENTITY = "There are", " in image.", " something"


def hard_prompt(entities: Sequence[str]) -> str:
    """IFCap's / ViECap's entity prompt: "There are person, dog in image." ("There are something in image.")."""
    return PROMPT_HEAD + ("".join(f" {e}," for e in entities)[:-1] if entities else NO_ENTITY) + PROMPT_TAIL


class EntityVocabulary:
    """The words that count as entities; a plural ("dogs", "boxes") counts as its singular when that is listed."""

    def __init__(self, words: Sequence[str]):
        self.words = frozenset(w.strip().lower() for w in words if w.strip())
        if not self.words:
            raise ValueError("the entity vocabulary is empty")

    def entity(self, word: str) -> str | None:
        if word in self.words:
            return word
        for cut in ("es", "s"):
            if word.endswith(cut) and word[: -len(cut)] in self.words:
                return word[: -len(cut)]
        return None

    def occurrences(self, caption: str) -> list[str]:
        """Every entity occurrence of a caption, in order (repeats kept)."""
        return [e for e in map(self.entity, caption_words(caption)) if e is not None]

    def entities(self, caption: str) -> list[str]:
        """A caption's entities, each once, in order of appearance."""
        return list(dict.fromkeys(self.occurrences(caption)))


def read_entity_vocab(path: str) -> list[str]:
    """An entity vocabulary file: one word per line (blank lines and '#' comments skipped), lowercased."""
    from pathlib import Path

    from capdec.errors import InputError
    from capdec.io.text import read_text

    lines = read_text(Path(path)).splitlines()
    words = [w.strip().lower() for w in lines if w.strip() and not w.lstrip().startswith("#")]
    if not words:
        raise InputError(f"{path}: the entity vocabulary is empty (one word per line)")
    bad = [w for w in words if not _WORD.fullmatch(w)]
    if bad:
        raise InputError(f"{path}: entities must be single words of letters, got {bad[0]!r}")
    return sorted(set(words))


def filter_entities(captions: Sequence[str], vocab: EntityVocabulary, *, threshold: int, limit: int) -> list[str]:
    """IFCap's frequency-based entity filtering: entities occurring ≥ ``threshold`` times among ``captions``
    (every occurrence counts), most frequent first (ties: first seen), at most ``limit``."""
    counts: Counter[str] = Counter()
    first: dict[str, int] = {}
    for cap in captions:
        for e in vocab.occurrences(cap):
            counts[e] += 1
            first.setdefault(e, len(first))
    keep = sorted((e for e, c in counts.items() if c >= threshold), key=lambda e: (-counts[e], first[e]))
    return keep[:limit]


def masked_entities(entities: Sequence[str], draws: torch.Tensor, *, mask: float, limit: int) -> list[str]:
    """Training prompts: a caption's first ``limit`` entities, the i-th left out when ``draws[i]`` (uniform in
    [0, 1)) is below ``mask`` — each with probability ``mask``, as IFCap's random entity masking."""
    entities = list(entities)[:limit]
    return [e for e, u in zip(entities, draws[: len(entities)].tolist()) if u >= mask]


class RetrievalContext:
    """Turns queries into the model's extra inputs: ``retrieved``, ``entity_ids`` and ``prompt_ids``.

    ``memory`` is a :class:`capdec.memory.TextMemory` with captions; ``model`` a CapDecModel whose
    config sets ``retrieval_k``, ``retrieval_variance``, ``entity_slots`` / ``entity_min_count`` and the
    ``entity_*`` prompt options.
    """

    def __init__(self, memory: Any, model: Any, *, word_tokens: int = 4):
        cfg = model.config
        if (cfg.entity_slots or cfg.entity_prompt) and getattr(memory, "captions", None) is None:
            raise ValueError("entity prompts need the memory's captions")
        self.memory, self.k = memory, cfg.retrieval_k
        self.retrieval_variance = cfg.retrieval_variance
        self.slots, self.min_count = cfg.entity_slots, cfg.entity_min_count
        self.vocab = EntityVocabulary(cfg.entity_vocab) if cfg.entity_prompt else None
        self.config = cfg
        self.tokenizer, self.word_tokens = model.tokenizer, word_tokens
        self._word_ids: dict[str, list[int]] = {}
        self._prompt_ids: dict[tuple[str, ...], list[int]] = {}

    def _ids(self, word: str) -> list[int]:
        if word not in self._word_ids:
            ids = self.tokenizer(" " + word, add_special_tokens=False)["input_ids"][: self.word_tokens]
            self._word_ids[word] = ids
        return self._word_ids[word]

    def prompt_ids(self, entities: Sequence[str]) -> list[int]:
        """Token ids of the hard prompt of ``entities`` (cached)."""
        key = tuple(entities)
        if key not in self._prompt_ids:
            self._prompt_ids[key] = self.tokenizer(hard_prompt(key), add_special_tokens=False)["input_ids"]
        return self._prompt_ids[key]

    def training_draws(self, clean: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """A training step's random inputs for the (global) batch of clean caption embeddings (b, d):
        the image-like retrieval queries (``search``, with ``retrieval_variance``) and the uniforms that
        leave entities out of the prompts (``entity_draws``, (b, entity_max))."""
        out: dict[str, torch.Tensor] = {}
        if self.k and self.retrieval_variance is not None:
            from capdec.noise import NoiseConfig, add_noise

            out["search"] = add_noise(clean.float(), NoiseConfig(variance=self.retrieval_variance), generator=generator)
        if self.vocab is not None:
            out["entity_draws"] = torch.rand((clean.shape[0], self.config.entity_max), generator=generator,
                                             device=generator.device)
        return out

    def _prompts(self, queries: torch.Tensor, own: torch.Tensor | None,
                 draws: torch.Tensor | None) -> list[list[int]]:
        """Training (``own``: the memory rows of the queries' own captions): their entities, each left out when
        its draw is below ``entity_mask``; otherwise entity filtering over the ``entity_retrieve`` nearest captions."""
        cfg, vocab = self.config, self.vocab
        assert vocab is not None
        if own is not None:
            if draws is None:
                raise ValueError("training prompts need the step's entity draws (training_draws)")
            captions = self.memory.captions_at(own.reshape(-1, 1).cpu())
            groups = [masked_entities(vocab.entities(c[0]) if c else [], row, mask=cfg.entity_mask, limit=cfg.entity_max)
                      for c, row in zip(captions, draws.cpu())]
        else:
            _, idx = self.memory.search(queries.float(), min(cfg.entity_retrieve, len(self.memory)))
            groups = [filter_entities(caps, vocab, threshold=cfg.entity_threshold, limit=cfg.entity_max)
                      for caps in self.memory.captions_at(idx.cpu())]
        return [self.prompt_ids(g) for g in groups]

    def __call__(self, queries: torch.Tensor, *, exclude: torch.Tensor | None = None,
                 search: torch.Tensor | None = None, entity_draws: torch.Tensor | None = None) -> dict[str, Any]:
        """The extra inputs for ``queries`` (b, d).

        Training passes ``exclude`` (the memory rows of the queries' own captions: never retrieved, and the
        source of their entity prompts) and its :meth:`training_draws` (``search``: the image-like
        retrieval queries, else ``queries`` are searched; ``entity_draws``).
        """
        out: dict[str, Any] = {}
        if self.vocab is not None:
            out["prompt_ids"] = self._prompts(queries, exclude, entity_draws)
        if not self.k:
            return out
        search = queries if search is None else search
        _, idx = self.memory.search(search.float(), self.k, exclude=exclude)  # (b, k); -1 = none left
        out["retrieved"] = self.memory.gather(idx, device=queries.device)  # (b, k, d), zeros for -1
        if self.slots:
            words = frequent_words(self.memory.captions_at(idx), slots=self.slots, min_count=self.min_count)
            ids = torch.full((len(words), self.slots, self.word_tokens), -1, dtype=torch.long)
            for i, ws in enumerate(words):
                for j, w in enumerate(ws):
                    t = self._ids(w)
                    ids[i, j, : len(t)] = torch.tensor(t)
            out["entity_ids"] = ids.to(queries.device)  # (b, m, w)
        return out
