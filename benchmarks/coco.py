"""The real COCO data shipped with the repository (tests/data/coco, see its README for the licences)."""

from __future__ import annotations

import json
import lzma
from pathlib import Path
from typing import Any

COCO = Path(__file__).resolve().parents[1] / "tests" / "data" / "coco"
PHOTOS = COCO / "images"  # 17 CC BY / CC BY-SA photos


def annotations(name: str) -> list[dict[str, Any]]:
    """The ``annotations`` of a shipped caption file, e.g. ``annotations("captions_val2017")``."""
    with lzma.open(COCO / f"{name}.json.xz", "rt", encoding="utf-8") as f:
        return json.load(f)["annotations"]
