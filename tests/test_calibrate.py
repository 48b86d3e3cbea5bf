"""capdec.calibrate / ``capdec calibrate``: ε from paired images and captions, noise.json, bad inputs.

Runs a tiny random-weight transformers CLIP (tests/tiny_models.py) on the 17 real COCO photos in
tests/data/coco/images (CC BY / BY-SA 2.0, attribution in tests/data/coco/README.md) with their captions.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from capdec.calibrate import (
    NOISE_FORMAT,
    calibrate,
    list_images,
    load_image,
    read_noise_file,
    read_pairs,
    write_noise_file,
)
from capdec.cli import main
from capdec.encoders import EncoderError, EncoderMismatchError, load_encoder
from capdec.errors import InputError


@pytest.fixture(scope="module")
def photos(coco_dir):
    folder = coco_dir / "images"
    return folder, folder / "captions.json"


@pytest.fixture(scope="module")
def encoder(tiny_hf_clip):
    # float32: the hand computation batches captions differently, which bf16 text (auto on AMX CPUs) rounds
    # differently at ~1e-4
    return load_encoder(tiny_hf_clip, device="cpu", precision="fp32")


@pytest.fixture(scope="module", params=["hf", "toy"])
def any_encoder(request):
    """The tiny transformers CLIP, and the toy world's mini-CLIP when its weights are shipped."""
    if request.param == "toy":
        try:
            return load_encoder("toy", device="cpu")
        except EncoderError as e:
            pytest.skip(f"the toy encoder is not available: {e}")
    return request.getfixturevalue("encoder")


def hand_epsilon(encoder, paths, captions) -> dict[str, float]:
    """The paper's rule written out in numpy from the encoder's own embeddings."""
    v = encoder.encode_image([load_image(p) for p in paths]).double().numpy()
    t_list = [encoder.encode_text(cs).double().numpy() for cs in captions]
    v = v / np.linalg.norm(v, axis=1, keepdims=True)
    linf, l2, cos = [], [], []
    for vi, ts in zip(v, t_list):
        for t in ts:
            t = t / np.linalg.norm(t)
            linf.append(np.abs(vi - t).max())
            l2.append(np.linalg.norm(vi - t))
            cos.append(vi @ t)
    return {"epsilon": float(np.mean(linf)), "std_linf": float(np.std(linf)), "mean_l2": float(np.mean(l2)),
            "mean_cosine": float(np.mean(cos)), "n_pairs": len(linf)}


def test_epsilon_is_the_papers_rule(any_encoder, photos):
    encoder = any_encoder
    folder, captions = photos
    paths, caps = read_pairs(folder, captions=captions)
    assert len(paths) == 17 and all(len(c) == 5 for c in caps)
    paths, caps = paths[:3], [c[:5] for c in caps[:3]]  # 15 pairs, as in the paper
    stats = calibrate(encoder, paths, caps)
    expected = hand_epsilon(encoder, paths, caps)
    assert stats["n_pairs"] == 15 and stats["n_paired_images"] == 3
    for key in ("epsilon", "std_linf", "mean_l2", "mean_cosine"):
        assert stats[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-9), key
    assert stats["mean_linf"] == stats["epsilon"] and stats["variance"] == pytest.approx(stats["epsilon"] ** 2)
    assert stats["format"] == NOISE_FORMAT and stats["encoder"] == encoder.spec
    assert stats["encoder_identity"] == encoder.identity and stats["dim"] == encoder.dim
    assert "offset" not in stats  # centroids only with extra images
    # PIL images work as well as paths
    assert calibrate(encoder, [load_image(p) for p in paths], caps)["epsilon"] == pytest.approx(stats["epsilon"])


def test_centroids_and_offset(encoder, photos):
    folder, captions = photos
    paths, caps = read_pairs(folder, captions=captions)
    pairs = paths[:4], caps[:4]
    extra = list_images(folder)  # includes the 4 paired images: they count once
    stats = calibrate(encoder, *pairs, extra_images=extra)
    assert stats["n_images"] == 17 and stats["n_texts"] == 20
    v = encoder.encode_image([load_image(p) for p in paths]).double()  # same order as list_images
    t = encoder.encode_text([c for cs in caps[:4] for c in cs]).double()
    image_mean = (v / v.norm(dim=-1, keepdim=True)).mean(0).numpy()
    text_mean = (t / t.norm(dim=-1, keepdim=True)).mean(0).numpy()
    assert np.allclose(stats["image_mean"], image_mean, atol=1e-6)
    assert np.allclose(stats["text_mean"], text_mean, atol=1e-6)
    assert np.allclose(stats["offset"], image_mean - text_mean, atol=1e-6)
    assert stats["offset_norm"] == pytest.approx(float(np.linalg.norm(image_mean - text_mean)), rel=1e-6)
    assert len(stats["offset"]) == encoder.dim


