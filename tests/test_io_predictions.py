"""capdec.io.predictions: what ``capdec caption`` writes (JSON Lines, COCO results, CSV) reads back the same.

Captions: one real MS-COCO caption per image of ``tests/data/coco_captions_sample.json`` (CC BY 4.0).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from capdec.errors import InputError
from capdec.io.predictions import load_predictions, read_predictions

COCO_SAMPLE = Path(__file__).parent / "data" / "coco_captions_sample.json"


@pytest.fixture(scope="module")
def captioned() -> list[tuple[int, str, str]]:
    """(image id, file name, its first caption) per image."""
    data = json.loads(COCO_SAMPLE.read_text(encoding="utf-8"))
    first = {}
    for a in data["annotations"]:
        first.setdefault(a["image_id"], a["caption"])
    return [(im["id"], im["file_name"], first[im["id"]]) for im in data["images"]]


def test_jsonl_by_path_with_an_unreadable_image(tmp_path, captioned):
    path = tmp_path / "captions.jsonl"
    rows = [{"image": f"photos/{name}", "caption": cap} for _, name, cap in captioned]
    rows[3]["caption"] = None  # an image the captioner could not read
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    preds = load_predictions(path)
    assert [(p.image, p.caption, p.image_id) for p in preds] == [(r["image"], r["caption"], None) for r in rows]
    assert [p.where for p in preds[:2]] == [f"{path}: line 1", f"{path}: line 2"]
    assert [p.key for p in preds] == [i for i, _, _ in captioned]  # COCO-numbered names give the COCO id
    assert read_predictions(path) == {i: cap for n, (i, _, cap) in enumerate(captioned) if n != 3}


def test_coco_results_list_and_wrapped(tmp_path, captioned):
    results = [{"image_id": i, "caption": cap} for i, _, cap in captioned]
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results, indent=1))
    assert read_predictions(path) == {i: cap for i, _, cap in captioned}
    assert load_predictions(path)[5].where == f"{path}: item 5"
    path.write_text(json.dumps({"annotations": results}))
    assert read_predictions(path) == {i: cap for i, _, cap in captioned}


@pytest.mark.parametrize("suffix, dialect", [(".csv", "excel"), (".tsv", "excel-tab")])
def test_csv_and_tsv(tmp_path, captioned, suffix, dialect):
    path = tmp_path / f"captions{suffix}"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, dialect=dialect)
        w.writerow(["image_id", "caption"])
        w.writerows([(i, cap) for i, _, cap in captioned])
    preds = load_predictions(path)
    assert [(p.image_id, p.caption) for p in preds] == [(i, cap) for i, _, cap in captioned]
    assert preds[0].where == f"{path}: line 2"


def test_two_predictions_for_one_image_name_both_lines(tmp_path, captioned):
    (i, name, cap), (_, _, other) = captioned[:2]
    path = tmp_path / "captions.jsonl"
    path.write_text(json.dumps({"image": name, "caption": cap}) + "\n" + json.dumps({"image_id": i, "caption": other}) + "\n")
    with pytest.raises(InputError, match=r"captions\.jsonl: line 2: a second prediction for image \d+ "
                                         r"\(first at .*captions\.jsonl: line 1\)"):
        read_predictions(path)


@pytest.mark.parametrize("text, match", [
    ('{"image": "a.jpg", "caption": 3}\n', r"p\.jsonl: line 1: 'caption' must be a string"),
    ('{"image": "a.jpg", "caption": "A dog."}\n{"caption": "A cat."}\n', r"p\.jsonl: line 2: no 'image'"),
    ('{"image": "a.jpg"}\n', r"line 1: no 'caption' field \(fields: 'image'\)"),
    ('{"image": "a.jpg", "caption": "A dog."}\n{"image": \n', r"p\.jsonl: line 2 column \d+: malformed JSON"),
    ('{"image_id": [1], "caption": "A dog."}\n', r"line 1: bad 'image_id' \[1\]"),
])
def test_prediction_errors_name_the_line(tmp_path, text, match):
    path = tmp_path / "p.jsonl"
    path.write_text(text)
    with pytest.raises(InputError, match=match):
        load_predictions(path)
