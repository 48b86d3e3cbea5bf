"""Decoding reduced (what ``capdec serve`` does with uploads): large images are decoded at the size the encoder
needs (JPEG draft, then an integer box reduction), extreme aspect ratios are refused, and what a decode will
hold is known from the header (:func:`capdec.images.plan_decode`, which the server's pixel budget uses).

Each reduced image is checked against an independent computation: the full decode averaged in blocks with
numpy, or box-resized by PIL."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from capdec.images import ImageLoadError, load_image, plan_decode


def _photo(width: int, height: int) -> Image.Image:
    """Smooth colour gradients (JPEG keeps them well, so a reduced decode can be compared closely)."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([255 * x / width, 255 * y / height, 128 + 100 * np.sin(x / 37.0) * np.cos(y / 53.0)], axis=-1)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def _block_mean(array: np.ndarray, f: int) -> np.ndarray:
    h, w = array.shape[:2]
    assert h % f == 0 and w % f == 0
    return array.reshape(h // f, f, w // f, f, -1).astype(np.float64).mean(axis=(1, 3))


def test_a_large_png_is_reduced_by_block_averaging(tmp_path):
    path = tmp_path / "big.png"
    _photo(960, 640).save(path)
    plan = plan_decode(path, min_side=32)
    assert (plan.width, plan.height, plan.decoded) == (960, 640, 960 * 640)  # PNG: no reduced decoding
    im = load_image(path, min_side=32)
    assert im.size == (48, 32) and plan.kept == 48 * 32  # reduced by 640 // 32 = 20: short side still >= 32
    full = np.asarray(load_image(path))
    assert np.abs(np.asarray(im) - _block_mean(full, 20)).max() <= 1  # PIL rounds; numpy does not


def test_a_large_jpeg_is_decoded_at_an_eighth_and_keeps_its_content(tmp_path):
    path = tmp_path / "big.jpg"
    _photo(1600, 1280).save(path, quality=95)
    plan = plan_decode(path, min_side=32)
    assert plan.decoded == 200 * 160  # the JPEG decoder's 1/8 scale: the full raster is never held
    im = load_image(path, min_side=32)
    assert im.size == (40, 32) and plan.kept == 40 * 32  # then reduced by 160 // 32 = 5
    # the same picture as the full decode averaged over the same 40x40 blocks (up to JPEG's scaled IDCT)
    reference = np.asarray(load_image(path).resize(im.size, Image.BOX), dtype=np.float64)
    assert np.abs(np.asarray(im, dtype=np.float64) - reference).mean() < 2.0
    # odd sizes: the short side still lands in [min_side, 2 min_side)
    _photo(1601, 1203).save(path, quality=95)
    im = load_image(path, min_side=32)
    assert 32 <= min(im.size) < 64 and im.width * im.height == plan_decode(path, min_side=32).kept
    # small enough already: decoded whole, as without min_side
    assert load_image(path, min_side=1203).size == (1601, 1203)


def test_exif_orientation_survives_the_reduction(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    path = tmp_path / "rotated.jpg"
    _photo(2000, 1000).save(path, exif=exif)
    im = load_image(path, min_side=32)
    assert im.width < im.height and 32 <= im.width < 64  # shown upright, reduced


@pytest.mark.parametrize("mode", ["I;16", "I;16-dark", "P", "PA-like", "1"])
def test_modes_that_cannot_be_averaged_as_stored_are_converted_first(tmp_path, mode):
    path = tmp_path / "big.png"
    if mode == "I;16":
        Image.fromarray(np.full((640, 960), 40000, dtype=np.uint16)).save(path)
        expected = (156, 156, 156)  # 40000 / 65535 * 255, scaled as a full decode scales it
    elif mode == "I;16-dark":  # 16-bit samples all under 256 are still 16-bit: 200 / 65535 * 255 rounds to 1
        Image.fromarray(np.full((640, 960), 200, dtype=np.uint16)).save(path)
        expected = (1, 1, 1)
    elif mode == "P":
        Image.new("RGB", (960, 640), (200, 30, 30)).quantize(8).save(path)
        expected = (200, 30, 30)
    elif mode == "PA-like":  # a palette with a transparent index: composited on white
        pal = Image.new("P", (960, 640), 1)
        pal.putpalette([0, 0, 0, 255, 0, 0] * 128)
        pal.save(path, transparency=1)
        expected = (255, 255, 255)
    else:
        Image.new("1", (960, 640), 1).save(path)
        expected = (255, 255, 255)
    im = load_image(path, min_side=32)
    assert im.mode == "RGB" and im.size == (48, 32)
    assert im.getpixel((10, 10)) == expected == load_image(path).getpixel((10, 10))


@pytest.mark.parametrize("size, refused", [((4000, 1), True), ((21, 1), True), ((20, 1), False), ((1, 20), False),
                                           ((1, 4000), True)])
def test_extreme_aspect_ratios_are_refused_from_the_header(tmp_path, size, refused):
    path = tmp_path / "strip.png"
    Image.new("RGB", size, (1, 2, 3)).save(path)
    if refused:
        ratio = max(size) // min(size)
        with pytest.raises(ImageLoadError, match=f"aspect ratio {ratio}:1 is over the limit of 20:1"):
            plan_decode(path, max_aspect=20)
        with pytest.raises(ImageLoadError, match="aspect ratio"):
            load_image(path, max_aspect=20)
    else:
        assert load_image(path, max_aspect=20).size == size
    assert load_image(path).size == size  # no limit unless asked


def test_the_plan_refuses_what_loading_refuses(tmp_path):
    (tmp_path / "text.jpg").write_text("not an image")
    with pytest.raises(ImageLoadError, match="not an image"):
        plan_decode(tmp_path / "text.jpg")
    Image.new("RGB", (1200, 1000)).save(tmp_path / "huge.png")
    with pytest.raises(ImageLoadError, match="over the limit of 1,000,000"):
        plan_decode(tmp_path / "huge.png", max_pixels=1_000_000)


def test_encoders_report_the_size_their_preprocessing_takes_images_to(tiny_hf_clip, tiny_open_clip):
    from capdec.encoders import load_encoder

    for spec in (tiny_hf_clip, tiny_open_clip, "toy"):
        assert load_encoder(spec, device="cpu").image_size == 32, spec
