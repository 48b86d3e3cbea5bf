"""The input layer: every file a *user* hands capdec is read here, with errors that name the file and line.

Artefacts capdec writes itself (stores, memories, noise files, checkpoints) are read by the artefact
layer (:mod:`capdec.artifacts`); images are found and decoded by :mod:`capdec.images`, which also owns
the rule that turns a file name into an image id.

Sections, top to bottom:

- text and JSON: :func:`read_text`, :func:`parse_json`, :func:`read_json`, :func:`parse_json_or_jsonl`
  (one JSON document or JSON Lines; ``lines`` says where each record came from, :func:`location`);
- caption corpora (``capdec embed``, ``read_corpus``): txt / jsonl / csv / tsv / COCO annotations,
  Karpathy splits, FlickrStyle10K; format from the extension (:func:`detect_format`; a ``.json`` file
  is COCO or Karpathy by its content), one ``_iter_*`` reader per format;
- standard datasets: Karpathy-split files and FlickrStyle10K (:func:`read_karpathy`,
  :func:`read_flickrstyle`: splits, image ids, image files), for corpora, references, ``capdec caption
  --dataset`` and calibration pairs;
- reference captions (``capdec evaluate``, calibration): :func:`detect_references_format` picks the
  reader of a parsed file (COCO annotations, ``{file name: [captions]}``, records); add a format by
  adding a case there and a reader to ``_REFERENCE_READERS``;
- predictions (``capdec evaluate``): what ``capdec caption`` writes (JSONL, COCO results, CSV);
- image id maps (``capdec caption --image-ids``) and image/caption pairs (``capdec calibrate``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import pickle
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capdec.errors import InputError
from capdec.images import ImageId, basename, image_id_from_name, image_key, list_images

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# text and JSON
# ---------------------------------------------------------------------------------------------

def read_text(path: Path) -> str:
    """A user's text file (UTF-8, a BOM allowed); missing, a directory, not UTF-8 or empty is an error."""
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected a file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e})") from e
    if not text.strip():
        raise InputError(f"{path}: the file is empty")
    return text


def at_line(where: str | os.PathLike, line: int, column: int | None = None) -> str:
    """Where in a file, as every input-layer error names it: ``PATH: line N`` or ``PATH: line N column C``."""
    return f"{where}: line {line}" + (f" column {column}" if column is not None else "")


def parse_json(text: str, where: str | os.PathLike) -> Any:
    """One JSON document; a syntax error names ``where`` (a file, or what the text is), line and column."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{at_line(where, e.lineno, e.colno)}: malformed JSON ({e.msg})") from e


def read_json(path: str | os.PathLike) -> Any:
    """A user's JSON file (UTF-8, a BOM allowed), parsed; errors name the file and line."""
    path = Path(path)
    return parse_json(read_text(path), path)


def parse_json_or_jsonl(path: Path, text: str) -> tuple[Any, list[int] | None]:
    """Parse a JSON document or JSON Lines; errors name the file and line.

    Returns ``(data, lines)``: for JSON Lines (or a one-line document) ``data`` is the list of
    records (the one object) and ``lines`` their line numbers; for a JSON document ``lines`` is None.
    """
    lines = text.split("\n")  # not splitlines(): U+2028 may sit raw inside a JSON string
    numbered = [(i, line) for i, line in enumerate(lines, 1) if line.strip()]
    try:
        data = json.loads(text)
        return data, ([numbered[0][0]] if len(numbered) == 1 and isinstance(data, dict) else None)
    except json.JSONDecodeError as whole:
        try:
            json.loads(numbered[0][1])
        except json.JSONDecodeError:
            raise InputError(f"{at_line(path, whole.lineno, whole.colno)}: malformed JSON "
                             f"({whole.msg})") from whole
        records = []
        for lineno, line in numbered:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise InputError(f"{at_line(path, lineno, e.colno)}: malformed JSON line "
                                 f"({e.msg})") from e
        return records, [lineno for lineno, _ in numbered]

def location(path: Path, index: int, lines: list[int] | None) -> str:
    return at_line(path, lines[index]) if lines else f"{path}: item {index}"


# ---------------------------------------------------------------------------------------------
# caption corpora
# ---------------------------------------------------------------------------------------------

FORMATS = ("txt", "jsonl", "csv", "tsv", "coco", "karpathy", "flickrstyle")
_EXTENSIONS = {".txt": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv",
               ".json": "coco"}
# JSONL fields / CSV columns copied into a caption's metadata when present (evaluation joins on them)
_KEPT_KEYS = ("image_id", "id")


def detect_format(path: str | os.PathLike) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in _EXTENSIONS:
        known = ", ".join(f"{ext} ({fmt})" for ext, fmt in _EXTENSIONS.items())
        raise InputError(f"{path}: cannot tell the corpus format from the extension {suffix or '(none)'!r} "
                         f"(known: {known}); pass format= (--format) explicitly")
    return _EXTENSIONS[suffix]


def iter_caption_file(path: Path, fmt: str, field_name: str, column: str, data: Any = None,
                      split: str | None = None, style_names: str | os.PathLike | None = None,
                      style_test: int = 0) -> Iterator[tuple[str, dict[str, Any]]]:
    """(raw caption, metadata) of every caption of one file. ``data``: the file already parsed (JSON
    formats); ``split`` / ``style_names`` / ``style_test``: the images of a Karpathy or FlickrStyle10K file."""
    if fmt == "karpathy":
        return karpathy_from_data(data if data is not None else read_json(path), path, split or "train").captions()
    if fmt == "flickrstyle":
        if (split or "all") == "all" and style_names is None:
            return ((line, {"line": i}) for i, line in enumerate(read_style_lines(path), start=1))
        return read_flickrstyle(path, style_names, split=split or "all", test_size=style_test).captions()
    if fmt == "txt":
        return _iter_txt(path)
    if fmt == "jsonl":
        return _iter_jsonl(path, field_name)
    if fmt in ("csv", "tsv"):
        return _iter_csv(path, column, "\t" if fmt == "tsv" else ",")
    if fmt == "coco":
        return _iter_coco(path, data)
    raise InputError(f"unknown corpus format {fmt!r}; use one of auto, {', '.join(FORMATS)}")


