"""Reference captions (``capdec evaluate``, calibration): by image id, with the file names that name each image.

:func:`detect_references_format` picks the reader of a parsed file (COCO annotations, a Karpathy-split
file, ``{file name: [captions]}``, records); add a format by recognising it there and adding a reader
to ``_REFERENCE_READERS``. A FlickrStyle10K caption file (``.txt``) reads through its dataset reader.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capdec.errors import InputError
from capdec.images import ImageId, basename, image_id_from_name, image_key
from capdec.io.datasets import (
    CaptionedImage,
    ImageDataset,
    json_kind,
    karpathy_from_data,
    read_coco,
    read_flickrstyle,
)
from capdec.io.text import location, parse_json_or_jsonl, read_text


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


def references_from_images(images: Iterable[CaptionedImage], source: str) -> ReferenceSet:
    """References keyed by :func:`~capdec.images.image_key` of each image's id, as predictions of
    ``capdec caption --dataset`` are."""
    refs = ReferenceSet({}, {}, source)
    for img in images:
        key = image_key(img.image_id)
        refs.captions[key] = list(img.captions)
        if img.file:
            refs.file_names[key] = img.file
    return refs


def references_from_dataset(ds: ImageDataset) -> ReferenceSet:
    """The references of a dataset split (Karpathy, FlickrStyle10K)."""
    refs = references_from_images(ds.images, ds.path)
    if not refs.captions:
        raise InputError(f"{ds.path}: no reference captions in the {ds.split!r} split")
    return refs


def _references_from_coco(path: Path, data: dict[str, Any], lines: list[int] | None = None) -> ReferenceSet:
    # COCOEvalCap's order: the images list (pycocotools getImgIds), captions in annotation order, then
    # the annotations of images the 'images' list does not name
    images = [img for img in read_coco(data, path).captioned_images() if img.captions]
    return references_from_images(images, str(path))


def read_references(path: str | os.PathLike) -> dict[ImageId, list[str]]:
    """Reference captions by image id (:func:`~capdec.images.image_key`), images in file order.

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


__all__ = ["ReferenceSet", "detect_references_format", "load_references", "read_references",
           "references_from_dataset", "references_from_images"]
