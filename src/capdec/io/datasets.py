"""Captioned-image datasets: one record type (:class:`CaptionedImage`) and the standard files that hold them.

- **COCO caption annotations** (``captions_val2017.json``): read here and only here
  (:func:`read_coco`), for corpora (annotation order), references and image datasets (images order)
  and image id maps;
- **Karpathy splits** (:func:`read_karpathy`);
- **FlickrStyle10K** (:func:`read_flickrstyle`).

A split of a dataset is an :class:`ImageDataset`, a sequence of :class:`CaptionedImage` (a list, or the
compact :class:`PackedImages` that :func:`capdec.io.image_datasets.read_image_dataset` builds); the other
inputs that pair images with captions (``capdec embed --modality image``, experiment test splits,
calibration pairs) are read into the same types by :mod:`capdec.io.image_datasets`.

**Karpathy split** (``dataset_coco.json``, ``dataset_flickr30k.json``, ``dataset_flickr8k.json``: the
files every captioning paper uses)::

    {"dataset": "coco", "images": [{"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg",
      "split": "train" | "restval" | "val" | "test", "cocoid": 391895, "imgid": 0,
      "sentences": [{"raw": "A man with a red helmet ...", "tokens": [...], ...}, ...]}, ...]}

Splits: ``train`` is train + restval (the standard training set, 113,287 COCO images), ``restval``
alone, ``val``, ``test`` and ``all``. An image's **id** is its ``cocoid`` when the file has one (COCO);
otherwise the file name's stem as an integer when it is all digits (Flickr30k's ``1000092795.jpg`` ->
1000092795), else the file name itself (Flickr8k's ``1000268201_693b08cb0e.jpg``). The same rule is
used for predictions (``capdec caption --dataset``) and references (``capdec evaluate --split``), so the
two always match. An image's file is ``filepath/filename`` under the images root (``filename`` alone
when there is no ``filepath``, as in Flickr30k).

**FlickrStyle10K** (``FlickrStyle_v0.9``): one styled caption per line in ``humor/funny_train.txt`` or
``romantic/romantic_train.txt``, and the image names of those lines, in the same order, in the
folder's ``train.p`` (a Python pickle of a list of file names). The pickle is read with an unpickler
that refuses every global, so it can only yield plain data (a list of strings needs none); a plain
text list (one name per line) works too. The caption files are mostly UTF-8 with some Latin-1 lines;
such lines are decoded as Latin-1 and counted in the log. FlickrStyle10K has no official split: the
images are used in file order and ``--style-test N`` holds out the last N (a common protocol trains on
6,000 and tests on 1,000, see docs/reproduce.md).
"""

from __future__ import annotations

import array
import io
import logging
import marshal
import os
import pickle
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import numpy as np

from capdec.errors import InputError
from capdec.io.text import decode_text, describe_json, read_json

logger = logging.getLogger(__name__)

SPLITS = ("train", "restval", "val", "test", "all")
KARPATHY_SPLITS = ("train", "restval", "val", "test")  # the values of an image's "split" field


@dataclass
class CaptionedImage:
    """One image and its captions: the input layer's one record for it, whatever file it came from."""

    image_id: Any  # the dataset's id: a COCO id; Karpathy's cocoid, numeric file stem or file name; ...
    file: str  # the image file as the dataset names it (relative to its images root; "" if it names none);
    # a path resolved against the images root in an ImageDataset whose images_root is set
    captions: list[str] = field(default_factory=list)
    split: str = ""  # the dataset's split label ("" when it has none)


