"""Corpus tools: open text → caption-like sentences, gender rebalancing, corpus statistics.

The three functions behind ``capdec corpus sentences | rebalance-gender | stats``. They are pure (text
in, text and counts out); reading and writing files is the CLI's job (:mod:`capdec.cli.corpus`).

- :func:`split_sentences` / :func:`extract_sentences`: CapDec trains on any sentences, not only
  captions (the paper's open-text experiments use books, plays and news). A sentence ends at ``.``,
  ``!`` or ``?`` (with any closing quotes or brackets) followed by whitespace and a capital letter, a
  digit or an opening quote — unless the word before the period is a known abbreviation (``Mr.``,
  ``Dr.``, ``St.``, ``e.g.``, ...) or a single-letter initial (``J. K. Rowling``). Sentences outside
  ``[min_words, max_words]`` are dropped and counted.
- :func:`rebalance_gender`: the CapDec repository's gender-balancing data modes (``both``,
  ``male→female``, ``female→male``): each caption that contains a gendered term of the chosen
  direction(s) is swapped, with probability ``p``, as a whole (every gendered term in it flips, so
  "a man and his dog" becomes "a woman and her dog", never "a woman and his dog"). Matching is
  word-boundary and case aware ("Man" → "Woman", "MEN" → "WOMEN", "man's" → "woman's"; "manager",
  "human" and "woman" are not "man"). Deterministic for a seed.

  The one ambiguous word is **her**: possessive ("her dog" → "his dog") or object ("hugging her" →
  "hugging him"). It becomes **his** when the next word could start the noun phrase it determines
  (any word that is not a preposition, conjunction, determiner, pronoun or adverb of a short closed
  list) and **him** otherwise (end of the caption, punctuation, or such a function word:
  "her in a park" → "him in a park"). "hers" becomes "his"; "his" always becomes "her" (captions use
  "his" as a determiner almost exclusively).
- :func:`corpus_stats`: what the decoder will learn from a corpus — counts, vocabulary, length
  histogram, duplicate rate, most frequent words.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from capdec.errors import InputError

# -- sentences -------------------------------------------------------------------------------------

#: words that end with a period but rarely end a sentence (compared lowercased, without the period)
ABBREVIATIONS = frozenset({
    "mr", "mrs", "ms", "dr", "prof", "st", "sr", "jr", "rev", "gen", "col", "capt", "lt", "sgt", "gov", "sen",
    "rep", "hon", "messrs", "mme", "mlle", "mt", "ft", "vs", "etc", "e.g", "i.e", "cf", "viz", "no", "nos", "vol",
    "pp", "fig", "ch", "sec", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec",
    "inc", "ltd", "co", "corp", "approx", "dept", "est", "a.m", "p.m", "u.s", "u.k",
})
# "etc." often does end a sentence; it is kept in the list because a wrong split (a fragment) costs more
# than a missed one (a long sentence, usually dropped by max_words anyway).

# a candidate boundary: terminal punctuation, closing quotes/brackets, whitespace, then what may start a sentence
_BOUNDARY = re.compile(r"([.!?]+)([\"'”’)\]]*)(\s+)(?=[\"'“‘(\[]?[A-Z0-9\u00C0-\u00DE])")
_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*", re.UNICODE)


def split_sentences(text: str) -> list[str]:
    """Split one paragraph/document into sentences (whitespace-normalised, stripped)."""
    text = " ".join(text.split())
    out: list[str] = []
    start = 0
    for m in _BOUNDARY.finditer(text):
        end = m.end(2)  # the sentence keeps its punctuation and closing quotes
        if m.group(1) == ".":
            before = text[start:m.start(1)].rsplit(" ", 1)[-1].lstrip("\"'“‘([")
            if before.lower() in ABBREVIATIONS or (len(before) == 1 and before.isalpha() and before.isupper()):
                continue
        sentence = text[start:end].strip()
        if sentence:
            out.append(sentence)
        start = m.end(3)
    tail = text[start:].strip()
    if tail:
        out.append(tail)
    return out


def count_words(text: str) -> int:
    return len(_WORD.findall(text))


@dataclass
class SentenceStats:
    """What :func:`extract_sentences` kept and dropped, and why."""

    documents: int = 0  # paragraphs (text mode) or non-empty lines (lines mode) read
    empty_lines: int = 0  # blank input lines
    sentences: int = 0  # sentences found
    kept: int = 0
    too_short: int = 0  # fewer than min_words words
    too_long: int = 0  # more than max_words words
    no_lowercase: int = 0  # headings, speaker names of a play ("HAMLET."), all-caps lines
    duplicates: int = 0  # exact repeats of a kept sentence (with dedupe)

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def iter_documents(lines: Iterable[str], mode: str, stats: SentenceStats) -> Iterable[str]:
    """``text``: paragraphs separated by blank lines (wrapped lines joined); ``lines``: one document a line."""
    if mode not in ("text", "lines"):
        raise InputError(f"unknown input mode {mode!r}; use text (paragraphs) or lines (one document per line)")
    paragraph: list[str] = []
    for line in lines:
        if not line.strip():
            stats.empty_lines += 1
            if paragraph:
                stats.documents += 1
                yield " ".join(paragraph)
                paragraph = []
            continue
        if mode == "lines":
            stats.documents += 1
            yield line
        else:
            paragraph.append(line.strip())
    if paragraph:
        stats.documents += 1
        yield " ".join(paragraph)


def extract_sentences(lines: Iterable[str], *, mode: str = "text", min_words: int = 4, max_words: int = 20,
                      dedupe: bool = False) -> tuple[list[str], SentenceStats]:
    """Open text (lines of a file) → caption-length sentences, with counts of what was dropped and why."""
    if min_words < 1 or max_words < min_words:
        raise InputError(f"need 1 <= min_words <= max_words, got {min_words} and {max_words}")
    stats = SentenceStats()
    kept: list[str] = []
    seen: set[str] = set()
    for doc in iter_documents(lines, mode, stats):
        for sentence in split_sentences(doc):
            stats.sentences += 1
            n = count_words(sentence)
            if n < min_words:
                stats.too_short += 1
            elif n > max_words:
                stats.too_long += 1
            elif not any(ch.islower() for ch in sentence):
                stats.no_lowercase += 1
            elif dedupe and sentence in seen:
                stats.duplicates += 1
            else:
                seen.add(sentence)
                kept.append(sentence)
    stats.kept = len(kept)
    return kept, stats


# -- gender rebalancing ----------------------------------------------------------------------------

#: (male, female) word pairs; every form a caption corpus commonly uses. "her" is handled separately.
GENDER_PAIRS: tuple[tuple[str, str], ...] = (
    ("man", "woman"), ("men", "women"), ("boy", "girl"), ("boys", "girls"), ("guy", "gal"), ("guys", "gals"),
    ("gentleman", "lady"), ("gentlemen", "ladies"), ("male", "female"), ("males", "females"),
    ("he", "she"), ("his", "her"), ("him", "her"), ("himself", "herself"),
    ("father", "mother"), ("fathers", "mothers"), ("dad", "mom"), ("dads", "moms"), ("daddy", "mommy"),
    ("son", "daughter"), ("sons", "daughters"), ("brother", "sister"), ("brothers", "sisters"),
    ("husband", "wife"), ("husbands", "wives"), ("boyfriend", "girlfriend"), ("boyfriends", "girlfriends"),
    ("groom", "bride"), ("grooms", "brides"), ("king", "queen"), ("kings", "queens"), ("prince", "princess"),
    ("uncle", "aunt"), ("uncles", "aunts"), ("nephew", "niece"), ("grandfather", "grandmother"),
    ("grandpa", "grandma"), ("grandson", "granddaughter"), ("actor", "actress"), ("actors", "actresses"),
    ("waiter", "waitress"), ("waiters", "waitresses"), ("policeman", "policewoman"),
    ("policemen", "policewomen"), ("businessman", "businesswoman"), ("businessmen", "businesswomen"),
    ("fireman", "firewoman"), ("sportsman", "sportswoman"), ("mr", "mrs"), ("sir", "madam"),
)
# the possessive/object "her" (see the module docstring): the female side maps "her" -> his / him
_MALE_TO_FEMALE = {m: f for m, f in GENDER_PAIRS}
_FEMALE_TO_MALE = {f: m for m, f in GENDER_PAIRS if f != "her"}
_FEMALE_TO_MALE["hers"] = "his"
MALE_TERMS = frozenset(_MALE_TO_FEMALE)
FEMALE_TERMS = frozenset(_FEMALE_TO_MALE) | {"her"}
DIRECTIONS = ("both", "male-to-female", "female-to-male")

# words after which "her" is an object pronoun (him), not a determiner (his)
_NOT_A_NOUN_PHRASE = frozenset({
    "a", "an", "the", "and", "or", "but", "nor", "so", "yet", "as", "at", "by", "for", "from", "in", "into", "of",
    "off", "on", "onto", "out", "over", "to", "up", "down", "with", "without", "while", "when", "where", "who",
    "which", "that", "this", "these", "those", "then", "than", "is", "are", "was", "were", "be", "been", "being",
    "has", "have", "had", "it", "its", "he", "she", "they", "them", "we", "you", "i", "his", "her", "their",
    "again", "too", "very", "here", "there", "now", "around", "near", "behind", "under", "above",
    "through", "across", "along", "toward", "towards", "about", "after", "before", "during", "between",
})
# a gendered word: letters only, not glued to other letters or a hyphen ("man-made" and "human" stay)
_TERM = re.compile(r"(?<![\w\-’'])([A-Za-z]+)(?![\w\-])")


def _match_case(word: str, template: str) -> str:
    if template.isupper() and len(template) > 1:
        return word.upper()
    if template[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


def _next_word(text: str, pos: int) -> str | None:
    m = re.match(r"\s+([A-Za-z]+)", text[pos:])
    return m.group(1).lower() if m else None


def gender_terms(caption: str) -> tuple[list[str], list[str]]:
    """The male and the female terms of a caption (lowercased, in order)."""
    male, female = [], []
    for m in _TERM.finditer(caption):
        w = m.group(1).lower()
        if w in MALE_TERMS:
            male.append(w)
        elif w in FEMALE_TERMS:
            female.append(w)
    return male, female


def swap_gender(caption: str, direction: str = "both") -> str:
    """Flip every gendered term of ``direction`` in ``caption`` (case and possessives kept)."""
    if direction not in DIRECTIONS:
        raise InputError(f"unknown direction {direction!r}; use one of {', '.join(DIRECTIONS)}")
    to_female = direction in ("both", "male-to-female")
    to_male = direction in ("both", "female-to-male")

    def replace(m: re.Match) -> str:
        word = m.group(1)
        low = word.lower()
        if to_female and low in _MALE_TO_FEMALE:
            return _match_case(_MALE_TO_FEMALE[low], word)
        if to_male and low == "her":
            nxt = _next_word(caption, m.end())
            return _match_case("him" if nxt is None or nxt in _NOT_A_NOUN_PHRASE else "his", word)
        if to_male and low in _FEMALE_TO_MALE:
            return _match_case(_FEMALE_TO_MALE[low], word)
        return word

    return _TERM.sub(replace, caption)


@dataclass
class GenderReport:
    """Term counts before and after a rebalancing, and how many captions were swapped."""

    captions: int = 0
    eligible: int = 0  # captions with a gendered term of the chosen direction(s)
    swapped: int = 0
    before: dict[str, int] = field(default_factory=dict)  # {"male": n, "female": n} term occurrences
    after: dict[str, int] = field(default_factory=dict)
    terms_before: dict[str, int] = field(default_factory=dict)  # per term
    terms_after: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _count_terms(captions: Iterable[str]) -> tuple[dict[str, int], Counter]:
    totals = {"male": 0, "female": 0}
    terms: Counter = Counter()
    for c in captions:
        male, female = gender_terms(c)
        totals["male"] += len(male)
        totals["female"] += len(female)
        terms.update(male)
        terms.update(female)
    return totals, terms


def rebalance_gender(captions: Sequence[str], *, p: float = 0.5, direction: str = "both",
                     seed: int = 0) -> tuple[list[str], list[bool], GenderReport]:
    """Swap the gendered terms of each eligible caption with probability ``p``.

    A caption is eligible when it has a term of the direction being swapped (for ``both``: any gendered
    term). One random draw per caption, from ``random.Random(seed)``, in order, for every caption, eligible
    or not: the same seed gives the same choices whatever the direction. Returns the new captions, which
    ones were swapped, and the :class:`GenderReport`.
    """
    if not 0.0 <= p <= 1.0:
        raise InputError(f"p must be in [0, 1], got {p}")
    if direction not in DIRECTIONS:
        raise InputError(f"unknown direction {direction!r}; use one of {', '.join(DIRECTIONS)}")
    rng = random.Random(seed)
    out, swapped = [], []
    eligible = 0
    for c in captions:
        draw = rng.random()
        male, female = gender_terms(c)
        has = {"both": male or female, "male-to-female": male, "female-to-male": female}[direction]
        if has:
            eligible += 1
        flip = bool(has) and draw < p
        out.append(swap_gender(c, direction) if flip else c)
        swapped.append(flip)
    before, terms_before = _count_terms(captions)
    after, terms_after = _count_terms(out)
    report = GenderReport(captions=len(captions), eligible=eligible, swapped=sum(swapped), before=before,
                          after=after, terms_before=dict(terms_before.most_common()),
                          terms_after=dict(terms_after.most_common()))
    return out, swapped, report


# -- statistics ------------------------------------------------------------------------------------

STOPWORDS = frozenset({
    "a", "an", "the", "of", "on", "in", "with", "and", "is", "are", "to", "at", "some", "two", "his", "her", "its",
    "their", "it", "for", "by", "from", "that", "this", "there", "up", "next", "near", "while", "as", "be", "has",
    "have", "down", "out", "into", "other", "one", "three", "several", "sitting", "standing",
})


def words(text: str) -> list[str]:
    """Lowercased word tokens (letters/digits, inner apostrophes kept: "man's", "don't")."""
    return [w.lower().replace("’", "'") for w in _WORD.findall(text)]


def corpus_stats(captions: Sequence[str], *, top: int = 20, max_length: int = 30) -> dict[str, Any]:
    """Counts, vocabulary, length histogram (words; the last bin is ``max_length`` and more), duplicate
    rate, and the most frequent words (all, and without :data:`STOPWORDS`)."""
    counts: Counter = Counter()
    lengths: Counter = Counter()
    n_words = 0
    for c in captions:
        ws = words(c)
        counts.update(ws)
        n_words += len(ws)
        lengths[min(len(ws), max_length)] += 1
    distinct = len(set(captions))
    n = len(captions)
    singletons = sum(1 for v in counts.values() if v == 1)
    return {
        "captions": n,
        "distinct_captions": distinct,
        "duplicate_rate": round(1 - distinct / n, 6) if n else 0.0,
        "words": n_words,
        "vocabulary": len(counts),
        "singleton_words": singletons,
        "mean_words": round(n_words / n, 4) if n else 0.0,
        "length_histogram": {(f"{k}+" if k == max_length else str(k)): lengths[k] for k in sorted(lengths)},
        "top_words": dict(counts.most_common(top)),
        "top_content_words": dict(Counter({w: v for w, v in counts.items() if w not in STOPWORDS}).most_common(top)),
    }


__all__ = ["ABBREVIATIONS", "DIRECTIONS", "GENDER_PAIRS", "GenderReport", "SentenceStats", "corpus_stats",
           "count_words", "extract_sentences", "gender_terms", "rebalance_gender", "split_sentences",
           "swap_gender", "words"]
