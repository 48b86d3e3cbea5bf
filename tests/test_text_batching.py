"""Text encoding in length-sorted batches cut to their longest caption, and bf16 text on CPUs with AMX.

Both real backends (transformers CLIP, open_clip CLIP) at tiny size with the real CLIP tokenizer, on
real COCO captions (``tests/data/coco_captions_sample.json``; MS-COCO captions, CC BY 4.0). The reference
is each upstream library run the way CapDec's own scripts run CLIP: every caption padded to the full
77-token context, in float32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from capdec.corpus import read_corpus
from capdec.encoders import load_encoder
from capdec.encoders.base import length_batches
from capdec.utils import cpu_has_bf16
from tiny_models import make_tiny_hf_siglip, make_tiny_open_clip

COCO_SAMPLE = Path(__file__).parent / "data" / "coco_captions_sample.json"
CONTEXT = 77
# "a" is one CLIP BPE token: start + 75 + end = 77 tokens fit the context; 76 words are one too many
FITS, CUT = "a " * 75, "a " * 76
LONG = "a photo of " + "a very " * 60 + "big dog"  # ~125 tokens


@pytest.fixture(scope="module")
def captions() -> list[str]:
    # real captions, not sorted by length; the edge cases in the middle
    coco = read_corpus(COCO_SAMPLE).captions[:120]
    return [*coco[:60], FITS, LONG, CUT + "and a dog", *coco[60:]]


def _upstream(spec: str):
    """The upstream tokenizer (padding to 77 tokens) and the upstream model's float32 text features."""
    if spec.startswith("hf:"):
        from transformers import AutoTokenizer, CLIPModel

        directory = spec.removeprefix("hf:")
        model = CLIPModel.from_pretrained(directory, local_files_only=True).eval()
        tok = AutoTokenizer.from_pretrained(directory, local_files_only=True)

        def ids(texts):
            return tok(texts, padding="max_length", max_length=CONTEXT, truncation=True, return_tensors="pt")

        def features(texts):
            out = model.get_text_features(**ids(texts))
            return out if isinstance(out, torch.Tensor) else out.pooler_output

        return ids, features
    import open_clip

    name = spec.removeprefix("open_clip:")
    model = open_clip.create_model(name).eval()
    tok = open_clip.get_tokenizer(name)
    return tok, lambda texts: model.encode_text(tok(texts))


@pytest.fixture(scope="module", params=["hf", "open_clip"])
def backend(request, tiny_hf_clip, tiny_open_clip):
    spec = tiny_hf_clip if request.param == "hf" else tiny_open_clip
    return request.param, spec


@pytest.fixture(scope="module")
def full_padding(backend, captions) -> torch.Tensor:
    """Unit float32 features of each caption alone, padded to 77 tokens, by the upstream library."""
    _, features = _upstream(backend[1])
    with torch.inference_mode():
        return torch.cat([F.normalize(features([c]), dim=-1) for c in captions])


def test_trimmed_length_sorted_batches_equal_full_padding(backend, captions, full_padding):
    encoder = load_encoder(backend[1], device="cpu", precision="fp32")
    assert encoder.trims_padding
    widths = []
    inner = encoder._encode_tokens

    def recording(ids, lengths):
        widths.append(ids.shape[1])
        return inner(ids, lengths)

    encoder._encode_tokens = recording
    x = encoder.encode_text(captions, batch_size=16)
    # the batches really are cut: short captions run with short contexts, the long ones with all 77
    assert min(widths) < 16 and max(widths) == CONTEXT and len(set(widths)) >= 5
    assert x.shape == full_padding.shape and x.dtype == torch.float32
    assert (x - full_padding).abs().max() < 1e-5  # rows in the order given


def test_tokens_and_truncation_match_the_upstream_tokenizer(backend, captions):
    encoder = load_encoder(backend[1], device="cpu", precision="fp32")
    upstream_ids, _ = _upstream(backend[1])
    tokens = encoder.tokenize_text(captions)
    ref = upstream_ids(captions)
    ref_ids = ref["input_ids"] if backend[0] == "hf" else ref
    assert torch.equal(tokens.ids, ref_ids)
    if backend[0] == "hf":
        assert torch.equal(tokens.lengths, ref["attention_mask"].sum(1))
    else:  # up to and with the end-of-text token (the largest id)
        assert torch.equal(tokens.lengths, ref_ids.argmax(1) + 1)
    assert tokens.truncated == 2  # LONG and CUT, not FITS (exactly 77 tokens)
    assert encoder.count_truncated([FITS, "a dog", CUT]) == 1
    assert encoder.count_truncated([]) == 0


