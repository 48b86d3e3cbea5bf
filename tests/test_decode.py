"""capdec.decode: greedy / beam / sampling over a prefix, with and without the key/value cache."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from capdec.decode import DecodeConfig, generate
from capdec.errors import InputError
from capdec.model import ModelConfig, build_model
from reference_search import beam_to_the_end, clipcap_generate_beam, clipcap_score, exhaustive, small_vocab_lm

CAPTIONS = [
    "a dog runs on the green grass", "a black cat sits on a red mat", "two people ride bikes down a street",
    "a red car parked on the street", "a plate of food with broccoli", "a man holding a tennis racket",
    "a bus driving down a city street", "a woman standing next to a horse", "a pizza on a wooden table",
    "a giraffe standing in a field", "a small boat on a calm lake", "children playing soccer in a park",
]


def _train_tiny(captions: list[str]):
    """A tiny CapDec model trained briefly on ``captions`` (one random embedding each) -> (model, embeddings)."""
    torch.manual_seed(0)
    cfg = ModelConfig(embed_dim=16, prefix_length=4, mapper="mlp", lm_dim=48, lm_depth=2, lm_heads=2,
                      vocab_size=1000, max_length=20, dropout=0.0)
    m = build_model(cfg, captions=captions)
    emb = F.normalize(torch.randn(len(captions), 16), dim=-1)
    ids, mask, _ = m.tokenize(captions)
    opt = torch.optim.AdamW(m.parameters(), lr=5e-3)
    m.train()
    for _ in range(80):
        loss = m(emb, ids, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    return m, emb


@pytest.fixture(scope="module")
def model():
    """A tiny CapDec model trained briefly so that it writes real captions and stops with end-of-sequence."""
    m, emb = _train_tiny(CAPTIONS)
    m.train_embeddings = emb  # for the tests: what it was trained on
    return m


@pytest.fixture(scope="module")
def prefix(model):
    torch.manual_seed(1)
    emb = torch.cat([model.train_embeddings[:6], F.normalize(torch.randn(4, 16), dim=-1)])  # seen and unseen
    with torch.no_grad():
        return model.prefix(emb)  # (10, L, h)


def test_greedy_reproduces_training_captions_and_stops_at_eos(model, prefix):
    ids = generate(model, prefix[:6], strategy="greedy")
    assert model.decode_ids(ids) == CAPTIONS[:6]
    assert all(model.eos_token_id not in seq and len(seq) < model.config.max_length for seq in ids)


@pytest.fixture(scope="module")
def random_case(model):
    """An untrained LM with large random weights: uncertain, varied tokens, so beams reorder all the time.

    A token it writes often is declared end-of-sequence, so rows finish at different steps.
    """
    torch.manual_seed(2)
    lm = build_model(model.config, tokenizer=model.tokenizer).lm.eval()
    with torch.no_grad():
        for p in lm.parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.3)
    prefix = 0.5 * torch.randn(12, model.config.prefix_length, lm.config.n_embd)
    ids = generate(lm, prefix, eos_token_id=-1, strategy="greedy", max_length=20)
    eos = torch.tensor([t for seq in ids for t in seq[1:]]).mode().values.item()
    return lm, prefix, eos


@pytest.fixture(params=["trained", "random"])
def case(request, model, prefix, random_case):
    """(model or bare LM, prefix, generate() keywords)"""
    if request.param == "trained":
        return model, prefix, {}
    lm, prefix, eos = random_case
    return lm, prefix, {"eos_token_id": eos, "max_length": 20}


def test_random_case_rows_end_at_different_steps(random_case):
    lm, prefix, eos = random_case
    for strategy in ("greedy", "beam"):
        lengths = {len(seq) for seq in generate(lm, prefix, eos_token_id=eos, strategy=strategy, max_length=20)}
        assert len(lengths) >= 3


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_cached_equals_uncached(case, strategy):
    lm, prefix, kw = case
    cached = generate(lm, prefix, strategy=strategy, beam_size=3, use_cache=True, **kw)
    uncached = generate(lm, prefix, strategy=strategy, beam_size=3, use_cache=False, **kw)
    assert cached == uncached


@pytest.mark.parametrize("stopping, alpha", [("heuristic", 1.0), ("exact", 0.0)])
def test_beam_width_one_is_greedy(case, stopping, alpha):
    """(With a length penalty, an exact search goes on after greedy's caption ends: a longer one may score more.)"""
    lm, prefix, kw = case
    beam = generate(lm, prefix, strategy="beam", beam_size=1, early_stopping=stopping, length_penalty=alpha, **kw)
    assert beam == generate(lm, prefix, strategy="greedy", **kw)


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_batch_equals_one_at_a_time(case, strategy):
    lm, prefix, kw = case
    batch = generate(lm, prefix, strategy=strategy, beam_size=4, **kw)
    single = [generate(lm, prefix[i : i + 1], strategy=strategy, beam_size=4, **kw)[0] for i in range(len(prefix))]
    assert batch == single


@pytest.mark.parametrize("beams,alpha,stopping", [(1, 1.0, "heuristic"), (3, 1.0, "heuristic"), (5, 0.0, "heuristic"),
                                                  (5, 2.0, "heuristic"), (3, 1.0, "exact"), (5, 0.0, "exact"),
                                                  (5, 2.0, "exact")])
def test_matches_transformers_generate(case, beams, alpha, stopping):
    """Parity with Hugging Face's own greedy/beam search (inputs_embeds): its early_stopping=False is capdec's
    heuristic, its "never" (the best running score bounded at max_length) an exact rule."""
    lm, prefix, kw = case
    lm = getattr(lm, "lm", lm)
    eos, max_length = kw.get("eos_token_id", 1), kw.get("max_length", 20)
    ref = lm.generate(inputs_embeds=prefix, attention_mask=torch.ones(prefix.shape[:2], dtype=torch.long),
                      max_new_tokens=max_length, do_sample=False, num_beams=beams, length_penalty=alpha,
                      early_stopping={"heuristic": False, "exact": "never"}[stopping], eos_token_id=eos,
                      pad_token_id=eos).tolist()
    ref = [row[: row.index(eos)] if eos in row else row for row in ref]
    mine = generate(lm, prefix, eos_token_id=eos, strategy="greedy" if beams == 1 else "beam", beam_size=beams,
                    length_penalty=alpha, max_length=max_length, early_stopping=stopping)
    assert mine == ref


def test_wider_beams_differ_on_an_uncertain_model(random_case):
    lm, prefix, eos = random_case
    outs = [generate(lm, prefix, eos_token_id=eos, strategy="beam", beam_size=k, max_length=20) for k in (1, 3, 6)]
    assert outs[0] != outs[1] and outs[1] != outs[2]


def _seq_logprob(model, prefix_row, seq):
    """Sum of log p of seq followed by end-of-sequence (a reference scorer, one full forward)."""
    tokens = torch.tensor(seq + [model.eos_token_id])
    inputs = torch.cat([prefix_row, model.lm.get_input_embeddings()(tokens)], dim=0).unsqueeze(0)
    with torch.no_grad():
        logp = model.lm(inputs_embeds=inputs).logits[0].float().log_softmax(-1)
    L = prefix_row.shape[0]
    return sum(logp[L - 1 + i, t].item() for i, t in enumerate(tokens.tolist()))


def test_beam_search_finds_at_least_as_likely_captions_as_greedy(model, prefix):
    greedy = generate(model, prefix, strategy="greedy")
    beam = generate(model, prefix, strategy="beam", beam_size=5, length_penalty=0.0)  # raw log-probability
    for i in range(len(prefix)):
        if model.eos_token_id is not None and len(greedy[i]) < model.config.max_length:
            assert _seq_logprob(model, prefix[i], beam[i]) >= _seq_logprob(model, prefix[i], greedy[i]) - 1e-4


def test_length_penalty_changes_the_ranking_towards_longer_captions(model, prefix):
    short = generate(model, prefix, strategy="beam", beam_size=5, length_penalty=0.0)
    long = generate(model, prefix, strategy="beam", beam_size=5, length_penalty=3.0)
    assert sum(map(len, long)) >= sum(map(len, short))


def test_sampling_is_reproducible_with_a_seed(model, prefix):
    opts = dict(strategy="sample", top_p=0.9, temperature=1.5, seed=123)
    a, b = generate(model, prefix, **opts), generate(model, prefix, **opts)
    assert a == b
    others = [generate(model, prefix, **{**opts, "seed": s}) for s in range(5)]
    assert any(o != a for o in others)
    assert generate(model, prefix, **{**opts, "use_cache": False}) == a


def test_sampling_with_top_k_one_is_greedy(model, prefix):
    assert generate(model, prefix, strategy="sample", top_k=1, seed=0) == generate(model, prefix, strategy="greedy")
    # a tiny nucleus keeps only the most likely token too
    assert generate(model, prefix, strategy="sample", top_p=1e-6, seed=0) == generate(model, prefix, strategy="greedy")


@pytest.mark.parametrize("strategy", ["greedy", "beam", "sample"])
def test_max_length_is_respected(model, prefix, strategy):
    for n in (1, 3):
        ids = generate(model, prefix, strategy=strategy, max_length=n, seed=0)
        assert len(ids) == len(prefix) and all(len(seq) <= n for seq in ids)
    assert any(len(seq) == 3 for seq in generate(model, prefix, strategy=strategy, max_length=3, seed=0))


def test_end_of_sequence_stops_generation(model, prefix):
    """Any token can be declared the end of sequence: the output is cut just before it."""
    full = generate(model, prefix, strategy="greedy")
    stop = full[0][2]
    cut = generate(model.lm, prefix, eos_token_id=stop, strategy="greedy", max_length=model.config.max_length)
    assert cut[0] == full[0][:2]
    for seq, ref in zip(cut, full):
        assert stop not in seq
        if stop in ref:
            assert seq == ref[: ref.index(stop)]
        else:  # the model's own end-of-sequence is now an ordinary token: decoding goes on past it
            assert seq[: len(ref)] == ref and len(seq) > len(ref) or len(ref) == model.config.max_length


def test_bare_lm_needs_eos_and_checks_positions(model, prefix):
    with pytest.raises(InputError, match="eos_token_id"):
        generate(model.lm, prefix)
    with pytest.raises(InputError, match="positions"):
        generate(model, prefix, max_length=model.lm.config.n_positions)


def test_decode_config_validation():
    with pytest.raises(InputError, match="strategy"):
        DecodeConfig(strategy="nucleus")
    with pytest.raises(InputError, match="top_p"):
        DecodeConfig(top_p=0.0)
    with pytest.raises(InputError, match="unknown decoding option"):
        DecodeConfig().replace(beams=3)
    assert DecodeConfig().replace(beam_size=2).beam_size == 2


def test_empty_batch_and_training_mode_restored(model, prefix):
    assert generate(model, prefix[:0]) == []
    model.train()
    try:
        a = generate(model, prefix[:2], strategy="greedy")
        assert model.training  # mode restored
    finally:
        model.eval()
    assert a == generate(model, prefix[:2], strategy="greedy")  # dropout was off while decoding


PERIOD_CAPTIONS = ["a dog runs on the grass. it is sunny", "a cat sleeps on a mat. the mat is red",
                   "two boats on a lake. birds fly above", "a man rides a horse. the horse is brown"]


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_stop_at_period_ends_captions_at_the_first_period(strategy):
    m, emb = _train_tiny(PERIOD_CAPTIONS)
    with torch.no_grad():
        prefix = m.prefix(emb)
    assert m.decode_ids(generate(m, prefix, strategy=strategy)) == PERIOD_CAPTIONS
    first_sentences = [c.split(".")[0] + "." for c in PERIOD_CAPTIONS]
    assert m.decode_ids(generate(m, prefix, strategy=strategy, stop_at_period=True)) == first_sentences
    m.config.stop_at_period = True  # the model's own default (as imported ClipCap weights record)
    assert m.decode_ids(generate(m, prefix, strategy=strategy)) == first_sentences
    assert m.decode_ids(generate(m, prefix, strategy=strategy, stop_at_period=False)) == PERIOD_CAPTIONS


# -- beam search against searches written out in tests/reference_search.py -----------------------------------

@pytest.mark.parametrize("alpha", [0.0, 1.0, 2.0])
def test_a_beam_with_room_for_every_candidate_finds_the_exhaustive_best(alpha):
    """4 tokens (the end + 3), 3 steps: 40 captions in all, at most 4 · 9 = 36 candidates a step; a beam of 40
    keeps them all, so it must return the best caption of all."""
    want, got = [], []
    for seed in range(4):
        lm = small_vocab_lm(4, seed=seed, std=0.5)
        prefix = 0.5 * torch.randn(8, 3, 16, generator=torch.Generator().manual_seed(10 + seed))
        got += generate(lm, prefix, eos_token_id=0, strategy="beam", beam_size=40, max_length=3, length_penalty=alpha)
        want += [exhaustive(lm, row, eos=0, max_length=3, alpha=alpha)[1] for row in prefix]
    assert got == want
    assert len({len(c) for c in want}) >= 3 and len({tuple(c) for c in want}) >= 8  # the inputs differ


def test_exact_early_stopping_returns_what_searching_to_the_end_returns():
    """Length-normalised scores can still rise (a likely token lowers the average loss), so a search may stop
    only when no running beam can beat the best finished caption even at max_length."""
    kw = dict(eos_token_id=0, strategy="beam", beam_size=3, max_length=10, length_penalty=1.0)
    exact, heuristic, to_the_end = [], [], []
    for seed in range(4):
        lm = small_vocab_lm(8, seed=seed, std=0.3)
        prefix = 0.5 * torch.randn(40, 3, 16, generator=torch.Generator().manual_seed(100 + seed))
        exact += generate(lm, prefix, **kw)  # the default
        heuristic += generate(lm, prefix, early_stopping="heuristic", **kw)
        to_the_end += [beam_to_the_end(lm, row, eos=0, beam_size=3, max_length=10, alpha=1.0) for row in prefix]
    assert exact == to_the_end
    assert heuristic != exact  # the heuristic stops too soon on some of these 160 inputs


def test_a_beam_search_scores_captions_as_clipcaps_generate_beam_does():
    """ClipCap's / CapDec's generate_beam ranks captions by sum log p / length, the '.' that ends one counted in
    its length, and keeps one running to its last token as it is. A beam that keeps every candidate must then
    find a caption that the reference's beam search, at any width, never scores above."""
    lm = small_vocab_lm(4, seed=3, std=1.0)
    prefix = 0.5 * torch.randn(24, 3, 16, generator=torch.Generator().manual_seed(4))
    best = generate(lm, prefix, eos_token_id=0, strategy="beam", beam_size=40, max_length=3, length_penalty=1.0)
    for row, caption in zip(prefix, best):
        mine = clipcap_score(lm, row, caption, stop=0, entry_length=3)
        for width in (1, 2, 3):
            ref = clipcap_generate_beam(lm, row, stop=0, beam_size=width, entry_length=3)
            assert mine >= clipcap_score(lm, row, ref, stop=0, entry_length=3) - 1e-6