def _iter_txt(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    # split on "\n" only so that line numbers match what an editor shows (str.splitlines also
    # splits on form feeds and U+2028; those are whitespace and get normalised away instead)
    with open(path, encoding="utf-8-sig", newline="\n") as f:
        for lineno, line in enumerate(f, start=1):
            yield line, {"line": lineno}


def _iter_jsonl(path: Path, field_name: str) -> Iterator[tuple[str, dict[str, Any]]]:
    with open(path, encoding="utf-8-sig", newline="\n") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{at_line(path, lineno, e.colno)}: not valid JSON ({e.msg}); "
                                 f"a JSONL file needs one JSON object per line") from e
            if not isinstance(record, dict):
                raise InputError(f"{at_line(path, lineno)}: expected a JSON object with a {field_name!r} field, "
                                 f"got a JSON {type(record).__name__}")
            if field_name not in record:
                raise InputError(f"{at_line(path, lineno)}: no field {field_name!r} (fields: "
                                 f"{', '.join(map(repr, record)) or 'none'}); choose it with field= (--field)")
            text = record[field_name]
            if not isinstance(text, str):
                raise InputError(f"{at_line(path, lineno)}: field {field_name!r} is a JSON "
                                 f"{'null' if text is None else type(text).__name__}, expected a string")
            yield text, {"line": lineno, **{k: record[k] for k in _KEPT_KEYS if k in record and k != field_name}}


def _iter_csv(path: Path, column: str, delimiter: str) -> Iterator[tuple[str, dict[str, Any]]]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter, strict=True)
        last_line = 0  # reader.line_num after the previous record: a record starts on the next line
        try:
            header = next(reader, None)
            if header is None:
                raise InputError(f"{path}: empty file, expected a header row naming a {column!r} column")
            if column not in header:
                raise InputError(f"{at_line(path, 1)}: no column {column!r} in the header (columns: "
                                 f"{', '.join(map(repr, header))}); choose it with column= (--column)")
            index = header.index(column)
            kept = {k: header.index(k) for k in _KEPT_KEYS if k in header and k != column}
            last_line = reader.line_num
            for row in reader:
                start = last_line + 1
                last_line = reader.line_num
                if not row:  # a blank line is no record
                    continue
                if len(row) != len(header):
                    raise InputError(f"{at_line(path, start)}: {len(row)} fields but the header has {len(header)}; "
                                     f"quote captions that contain {delimiter!r}")
                yield row[index], {"line": start, **{k: row[i] for k, i in kept.items()}}
        except csv.Error as e:
            raise InputError(f"{at_line(path, last_line + 1)}: not valid CSV ({e}); check the quoting of that "
                             f"record") from e


def _iter_coco(path: Path, data: Any = None) -> Iterator[tuple[str, dict[str, Any]]]:
    if data is None:
        with open(path, encoding="utf-8-sig") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise InputError(f"{at_line(path, e.lineno, e.colno)}: not valid JSON ({e.msg})") from e
    annotations = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(annotations, list):
        found = f"keys: {', '.join(map(repr, data))}" if isinstance(data, dict) else f"a JSON {type(data).__name__}"
        raise InputError(f"{path}: neither a COCO caption annotation file (no 'annotations' list) nor a "
                         f"Karpathy-split file (no 'images' with 'sentences'); found {found}. "
                         f"For one caption per line use a .txt/.jsonl file, or pass format= (--format)")
    for i, ann in enumerate(annotations):
        where = f"{path}: annotations[{i}]"
        if not isinstance(ann, dict) or "caption" not in ann:
            raise InputError(f"{where} has no 'caption' field")
        if not isinstance(ann["caption"], str):
            raise InputError(f"{where} (id {ann.get('id')}): 'caption' is not a string")
        yield ann["caption"], {k: ann[k] for k in ("image_id", "id") if k in ann}


