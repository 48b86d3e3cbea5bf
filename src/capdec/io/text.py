"""Text and JSON of user files, read one way: every reader of the input layer parses through here.

Errors name the place the same way everywhere: ``PATH: line N[ column C]: ...`` (:func:`at_line`), or
``PATH: item I`` inside a JSON document (:func:`location`). :func:`decode_json` is the one call of
the JSON parser on a user's text, so hardening it (nesting depth, huge numbers) is one change.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from capdec.errors import InputError


def read_text(path: Path) -> str:
    """A user's text file (UTF-8, a BOM allowed); missing, a directory, not UTF-8 or empty is an error."""
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected a file")
    text = decode_text(path.read_bytes(), path)
    if not text.strip():
        raise InputError(f"{path}: the file is empty")
    return text


def decode_text(data: bytes, path: str | os.PathLike) -> str:
    """A file's bytes as UTF-8 text (a BOM allowed); the first byte that is not UTF-8 is named by line and column."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        start = e.start + (3 if data.startswith(b"\xef\xbb\xbf") else 0)  # utf-8-sig decodes after its BOM
        line, column = data.count(b"\n", 0, start) + 1, start - data.rfind(b"\n", 0, start)
        raise _not_utf8(path, line, column, data[start]) from e


def _not_utf8(path: str | os.PathLike, line: int, column: int, byte: int) -> InputError:
    return InputError(f"{at_line(path, line, column)}: not valid UTF-8 (byte 0x{byte:02x}); re-encode the "
                      f"file as UTF-8 (e.g. iconv -t UTF-8)")


def at_line(where: str | os.PathLike, line: int, column: int | None = None) -> str:
    """Where in a file, as every input-layer error names it: ``PATH: line N`` or ``PATH: line N column C``."""
    return f"{where}: line {line}" + (f" column {column}" if column is not None else "")


def location(path: Path, index: int, lines: list[int] | None) -> str:
    """Record ``index`` of a parsed file: its line (JSON Lines) or ``PATH: item I`` (a JSON list)."""
    return at_line(path, lines[index]) if lines else f"{path}: item {index}"


MAX_JSON_DEPTH = 100  # arrays and objects inside each other; capdec's inputs nest 2 to 5 levels
MAX_INT_DIGITS = 64  # longer integers are no id, count or size (Python refuses over 4300 digits anyway)
_OPENERS = frozenset("[{")
_LONG_NUMBER = re.compile(f"[0-9]{{{MAX_INT_DIGITS + 1},}}")
# a \uD800-\uDFFF escape: the parser turns an unpaired one into a lone surrogate, which cannot be written as UTF-8
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


class _Refused(ValueError):
    """A value the JSON parser would accept but capdec does not (raised from the parser's hooks)."""

    def __init__(self, msg: str, token: str):
        super().__init__(msg)
        self.msg, self.token = msg, token


def _float(token: str) -> float:
    value = float(token)
    if not math.isfinite(value):
        raise _Refused(f"the number {token[:20]}{'...' if len(token) > 20 else ''} is out of range", token)
    return value


def _constant(token: str) -> Any:
    raise _Refused(f"{token} is not a JSON value (write a number, or null)", token)


def decode_json(text: str, *, allow_nan: bool = False) -> Any:
    """The JSON parser on a user's text; the readers call only this.

    Raises :class:`json.JSONDecodeError` (with the position) for malformed text and for what Python's parser
    would take but capdec refuses: arrays/objects nested more than :data:`MAX_JSON_DEPTH` deep, integers of more
    than :data:`MAX_INT_DIGITS` digits, ``NaN`` / ``Infinity`` and numbers out of a float's range, and
    unpaired UTF-16 surrogate escapes (``"\\ud800"``: text that cannot be written back as UTF-8).
    ``allow_nan``: take ``NaN`` / ``Infinity`` (what :func:`json.dump` writes for them: capdec's own logs).
    """
    try:
        data = json.loads(text, parse_float=_float, parse_constant=float if allow_nan else _constant)
    except RecursionError:  # deeper than the interpreter's limit: the check below names the place
        raise _too_deep(text) from None
    except _Refused as e:
        raise json.JSONDecodeError(e.msg, text, max(text.find(e.token), 0)) from None
    except ValueError as e:  # int(): over sys.get_int_max_str_digits() digits
        if isinstance(e, json.JSONDecodeError):
            raise
        raise _long_int(text) from None
    if sum(text.count(c) for c in _OPENERS) > MAX_JSON_DEPTH and _depth(text) > MAX_JSON_DEPTH:
        raise _too_deep(text)
    if _LONG_NUMBER.search(text) and _has(data, lambda v: isinstance(v, int) and len(str(abs(v))) > MAX_INT_DIGITS):
        raise _long_int(text)
    if _SURROGATE_ESCAPE.search(text) and _has(data, _unpaired_surrogate):
        m = _SURROGATE_ESCAPE.search(text)
        raise json.JSONDecodeError("an unpaired UTF-16 surrogate escape (not a character; the text cannot be "
                                   "written as UTF-8)", text, m.start() if m else 0)
    return data


def _has(data: Any, test: Any) -> bool:
    """Whether ``test`` holds for any key or value in ``data`` (walked without recursion)."""
    stack = [data]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
        elif test(value):
            return True
    return False


def _unpaired_surrogate(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _long_int(text: str) -> json.JSONDecodeError:
    m = _LONG_NUMBER.search(text)
    digits = len(m.group()) if m else 0
    return json.JSONDecodeError(f"an integer of {digits} digits (at most {MAX_INT_DIGITS} are read)", text,
                                m.start() if m else 0)


def _depth(text: str) -> int:
    """How deep arrays and objects nest in (valid) JSON ``text``, counted outside strings (vectorised)."""
    import numpy as np

    data = text.encode("utf-8", "surrogatepass")
    if b"\\" in data:
        data = re.sub(rb"\\.", b"", data)  # escapes: an escaped quote ends no string
    marks = np.frombuffer(data.translate(None, _NOT_MARKS), dtype=np.uint8)  # only " [ ] { } are left
    outside = (np.cumsum(marks == ord('"'), dtype=np.int64) & 1) == 0
    step = (np.isin(marks, (ord("["), ord("{"))).astype(np.int8)
            - np.isin(marks, (ord("]"), ord("}"))).astype(np.int8)) * outside
    return int(np.cumsum(step, dtype=np.int64).max(initial=0))


_NOT_MARKS = bytes(c for c in range(256) if c not in b'"[]{}')


def _too_deep(text: str) -> json.JSONDecodeError:
    """The error for nesting over :data:`MAX_JSON_DEPTH`, at the bracket that goes one level too deep."""
    depth, in_string, escaped = 0, False, False
    for pos, char in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in _OPENERS:
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return json.JSONDecodeError(f"arrays and objects nested more than {MAX_JSON_DEPTH} deep", text, pos)
        elif char in "]}":
            depth -= 1
    return json.JSONDecodeError(f"arrays and objects nested more than {MAX_JSON_DEPTH} deep", text, 0)


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


def iter_json_lines(path: Path, expected: str) -> Iterator[tuple[int, Any]]:
    """``(line number, record)`` of each non-blank line of a JSON Lines file, read line by line (the file is
    never held whole), with :func:`read_text`'s and :func:`parse_json_or_jsonl`'s errors. A file that is one
    JSON document raises ``PATH: expected JSON Lines (<expected>), got one JSON document``; one line holding
    one object is one record.
    """
    held: tuple[int, Any] | None = None  # a first record that is no object: one JSON document if it is alone
    count = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            raw = raw[:-1] if raw.endswith(b"\n") else raw
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                start = e.start + (3 if lineno == 1 and raw.startswith(b"\xef\xbb\xbf") else 0)
                raise _not_utf8(path, lineno, start + 1, raw[start]) from e
            if not line.strip():
                continue
            try:
                record = decode_json(line)
            except json.JSONDecodeError as e:
                if not count:  # one document over several lines? parse_json_or_jsonl raises where it is malformed
                    parse_json_or_jsonl(path, read_text(path))
                    raise _one_document(path, expected) from None
                raise InputError(f"{at_line(path, lineno, e.colno)}: malformed JSON line ({e.msg})") from e
            count += 1
            if held is not None:
                yield held
                held = None
            if count == 1 and not isinstance(record, dict):
                held = (lineno, record)
            else:
                yield lineno, record
    if not count:
        raise InputError(f"{path}: the file is empty")
    if held is not None:
        if count == 1:
            raise _one_document(path, expected)
        yield held


def _one_document(path: Path, expected: str) -> InputError:
    return InputError(f"{path}: expected JSON Lines ({expected}), got one JSON document")


def describe_json(data: Any) -> str:
    """What a parsed document is, for messages: its first keys, or its JSON type."""
    if isinstance(data, dict):
        return f"keys: {', '.join(map(repr, list(data)[:8])) or 'none'}"
    return f"a JSON {type(data).__name__}"


MAX_CAPTION_CHARS = 4096  # a caption longer than this (a page of text on one line) is cut when read


def cut_caption(text: str) -> str:
    """``text`` cut to :data:`MAX_CAPTION_CHARS` characters, at the last space before the limit if there is one."""
    if len(text) <= MAX_CAPTION_CHARS:
        return text
    head = text[:MAX_CAPTION_CHARS]
    space = head.rfind(" ", MAX_CAPTION_CHARS // 2)
    return head[:space] if space > 0 else head


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


__all__ = ["MAX_CAPTION_CHARS", "MAX_INT_DIGITS", "MAX_JSON_DEPTH", "at_line", "check_utf8", "cut_caption",
           "decode_json", "decode_text", "describe_json", "iter_json_lines", "location", "normalize_caption", "parse_json",
           "parse_json_line", "parse_json_or_jsonl", "read_json", "read_text"]