def test_cli_writes_noise_file_that_round_trips(tiny_hf_clip, encoder, photos, tmp_path, capsys):
    folder, captions = photos
    out = tmp_path / "noise.json"
    assert main(["-q", "calibrate", str(folder), "--captions", str(captions), "--encoder", tiny_hf_clip,
                 "--device", "cpu", "--precision", "fp32", "--images", str(folder), "--max-pairs", "15",
                 "--out", str(out)]) == 0
    assert "ε = " in capsys.readouterr().out
    raw = json.loads(out.read_text())
    assert raw["n_pairs"] == 15 and raw["n_paired_images"] == 3 and raw["n_images"] == 17
    noise = read_noise_file(out, encoder_identity=encoder.identity)
    assert noise == raw  # nothing lost or changed on the way
    assert noise["variance"] == pytest.approx(noise["epsilon"] ** 2) and len(noise["offset"]) == encoder.dim
    paths, caps = read_pairs(folder, captions=captions)
    assert noise["epsilon"] == pytest.approx(hand_epsilon(encoder, paths[:3], caps[:3])["epsilon"], rel=1e-6)


def test_pairs_jsonl_with_relative_paths(tiny_hf_clip, photos, tmp_path):
    folder, captions = photos
    caps = json.loads(captions.read_text(encoding="utf-8"))
    names = sorted(caps)[:2]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"image": n, "caption": c}) + "\n" for n in names for c in caps[n][:2]),
                     encoding="utf-8")
    paths, got = read_pairs(pairs, images_root=folder)
    assert [p.name for p in paths] == names and got == [caps[n][:2] for n in names]
    out = tmp_path / "noise.json"
    assert main(["-q", "calibrate", str(pairs), "--images-root", str(folder), "--encoder", tiny_hf_clip,
                 "--device", "cpu", "--out", str(out)]) == 0
    assert read_noise_file(out)["n_pairs"] == 4


# ---------------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------------
def test_missing_image_names_line_and_path(tmp_path, photos, tiny_hf_clip, capsys):
    folder, _ = photos
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"image": str(folder / "000000000785.jpg"), "caption": "a skier"}) + "\n"
                     + json.dumps({"image": "nope.jpg", "caption": "a cat"}) + "\n")
    with pytest.raises(InputError, match=r"pairs\.jsonl: line 2: image file not found: .*nope\.jpg"):
        read_pairs(pairs)
    assert main(["calibrate", str(pairs), "--encoder", tiny_hf_clip, "--out", str(tmp_path / "n.json")]) == 2
    assert "nope.jpg" in capsys.readouterr().err
    assert not (tmp_path / "n.json").exists()


def test_corrupt_image_is_a_clear_error(tmp_path, encoder):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    # calibration loads images like captioning does (capdec.images): same reasons, same pixels
    with pytest.raises(InputError, match=r"broken\.jpg: corrupt or truncated image data"):
        calibrate(encoder, [bad], ["a caption"])
    with pytest.raises(InputError, match=r"missing\.png: cannot read the file"):
        load_image(tmp_path / "missing.png")


def test_empty_and_malformed_pairs_files(tmp_path, photos):
    empty = tmp_path / "pairs.jsonl"
    empty.write_text("")
    with pytest.raises(InputError, match="empty"):
        read_pairs(empty)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "a.jpg", "caption": "x"}\n{"image": "b.jpg", "caption": }\n')
    with pytest.raises(InputError, match=r"bad\.jsonl: line 2 column \d+: malformed JSON"):
        read_pairs(bad)
    nocap = tmp_path / "nocap.jsonl"
    nocap.write_text(json.dumps({"image": "a.jpg", "caption": ""}) + "\n")
    with pytest.raises(InputError, match=r"line 1: 'caption' must be a non-empty string"):
        read_pairs(nocap)
    folder, _ = photos
    with pytest.raises(InputError, match="also give the captions file"):
        read_pairs(folder)
    other = tmp_path / "caps.json"
    other.write_text(json.dumps({"unrelated.jpg": ["a cat"]}))
    with pytest.raises(InputError, match="no image in .* has captions"):
        read_pairs(folder, captions=other)
    with pytest.raises(InputError, match="no image/caption pairs"):
        calibrate(None, [], [])