def check_utf8(path: Path) -> str:
    """Fail with the line and column of the first byte that is not UTF-8; return the file's sha256."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        # byte 0x0A never occurs inside a multi-byte UTF-8 sequence, so lines decode independently
        for lineno, line in enumerate(f, start=1):
            h.update(line)
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{at_line(path, lineno, e.start + 1)}: not valid UTF-8 (byte 0x{line[e.start]:02x}); "
                                 f"re-encode the file as UTF-8 (e.g. iconv -t UTF-8)") from e
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# standard datasets: Karpathy splits and FlickrStyle10K
# ---------------------------------------------------------------------------------------------
# **Karpathy split** (``dataset_coco.json``, ``dataset_flickr30k.json``, ``dataset_flickr8k.json``: the
# files every captioning paper uses)::
#
#     {"dataset": "coco", "images": [{"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg",
#       "split": "train" | "restval" | "val" | "test", "cocoid": 391895, "imgid": 0,
#       "sentences": [{"raw": "A man with a red helmet ...", "tokens": [...], ...}, ...]}, ...]}
#
# Splits: ``train`` is train + restval (the standard training set, 113,287 COCO images), ``restval``
# alone, ``val``, ``test`` and ``all``. An image's **id** is its ``cocoid`` when the file has one (COCO);
# otherwise the file name's stem as an integer when it is all digits (Flickr30k's ``1000092795.jpg`` ->
# 1000092795), else the file name itself (Flickr8k's ``1000268201_693b08cb0e.jpg``). The same rule is
# used for predictions (``capdec caption --dataset``) and references (``capdec evaluate --split``), so the
# two always match. An image's file is ``filepath/filename`` under the images root (``filename`` alone
# when there is no ``filepath``, as in Flickr30k).
#
# **FlickrStyle10K** (``FlickrStyle_v0.9``): one styled caption per line in ``humor/funny_train.txt`` or
# ``romantic/romantic_train.txt``, and the image names of those lines, in the same order, in the
# folder's ``train.p`` (a Python pickle of a list of file names). The pickle is read with an unpickler
# that refuses every global, so it can only yield plain data (a list of strings needs none); a plain
# text list (one name per line) works too. The caption files are mostly UTF-8 with some Latin-1 lines;
# such lines are decoded as Latin-1 and counted in the log. FlickrStyle10K has no official split: the
# images are used in file order and ``--style-test N`` holds out the last N (a common protocol trains on
# 6,000 and tests on 1,000, see docs/reproduce.md).

SPLITS = ("train", "restval", "val", "test", "all")
KARPATHY_SPLITS = ("train", "restval", "val", "test")  # the values of an image's "split" field


@dataclass
class DatasetImage:
    """One image of a dataset and its reference captions."""

    image_id: int | str  # cocoid, the numeric file stem, or the file name (see above)
    filename: str
    filepath: str = ""  # folder under the images root ("" when the dataset has none)
    split: str = ""
    sentences: list[str] = field(default_factory=list)

    @property
    def relpath(self) -> str:
        """The image file relative to the images root."""
        return f"{self.filepath}/{self.filename}" if self.filepath else self.filename


@dataclass
class Dataset:
    """The images of one split of a dataset file."""

    path: str
    name: str  # "coco", "flickr30k", ... (the file's "dataset" field), or "flickrstyle"
    split: str
    images: list[DatasetImage]
    format: str = "karpathy"

    def __len__(self) -> int:
        return len(self.images)

    def captions(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """(raw caption, metadata) for every sentence of every image, in file order."""
        for img in self.images:
            for i, sentence in enumerate(img.sentences):
                yield sentence, {"image_id": img.image_id, "sentence": i}

    def references(self) -> dict[int | str, list[str]]:
        return {img.image_id: list(img.sentences) for img in self.images}

    def image_ids(self) -> dict[str, int | str]:
        """relative image path -> id (what ``capdec caption --dataset`` writes as ``image_id``)."""
        return {img.relpath: img.image_id for img in self.images}


# -- Karpathy / COCO detection ---------------------------------------------------------------------------------

def json_kind(data: Any) -> str | None:
    """'karpathy' (images[] with sentences), 'coco' (an annotations list) or None."""
    if not isinstance(data, dict):
        return None
    images = data.get("images")
    if isinstance(images, list) and "annotations" not in data and images \
            and isinstance(images[0], dict) and "sentences" in images[0]:
        return "karpathy"
    if isinstance(data.get("annotations"), list):
        return "coco"
    return None


def _describe(data: Any) -> str:
    if isinstance(data, dict):
        return f"keys: {', '.join(map(repr, list(data)[:8])) or 'none'}"
    return f"a JSON {type(data).__name__}"


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}; use one of {', '.join(SPLITS)} (train includes restval)")
    return split


# -- Karpathy -----------------------------------------------------------------------------------------

def _image_id(img: dict[str, Any]) -> int | str:
    if isinstance(img.get("cocoid"), int):
        return img["cocoid"]
    stem = img["filename"].rsplit(".", 1)[0]
    return int(stem) if re.fullmatch(r"[0-9]+", stem, re.ASCII) else img["filename"]


def karpathy_from_data(data: Any, path: str | os.PathLike, split: str = "all") -> Dataset:
    """The images of ``split`` from a parsed Karpathy-split document (errors name ``path``)."""
    check_split(split)
    if json_kind(data) != "karpathy":
        raise InputError(f"{path}: not a Karpathy-split file (an 'images' list whose entries have 'filename', "
                         f"'split' and 'sentences'); found {_describe(data)}")
    wanted = {"train": {"train", "restval"}, "all": set(KARPATHY_SPLITS)}.get(split, {split})
    images, seen, counts = [], {}, dict.fromkeys(KARPATHY_SPLITS, 0)
    for i, img in enumerate(data["images"]):
        where = f"{path}: images[{i}]"
        if not isinstance(img, dict):
            raise InputError(f"{where} is a JSON {type(img).__name__}, expected an object")
        for key in ("filename", "split", "sentences"):
            if key not in img:
                raise InputError(f"{where} has no {key!r} field")
        if img["split"] not in KARPATHY_SPLITS:
            raise InputError(f"{where} ({img['filename']}): unknown split {img['split']!r} "
                             f"(expected one of {', '.join(KARPATHY_SPLITS)})")
        if not isinstance(img["filename"], str) or not isinstance(img.get("filepath", ""), str):
            raise InputError(f"{where}: 'filename' and 'filepath' must be strings")
        counts[img["split"]] += 1
        if img["split"] not in wanted:
            continue
        sentences = img["sentences"]
        if not isinstance(sentences, list):
            raise InputError(f"{where} ({img['filename']}): 'sentences' must be a list")
        raws = []
        for j, s in enumerate(sentences):
            raw = s.get("raw") if isinstance(s, dict) else None
            if not isinstance(raw, str):
                raise InputError(f"{where} ({img['filename']}): sentences[{j}] has no string 'raw' field")
            raws.append(raw)
        image_id = _image_id(img)
        if image_id in seen:
            raise InputError(f"{where} ({img['filename']}): image id {image_id!r} repeats images[{seen[image_id]}]")
        seen[image_id] = i
        images.append(DatasetImage(image_id=image_id, filename=img["filename"], filepath=img.get("filepath", ""),
                                   split=img["split"], sentences=raws))
    if not images:
        have = ", ".join(f"{k} {v}" for k, v in counts.items() if v) or "no images"
        raise InputError(f"{path}: the {split!r} split has no images ({have})")
    name = data.get("dataset") if isinstance(data.get("dataset"), str) else Path(path).stem
    logger.info("%s: %s split of %s, %d images, %d captions", path, split, name, len(images),
                sum(len(im.sentences) for im in images))
    return Dataset(path=str(path), name=name, split=split, images=images)


def read_karpathy(path: str | os.PathLike, split: str = "all") -> Dataset:
    """Read the images (ids, files, captions) of one split of a Karpathy-split JSON file."""
    check_split(split)
    return karpathy_from_data(read_json(path), path, split)


# -- FlickrStyle10K -----------------------------------------------------------------------------------

class _DataOnlyUnpickler(pickle.Unpickler):
    """Refuses every global: only plain data (lists, strings, numbers, dicts) can be built, never code."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only plain data is read")


