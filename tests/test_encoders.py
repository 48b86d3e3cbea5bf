"""The hf and open_clip encoder backends, on tiny real architectures saved like a user's local copy.

Parity is checked against each upstream library's own forward (transformers ``CLIPModel`` +
``CLIPProcessor``; open_clip ``encode_text``/``encode_image`` + its tokenizer and preprocessing).
Everything is offline: the models are built by ``tiny_models`` into temporary directories.
"""

from __future__ import annotations

import json
import shutil
import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from capdec.encoders import EncoderError, EncoderMismatchError, load_encoder
from tiny_models import (
    CLIP_VOCAB_SIZE,
    TINY_DIM,
    make_tiny_hf_clip,
    make_tiny_open_clip,
    tiny_open_clip_config,
)

LONG = "a photo of " + "a very " * 60 + "big dog"  # ~125 BPE tokens, over CLIP's 77
TEXTS = ["a photo of a cat", "Two DOGS playing in the snow!", "café au lait, s'il vous plaît", "x", LONG]


def _images(n: int = 5) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    sizes = [(32, 32), (48, 40), (40, 64), (17, 33), (100, 50)]
    ims = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes[:n]]
    ims[-1] = ims[-1].convert("L")  # encoders convert to RGB, as the reference processors do
    return ims


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5) -> None:
    assert a.shape == b.shape
    assert torch.allclose(a, b, atol=atol), (a - b).abs().max().item()


def _check_contract(enc, x: torch.Tensor, n: int) -> None:
    assert x.dtype == torch.float32 and x.device.type == "cpu"
    assert x.shape == (n, enc.dim) == (n, TINY_DIM)
    _close(x.norm(dim=-1), torch.ones(n))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_tiny_hf_clip(tmp_path_factory.mktemp("hf_clip"))


