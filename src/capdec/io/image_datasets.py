"""Image files paired with captions or ids: captioned-image datasets, calibration pairs, image id maps.

**Captioned-image datasets** (:func:`read_image_dataset`): everything that needs images *with* their
captions reads them here: image-embedding stores (``capdec embed --modality image``) and the test
splits of experiments (``capdec sweep --test``, ``capdec experiment``). Formats (from the content unless
``format=`` says otherwise):

- ``coco``: a COCO caption annotation file (images[] with id + file_name, annotations[]); one split;
- ``refs``: a JSON list of ``{"file_name" or "image", "image_id"?, "captions": [...]}`` (``karpathy_test_refs.json``);
- ``jsonl``: JSON Lines of ``{"image", "caption"}`` or ``{"image", "captions": [...]}``, optional
  ``image_id`` and ``split``; several lines may name the same image (their captions are joined);
- ``karpathy``: ``dataset_coco.json`` / ``dataset_flickr30k.json`` (split train = train + restval, the
  default as for caption corpora; val, test, all; images at images_root/filepath/filename).

Relative image paths are under ``images_root`` (default: the dataset file's folder), falling back to
the base name directly under it; missing or unreadable images are skipped later, by the image loader.
Captions are whitespace-normalised and empty ones dropped; images left without captions are counted
in ``skipped``. The images are held packed (:class:`~capdec.io.datasets.PackedImages`: about their text's
bytes); JSON Lines are read line by line, so a dataset of millions of images never exists as Python objects.

**Calibration pairs** (:func:`read_pairs`, ``capdec calibrate``) and **image id maps**
(:func:`read_image_ids`, ``capdec caption --image-ids``).
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from capdec.errors import InputError
from capdec.images import image_key, list_images
from capdec.io.datasets import (
    CaptionedImage,
    ImageDataset,
    ImagePacker,
    check_image_id,
    json_kind,
    karpathy_from_data,
    read_coco,
)
from capdec.io.references import load_references
from capdec.io.text import (
    at_line,
    cut_caption,
    iter_json_lines,
    location,
    normalize_caption,
    parse_json_or_jsonl,
    read_json,
    read_text,
)

logger = logging.getLogger(__name__)

DATASET_FORMATS = ("coco", "refs", "jsonl", "karpathy")


def _resolve(name: str, root: Path) -> str:
    p = Path(os.path.expanduser(name))
    if p.is_absolute():
        return str(p)
    if not (root / p).exists() and (root / p.name).exists():
        return str(root / p.name)
    return str(root / p)


def _cleaned(captions: list[str]) -> list[str]:
    return [cut_caption(t) for t in map(normalize_caption, captions) if t]


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


# A reader returns the dataset's images (each with its key when lines naming the same key are one image, as in
# JSON Lines; None when every entry is its own image) and the counts of what it left out, filled as it goes.
Entries = Iterable[tuple[str | None, CaptionedImage]]


def _each(images: Iterable[CaptionedImage]) -> Entries:
    return ((None, img) for img in images)


def _read_coco(path: Path, data: Any, split: str | None) -> tuple[Entries, dict[str, int]]:
    _no_split("COCO annotation", split, path)
    images = read_coco(data, path).captioned_images(listed_only=True)
    for i, img in enumerate(images):
        if not img.file:
            raise InputError(f"{path}: images[{i}] needs 'id' and a 'file_name' string")
    return _each(images), {}


def _read_refs(path: Path, data: Any, split: str | None) -> tuple[Entries, dict[str, int]]:
    _no_split("reference list", split, path)
    images = []
    for i, row in enumerate(data):
        name = row.get("file_name", row.get("image")) if isinstance(row, dict) else None
        captions = row.get("captions") if isinstance(row, dict) else None
        if not isinstance(name, str) or not isinstance(captions, list):
            raise InputError(f"{path}: entry {i} needs 'file_name' (or 'image') and a 'captions' list")
        images.append(CaptionedImage(row.get("image_id", name), name, [c for c in captions if isinstance(c, str)]))
    return _each(images), {}


def _read_jsonl(path: Path, data: Any, split: str | None) -> tuple[Entries, dict[str, int]]:
    skipped: dict[str, int] = {}
    return _jsonl_lines(path, split, skipped), skipped


def _jsonl_lines(path: Path, split: str | None, skipped: dict[str, int]) -> Entries:
    """Each line's image with that line's captions, keyed by its 'image' (read line by line)."""
    for lineno, row in iter_json_lines(path, "one {image, caption} object per line"):
        where = at_line(path, lineno)
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
        yield row["image"], CaptionedImage(row.get("image_id", row["image"]), row["image"], texts,
                                           split=row.get("split", ""))


def _read_karpathy(path: Path, data: Any, split: str | None) -> tuple[Entries, dict[str, int]]:
    # the Karpathy reader decides splits (train = train + restval) and ids (cocoid, numeric stem, name)
    return _each(karpathy_from_data(data, path, split or "train").images), {}  # capdec embed's text default too


_READERS = {"coco": _read_coco, "refs": _read_refs, "jsonl": _read_jsonl, "karpathy": _read_karpathy}


def read_image_dataset(path: str | os.PathLike, *, split: str | None = None,
                       images_root: str | os.PathLike | None = None, format: str = "auto") -> ImageDataset:
    """Read a captioned-image dataset (see the module docstring); images without captions are left out
    and counted in ``skipped``, files are resolved against ``images_root``. The images are
    :class:`~capdec.io.datasets.PackedImages` (about the text's bytes); JSON Lines are read line by line."""
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
    entries, skipped = _READERS[fmt](path, data, split)
    del data
    packer, index = ImagePacker(), {}  # index: a key's image (JSON Lines' several lines of one image)
    for key, img in entries:
        i = index.get(key) if key is not None else None
        if i is None:
            i = packer.add_image(img.image_id, _resolve(img.file, root), img.split)
            if key is not None:
                index[key] = i
        packer.add_captions(i, _cleaned(img.captions))
    del index
    images = packer.finish()
    if not len(images):
        raise InputError(f"{path}: no captioned images{f' in split {split!r}' if split else ''}")
    if len(images) < packer.n_images:
        skipped["no_captions"] = packer.n_images - len(images)
    return ImageDataset(images, path=str(path), format=fmt, split=split, images_root=str(root), skipped=skipped)


# -- calibration pairs -----------------------------------------------------------------------------

def read_pairs(source: str | os.PathLike, *, captions: str | os.PathLike | None = None,
               images_root: str | os.PathLike | None = None,
               split: str | None = None) -> tuple[list[Path], list[list[str]]]:
    """Paired images and captions: ``(image paths, captions of each image)``.

    ``source`` is either a JSON Lines file of ``{"image": path, "caption": str}`` (or ``"captions":
    [...]``; relative paths are under ``images_root``, default the file's folder), or a folder of
    images with ``captions`` a file mapping file names to caption(s): ``{file name: [captions]}``, a
    COCO caption annotation JSON, or JSON Lines (any format :func:`~capdec.io.references.read_references`
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
        return _folder_pairs(source, captions)
    if captions is not None:
        raise InputError(f"--captions is for a folder of images; {source} is a pairs file")
    data, lines = parse_json_or_jsonl(source, read_text(source))
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
        path = Path(os.path.expanduser(rec["image"]))
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


def _folder_pairs(folder: Path, captions: str | os.PathLike) -> tuple[list[Path], list[list[str]]]:
    """The images of ``folder`` that the references file ``captions`` names (by file name or COCO id)."""
    refs = load_references(captions)
    aliases = refs.alias_table()
    paths, caps, unmatched = [], [], []
    for p in list_images(folder, recursive=False):
        key = aliases[p.name] if p.name in aliases else image_key(p.name)
        if key in refs.captions:
            paths.append(p)
            caps.append(list(refs.captions[key]))
        else:
            unmatched.append(p.name)
    if unmatched:
        logger.warning("%d images in %s have no captions in %s and are not used (e.g. %s)",
                       len(unmatched), folder, captions, unmatched[0])
    if not paths:
        raise InputError(f"no image in {folder} has captions in {captions} (matched by file name or COCO id)")
    return paths, caps


def _dataset_pairs(ds: ImageDataset, images_root: str | os.PathLike | None) -> tuple[list[Path], list[list[str]]]:
    if images_root is None:
        raise InputError(f"{ds.path} is a Karpathy-split file: give --images-root DIR, the folder its images "
                         "are under (as DIR/filepath/filename)")
    root = Path(images_root)
    paths, caps, missing = [], [], []
    for img in ds.images:
        path = root / img.file
        if not path.is_file():
            missing.append(str(path))
        elif img.captions:
            paths.append(path)
            caps.append(list(img.captions))
    if missing:
        logger.warning("%d of the %d images of the %r split are not under %s and are skipped (e.g. %s)",
                       len(missing), len(ds), ds.split, root, missing[0])
    if not paths:
        raise InputError(f"none of the {len(ds)} images of the {ds.split!r} split of {ds.path} is under {root}")
    return paths, caps


# -- image id maps ---------------------------------------------------------------------------------

def read_image_ids(path: str | os.PathLike) -> dict[str, Any]:
    """A mapping file name -> image id, from

    - a COCO annotation JSON (``{"images": [{"id", "file_name"}, ...]}``; an image-info file without
      annotations too),
    - a JSON object ``{"file_name": id, ...}`` or list ``[{"file_name"/"image", "image_id"/"id"}, ...]``,
    - a CSV/TSV file with two columns ``file_name,image_id`` (a header row is allowed).

    Keys are file names as written (matched against the full path, then the base name).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"image id map {str(path)!r} does not exist")
    if path.suffix.lower() == ".json":
        mapping = _image_ids_from_json(path, read_json(path))
    else:
        mapping = _image_ids_from_csv(path, read_text(path))
    if not mapping:
        raise InputError(f"{path} maps no file names to image ids")
    return mapping


