"""Caption corpora (``capdec embed``, :func:`capdec.corpus.read_corpus`): each file's raw captions and metadata.

Formats: ``txt`` (one caption per line), ``jsonl`` (one object per line, the caption in a field),
``csv`` / ``tsv`` (a header row, the caption in a column), ``coco`` (a COCO caption annotation file),
``karpathy`` and ``flickrstyle`` (the standard datasets of :mod:`capdec.io.datasets`). The format
comes from the extension (:func:`detect_format`; a ``.json`` file is COCO or Karpathy by its content).
Normalising, skipping empties and de-duplicating are the corpus's (:mod:`capdec.corpus`).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from capdec.errors import InputError
from capdec.io.datasets import karpathy_from_data, read_coco, read_flickrstyle, read_style_lines
from capdec.io.text import at_line, parse_json_line, read_json

FORMATS = ("txt", "jsonl", "csv", "tsv", "coco", "karpathy", "flickrstyle")
_EXTENSIONS = {".txt": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv",
               ".json": "coco"}
# JSONL fields / CSV columns copied into a caption's metadata when present (evaluation joins on them)
_KEPT_KEYS = ("image_id", "id")


def detect_format(path: str | os.PathLike) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in _EXTENSIONS:
        known = ", ".join(f"{ext} ({fmt})" for ext, fmt in _EXTENSIONS.items())
        raise InputError(f"{path}: cannot tell the corpus format from the extension {suffix or '(none)'!r} "
                         f"(known: {known}); pass format= (--format) explicitly")
    return _EXTENSIONS[suffix]


def iter_caption_file(path: Path, fmt: str, field_name: str, column: str, data: Any = None,
                      split: str | None = None, style_names: str | os.PathLike | None = None,
                      style_test: int = 0) -> Iterator[tuple[str, dict[str, Any]]]:
    """(raw caption, metadata) of every caption of one file. ``data``: the file already parsed (JSON
    formats); ``split`` / ``style_names`` / ``style_test``: the images of a Karpathy or FlickrStyle10K file."""
    if fmt == "karpathy":
        return karpathy_from_data(data if data is not None else read_json(path), path, split or "train").captions()
    if fmt == "flickrstyle":
        if (split or "all") == "all" and style_names is None:
            return ((line, {"line": i}) for i, line in enumerate(read_style_lines(path), start=1))
        return read_flickrstyle(path, style_names, split=split or "all", test_size=style_test).captions()
    if fmt == "txt":
        return _iter_txt(path)
    if fmt == "jsonl":
        return _iter_jsonl(path, field_name)
    if fmt in ("csv", "tsv"):
        return _iter_csv(path, column, "\t" if fmt == "tsv" else ",")
    if fmt == "coco":
        return read_coco(data if data is not None else read_json(path), path,
                         hint=". For one caption per line use a .txt/.jsonl file, or pass format= (--format)").captions()
    raise InputError(f"unknown corpus format {fmt!r}; use one of auto, {', '.join(FORMATS)}")


def _iter_txt(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    # split on "\n" only so that line numbers match what an editor shows (str.splitlines also
    # splits on form feeds and U+2028; those are whitespace and get normalised away instead)
    with open(path, encoding="utf-8-sig", newline="\n") as f:
        for lineno, line in enumerate(f, start=1):
            yield line, {"line": lineno}


def _iter_jsonl(path: Path, field_name: str) -> Iterator[tuple[str, dict[str, Any]]]:
    with open(path, encoding="utf-8-sig", newline="\n") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            record = parse_json_line(line, path, lineno, expected="a JSONL file needs one JSON object per line")
            if not isinstance(record, dict):
                raise InputError(f"{at_line(path, lineno)}: expected a JSON object with a {field_name!r} field, "
                                 f"got a JSON {type(record).__name__}")
            if field_name not in record:
                raise InputError(f"{at_line(path, lineno)}: no field {field_name!r} (fields: "
                                 f"{', '.join(map(repr, record)) or 'none'}); choose it with field= (--field)")
            text = record[field_name]
            if not isinstance(text, str):
                raise InputError(f"{at_line(path, lineno)}: field {field_name!r} is a JSON "
                                 f"{'null' if text is None else type(text).__name__}, expected a string")
            yield text, {"line": lineno, **{k: record[k] for k in _KEPT_KEYS if k in record and k != field_name}}


def _iter_csv(path: Path, column: str, delimiter: str) -> Iterator[tuple[str, dict[str, Any]]]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter, strict=True)
        last_line = 0  # reader.line_num after the previous record: a record starts on the next line
        try:
            header = next(reader, None)
            if header is None:
                raise InputError(f"{path}: empty file, expected a header row naming a {column!r} column")
            if column not in header:
                raise InputError(f"{at_line(path, 1)}: no column {column!r} in the header (columns: "
                                 f"{', '.join(map(repr, header))}); choose it with column= (--column)")
            index = header.index(column)
            kept = {k: header.index(k) for k in _KEPT_KEYS if k in header and k != column}
            last_line = reader.line_num
            for row in reader:
                start = last_line + 1
                last_line = reader.line_num
                if not row:  # a blank line is no record
                    continue
                if len(row) != len(header):
                    raise InputError(f"{at_line(path, start)}: {len(row)} fields but the header has {len(header)}; "
                                     f"quote captions that contain {delimiter!r}")
                yield row[index], {"line": start, **{k: row[i] for k, i in kept.items()}}
        except csv.Error as e:
            raise InputError(f"{at_line(path, last_line + 1)}: not valid CSV ({e}); check the quoting of that "
                             f"record") from e


__all__ = ["FORMATS", "detect_format", "iter_caption_file"]
