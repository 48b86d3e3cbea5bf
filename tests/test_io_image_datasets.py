"""capdec.io.image_datasets: captioned-image datasets in every format read into the same records; image id maps.

Captions: ``tests/data/coco_captions_sample.json`` (303 real MS-COCO captions of 83 images, CC BY 4.0).
No image is opened here (the image loader's tests do that): only paths, ids and captions are checked.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from capdec.errors import InputError
from capdec.io.image_datasets import read_image_dataset, read_image_ids

COCO_SAMPLE = Path(__file__).parent / "data" / "coco_captions_sample.json"


@pytest.fixture(scope="module")
def coco() -> dict:
    return json.loads(COCO_SAMPLE.read_text(encoding="utf-8"))


def _by_image(coco: dict) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for a in coco["annotations"]:
        out.setdefault(a["image_id"], []).append(" ".join(a["caption"].split()))  # normalised
    return out


def test_every_format_gives_the_same_records(tmp_path, coco):
    caps, names = _by_image(coco), {im["id"]: im["file_name"] for im in coco["images"]}
    root = tmp_path / "images"
    root.mkdir()
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    (tmp_path / "refs.json").write_text(json.dumps([{"file_name": names[i], "image_id": i,
                                                     "captions": [a["caption"] for a in coco["annotations"]
                                                                  if a["image_id"] == i]} for i in names]))
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps({"image": names[a["image_id"]], "image_id": a["image_id"],
                                                              "caption": a["caption"]}) + "\n"
                                                  for a in coco["annotations"]))
    kp = [{"filepath": "val2017", "filename": names[i], "cocoid": i, "split": "test",
           "sentences": [{"raw": a["caption"]} for a in coco["annotations"] if a["image_id"] == i]} for i in names]
    (tmp_path / "karpathy.json").write_text(json.dumps({"images": kp}))
    first = next(iter(names))
    (root / names[first]).touch()  # present directly under the root, not in val2017/
    expected = [(i, str(root / names[i]), caps[i]) for i in names]  # images-list order
    for name, fmt, split in (("coco.json", "coco", None), ("refs.json", "refs", None), ("karpathy.json", "karpathy", "test")):
        ds = read_image_dataset(tmp_path / name, images_root=root, split=split)
        assert ds.format == fmt and ds.images_root == str(root) and ds.skipped == {}
        if fmt == "karpathy":  # filepath/filename under the root, or the file name directly under it if only that exists
            expected = [(i, str(root / ("" if i == first else "val2017") / names[i]), caps[i]) for i in names]
        assert [(im.image_id, im.file, im.captions) for im in ds.images] == expected, name
    jsonl = read_image_dataset(tmp_path / "pairs.jsonl", images_root=root)
    order = list(dict.fromkeys(a["image_id"] for a in coco["annotations"]))  # first line of each image
    assert [(im.image_id, im.file, im.captions) for im in jsonl.images] == [(i, str(root / names[i]), caps[i])
                                                                            for i in order]
    assert jsonl.describe() == {"path": str(tmp_path / "pairs.jsonl"), "format": "jsonl", "split": None,
                                "images_root": str(root), "images": 83, "captions": 303, "skipped": {}}


def test_images_without_captions_and_other_splits_are_counted(tmp_path, coco):
    ann = coco["annotations"][0]
    rows = [{"image": "a.jpg", "caption": ann["caption"], "split": "test"},
            {"image": "b.jpg", "caption": "   ", "split": "test"},
            {"image": "c.jpg", "caption": ann["caption"], "split": "train"}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = read_image_dataset(path, split="test")
    assert [im.file for im in ds.images] == [str(tmp_path / "a.jpg")]
    assert ds.skipped == {"other_split": 1, "no_captions": 1}
    coco_path = tmp_path / "c.json"
    coco_path.write_text(json.dumps({**coco, "images": coco["images"] + [{"id": 1, "file_name": "none.jpg"}]}))
    assert read_image_dataset(coco_path).skipped == {"no_captions": 1}


def test_dataset_errors(tmp_path, coco):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"images": [{"id": 1}], "annotations": [{"image_id": 1, "caption": "A dog."}]}))
    with pytest.raises(InputError, match=r"c\.json: images\[0\] needs 'id' and a 'file_name' string"):
        read_image_dataset(path)
    with pytest.raises(InputError, match="has no splits"):
        read_image_dataset(COCO_SAMPLE, split="test")
    with pytest.raises(InputError, match="unknown dataset format"):
        read_image_dataset(COCO_SAMPLE, format="xml")


def test_image_ids_from_coco_json_and_csv(tmp_path, coco):
    expected = {im["file_name"]: im["id"] for im in coco["images"]}
    assert read_image_ids(COCO_SAMPLE) == expected
    info = tmp_path / "image_info.json"  # an image-info file has no annotations
    info.write_text(json.dumps({"images": coco["images"]}))
    assert read_image_ids(info) == expected
    table = tmp_path / "ids.tsv"
    table.write_text("file_name\timage_id\n" + "".join(f"{n}\t{i}\n" for n, i in expected.items()))
    assert read_image_ids(table) == expected
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [\n{"id": 1, "file_name": "a.jpg"},\n]}')
    with pytest.raises(InputError, match=r"bad\.json: line 3 column 1: malformed JSON"):
        read_image_ids(bad)