def test_noise_file_validation_and_encoder_mismatch(encoder, photos, tmp_path):
    folder, captions = photos
    paths, caps = read_pairs(folder, captions=captions)
    stats = calibrate(encoder, paths[:2], caps[:2], extra_images=paths[2:4])
    good = tmp_path / "noise.json"
    write_noise_file(good, stats)
    # a different encoder (another CLIP's weights) is refused, naming the file
    other = dict(encoder.identity, weights_sha256="0123456789abcdef")
    with pytest.raises(EncoderMismatchError, match="noise file .*noise.json.*weights_sha256"):
        read_noise_file(good, encoder_identity=other)
    read_noise_file(good, encoder_identity=encoder.identity)

    def broken(**changes) -> str:
        path = tmp_path / "broken.json"
        data = {k: v for k, v in dict(stats, **changes).items() if v is not None}
        path.write_text(json.dumps(data))
        return str(path)

    with pytest.raises(InputError, match="not a capdec noise file"):
        read_noise_file(broken(format="something/else"))
    with pytest.raises(InputError, match="'variance' must be a finite number"):
        read_noise_file(broken(variance=-1.0))
    with pytest.raises(InputError, match="neither 'variance' nor 'epsilon'"):
        read_noise_file(broken(variance=None, epsilon=None))
    with pytest.raises(InputError, match="'offset' has 3 values but the encoder dimension is 32"):
        read_noise_file(broken(offset=[0.0, 1.0, 2.0]))
    with pytest.raises(InputError, match="'offset' must be a non-empty list of finite numbers"):
        read_noise_file(broken(offset=[0.0, "x"]))
    (tmp_path / "trunc.json").write_text(good.read_text()[:200])
    with pytest.raises(InputError, match=r"trunc\.json: line \d+ column \d+: malformed JSON"):
        read_noise_file(tmp_path / "trunc.json")
    with pytest.raises(InputError, match="noise file not found"):
        read_noise_file(tmp_path / "absent.json")
    # a hand-written minimal file: epsilon alone gives the variance
    minimal = tmp_path / "minimal.json"
    minimal.write_text(json.dumps({"format": NOISE_FORMAT, "epsilon": 0.1}))
    got = read_noise_file(minimal)
    assert math.isclose(got["variance"], 0.01) and got["epsilon"] == 0.1


def test_folder_with_coco_annotations_as_captions(encoder, photos, tmp_path):
    """A folder of images + a COCO annotation file: images match by file name / COCO id."""
    folder, captions = photos
    caps = json.loads(captions.read_text(encoding="utf-8"))
    meta = json.loads((folder / "images_meta.json").read_text(encoding="utf-8"))
    names = sorted(caps)[:3]
    coco = {"images": [{"id": meta[n]["image_id"], "file_name": n} for n in names],
            "annotations": [{"image_id": meta[n]["image_id"], "id": k, "caption": c}
                            for k, (n, c) in enumerate((n, c) for n in names for c in caps[n])]}
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(coco))
    sub = tmp_path / "imgs"
    sub.mkdir()
    for n in names + [sorted(caps)[5]]:  # one image without captions: warned about, not used
        shutil.copy(folder / n, sub / n)
    paths, got = read_pairs(sub, captions=ann)
    assert [p.name for p in paths] == names and got == [caps[n] for n in names]


# ---------------------------------------------------------------------------------------------
# the gap's covariance and the centroids from a store (issue 22; issue 19 item 9)
# ---------------------------------------------------------------------------------------------
def hand_residuals(encoder, paths, captions) -> np.ndarray:
    """normalize(v) − normalize(t) of every pair, in numpy."""
    v = encoder.encode_image([load_image(p) for p in paths]).double().numpy()
    v = v / np.linalg.norm(v, axis=1, keepdims=True)
    rows = []
    for vi, cs in zip(v, captions):
        t = encoder.encode_text(cs).double().numpy()
        rows += list(vi - t / np.linalg.norm(t, axis=1, keepdims=True))
    return np.array(rows)


