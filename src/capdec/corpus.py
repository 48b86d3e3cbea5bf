"""Caption corpora: read text files into a clean list of captions.

Formats (picked from the file extension unless ``format`` says otherwise):

- ``txt``   (``.txt``): one caption per line;
- ``jsonl`` (``.jsonl``, ``.ndjson``): one JSON object per line, the caption in ``field``;
- ``csv``   (``.csv``) / ``tsv`` (``.tsv``): a header row, the caption in ``column``;
- ``coco``  (``.json``): a COCO caption annotation file (``annotations[].caption``).

Every caption is whitespace-normalised (runs of whitespace, newlines included, become one space;
ends stripped). Empty captions are skipped and counted; with ``dedupe=True`` exact duplicates (after
normalisation) are dropped, keeping the first, and counted. Nothing is dropped silently: anything that
does not parse raises :class:`~capdec.errors.InputError` naming the file and line.

Each caption carries a small metadata dict: ``line`` (1-based line where its record starts; for COCO
the annotation's ``image_id`` and ``id`` instead), ``image_id``/``id`` when a JSONL record or CSV row has
them, and ``source`` (the file) when several files are read together.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capdec.errors import InputError
from capdec.io.corpora import FORMATS, detect_format, iter_caption_file
from capdec.io.datasets import check_split, json_kind
from capdec.io.text import MAX_CAPTION_CHARS, check_utf8, cut_caption, normalize_caption, read_json

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike


@dataclass
class CorpusStats:
    read: int = 0  # caption records seen, empty ones included
    empty_skipped: int = 0  # records whose caption was empty after whitespace normalisation
    duplicates_removed: int = 0  # exact duplicates dropped (only with dedupe=True)
    too_long: int = 0  # captions over MAX_CAPTION_CHARS characters, cut to that length

    def as_dict(self) -> dict[str, int]:
        return {"read": self.read, "empty_skipped": self.empty_skipped,
                "duplicates_removed": self.duplicates_removed, "too_long": self.too_long}


@dataclass
class Corpus:
    captions: list[str]  # normalised, non-empty captions in file order
    meta: list[dict[str, Any]]  # one dict per caption (line, image_id, ...), aligned with captions
    stats: CorpusStats = field(default_factory=CorpusStats)
    paths: list[str] = field(default_factory=list)  # files read ([] for an in-memory corpus)
    sha256: str = ""  # of the file (several files: of their digests, in order; in memory: of the input)
    format: str | list[str] = "memory"  # one format, or one per file when they differ
    options: dict[str, Any] = field(default_factory=dict)  # reader options used (field, column, dedupe)

    def __post_init__(self) -> None:
        assert len(self.captions) == len(self.meta), "captions and meta must be aligned"

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def captions_sha256(self) -> str:
        """Digest of the caption list itself: what gets embedded (changes with reader options)."""
        return captions_sha256(self.captions)

    def describe(self) -> dict[str, Any]:
        """JSON-able provenance, as recorded in an embedding store's ``meta.json``."""
        return {"paths": list(self.paths), "sha256": self.sha256, "captions_sha256": self.captions_sha256,
                "format": self.format, **self.options}


def captions_sha256(captions: Iterable[str]) -> str:
    h = hashlib.sha256()
    for c in captions:
        h.update(c.encode("utf-8"))
        h.update(b"\n")  # normalised captions never contain a newline, so this is unambiguous
    return h.hexdigest()


class _Collector:
    """Normalise, skip empties, optionally de-duplicate, and count."""

    def __init__(self, dedupe: bool):
        self.dedupe = dedupe
        self.seen: set[str] = set()
        self.captions: list[str] = []
        self.meta: list[dict[str, Any]] = []
        self.stats = CorpusStats()

    def add(self, raw: str, meta: dict[str, Any]) -> None:
        self.stats.read += 1
        text = normalize_caption(raw)
        if not text:
            self.stats.empty_skipped += 1
            return
        if len(text) > MAX_CAPTION_CHARS:  # one 20 MB line would otherwise be embedded, tokenised, trained on whole
            if not self.stats.too_long:
                logger.warning("a caption of %d characters (%s) was cut to %d; later ones are counted", len(text),
                               ", ".join(f"{k} {v}" for k, v in meta.items()) or "in memory", MAX_CAPTION_CHARS)
            self.stats.too_long += 1
            text = cut_caption(text)
        if self.dedupe:
            if text in self.seen:
                self.stats.duplicates_removed += 1
                return
            self.seen.add(text)
        self.captions.append(text)
        self.meta.append(meta)


