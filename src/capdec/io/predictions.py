"""Generated captions (``capdec evaluate``): what ``capdec caption`` writes (JSON Lines, COCO results, CSV), and more."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capdec.errors import InputError
from capdec.images import ImageId, image_key
from capdec.io.text import at_line, location, parse_json_or_jsonl, read_text


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
        raise InputError(f"{where}: no 'caption' field (fields: {', '.join(map(repr, rec)) or 'none'})")
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


__all__ = ["Prediction", "load_predictions", "read_predictions"]
