"""Corpus readers: every format, whitespace/empty/duplicate handling, and errors that name file + line.

``tests/data/coco_captions_sample.json`` holds 303 real captions from MS-COCO captions_val2017
(MS-COCO captions, CC BY 4.0; see its ``info`` field).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from capdec.corpus import (
    Corpus,
    captions_from_list,
    detect_format,
    normalize_caption,
    read_corpus,
)
from capdec.errors import InputError

DATA = Path(__file__).parent / "data"
COCO_SAMPLE = DATA / "coco_captions_sample.json"


def write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


# -- txt --------------------------------------------------------------------------------------------

def test_txt_normalises_whitespace_and_counts_empty_lines(tmp_path):
    p = write(tmp_path / "c.txt", "\ufeffA  dog\truns.\r\n\n   \nA cat\u00a0sleeps \n\u3000\nA  dog runs.")
    corpus = read_corpus(p)
    assert corpus.captions == ["A dog runs.", "A cat sleeps", "A dog runs."]
    assert [m["line"] for m in corpus.meta] == [1, 4, 6]
    assert corpus.stats.as_dict() == {"read": 6, "empty_skipped": 3, "duplicates_removed": 0,
                                      "too_long": 0}
    assert corpus.format == "txt"
    assert corpus.sha256 == hashlib.sha256(p.read_bytes()).hexdigest()
    assert corpus.paths == [str(p.resolve())]


def test_dedupe_is_exact_after_normalisation_and_keeps_the_first(tmp_path):
    p = write(tmp_path / "c.txt", "A dog runs.\nA  dog runs. \na dog runs.\nA dog runs.\n")
    corpus = read_corpus(p, dedupe=True)
    assert corpus.captions == ["A dog runs.", "a dog runs."]  # case differs: not a duplicate
    assert [m["line"] for m in corpus.meta] == [1, 3]
    assert corpus.stats.duplicates_removed == 2
    assert corpus.options["dedupe"] is True
    assert corpus.captions_sha256 != read_corpus(p).captions_sha256


def test_line_separator_inside_a_line_is_whitespace_not_a_new_line(tmp_path):
    # U+2028 / form feed split lines for str.splitlines(); here they must not shift line numbers
    p = write(tmp_path / "c.txt", "one\u2028two\nthree\x0cfour\n\nfive\n")
    corpus = read_corpus(p)
    assert corpus.captions == ["one two", "three four", "five"]
    assert [m["line"] for m in corpus.meta] == [1, 2, 4]


# -- jsonl ------------------------------------------------------------------------------------------

def test_jsonl_default_and_custom_field(tmp_path):
    p = write(tmp_path / "c.jsonl", '{"caption": " A dog. ", "image_id": 7, "other": 1}\n\n'
                                    '{"caption": "", "image_id": 8}\n{"caption": "A cat.", "id": 3}\n')
    corpus = read_corpus(p)
    assert corpus.captions == ["A dog.", "A cat."]
    assert corpus.meta == [{"line": 1, "image_id": 7}, {"line": 4, "id": 3}]
    assert corpus.stats.read == 3 and corpus.stats.empty_skipped == 1

    q = write(tmp_path / "t.ndjson", '{"text": "A bird."}\n{"text": "A bird.", "caption": "x"}\n')
    corpus = read_corpus(q, field="text", dedupe=True)
    assert corpus.captions == ["A bird."] and corpus.stats.duplicates_removed == 1
    assert corpus.format == "jsonl" and corpus.options["field"] == "text"


def test_jsonl_broken_line_names_file_and_line(tmp_path):
    p = write(tmp_path / "c.jsonl", '{"caption": "ok"}\n{"caption": "ok too"}\n{"caption": "broken\n')
    with pytest.raises(InputError, match=r"c\.jsonl: line 3 column \d+: not valid JSON"):
        read_corpus(p)


def test_jsonl_missing_field_names_field_line_and_what_is_there(tmp_path):
    p = write(tmp_path / "c.jsonl", '{"caption": "ok"}\n{"text": "no caption here", "id": 1}\n')
    with pytest.raises(InputError, match=r"c\.jsonl: line 2: no field 'caption' \(fields: 'text', 'id'\).*--field"):
        read_corpus(p)


@pytest.mark.parametrize("line, what", [('["a list"]', "JSON list"), ('{"caption": null}', "JSON null"),
                                        ('{"caption": 3}', "JSON int")])
def test_jsonl_wrong_types(tmp_path, line, what):
    p = write(tmp_path / "c.jsonl", '{"caption": "ok"}\n' + line + "\n")
    with pytest.raises(InputError, match=rf"c\.jsonl: line 2: .*{what}"):
        read_corpus(p)


# -- csv / tsv --------------------------------------------------------------------------------------

def test_csv_quoted_multiline_caption_and_line_numbers(tmp_path):
    p = write(tmp_path / "c.csv", 'image_id,caption,source\n'
                                  '1,"A dog, running.",x\n'
                                  '2,"A cat\non two lines",y\n'
                                  '\n'
                                  '3,,z\n'
                                  '4,"He said ""hi"".",w\n')
    corpus = read_corpus(p)
    assert corpus.captions == ["A dog, running.", "A cat on two lines", 'He said "hi".']
    assert corpus.meta == [{"line": 2, "image_id": "1"}, {"line": 3, "image_id": "2"},
                           {"line": 7, "image_id": "4"}]
    assert corpus.stats.empty_skipped == 1


def test_csv_custom_column_and_tsv(tmp_path):
    p = write(tmp_path / "c.csv", "sentence,n\nA dog.,1\n")
    assert read_corpus(p, column="sentence").captions == ["A dog."]
    t = write(tmp_path / "c.tsv", "caption\tn\nA dog, a cat.\t1\n")
    corpus = read_corpus(t)
    assert corpus.captions == ["A dog, a cat."] and corpus.format == "tsv"


def test_csv_missing_column_names_column_and_header_line(tmp_path):
    p = write(tmp_path / "c.csv", "image_id,text\n1,A dog.\n")
    with pytest.raises(InputError, match=r"c\.csv: line 1: no column 'caption' .*'image_id', 'text'.*--column"):
        read_corpus(p)


def test_csv_broken_quoting_names_the_line(tmp_path):
    p = write(tmp_path / "c.csv", 'caption,n\n"ok",1\n"ok",2\n"a "bad" quote",3\n')
    with pytest.raises(InputError, match=r"c\.csv: line 4: not valid CSV"):
        read_corpus(p)
    p = write(tmp_path / "d.csv", 'caption,n\n"ok",1\n"never closed,2\nmore\n')
    with pytest.raises(InputError, match=r"d\.csv: line 3: not valid CSV"):
        read_corpus(p)


def test_csv_wrong_field_count_names_the_line(tmp_path):
    p = write(tmp_path / "c.csv", "caption,n\nA dog.,1\nA cat, sitting.,2\n")
    with pytest.raises(InputError, match=r"c\.csv: line 3: 3 fields but the header has 2"):
        read_corpus(p)


def test_csv_empty_file(tmp_path):
    with pytest.raises(InputError, match="empty file"):
        read_corpus(write(tmp_path / "c.csv", ""))


# -- COCO -------------------------------------------------------------------------------------------

def test_coco_real_captions_keep_ids():
    data = json.loads(COCO_SAMPLE.read_text(encoding="utf-8"))
    anns = data["annotations"]
    corpus = read_corpus(COCO_SAMPLE)
    assert corpus.format == "coco"
    assert len(corpus) == len(anns) == 303
    assert corpus.captions == [" ".join(a["caption"].split()) for a in anns]
    assert corpus.meta[0] == {"image_id": anns[0]["image_id"], "id": anns[0]["id"]}
    assert any(a["caption"] != c for a, c in zip(anns, corpus.captions))  # real data needs normalising

    deduped = read_corpus(COCO_SAMPLE, dedupe=True)
    assert len(deduped) == len(set(corpus.captions)) == 303 - 25
    assert deduped.stats.duplicates_removed == 25
    assert "A large long train on a steel track." in deduped.captions


def test_coco_without_annotations(tmp_path):
    p = write(tmp_path / "c.json", json.dumps({"images": [], "info": {}}))
    with pytest.raises(InputError, match=r"c\.json: neither a COCO caption annotation file \(no 'annotations' list\) "
                                         r"nor a Karpathy-split file .*found keys: 'images', 'info'"):
        read_corpus(p)
    p = write(tmp_path / "l.json", json.dumps(["a", "b"]))
    with pytest.raises(InputError, match="a JSON list"):
        read_corpus(p)


def test_coco_broken_json_and_bad_annotation(tmp_path):
    p = write(tmp_path / "c.json", '{"annotations": [\n {"caption": "ok"},\n {"caption": "x" "y"}\n]}')
    with pytest.raises(InputError, match=r"c\.json: line 3 column 18: malformed JSON"):
        read_corpus(p)
    p = write(tmp_path / "d.json", json.dumps({"annotations": [{"caption": "ok"}, {"image_id": 1, "id": 9}]}))
    with pytest.raises(InputError, match=r"d\.json: annotations\[1\] has no 'caption'"):
        read_corpus(p)


def test_full_coco_val2017_file(coco_dir):
    corpus = read_corpus(coco_dir / "captions_val2017.json")
    assert len(corpus) == corpus.stats.read == 25014
    assert corpus.sha256 == "b38a92486848a88da87130fb0af7ef790b504628e3817137e21b2d3bd9d9190c"


# -- bad UTF-8, formats, several files --------------------------------------------------------------

@pytest.mark.parametrize("name, head, bad", [
    ("c.txt", b"A dog.\nA cat.\n", b"A caf\xe9 latte.\n"),
    ("c.jsonl", b'{"caption": "a"}\n{"caption": "b"}\n', b'{"caption": "caf\xe9"}\n'),
    ("c.csv", b"caption\na\n", b"caf\xe9\n"),
    ("c.json", b'{"annotations": [\n{"caption": "a"},\n', b'{"caption": "caf\xe9"}]}\n'),
])
def test_bad_utf8_names_file_line_and_column(tmp_path, name, head, bad):
    p = write(tmp_path / name, head + bad)
    line = head.count(b"\n") + 1
    col = bad.index(b"\xe9") + 1
    with pytest.raises(InputError, match=rf"{name.replace('.', '[.]')}: line {line} column {col}: not valid UTF-8 "
                                         rf"\(byte 0xe9\)"):
        read_corpus(p)


def test_format_detection_and_override(tmp_path):
    assert [detect_format(n) for n in ("a.TXT", "a.jsonl", "a.csv", "a.tsv", "a.json")] == \
        ["txt", "jsonl", "csv", "tsv", "coco"]
    p = write(tmp_path / "captions.dat", "A dog.\n")
    with pytest.raises(InputError, match=r"captions\.dat: cannot tell the corpus format .*'\.dat'.*--format"):
        read_corpus(p)
    assert read_corpus(p, format="txt").captions == ["A dog."]
    j = write(tmp_path / "lines.txt", '{"caption": "A cat."}\n')
    assert read_corpus(j, format="jsonl").captions == ["A cat."]
    with pytest.raises(InputError, match="unknown corpus format 'xml'"):
        read_corpus(p, format="xml")


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(InputError, match=r"nope\.txt: no such corpus file"):
        read_corpus(tmp_path / "nope.txt")
    with pytest.raises(InputError, match="not a file"):
        read_corpus(tmp_path)


def test_several_files_concatenate_and_dedupe_across(tmp_path):
    a = write(tmp_path / "a.txt", "A dog.\nA cat.\n")
    b = write(tmp_path / "b.jsonl", '{"caption": "A cat."}\n{"caption": "A bird."}\n')
    corpus = read_corpus([a, b], dedupe=True)
    assert corpus.captions == ["A dog.", "A cat.", "A bird."]
    assert corpus.meta[2] == {"line": 2, "source": str(b)}
    assert corpus.format == ["txt", "jsonl"]
    assert corpus.stats.duplicates_removed == 1
    digests = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (a, b)]
    assert corpus.sha256 == hashlib.sha256("".join(digests).encode()).hexdigest()
    assert read_corpus([b, a]).sha256 != corpus.sha256
    desc = corpus.describe()
    assert desc["paths"] == [str(a.resolve()), str(b.resolve())] and desc["dedupe"] is True
    json.dumps(desc)  # JSON-able


def test_captions_from_list():
    corpus = captions_from_list(["  A dog. ", "", "A dog.", "A\ncat."], dedupe=True)
    assert isinstance(corpus, Corpus)
    assert corpus.captions == ["A dog.", "A cat."]
    assert corpus.meta == [{"index": 0}, {"index": 3}]
    assert corpus.stats.as_dict() == {"read": 4, "empty_skipped": 1, "duplicates_removed": 1, "too_long": 0}
    assert corpus.format == "memory" and corpus.paths == []
    assert captions_from_list(["A dog."]).sha256 != captions_from_list(["A cat."]).sha256
    with pytest.raises(InputError, match="caption 1 is a int"):
        captions_from_list(["ok", 3])
    with pytest.raises(TypeError):
        captions_from_list("a string")


def test_normalize_caption():
    assert normalize_caption("  a\t\tb \n c\u00a0 ") == "a b c"
    assert normalize_caption(" \n\t") == ""