def test_gap_covariance_is_the_pairs_residual_covariance(encoder, photos):
    folder, captions = photos
    paths, caps = read_pairs(folder, captions=captions)
    paths, caps = paths[:5], caps[:5]  # 25 pairs
    r = hand_residuals(encoder, paths, caps)
    cov = np.cov(r, rowvar=False)  # (d, d), ddof 1
    evals, evecs = np.linalg.eigh(cov)
    top = evecs[:, ::-1][:, :4] * evals[::-1][:4]  # the 4 leading eigen-directions, scaled by λ
    low_rank = top @ evecs[:, ::-1][:, :4].T

    stats = calibrate(encoder, paths, caps, gap_rank=4, gap_shrinkage=0.0)
    factor, diag = np.array(stats["gap_factor"]), np.array(stats["gap_diag"])
    assert factor.shape == (4, encoder.dim) and stats["gap_rank"] == 4 and stats["gap_pairs"] == 25
    assert np.allclose(factor.T @ factor, low_rank, atol=1e-8)
    assert np.allclose(diag, np.clip(np.diag(cov) - np.diag(low_rank), 0, None), atol=1e-8)
    # a rank beyond the pairs' is cut to n − 1, and then the fit is the sample covariance itself
    full = calibrate(encoder, paths, caps, gap_rank=1000, gap_shrinkage=0.0)
    factor, diag = np.array(full["gap_factor"]), np.array(full["gap_diag"])
    assert full["gap_rank"] == min(24, encoder.dim)
    assert np.allclose(factor.T @ factor + np.diag(diag), cov, atol=1e-8)
    assert "gap_factor" not in calibrate(encoder, paths[:1], caps[:1])  # rank 0: none


def test_gap_covariance_is_shrunk_by_ledoit_wolf_by_default(encoder, photos):
    """Ledoit & Wolf (2004): α = min(1, Σᵢ‖xᵢxᵢᵀ − S‖²_F / n² / ‖S − m·I‖²_F), S the 1/n covariance,
    m = tr S / d; the fit is of (1 − α)·S_unbiased + α·m·I, full rank when asked."""
    folder, captions = photos
    paths, caps = read_pairs(folder, captions=captions)
    r = hand_residuals(encoder, paths[:3], caps[:3])  # 15 pairs: far fewer than the dimensions
    n, d = r.shape
    x = r - r.mean(0)
    s_n = x.T @ x / n
    m = np.trace(s_n) / d
    scatter = sum(np.sum((np.outer(xi, xi) - s_n) ** 2) for xi in x)  # the definition, one row at a time
    alpha = min(1.0, scatter / n**2 / np.sum((s_n - m * np.eye(d)) ** 2))
    target = (1 - alpha) * np.cov(r, rowvar=False) + alpha * np.trace(np.cov(r, rowvar=False)) / d * np.eye(d)

    stats = calibrate(encoder, paths[:3], caps[:3], gap_rank=d)
    assert stats["gap_shrinkage"] == pytest.approx(alpha, rel=1e-6) and 0 < alpha < 1
    factor, diag = np.array(stats["gap_factor"]), np.array(stats["gap_diag"])
    assert factor.shape == (d, d)  # shrunk, the covariance has every direction
    assert np.allclose(factor.T @ factor + np.diag(diag), target, atol=1e-8)
    assert np.linalg.eigvalsh(target).min() > 0.5 * alpha * m  # no direction left without noise
    fixed = calibrate(encoder, paths[:3], caps[:3], gap_rank=2, gap_shrinkage=0.5)
    assert fixed["gap_shrinkage"] == 0.5


