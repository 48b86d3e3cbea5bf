"""capdec caption / Captioner end to end: a tiny real CLIP, a briefly trained checkpoint, real COCO photos
mixed with every kind of bad file."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import capdec
from capdec.caption import Captioner
from capdec.cli import main
from capdec.encoders import EncoderMismatchError, load_encoder
from capdec.errors import InputError
from capdec.images import ImageLoadError, load_image
from capdec.io.vectors import read_vector
from capdec.noise import shift_embeddings
from test_images import BOMB_LIMIT, ZOO_EXPECTED, make_image_zoo

COCO_PHOTOS = ["000000000785.jpg", "COCO_val2014_000000000257.jpg", "COCO_val2014_000000000544.jpg"]
GOOD = sorted(COCO_PHOTOS + [n for n, (kind, _) in ZOO_EXPECTED.items() if kind == "ok"])
BAD = sorted(n for n, (kind, _) in ZOO_EXPECTED.items() if kind == "skip")
TINY_MODEL = ["--prefix-length", "4", "--mapper-depth", "1", "--mapper-heads", "2", "--max-length", "16",
              "--lm-dim", "32", "--lm-depth", "2", "--lm-heads", "2", "--vocab-size", "400"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, coco_caption_file, tiny_hf_clip) -> Path:
    """embed + train through the CLI: 300 real COCO captions, tiny HF CLIP, a few epochs."""
    work = tmp_path_factory.mktemp("caption_ckpt")
    assert main(["-q", "embed", str(coco_caption_file), "--out", str(work / "store"), "--encoder", tiny_hf_clip]) == 0
    assert main(["-q", "train", str(work / "store"), "--out", str(work / "ckpt"), "--epochs", "4", "--batch-size", "32",
                 "--lr", "3e-3", "--dropout", "0", *TINY_MODEL]) == 0
    return work / "ckpt"


@pytest.fixture(scope="module")
def photos(coco_dir, tmp_path_factory) -> Path:
    """Real CC-licensed COCO photos (attribution: tests/data/coco/README.md)."""
    d = tmp_path_factory.mktemp("photos")
    for name in COCO_PHOTOS:
        shutil.copy(coco_dir / "images" / name, d / name)
    return d


@pytest.fixture(scope="module")
def mixed(photos, tmp_path_factory) -> Path:
    """The COCO photos plus one file of every awkward kind (tests/test_images.py's zoo)."""
    d = tmp_path_factory.mktemp("mixed")
    make_image_zoo(d)
    for p in photos.iterdir():
        shutil.copy(p, d / p.name)
    return d


@pytest.fixture(scope="module")
def captioner(checkpoint) -> Captioner:
    return Captioner.from_pretrained(checkpoint, device="cpu", max_pixels=BOMB_LIMIT, num_workers=2)


@pytest.fixture()
def encoded_sizes(monkeypatch) -> dict[tuple[int, int], int]:
    """Records the size of every image that reaches the CLIP image processor."""
    from capdec.encoders.hf import HFEncoder

    sizes: dict[tuple[int, int], int] = {}
    original = HFEncoder.image_transform

    def spy(self):
        transform = original(self)

        def recording(im):
            assert im.mode == "RGB"
            sizes[im.size] = sizes.get(im.size, 0) + 1
            return transform(im)

        return recording

    monkeypatch.setattr(HFEncoder, "image_transform", spy)
    return sizes


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- the CLI ------------------------------------------------------------------------------------------
def test_cli_captions_good_files_and_reports_bad_ones(checkpoint, mixed, tmp_path, capsys, encoded_sizes):
    out = tmp_path / "captions.jsonl"
    code = main(["caption", str(checkpoint), str(mixed), "--out", str(out), "--max-pixels", str(BOMB_LIMIT),
                 "--batch-size", "4", "--device", "cpu"])
    assert code == 1  # some files were skipped
    rows = _jsonl(out)
    assert [Path(r["image"]).name for r in rows] == GOOD  # complete for the good ones, sorted
    assert all(isinstance(r["caption"], str) and r["caption"].strip() for r in rows)
    err = capsys.readouterr().err
    summary = err[err.index(f"skipped {len(BAD)}:"):]
    for name in BAD:
        line = next(ln for ln in summary.splitlines() if name in ln)
        assert ZOO_EXPECTED[name][1] in line  # the reason is named with the file
    assert encoded_sizes.get((20, 40)) == 1 and (40, 20) not in encoded_sizes  # EXIF rotation applied


def test_cli_exit_0_when_all_captioned_and_stdout_default(checkpoint, photos, capsys):
    code = main(["-q", "caption", str(checkpoint), str(photos / "*.jpg"), "--strategy", "greedy", "--device", "cpu"])
    assert code == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted(Path(r["image"]).name for r in rows) == sorted(COCO_PHOTOS)


def test_cli_coco_and_csv_formats(checkpoint, photos, tmp_path, capsys):
    out = tmp_path / "results.json"
    bad = tmp_path / "COCO_val2014_000000000001.jpg"
    bad.write_bytes(b"")
    assert main(["-q", "caption", str(checkpoint), str(photos), str(bad), "--out", str(out), "--device", "cpu"]) == 1
    results = json.loads(out.read_text())
    assert sorted(r["image_id"] for r in results) == [257, 544, 785]
    assert all(set(r) == {"image_id", "caption"} for r in results)
    assert not Path(f"{out}.partial.jsonl").exists()  # removed once the JSON is complete

    table = tmp_path / "results.csv"
    assert main(["-q", "caption", str(checkpoint), str(photos), "--out", str(table), "--device", "cpu"]) == 0
    rows = list(csv.DictReader(io.StringIO(table.read_text())))
    assert [Path(r["image"]).name for r in rows] == sorted(COCO_PHOTOS)
    assert {r["caption"] for r in rows} == {r["caption"] for r in results}  # same model, same decoding


def test_cli_coco_ids_from_a_map_and_missing_ids_are_a_usage_error(checkpoint, photos, tmp_path, capsys):
    img = tmp_path / "holiday.jpg"
    shutil.copy(photos / COCO_PHOTOS[0], img)
    out = tmp_path / "r.json"
    assert main(["-q", "caption", str(checkpoint), str(img), "--format", "coco", "--out", str(out)]) == 2
    assert "holiday.jpg" in capsys.readouterr().err and not out.exists()
    ids = tmp_path / "ids.csv"
    ids.write_text("file_name,image_id\nholiday.jpg,42\n")
    assert main(["-q", "caption", str(checkpoint), str(img), "--format", "coco", "--out", str(out),
                 "--image-ids", str(ids), "--device", "cpu"]) == 0
    assert [r["image_id"] for r in json.loads(out.read_text())] == [42]


def test_cli_coco_output_keeps_partial_results_when_interrupted(checkpoint, photos, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = Captioner._caption_embeddings

    def fail_second_batch(self, emb, cfg):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash")
        return original(self, emb, cfg)

    monkeypatch.setattr(Captioner, "_caption_embeddings", fail_second_batch)
    out = tmp_path / "r.json"
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(["-q", "caption", str(checkpoint), str(photos), "--out", str(out), "--batch-size", "2", "--device", "cpu"])
    assert not out.exists()
    partial = _jsonl(Path(f"{out}.partial.jsonl"))
    assert [r["image_id"] for r in partial] == [785, 257]  # the first batch, in sorted file order


def test_cli_usage_errors_exit_2(checkpoint, photos, tmp_path, capsys):
    assert main(["-q", "caption", str(checkpoint), str(tmp_path / "nothing_here")]) == 2
    assert "nothing_here" in capsys.readouterr().err
    assert main(["-q", "caption", str(tmp_path), str(photos)]) == 2  # not a checkpoint
    assert "not a capdec checkpoint" in capsys.readouterr().err
    wrong = tmp_path / "shift.json"
    wrong.write_text("[0.1, 0.2]")
    assert main(["-q", "caption", str(checkpoint), str(photos), "--shift", str(wrong)]) == 2
    assert "2 values" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["caption", str(checkpoint), str(photos), "--strategy", "nucleus"])
    assert e.value.code == 2


def test_cli_shift_and_image_mean_files(checkpoint, photos, tmp_path, capsys):
    dim = 32
    noise = tmp_path / "noise.json"
    noise.write_text(json.dumps({"epsilon": 0.1, "offset": [0.05] * dim, "image_mean": [0.01] * dim}))
    mean = tmp_path / "mean.npy"
    np.save(mean, np.full(dim, 0.01, dtype=np.float32))
    assert read_vector(noise, keys=("offset",)) == pytest.approx([0.05] * dim)
    assert read_vector(mean) == pytest.approx([0.01] * dim)
    code = main(["-q", "caption", str(checkpoint), str(photos), "--shift", str(noise), "--image-mean", str(mean),
                 "--no-normalize", "--strategy", "greedy", "--device", "cpu"])
    assert code == 0 and len(capsys.readouterr().out.splitlines()) == len(COCO_PHOTOS)


def test_cli_projection_onto_a_text_memory(checkpoint, photos, capsys):
    store = checkpoint.parent / "store"  # the embedding store the checkpoint was trained from
    args = ["-q", "caption", str(checkpoint), str(photos), "--strategy", "greedy", "--device", "cpu", "--project"]
    assert main(args) == 2
    assert "needs a text memory" in capsys.readouterr().err
    assert main([*args, "--memory", str(store), "--tau", "0.05"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == len(COCO_PHOTOS)

    from capdec.memory import TextMemory

    c = Captioner.from_pretrained(checkpoint, device="cpu", memory=store, project=True, tau=0.05)
    v = torch.nn.functional.normalize(torch.randn(3, 32), dim=-1)
    expected = TextMemory.load(store).project(v, tau=0.05)
    assert torch.allclose(c.prepare(v), expected, atol=1e-5)


# -- encoders: the recorded one, a local copy, and refused mismatches -----------------------------------
def test_a_local_copy_of_the_encoder_is_accepted(checkpoint, photos, tiny_hf_clip, tmp_path, capsys):
    copy = tmp_path / "clip_copy"
    shutil.copytree(tiny_hf_clip.removeprefix("hf:"), copy)
    args = ["-q", "caption", str(checkpoint), str(photos), "--strategy", "greedy", "--device", "cpu"]
    assert main(args) == 0
    recorded = capsys.readouterr().out
    assert main([*args, "--encoder", f"hf:{copy}"]) == 0
    assert [json.loads(x)["caption"] for x in capsys.readouterr().out.splitlines()] == \
        [json.loads(x)["caption"] for x in recorded.splitlines()]


def test_mismatched_encoders_are_refused(checkpoint, photos, tmp_path, tiny_open_clip, capsys):
    from tiny_models import make_tiny_hf_clip

    other_weights = f"hf:{make_tiny_hf_clip(tmp_path / 'other', seed=1)}"
    out = tmp_path / "o.jsonl"
    assert main(["-q", "caption", str(checkpoint), str(photos), "--encoder", other_weights, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "different encoder" in err and "weights_sha256" in err and not out.exists()
    with pytest.raises(EncoderMismatchError, match="kind"):
        _ = Captioner.from_pretrained(checkpoint, encoder=tiny_open_clip, device="cpu").encoder


def test_encoder_of_another_dimension_is_refused(checkpoint, tiny_hf_clip, tmp_path):
    from transformers import CLIPConfig, CLIPModel

    src, dst = Path(tiny_hf_clip.removeprefix("hf:")), tmp_path / "clip16"
    shutil.copytree(src, dst)
    config = CLIPConfig.from_pretrained(src)
    config.projection_dim = 16
    CLIPModel(config).save_pretrained(dst)
    encoder = load_encoder(f"hf:{dst}", device="cpu")
    assert encoder.dim == 16
    with pytest.raises(EncoderMismatchError, match="16-d embeddings"):
        Captioner.from_pretrained(checkpoint, encoder=encoder, device="cpu")


# -- the Python API -----------------------------------------------------------------------------------
def test_captioner_on_pil_images_paths_and_embeddings(captioner, photos, monkeypatch):
    decoded: list[torch.Tensor] = []  # what reaches the decoder, per call
    original = Captioner._caption_embeddings

    def spy(self, emb, cfg):
        decoded.append(emb.clone())
        return original(self, emb, cfg)

    monkeypatch.setattr(Captioner, "_caption_embeddings", spy)
    paths = [photos / n for n in COCO_PHOTOS]
    # a path is decoded reduced to the encoder's input size (as capdec serve decodes uploads); an image is used as is
    images = [load_image(p, min_side=captioner.encoder.image_size) for p in paths]
    by_path = captioner.caption(paths, strategy="greedy", batch_size=2)
    assert len(by_path) == 3 and all(isinstance(c, str) and c for c in by_path)
    reference = torch.cat(decoded)
    assert torch.allclose(reference.norm(dim=-1), torch.ones(3), atol=1e-5)  # the encoder's, L2-normalised
    assert (reference[0] - reference[1]).abs().max() > 1e-3  # different photos, different embeddings

    emb = captioner.embed_images(images)
    assert emb.shape == (3, 32)
    for inputs in (images, [images[0], str(paths[1]), paths[2]], emb, emb.numpy()):
        decoded.clear()
        assert captioner.caption(inputs, strategy="greedy") == by_path
        assert torch.allclose(torch.cat(decoded), reference, atol=1e-5)
    assert captioner.caption(paths[0], strategy="greedy") == by_path[:1]
    assert captioner.caption(emb) == captioner.caption(paths)  # default decoding (beam) is deterministic


def test_captioner_streams_results_and_collects_skips(captioner, mixed):
    from capdec.images import find_images

    stream = captioner.stream(find_images(mixed), batch_size=5, strategy="greedy")
    seen = []
    for result in stream:
        seen.append(Path(result.image).name)
        assert stream.captioned >= 1  # results arrive while the run goes on
    assert seen == GOOD
    assert sorted(Path(s.image).name for s in stream.skipped) == BAD
    assert all(ZOO_EXPECTED[Path(s.image).name][1] in s.reason for s in stream.skipped)


def test_captioner_refuses_bad_inputs_with_clear_errors(captioner, mixed):
    with pytest.raises(ImageLoadError, match="empty.jpg: empty file"):
        captioner.caption([mixed / "empty.jpg"])
    with pytest.raises(InputError, match="dimension 5"):
        captioner.caption(torch.zeros(2, 5))
    with pytest.raises(InputError, match="unknown decoding option"):
        captioner.caption(torch.zeros(1, 32), beams=2)
    with pytest.raises(InputError, match="unknown inference option"):
        Captioner(captioner.checkpoint, temperature=2.0)
    with pytest.raises(InputError, match="3 values"):
        Captioner(captioner.checkpoint, shift=[0.0, 1.0, 2.0])


def test_inference_overrides_change_the_prepared_embeddings(captioner):
    v = torch.randn(4, 32)
    shift, mean = torch.full((32,), 0.1), torch.full((32,), 0.02)
    c = Captioner(captioner.checkpoint, shift=shift, image_mean=mean.numpy())
    expected = shift_embeddings(v, shift=shift, mean=mean, normalize_output=True)
    assert torch.allclose(c.prepare(v), expected, atol=1e-6)
    raw = Captioner(captioner.checkpoint, normalize=False)
    assert torch.allclose(raw.prepare(v), v)
    assert torch.allclose(captioner.prepare(v), torch.nn.functional.normalize(v, dim=-1), atol=1e-6)


def test_decoding_options_reach_the_decoder(captioner):
    emb = torch.nn.functional.normalize(torch.randn(6, 32), dim=-1)
    a = captioner.caption(emb, strategy="sample", seed=3, temperature=1.5)
    assert a == captioner.caption(emb, strategy="sample", seed=3, temperature=1.5)
    assert max(len(c.split()) for c in captioner.caption(emb, strategy="greedy", max_length=3)) <= 3


def test_shift_from_a_noise_file_moves_images_toward_the_text_cone(tmp_path):
    """calibrate's offset is image mean − text mean; the caption-time shift must be its opposite."""
    import argparse

    from capdec.cli.caption import _inference_overrides
    from capdec.noise import shift_embeddings

    g = torch.Generator().manual_seed(0)
    dim = 32
    image_cone, text_cone = torch.randn(dim, generator=g), torch.randn(dim, generator=g)
    images = torch.nn.functional.normalize(image_cone + 0.3 * torch.randn(50, dim, generator=g), dim=-1)
    texts = torch.nn.functional.normalize(text_cone + 0.3 * torch.randn(50, dim, generator=g), dim=-1)
    image_mean, text_mean = images.mean(0), texts.mean(0)
    noise = tmp_path / "noise.json"
    noise.write_text(json.dumps({"epsilon": 0.1, "offset": (image_mean - text_mean).tolist(),
                                 "image_mean": image_mean.tolist(), "text_mean": text_mean.tolist()}))
    args = argparse.Namespace(normalize=None, shift=str(noise), image_mean=None, project=None, tau=None,
                              project_k=None, renormalize_shift=None)
    assert "renormalize_shift" not in _inference_overrides(args)  # the file does not say: the checkpoint decides
    shift = _inference_overrides(args)["shift"]
    assert shift == pytest.approx((text_mean - image_mean).tolist(), abs=1e-6)
    shifted = shift_embeddings(images, shift=torch.tensor(shift), mean=None, normalize_output=True)
    cos = lambda x: torch.nn.functional.cosine_similarity(x, text_mean.expand_as(x)).mean()  # noqa: E731
    assert cos(shifted) > cos(images) + 0.1
    # an explicit {"shift": ...} file (or a plain list) is taken as it is
    explicit = tmp_path / "shift.json"
    explicit.write_text(json.dumps({"shift": [0.25] * dim}))
    args.shift = str(explicit)
    assert _inference_overrides(args)["shift"] == pytest.approx([0.25] * dim)


def test_reference_offset_is_added_without_renormalising(captioner, tmp_path):
    """An offset computed CapDec's way is applied as CapDec's predictions_runner.py does:
    ``normalize(v) + (text centre − image centre)``, not renormalised; capdec's own offsets are renormalised."""
    import argparse

    from capdec.cli.caption import _inference_overrides

    dim = 32
    g = torch.Generator().manual_seed(1)
    image_mean, text_mean = torch.randn(dim, generator=g) * 0.1, torch.randn(dim, generator=g) * 0.1
    v = torch.randn(5, dim, generator=g) * 3
    unit = v / v.norm(dim=-1, keepdim=True)
    calibrated = {"format": "capdec.noise/2", "epsilon": 0.1, "offset": (image_mean - text_mean).tolist()}
    reference = tmp_path / "reference.json"
    reference.write_text(json.dumps({**calibrated, "renormalize_shift": False}))
    ours = tmp_path / "ours.json"
    ours.write_text(json.dumps({**calibrated, "renormalize_shift": True}))
    centers = tmp_path / "centers.json"  # CapDec's CLIP_embeddings_centers_info.pkl, converted to JSON
    centers.write_text(json.dumps({"center_text": [text_mean.tolist()], "center_image": [image_mean.tolist()],
                                   "offset_to_add_in_training": [(image_mean - text_mean).tolist()],
                                   "offset_to_add_in_inference": [(text_mean - image_mean).tolist()]}))
    args = argparse.Namespace(normalize=None, shift=None, image_mean=None, project=None, tau=None, project_k=None,
                              renormalize_shift=None)

    def prepared(path, **flags):
        overrides = _inference_overrides(argparse.Namespace(**{**vars(args), "shift": str(path), **flags}))
        return Captioner(captioner.checkpoint, **overrides).prepare(v)

    as_is = unit + (text_mean - image_mean)  # written from the reference's two lines
    assert torch.allclose(prepared(reference), as_is, atol=1e-6)
    assert torch.allclose(prepared(centers), as_is, atol=1e-6)
    assert torch.allclose(prepared(ours), as_is / as_is.norm(dim=-1, keepdim=True), atol=1e-6)
    # the flag wins over what the file says
    assert torch.allclose(prepared(reference, renormalize_shift=True), as_is / as_is.norm(dim=-1, keepdim=True),
                          atol=1e-6)
    assert torch.allclose(prepared(ours, renormalize_shift=False), as_is, atol=1e-6)


# -- large images: decoded reduced, as capdec serve decodes uploads -------------------------------------
def _reduced_size(width: int, height: int, min_side: int, jpeg: bool) -> tuple[int, int]:
    """The size a reduced decode gives, from its definition: a JPEG's decoder scales by 1/2, 1/4 or 1/8 as far as
    the short side stays ≥ min_side (rounding up), then a box average by the integer factor short side // min_side."""
    if jpeg:
        scale = max(s for s in (1, 2, 4, 8) if min(width, height) / s >= min_side)
        width, height = -(-width // scale), -(-height // scale)
    f = min(width, height) // min_side
    return -(-width // f), -(-height // f)


@pytest.fixture(scope="module")
def large(photos, tmp_path_factory) -> list[Path]:
    """A COCO photo enlarged to 2000x1500, as a JPEG and a PNG (sorted as capdec caption sorts its inputs)."""
    d = tmp_path_factory.mktemp("large")
    big = load_image(photos / COCO_PHOTOS[0]).resize((2000, 1500), resample=3)  # bicubic
    big.save(d / "large.jpg", quality=90)
    big.save(d / "large.png", compress_level=1)
    return [d / "large.jpg", d / "large.png"]


def test_caption_and_serve_embed_and_caption_a_large_image_alike(checkpoint, large, tmp_path, monkeypatch):
    """capdec caption decodes a large file as capdec serve decodes the same upload (reduced to the encoder's input
    size): the encoder gets the same pixels, so the embeddings are equal and so are the captions."""
    for module in ("fastapi", "uvicorn", "multipart"):
        pytest.importorskip(module)
    httpx = pytest.importorskip("httpx")
    from capdec.encoders.hf import HFEncoder
    from capdec.serve import ServerThread, ServeSettings, create_app

    embedded: list[tuple[tuple[int, int], torch.Tensor]] = []  # (image size, raw embedding) of every image encoded
    original = HFEncoder.encode_image

    def spy(self, images, **kw):
        emb = original(self, images, **kw)
        embedded.extend(zip([im.size for im in images], emb.clone()))
        return emb

    monkeypatch.setattr(HFEncoder, "encode_image", spy)
    out = tmp_path / "captions.jsonl"
    assert main(["-q", "caption", str(checkpoint), *map(str, large), "--out", str(out), "--strategy", "greedy"]) == 0
    by_caption = list(embedded)
    captions = {Path(r["image"]).name: r["caption"] for r in _jsonl(out)}

    embedded.clear()
    captioner = Captioner.from_pretrained(checkpoint, device="cpu")
    with ServerThread(create_app(captioner, ServeSettings(max_upload_mb=20))) as server:
        answer = httpx.post(f"{server.url}/caption", files=[("image", (p.name, p.read_bytes())) for p in large],
                            data={"strategy": "greedy"}, timeout=60)
    assert answer.status_code == 200, answer.text
    assert {c["image"]: c["caption"] for c in answer.json()["captions"]} == captions
    by_serve = list(embedded)

    side = captioner.encoder.image_size
    expected_sizes = [_reduced_size(2000, 1500, side, jpeg=True), _reduced_size(2000, 1500, side, jpeg=False)]
    assert expected_sizes == [(50, 38), (44, 33)]  # the definition worked out for side 32
    assert [size for size, _ in by_caption] == [size for size, _ in by_serve] == expected_sizes
    for (_, a), (_, b) in zip(by_caption, by_serve):
        assert torch.equal(a, b)
    # not equal by accident: the whole decode gives other embeddings (what capdec caption gave before)
    whole = original(captioner.encoder, [load_image(p) for p in large])
    for (_, a), w in zip(by_caption, whole):
        assert (a - w).abs().max() > 1e-4


_PEAK_SCRIPT = """
import json, sys
from pathlib import Path
from capdec.caption import Captioner

def status(field):  # bytes (/proc reports kB)
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
    return int(line.split()[1]) * 1024

checkpoint, small, *large = sys.argv[1:]
captioner = Captioner.from_pretrained(checkpoint, device="cpu", num_workers=0)
assert [r.caption for r in captioner.stream([small])]  # model, encoder and PNG decoder warmed up
before = status("VmRSS")
Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from the resident size now
captioned = sum(len(batch) for batch in captioner.stream(large, batch_size=64).batches())
print(json.dumps({"before": before, "peak": status("VmHWM"), "captioned": captioned}))
"""


def test_captioning_large_pngs_holds_them_reduced(checkpoint, tmp_path):
    """Peak memory of captioning 8 PNGs of 3000x2000 in one batch: a PNG is decoded whole (no reduced decoding in
    the format), but only its reduction is kept, so the batch costs about one full image (24 MB in PIL's 4 bytes a
    pixel), not eight (what holding them decoded whole would cost)."""
    from PIL import Image

    width, height, n = 3000, 2000, 8
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([255 * x / width, 255 * y / height, 128 + 100 * np.sin(x / 37.0) * np.cos(y / 53.0)], axis=-1)
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(tmp_path / "large0.png", compress_level=1)
    large = [tmp_path / f"large{i}.png" for i in range(n)]
    for p in large[1:]:
        shutil.copy(large[0], p)
    Image.new("RGB", (64, 48), (10, 200, 30)).save(tmp_path / "small.png")
    env = {**os.environ, "PYTHONPATH": str(Path(capdec.__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(checkpoint), str(tmp_path / "small.png"),
                           *map(str, large)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["captioned"] == n
    full = width * height * 4
    growth = result["peak"] - result["before"]
    assert growth < 2 * full, f"captioning {n} large PNGs raised the peak by {growth / 2**20:.0f} MiB"


def test_an_extreme_aspect_ratio_is_skipped_and_listed_as_serve_refuses_it(checkpoint, tmp_path, capsys):
    from PIL import Image

    Image.new("RGB", (800, 40), (30, 30, 200)).save(tmp_path / "panorama.png")  # 20:1: the limit, allowed
    Image.new("RGB", (2100, 100), (200, 30, 30)).save(tmp_path / "strip.png")  # 21:1
    out = tmp_path / "out.jsonl"
    assert main(["caption", str(checkpoint), str(tmp_path / "panorama.png"), str(tmp_path / "strip.png"),
                 "--out", str(out), "--strategy", "greedy"]) == 1
    assert [Path(r["image"]).name for r in _jsonl(out)] == ["panorama.png"]
    err = capsys.readouterr().err
    assert "strip.png: 2100x100: aspect ratio 21:1 is over the limit of 20:1" in err[err.index("skipped 1:"):]
    assert main(["-q", "caption", str(checkpoint), str(tmp_path / "strip.png"), "--out", str(out),
                 "--max-aspect-ratio", "0"]) == 0  # no limit
    assert [Path(r["image"]).name for r in _jsonl(out)] == ["strip.png"]
    assert main(["-q", "caption", str(checkpoint), str(tmp_path / "strip.png"), "--max-aspect-ratio", "0.5"]) == 2
    assert "--max-aspect-ratio must be ≥ 1 (or 0: no limit), got 0.5" in capsys.readouterr().err
