"""Finding and loading images robustly: a bad file is skipped with a reason, never the end of a run.

Discovery (:func:`find_images`) takes any mix of

- image files (taken whatever their extension; a file that is not an image is skipped at load time),
- directories (their image files by extension; ``recursive=True`` descends into subdirectories),
- glob patterns (``photos/*.jpg``, ``photos/**/*.png`` with ``recursive=True``; image extensions only),
- list files: ``@FILE`` (any name), or a plain argument ending in ``.txt`` or ``.lst``: one path per line,
  blank lines and ``#`` comments ignored, relative paths taken relative to the list file's directory;
  a line may itself be a directory or a glob.

The result is sorted and de-duplicated (by resolved path; the first spelling is kept).

Loading (:func:`load_image`) returns an RGB PIL image, or raises :class:`ImageLoadError` with a short
reason. Handled: EXIF orientation (applied), CMYK, palette and greyscale images (converted),
transparency (composited on white), 16-bit and 32-bit greyscale (scaled to 8 bits, not clipped).
Skipped: missing, empty, unreadable, non-image, corrupt and truncated files, and images with more
pixels than ``max_pixels`` (a decompression-bomb guard; PIL's own ``Image.MAX_IMAGE_PIXELS`` check
also applies, so raise that too for images above ~179 megapixels) or, if asked, an aspect ratio over
``max_aspect``. With ``min_side`` (an encoder's input size) an image is decoded reduced, as ``capdec caption``
and ``capdec serve`` both do.

:func:`iter_image_batches` loads in a thread pool (PIL decodes without holding the GIL), in order,
with a bounded read-ahead so memory stays flat however many files there are.
"""

from __future__ import annotations

import collections
import glob
import logging
import math
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from capdec.errors import InputError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm",
                              ".pgm", ".pbm", ".pnm", ".jfif", ".tga", ".ico"})
LIST_EXTENSIONS = (".txt", ".lst")
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's default Image.MAX_IMAGE_PIXELS (≈ 0.25 GiB of RGBA)
# long side over short side (capdec caption and serve): an encoder that resizes the short side to its input
# size makes a 4000x1 strip 4000 times wider than tall (GBs); a panorama of 20:1 still passes
DEFAULT_MAX_ASPECT = 20.0
_GLOB_CHARS = re.compile(r"[*?\[]")
_WHITE = (255, 255, 255)


class ImageLoadError(InputError):
    """An image could not be used; ``reason`` says why (without the file name)."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


@dataclass
class Skipped:
    """A file that was not captioned, and why."""

    image: str  # the path as it was found
    reason: str


# -- discovery ----------------------------------------------------------------------------------------


def is_image_name(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _scan_dir(directory: Path, recursive: bool) -> list[Path]:
    walk = directory.rglob("*") if recursive else directory.iterdir()
    return [p for p in walk if is_image_name(p) and not p.name.startswith(".") and p.is_file()]


def list_images(directory: str | os.PathLike, *, recursive: bool = True) -> list[Path]:
    """Image files (by extension) under ``directory``, sorted."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(f"{directory}: not a directory of images")
    return sorted(_scan_dir(directory, recursive))


def _glob(pattern: str, recursive: bool) -> list[Path]:
    pattern = os.path.expanduser(pattern)
    found = _walk_glob(pattern) if recursive and "**" in pattern else glob.glob(pattern)
    return [Path(p) for p in found if is_image_name(p) and os.path.isfile(p)]


