"""Captioned-image datasets: one reader from a dataset file to (image path, image id, captions).

Everything that needs images *with* their captions — image-embedding stores for the supervised
baseline (``capdec embed --modality image``), the test split of an experiment (``capdec sweep --test``,
``capdec experiment``) — calls :func:`read_image_dataset`. Formats (picked from the content unless
``format`` says otherwise):

- ``coco``: a COCO caption annotation file (``images[]`` with ``id`` and ``file_name``, ``annotations[]``
  with ``image_id`` and ``caption``); one file is one split, so ``split`` must be None or ``all``;
- ``refs``: a JSON list of ``{"file_name" or "image", "image_id"?, "captions": [...]}`` (e.g.
  ``karpathy_test_refs.json``);
- ``jsonl``: JSON Lines of ``{"image": path, "caption": text}`` or ``{"image", "captions": [...]}``, with
  optional ``image_id`` and ``split`` (several lines may name the same image; their captions are joined);
- ``karpathy`` (``dataset_coco.json`` / ``dataset_flickr30k.json``: ``images[]`` with ``sentences``): not
  read here yet — the Karpathy reader of the input layer is the one to plug in (see
  :func:`_read_karpathy`).

Image paths: absolute paths are kept; relative ones are under ``images_root`` (default: the dataset
file's directory), falling back to the base name directly under ``images_root`` when the relative path
does not exist there (a COCO ``file_name`` or a flat folder of images). Missing or unreadable images
are *not* checked here: the image loader skips and lists them when they are read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capdec.corpus import normalize_caption
from capdec.errors import InputError

FORMATS = ("coco", "refs", "jsonl", "karpathy")


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


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from e
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not valid UTF-8 ({e.reason}); re-encode the file as UTF-8") from e


def detect_format(path: Path) -> tuple[str, Any]:
    """The format of ``path`` and, for a .json file, its parsed content (read once)."""
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        return "jsonl", None
    if path.suffix.lower() != ".json":
        raise InputError(f"{path}: a captioned-image dataset is a COCO/Karpathy .json, a JSON list of "
                         f"{{file_name, captions}} or a .jsonl of {{image, caption}}; pass format= otherwise")
    data = _load_json(path)
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
        text = normalize_caption(ann["caption"])
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
        texts = [normalize_caption(c) for c in captions if isinstance(c, str) and normalize_caption(c)]
        records.append(ImageRecord(_resolve(name, root), row.get("image_id", name), texts))
    return records, {}


def _read_jsonl(path: Path, data: Any, root: Path, split: str | None) -> tuple[list[ImageRecord], dict[str, int]]:
    by_image: dict[str, ImageRecord] = {}
    skipped: dict[str, int] = {}
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from e
            if not isinstance(row, dict) or not isinstance(row.get("image"), str):
                raise InputError(f"{path}:{lineno}: expected an object with an 'image' path and a 'caption' "
                                 f"(or 'captions' list)")
            if "caption" in row:
                texts = [row["caption"]]
            elif isinstance(row.get("captions"), list):
                texts = row["captions"]
            else:
                raise InputError(f"{path}:{lineno}: no 'caption' string or 'captions' list")
            if not all(isinstance(t, str) for t in texts):
                raise InputError(f"{path}:{lineno}: captions must be strings")
            if split not in (None, "all"):
                if "split" not in row:
                    raise InputError(f"{path}:{lineno}: --split {split} given but the record has no 'split' field")
                if row["split"] != split:
                    skipped["other_split"] = skipped.get("other_split", 0) + 1
                    continue
            rec = by_image.setdefault(row["image"], ImageRecord(_resolve(row["image"], root),
                                                                row.get("image_id", row["image"]), []))
            rec.captions.extend(t for t in map(normalize_caption, texts) if t)
    records = [r for r in by_image.values() if r.captions]
    if len(records) < len(by_image):
        skipped["no_captions"] = len(by_image) - len(records)
    return records, skipped


def _read_karpathy(path: Path, data: Any, root: Path, split: str | None) -> tuple[list[ImageRecord], dict[str, int]]:
    # the one place a Karpathy split reader plugs in: it returns (image path, cocoid/imgid, raw sentences)
    raise InputError(f"{path}: Karpathy split files (dataset_coco.json) are not read as image datasets by this "
                     f"version yet; convert the split to JSONL {{image, caption}} or a COCO annotation file")


_READERS = {"coco": _read_coco, "refs": _read_refs, "jsonl": _read_jsonl, "karpathy": _read_karpathy}


def read_image_dataset(path: str | os.PathLike, *, split: str | None = None,
                       images_root: str | os.PathLike | None = None, format: str = "auto") -> ImageDataset:
    """Read a captioned-image dataset (see the module docstring); images without captions are left out."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such dataset file")
    if format != "auto" and format not in FORMATS:
        raise InputError(f"unknown dataset format {format!r}; use auto or one of {', '.join(FORMATS)}")
    if format == "auto":
        fmt, data = detect_format(path)
    else:
        fmt, data = format, None if format == "jsonl" else _load_json(path)
    root = Path(images_root) if images_root is not None else path.parent
    if images_root is not None and not root.is_dir():
        raise InputError(f"--images-root {root}: no such directory")
    records, skipped = _READERS[fmt](path, data, root, split)
    if not records:
        raise InputError(f"{path}: no captioned images{f' in split {split!r}' if split else ''}")
    return ImageDataset(records=records, path=str(path), format=fmt, split=split, images_root=str(root),
                        skipped=skipped)


def image_paths(dataset: ImageDataset) -> Sequence[str]:
    return [r.image for r in dataset.records]


__all__ = ["FORMATS", "ImageDataset", "ImageRecord", "image_paths", "read_image_dataset"]
