"""Styles and domains of the toy world, and a style classifier to measure captions with.

- Styles (FlickrStyle10K's two): grammars ``"romantic"`` and ``"humorous"`` say the same facts as
  ``"default"`` in a styled way (see :data:`capdec.lab.toyworld.grammar.STYLES`).
- Domains (COCO vs Flickr30k): a domain is a world (what scenes look like) plus a grammar (how people
  describe them). ``"coco"`` is the default world and grammar; ``"flickr"`` has busier, darker scenes
  and longer captions with other preferred words.
- :class:`StyleClassifier`: multinomial naive Bayes over word uni- and bigrams, trained on styled and
  factual text; "style accuracy" is the share of generated captions it assigns to the target style.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from capdec.errors import InputError
from capdec.lab.toyworld.grammar import STYLES, tokenize_words
from capdec.lab.toyworld.world import WorldConfig, get_world


@dataclass(frozen=True)
class Domain:
    name: str
    world: str  # a name in capdec.lab.toyworld.WORLDS
    grammar: str  # a registered grammar

    @property
    def world_config(self) -> WorldConfig:
        return get_world(self.world)


DOMAINS: dict[str, Domain] = {
    "coco": Domain("coco", world="default", grammar="default"),
    "flickr": Domain("flickr", world="busy", grammar="flickr"),
}


def get_domain(name: str) -> Domain:
    if name not in DOMAINS:
        raise InputError(f"unknown domain {name!r}; known: {', '.join(DOMAINS)}")
    return DOMAINS[name]


def _features(text: str) -> list[str]:
    words = tokenize_words(text)
    return words + [f"{a} {b}" for a, b in zip(words, words[1:])]


class StyleClassifier:
    """Multinomial naive Bayes (Laplace smoothing) over word uni- and bigrams.

    >>> clf = StyleClassifier.fit(["a red circle", "plot twist: a red circle"], ["factual", "humorous"])
    >>> clf.predict(["plot twist: a blue box"])
    ['humorous']
    """

    def __init__(self, labels: Sequence[str], counts: dict[str, Counter], priors: dict[str, float],
                 alpha: float = 1.0) -> None:
        self.labels = list(labels)
        self.alpha = alpha
        self._priors = {c: math.log(priors[c]) for c in self.labels}
        vocab = set().union(*(counts[c] for c in self.labels))
        self._v = len(vocab)
        self._totals = {c: sum(counts[c].values()) for c in self.labels}
        self._counts = counts

    @classmethod
    def fit(cls, texts: Sequence[str], labels: Sequence[str], alpha: float = 1.0) -> StyleClassifier:
        if len(texts) != len(labels):
            raise InputError(f"{len(texts)} texts but {len(labels)} labels")
        classes = sorted(set(labels))
        if len(classes) < 2:
            raise InputError("a style classifier needs texts of at least two styles")
        counts = {c: Counter() for c in classes}
        n = Counter(labels)
        for text, label in zip(texts, labels):
            counts[label].update(_features(text))
        return cls(classes, counts, {c: n[c] / len(labels) for c in classes}, alpha)

    def _log_likelihood(self, text: str, label: str) -> float:
        counts, denom = self._counts[label], self._totals[label] + self.alpha * (self._v + 1)
        return self._priors[label] + sum(math.log((counts.get(f, 0) + self.alpha) / denom) for f in _features(text))

    def predict(self, texts: Iterable[str]) -> list[str]:
        return [max(self.labels, key=lambda c: self._log_likelihood(t, c)) for t in texts]

    def accuracy(self, texts: Sequence[str], label: str) -> float:
        """Share of ``texts`` classified as ``label``."""
        if not texts:
            raise InputError("no texts to classify")
        return sum(p == label for p in self.predict(texts)) / len(texts)


def train_style_classifier(n_per_style: int = 2000, seed: int = 0, styles: Sequence[str] = STYLES,
                           factual: str = "default") -> StyleClassifier:
    """A classifier of ``factual`` vs each style, trained on captions of the *val* split (not the test split)."""
    from capdec.lab.toyworld.data import corpus

    texts: list[str] = []
    labels: list[str] = []
    for label, grammar in [("factual", factual), *((s, s) for s in styles)]:
        caps = list(corpus(n_per_style, seed=seed + 7919, split="val", grammar=grammar))
        texts += caps
        labels += [label] * len(caps)
    return StyleClassifier.fit(texts, labels)
