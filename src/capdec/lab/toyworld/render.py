"""Drawing scenes: a pure function from :class:`~capdec.lab.toyworld.world.Scene` to a PIL image.

Shapes are drawn at ``supersample`` times the target size and box-filtered down, so that small
shapes keep legible, anti-aliased outlines even at 32x32 (a 5-pixel circle and a 5-pixel diamond
differ in their edge pixels, not in a hard-edged blob).
"""

from __future__ import annotations

import logging
import math

import numpy as np
from PIL import Image, ImageDraw

from capdec.errors import InputError
from capdec.lab.toyworld.world import BACKGROUNDS, COLOURS, Scene, ToyObject

logger = logging.getLogger(__name__)

# Side of a shape's bounding box as a fraction of its cell.
EXTENT = {"small": 0.58, "large": 0.9}


def _draw_object(draw: ImageDraw.ImageDraw, obj: ToyObject, cell: float) -> None:
    side = EXTENT[obj.size] * cell
    room = (cell - side) / 2  # free space between the shape and the cell border
    cx = (obj.cell[1] + 0.5) * cell + obj.offset[0] * room
    cy = (obj.cell[0] + 0.5) * cell + obj.offset[1] * room
    r = side / 2
    fill = COLOURS[obj.colour]
    if obj.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif obj.shape == "square":
        s = r * 0.88  # a square of the same side looks much bigger than a circle
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif obj.shape == "triangle":
        h = r * math.sqrt(3)  # equilateral, centred on its bounding box
        draw.polygon([(cx, cy - h / 2 - r * 0.12), (cx + r, cy + h / 2 - r * 0.12),
                      (cx - r, cy + h / 2 - r * 0.12)], fill=fill)
    elif obj.shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif obj.shape == "cross":
        t = r * 0.3  # half the bar thickness
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)
    else:
        raise InputError(f"cannot draw shape {obj.shape!r}")


def render(scene: Scene, size: int = 32, *, supersample: int = 4) -> Image.Image:
    """The scene as a ``size`` x ``size`` RGB image (deterministic: no randomness here)."""
    if size < 8:
        raise InputError(f"image size must be at least 8 pixels, got {size}")
    big = size * supersample
    image = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw_object(draw, obj, big / scene.grid)
    return image.reduce(supersample) if supersample > 1 else image


def render_array(scenes: list[Scene], size: int = 32) -> np.ndarray:
    """Several scenes as one ``(N, size, size, 3)`` uint8 array (what the mini-CLIP trains on)."""
    out = np.empty((len(scenes), size, size, 3), dtype=np.uint8)
    for i, scene in enumerate(scenes):
        out[i] = np.asarray(render(scene, size))
    return out


def contact_sheet(images: list[Image.Image], *, columns: int = 8, scale: int = 4, pad: int = 2) -> Image.Image:
    """Tile images (enlarged ``scale`` times, nearest neighbour) into one picture for a README or report."""
    if not images:
        raise InputError("contact_sheet needs at least one image")
    w, h = images[0].size
    w, h = w * scale, h * scale
    rows = math.ceil(len(images) / columns)
    sheet = Image.new("RGB", (columns * (w + pad) + pad, rows * (h + pad) + pad), (255, 255, 255))
    for i, im in enumerate(images):
        r, c = divmod(i, columns)
        sheet.paste(im.resize((w, h), Image.NEAREST), (pad + c * (w + pad), pad + r * (h + pad)))
    return sheet