def _walk_glob(pattern: str) -> list[str]:
    """``glob.glob(pattern, recursive=True)``'s matches, but each real directory is entered once.

    glob follows symbolic links to directories under ``**``, so a link to a parent directory makes it
    recurse until the path is too long, and two such links make that exponential (hours). Here the walk
    follows links too, but skips a directory it has already been in (by device and inode).
    """
    parts = Path(pattern).parts
    fixed = next((i for i, part in enumerate(parts) if glob.has_magic(part)), len(parts))
    root = os.path.join(*parts[:fixed]) if fixed else ""
    wanted = parts[fixed:]
    hidden_ok = any(part.startswith(".") for part in wanted)
    seen: set[tuple[int, int]] = set()
    found = []
    for dirpath, dirnames, filenames in os.walk(root or os.curdir, followlinks=True):
        try:
            st = os.stat(dirpath)
        except OSError:
            dirnames[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        if not hidden_ok:
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = os.path.relpath(dirpath, root or os.curdir)
        base = [] if rel == os.curdir else rel.split(os.sep)
        for name in filenames + dirnames:
            if _glob_match(base + [name], wanted):
                found.append(os.path.join(root, *base, name) if root else os.path.join(*base, name))
    return sorted(found)


def _glob_match(names: list[str], parts: Sequence[str]) -> bool:
    """Whether path components ``names`` match glob ``parts`` (``**``: any number of non-hidden components)."""
    import fnmatch

    # reach[j]: names[:i] can be matched by parts[:j]
    reach = [True] + [False] * len(parts)
    for j, part in enumerate(parts):  # leading **'s match zero components
        reach[j + 1] = reach[j] and part == "**"
    for name in names:
        hidden = name.startswith(".")
        new = [False] * (len(parts) + 1)
        for j, part in enumerate(parts):
            if part == "**":
                new[j + 1] = new[j] or ((reach[j + 1] or reach[j]) and not hidden)
            else:
                new[j + 1] = reach[j] and fnmatch.fnmatchcase(name, part) and (part.startswith(".") or not hidden)
        reach = new
    return reach[-1]


def _read_list(list_file: Path, recursive: bool) -> list[Path]:
    from capdec.io.text import decode_text

    try:
        lines = decode_text(list_file.read_bytes(), list_file).splitlines()
    except OSError as e:
        raise InputError(f"cannot read the image list {list_file}: {e.strerror or e}") from e
    found: list[Path] = []
    for lineno, line in enumerate(lines, 1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        path = Path(os.path.expanduser(entry))
        if not path.is_absolute():
            path = list_file.parent / path
        try:
            found.extend(_expand(str(path), recursive, in_list=True))
        except InputError as e:
            raise InputError(f"{list_file}: line {lineno}: {e}") from e  # capdec.io.text.at_line's style
    return found


def _expand(arg: str, recursive: bool, *, in_list: bool = False) -> list[Path]:
    if arg.startswith("@") and not in_list and not os.path.exists(arg):
        list_file = Path(os.path.expanduser(arg[1:]))
        if not list_file.is_file():
            raise InputError(f"image list file {arg[1:]!r} does not exist")
        return _read_list(list_file, recursive)
    path = Path(os.path.expanduser(arg))
    if path.is_dir():
        found = _scan_dir(path, recursive)
        if not found:
            logger.warning("no image files in %s%s", path, "" if recursive else " (use --recursive for subdirectories)")
        return found
    if path.is_file():
        if path.suffix.lower() in LIST_EXTENSIONS and not in_list:
            return _read_list(path, recursive)
        return [path]
    if _GLOB_CHARS.search(arg):
        found = _glob(arg, recursive)
        if not found:
            raise InputError(f"pattern {arg!r} matched no image files")
        return found
    raise InputError(f"no such file or directory: {arg!r}")


def find_images(inputs: Sequence[str | os.PathLike] | str | os.PathLike, *, recursive: bool = False) -> list[Path]:
    """Image paths from files, directories, globs and list files (see module docstring); sorted, unique."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    seen: dict[str, Path] = {}
    for arg in inputs:
        for path in _expand(os.fspath(arg), recursive):
            seen.setdefault(os.path.realpath(path), path)
    return sorted(seen.values(), key=lambda p: str(p))


# -- image ids ----------------------------------------------------------------------------------------

ImageId = int | str

# The one rule for turning a file name into an image id (captioning, metrics and calibration use it):
# - image_key: the id an image is *matched* by: an int stays an int; a name whose stem is a COCO-style
#   number (COCO_val2014_000000000257.jpg, 000000000785.jpg) becomes that int; any other name its base name;
# - image_id_from_name: the number a COCO results file gives an image without an id map: the trailing
#   number of the stem (COCO_val2014_000000000257 -> 257, img_12 -> 12), or None.
_COCO_STEM = re.compile(r"(?:COCO_[A-Za-z]+[0-9]*_)?([0-9]{1,64})", re.ASCII)
_TRAILING_NUMBER = re.compile(r"(?:^|_)([0-9]{1,64})$", re.ASCII)


def basename(name: str) -> str:
    """The last component of a path written with / or \\ (the file name an id map or a reference names)."""
    return name.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]


def image_key(name: int | str) -> ImageId:
    """The id an image is matched by (see the module docstring for the rule).

    >>> image_key("val2014/COCO_val2014_000000000257.jpg"), image_key("000000000785.jpg")
    (257, 785)
    >>> image_key(" 42 "), image_key("photos/dog.jpg")
    (42, 'dog.jpg')
    """
    if isinstance(name, bool) or not isinstance(name, (int, np.integer, str, os.PathLike)):
        raise TypeError(f"an image id must be an int or a string, not {type(name).__name__}")
    if isinstance(name, (int, np.integer)):
        return int(name)
    text = os.fspath(name).strip()
    if re.fullmatch(r"[0-9]{1,64}", text, re.ASCII):
        return int(text)
    base = basename(text)
    stem = base.rsplit(".", 1)[0] if "." in base[1:] else base
    match = _COCO_STEM.fullmatch(stem)
    return int(match.group(1)) if match else base


def image_id_from_name(path: str | os.PathLike) -> int | None:
    """The COCO image id in a file name (``COCO_val2014_000000000257.jpg``, ``000000000785.jpg``), or None."""
    m = _TRAILING_NUMBER.search(Path(basename(os.fspath(path))).stem)
    return int(m.group(1)) if m else None


def lookup_image_id(path: str | os.PathLike, mapping: dict[str, Any] | None = None) -> Any:
    """The image id of ``path``: from ``mapping`` (full path, then base name) or the COCO file name."""
    if mapping is not None:
        for key in (os.fspath(path), Path(path).name):
            if key in mapping:
                return mapping[key]
        return None
    return image_id_from_name(path)


# -- loading ------------------------------------------------------------------------------------------


def _to_rgb(im: Any, *, sixteen_bit: bool = False) -> Any:
    """Any PIL mode -> RGB: transparency composited on white, high bit depths scaled, not clipped.

    ``sixteen_bit``: ``im`` holds 16-bit samples (it was ``I;16`` before :func:`_reduce` widened it)."""
    import numpy as np
    from PIL import Image

    mode = im.mode
    if mode == "RGB":
        return im
    if mode == "P" and "transparency" in im.info or mode == "PA":
        im, mode = im.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "RGBa", "La"):
        if mode in ("RGBa", "La"):  # premultiplied alpha
            im = im.convert("RGBA" if mode == "RGBa" else "LA")
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(im).astype(np.float64)
        top = float(arr.max(initial=0))
        if mode.startswith("I;16") or sixteen_bit or (mode == "I" and 255 < top <= 65535):
            arr = arr / 257.0  # 16-bit data: 0..65535 -> 0..255
        elif mode == "F" and arr.min(initial=0) >= 0 and top <= 1:
            arr = arr * 255.0  # float data in 0..1
        elif top > 255 or arr.min(initial=0) < 0:
            lo = float(arr.min(initial=0))  # anything else: stretch the range present
            arr = (arr - lo) * (255.0 / (top - lo)) if top > lo else arr * 0.0
        grey = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
        return grey.convert("RGB")
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


@dataclass(frozen=True)
class DecodePlan:
    """What decoding one image will hold, known from its header alone (:func:`plan_decode`)."""

    width: int  # as stored (before EXIF orientation)
    height: int
    decoded: int  # pixels of the raster the decoder fills (fewer than width x height when JPEG draft applies)
    kept: int  # pixels of the image returned, after any reduction


def _limits(path: str | os.PathLike, size: tuple[int, int], max_pixels: int | None, max_aspect: float | None) -> None:
    w, h = size
    if w < 1 or h < 1:
        raise ImageLoadError(path, f"image has no pixels ({w}x{h})")
    if max_pixels is not None and w * h > max_pixels:
        raise ImageLoadError(path, f"{w}x{h} = {w * h:,} pixels is over the limit of {max_pixels:,} "
                                   "(decompression-bomb guard; raise --max-pixels to allow it)")
    if max_aspect is not None and max(w, h) > max_aspect * min(w, h):
        raise ImageLoadError(path, f"{w}x{h}: aspect ratio {max(w, h) / min(w, h):.4g}:1 is over the limit of "
                                   f"{max_aspect:g}:1")


def _draft(im: Any, min_side: int | None) -> int:
    """Ask the decoder for a smaller raster whose short side stays ≥ ``min_side`` (JPEG: 1/2, 1/4 or 1/8 of
    each side; other formats ignore it), and return the integer factor the decoded raster is then reduced by."""
    if not min_side:
        return 1
    short = min(im.size)
    if short >= 2 * min_side:
        im.draft(None, (math.ceil(im.width * min_side / short), math.ceil(im.height * min_side / short)))
    return max(1, min(im.size) // min_side)


def _reduced_size(size: tuple[int, int], factor: int) -> tuple[int, int]:
    return math.ceil(size[0] / factor), math.ceil(size[1] / factor)


def _reduce(im: Any, factor: int) -> Any:
    """``im`` box-averaged by ``factor``; modes whose stored values cannot be averaged are converted first
    (palette indices to colours, bilevel to grey, 16-bit to 32-bit integers, which ``_to_rgb`` scales alike)."""
    if factor < 2:
        return im
    if im.mode == "P" or im.mode == "PA":
        im = im.convert("RGBA" if im.mode == "PA" or "transparency" in im.info else "RGB")
    elif im.mode == "1":
        im = im.convert("L")
    elif im.mode.startswith("I;16"):
        im = im.convert("I")
    return im.reduce(factor)


def _open(path: str | os.PathLike) -> Any:
    from PIL import Image

    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise ImageLoadError(path, f"cannot read the file ({e.strerror or e})") from e
    if size == 0:
        raise ImageLoadError(path, "empty file (0 bytes)")
    return Image.open(path)


def _decode_errors(path: str | os.PathLike, e: Exception) -> ImageLoadError:
    """The :class:`ImageLoadError` for what PIL raised while opening or decoding ``path``."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(e, ImageLoadError):
        return e
    if isinstance(e, UnidentifiedImageError):
        return ImageLoadError(path, "not an image, or a format PIL cannot read")
    if isinstance(e, Image.DecompressionBombError):
        return ImageLoadError(path, f"decompression bomb refused by PIL ({e})")
    if isinstance(e, OSError):
        return ImageLoadError(path, f"corrupt or truncated image data ({e})")
    if isinstance(e, MemoryError):
        return ImageLoadError(path, "out of memory while decoding")
    # PIL plugins raise ValueError, SyntaxError, struct.error, ... on bad data
    return ImageLoadError(path, f"cannot decode ({type(e).__name__}: {e})")


def plan_decode(path: str | os.PathLike, *, max_pixels: int | None = DEFAULT_MAX_PIXELS, min_side: int | None = None,
                max_aspect: float | None = None) -> DecodePlan:
    """What :func:`load_image` with the same arguments will hold, read from the header without decoding
    (or :class:`ImageLoadError` for what it refuses from the header alone)."""
    try:
        with _open(path) as im:
            width, height = im.size
            _limits(path, im.size, max_pixels, max_aspect)
            factor = _draft(im, min_side)
            decoded = im.size
    except Exception as e:
        raise _decode_errors(path, e) from e
    kept = _reduced_size(decoded, factor)
    return DecodePlan(width, height, decoded[0] * decoded[1], kept[0] * kept[1])


def load_image(path: str | os.PathLike, *, max_pixels: int | None = DEFAULT_MAX_PIXELS, min_side: int | None = None,
               max_aspect: float | None = None) -> Any:
    """An RGB PIL image (EXIF orientation applied), or :class:`ImageLoadError` with the reason.

    ``min_side``: decode reduced (the JPEG decoder's own scaling, then an integer box average) as far as the
    short side stays ≥ ``min_side`` (an encoder's input size: it resizes to that anyway), so a large image
    never exists at full size past its decoding, and a JPEG not even then. ``max_aspect``: refuse images
    whose long side is more than this many times their short side (they cost a processor that resizes the
    short side memory in proportion). Both refusals come from the header, before anything is decoded.
    """
    from PIL import ImageOps

    try:
        with _open(path) as im:
            _limits(path, im.size, max_pixels, max_aspect)
            factor = _draft(im, min_side)
            im.load()  # decode now: corrupt and truncated data fail here
            small = _reduce(im, factor)
            try:
                upright = ImageOps.exif_transpose(small)  # a new image, rotated/flipped as EXIF says
            except Exception as e:  # a broken EXIF block should not cost the image
                logger.debug("%s: ignoring unreadable EXIF orientation (%s)", path, e)
                upright = small
            rgb = _to_rgb(upright, sixteen_bit=im.mode.startswith("I;16"))
            if rgb is im:
                rgb = im.copy()  # closing the file would release the pixels of the opened image
    except Exception as e:
        raise _decode_errors(path, e) from e
    if rgb.width < 1 or rgb.height < 1:
        raise ImageLoadError(path, f"image has no pixels ({rgb.width}x{rgb.height})")
    return rgb


def try_load_image(path: str | os.PathLike, *, max_pixels: int | None = DEFAULT_MAX_PIXELS, min_side: int | None = None,
                   max_aspect: float | None = None) -> tuple[Any, str | None]:
    """(RGB image, None) or (None, reason); the options are :func:`load_image`'s."""
    try:
        return load_image(path, max_pixels=max_pixels, min_side=min_side, max_aspect=max_aspect), None
    except ImageLoadError as e:
        return None, e.reason


@dataclass
class ImageBatch:
    """Images that loaded (in input order) and the files of this batch that did not."""

    paths: list[str] = field(default_factory=list)
    images: list[Any] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths) + len(self.skipped)


def _ordered_map(fn: Any, items: Iterable[Any], *, workers: int, window: int) -> Iterator[Any]:
    """``map(fn, items)`` in a thread pool, in order, with at most ``window`` results pending."""
    if workers <= 0:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="capdec-load") as pool:
        pending: collections.deque[Future] = collections.deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def iter_image_batches(paths: Iterable[str | os.PathLike], *, batch_size: int = 64,
                       max_pixels: int | None = DEFAULT_MAX_PIXELS, num_workers: int = 4, min_side: int | None = None,
                       max_aspect: float | None = None) -> Iterator[ImageBatch]:
    """Load ``paths`` in order, ``batch_size`` files per batch (good and skipped together).

    Each skipped file is logged as a warning naming it and the reason. ``num_workers=0`` loads in the
    calling thread. ``min_side`` and ``max_aspect`` are :func:`load_image`'s: with ``min_side`` the batches
    hold images reduced to about that size, however large the files.
    """
    if batch_size < 1:
        raise InputError(f"batch_size must be ≥ 1, got {batch_size}")

    def load(p: str | os.PathLike) -> tuple[str, Any, str | None]:
        image, reason = try_load_image(p, max_pixels=max_pixels, min_side=min_side, max_aspect=max_aspect)
        return os.fspath(p), image, reason

    # read ahead one batch (plus a little): the next batch loads while the caller encodes this one, and at
    # most about two batches of decoded images are held at once
    window = batch_size + 2 * max(num_workers, 1)
    batch = ImageBatch()
    for path, image, reason in _ordered_map(load, paths, workers=num_workers, window=window):
        if image is None:
            logger.warning("skipping %s: %s", path, reason)
            batch.skipped.append(Skipped(path, reason or "unknown error"))
        else:
            batch.paths.append(path)
            batch.images.append(image)
        if len(batch) >= batch_size:
            yield batch
            batch = ImageBatch()
    if len(batch):
        yield batch