def read_name_list(path: str | os.PathLike) -> list[str]:
    """Image file names, one per caption line: a pickled list (FlickrStyle10K's ``train.p``, read
    without running any code) or a text file with one name per line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such image-name list")
    raw = path.read_bytes()
    if path.suffix.lower() in (".p", ".pkl", ".pickle"):
        try:
            names = _DataOnlyUnpickler(io.BytesIO(raw), encoding="utf-8").load()
        except Exception as e:  # noqa: BLE001 - any failure of an untrusted pickle is the file's fault
            raise InputError(f"{path}: not a pickled list of image names ({type(e).__name__}: {e})") from e
        if isinstance(names, (tuple, list)):
            names = [n.decode("utf-8") if isinstance(n, bytes) else n for n in names]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise InputError(f"{path}: expected a pickled list of file names, got {type(names).__name__}")
        return [n.strip() for n in names]
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e})") from e
    return [line.strip() for line in text.split("\n") if line.strip()]


def read_style_lines(path: str | os.PathLike) -> list[str]:
    """The lines of a FlickrStyle10K caption file (UTF-8; a line that is not is decoded as Latin-1)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such caption file")
    lines, latin = [], 0
    for line in path.read_bytes().split(b"\n"):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            text, latin = line.decode("latin-1"), latin + 1
        lines.append(text.rstrip("\r"))
    if lines and not lines[-1].strip():
        lines.pop()  # the final newline
    if latin:
        logger.warning("%s: %d line(s) were not UTF-8 and were read as Latin-1", path, latin)
    return lines


def find_style_names(captions: str | os.PathLike) -> Path | None:
    """``train.p`` (or ``train.txt``) beside a FlickrStyle10K caption file, if there is one."""
    folder = Path(captions).parent
    for name in ("train.p", "train.txt"):
        if (folder / name).is_file() and (folder / name) != Path(captions):
            return folder / name
    return None


def read_flickrstyle(captions: str | os.PathLike, names: str | os.PathLike | None = None, *, split: str = "all",
                     test_size: int = 0) -> Dataset:
    """A FlickrStyle10K caption file paired with its image names (``names``; default: ``train.p`` in the
    same folder). ``split``: all, or train / test with the last ``test_size`` images held out as test."""
    if split not in ("all", "train", "test"):
        raise InputError(f"FlickrStyle10K has the splits all, train and test (the last --style-test images); "
                         f"got {split!r}")
    lines = read_style_lines(captions)
    names_path = Path(names) if names is not None else find_style_names(captions)
    if names_path is None:
        raise InputError(f"{captions}: no image-name list given and no train.p beside it; pass the list "
                         "(train.p or a text file of names) to pair captions with images")
    file_names = read_name_list(names_path)
    if len(file_names) != len(lines):
        raise InputError(f"{captions} has {len(lines)} caption lines but {names_path} names {len(file_names)} "
                         "images; they must pair up line by line")
    images: dict[str, DatasetImage] = {}
    for name, line in zip(file_names, lines):
        img = images.setdefault(name, DatasetImage(image_id=name, filename=name, split="train"))
        img.sentences.append(line)
    ordered = list(images.values())
    if not 0 <= test_size <= len(ordered):
        raise InputError(f"--style-test {test_size}: the file has {len(ordered)} images")
    if split != "all" and test_size == 0:
        raise InputError(f"split {split!r} of FlickrStyle10K needs the number of test images (--style-test N)")
    if test_size:
        for img in ordered[len(ordered) - test_size:]:
            img.split = "test"
    chosen = ordered if split == "all" else [im for im in ordered if im.split == split]
    return Dataset(path=str(captions), name="flickrstyle", split=split, images=chosen, format="flickrstyle")


# ---------------------------------------------------------------------------------------------
# reference captions
# ---------------------------------------------------------------------------------------------

@dataclass
class ReferenceSet:
    """Reference captions by image id (in file order) and the file names that name each image."""

    captions: dict[ImageId, list[str]]
    file_names: dict[ImageId, str] = field(default_factory=dict)  # id -> file name/path as given
    source: str = ""

    def alias_table(self) -> dict[str, ImageId]:
        """file name -> id, leaving out names that two images share (ambiguous)."""
        return _unique((basename(name), image_id) for image_id, name in self.file_names.items())

    def number_table(self) -> dict[int, ImageId]:
        """Trailing number of a file name -> id (``img_12.jpg`` -> 12), leaving out clashes.

        ``capdec caption --format coco`` numbers images this way when it has no id map, so an
        ``image_id`` that is no reference id is looked up here.
        """
        pairs = []
        for image_id, name in self.file_names.items():
            number = image_id_from_name(name)
            if number is not None:
                pairs.append((number, image_id))
        return _unique(pairs)


def _unique(pairs: Iterable[tuple[Any, ImageId]]) -> dict[Any, ImageId]:
    """Build alias -> id, dropping aliases that name two different images."""
    table: dict[Any, ImageId] = {}
    clashes = set()
    for alias, image_id in pairs:
        if alias in table and table[alias] != image_id:
            clashes.add(alias)
        table[alias] = image_id
    for alias in clashes:
        del table[alias]
    return table


def _as_caption_list(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(c, str) for c in value):
        return list(value)
    if isinstance(value, list) and all(isinstance(c, dict) and isinstance(c.get("raw", c.get("caption")), str)
                                       for c in value):
        return [c.get("raw", c.get("caption")) for c in value]  # Karpathy-style [{"raw": ...}]
    raise InputError(f"{where}: captions must be a string or a list of strings")


def detect_references_format(path: Path, data: Any) -> str:
    """Which reader a parsed references file needs: ``"coco"`` (``images`` + ``annotations``),
    ``"karpathy"`` (a Karpathy-split file), ``"mapping"`` (``{file name: [captions]}``) or ``"records"``
    (a list / JSON Lines of objects).

    To read a new format, recognise it here and add its reader to ``_REFERENCE_READERS``.
    """
    if json_kind(data) == "karpathy":
        return "karpathy"
    if isinstance(data, dict) and "annotations" in data:
        return "coco"
    if isinstance(data, dict) and data and all(isinstance(v, (str, list)) for v in data.values()) \
            and not ({"image", "image_id", "caption", "captions"} & set(data)):
        return "mapping"
    if isinstance(data, (dict, list)):
        return "records"
    raise InputError(f"{path}: unrecognised references format; expected COCO annotations "
                     f"({{'images', 'annotations'}}), a list or JSON Lines of "
                     f"{{'image' or 'image_id', 'captions'}}, or {{file name: [captions]}}")


