"""Property-based fuzzing of every reader of the input layer (and of the artefact readers a crafted file
reaches), with Hypothesis.

The property, for each reader: whatever the file holds, the reader returns, or raises a
:class:`~capdec.errors.CapdecError` whose message is one line; never another exception (a RecursionError, a
TypeError on a value of the wrong type, a ValueError from ``int()``...), never a hang (each example has a
deadline). The inputs: arbitrary bytes and text, arbitrary JSON, and — most of the examples — a valid file
of the reader's format with a few of its values replaced by arbitrary JSON (or removed), so the fuzzing
reaches the checks deep inside each format. Examples are few and the deadline generous, so the default
suite stays fast (the same examples each run); ``CAPDEC_FUZZ_EXAMPLES=500 CAPDEC_FUZZ_RANDOM=1 pytest
tests/test_fuzz_readers.py`` searches harder, with new examples.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from capdec.errors import CapdecError

EXAMPLES = int(os.environ.get("CAPDEC_FUZZ_EXAMPLES", "25"))
# the default run is the same examples every time; CAPDEC_FUZZ_RANDOM=1 draws new ones (a search, not a test)
fuzz = settings(max_examples=EXAMPLES, deadline=5000, derandomize=not os.environ.get("CAPDEC_FUZZ_RANDOM"),
                database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
LEGACY = Path(__file__).parent / "data" / "legacy"

# -- strategies ------------------------------------------------------------------------------------------------

scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=-(10**80), max_value=10**80)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20)
           | st.sampled_from(["", " ", "\ud800", "a\u2028b", "0", "-1", "²", "NaN", "~nosuchuser/x", "../../x",
                              "/dev/full", "a.jpg", "COCO_val2014_000000000042.jpg", "9" * 100]))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=12)
# nesting deep enough to reach the parser's limits
deep = st.integers(min_value=90, max_value=3000).map(lambda n: "[" * n + "]" * n)


@st.composite
def mutated(draw, doc):
    """``doc`` with one to three of its values replaced by arbitrary JSON, removed, or a list emptied."""
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(1, 3))):
        slots = _slots(doc)
        if not slots:
            return draw(json_values)
        parent, key = draw(st.sampled_from(slots))
        action = draw(st.sampled_from(["replace", "replace", "replace", "delete", "deep"]))
        if action == "delete" and isinstance(parent, dict):
            del parent[key]
        elif action == "deep":
            parent[key] = json.loads(draw(deep.filter(lambda t: t.count("[") <= 95)))
        else:
            parent[key] = draw(json_values)
    return doc


def _slots(doc) -> list:
    """Every (container, key) of ``doc``, nested ones included."""
    out, stack = [], [doc]
    while stack:
        value = stack.pop()
        keys = list(value) if isinstance(value, dict) else range(len(value)) if isinstance(value, list) else []
        for key in keys:
            out.append((value, key))
            stack.append(value[key])
    return out


def encode(doc) -> str:
    return json.dumps(doc, ensure_ascii=False) if not isinstance(doc, str) else doc


def texts_of(doc, *, jsonl: bool = False):
    """The serialised ``doc`` mutated, arbitrary JSON, deep JSON, arbitrary text or bytes (as bytes)."""
    docs = mutated(doc).map(lambda d: "\n".join(map(encode, d)) if jsonl and isinstance(d, list) else encode(d))
    return st.one_of(docs, docs, docs, json_values.map(encode), deep, st.text(max_size=200)).map(
        lambda t: t.encode("utf-8", "surrogatepass")) | st.binary(max_size=200)


def check(read, data: bytes, name: str) -> None:
    """``read(path)`` on a file holding ``data`` returns or raises a one-line CapdecError."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        try:
            read(path)
        except CapdecError as e:
            assert "\n" not in str(e).strip(), f"a message of several lines: {e}"


# -- the input layer --------------------------------------------------------------------------------------------

COCO = {"images": [{"id": 1, "file_name": "COCO_val2014_000000000001.jpg"}, {"id": 2, "file_name": "b.jpg"}],
        "annotations": [{"image_id": 1, "id": 10, "caption": "A dog on a street."},
                        {"image_id": 2, "id": 11, "caption": "A red bus."}]}
KARPATHY = {"dataset": "coco", "images": [
    {"filepath": "val2014", "filename": "COCO_val2014_000000000001.jpg", "imgid": 0, "split": "test", "cocoid": 1,
     "sentences": [{"raw": "A dog on a street.", "tokens": ["a", "dog"], "sentid": 0}]},
    {"filepath": "train2014", "filename": "COCO_train2014_000000000002.jpg", "imgid": 1, "split": "restval",
     "cocoid": 2, "sentences": [{"raw": "A red bus.", "tokens": ["a", "red", "bus"], "sentid": 1}]}]}
