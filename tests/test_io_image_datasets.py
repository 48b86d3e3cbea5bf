"""capdec.io.image_datasets: captioned-image datasets in every format read into the same records; image id maps.

Captions: ``tests/data/coco_captions_sample.json`` (303 real MS-COCO captions of 83 images, CC BY 4.0).
No image is opened here (the image loader's tests do that): only paths, ids and captions are checked.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from capdec.errors import InputError
from capdec.io.datasets import CaptionedImage, ImagePacker, PackedImages
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


# -- JSON Lines read line by line into packed images ---------------------------------------------------------

def _scattered_jsonl(path: Path, n_images: int, seed: int = 0) -> list[dict]:
    """A JSON Lines dataset whose images have their captions on several lines, not consecutive (an image may get
    more captions far later), with split labels, blank captions, and images whose captions are all blank."""
    import random
    rng = random.Random(seed)
    words = ["a", "dog", "runs", "on", "the", "beach", "two", "cats", "sleep", "é", "雪"]
    rows = []
    for i in range(n_images):
        for _ in range(rng.randint(1, 3)):
            caps = [" ".join(rng.choices(words, k=rng.randint(1, 6))) if rng.random() > 0.1 else "  "
                    for _ in range(rng.randint(1, 3))]
            row = {"image": f"im{i}.jpg", "split": rng.choice(["train", "test"])}
            row.update({"caption": caps[0]} if len(caps) == 1 and rng.random() < 0.5 else {"captions": caps})
            if i % 3 == 0:
                row["image_id"] = i
            rows.append(row)
    rng.shuffle(rows)  # an image's lines end up anywhere in the file
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" + ("\n" if k % 7 == 0 else "")
                            for k, r in enumerate(rows)), encoding="utf-8")
    return rows


def _expected(rows: list[dict], root: Path, split: str | None) -> tuple[list[CaptionedImage], dict[str, int]]:
    """The dataset by hand: lines of one image joined in file order, its first line's id and split, captions
    whitespace-normalised and blank ones dropped, images without captions left out and counted."""
    order: list[str] = []
    first: dict[str, dict] = {}
    texts: dict[str, list[str]] = {}
    other = 0
    for r in rows:
        if split is not None and r["split"] != split:
            other += 1
            continue
        if r["image"] not in first:
            order.append(r["image"])
            first[r["image"]], texts[r["image"]] = r, []
        texts[r["image"]] += [" ".join(t.split()) for t in ([r["caption"]] if "caption" in r else r["captions"])]
    images = [CaptionedImage(first[n].get("image_id", n), str(root / n), [t for t in texts[n] if t], first[n]["split"])
              for n in order]
    kept = [im for im in images if im.captions]
    skipped = ({"other_split": other} if other else {}) | ({"no_captions": len(images) - len(kept)}
                                                          if len(kept) < len(images) else {})
    return kept, skipped


@pytest.mark.parametrize("split", [None, "test"])
def test_jsonl_images_are_packed_with_scattered_lines_joined(tmp_path, split):
    path = tmp_path / "d.jsonl"
    rows = _scattered_jsonl(path, 300)
    expected, skipped = _expected(rows, tmp_path, split)
    ds = read_image_dataset(path, split=split)
    assert isinstance(ds.images, PackedImages)
    assert list(ds.images) == expected and ds.images == expected and expected == ds.images
    assert ds.skipped == skipped and skipped.get("no_captions")
    assert len(ds) == len(expected) and ds.n_captions == sum(len(im.captions) for im in expected)
    n = len(expected)
    assert [ds.images[i] for i in range(-n, n)] == expected + expected
    for bad in (n, -n - 1):
        with pytest.raises(IndexError):
            ds.images[bad]
    for s in (slice(None, 10), slice(-7, None), slice(5, 50, 3), slice(None, None, -1)):
        assert list(ds.images[s]) == expected[s] and len(ds.images[s]) == len(expected[s])
        assert ds.images[s].n_captions() == sum(len(im.captions) for im in expected[s])
    assert ds.images != expected[:-1] and ds.images != expected[::-1]


def test_packed_images_keep_ids_of_every_json_type():
    packer = ImagePacker()
    ids = [7, "7", 2.5, None, True, [1, "a"], {"k": 1}, (3, "b")]
    for n, image_id in enumerate(ids):
        i = packer.add_image(image_id, f"f{n}.jpg", "val")
        packer.add_captions(i, [f"caption {n}"])
    images = packer.finish()
    assert [(im.image_id, type(im.image_id)) for im in images] == [(i, type(i)) for i in ids]
    assert images[0] == CaptionedImage(7, "f0.jpg", ["caption 0"], "val")


def test_jsonl_errors_name_their_line(tmp_path):
    def error(text: bytes | str) -> str:
        path = tmp_path / "e.jsonl"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(InputError) as e:
            read_image_dataset(path)
        return str(e.value).replace(str(path), "P")

    ok = '{"image": "a.jpg", "caption": "A dog."}'
    assert error(f'{ok}\n\n{ok}\n{{"image": "b.jpg" "caption": 1}}\n') == \
        "P: line 4 column 19: malformed JSON line (Expecting ',' delimiter)"
    assert error(f'{ok}\n{{"image"\n{ok}\n') == "P: line 2 column 9: malformed JSON line (Expecting ':' delimiter)"
    assert error(f"{ok}\n{ok}\n".encode() + b'{"image": "\xff.jpg"}\n') == \
        "P: line 3 column 12: not valid UTF-8 (byte 0xff); re-encode the file as UTF-8 (e.g. iconv -t UTF-8)"
    assert error(b"\xef\xbb\xbf" + b'{"image": "\xff.jpg"}\n').startswith("P: line 1 column 15: not valid UTF-8")
    assert error(f'[{ok},\n{ok}]\n') == \
        "P: expected JSON Lines (one {image, caption} object per line), got one JSON document"
    assert error(f"\n[{ok}]\n") == error(f'[{ok},\n{ok}]\n')
    assert error('{"image": "a.jpg",\n"caption" "x"}') == "P: line 2 column 11: malformed JSON (Expecting ':' delimiter)"
    assert error("\n \n") == "P: the file is empty"
    assert error(f'{ok}\n{{"image": "b.jpg"}}\n') == "P: line 2: no 'caption' string or 'captions' list"
    assert error(f'{ok}\n["b.jpg"]\n') == \
        "P: line 2: expected an object with an 'image' path and a 'caption' (or 'captions' list)"
    assert error(f'{ok}\n\n{{"image": "b.jpg", "captions": ["x", 1]}}\n') == "P: line 3: captions must be strings"
    path = tmp_path / "one.jsonl"  # one line, one image; a BOM and CRLF line ends are fine
    path.write_bytes(b"\xef\xbb\xbf" + ok.encode() + b"\r\n")
    assert list(read_image_dataset(path).images) == [CaptionedImage("a.jpg", str(tmp_path / "a.jpg"), ["A dog."])]
    with pytest.raises(InputError, match=r"P: line 1: --split test given but the record has no 'split' field"):
        try:
            read_image_dataset(path, split="test")
        except InputError as e:
            raise InputError(str(e).replace(str(path), "P")) from None


def test_a_jsonl_dataset_is_held_in_about_its_bytes(tmp_path):
    """50,000 images x 5 captions (a 12 MB file) read under tracemalloc, against the bytes of the records read (their
    resolved paths and captions, UTF-8). Measured: packed, the dataset holds 1.41x those bytes and peaks at 1.85x
    while reading; the reader that parsed all rows into CaptionedImage lists held 3.2x and peaked at 5.7x (the
    whole text, every row's dict, then the records)."""
    import gc
    import random
    import tracemalloc
    rng = random.Random(0)
    words = "a dog cat runs on the beach two sleep sofa red man woman".split()
    path = tmp_path / "d.jsonl"
    with open(path, "w") as f:
        for i in range(50_000):
            f.write(json.dumps({"image": f"images/{i:07d}.png",
                                "captions": [" ".join(rng.choices(words, k=9)) for _ in range(5)]}) + "\n")
    gc.collect()
    tracemalloc.start()
    try:
        ds = read_image_dataset(path)
        gc.collect()
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(ds) == 50_000 and ds.n_captions == 250_000
    size = sum(len(im.file.encode()) + sum(len(c.encode()) for c in im.captions) for im in ds.images)
    assert held < 2.0 * size, f"held {held / size:.2f}x the records' bytes"
    assert peak < 3.0 * size, f"peaked at {peak / size:.2f}x the records' bytes"