def load_references(path: str | os.PathLike, *, split: str | None = None,
                    style_names: str | os.PathLike | None = None, style_test: int = 0,
                    split_label_only: bool = False) -> ReferenceSet:
    """Read reference captions; see :func:`read_references` for the formats.

    A Karpathy-split file gives the images of ``split`` (default ``test``); a FlickrStyle10K caption
    file (``.txt``, paired with ``train.p`` or ``style_names``) those of ``split`` with the last
    ``style_test`` images as test. For another format a ``split`` is an error, or ignored with
    ``split_label_only`` (``capdec evaluate --split`` then only names the split on a model card).
    """
    path = Path(path)
    if path.suffix.lower() == ".txt":
        return references_from_dataset(read_flickrstyle(path, style_names, split=split or "all",
                                                        test_size=style_test))
    data, lines = parse_json_or_jsonl(path, read_text(path))
    kind = detect_references_format(path, data)
    if split is not None and kind != "karpathy" and not split_label_only:
        raise InputError(f"{path}: --split selects images of a Karpathy-split file (or a FlickrStyle10K .txt); "
                         f"this is not one")
    if kind == "karpathy":
        return references_from_dataset(karpathy_from_data(data, path, split or "test"))
    refs = _REFERENCE_READERS[kind](path, data, lines)
    if not refs.captions:
        raise InputError(f"{path}: no reference captions in the file")
    return refs


def _references_from_mapping(path: Path, data: dict[str, Any], lines: list[int] | None) -> ReferenceSet:
    refs = ReferenceSet({}, {}, str(path))
    for name, caps in data.items():
        _add_references(refs, image_key(name), name, _as_caption_list(caps, f"{path}: key {name!r}"),
                        f"{path}: key {name!r}")
    return refs


def _references_from_records(path: Path, data: Any, lines: list[int] | None) -> ReferenceSet:
    records = [data] if isinstance(data, dict) else data
    refs = ReferenceSet({}, {}, str(path))
    for i, rec in enumerate(records):
        where = location(path, i, lines)
        if not isinstance(rec, dict):
            raise InputError(f"{where}: expected an object with 'image' (or 'image_id') and 'captions'")
        name = rec.get("file_name", rec.get("image", rec.get("filename")))
        ident = rec.get("image_id", name)
        if ident is None:
            raise InputError(f"{where}: no 'image_id', 'image' or 'file_name' field")
        if "captions" in rec:
            caps = rec["captions"]
        elif "caption" in rec:
            caps = rec["caption"]
        elif "sentences" in rec:
            caps = rec["sentences"]
        else:
            raise InputError(f"{where}: no 'captions' (or 'caption') field")
        try:
            key = image_key(ident)
        except TypeError as e:
            raise InputError(f"{where}: bad image id {ident!r}: {e}") from e
        _add_references(refs, key, name, _as_caption_list(caps, where), where)
    return refs


def references_from_dataset(ds: Dataset) -> ReferenceSet:
    """The references of a dataset split, keyed like predictions of ``capdec caption --dataset``."""
    refs = ReferenceSet({}, {}, ds.path)
    for img in ds.images:
        key = image_key(img.image_id)
        refs.captions[key] = list(img.sentences)
        refs.file_names[key] = img.relpath
    if not refs.captions:
        raise InputError(f"{ds.path}: no reference captions in the {ds.split!r} split")
    return refs


def _add_references(refs: ReferenceSet, key: ImageId, name: str | None, caps: list[str], where: str) -> None:
    if not caps:
        raise InputError(f"{where}: an empty list of captions")
    if name is not None:
        if not isinstance(name, str):
            raise InputError(f"{where}: the image name must be a string, got {type(name).__name__}")
        known = refs.file_names.get(key)
        if known is not None and os.path.normpath(known) != os.path.normpath(name):
            raise InputError(f"{where}: images {known!r} and {name!r} both get the id {key!r} "
                             f"(ids come from file names; give each image a unique name or an image_id)")
        refs.file_names[key] = name
    refs.captions.setdefault(key, []).extend(caps)


def _references_from_coco(path: Path, data: dict[str, Any], lines: list[int] | None = None) -> ReferenceSet:
    images = data.get("images") or []
    anns = data["annotations"]
    if not isinstance(anns, list) or not isinstance(images, list):
        raise InputError(f"{path}: 'annotations' and 'images' must be lists (COCO caption format)")
    by_image: dict[ImageId, list[str]] = {}
    for i, ann in enumerate(anns):
        if not isinstance(ann, dict) or "image_id" not in ann or not isinstance(ann.get("caption"), str):
            raise InputError(f"{path}: annotation {i}: needs 'image_id' and a string 'caption'")
        by_image.setdefault(image_key(ann["image_id"]), []).append(ann["caption"])
    refs = ReferenceSet({}, {}, str(path))
    # COCOEvalCap's order: the images list (pycocotools getImgIds), captions in annotation order
    for i, img in enumerate(images):
        if not isinstance(img, dict) or "id" not in img:
            raise InputError(f"{path}: image {i}: needs an 'id'")
        key = image_key(img["id"])
        if key in by_image:
            refs.captions[key] = by_image.pop(key)
            if isinstance(img.get("file_name"), str):
                refs.file_names[key] = img["file_name"]
    refs.captions.update(by_image)  # annotations of images the 'images' list does not name
    return refs


def read_references(path: str | os.PathLike) -> dict[ImageId, list[str]]:
    """Reference captions by image id (:func:`image_key`), images in file order.

    Formats: a COCO caption annotation JSON (``images`` + ``annotations``); a JSON list or JSON Lines
    of ``{"image" or "image_id" or "file_name", "captions": [...]}`` (one ``"caption"`` per line also
    works; lines of one image are merged), which covers ``karpathy_test_refs.json``; or a JSON object
    ``{file name: [captions]}``.
    """
    return load_references(path).captions


# format name (detect_references_format) -> reader(path, parsed data, line numbers or None)
_REFERENCE_READERS = {"coco": _references_from_coco, "mapping": _references_from_mapping,
                      "records": _references_from_records,
                      "karpathy": lambda path, data, lines: references_from_dataset(karpathy_from_data(data, path, "test"))}


# ---------------------------------------------------------------------------------------------
# predictions
# ---------------------------------------------------------------------------------------------

@dataclass
class Prediction:
    """One generated caption as read from a file (``where`` is ``file:line`` for messages)."""

    caption: str | None
    image_id: ImageId | None = None
    image: str | None = None
    where: str = ""

    @property
    def key(self) -> ImageId:
        return image_key(self.image_id if self.image_id is not None else self.image)  # type: ignore[arg-type]