# parity with the upstream libraries is a float32 matter: "auto" runs text in bf16 on CPUs with AMX
# (tests/test_text_batching.py checks that against float32)
@pytest.fixture(scope="module")
def hf_enc(hf_dir):
    return load_encoder(f"hf:{hf_dir}", device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def oc_spec(tmp_path_factory):
    return make_tiny_open_clip(tmp_path_factory.mktemp("open_clip"))


@pytest.fixture(scope="module")
def oc_enc(oc_spec):
    return load_encoder(oc_spec, device="cpu", precision="fp32")


# -- hf ------------------------------------------------------------------------------------------
def test_hf_tokenizer_is_the_real_clip_bpe(hf_enc):
    import open_clip

    assert len(hf_enc.tokenizer) == CLIP_VOCAB_SIZE
    assert hf_enc.context_length == 77
    # the same ids as open_clip's shipped tokenizer (both are OpenAI's BPE)
    ref = open_clip.get_tokenizer("ViT-B-32")(["a photo of a cat"])[0]
    ids = hf_enc.tokenizer(["a photo of a cat"])["input_ids"][0]
    assert ids == ref[: len(ids)].tolist() and ids[0] == 49406 and ids[-1] == 49407


def test_hf_parity_with_transformers(hf_dir, hf_enc):
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(hf_dir, local_files_only=True).eval()
    proc = CLIPProcessor.from_pretrained(hf_dir, local_files_only=True)
    ims = _images()
    with torch.inference_mode():
        t = model.get_text_features(**proc(text=TEXTS, padding=True, truncation=True, return_tensors="pt"))
        i = model.get_image_features(**proc(images=[im.convert("RGB") for im in ims], return_tensors="pt"))
    t, i = (o if isinstance(o, torch.Tensor) else o.pooler_output for o in (t, i))
    x, y = hf_enc.encode_text(TEXTS), hf_enc.encode_image(ims)
    _check_contract(hf_enc, x, len(TEXTS))
    _check_contract(hf_enc, y, len(ims))
    _close(x, F.normalize(t, dim=-1))
    _close(y, F.normalize(i, dim=-1))


def test_hf_batching_invariance(hf_enc):
    ims = _images()
    _close(hf_enc.encode_text(TEXTS, batch_size=1), hf_enc.encode_text(TEXTS, batch_size=64))
    _close(hf_enc.encode_image(ims, batch_size=1), hf_enc.encode_image(ims, batch_size=64))
    assert hf_enc.encode_text([]).shape == (0, TINY_DIM)


def test_hf_count_truncated(hf_enc):
    assert hf_enc.count_truncated(TEXTS) == 1
    assert hf_enc.count_truncated(["a dog"] * 3) == 0
    assert hf_enc.count_truncated([]) == 0


def test_hf_spec_round_trip_and_local_copy(hf_dir, hf_enc, tmp_path, monkeypatch):
    again = load_encoder(hf_enc.spec, device="cpu")
    assert again.identity == hf_enc.identity
    assert load_encoder(json.dumps(hf_enc.spec), device="cpu").identity == hf_enc.identity
    # a copy elsewhere, named by a relative path, is the same encoder; the spec records it absolute
    shutil.copytree(hf_dir, tmp_path / "copy")
    monkeypatch.chdir(tmp_path)
    copy = load_encoder("hf:./copy", device="cpu")
    assert copy.spec["model"] == str((tmp_path / "copy").resolve())
    copy.check_compatible(hf_enc.identity)
    assert json.loads(json.dumps(copy.identity)) == copy.identity


def test_hf_identity_differs_for_other_weights(hf_enc, tmp_path):
    other = load_encoder(f"hf:{make_tiny_hf_clip(tmp_path / 'seed1', seed=1)}", device="cpu")
    diff = {k for k in hf_enc.identity if hf_enc.identity[k] != other.identity[k]}
    assert diff == {"weights_sha256"}
    with pytest.raises(EncoderMismatchError, match="weights_sha256"):
        other.check_compatible(hf_enc.identity)


def test_hf_low_precision_still_float32_output(hf_dir, hf_enc):
    bf16 = load_encoder(f"hf:{hf_dir}", device="cpu", precision="bf16")
    assert bf16.identity == hf_enc.identity  # fingerprint taken before the cast
    x = bf16.encode_text(TEXTS[:2])
    assert x.dtype == torch.float32
    assert F.cosine_similarity(x, hf_enc.encode_text(TEXTS[:2])).min() > 0.98


def test_hf_missing_local_path_never_touches_network(monkeypatch, tmp_path):
    def no_network(*args, **kwargs):
        raise AssertionError("tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    import transformers

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_network)
    for missing in [str(tmp_path / "nope"), "./nope", "models/clip/nope", "~/nope-capdec"]:
        with pytest.raises(EncoderError, match="no such directory"):
            load_encoder(f"hf:{missing}")


def test_hf_bad_specs(hf_dir, tmp_path):
    with pytest.raises(EncoderError, match="empty hf encoder spec"):
        load_encoder("hf:")
    with pytest.raises(EncoderError, match="unknown encoder kind"):
        load_encoder("nope:x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EncoderError, match="no config.json"):
        load_encoder(f"hf:{tmp_path / 'empty'}")
    with pytest.raises(EncoderError, match="is a file"):
        load_encoder(f"hf:{hf_dir / 'config.json'}")


def test_hf_missing_tokenizer_files_is_an_error(hf_dir, tmp_path):
    # without its vocabulary files transformers builds a 3-token CLIP tokenizer without complaint
    broken = tmp_path / "broken"
    shutil.copytree(hf_dir, broken)
    for name in ["tokenizer.json", "vocab.json", "merges.txt"]:
        (broken / name).unlink()
    with pytest.raises(EncoderError, match="tokenizer"):
        load_encoder(f"hf:{broken}", device="cpu")


# -- open_clip -----------------------------------------------------------------------------------
def test_open_clip_parity_with_upstream(oc_spec, oc_enc):
    import open_clip

    name = oc_spec.removeprefix("open_clip:")
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    tokenizer = open_clip.get_tokenizer(name)
    model.eval()
    ims = _images()
    with torch.inference_mode():
        t = model.encode_text(tokenizer(TEXTS), normalize=True)
        i = model.encode_image(torch.stack([preprocess(im.convert("RGB")) for im in ims]), normalize=True)
    assert oc_enc.tokenizer.vocab_size == CLIP_VOCAB_SIZE and oc_enc.context_length == 77
    x, y = oc_enc.encode_text(TEXTS), oc_enc.encode_image(ims)
    _check_contract(oc_enc, x, len(TEXTS))
    _check_contract(oc_enc, y, len(ims))
    _close(x, t)
    _close(y, i)


def test_open_clip_batching_and_truncation(oc_enc):
    ims = _images()
    _close(oc_enc.encode_text(TEXTS, batch_size=1), oc_enc.encode_text(TEXTS, batch_size=64))
    _close(oc_enc.encode_image(ims, batch_size=1), oc_enc.encode_image(ims, batch_size=64))
    assert oc_enc.count_truncated(TEXTS) == 1
    assert oc_enc.count_truncated(["a dog"]) == 0


def test_open_clip_spec_forms_and_round_trip(oc_spec, oc_enc, tmp_path):
    import open_clip

    assert load_encoder(oc_enc.spec, device="cpu").identity == oc_enc.identity
    directory = oc_spec.removeprefix("open_clip:local-dir:")
    bare = load_encoder(f"open_clip:{directory}", device="cpu")  # a bare directory means local-dir
    assert bare.spec == oc_enc.spec and bare.identity == oc_enc.identity
    # MODEL@FILE: a registered config name plus the local weights file is the same encoder
    (tmp_path / "capdec-tiny-vit.json").write_text(json.dumps(tiny_open_clip_config()["model_cfg"]))
    open_clip.add_model_config(tmp_path / "capdec-tiny-vit.json")
    by_file = load_encoder(f"open_clip:capdec-tiny-vit@{directory}/open_clip_model.safetensors", device="cpu",
                           precision="fp32")
    assert by_file.spec["pretrained"].endswith("open_clip_model.safetensors")
    assert by_file.identity == oc_enc.identity
    _close(by_file.encode_text(TEXTS), oc_enc.encode_text(TEXTS))


def test_open_clip_identity_differs_for_other_weights(oc_enc, tmp_path):
    other = load_encoder(make_tiny_open_clip(tmp_path / "seed1", seed=1), device="cpu")
    assert {k for k in oc_enc.identity if oc_enc.identity[k] != other.identity[k]} == {"weights_sha256"}
    with pytest.raises(EncoderMismatchError):
        other.check_compatible(oc_enc.identity)


@pytest.mark.parametrize("spec, message", [
    ("open_clip:", "empty open_clip encoder spec"),
    ("open_clip:local-dir:/nonexistent/capdec-model", "no such directory"),
    ("open_clip:/nonexistent/capdec-model", "no such directory"),
    ("open_clip:ViT-Q-99@openai", "unknown model"),
    ("open_clip:ViT-B-32", "needs weights"),
    ("open_clip:ViT-B-32@not_a_tag", "unknown pretrained tag"),
    ("open_clip:ViT-B-32@/nonexistent/vitb32.safetensors", "no such weights file"),
])
def test_open_clip_bad_specs(spec, message):
    with pytest.raises(EncoderError, match=message):
        load_encoder(spec)


def test_open_clip_local_dir_without_weights(oc_spec, tmp_path):
    src = oc_spec.removeprefix("open_clip:local-dir:")
    (tmp_path / "d").mkdir()
    shutil.copy(f"{src}/open_clip_config.json", tmp_path / "d")
    with pytest.raises(EncoderError, match="no weights file"):
        load_encoder(f"open_clip:local-dir:{tmp_path / 'd'}")
    (tmp_path / "e").mkdir()
    with pytest.raises(EncoderError, match="open_clip_config.json"):
        load_encoder(f"open_clip:local-dir:{tmp_path / 'e'}")


def test_open_clip_missing_package_says_how_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "open_clip", None)  # makes `import open_clip` raise ImportError
    with pytest.raises(EncoderError, match=r"pip install capdec\[open_clip\]"):
        load_encoder("open_clip:ViT-B-32@openai")