def test_a_bidirectional_text_tower_keeps_its_padding(tmp_path, captions):
    """A text tower that attends to its padding (SigLIP-style: no causal mask, last-token pooling) is never cut."""
    import open_clip

    spec = make_tiny_open_clip(tmp_path, text={"no_causal_mask": True, "pool_type": "last"})
    encoder = load_encoder(spec, device="cpu", precision="fp32")
    assert not encoder.trims_padding
    name = spec.removeprefix("open_clip:")
    model, tok = open_clip.create_model(name).eval(), open_clip.get_tokenizer(name)
    with torch.inference_mode():
        ref = F.normalize(model.encode_text(tok(captions)), dim=-1)
    assert (encoder.encode_text(captions, batch_size=16) - ref).abs().max() < 1e-5


def test_hf_siglip_keeps_its_max_length_padding(tmp_path, captions):
    """SigLIP reads its last position, so it runs padded to the full context, as it was trained."""
    from transformers import AutoTokenizer, SiglipModel

    directory = make_tiny_hf_siglip(tmp_path)
    encoder = load_encoder(f"hf:{directory}", device="cpu", precision="fp32")
    assert not encoder.trims_padding
    model = SiglipModel.from_pretrained(directory, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    with torch.inference_mode():
        out = model.get_text_features(**tok(captions, padding="max_length", max_length=CONTEXT, truncation=True,
                                            return_tensors="pt"))
    ref = F.normalize(out if isinstance(out, torch.Tensor) else out.pooler_output, dim=-1)
    assert (encoder.encode_text(captions, batch_size=16) - ref).abs().max() < 1e-5


def test_length_batches():
    lengths = torch.tensor([3, 1, 2, 5, 5, 9, 1])
    # sorted: index 1 (1), 6 (1), 2 (2), 0 (3), 3 (5), 4 (5), 5 (9); at most 6 tokens padded, 3 rows
    batches = [b.tolist() for b in length_batches(lengths, max_items=3, max_tokens=6)]
    assert batches == [[1, 6, 2], [0], [3], [4], [5]]  # 9 > 6 tokens: alone
    assert [b.tolist() for b in length_batches(lengths, max_items=2, max_tokens=None)] == [[1, 6], [2, 0], [3, 4], [5]]
    rng = np.random.default_rng(0)
    many = torch.from_numpy(rng.integers(1, 78, 500))
    batches = length_batches(many, max_items=64, max_tokens=512)
    assert sorted(torch.cat(batches).tolist()) == list(range(500))
    for b in batches:
        assert len(b) <= 64 and (len(b) == 1 or len(b) * int(many[b].max()) <= 512)


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(3)]


def test_auto_precision_runs_text_in_bf16_on_cpus_with_bf16_units(backend, captions, full_padding):
    auto = load_encoder(backend[1], device="cpu")
    fp32 = load_encoder(backend[1], device="cpu", precision="fp32")
    assert fp32.text_precision == "float32"
    assert auto.text_precision == ("bfloat16" if cpu_has_bf16() else "float32")
    cos = (auto.encode_text(captions, batch_size=16) * full_padding).sum(1)
    assert cos.min() >= 0.999
    # images stay float32 under auto: the same numbers as a float32 encoder
    assert torch.equal(auto.encode_image(_images()), fp32.encode_image(_images()))
    explicit = load_encoder(backend[1], device="cpu", precision="bf16")
    assert explicit.text_precision == "bfloat16"
    assert (explicit.encode_text(captions[:40]) * full_padding[:40]).sum(1).min() >= 0.999


def test_the_toy_encoder_keeps_float32_text():
    toy = load_encoder("toy", device="cpu")
    assert toy.text_precision == "float32" and toy.trims_padding
    texts = ["a red circle", "two blue squares on the left and a small green triangle", "a", "", "red red red"]
    with torch.inference_mode():
        ref = torch.cat([F.normalize(toy.model.text(toy.tokenizer([t])), dim=-1) for t in texts])
    assert (toy.encode_text(texts, batch_size=2) - ref).abs().max() < 1e-5