def _prediction_from_record(rec: Any, where: str) -> Prediction:
    if not isinstance(rec, dict):
        raise InputError(f"{where}: expected an object with 'caption' and 'image' (or 'image_id'), "
                         f"got {type(rec).__name__}")
    if "caption" not in rec:
        raise InputError(f"{where}: no 'caption' field (fields: {', '.join(map(str, rec)) or 'none'})")
    caption = rec["caption"]
    if caption is not None and not isinstance(caption, str):
        raise InputError(f"{where}: 'caption' must be a string, got {type(caption).__name__}")
    image_id = rec.get("image_id")
    image = rec.get("image", rec.get("file_name"))
    if image_id is None and image is None:
        raise InputError(f"{where}: no 'image' (path) or 'image_id' field")
    try:
        image_id = image_key(image_id) if image_id is not None else None
    except TypeError as e:
        raise InputError(f"{where}: bad 'image_id' {image_id!r}: {e}") from e
    if image is not None and not isinstance(image, str):
        raise InputError(f"{where}: 'image' must be a path string, got {type(image).__name__}")
    return Prediction(caption=caption, image_id=image_id, image=image, where=where)


def load_predictions(path: str | os.PathLike) -> list[Prediction]:
    """Read generated captions, keeping where each came from (for matching and messages).

    Formats (what ``capdec caption`` writes, and more): JSON Lines ``{"image": path, "caption": ...}``
    (or ``"image_id"``); a COCO results JSON list ``[{"image_id": ..., "caption": ...}]``; a CSV with a
    header ``image,caption`` (or ``image_id,caption``). A ``"caption": null`` line (an image the
    captioner could not read) is kept with ``caption=None``.
    """
    path = Path(path)
    text = read_text(path)
    if path.suffix.lower() in (".csv", ".tsv"):
        return _load_predictions_csv(path, text)
    data, lines = parse_json_or_jsonl(path, text)
    if isinstance(data, dict):
        # a COCO results file wrapped as {"annotations": [...]}, or a one-line JSONL file
        data, lines = (data["annotations"], None) if "annotations" in data else ([data], lines)
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a list of {{'image_id', 'caption'}} objects or JSON Lines, "
                         f"got a JSON {type(data).__name__}")
    preds = [_prediction_from_record(rec, location(path, i, lines)) for i, rec in enumerate(data)]
    if not preds:
        raise InputError(f"{path}: no predictions in the file")
    return preds


def _load_predictions_csv(path: Path, text: str) -> list[Prediction]:
    dialect = "excel-tab" if path.suffix.lower() == ".tsv" else "excel"
    reader = csv.DictReader(text.splitlines(), dialect=dialect)
    fields = reader.fieldnames or []
    if "caption" not in fields or not ({"image", "image_id", "file_name"} & set(fields)):
        raise InputError(f"{at_line(path, 1)}: a CSV of predictions needs a header with 'caption' and "
                         f"'image' (or 'image_id'); found {fields}")
    preds = []
    for row in reader:
        rec = {"caption": row.get("caption")}
        rec.update({k: row[k] for k in ("image", "image_id", "file_name") if row.get(k)})
        preds.append(_prediction_from_record(rec, at_line(path, reader.line_num)))
    if not preds:
        raise InputError(f"{path}: no predictions in the file")
    return preds


def read_predictions(path: str | os.PathLike) -> dict[ImageId, str]:
    """Generated captions by image id (:func:`image_key`); null captions are left out.

    Two predictions for one image are an error naming both lines.
    """
    out: dict[ImageId, str] = {}
    seen: dict[ImageId, str] = {}
    for p in load_predictions(path):
        key = p.key
        if key in seen:
            raise InputError(f"{p.where}: a second prediction for image {key!r} (first at {seen[key]})")
        seen[key] = p.where
        if p.caption is not None:
            out[key] = p.caption
    return out


# ---------------------------------------------------------------------------------------------
# image id maps and image/caption pairs
# ---------------------------------------------------------------------------------------------

