"""capdec.images: every kind of bad image file is handled or skipped with a reason; discovery; image ids."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from capdec.errors import InputError
from capdec.images import (
    ImageLoadError,
    find_images,
    image_id_from_name,
    iter_image_batches,
    load_image,
    lookup_image_id,
    try_load_image,
)
from capdec.io import read_image_ids

COCO_IMAGES = Path(__file__).resolve().parent / "data" / "coco" / "images"  # real photos, see its README
BOMB_LIMIT = 1_000_000  # a lowered decompression-bomb limit for the "huge" image

# file name -> what loading it must give: ("ok", (width, height) after EXIF, first pixel) or ("skip", reason part)
ZOO_EXPECTED: dict[str, tuple[str, object]] = {
    "cmyk.jpg": ("ok", ((30, 20), (255, 0, 0))),
    "palette.png": ("ok", ((16, 12), (200, 30, 30))),
    "palette_transparent.png": ("ok", ((10, 10), (255, 255, 255))),
    "rgba.png": ("ok", ((20, 20), (255, 255, 255))),
    "half_alpha.png": ("ok", ((8, 8), (128, 128, 255))),
    "grey16.png": ("ok", ((12, 10), (156, 156, 156))),  # 40000 / 65535 * 255, not clipped to 255
    "grey.jpg": ("ok", ((20, 20), (100, 100, 100))),
    "exif_rotated.jpg": ("ok", ((20, 40), None)),  # stored 40x20 with orientation 6 (rotate 90°)
    "corrupt.png": ("skip", "corrupt"),
    "garbage.jpg": ("skip", "not an image"),
    "truncated.jpg": ("skip", "truncated"),
    "empty.jpg": ("skip", "empty file"),
    "text_renamed.jpg": ("skip", "not an image"),
    "huge.png": ("skip", "over the limit"),
}


def _jpeg_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def make_image_zoo(directory: Path) -> dict[str, tuple[str, object]]:
    """Write one file of each awkward kind into ``directory``; returns ZOO_EXPECTED."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8))  # noisy: big scan data
    Image.new("CMYK", (30, 20), (0, 255, 255, 0)).save(directory / "cmyk.jpg")  # pure red in CMYK
    Image.new("RGB", (16, 12), (200, 30, 30)).quantize(8).save(directory / "palette.png")
    pal = Image.new("P", (10, 10), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] * 128)
    pal.save(directory / "palette_transparent.png", transparency=1)
    Image.new("RGBA", (20, 20), (0, 0, 255, 0)).save(directory / "rgba.png")  # fully transparent blue
    Image.new("RGBA", (8, 8), (0, 0, 255, 128)).save(directory / "half_alpha.png")
    Image.fromarray(np.full((10, 12), 40000, dtype=np.uint16)).save(directory / "grey16.png")
    Image.new("L", (20, 20), 100).save(directory / "grey.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    Image.new("RGB", (40, 20), (0, 255, 0)).save(directory / "exif_rotated.jpg", exif=exif)
    data = _jpeg_bytes(photo)
    png = io.BytesIO()
    photo.save(png, "PNG")
    broken = bytearray(png.getvalue())
    broken[1000:1050] = bytes(50)  # header intact, compressed pixel data zeroed
    (directory / "corrupt.png").write_bytes(bytes(broken))
    (directory / "garbage.jpg").write_bytes(b"\xff\xd8\xff" + bytes(rng.integers(0, 255, 500, dtype=np.uint8)))
    (directory / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (directory / "empty.jpg").write_bytes(b"")
    (directory / "text_renamed.jpg").write_text("not an image, just text\n")
    Image.new("RGB", (1200, 1000), (10, 20, 30)).save(directory / "huge.png")  # 1.2 MP > BOMB_LIMIT
    return ZOO_EXPECTED


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("zoo")
    make_image_zoo(d)
    return d


@pytest.mark.parametrize("name", sorted(ZOO_EXPECTED))
def test_each_awkward_file_is_handled_or_skipped_with_a_reason(zoo, name):
    kind, expected = ZOO_EXPECTED[name]
    path = zoo / name
    if kind == "ok":
        im = load_image(path, max_pixels=BOMB_LIMIT)
        size, pixel = expected
        assert im.mode == "RGB" and im.size == size
        if pixel is not None:
            assert all(abs(a - b) <= 3 for a, b in zip(im.getpixel((im.width // 2, im.height // 2)), pixel))
        im.load()  # usable after the file was closed
    else:
        with pytest.raises(ImageLoadError) as err:
            load_image(path, max_pixels=BOMB_LIMIT)
        assert expected in err.value.reason and str(path) in str(err.value)
        image, reason = try_load_image(path, max_pixels=BOMB_LIMIT)
        assert image is None and expected in reason


def test_exif_rotation_turns_the_pixels_not_just_the_size(tmp_path):
    im = Image.new("RGB", (40, 20), (0, 0, 0))
    im.paste((255, 0, 0), (0, 0, 10, 20))  # red stripe on the left of the stored image
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(tmp_path / "r.png", exif=exif)
    out = load_image(tmp_path / "r.png")
    assert out.size == (20, 40)
    assert out.getpixel((10, 2))[0] > 200 and out.getpixel((10, 37))[0] < 50  # left stripe is now on top


def test_bomb_limit_is_configurable(zoo):
    assert load_image(zoo / "huge.png", max_pixels=None).size == (1200, 1000)
    assert load_image(zoo / "huge.png", max_pixels=1200 * 1000).size == (1200, 1000)
    with pytest.raises(ImageLoadError, match="1,200,000 pixels"):
        load_image(zoo / "huge.png", max_pixels=1200 * 1000 - 1)


def test_missing_file_is_skipped_with_reason(tmp_path):
    image, reason = try_load_image(tmp_path / "nope.jpg")
    assert image is None and "cannot read" in reason


def test_real_coco_photo_loads():
    im = load_image(COCO_IMAGES / "000000000785.jpg")
    assert im.mode == "RGB" and im.size == (640, 425)


# -- batches ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [0, 3])
def test_batches_keep_order_and_collect_skips(zoo, workers, caplog):
    paths = find_images(zoo)
    with caplog.at_level(logging.WARNING, logger="capdec.images"):
        batches = list(iter_image_batches(paths, batch_size=4, max_pixels=BOMB_LIMIT, num_workers=workers))
    assert [len(b) for b in batches] == [4, 4, 4, 2]
    good = [p for b in batches for p in b.paths]
    skipped = {Path(s.image).name: s.reason for b in batches for s in b.skipped}
    assert good == [str(p) for p in paths if ZOO_EXPECTED[p.name][0] == "ok"]  # input order
    assert set(skipped) == {n for n, (k, _) in ZOO_EXPECTED.items() if k == "skip"}
    assert all(ZOO_EXPECTED[n][1] in r for n, r in skipped.items())
    assert all(im.mode == "RGB" for b in batches for im in b.images)
    logged = caplog.text
    assert all(name in logged for name in skipped)


# -- discovery ----------------------------------------------------------------------------------------
@pytest.fixture()
def tree(tmp_path) -> Path:
    (tmp_path / "a" / "sub").mkdir(parents=True)
    for rel in ("a/2.jpg", "a/1.PNG", "a/sub/3.jpeg", "a/notes.md", "a/.hidden.jpg", "b.webp"):
        (tmp_path / rel).write_bytes(b"x")
    return tmp_path


def test_find_images_in_directories_and_globs(tree, monkeypatch):
    names = lambda ps: [p.relative_to(tree).as_posix() for p in ps]  # noqa: E731
    assert names(find_images(tree / "a")) == ["a/1.PNG", "a/2.jpg"]
    assert names(find_images(tree / "a", recursive=True)) == ["a/1.PNG", "a/2.jpg", "a/sub/3.jpeg"]
    assert names(find_images(str(tree / "a" / "*"))) == ["a/1.PNG", "a/2.jpg"]
    assert names(find_images(str(tree / "**" / "*.jpeg"), recursive=True)) == ["a/sub/3.jpeg"]
    # an explicitly named file is taken whatever its extension; duplicates collapse, output is sorted
    monkeypatch.chdir(tree)
    found = find_images(["b.webp", "a/notes.md", str(tree / "b.webp"), "a/../b.webp", "a"])
    assert [str(p) for p in found] == ["a/1.PNG", "a/2.jpg", "a/notes.md", "b.webp"]


def test_find_images_from_list_files(tree):
    lst = tree / "a" / "list.txt"
    lst.write_text("# my images\n2.jpg\n\nsub/3.jpeg\n" + str(tree / "b.webp") + "\n2.jpg\n")
    expected = [tree / "a" / "2.jpg", tree / "a" / "sub" / "3.jpeg", tree / "b.webp"]
    assert sorted(map(str, find_images(str(lst)))) == sorted(map(str, expected))
    other = tree / "files.lst_any"
    other.write_text("a/2.jpg\n")
    assert find_images("@" + str(other)) == [tree / "a" / "2.jpg"]
    lst.write_text("2.jpg\nmissing.jpg\n")
    with pytest.raises(InputError, match=r"list.txt: line 2: .*missing.jpg"):
        find_images(str(lst))


def test_find_images_errors_name_the_input(tree):
    with pytest.raises(InputError, match="no such file or directory: 'nothere'"):
        find_images(["nothere"])
    with pytest.raises(InputError, match="matched no image files"):
        find_images([str(tree / "*.gif")])
    with pytest.raises(InputError, match="does not exist"):
        find_images(["@" + str(tree / "nolist.txt")])


# -- image ids ----------------------------------------------------------------------------------------
def test_image_id_from_coco_file_names():
    assert image_id_from_name("x/COCO_val2014_000000000257.jpg") == 257
    assert image_id_from_name("000000000785.jpg") == 785
    assert image_id_from_name("holiday.jpg") is None


def test_image_id_maps(tmp_path):
    coco = tmp_path / "ann.json"
    coco.write_text(json.dumps({"images": [{"id": 7, "file_name": "a.jpg"}, {"id": 9, "file_name": "b.jpg"}],
                                "annotations": []}))
    assert read_image_ids(coco) == {"a.jpg": 7, "b.jpg": 9}
    obj = tmp_path / "ids.json"
    obj.write_text(json.dumps({"a.jpg": "img-a"}))
    assert lookup_image_id("dir/a.jpg", read_image_ids(obj)) == "img-a"
    assert lookup_image_id("dir/c.jpg", read_image_ids(obj)) is None
    table = tmp_path / "ids.csv"
    table.write_text("file_name,image_id\na.jpg,3\nsub/b.jpg,x4\n")
    ids = read_image_ids(table)
    assert ids == {"a.jpg": 3, "sub/b.jpg": "x4"}
    assert lookup_image_id("sub/b.jpg", ids) == "x4" and lookup_image_id("000000000001.jpg") == 1
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"file_name": "a.jpg"}]))
    with pytest.raises(InputError, match="entry 0"):
        read_image_ids(bad)

