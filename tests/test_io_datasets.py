"""capdec.io.datasets: the one COCO reader, Karpathy splits and FlickrStyle10K, on real COCO caption text.

The captions come from ``tests/data/coco_captions_sample.json`` (303 real MS-COCO captions of 83 images,
CC BY 4.0); the Karpathy and FlickrStyle10K files are written from them here, and what each reader
should give is computed from the annotations directly.
"""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path

import pytest

from capdec.errors import InputError
from capdec.io.datasets import read_coco, read_flickrstyle, read_karpathy

COCO_SAMPLE = Path(__file__).parent / "data" / "coco_captions_sample.json"


@pytest.fixture(scope="module")
def coco() -> dict:
    return json.loads(COCO_SAMPLE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def shuffled(coco) -> dict:
    """The sample with its annotations shuffled, so annotation order and image-list order differ."""
    anns = list(coco["annotations"])
    random.Random(0).shuffle(anns)
    return {**coco, "annotations": anns}


# -- COCO ------------------------------------------------------------------------------------------

def test_coco_images_in_list_order_captions_in_annotation_order(shuffled):
    images = read_coco(shuffled, "c.json").captioned_images()
    assert [im.image_id for im in images] == [im["id"] for im in shuffled["images"]]
    assert [im.file for im in images] == [im["file_name"] for im in shuffled["images"]]
    for im in images:
        assert im.captions == [a["caption"] for a in shuffled["annotations"] if a["image_id"] == im.image_id]
    assert sum(len(im.captions) for im in images) == 303


def test_coco_unlisted_twice_listed_and_uncaptioned_images(coco):
    first, second = coco["images"][:2]
    data = {"images": [first, {"id": 5, "file_name": "five.jpg"}, first],
            "annotations": [a for a in coco["annotations"] if a["image_id"] in (first["id"], second["id"])]}
    images = read_coco(data, "c.json").captioned_images()
    caps = {i: [a["caption"] for a in data["annotations"] if a["image_id"] == i] for i in (first["id"], second["id"])}
    # listed images in order (a repeat gets no second copy of the captions), then the unlisted one
    assert [(im.image_id, im.file, im.captions) for im in images] == [
        (first["id"], first["file_name"], caps[first["id"]]), (5, "five.jpg", []), (first["id"], first["file_name"], []),
        (second["id"], "", caps[second["id"]])]
    assert [im.image_id for im in read_coco(data, "c.json").captioned_images(listed_only=True)] == [first["id"], 5,
                                                                                                  first["id"]]


def test_coco_corpus_order_and_file_names(coco, shuffled):
    parsed = read_coco(shuffled, "c.json")
    assert list(parsed.captions()) == [(a["caption"], {"image_id": a["image_id"], "id": a["id"]})
                                       for a in shuffled["annotations"]]
    assert parsed.file_names() == {im["file_name"]: im["id"] for im in coco["images"]}
    info_only = read_coco({"images": coco["images"]}, "info.json", annotations=False)  # image_info_test2014.json
    assert info_only.file_names() == parsed.file_names() and list(info_only.captions()) == []


@pytest.mark.parametrize("data, match", [
    ({"images": [], "info": {}}, r"c\.json: neither a COCO caption annotation file \(no 'annotations' list\)"),
    (["a"], "found a JSON list"),
    ({"annotations": [{"caption": "ok", "image_id": 1}, {"image_id": 1}]}, r"annotations\[1\] has no 'caption'"),
    ({"annotations": [{"caption": 3, "image_id": 1, "id": 9}]}, r"annotations\[0\] \(id 9\): 'caption' is not a string"),
    ({"annotations": [], "images": [{"file_name": "a.jpg"}]}, r"images\[0\] has no 'id'"),
    ({"annotations": [], "images": [{"id": [1]}]}, r"images\[0\]: an image id must be a number or a string"),
    ({"annotations": [], "images": [{"id": 1, "file_name": 2}]}, r"images\[0\]: 'file_name' must be a string"),
    ({"annotations": [], "images": {}}, "must be lists"),
])
def test_coco_errors_name_the_entry(data, match):
    with pytest.raises(InputError, match=match):
        read_coco(data, "c.json")


def test_coco_annotation_without_image_id_is_refused_for_images():
    parsed = read_coco({"annotations": [{"caption": "a dog"}]}, "c.json")
    assert list(parsed.captions()) == [("a dog", {})]  # a corpus needs no image id
    with pytest.raises(InputError, match=r"annotations\[0\] has no 'image_id'"):
        parsed.captioned_images()


# -- Karpathy --------------------------------------------------------------------------------------

def _karpathy(coco: dict, splits: list[str]) -> dict:
    by_image = {}
    for a in coco["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a["caption"])
    images = []
    for i, (im, split) in enumerate(zip(coco["images"], splits)):
        entry = {"filepath": "val2014", "filename": f"COCO_val2014_{im['id']:012d}.jpg", "imgid": i, "split": split,
                 "sentences": [{"raw": c, "tokens": c.lower().split()} for c in by_image[im["id"]]]}
        if i % 2 == 0:
            entry["cocoid"] = im["id"]
        images.append(entry)
    return {"dataset": "coco", "images": images}


def test_karpathy_splits_ids_files_and_captions(tmp_path, coco):
    splits = ["train", "restval", "val", "test"] * 20 + ["test"] * 3
    data = _karpathy(coco, splits)
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps(data))
    for split, labels in (("train", {"train", "restval"}), ("val", {"val"}), ("test", {"test"}),
                          ("restval", {"restval"}), ("all", set(splits))):
        ds = read_karpathy(path, split)
        chosen = [im for im in data["images"] if im["split"] in labels]
        assert ds.format == "karpathy" and ds.name == "coco" and ds.split == split
        # cocoid when there is one, else the numeric file stem (COCO_val2014_000000000042 is not all digits:
        # the file name)
        assert [im.image_id for im in ds.images] == [im.get("cocoid", im["filename"]) for im in chosen]
        assert [im.file for im in ds.images] == [f"val2014/{im['filename']}" for im in chosen]
        assert [im.captions for im in ds.images] == [[s["raw"] for s in im["sentences"]] for im in chosen]
        assert [im.split for im in ds.images] == [im["split"] for im in chosen]
    assert ds.n_captions == 303
    assert list(read_karpathy(path, "val").captions())[:2] == [
        (data["images"][2]["sentences"][0]["raw"], {"image_id": data["images"][2]["cocoid"], "sentence": 0}),
        (data["images"][2]["sentences"][1]["raw"], {"image_id": data["images"][2]["cocoid"], "sentence": 1})]


def test_karpathy_numeric_stems_and_repeated_ids(tmp_path, coco):
    path = tmp_path / "dataset_flickr30k.json"
    caption = coco["annotations"][0]["caption"]
    images = [{"filename": "1000092795.jpg", "split": "test", "sentences": [{"raw": caption}]},
              {"filename": "1000092795.jpg", "split": "test", "sentences": [{"raw": caption}]}]
    path.write_text(json.dumps({"images": images[:1]}))
    ds = read_karpathy(path, "test")
    assert ds.images[0].image_id == 1000092795 and ds.images[0].file == "1000092795.jpg"
    assert ds.name == "dataset_flickr30k"  # no "dataset" field: the file's stem
    path.write_text(json.dumps({"images": images}))
    with pytest.raises(InputError, match=r"images\[1\] \(1000092795\.jpg\): image id 1000092795 repeats images\[0\]"):
        read_karpathy(path)


# -- FlickrStyle10K --------------------------------------------------------------------------------

def test_flickrstyle_pairs_lines_with_names_and_holds_out_the_last_images(tmp_path, coco):
    caps = [a["caption"].strip() for a in coco["annotations"][:12]]
    names = [f"{n}.jpg" for n in (1, 1, 2, 3, 3, 3, 4, 5, 5, 6, 7, 7)]  # consecutive lines of an image
    folder = tmp_path / "romantic"
    folder.mkdir()
    lines = [c.encode("utf-8") for c in caps]
    lines[4] = "A caf\xe9 by the sea.".encode("latin-1")  # FlickrStyle10K's files mix in Latin-1 lines
    (folder / "romantic_train.txt").write_bytes(b"\n".join(lines) + b"\n")
    (folder / "train.p").write_bytes(pickle.dumps(names, protocol=2))
    caps[4] = "A caf\xe9 by the sea."
    ds = read_flickrstyle(folder / "romantic_train.txt")  # train.p found beside it
    expected = {}
    for n, c in zip(names, caps):
        expected.setdefault(n, []).append(c)
    assert [(im.image_id, im.file, im.captions) for im in ds.images] == [(n, n, c) for n, c in expected.items()]
    assert ds.format == "flickrstyle" and ds.n_captions == 12
    test = read_flickrstyle(folder / "romantic_train.txt", split="test", test_size=2)
    assert [im.image_id for im in test.images] == ["6.jpg", "7.jpg"] and {im.split for im in test.images} == {"test"}
    train = read_flickrstyle(folder / "romantic_train.txt", split="train", test_size=2)
    assert [im.image_id for im in train.images] == ["1.jpg", "2.jpg", "3.jpg", "4.jpg", "5.jpg"]
    (folder / "names.txt").write_text("\n".join(names[:-1]) + "\n")
    with pytest.raises(InputError, match=r"12 caption lines but .*names\.txt names 11 images"):
        read_flickrstyle(folder / "romantic_train.txt", folder / "names.txt")
    with pytest.raises(InputError, match="needs the number of test images"):
        read_flickrstyle(folder / "romantic_train.txt", split="test")
