"""Text and JSON of user files, read one way: every reader of the input layer parses through here.

Errors name the place the same way everywhere: ``PATH: line N[ column C]: ...`` (:func:`at_line`), or
``PATH: item I`` inside a JSON document (:func:`location`). :func:`decode_json` is the one call of
the JSON parser on a user's text, so hardening it (nesting depth, huge numbers) is one change.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from capdec.errors import InputError


def read_text(path: Path) -> str:
    """A user's text file (UTF-8, a BOM allowed); missing, a directory, not UTF-8 or empty is an error."""
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected a file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e})") from e
    if not text.strip():
        raise InputError(f"{path}: the file is empty")
    return text


def at_line(where: str | os.PathLike, line: int, column: int | None = None) -> str:
    """Where in a file, as every input-layer error names it: ``PATH: line N`` or ``PATH: line N column C``."""
    return f"{where}: line {line}" + (f" column {column}" if column is not None else "")


def location(path: Path, index: int, lines: list[int] | None) -> str:
    """Record ``index`` of a parsed file: its line (JSON Lines) or ``PATH: item I`` (a JSON list)."""
    return at_line(path, lines[index]) if lines else f"{path}: item {index}"


def decode_json(text: str) -> Any:
    """The JSON parser on a user's text (raises :class:`json.JSONDecodeError`); the readers call only this."""
    return json.loads(text)


def parse_json(text: str, where: str | os.PathLike) -> Any:
    """One JSON document; a syntax error names ``where`` (a file, or what the text is), line and column."""
    try:
        return decode_json(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{at_line(where, e.lineno, e.colno)}: malformed JSON ({e.msg})") from e


def read_json(path: str | os.PathLike) -> Any:
    """A user's JSON file (UTF-8, a BOM allowed), parsed; errors name the file and line.

    (Artefacts capdec wrote itself are read with :func:`capdec.utils.read_artifact_json`.)
    """
    path = Path(path)
    return parse_json(read_text(path), path)


def parse_json_line(line: str, path: Path, lineno: int, *, expected: str) -> Any:
    """One line of a JSON Lines file; a syntax error names the line and column and says ``expected``."""
    try:
        return decode_json(line)
    except json.JSONDecodeError as e:
        raise InputError(f"{at_line(path, lineno, e.colno)}: not valid JSON ({e.msg}); {expected}") from e


def parse_json_or_jsonl(path: Path, text: str) -> tuple[Any, list[int] | None]:
    """Parse a JSON document or JSON Lines; errors name the file and line.

    Returns ``(data, lines)``: for JSON Lines (or a one-line document) ``data`` is the list of
    records (the one object) and ``lines`` their line numbers; for a JSON document ``lines`` is None.
    """
    lines = text.split("\n")  # not splitlines(): U+2028 may sit raw inside a JSON string
    numbered = [(i, line) for i, line in enumerate(lines, 1) if line.strip()]
    try:
        data = decode_json(text)
        return data, ([numbered[0][0]] if len(numbered) == 1 and isinstance(data, dict) else None)
    except json.JSONDecodeError as whole:
        try:
            decode_json(numbered[0][1])
        except json.JSONDecodeError:
            raise InputError(f"{at_line(path, whole.lineno, whole.colno)}: malformed JSON "
                             f"({whole.msg})") from whole
        records = []
        for lineno, line in numbered:
            try:
                records.append(decode_json(line))
            except json.JSONDecodeError as e:
                raise InputError(f"{at_line(path, lineno, e.colno)}: malformed JSON line "
                                 f"({e.msg})") from e
        return records, [lineno for lineno, _ in numbered]


def describe_json(data: Any) -> str:
    """What a parsed document is, for messages: its first keys, or its JSON type."""
    if isinstance(data, dict):
        return f"keys: {', '.join(map(repr, list(data)[:8])) or 'none'}"
    return f"a JSON {type(data).__name__}"


def normalize_caption(text: str) -> str:
    """Collapse every run of whitespace (newlines, tabs, NBSP, ...) to one space; strip the ends."""
    return " ".join(text.split())


def check_utf8(path: Path) -> str:
    """Fail with the line and column of the first byte that is not UTF-8; return the file's sha256."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        # byte 0x0A never occurs inside a multi-byte UTF-8 sequence, so lines decode independently
        for lineno, line in enumerate(f, start=1):
            h.update(line)
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{at_line(path, lineno, e.start + 1)}: not valid UTF-8 (byte 0x{line[e.start]:02x}); "
                                 f"re-encode the file as UTF-8 (e.g. iconv -t UTF-8)") from e
    return h.hexdigest()


__all__ = ["at_line", "check_utf8", "decode_json", "describe_json", "location", "normalize_caption", "parse_json",
           "parse_json_line", "parse_json_or_jsonl", "read_json", "read_text"]