class PackedImages(Sequence[CaptionedImage]):
    """Captioned images held as bytes, a read-only sequence of :class:`CaptionedImage` decoded on access.

    A million images with five captions each hold about their text's size (each image's id, file and split
    as one record, each piece of captions as one list, :mod:`marshal`-encoded (this process's own bytes, never
    a file) in two byte buffers with int64 offsets),
    not a million dataclasses of Python strings (7x that). An image's captions may come in several pieces
    (JSON Lines that name an image on several lines): ``pieces`` lists them image by image, in the order
    they were added. Build one with :class:`ImagePacker`; a slice shares the buffers.
    """

    def __init__(self, meta: bytearray, meta_ends: np.ndarray, caps: bytearray, cap_ends: np.ndarray,
                 pieces: np.ndarray, piece_ends: np.ndarray, counts: np.ndarray, rows: np.ndarray):
        self._meta, self._meta_ends, self._caps, self._cap_ends = meta, meta_ends, caps, cap_ends
        self._pieces, self._piece_ends, self._counts, self._rows = pieces, piece_ends, counts, rows

    def __len__(self) -> int:
        return len(self._rows)

    @overload
    def __getitem__(self, index: int) -> CaptionedImage: ...
    @overload
    def __getitem__(self, index: slice) -> PackedImages: ...

    def __getitem__(self, index: int | slice) -> CaptionedImage | PackedImages:
        if isinstance(index, slice):
            return PackedImages(self._meta, self._meta_ends, self._caps, self._cap_ends, self._pieces,
                                self._piece_ends, self._counts, self._rows[index])
        n = len(self._rows)
        if not -n <= index < n:
            raise IndexError(f"image {index} of {n}")
        return self._record(int(self._rows[index]))

    def __iter__(self) -> Iterator[CaptionedImage]:
        for r in self._rows.tolist():
            yield self._record(r)

    def _record(self, r: int) -> CaptionedImage:
        lo = int(self._meta_ends[r - 1]) if r else 0
        image_id, file, split = marshal.loads(self._meta[lo:int(self._meta_ends[r])])
        captions: list[str] = []
        for p in self._pieces[int(self._piece_ends[r - 1]) if r else 0:int(self._piece_ends[r])].tolist():
            captions += marshal.loads(self._caps[int(self._cap_ends[p - 1]) if p else 0:int(self._cap_ends[p])])
        return CaptionedImage(image_id, file, captions, split)

    def n_captions(self) -> int:
        return int(self._counts[self._rows].sum())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str | bytes):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"PackedImages({len(self)} images, {self.n_captions()} captions)"


class ImagePacker:
    """Builds :class:`PackedImages` record by record: :meth:`add_image` (its id: a JSON value or a tuple), then
    :meth:`add_captions` for it once or several times, in any order with other images'."""

    def __init__(self) -> None:
        self._meta, self._caps = bytearray(), bytearray()
        self._meta_ends, self._cap_ends, self._piece_image = array.array("q"), array.array("q"), array.array("q")
        self._counts = array.array("q")

    def add_image(self, image_id: Any, file: str, split: str = "") -> int:
        """Add an image (no captions yet); returns its index."""
        self._meta += marshal.dumps((image_id, file, split))
        self._meta_ends.append(len(self._meta))
        self._counts.append(0)
        return len(self._counts) - 1

    @property
    def n_images(self) -> int:
        return len(self._counts)

    def add_captions(self, index: int, captions: list[str]) -> None:
        """Append ``captions`` to image ``index``'s."""
        if captions:
            self._caps += marshal.dumps(captions)
            self._cap_ends.append(len(self._caps))
            self._piece_image.append(index)
            self._counts[index] += len(captions)

    def finish(self) -> PackedImages:
        """The images that have captions, in the order they were added (the buffers move into the result)."""
        counts = np.frombuffer(self._counts, dtype=np.int64)
        owner = np.frombuffer(self._piece_image, dtype=np.int64)
        pieces = np.argsort(owner, kind="stable")  # each image's pieces together, in the order they came
        piece_ends = np.cumsum(np.bincount(owner, minlength=len(counts)))
        return PackedImages(self._meta, np.frombuffer(self._meta_ends, dtype=np.int64), self._caps,
                            np.frombuffer(self._cap_ends, dtype=np.int64), pieces, piece_ends, counts,
                            np.flatnonzero(counts))


