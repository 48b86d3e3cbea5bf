"""IFCap, as its paper and code do it: image-like retrieval, the Fusion Module, frequency-based entity
filtering and entity hard prompts. Each part is checked against its equations written out here, on
tiny real models, and end to end through the CLI on real COCO captions and photos."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from capdec.cli import main
from capdec.decode import generate
from capdec.memory import TextMemory
from capdec.model import ModelConfig, build_model
from capdec.model.mapper import IFCapFusion
from capdec.retrieval import EntityVocabulary, RetrievalContext, filter_entities, hard_prompt, masked_entities

CAPTIONS = ["a red circle left of a blue square", "two green triangles on a white background",
            "a small yellow star above a big red circle", "three blue squares in a row",
            "a dog and a cat on a table", "two dogs near a red car"] * 8
VOCAB = ["circle", "square", "triangle", "star", "dog", "cat", "table", "car"]


def tiny_model(**kw):
    torch.manual_seed(0)
    cfg = dict(embed_dim=16, prefix_length=3, mapper_depth=1, mapper_heads=2, lm_dim=32, lm_depth=1, lm_heads=2,
               vocab_size=300, max_length=16, dropout=0.0, mapper_variant="clipcap")
    return build_model(ModelConfig(**{**cfg, **kw}), captions=CAPTIONS).eval()


# -- the Fusion Module ---------------------------------------------------------------------------------
def hand_fusion(f: IFCapFusion, x: torch.Tensor, retrieved: torch.Tensor, heads: int) -> torch.Tensor:
    """IFCap's att_gt_n_rt written out: context = rt_linear(retrieved); one pre-norm layer whose queries are
    the clip tokens and keys/values the (un-normalised) context; then its ReLU MLP; residuals around both."""
    ctx = retrieved @ f.rt_linear.weight.T + f.rt_linear.bias  # (b, k, h)
    q_in = F.layer_norm(x, (x.shape[-1],), f.norm1.weight, f.norm1.bias)
    h = x.shape[-1]
    e = h // heads
    q = q_in @ f.attn.to_queries.weight.T  # no bias
    kv = ctx @ f.attn.to_keys_values.weight.T  # no bias: keys are the first h columns, values the next h
    k, v = kv[..., :h], kv[..., h:]
    outs = []
    for head in range(heads):
        sl = slice(head * e, (head + 1) * e)
        att = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / e ** 0.5, dim=-1)  # (b, c, k)
        outs.append(att @ v[..., sl])
    attended = torch.cat(outs, dim=-1) @ f.attn.project.weight.T + f.attn.project.bias
    x = x + attended
    m_in = F.layer_norm(x, (h,), f.norm2.weight, f.norm2.bias)
    return x + F.relu(m_in @ f.mlp.fc1.weight.T + f.mlp.fc1.bias) @ f.mlp.fc2.weight.T + f.mlp.fc2.bias


def test_fusion_module_is_ifcaps_cross_attention_layer():
    torch.manual_seed(1)
    f = IFCapFusion(dim=16, hidden=24, heads=4)
    for p in f.parameters():  # away from the initial LayerNorm ones and zeros
        torch.nn.init.normal_(p, std=0.3)
    x, retrieved = torch.randn(3, 5, 24), torch.randn(3, 7, 16)
    assert torch.allclose(f(x, retrieved), hand_fusion(f, x, retrieved, heads=4), atol=1e-5)
    assert f.attn.to_queries.bias is None and f.attn.to_keys_values.bias is None
    assert f.mlp.fc1.out_features == 48  # ratio 2


def test_ifcap_fusion_acts_on_the_mappers_clip_tokens():
    model = tiny_model(retrieval_k=4)
    assert isinstance(model.fusion, IFCapFusion)
    emb, retrieved = torch.randn(2, 16), torch.randn(2, 4, 16)
    expected = model.mapper.from_clip_tokens(model.fusion(model.mapper.clip_tokens(emb), retrieved))
    assert torch.allclose(model.prefix(emb, retrieved=retrieved), expected, atol=1e-6)
    assert not torch.allclose(model.prefix(emb, retrieved=retrieved), model.prefix(emb, retrieved=retrieved + 1))
    # capdec's earlier fusion stays for its checkpoints: a config written before the field has it
    assert ModelConfig.from_dict({"retrieval_k": 2, "mapper": "transformer"}).retrieval_fusion == "embedding"
    with pytest.raises(Exception, match="transformer mapper"):
        ModelConfig(retrieval_k=2, mapper="mlp")


# -- entities --------------------------------------------------------------------------------------------
def test_entities_vocabulary_frequency_filter_and_prompt():
    vocab = EntityVocabulary(VOCAB)
    assert vocab.entities("two dogs near a dog and a red car") == ["dog", "car"]
    assert vocab.occurrences("two dogs near a dog and a red car") == ["dog", "dog", "car"]
    retrieved = ["a dog and a cat", "two dogs and a dog on a table", "a cat", "a dog near a car", "the car"]
    # every occurrence counts (IFCap counts nouns, not captions): dog 4 (in 3 captions), cat 2, car 2, table 1
    assert filter_entities(retrieved, vocab, threshold=2, limit=10) == ["dog", "cat", "car"]
    assert filter_entities(retrieved, vocab, threshold=4, limit=10) == ["dog"]
    assert filter_entities(retrieved, vocab, threshold=2, limit=1) == ["dog"]
    assert filter_entities(retrieved, vocab, threshold=5, limit=10) == []
    assert hard_prompt(["dog", "cat"]) == "There are dog, cat in image."
    assert hard_prompt([]) == "There are something in image."
    draws = torch.tensor([0.9, 0.1, 0.5, 0.39, 0.4])
    assert masked_entities(["a", "b", "c", "d", "e", "f"], draws, mask=0.4, limit=5) == ["a", "c", "e"]


def test_training_prompts_are_the_captions_own_masked_entities_and_caption_time_ones_are_filtered():
    model = tiny_model(retrieval_k=2, retrieval_variance=0.5, entity_prompt=True, entity_vocab=VOCAB,
                       entity_mask=0.4, entity_retrieve=4, entity_threshold=3)
    memory_rows = F.normalize(torch.randn(len(CAPTIONS), 16, generator=torch.Generator().manual_seed(2)), dim=-1)
    memory = TextMemory(memory_rows, CAPTIONS, None)
    ctx = RetrievalContext(memory, model)
    vocab = EntityVocabulary(VOCAB)
    own = torch.tensor([4, 5, 0])  # "a dog and a cat on a table", "two dogs near a red car", "a red circle ..."
    clean = memory_rows[own]
    draws = ctx.training_draws(clean, torch.Generator().manual_seed(3))
    assert draws["entity_draws"].shape == (3, 10)
    # image-like retrieval: the query is normalize(t + n), n ~ N(0, 0.5·I), drawn from the step's generator
    n = torch.randn(3, 16, generator=torch.Generator().manual_seed(3)) * 0.5 ** 0.5
    assert torch.allclose(draws["search"], F.normalize(clean + n, dim=-1), atol=1e-6)
    noised = F.normalize(torch.randn(3, 16), dim=-1)
    out = ctx(noised, exclude=own, **draws)
    _, expected_idx = memory.search(draws["search"], 2, exclude=own)
    assert torch.equal(out["retrieved"], memory.gather(expected_idx))
    assert not (expected_idx == own[:, None]).any()  # never the caption itself
    for i, row in enumerate(own.tolist()):
        kept = masked_entities(vocab.entities(CAPTIONS[row]), draws["entity_draws"][i], mask=0.4, limit=10)
        assert out["prompt_ids"][i] == model.tokenizer(hard_prompt(kept), add_special_tokens=False)["input_ids"]
    # caption time: entities seen >= 3 times in the 4 nearest captions
    image = F.normalize(torch.randn(2, 16), dim=-1)
    got = ctx(image)
    _, near = memory.search(image, 4)
    for i, caps in enumerate(memory.captions_at(near)):
        entities = filter_entities(caps, vocab, threshold=3, limit=10)
        assert got["prompt_ids"][i] == model.tokenizer(hard_prompt(entities), add_special_tokens=False)["input_ids"]


def test_prompt_tokens_sit_between_prefix_and_caption_and_are_never_scored():
    model = tiny_model(entity_prompt=True, entity_vocab=VOCAB)
    emb = torch.randn(2, 16)
    ids, mask, _ = model.tokenize(["a dog and a cat", "two red circles on a white background"])
    prompts = [model.tokenizer(hard_prompt(p), add_special_tokens=False)["input_ids"] for p in (["dog", "cat"], [])]
    got = model(emb, ids, mask, prompt_ids=prompts, reduction="sum")
    # written out row by row: [prefix][prompt][caption], the loss over the caption tokens only
    prefix = model.prefix(emb)
    embed = model.lm.get_input_embeddings()
    total = torch.zeros(())
    for i in range(2):
        caption = ids[i, : int(mask[i].sum())]
        seq = torch.cat([prefix[i], embed(torch.tensor(prompts[i])), embed(caption)])[None]
        logits = model.lm(inputs_embeds=seq).logits[0]
        start = prefix.shape[1] + len(prompts[i])
        total = total + F.cross_entropy(logits[start - 1 : start - 1 + len(caption)], caption, reduction="sum")
    assert torch.allclose(got, total, rtol=1e-5)
    mean = model(emb, ids, mask, prompt_ids=prompts)
    assert torch.allclose(mean, total / mask.sum(), rtol=1e-5)


def test_generate_decodes_prefixes_of_different_lengths_in_order():
    model = tiny_model(entity_prompt=True, entity_vocab=VOCAB)
    prefix = model.prefix(torch.randn(3, 16))
    prompts = [[5, 6, 7], [5], [8, 9, 10]]
    ragged = model.with_prompts(prefix, prompts)
    assert [p.shape[0] for p in ragged] == [6, 4, 6]
    embed = model.lm.get_input_embeddings()
    for row, soft, prompt in zip(ragged, prefix, prompts):  # the soft prefix first, then the prompt (IFCap's order)
        assert torch.equal(row[:3], soft) and torch.allclose(row[3:], embed(torch.tensor(prompt)))
    got = generate(model, ragged, strategy="greedy", max_length=5)
    for i, p in enumerate(ragged):
        assert got[i] == generate(model, p[None], strategy="greedy", max_length=5)[0]


# -- through the CLI, on real COCO captions and photos ------------------------------------------------------
TINY = ["--prefix-length", "4", "--mapper-depth", "1", "--mapper-heads", "2", "--max-length", "24", "--lm-dim", "32",
        "--lm-depth", "1", "--lm-heads", "2", "--vocab-size", "400", "--epochs", "1", "--batch-size", "32"]


def test_cli_ifcap_trains_and_captions_real_photos(tmp_path, hf_store, coco_dir, capsys):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("# COCO-like objects\nman\nwoman\nperson\ndog\ncat\ntable\npizza\nplate\nstreet\nbus\n")
    ckpt = tmp_path / "ifcap"
    assert main(["-q", "train", str(hf_store), "--out", str(ckpt), "--retrieval-k", "3", "--retrieval-variance",
                 "0.04", "--entity-prompt", "--entity-vocab", str(vocab), "--entity-retrieve", "7",
                 "--entity-threshold", "3", *TINY]) == 0
    config = json.loads((ckpt / "config.json").read_text())["model"]
    assert config["retrieval_fusion"] == "ifcap" and config["retrieval_variance"] == 0.04
    assert config["entity_vocab"] == sorted(["man", "woman", "person", "dog", "cat", "table", "pizza", "plate",
                                             "street", "bus"])
    assert (config["entity_retrieve"], config["entity_threshold"], config["entity_mask"]) == (7, 3, 0.4)
    out = tmp_path / "caps.jsonl"
    assert main(["-q", "caption", str(ckpt), str(Path(coco_dir) / "images"), "--out", str(out), "--strategy",
                 "beam", "--beam-size", "2", "--max-length", "6"]) == 0
    assert len(out.read_text().splitlines()) == 17
    for flags, message in ((["--entity-prompt"], "entity prompts need an entity vocabulary"),
                           (["--entity-vocab", str(vocab)], "only makes sense with --entity-prompt"),
                           (["--retrieval-k", "2", "--mapper", "mlp"], "transformer mapper")):
        assert main(["-q", "train", str(hf_store), "--out", str(tmp_path / "x"), *flags, *TINY]) == 2
        assert message in capsys.readouterr().err