def _image_ids_from_json(path: Path, data: Any) -> dict[str, Any]:
    if isinstance(data, dict) and "images" in data:
        return read_coco(data, path, annotations=False).file_names()
    if isinstance(data, dict):
        return {str(k): check_image_id(v, f"{path}: {k!r}") for k, v in data.items()}
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a JSON object or list mapping file names to image ids")
    mapping: dict[str, Any] = {}
    for n, row in enumerate(data):
        name = row.get("file_name", row.get("image")) if isinstance(row, dict) else None
        image_id = row.get("image_id", row.get("id")) if isinstance(row, dict) else None
        if name is None or image_id is None:
            raise InputError(f"{path}: entry {n} needs 'file_name' (or 'image') and 'id' (or 'image_id')")
        if not isinstance(name, str):
            raise InputError(f"{path}: entry {n}: 'file_name' must be a string")
        mapping[name] = check_image_id(image_id, f"{path}: entry {n}")
    return mapping


def _image_ids_from_csv(path: Path, text: str) -> dict[str, Any]:
    mapping: dict[str, Any] = {}
    dialect = "excel-tab" if "\t" in text.split("\n", 1)[0] else "excel"
    for lineno, row in enumerate(csv.reader(text.splitlines(), dialect=dialect), 1):
        if not row or not "".join(row).strip():
            continue
        if len(row) < 2:
            raise InputError(f"{at_line(path, lineno)}: expected two columns 'file_name,image_id'")
        name, image_id = row[0].strip(), row[1].strip()
        number = re.fullmatch(r"-?[0-9]{1,64}", image_id, re.ASCII)
        if lineno == 1 and not number and image_id.lower() in ("image_id", "id"):
            continue  # header
        mapping[name] = int(image_id) if number else image_id
    return mapping


__all__ = ["DATASET_FORMATS", "detect_dataset_format", "read_image_dataset", "read_image_ids", "read_pairs"]