def read_corpus(paths: PathLike | Sequence[PathLike], *, format: str = "auto", field: str = "caption",
                column: str = "caption", dedupe: bool = False, split: str | None = None,
                style_names: PathLike | None = None, style_test: int = 0) -> Corpus:
    """Read one or several caption files into a :class:`Corpus` (see the module docstring).

    ``format`` (``auto`` or one of :data:`FORMATS`) applies to every file; ``auto`` picks each file's
    format from its extension (a ``.json`` file is COCO or Karpathy by its content). ``field`` is the
    JSONL field and ``column`` the CSV/TSV column holding the caption. With several files, ``dedupe``
    works across them. ``split`` picks the images of a Karpathy-split file (default ``train``, which
    includes restval) or of a FlickrStyle10K file (``train``/``test`` with ``style_test`` images held
    out; ``style_names`` its image list); it is an error for the other formats.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    if not paths:
        raise InputError("no corpus files given")
    if format != "auto" and format not in FORMATS:
        raise InputError(f"unknown corpus format {format!r}; use one of auto, {', '.join(FORMATS)}")
    formats = []
    for p in paths:
        if not p.exists():
            raise InputError(f"{p}: no such corpus file")
        if not p.is_file():
            raise InputError(f"{p}: not a file (a corpus is a .txt/.jsonl/.csv/.tsv/COCO .json file)")
        formats.append(detect_format(p) if format == "auto" else format)
    # a .json file is COCO or Karpathy by its content: parse it once, here, and hand the parse on
    parsed: dict[Path, Any] = {}
    digests = []
    for i, (p, fmt) in enumerate(zip(paths, formats)):
        # FlickrStyle10K's files mix UTF-8 and Latin-1 lines (its reader decodes both)
        digests.append(check_utf8(p) if fmt != "flickrstyle" else hashlib.sha256(p.read_bytes()).hexdigest())
        if fmt in ("coco", "karpathy"):
            parsed[p] = read_json(p)
            if format == "auto" and json_kind(parsed[p]) == "karpathy":
                formats[i] = "karpathy"
    if split is not None:
        check_split(split)
        wrong = [(p, fmt) for p, fmt in zip(paths, formats) if fmt not in ("karpathy", "flickrstyle")]
        if wrong:
            raise InputError(f"--split selects images of a Karpathy-split or FlickrStyle10K file; {wrong[0][0]} is "
                             f"a {wrong[0][1]} corpus without splits")

    collector = _Collector(dedupe)
    for p, fmt in zip(paths, formats):
        before = collector.stats.read
        for raw, meta in iter_caption_file(p, fmt, field, column, parsed.get(p), split, style_names, style_test):
            if len(paths) > 1:
                meta["source"] = str(p)
            collector.add(raw, meta)
        logger.debug("read %d captions from %s (%s)", collector.stats.read - before, p, fmt)

    if len(paths) == 1:
        sha = digests[0]
    else:
        sha = hashlib.sha256("".join(digests).encode()).hexdigest()  # == capdec.utils.sha256_files
    options: dict[str, Any] = {"field": field, "column": column, "dedupe": dedupe}
    if any(fmt in ("karpathy", "flickrstyle") for fmt in formats):
        options["split"] = split or ("train" if "karpathy" in formats else "all")
    corpus = Corpus(collector.captions, collector.meta, collector.stats, paths=[str(p.resolve()) for p in paths],
                    sha256=sha, format=formats[0] if len(set(formats)) == 1 else formats, options=options)
    _log_summary(corpus, ", ".join(map(str, paths)))
    return corpus


def captions_from_list(captions: Sequence[str], *, meta: Sequence[dict[str, Any]] | None = None,
                       dedupe: bool = False) -> Corpus:
    """An in-memory :class:`Corpus`, cleaned exactly like a file (normalised, empties skipped)."""
    if isinstance(captions, str):
        raise TypeError("captions_from_list takes a list of strings, not a single string")
    if meta is not None and len(meta) != len(captions):
        raise InputError(f"meta has {len(meta)} entries for {len(captions)} captions")
    collector = _Collector(dedupe)
    for i, text in enumerate(captions):
        if not isinstance(text, str):
            raise InputError(f"caption {i} is a {type(text).__name__}, expected a string")
        collector.add(text, dict(meta[i]) if meta is not None else {"index": i})
    digest = hashlib.sha256(json.dumps(list(captions), ensure_ascii=False).encode("utf-8")).hexdigest()
    corpus = Corpus(collector.captions, collector.meta, collector.stats, paths=[], sha256=digest,
                    format="memory", options={"dedupe": dedupe})
    _log_summary(corpus, "memory")
    return corpus


def _log_summary(corpus: Corpus, where: str) -> None:
    s = corpus.stats
    logger.info("corpus %s: %d captions (%d read, %d empty skipped, %d duplicates removed, %d cut to %d characters)",
                where, len(corpus), s.read, s.empty_skipped, s.duplicates_removed, s.too_long, MAX_CAPTION_CHARS)
    if not corpus.captions:
        logger.warning("corpus %s has no captions", where)
