"""The fast training step computes the same maths: caption-only logits, bf16 autocast, the token cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from capdec.cli import main
from capdec.errors import InputError
from capdec.model import ModelConfig, build_model
from capdec.store import EmbeddingStore
from capdec.tokencache import id_dtype, token_cache
from capdec.train import amp_dtype

CAPTIONS = ["a red circle left of a blue square", "two green triangles on a white background",
            "a small yellow star above a big red circle", "three blue squares in a row",
            "a dog", "an extremely long caption " + "with many many words " * 6] * 5


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model(ModelConfig(embed_dim=16, prefix_length=3, mapper_depth=1, mapper_heads=2, lm_dim=32,
                                lm_depth=2, lm_heads=2, vocab_size=400, max_length=12, dropout=0.0),
                    captions=CAPTIONS)
    return m.eval()


def reference_loss(model, emb, ids, mask, reduction="mean"):
    """The loss from the equations: full-sequence LM logits, position L-1+i scores caption token i."""
    prefix = model.mapper(emb)  # (b, L, h)
    L = prefix.shape[1]
    tokens = model.lm.get_input_embeddings()(ids)
    logits = model.lm(inputs_embeds=torch.cat([prefix, tokens], 1),
                      attention_mask=torch.cat([torch.ones(len(ids), L, dtype=mask.dtype), mask], 1)).logits
    logp = torch.log_softmax(logits[:, L - 1 : -1].float(), dim=-1)  # (b, t, V)
    nll = -logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1) * mask  # (b, t)
    return nll.sum() / mask.sum() if reduction == "mean" else nll.sum()


def test_caption_only_logits_give_the_full_sequence_loss(model):
    emb = torch.randn(len(CAPTIONS), 16)
    ids, mask, _ = model.tokenize(CAPTIONS)
    with torch.no_grad():
        torch.testing.assert_close(model(emb, ids, mask), reference_loss(model, emb, ids, mask), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model(emb, ids, mask, reduction="sum"),
                                   reference_loss(model, emb, ids, mask, "sum"), rtol=1e-5, atol=1e-4)
    # gradients too: the step optimises the same function
    model.zero_grad()
    model(emb, ids, mask).backward()
    fast = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    reference_loss(model, emb, ids, mask).backward()
    for a, p in zip(fast, model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)
    model.zero_grad()


def test_bf16_autocast_loss_agrees_with_fp32_to_bf16_tolerance(model):
    emb = F.normalize(torch.randn(len(CAPTIONS), 16), dim=-1)
    ids, mask, _ = model.tokenize(CAPTIONS)
    with torch.no_grad():
        fp32 = model(emb, ids, mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(emb, ids, mask)
    assert bf16.dtype == torch.float32  # the cross-entropy itself runs in fp32
    assert abs(float(bf16) - float(fp32)) / float(fp32) < 2e-2  # bf16 keeps 8 mantissa bits (~0.4% per op)
    assert float(bf16) != float(fp32), "autocast must actually have run in bf16"


def test_amp_choice():
    cpu = torch.device("cpu")
    assert amp_dtype(cpu, "off") is None
    assert amp_dtype(cpu, "bf16") == torch.bfloat16
    with pytest.raises(InputError, match="fp16 needs a GPU"):
        amp_dtype(cpu, "fp16")


def test_training_losses_in_bf16_track_fp32(tmp_path, hf_store):
    """The first steps' losses of a bf16 run equal the fp32 run's to bf16 tolerance (same data, same init)."""
    common = ["--batch-size", "32", "--max-steps", "6", "--log-every", "1", "--lr", "2e-3", "--dropout", "0",
              "--prefix-length", "4", "--mapper-depth", "1", "--mapper-heads", "2", "--max-length", "24",
              "--lm-dim", "32", "--lm-depth", "2", "--lm-heads", "2", "--vocab-size", "400"]
    runs = {}
    for amp in ("off", "bf16"):
        assert main(["-q", "train", str(hf_store), "--out", str(tmp_path / amp), "--amp", amp, *common]) == 0
        rows = [json.loads(r) for r in (tmp_path / amp / "metrics.jsonl").read_text().splitlines()]
        runs[amp] = np.array([r["train_loss"] for r in rows if "train_loss" in r])
    assert len(runs["off"]) == 6
    rel = np.abs(runs["bf16"] - runs["off"]) / runs["off"]
    assert rel.max() < 2e-2, rel
    assert rel.max() > 0, "the bf16 run must differ somewhere (else autocast did not run)"


# -- the token cache -------------------------------------------------------------------------------------
def test_token_cache_matches_tokenize_and_is_reused(tmp_path, model):
    emb = F.normalize(torch.randn(len(CAPTIONS), 16), dim=-1)
    store = EmbeddingStore.from_arrays(CAPTIONS, emb, encoder_spec={"kind": "toy"},
                                       encoder_identity={"kind": "toy"}).save(tmp_path / "store")
    cache = token_cache(store, model.tokenizer, show_progress=False)
    assert cache.path.parent == store.path / "token-cache" and cache.ids.dtype == np.uint16
    from capdec.textdata import load_text_data

    data = load_text_data([store.path])
    data.attach_tokenizer(model.tokenizer, show_progress=False)
    idx = np.array([5, 0, 3, 11])
    ids, mask = data.tokens_at(idx, max_length=model.config.max_length, eos=model.eos_token_id,
                               pad=model.pad_token_id)
    ref_ids, ref_mask, cut = model.tokenize([CAPTIONS[i] for i in idx])  # the in-memory path
    assert torch.equal(ids, ref_ids) and torch.equal(mask, ref_mask)
    assert ids.shape[1] == model.config.max_length  # captions 5 and 11 are cut; short batches are shorter
    short, _ = data.tokens_at(np.array([0, 4]), max_length=12, eos=model.eos_token_id, pad=model.pad_token_id)
    assert short.shape[1] == int(model.tokenize([CAPTIONS[0]])[1].sum())
    assert data.count_cut(np.arange(len(CAPTIONS)), model.config.max_length) == 5 and cut == 2  # rows 5 and 11
    assert data.token_counts(idx, model.config.max_length).tolist() == ref_mask.sum(1).tolist()

    built = (cache.path / "ids.bin").stat().st_mtime_ns
    again = token_cache(store, model.tokenizer, show_progress=False)
    assert again.path == cache.path and (cache.path / "ids.bin").stat().st_mtime_ns == built

    other = build_model(ModelConfig(embed_dim=16, prefix_length=3, mapper_depth=1, mapper_heads=2, lm_dim=32,
                                    lm_depth=1, lm_heads=2, vocab_size=300, max_length=12),
                        captions=CAPTIONS[:4]).tokenizer
    assert token_cache(store, other, show_progress=False).path != cache.path  # keyed by the tokenizer


def test_token_id_dtype_follows_vocabulary_size():
    assert id_dtype(50257) == np.uint16 and id_dtype(65535) == np.uint16
    assert id_dtype(65536) == np.int32 and id_dtype(151_000) == np.int32


def test_length_buckets_keep_the_epoch_and_cut_padding():
    from capdec.train import bucket_batches

    rng = np.random.default_rng(0)
    n, b = 1030, 16
    order = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    lengths = torch.as_tensor(rng.integers(3, 40, size=n))  # lengths[i]: the length of order[i]
    out = bucket_batches(order, lengths, b, seed=0, epoch=0)
    assert sorted(out.tolist()) == list(range(n))  # every caption once
    assert torch.equal(out, bucket_batches(order, lengths, b, seed=0, epoch=0))
    assert not torch.equal(out, bucket_batches(order, lengths, b, seed=0, epoch=1))
    length_of = dict(zip(order.tolist(), lengths.tolist()))

    def padded(o):  # positions a batch computes: its longest caption x its size
        return sum(max(length_of[i] for i in o[lo : lo + b].tolist()) * len(o[lo : lo + b])
                   for lo in range(0, n, b))

    assert padded(out) < 0.75 * padded(order)
    # the short last batch (n % b captions) stays last: the longest captions of the last window
    tail = [length_of[i] for i in out[(n // b) * b :].tolist()]
    assert len(tail) == n % b and min(tail) >= max(length_of[i] for i in out[800 : (n // b) * b].tolist())