def read_image_ids(path: str | os.PathLike) -> dict[str, Any]:
    """A mapping file name -> image id, from

    - a COCO annotation JSON (``{"images": [{"id", "file_name"}, ...]}``),
    - a JSON object ``{"file_name": id, ...}`` or list ``[{"file_name"/"image", "image_id"/"id"}, ...]``,
    - a CSV/TSV file with two columns ``file_name,image_id`` (a header row is allowed).

    Keys are file names as written (matched against the full path, then the base name).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"image id map {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    mapping: dict[str, Any] = {}
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{path} is not valid JSON: {e}") from e
        rows = data.get("images") if isinstance(data, dict) and "images" in data else data
        if isinstance(rows, dict):
            mapping = {str(k): v for k, v in rows.items()}
        elif isinstance(rows, list):
            for n, row in enumerate(rows):
                name = row.get("file_name", row.get("image")) if isinstance(row, dict) else None
                image_id = row.get("image_id", row.get("id")) if isinstance(row, dict) else None
                if name is None or image_id is None:
                    raise InputError(f"{path}: entry {n} needs 'file_name' (or 'image') and 'id' (or 'image_id')")
                mapping[str(name)] = image_id
        else:
            raise InputError(f"{path}: expected a JSON object or list mapping file names to image ids")
    else:
        dialect = "excel-tab" if "\t" in text.split("\n", 1)[0] else "excel"
        for lineno, row in enumerate(csv.reader(text.splitlines(), dialect=dialect), 1):
            if not row or not "".join(row).strip():
                continue
            if len(row) < 2:
                raise InputError(f"{at_line(path, lineno)}: expected two columns 'file_name,image_id'")
            name, image_id = row[0].strip(), row[1].strip()
            if lineno == 1 and not image_id.lstrip("-").isdigit() and image_id.lower() in ("image_id", "id"):
                continue  # header
            mapping[name] = int(image_id) if image_id.lstrip("-").isdigit() else image_id
    if not mapping:
        raise InputError(f"{path} maps no file names to image ids")
    return mapping


def read_pairs(source: str | os.PathLike, *, captions: str | os.PathLike | None = None,
               images_root: str | os.PathLike | None = None,
               split: str | None = None) -> tuple[list[Path], list[list[str]]]:
    """Paired images and captions: ``(image paths, captions of each image)``.

    ``source`` is either a JSON Lines file of ``{"image": path, "caption": str}`` (or ``"captions":
    [...]``; relative paths are under ``images_root``, default the file's folder), or a folder of
    images with ``captions`` a file mapping file names to caption(s): ``{file name: [captions]}``, a
    COCO caption annotation JSON, or JSON Lines (any format :func:`read_references`
    reads). Every file is checked to exist before any model is loaded.

    ``source`` may also be a Karpathy-split file (``dataset_coco.json``): the images of ``split``
    (default ``val``) found under ``images_root`` (as ``filepath/filename``), with their captions; images
    missing there are skipped with a warning.
    """
    source = Path(source)
    if source.is_dir():
        if captions is None:
            raise InputError(f"{source} is a folder: also give the captions file (--captions) that maps "
                             f"its file names to captions")
        refs = load_references(captions)
        aliases = refs.alias_table()
        paths, caps = [], []
        unmatched = []
        for p in list_images(source, recursive=False):
            key = aliases[p.name] if p.name in aliases else image_key(p.name)
            if key in refs.captions:
                paths.append(p)
                caps.append(list(refs.captions[key]))
            else:
                unmatched.append(p.name)
        if unmatched:
            logger.warning("%d images in %s have no captions in %s and are not used (e.g. %s)",
                           len(unmatched), source, captions, unmatched[0])
        if not paths:
            raise InputError(f"no image in {source} has captions in {captions} (matched by file name or "
                             f"COCO id)")
        return paths, caps

    if captions is not None:
        raise InputError(f"--captions is for a folder of images; {source} is a pairs file")
    text = read_text(source)
    data, lines = parse_json_or_jsonl(source, text)
    if json_kind(data) == "karpathy":
        return _dataset_pairs(karpathy_from_data(data, source, split or "val"), images_root)
    if split is not None:
        raise InputError(f"--split selects images of a Karpathy-split file; {source} is a pairs file")
    records = [data] if isinstance(data, dict) else data
    if not isinstance(records, list):
        raise InputError(f"{source}: expected JSON Lines of {{'image': path, 'caption': text}}")
    root = Path(images_root) if images_root is not None else source.parent
    order: dict[Path, int] = {}
    paths, caps = [], []
    for i, rec in enumerate(records):
        where = location(source, i, lines)
        if not isinstance(rec, dict) or not isinstance(rec.get("image"), str):
            raise InputError(f"{where}: expected an object with an 'image' path and a 'caption'")
        value = rec.get("captions", rec.get("caption"))
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value or not all(isinstance(c, str) and c.strip() for c in value):
            raise InputError(f"{where}: 'caption' must be a non-empty string (or 'captions' a list of them)")
        path = Path(rec["image"]).expanduser()
        path = path if path.is_absolute() else root / path
        if not path.is_file():
            raise InputError(f"{where}: image file not found: {path}")
        if path in order:  # several lines for one image: one image, several pairs
            caps[order[path]].extend(value)
        else:
            order[path] = len(paths)
            paths.append(path)
            caps.append(list(value))
    if not paths:
        raise InputError(f"{source}: no image/caption pairs in the file")
    return paths, caps


def _dataset_pairs(ds: Dataset, images_root: str | os.PathLike | None) -> tuple[list[Path], list[list[str]]]:
    if images_root is None:
        raise InputError(f"{ds.path} is a Karpathy-split file: give --images-root DIR, the folder its images "
                         "are under (as DIR/filepath/filename)")
    root = Path(images_root)
    paths, caps, missing = [], [], []
    for img in ds.images:
        path = root / img.relpath
        if not path.is_file():
            missing.append(str(path))
        elif img.sentences:
            paths.append(path)
            caps.append(list(img.sentences))
    if missing:
        logger.warning("%d of the %d images of the %r split are not under %s and are skipped (e.g. %s)",
                       len(missing), len(ds), ds.split, root, missing[0])
    if not paths:
        raise InputError(f"none of the {len(ds)} images of the {ds.split!r} split of {ds.path} is under {root}")
    return paths, caps


# ---------------------------------------------------------------------------------------------
# captioned-image datasets: (image path, image id, captions)
# ---------------------------------------------------------------------------------------------
# Everything that needs images *with* their captions calls read_image_dataset: image-embedding stores
# (capdec embed --modality image) and the test splits of experiments (capdec sweep --test, capdec
# experiment). Formats (from the content unless format= says otherwise):
#   coco      a COCO caption annotation file (images[] with id + file_name, annotations[]); one split
#   refs      a JSON list of {"file_name" or "image", "image_id"?, "captions": [...]} (karpathy_test_refs.json)
#   jsonl     JSON Lines of {"image", "caption"} or {"image", "captions": [...]}, optional image_id and
#             split; several lines may name the same image (their captions are joined)
#   karpathy  dataset_coco.json / dataset_flickr30k.json (read by karpathy_from_data: split train = train +
#             restval, the default as for caption corpora; val, test, all; images at images_root/filepath/filename)
# Relative image paths are under images_root (default: the dataset file's folder), falling back to the
# base name directly under it; missing or unreadable images are skipped later, by the image loader.

def _clean(text: str) -> str:
    return " ".join(text.split())


DATASET_FORMATS = ("coco", "refs", "jsonl", "karpathy")


@dataclass
class ImageRecord:
    """One image of a dataset and its captions (normalised, non-empty)."""

    image: str  # path of the image file (resolved against images_root)
    image_id: Any  # the dataset's id (COCO id), else the file name as written
    captions: list[str]


@dataclass
class ImageDataset:
    records: list[ImageRecord]
    path: str  # the dataset file
    format: str
    split: str | None
    images_root: str
    skipped: dict[str, int] = field(default_factory=dict)  # images left out, by reason (e.g. no captions)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def n_captions(self) -> int:
        return sum(len(r.captions) for r in self.records)

    def references(self) -> list[list[str]]:
        return [r.captions for r in self.records]

    def describe(self) -> dict[str, Any]:
        return {"path": self.path, "format": self.format, "split": self.split, "images_root": self.images_root,
                "images": len(self), "captions": self.n_captions, "skipped": dict(self.skipped)}


def _resolve(name: str, root: Path) -> str:
    p = Path(os.path.expanduser(name))
    if p.is_absolute():
        return str(p)
    if not (root / p).exists() and (root / p.name).exists():
        return str(root / p.name)
    return str(root / p)


def detect_dataset_format(path: Path) -> tuple[str, Any]:
    """The format of ``path`` and, for a .json file, its parsed content (read once)."""
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        return "jsonl", None
    if path.suffix.lower() != ".json":
        raise InputError(f"{path}: a captioned-image dataset is a COCO/Karpathy .json, a JSON list of "
                         f"{{file_name, captions}} or a .jsonl of {{image, caption}}; pass format= otherwise")
    data = read_json(path)
    if isinstance(data, dict) and isinstance(data.get("images"), list):
        first = data["images"][0] if data["images"] else {}
        if isinstance(first, dict) and "sentences" in first:
            return "karpathy", data
        if "annotations" in data:
            return "coco", data
    if isinstance(data, list):
        return "refs", data
    keys = ", ".join(map(repr, data)) if isinstance(data, dict) else type(data).__name__
    raise InputError(f"{path}: not a captioned-image dataset (found {keys}); expected a COCO annotation file "
                     f"(images + annotations), a Karpathy split file, or a JSON list of {{file_name, captions}}")


def _no_split(fmt: str, split: str | None, path: Path) -> None:
    if split not in (None, "all"):
        raise InputError(f"{path}: a {fmt} file has no splits (it is one split); drop --split {split}")


def _read_coco(path: Path, data: Any, root: Path, split: str | None) -> tuple[list[ImageRecord], dict[str, int]]:
    _no_split("COCO annotation", split, path)
    caps: dict[Any, list[str]] = {}
    for i, ann in enumerate(data.get("annotations") or []):
        if not isinstance(ann, dict) or "image_id" not in ann or not isinstance(ann.get("caption"), str):
            raise InputError(f"{path}: annotations[{i}] needs 'image_id' and a 'caption' string")
        text = _clean(ann["caption"])
        if text:
            caps.setdefault(ann["image_id"], []).append(text)
    records, skipped = [], {}
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or "id" not in im or not isinstance(im.get("file_name"), str):
            raise InputError(f"{path}: images[{i}] needs 'id' and a 'file_name' string")
        if im["id"] not in caps:
            skipped["no_captions"] = skipped.get("no_captions", 0) + 1
            continue
        records.append(ImageRecord(_resolve(im["file_name"], root), im["id"], caps[im["id"]]))
    return records, skipped


def _read_refs(path: Path, data: Any, root: Path, split: str | None) -> tuple[list[ImageRecord], dict[str, int]]:
    _no_split("reference list", split, path)
    records = []
    for i, row in enumerate(data):
        name = row.get("file_name", row.get("image")) if isinstance(row, dict) else None
        captions = row.get("captions") if isinstance(row, dict) else None
        if not isinstance(name, str) or not isinstance(captions, list):
            raise InputError(f"{path}: entry {i} needs 'file_name' (or 'image') and a 'captions' list")
        texts = [_clean(c) for c in captions if isinstance(c, str) and _clean(c)]
        records.append(ImageRecord(_resolve(name, root), row.get("image_id", name), texts))
    return records, {}


def _read_jsonl(path: Path, data: Any, root: Path, split: str | None) -> tuple[list[ImageRecord], dict[str, int]]:
    rows, lines = parse_json_or_jsonl(path, read_text(path))
    if lines is None:
        raise InputError(f"{path}: expected JSON Lines (one {{image, caption}} object per line), got one JSON document")
    by_image: dict[str, ImageRecord] = {}
    skipped: dict[str, int] = {}
    for i, row in enumerate(rows):
        where = location(path, i, lines)
        if not isinstance(row, dict) or not isinstance(row.get("image"), str):
            raise InputError(f"{where}: expected an object with an 'image' path and a 'caption' (or 'captions' list)")
        if "caption" in row:
            texts = [row["caption"]]
        elif isinstance(row.get("captions"), list):
            texts = row["captions"]
        else:
            raise InputError(f"{where}: no 'caption' string or 'captions' list")
        if not all(isinstance(t, str) for t in texts):
            raise InputError(f"{where}: captions must be strings")
        if split not in (None, "all"):
            if "split" not in row:
                raise InputError(f"{where}: --split {split} given but the record has no 'split' field")
            if row["split"] != split:
                skipped["other_split"] = skipped.get("other_split", 0) + 1
                continue
        rec = by_image.setdefault(row["image"], ImageRecord(_resolve(row["image"], root),
                                                            row.get("image_id", row["image"]), []))
        rec.captions.extend(t for t in map(_clean, texts) if t)
    records = [r for r in by_image.values() if r.captions]
    if len(records) < len(by_image):
        skipped["no_captions"] = len(by_image) - len(records)
    return records, skipped


def _read_karpathy(path: Path, data: Any, root: Path, split: str | None) -> tuple[list[ImageRecord], dict[str, int]]:
    # the Karpathy reader above decides splits (train = train + restval) and ids (cocoid, numeric stem, name)
    ds = karpathy_from_data(data, path, split or "train")  # the default of capdec embed's text corpora too
    records = [ImageRecord(_resolve(img.relpath, root), img.image_id, [t for t in map(_clean, img.sentences) if t])
               for img in ds.images]
    kept = [r for r in records if r.captions]
    return kept, ({"no_captions": len(records) - len(kept)} if len(kept) < len(records) else {})


_READERS = {"coco": _read_coco, "refs": _read_refs, "jsonl": _read_jsonl, "karpathy": _read_karpathy}


def read_image_dataset(path: str | os.PathLike, *, split: str | None = None,
                       images_root: str | os.PathLike | None = None, format: str = "auto") -> ImageDataset:
    """Read a captioned-image dataset (see the module docstring); images without captions are left out."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such dataset file")
    if format != "auto" and format not in DATASET_FORMATS:
        raise InputError(f"unknown dataset format {format!r}; use auto or one of {', '.join(DATASET_FORMATS)}")
    if format == "auto":
        fmt, data = detect_dataset_format(path)
    else:
        fmt, data = format, None if format == "jsonl" else read_json(path)
    root = Path(images_root) if images_root is not None else path.parent
    if images_root is not None and not root.is_dir():
        raise InputError(f"--images-root {root}: no such directory")
    records, skipped = _READERS[fmt](path, data, root, split)
    if not records:
        raise InputError(f"{path}: no captioned images{f' in split {split!r}' if split else ''}")
    return ImageDataset(records=records, path=str(path), format=fmt, split=split, images_root=str(root),
                        skipped=skipped)


