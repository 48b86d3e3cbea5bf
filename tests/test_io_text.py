"""capdec.io.text: JSON and JSON Lines parsed one way, errors naming file, line and column."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from capdec.errors import InputError
from capdec.io.text import check_utf8, decode_json, location, parse_json_or_jsonl, read_json, read_text

COCO_SAMPLE = Path(__file__).parent / "data" / "coco_captions_sample.json"


@pytest.fixture(scope="module")
def captions() -> list[str]:
    return [a["caption"] for a in json.loads(COCO_SAMPLE.read_text(encoding="utf-8"))["annotations"]]


def test_json_lines_give_records_and_their_line_numbers(tmp_path, captions):
    text = "\n".join(json.dumps({"caption": c}) for c in captions[:3]) + "\n\n" + json.dumps({"caption": captions[3]}) + "\n"
    data, lines = parse_json_or_jsonl(tmp_path / "a.jsonl", text)
    assert data == [{"caption": c} for c in captions[:4]] and lines == [1, 2, 3, 5]
    assert location(tmp_path / "a.jsonl", 3, lines) == f"{tmp_path / 'a.jsonl'}: line 5"
    one, lines = parse_json_or_jsonl(tmp_path / "b.jsonl", "\n" + json.dumps({"caption": captions[0]}) + "\n")
    assert one == {"caption": captions[0]} and lines == [2]  # one line: the object, and where it is
    doc, lines = parse_json_or_jsonl(tmp_path / "c.json", json.dumps([{"caption": c} for c in captions[:5]], indent=2))
    assert doc == [{"caption": c} for c in captions[:5]] and lines is None
    assert location(tmp_path / "c.json", 4, lines) == f"{tmp_path / 'c.json'}: item 4"
    u2028 = json.dumps({"caption": "a\u2028b"}, ensure_ascii=False) + "\n" + json.dumps({"caption": "c"})
    assert parse_json_or_jsonl(tmp_path / "d.jsonl", u2028)[1] == [1, 2]  # U+2028 is no line break here


@pytest.mark.parametrize("text, match", [
    ('{"caption": "a"}\n{"caption": "b",}\n', r"x\.jsonl: line 2 column 17: malformed JSON line"),
    ('[{"caption": "a"},\n {"caption": "b"]\n', r"x\.jsonl: line 2 column 17: malformed JSON \("),
])
def test_syntax_errors_name_line_and_column(tmp_path, text, match):
    with pytest.raises(InputError, match=match):
        parse_json_or_jsonl(tmp_path / "x.jsonl", text)


def test_user_files_read_as_utf8_with_errors_that_say_what(tmp_path, captions):
    path = tmp_path / "c.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(captions[:2]).encode())  # a BOM is allowed
    assert read_json(path) == captions[:2]
    path.write_text("   \n")
    with pytest.raises(InputError, match=r"c\.json: the file is empty"):
        read_text(path)
    with pytest.raises(InputError, match="no such file"):
        read_text(tmp_path / "missing.json")
    with pytest.raises(InputError, match="is a directory"):
        read_text(tmp_path)
    txt = tmp_path / "c.txt"
    txt.write_bytes("\n".join(captions[:3]).encode() + b"\nA caf\xe9.\n")
    with pytest.raises(InputError, match=r"c\.txt: line 4 column 6: not valid UTF-8 \(byte 0xe9\)"):
        check_utf8(txt)


# -- what decode_json refuses that json.loads takes (issue 21) ---------------------------------------------


@pytest.mark.parametrize("text, column, message", [
    ("[" * 101 + "]" * 101, 101, "nested more than 100 deep"),
    ('{"a": ' + "[" * 100 + "]" * 100 + "}", 106, "nested more than 100 deep"),  # the object is a level too
    ("[" * 5000 + "]" * 5000, 101, "nested more than 100 deep"),  # over the interpreter's recursion limit
    ('{"id": ' + "7" * 65 + "}", 8, "an integer of 65 digits"),
    ('{"id": ' + "7" * 5000 + "}", 8, "an integer of 5000 digits"),  # over Python's own 4300-digit limit
    ('{"lr": NaN}', 8, "NaN is not a JSON value"),
    ("[1, -Infinity]", 5, "-Infinity is not a JSON value"),
    ('{"x": 1e400}', 7, "the number 1e400 is out of range"),
    ('["\\ud800 alone"]', 3, "an unpaired UTF-16 surrogate"),
])
def test_decode_json_refuses_what_the_parser_would_take(text, column, message):
    with pytest.raises(json.JSONDecodeError, match=message) as e:
        decode_json(text)
    assert (e.value.lineno, e.value.colno) == (1, column)


def test_decode_json_takes_what_is_within_its_limits():
    assert decode_json("[" * 100 + "]" * 100) is not None
    assert decode_json('{"id": ' + "7" * 64 + ', "s": "' + "9" * 200 + '"}')["id"] == int("7" * 64)
    assert decode_json('{"s": "[[[[ \\" {{{{"}') == {"s": '[[[[ " {{{{'}  # brackets in strings do not nest
    assert decode_json('["\\ud83d\\ude00"]') == ["\U0001F600"]  # a surrogate pair is a character
    assert decode_json("[NaN]", allow_nan=True)[0] != decode_json("[NaN]", allow_nan=True)[0]  # capdec's own logs