def test_text_centroid_from_a_store_and_the_reference_offset(encoder, photos, hf_store, tmp_path):
    """The offset's text centre from the training captions' store (its first N rows, as CapDec's 20,000)."""
    from capdec.store import EmbeddingStore

    folder, captions = photos
    paths, caps = read_pairs(folder, captions=captions)
    store = EmbeddingStore.open(hf_store)
    rows = np.load(hf_store / "embeddings.npy").astype(np.float64)[:120]
    text_mean = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).mean(0)
    v = encoder.encode_image([load_image(p) for p in paths]).double().numpy()
    image_mean = (v / np.linalg.norm(v, axis=1, keepdims=True)).mean(0)

    stats = calibrate(encoder, paths[:2], caps[:2], extra_images=paths, text_store=store, max_texts=120)
    assert stats["text_mean_source"] == "store" and stats["n_texts"] == 120 and stats["n_images"] == 17
    assert np.allclose(stats["text_mean"], text_mean, atol=1e-6)
    assert np.allclose(stats["image_mean"], image_mean, atol=1e-6)
    assert np.allclose(stats["offset"], image_mean - text_mean, atol=1e-6)
    assert stats["renormalize_shift"] is True
    every = calibrate(encoder, paths[:2], caps[:2], text_store=store, reference_offset=True)
    assert every["n_texts"] == len(store) == 300 and every["renormalize_shift"] is False
    assert every["n_images"] == 2  # no unlabelled images: the paired ones
    # a store made by another encoder is refused
    other = tmp_path / "other"
    shutil.copytree(hf_store, other)
    meta = json.loads((other / "meta.json").read_text())
    meta["encoder_identity"] = dict(meta["encoder_identity"], weights_sha256="0123456789abcdef")
    (other / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(EncoderMismatchError, match="embedding store"):
        calibrate(encoder, paths[:2], caps[:2], text_store=EmbeddingStore.open(other))


def test_cli_store_offset_and_gap_train_and_caption(tiny_hf_clip, encoder, photos, hf_store, tmp_path, capsys):
    """calibrate --store --images --gap-rank --reference-offset -> train --noise-shape gap --use-offset ->
    caption --shift: every value travels through the files."""
    import torch

    from capdec.checkpoint import load_checkpoint

    folder, captions = photos
    noise = tmp_path / "noise.json"
    assert main(["-q", "calibrate", str(folder), "--captions", str(captions), "--encoder", tiny_hf_clip,
                 "--device", "cpu", "--max-pairs", "15", "--images", str(folder), "--store", str(hf_store),
                 "--max-texts", "200", "--gap-rank", "6", "--reference-offset", "--out", str(noise)]) == 0
    assert "gap covariance of rank 6" in capsys.readouterr().out
    raw = json.loads(noise.read_text())
    assert raw["format"] == NOISE_FORMAT == "capdec.noise/2"
    assert raw["n_texts"] == 200 and raw["renormalize_shift"] is False and raw["store_source"] == str(hf_store)
    assert read_noise_file(noise, encoder_identity=encoder.identity) == raw

    ckpt = tmp_path / "ckpt"
    assert main(["-q", "train", str(hf_store), "--out", str(ckpt), "--noise-file", str(noise), "--noise-shape", "gap",
                 "--noise-gap-scale", "2", "--use-offset", "--max-steps", "2", "--batch-size", "8", "--lm-dim", "32",
                 "--lm-depth", "1", "--lm-heads", "2", "--mapper-depth", "1", "--mapper-heads", "2",
                 "--prefix-length", "2", "--vocab-size", "300", "--device", "cpu"]) == 0
    recorded = load_checkpoint(ckpt, device="cpu").noise
    assert recorded.shape == "gap" and recorded.gap_scale == 2.0 and recorded.variance == 0.0
    assert recorded.gap_factor == raw["gap_factor"] and recorded.gap_diag == raw["gap_diag"]
    assert recorded.offset == raw["offset"]
    assert "the modality gap's covariance (rank 6 + diagonal) × 2.0" in (ckpt / "README.md").read_text()

    out = tmp_path / "caps.jsonl"
    assert main(["-q", "caption", str(ckpt), str(folder), "--shift", str(noise), "--strategy", "greedy",
                 "--max-length", "3", "--device", "cpu", "--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 17

    # the shape needs a covariance; the isotropic default keeps the file's ε² and ignores its covariance
    assert main(["-q", "train", str(hf_store), "--out", str(tmp_path / "x"), "--noise-shape", "gap"]) == 2
    assert "--noise-shape gap needs --noise-file" in capsys.readouterr().err
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({k: v for k, v in raw.items() if not k.startswith("gap_")}))
    assert main(["-q", "train", str(hf_store), "--out", str(tmp_path / "x"), "--noise-file", str(plain),
                 "--noise-shape", "gap"]) == 2
    assert "has no gap covariance" in capsys.readouterr().err
    assert torch.isfinite(torch.tensor(raw["gap_diag"])).all()


def test_cli_calibrate_store_flags_are_checked(tiny_hf_clip, photos, hf_store, tmp_path, capsys):
    folder, captions = photos
    base = ["-q", "calibrate", str(folder), "--captions", str(captions), "--encoder", tiny_hf_clip,
            "--out", str(tmp_path / "n.json")]
    for flags, message in ((["--max-texts", "10"], "--max-texts needs --store"),
                           (["--store", str(hf_store), "--max-texts", "0"], "--max-texts must be >= 1"),
                           (["--gap-rank", "-1"], "--gap-rank must be >= 0"),
                           (["--gap-rank", "2", "--gap-shrinkage", "1.5"], "--gap-shrinkage must be 'auto' or a"),
                           (["--reference-offset"], "--reference-offset needs an offset"),
                           (["--store", str(tmp_path / "absent")], "absent")):
        assert main(base + flags) == 2, flags
        assert message in capsys.readouterr().err
    assert not (tmp_path / "n.json").exists()


def test_version_1_noise_files_still_load(tmp_path):
    old = tmp_path / "noise.json"
    old.write_text(json.dumps({"format": "capdec.noise/1", "epsilon": 0.1, "variance": 0.01, "dim": 3,
                               "offset": [0.1, 0.0, -0.1]}))
    got = read_noise_file(old)
    assert got["variance"] == 0.01 and got["offset"] == [0.1, 0.0, -0.1] and "gap_diag" not in got
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": NOISE_FORMAT, "epsilon": 0.1, "dim": 2, "gap_diag": [0.1, 0.1]}))
    with pytest.raises(InputError, match="needs both 'gap_factor' and 'gap_diag'"):
        read_noise_file(bad)
    bad.write_text(json.dumps({"format": NOISE_FORMAT, "epsilon": 0.1, "dim": 2, "gap_diag": [0.1, -0.1],
                               "gap_factor": [[0.0, 1.0]]}))
    with pytest.raises(InputError, match="variances"):
        read_noise_file(bad)


def test_gap_from_unlabelled_images_and_their_nearest_captions(encoder, photos, hf_store, tiny_hf_clip, tmp_path,
                                                              capsys):
    """No captions needed: each image's K nearest store captions stand in for its own."""
    from capdec.store import EmbeddingStore

    folder, captions = photos
    paths, caps = read_pairs(folder, captions=captions)
    rows = np.load(hf_store / "embeddings.npy").astype(np.float64)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    v = encoder.encode_image([load_image(p) for p in paths]).double().numpy()
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    nearest = np.argsort(-(v @ rows.T), axis=1, kind="stable")[:, :3]  # written with numpy: the 3 nearest rows
    residuals = (v[:, None, :] - rows[nearest]).reshape(-1, v.shape[1])  # (17·3, d)
    cov = np.cov(residuals, rowvar=False)

    stats = calibrate(encoder, paths[:1], caps[:1], extra_images=paths, text_store=EmbeddingStore.open(hf_store),
                      gap_rank=1000, gap_neighbours=3, gap_shrinkage=0.0)
    assert stats["gap_pairs"] == 17 * 3 and stats["gap_source"] == "images and their 3 nearest store captions"
    factor, diag = np.array(stats["gap_factor"]), np.array(stats["gap_diag"])
    assert np.allclose(factor.T @ factor + np.diag(diag), cov, atol=1e-6)
    with pytest.raises(InputError, match="needs unlabelled images and the training store"):
        calibrate(encoder, paths[:1], caps[:1], gap_rank=4, gap_neighbours=3)

    out = tmp_path / "noise.json"
    base = ["-q", "calibrate", str(folder), "--captions", str(captions), "--encoder", tiny_hf_clip, "--device", "cpu",
            "--max-pairs", "5", "--out", str(out), "--gap-rank", "8", "--gap-neighbours", "2"]
    assert main([*base, "--store", str(hf_store), "--images", str(folder)]) == 0
    assert "from 34 images and their 2 nearest store captions" in capsys.readouterr().out
    assert read_noise_file(out)["gap_source"] == "images and their 2 nearest store captions"
    assert main(base) == 2
    assert "--gap-neighbours needs --gap-rank, --store" in capsys.readouterr().err
