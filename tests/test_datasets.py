"""Karpathy-split files and FlickrStyle10K as inputs: readers, corpora, references, caption/calibrate sources.

``tests/data/karpathy_coco_small.json`` is a small file in the Karpathy-split format with real MS-COCO
captions (CC BY 4.0); its ``test`` images are the five Karpathy-test photos of tests/data/coco/images
(CC BY / CC BY-SA 2.0, attribution in ``images_meta.json`` there); the other split labels are assigned
for the tests.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest

from capdec.cli import main
from capdec.corpus import read_corpus
from capdec.errors import InputError
from capdec.io import read_flickrstyle, read_karpathy, read_name_list
from capdec.metrics import load_references

KARPATHY = Path(__file__).parent / "data" / "karpathy_coco_small.json"
TEST_IDS = [60623, 189806, 314251, 351530, 479030]  # the Karpathy-test photos in tests/data/coco/images


def test_karpathy_splits_ids_and_files():
    train = read_karpathy(KARPATHY, "train")
    assert {im.split for im in train.images} == {"train", "restval"}  # train includes restval
    assert len(train) == 50 and len(read_karpathy(KARPATHY, "restval")) == 25
    assert len(read_karpathy(KARPATHY, "val")) == 8
    test = read_karpathy(KARPATHY, "test")
    assert [im.image_id for im in test.images] == TEST_IDS  # cocoid
    assert test.images[0].file == "val2014/COCO_val2014_000000060623.jpg"
    assert all(len(im.captions) == 5 for im in test.images)
    assert len(read_karpathy(KARPATHY, "all")) == 63
    with pytest.raises(InputError, match="unknown split 'dev'.*train includes restval"):
        read_karpathy(KARPATHY, "dev")


def test_flickr30k_ids_are_the_numeric_file_names(tmp_path):
    path = tmp_path / "dataset_flickr30k.json"
    path.write_text(json.dumps({"dataset": "flickr30k", "images": [
        {"filename": "1000092795.jpg", "imgid": 0, "split": "test", "sentences": [{"raw": "Two young guys."}]},
        {"filename": "my_photo.jpg", "imgid": 1, "split": "test", "sentences": [{"raw": "A dog."}]},
        {"filename": "10002456.jpg", "imgid": 2, "split": "train", "sentences": [{"raw": "Workers."}]}]}))
    test = read_karpathy(path, "test")
    assert [im.image_id for im in test.images] == [1000092795, "my_photo.jpg"]
    assert test.images[0].file == "1000092795.jpg"  # no filepath in Flickr30k
    refs = load_references(path, split="test")
    assert refs.captions == {1000092795: ["Two young guys."], "my_photo.jpg": ["A dog."]}


def test_bad_karpathy_files_get_clear_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": [{"filename": "a.jpg", "split": "holdout", "sentences": []}]}))
    with pytest.raises(InputError, match=r"images\[0\] \(a\.jpg\): unknown split 'holdout'"):
        read_karpathy(bad)
    bad.write_text(json.dumps({"images": [{"filename": "a.jpg", "split": "val", "sentences": [{"tokens": ["a"]}]}]}))
    with pytest.raises(InputError, match=r"sentences\[0\] has no string 'raw'"):
        read_karpathy(bad)
    with pytest.raises(InputError, match="the 'test' split has no images \\(val 1\\)"):
        read_karpathy(bad, "test")


def test_karpathy_as_a_corpus():
    corpus = read_corpus(KARPATHY)  # detected from the content; train (+restval) by default
    assert corpus.format == "karpathy" and len(corpus) == 250 and corpus.options["split"] == "train"
    assert len(read_corpus(KARPATHY, split="test")) == 25
    assert corpus.meta[0]["image_id"] == read_karpathy(KARPATHY, "train").images[0].image_id


def test_split_on_a_corpus_without_splits_is_refused(tmp_path):
    txt = tmp_path / "c.txt"
    txt.write_text("a dog\n")
    with pytest.raises(InputError, match="c.txt is a txt corpus without splits"):
        read_corpus(txt, split="train")


def test_embed_refuses_a_json_that_is_neither_coco_nor_karpathy(tmp_path, capsys):
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"data": [{"text": "a dog"}]}))
    assert main(["embed", str(other), "--out", str(tmp_path / "s"), "--encoder", "toy"]) == 2
    err = capsys.readouterr().err
    assert "neither a COCO caption annotation file" in err and "Karpathy-split" in err and "Traceback" not in err
    assert main(["embed", str(KARPATHY), "--split", "test", "--format", "txt", "--out", str(tmp_path / "s"),
                 "--encoder", "toy"]) == 2
    assert "without splits" in capsys.readouterr().err


def test_karpathy_references_for_evaluate(tmp_path, capsys):
    refs = load_references(KARPATHY, split="test")
    assert list(refs.captions) == TEST_IDS and refs.file_names[60623] == "val2014/COCO_val2014_000000060623.jpg"
    assert len(load_references(KARPATHY).captions) == 5  # test by default
    preds = tmp_path / "preds.json"
    preds.write_text(json.dumps([{"image_id": i, "caption": refs.captions[i][0]} for i in TEST_IDS]))
    out = tmp_path / "m.json"
    assert main(["-q", "evaluate", str(preds), "--references", str(KARPATHY), "--split", "test", "--metrics", "Bleu",
                 "--tokenizer", "simple", "--strict", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["Bleu_1"] > 0.9  # each prediction is one of its own references
    with pytest.raises(InputError, match="--split selects images of a Karpathy-split file"):
        load_references(Path(__file__).parent / "data" / "coco_captions_sample.json", split="test")
    assert main(["evaluate", str(preds), "--references", str(KARPATHY), "--split", "dev"]) == 2
    assert "unknown split 'dev'" in capsys.readouterr().err


# -- FlickrStyle10K -------------------------------------------------------------------------------------

STYLE_NAMES = ["1000268201_693b08cb0e.jpg", "1001773457_577c3a7d70.jpg", "1002674143_1b742ab4b8.jpg"]


@pytest.fixture()
def style_dir(tmp_path) -> Path:
    """FlickrStyle_v0.9/romantic: romantic_train.txt (one Latin-1 line, as in the release) + train.p."""
    d = tmp_path / "FlickrStyle_v0.9" / "romantic"
    d.mkdir(parents=True)
    lines = ["A child in a pink dress is climbing up stairs to find her fairy tale castle.",
             "Two dogs play on the road, enjoying their love.",
             "A little girl dreams of the caf\xe9 by the sea."]
    (d / "romantic_train.txt").write_bytes(b"\n".join(x.encode("latin-1") for x in lines) + b"\n")
    with open(d / "train.p", "wb") as f:
        pickle.dump(STYLE_NAMES, f, protocol=2)
    return d


def test_flickrstyle_pairs_captions_with_the_pickled_image_list(style_dir):
    ds = read_flickrstyle(style_dir / "romantic_train.txt")
    assert [im.image_id for im in ds.images] == STYLE_NAMES
    assert ds.images[2].captions == ["A little girl dreams of the caf\xe9 by the sea."]  # Latin-1 decoded
    test = read_flickrstyle(style_dir / "romantic_train.txt", split="test", test_size=1)
    assert [im.image_id for im in test.images] == STYLE_NAMES[2:]
    (style_dir / "names.txt").write_text("\n".join(STYLE_NAMES) + "\n")  # a plain-text list works too
    assert read_flickrstyle(style_dir / "romantic_train.txt", style_dir / "names.txt").images[0].captions \
        == ds.images[0].captions
    (style_dir / "short.txt").write_text(STYLE_NAMES[0] + "\n")
    with pytest.raises(InputError, match="3 caption lines but .*short.txt names 1 images"):
        read_flickrstyle(style_dir / "romantic_train.txt", style_dir / "short.txt")


class _RunsCode:
    def __reduce__(self):
        return (shutil.rmtree, ("/nonexistent-capdec-test-dir",))


def test_a_name_list_pickle_that_would_run_code_is_refused(style_dir):
    with open(style_dir / "train.p", "wb") as f:
        pickle.dump([STYLE_NAMES[0], _RunsCode()], f, protocol=2)
    with pytest.raises(InputError, match="refusing to load shutil.rmtree"):
        read_name_list(style_dir / "train.p")


def test_flickrstyle_as_corpus_and_references(style_dir, tmp_path):
    captions = style_dir / "romantic_train.txt"
    corpus = read_corpus(captions, format="flickrstyle")  # the whole file, Latin-1 lines included
    assert len(corpus) == 3 and corpus.captions[2].endswith("caf\xe9 by the sea.")
    train = read_corpus(captions, format="flickrstyle", split="train", style_test=1)
    assert train.captions == corpus.captions[:2]
    refs = load_references(captions, split="test", style_test=1)
    assert refs.captions == {STYLE_NAMES[2]: [corpus.captions[2]]}
    store = tmp_path / "store"
    assert main(["-q", "embed", str(captions), "--format", "flickrstyle", "--split", "train", "--style-test", "1",
                 "--out", str(store), "--encoder", "toy"]) == 0
    assert json.loads((store / "meta.json").read_text())["count"] == 2


# -- images of a split: caption --dataset, calibrate ---------------------------------------------------

@pytest.fixture()
def images_root(coco_dir, tmp_path) -> Path:
    """The Karpathy-test photos laid out as a COCO images root (val2014/COCO_val2014_*.jpg), one left out."""
    root = tmp_path / "coco_images"
    (root / "val2014").mkdir(parents=True)
    for i in TEST_IDS[:-1]:
        src = next(p for p in (coco_dir / "images").iterdir() if p.stem.endswith(f"{i:012d}"))
        shutil.copy(src, root / "val2014" / f"COCO_val2014_{i:012d}.jpg")
    return root


def test_calibrate_pairs_from_a_split(images_root, caplog):
    from capdec.calibrate import read_pairs

    paths, caps = read_pairs(KARPATHY, images_root=images_root, split="test")
    assert [p.name for p in paths] == [f"COCO_val2014_{i:012d}.jpg" for i in TEST_IDS[:-1]]
    assert all(len(c) == 5 for c in caps)
    assert "1 of the 5 images of the 'test' split are not under" in caplog.text
    with pytest.raises(InputError, match="give --images-root"):
        read_pairs(KARPATHY, split="test")


def test_calibrate_cli_on_a_split(images_root, tmp_path):
    out = tmp_path / "noise.json"
    assert main(["-q", "calibrate", str(KARPATHY), "--split", "test", "--images-root", str(images_root),
                 "--encoder", "toy", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["n_paired_images"] == 4