JSONL_CAPTIONS = [{"caption": "A dog on a street.", "image_id": 1}, {"caption": "A red bus.", "id": 2}]
REFS_JSONL = [{"image": "a.jpg", "captions": ["A dog.", "A dog on a street."]}, {"image": "b.jpg", "caption": "A bus."}]
REFS_MAP = {"a.jpg": ["A dog.", "A dog on a street."], "b.jpg": ["A bus."]}
PREDICTIONS = [{"image_id": 1, "caption": "a dog"}, {"image_id": 2, "caption": "a bus"}]
PREDICTIONS_JSONL = [{"image": "COCO_val2014_000000000001.jpg", "caption": "a dog"}, {"image": "b.jpg", "caption": "x"}]
IMAGE_LIST = [{"file_name": "a.jpg", "captions": ["A dog.", "A dog on a street."]}, {"file_name": "b.jpg",
                                                                                     "captions": ["A bus."]}]
IMAGE_IDS = {"a.jpg": 1, "b.jpg": "two"}


@fuzz
@given(data=texts_of(COCO) | texts_of(KARPATHY) | texts_of(JSONL_CAPTIONS, jsonl=True))
@pytest.mark.parametrize("name", ["c.json", "c.jsonl", "c.txt", "c.csv"])
def test_read_corpus(name, data):
    from capdec.corpus import read_corpus

    check(read_corpus, data, name)


@fuzz
@given(data=texts_of(KARPATHY))
@pytest.mark.parametrize("split", ["train", "test"])
def test_read_corpus_karpathy_split(split, data):
    from capdec.corpus import read_corpus

    check(lambda p: read_corpus(p, format="karpathy", split=split), data, "dataset_coco.json")


@fuzz
@given(data=texts_of(COCO) | texts_of(KARPATHY) | texts_of(REFS_JSONL, jsonl=True) | texts_of(REFS_MAP))
@pytest.mark.parametrize("name, split", [("r.json", None), ("r.jsonl", None), ("k.json", "test")])
def test_load_references(name, split, data):
    from capdec.io.references import load_references

    check(lambda p: load_references(p, split=split), data, name)


@fuzz
@given(data=texts_of(PREDICTIONS) | texts_of(PREDICTIONS_JSONL, jsonl=True))
@example(data=b'{"\\n": null}')  # found by the fuzzing: a field name with a newline made a two-line message
@pytest.mark.parametrize("name", ["p.json", "p.jsonl", "p.csv"])
def test_load_predictions(name, data):
    from capdec.io.predictions import load_predictions

    check(load_predictions, data, name)


@fuzz
@given(data=texts_of(COCO) | texts_of(KARPATHY) | texts_of(IMAGE_LIST) | texts_of(REFS_JSONL, jsonl=True))
@pytest.mark.parametrize("name", ["d.json", "d.jsonl"])
def test_read_image_dataset_and_pairs(name, data):
    from capdec.io.image_datasets import read_image_dataset, read_pairs

    with tempfile.TemporaryDirectory() as root:
        check(lambda p: read_image_dataset(p, images_root=root, split="test" if "k" in name else None), data, name)
        check(lambda p: read_pairs(p, images_root=root), data, name)


@fuzz
@given(data=texts_of(IMAGE_IDS) | texts_of(COCO) | texts_of([{"file_name": "a.jpg", "id": 1}])
       | st.lists(st.tuples(st.text(max_size=12), st.text(max_size=12)), max_size=4).map(
           lambda rows: "".join(f"{a},{b}\n" for a, b in rows).encode("utf-8", "surrogatepass")))
@pytest.mark.parametrize("name", ["ids.json", "ids.csv", "ids.tsv"])
def test_read_image_ids(name, data):
    from capdec.images import lookup_image_id
    from capdec.io.image_datasets import read_image_ids

    def read(path):
        mapping = read_image_ids(path)
        for key in mapping:
            lookup_image_id(key, mapping)

    check(read, data, name)


@fuzz
@given(data=texts_of([0.6, 0.8]) | texts_of({"shift": [0.6, 0.8]}) | texts_of({"offset": [1, 0], "image_mean": [0, 1]}))
def test_read_vector(data):
    from capdec.io.vectors import read_vector

    check(lambda p: read_vector(p, keys=("shift", "offset", "image_mean")), data, "v.json")


@fuzz
@given(names=st.recursive(st.text(max_size=10) | st.binary(max_size=10) | st.integers() | st.none(),
                          lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner)
                          | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=8),
       raw=st.binary(max_size=100))