@dataclass
class ImageDataset:
    """The captioned images of one split of a dataset file, in file order."""

    images: Sequence[CaptionedImage]  # a list, or PackedImages (read_image_dataset's: memory ~ the text's bytes)
    path: str  # the dataset file
    format: str  # coco, karpathy, flickrstyle, refs, jsonl
    split: str | None
    name: str = ""  # a Karpathy file's "dataset" (coco, flickr30k, ...), "flickrstyle", else the file's stem
    images_root: str | None = None  # set when each image's file is a path resolved against this folder
    skipped: dict[str, int] = field(default_factory=dict)  # images left out, by reason (e.g. no captions)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def n_captions(self) -> int:
        if isinstance(self.images, PackedImages):
            return self.images.n_captions()
        return sum(len(im.captions) for im in self.images)

    def captions(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """(caption, metadata) for every caption of every image, in file order (a caption corpus)."""
        for img in self.images:
            for i, caption in enumerate(img.captions):
                yield caption, {"image_id": img.image_id, "sentence": i}

    def describe(self) -> dict[str, Any]:
        return {"path": self.path, "format": self.format, "split": self.split, "images_root": self.images_root,
                "images": len(self), "captions": self.n_captions, "skipped": dict(self.skipped)}


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


# -- COCO caption annotations ----------------------------------------------------------------------

@dataclass
class CocoCaptions:
    """A COCO caption annotation file, checked: ``annotations`` (objects with a string ``caption``) and
    ``images`` (objects with an ``id``; [] when the file lists none), both in file order."""

    path: Path
    annotations: list[dict[str, Any]]
    images: list[dict[str, Any]]

    def captions(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """(caption, {image_id, id}) of every annotation, in annotation order (a caption corpus)."""
        for ann in self.annotations:
            yield ann["caption"], {k: ann[k] for k in ("image_id", "id") if k in ann}

    def captioned_images(self, *, listed_only: bool = False) -> list[CaptionedImage]:
        """The images with their captions (in annotation order): every image of the ``images`` list, in
        its order (as COCOEvalCap, pycocotools ``getImgIds``, orders them; an image listed twice gets its
        captions once), then images that only annotations name (left out with ``listed_only``)."""
        by_image: dict[Any, list[str]] = {}
        for i, ann in enumerate(self.annotations):
            if "image_id" not in ann:
                raise InputError(f"{self.path}: annotations[{i}] has no 'image_id'")
            by_image.setdefault(check_image_id(ann["image_id"], f"{self.path}: annotations[{i}]"), []).append(ann["caption"])
        out = []
        for img in self.images:
            out.append(CaptionedImage(img["id"], img.get("file_name", ""), by_image.pop(img["id"], [])))
        if not listed_only:
            out.extend(CaptionedImage(image_id, "", caps) for image_id, caps in by_image.items())
        return out

    def file_names(self) -> dict[str, Any]:
        """file name -> image id, from the ``images`` list."""
        return {img["file_name"]: img["id"] for img in self.images if img.get("file_name")}


def read_coco(data: Any, path: str | os.PathLike, *, annotations: bool = True, hint: str = "") -> CocoCaptions:
    """Check a parsed COCO caption annotation file (``path`` names it in errors). It needs an
    ``annotations`` list, or with ``annotations=False`` an ``images`` list (an image-info file such as
    ``image_info_test2014.json``); ``hint`` ends the error for a file that is not COCO."""
    path = Path(path)
    needed = "annotations" if annotations else "images"
    if not isinstance(data, dict) or not isinstance(data.get(needed), list):
        raise InputError(f"{path}: neither a COCO caption annotation file (no {needed!r} list) nor a "
                         f"Karpathy-split file (no 'images' with 'sentences'); found {describe_json(data)}{hint}")
    anns, images = data.get("annotations", []), data.get("images", [])
    if not isinstance(anns, list) or not isinstance(images, list):
        raise InputError(f"{path}: 'annotations' and 'images' must be lists (COCO caption format)")
    for i, ann in enumerate(anns):
        if not isinstance(ann, dict) or "caption" not in ann:
            raise InputError(f"{path}: annotations[{i}] has no 'caption' field")
        if not isinstance(ann["caption"], str):
            raise InputError(f"{path}: annotations[{i}] (id {ann.get('id')}): 'caption' is not a string")
    for i, img in enumerate(images):
        if not isinstance(img, dict) or "id" not in img:
            raise InputError(f"{path}: images[{i}] has no 'id'")
        check_image_id(img["id"], f"{path}: images[{i}]")
        if not isinstance(img.get("file_name", ""), str):
            raise InputError(f"{path}: images[{i}]: 'file_name' must be a string")
    return CocoCaptions(path, anns, images)


def check_image_id(value: Any, where: str) -> Any:
    """An image id read from JSON: a number or a string (not a bool, list, object or null)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise InputError(f"{where}: an image id must be a number or a string, not a JSON {type(value).__name__}")
    return value


# -- Karpathy splits -------------------------------------------------------------------------------

def check_split(split: str) -> str:
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}; use one of {', '.join(SPLITS)} (train includes restval)")
    return split


def _karpathy_id(img: dict[str, Any]) -> int | str:
    if isinstance(img.get("cocoid"), int):
        return img["cocoid"]
    stem = img["filename"].rsplit(".", 1)[0]
    return int(stem) if re.fullmatch(r"[0-9]{1,64}", stem, re.ASCII) else img["filename"]


def karpathy_from_data(data: Any, path: str | os.PathLike, split: str = "all") -> ImageDataset:
    """The images of ``split`` from a parsed Karpathy-split document (errors name ``path``)."""
    check_split(split)
    if json_kind(data) != "karpathy":
        raise InputError(f"{path}: not a Karpathy-split file (an 'images' list whose entries have 'filename', "
                         f"'split' and 'sentences'); found {describe_json(data)}")
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
        image_id = _karpathy_id(img)
        if image_id in seen:
            raise InputError(f"{where} ({img['filename']}): image id {image_id!r} repeats images[{seen[image_id]}]")
        seen[image_id] = i
        file = f"{img['filepath']}/{img['filename']}" if img.get("filepath") else img["filename"]
        images.append(CaptionedImage(image_id, file, _raw_sentences(img, where), split=img["split"]))
    if not images:
        have = ", ".join(f"{k} {v}" for k, v in counts.items() if v) or "no images"
        raise InputError(f"{path}: the {split!r} split has no images ({have})")
    name = data.get("dataset") if isinstance(data.get("dataset"), str) else Path(path).stem
    logger.info("%s: %s split of %s, %d images, %d captions", path, split, name, len(images),
                sum(len(im.captions) for im in images))
    return ImageDataset(images, path=str(path), format="karpathy", split=split, name=name)


def _raw_sentences(img: dict[str, Any], where: str) -> list[str]:
    sentences = img["sentences"]
    if not isinstance(sentences, list):
        raise InputError(f"{where} ({img['filename']}): 'sentences' must be a list")
    raws = []
    for j, s in enumerate(sentences):
        raw = s.get("raw") if isinstance(s, dict) else None
        if not isinstance(raw, str):
            raise InputError(f"{where} ({img['filename']}): sentences[{j}] has no string 'raw' field")
        raws.append(raw)
    return raws


def read_karpathy(path: str | os.PathLike, split: str = "all") -> ImageDataset:
    """Read the images (ids, files, captions) of one split of a Karpathy-split JSON file."""
    check_split(split)
    return karpathy_from_data(read_json(path), path, split)


# -- FlickrStyle10K --------------------------------------------------------------------------------

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
            raise InputError(f"{path}: not a pickled list of image names ({type(e).__name__}: "
                             f"{' '.join(str(e).split())[:200]})") from e
        if isinstance(names, (tuple, list)):
            names = [n.decode("utf-8") if isinstance(n, bytes) else n for n in names]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise InputError(f"{path}: expected a pickled list of file names, got {type(names).__name__}")
        return [n.strip() for n in names]
    text = decode_text(raw, path)
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
                     test_size: int = 0) -> ImageDataset:
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
    images: dict[str, CaptionedImage] = {}
    for name, line in zip(file_names, lines):
        images.setdefault(name, CaptionedImage(name, name, split="train")).captions.append(line)
    ordered = list(images.values())
    if not 0 <= test_size <= len(ordered):
        raise InputError(f"--style-test {test_size}: the file has {len(ordered)} images")
    if split != "all" and test_size == 0:
        raise InputError(f"split {split!r} of FlickrStyle10K needs the number of test images (--style-test N)")
    if test_size:
        for img in ordered[len(ordered) - test_size:]:
            img.split = "test"
    chosen = ordered if split == "all" else [im for im in ordered if im.split == split]
    return ImageDataset(chosen, path=str(captions), format="flickrstyle", split=split, name="flickrstyle")


__all__ = ["KARPATHY_SPLITS", "SPLITS", "CaptionedImage", "CocoCaptions", "ImageDataset", "ImagePacker",
           "PackedImages", "check_split", "find_style_names", "json_kind", "karpathy_from_data", "read_coco", "read_flickrstyle", "read_karpathy",
           "read_name_list", "read_style_lines"]
