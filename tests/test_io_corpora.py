"""capdec.io.corpora: every corpus format yields the same real COCO captions, in order, with where each came from.

The captions are the 303 real MS-COCO captions of ``tests/data/coco_captions_sample.json`` (CC BY 4.0),
written here in each format; what each reader should give is computed from the annotations directly.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from capdec.errors import InputError
from capdec.io.corpora import detect_format, iter_caption_file

COCO_SAMPLE = Path(__file__).parent / "data" / "coco_captions_sample.json"


@pytest.fixture(scope="module")
def annotations() -> list[dict]:
    return json.loads(COCO_SAMPLE.read_text(encoding="utf-8"))["annotations"]


def _read(path: Path, fmt: str, **kw) -> list[tuple[str, dict]]:
    return list(iter_caption_file(path, fmt, kw.pop("field", "caption"), kw.pop("column", "caption"), **kw))


def test_txt_gives_each_line_and_its_number(tmp_path, annotations):
    lines = [a["caption"].strip() for a in annotations]
    path = tmp_path / "c.txt"
    path.write_text("\n".join(lines[:10]) + "\n\n" + "\n".join(lines[10:]) + "\n", encoding="utf-8")
    got = _read(path, "txt")
    # a blank line is a record too (the corpus counts it as empty): line numbers are the editor's
    assert [m["line"] for _, m in got] == list(range(1, len(lines) + 2))
    assert [c.rstrip("\n") for c, _ in got] == lines[:10] + [""] + lines[10:]


def test_jsonl_keeps_ids_and_line_numbers(tmp_path, annotations):
    path = tmp_path / "c.jsonl"
    rows = [json.dumps({"text": a["caption"], "image_id": a["image_id"], "id": a["id"], "other": 1}) for a in annotations]
    path.write_text(rows[0] + "\n\n" + "\n".join(rows[1:]) + "\n", encoding="utf-8")
    got = _read(path, "jsonl", field="text")
    assert [c for c, _ in got] == [a["caption"] for a in annotations]
    expected_lines = [1] + list(range(3, len(annotations) + 2))  # line 2 is blank
    assert [m for _, m in got] == [{"line": n, "image_id": a["image_id"], "id": a["id"]}
                                   for n, a in zip(expected_lines, annotations)]
    path.write_text(rows[0] + "\n" + rows[1][:-1] + "\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"c\.jsonl: line 2 column \d+: not valid JSON .*one JSON object per line"):
        _read(path, "jsonl", field="text")


@pytest.mark.parametrize("fmt, delimiter", [("csv", ","), ("tsv", "\t")])
def test_csv_records_start_lines_with_quoted_newlines(tmp_path, annotations, fmt, delimiter):
    """A quoted caption may span lines; each record's line is where it starts (what an editor shows)."""
    path = tmp_path / f"c.{fmt}"
    captions = [a["caption"] for a in annotations]
    captions[3] = captions[3].replace(" ", "\n", 2)  # a caption over three lines
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(["id", "caption", "image_id"])
        for a, c in zip(annotations, captions):
            w.writerow([a["id"], c, a["image_id"]])
    got = _read(path, fmt)
    assert [c for c, _ in got] == captions
    starts = [2, 3, 4, 5] + list(range(8, len(captions) + 4))
    assert [m["line"] for _, m in got] == starts
    assert got[0][1] == {"line": 2, "id": str(annotations[0]["id"]), "image_id": str(annotations[0]["image_id"])}


def test_coco_yields_annotations_in_file_order_with_ids(annotations):
    data = json.loads(COCO_SAMPLE.read_text(encoding="utf-8"))
    got = _read(COCO_SAMPLE, "coco", data=data)
    assert got == [(a["caption"], {"image_id": a["image_id"], "id": a["id"]}) for a in annotations]
    assert _read(COCO_SAMPLE, "coco") == got  # parsed here when not handed over


def test_karpathy_and_flickrstyle_corpora(tmp_path, annotations):
    kp = tmp_path / "dataset_coco.json"
    kp.write_text(json.dumps({"images": [
        {"filename": "a.jpg", "split": "val", "cocoid": 7, "sentences": [{"raw": annotations[0]["caption"]}]},
        {"filename": "b.jpg", "split": "restval", "cocoid": 8,
         "sentences": [{"raw": a["caption"]} for a in annotations[1:3]]}]}))
    assert _read(kp, "karpathy") == [(annotations[1]["caption"], {"image_id": 8, "sentence": 0}),
                                     (annotations[2]["caption"], {"image_id": 8, "sentence": 1})]  # train = restval too
    style = tmp_path / "romantic_train.txt"
    style.write_text("".join(a["caption"].strip() + "\n" for a in annotations[:4]), encoding="utf-8")
    assert _read(style, "flickrstyle") == [(a["caption"].strip(), {"line": i}) for i, a in enumerate(annotations[:4], 1)]


def test_detect_format_and_unknown_format(tmp_path):
    assert [detect_format(f"x{ext}") for ext in (".txt", ".JSONL", ".ndjson", ".csv", ".tsv", ".json")] == \
        ["txt", "jsonl", "jsonl", "csv", "tsv", "coco"]
    with pytest.raises(InputError, match=r"x\.dat: cannot tell the corpus format"):
        detect_format("x.dat")
    with pytest.raises(InputError, match="unknown corpus format 'xml'"):
        _read(tmp_path / "x.xml", "xml")