@example(names=[], raw=b"P")  # found by the fuzzing: the unpickler's message (several lines) was passed on
def test_read_name_list(names, raw):
    from capdec.io.datasets import read_name_list

    for protocol in (0, 2):
        check(read_name_list, pickle.dumps(names, protocol=protocol), "train.p")
    check(read_name_list, raw, "train.p")
    check(read_name_list, raw, "train.txt")


@fuzz
@given(lines=st.lists(st.binary(max_size=30) | st.text(max_size=30).map(lambda t: t.encode("utf-8", "surrogatepass")),
                      max_size=6), test=st.integers(-3, 8))
def test_read_flickrstyle(lines, test):
    from capdec.io.datasets import read_flickrstyle

    with tempfile.TemporaryDirectory() as tmp:
        names = Path(tmp) / "train.txt"
        names.write_text("".join(f"{i}_a.jpg\n" for i in range(4)))
        check(lambda p: read_flickrstyle(p, names, split="test", test_size=test), b"\n".join(lines), "humor.txt")


@fuzz
@given(lines=st.lists(st.sampled_from(["a.png", "sub/", "*.png", "**/*.png", "@x", "#", "~nosuchuser/a.png",
                                       "../a.png", "/dev/full", "missing.jpg", "", "\x00"]) | st.text(max_size=12),
                      max_size=5), raw=st.binary(max_size=60), recursive=st.booleans())
def test_find_images_from_list_files(lines, raw, recursive):
    from capdec.images import find_images

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "sub").mkdir()
        (Path(tmp) / "a.png").write_bytes(b"")
        (Path(tmp) / "sub" / "loop").symlink_to("..")
        for data in ("\n".join(lines).encode("utf-8", "surrogatepass"), raw):
            check(lambda p: find_images([f"@{p}"], recursive=recursive), data, "list.txt")


@fuzz
@given(data=texts_of({"lr": 1e-4, "epochs": 2, "batch_size": 8, "mix_weights": [0.5, 0.5], "keep_best": True,
                      "schedule": "cosine", "dropout": 0.1, "prefix_length": 10}))
def test_train_config_file(data):
    import argparse

    from capdec.cli import build_parser
    from capdec.cli.train import _read_config_file

    parser = build_parser("train")
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]

    def read(path):
        from capdec.configs import ModelConfig, TrainConfig

        values = _read_config_file(str(path), sub)
        names = {f: values[f] for f in ("dropout", "prefix_length") if f in values}
        ModelConfig(**names)
        TrainConfig(**{f: values[f] for f in ("lr", "epochs", "batch_size", "schedule") if f in values})

    check(read, data, "config.json")


# -- the artefact readers a crafted file reaches ------------------------------------------------------------


@fuzz
@given(data=texts_of(json.loads((LEGACY / "checkpoint" / "config.json").read_text())))
def test_read_checkpoint_config(data):
    from capdec.checkpoint import read_config

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_bytes(data)
        try:
            read_config(tmp)
        except CapdecError as e:
            assert "\n" not in str(e).strip()


@fuzz
@given(data=texts_of(json.loads((LEGACY / "checkpoint" / "training" / "state.json").read_text())))
def test_read_training_state(data):
    from capdec.checkpoint import load_training_state

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "training").mkdir()
        (Path(tmp) / "training" / "state.json").write_bytes(data)
        try:
            load_training_state(tmp, optimizer=False)
        except CapdecError as e:
            assert "\n" not in str(e).strip()


@fuzz
@given(data=texts_of(json.loads((LEGACY / "store" / "meta.json").read_text())))
def test_open_store(data):
    from capdec.store import EmbeddingStore

    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        shutil.copytree(LEGACY / "store", store)
        (store / "meta.json").write_bytes(data)
        try:
            EmbeddingStore.open(store).captions  # noqa: B018
        except CapdecError as e:
            assert "\n" not in str(e).strip()


@fuzz
@given(header=mutated({"__metadata__": {"format": "pt"}, "a": {"dtype": "F32", "shape": [2, 2],
                                                                 "data_offsets": [0, 16]}}),
       length=st.none() | st.integers(0, 2**64 - 1), body=st.binary(max_size=40))
def test_read_safetensors_header(header, length, body):
    import struct

    from capdec.artifacts import read_safetensors_header

    raw = json.dumps(header).encode("utf-8", "surrogatepass")
    data = struct.pack("<Q", len(raw) if length is None else length) + raw + body
    check(lambda p: read_safetensors_header(p, redo="x"), data, "model.safetensors")
