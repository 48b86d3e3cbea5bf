"""capdec.io.references: each references format gives the same real COCO captions, keyed and ordered as evaluation needs.

Captions: ``tests/data/coco_captions_sample.json`` (303 real MS-COCO captions of 83 images, CC BY 4.0),
written here as each format; the expected references are computed from the annotations directly.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from capdec.errors import InputError
from capdec.io.references import detect_references_format, load_references, read_references

COCO_SAMPLE = Path(__file__).parent / "data" / "coco_captions_sample.json"


@pytest.fixture(scope="module")
def coco() -> dict:
    data = json.loads(COCO_SAMPLE.read_text(encoding="utf-8"))
    anns = list(data["annotations"])
    random.Random(1).shuffle(anns)  # annotation order differs from the images list's
    return {**data, "annotations": anns}


def _expected(coco: dict) -> dict[int, list[str]]:
    """COCOEvalCap's references: images in the images list's order, captions in annotation order."""
    return {im["id"]: [a["caption"] for a in coco["annotations"] if a["image_id"] == im["id"]] for im in coco["images"]}


def test_coco_references_follow_the_images_list(tmp_path, coco):
    path = tmp_path / "captions_val2017.json"
    path.write_text(json.dumps(coco))
    refs = load_references(path)
    expected = _expected(coco)
    assert list(refs.captions) == list(expected) and refs.captions == expected
    assert refs.file_names == {im["id"]: im["file_name"] for im in coco["images"]}
    assert refs.alias_table()[coco["images"][0]["file_name"]] == coco["images"][0]["id"]
    assert refs.source == str(path)


def test_coco_references_keep_images_the_list_does_not_name(tmp_path, coco):
    listed = coco["images"][1:]
    path = tmp_path / "refs.json"
    path.write_text(json.dumps({**coco, "images": listed}))
    refs = read_references(path)
    unlisted = coco["images"][0]["id"]
    assert list(refs)[-1] == unlisted and list(refs)[:-1] == [im["id"] for im in listed]
    assert refs[unlisted] == _expected(coco)[unlisted]


def test_records_and_json_lines_merge_lines_of_one_image(tmp_path, coco):
    path = tmp_path / "refs.jsonl"
    names = {im["id"]: im["file_name"] for im in coco["images"]}
    path.write_text("".join(json.dumps({"image": f"val2017/{names[a['image_id']]}", "caption": a["caption"]}) + "\n"
                            for a in coco["annotations"]))
    refs = load_references(path)
    by_first_line: dict[int, list[str]] = {}
    for a in coco["annotations"]:
        by_first_line.setdefault(a["image_id"], []).append(a["caption"])
    # ids from the COCO-numbered file names; images in the order of their first line
    assert refs.captions == by_first_line and list(refs.captions) == list(by_first_line)
    assert refs.file_names[coco["images"][0]["id"]] == f"val2017/{coco['images'][0]['file_name']}"
    lst = tmp_path / "karpathy_test_refs.json"
    lst.write_text(json.dumps([{"file_name": names[i], "captions": caps} for i, caps in _expected(coco).items()]))
    assert read_references(lst) == _expected(coco)


def test_mapping_of_file_names(tmp_path, coco):
    expected = _expected(coco)
    names = {im["id"]: im["file_name"] for im in coco["images"]}
    path = tmp_path / "refs.json"
    path.write_text(json.dumps({names[i]: caps for i, caps in expected.items()}))
    assert detect_references_format(path, json.loads(path.read_text())) == "mapping"
    assert read_references(path) == expected


def test_karpathy_references_are_the_test_split(tmp_path, coco):
    expected = _expected(coco)
    images = [{"filename": f"COCO_val2014_{i:012d}.jpg", "filepath": "val2014", "cocoid": i,
               "split": "test" if n % 3 == 0 else "train", "sentences": [{"raw": c} for c in caps]}
              for n, (i, caps) in enumerate(expected.items())]
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"dataset": "coco", "images": images}))
    refs = load_references(path)
    assert refs.captions == {i: caps for n, (i, caps) in enumerate(expected.items()) if n % 3 == 0}
    assert refs.file_names[images[0]["cocoid"]] == f"val2014/{images[0]['filename']}"
    assert len(load_references(path, split="train").captions) == len(expected) - len(refs.captions)


def test_reference_errors_name_the_place(tmp_path, coco):
    path = tmp_path / "refs.jsonl"
    path.write_text('{"image": "a.jpg", "captions": ["A dog."]}\n{"image": "b.jpg"}\n')
    with pytest.raises(InputError, match=r"refs\.jsonl: line 2: no 'captions'"):
        load_references(path)
    path.write_text('{"image": "x/a.jpg", "captions": ["A dog."]}\n{"image": "y/a.jpg", "captions": ["A cat."]}\n')
    with pytest.raises(InputError, match=r"line 2: images 'x/a\.jpg' and 'y/a\.jpg' both get the id 'a\.jpg'"):
        load_references(path)
    bad = tmp_path / "coco.json"
    bad.write_text(json.dumps({"images": coco["images"], "annotations": [{"caption": "A dog."}]}))
    with pytest.raises(InputError, match=r"coco\.json: annotations\[0\] has no 'image_id'"):
        load_references(bad)
    with pytest.raises(InputError, match="--split selects images of a Karpathy-split file"):
        load_references(bad, split="test")
