"""Searches written out from their definitions, to check capdec.decode against (tests and benchmarks).

Each is slow and plain: every step runs the whole sequence again (no key/value cache), in Python.

- :func:`exhaustive`: the best caption of all, by ``sum log p / length**alpha``;
- :func:`beam_to_the_end`: beam search with k running beams and the ending tokens among the first k
  of 2k candidates finished (Hugging Face's and capdec's scheme), never stopping before ``max_length``;
- :func:`clipcap_generate_beam`: ClipCap's ``generate_beam`` (rmokady/CLIP_prefix_caption ``predict.py``;
  DavidHuji/CapDec ``gpt2_prefix_eval.py`` has the same one), and :func:`clipcap_score`, its ranking.

Usage (``tests/`` is on ``sys.path`` via ``pythonpath`` in pyproject)::

    from reference_search import exhaustive, small_vocab_lm
"""

from __future__ import annotations

import torch


def small_vocab_lm(vocab: int, *, seed: int, std: float, positions: int = 32):
    """A bare one-layer GPT-2 over a few tokens (id 0 ends a caption), weights drawn with ``std``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=16, n_layer=1, n_head=2, bos_token_id=0,
                     eos_token_id=0)
    lm = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in lm.parameters():
            if p.ndim >= 2:
                p.normal_(0, std)
    return lm


@torch.no_grad()
def next_logps(lm, prefix_row: torch.Tensor, token_lists: list[list[int]]) -> torch.Tensor:
    """log p(next token | prefix, tokens) for token lists of one length, (n, V): whole sequences, no cache."""
    x = prefix_row.expand(len(token_lists), -1, -1)  # (n, L, h)
    if token_lists[0]:
        x = torch.cat([x, lm.get_input_embeddings()(torch.tensor(token_lists))], dim=1)  # (n, L+t, h)
    return lm(inputs_embeds=x).logits[:, -1].float().log_softmax(-1)


def next_logp(lm, prefix_row: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    return next_logps(lm, prefix_row, [tokens])[0]  # (V,)


def score(total: float, length: int, alpha: float) -> float:
    return total / length**alpha  # a caption's score: sum log p / length**alpha, the ending token counted


def exhaustive(lm, prefix_row, *, eos: int, max_length: int, alpha: float) -> tuple[float, list[int]]:
    """(score, tokens) of the best caption of all: t-1 tokens then the end (t ≤ max_length), or max_length
    tokens without one (cut off)."""
    best: tuple[float, list[int]] = (float("-inf"), [])

    def visit(tokens: list[int], total: float) -> None:
        nonlocal best
        t = len(tokens) + 1
        for v, lp in enumerate(next_logp(lm, prefix_row, tokens).tolist()):
            if v != eos and t < max_length:
                visit(tokens + [v], total + lp)
                continue
            caption = tokens if v == eos else tokens + [v]
            if score(total + lp, t, alpha) > best[0]:
                best = (score(total + lp, t, alpha), caption)

    visit([], 0.0)
    return best


def beam_to_the_end(lm, prefix_row, *, eos: int, beam_size: int, max_length: int, alpha: float) -> list[int]:
    """Beam search that never stops early: each step ranks the 2k best continuations of the k beams; an end
    token among the first k finishes that caption, the k best others continue; at max_length the running
    beams are finished as they are. The best finished caption wins (the first found among equals)."""
    beams: list[tuple[list[int], torch.Tensor]] = [([], torch.tensor(0.0))]
    finished: list[tuple[float, int, list[int]]] = []
    for t in range(1, max_length + 1):
        logps = next_logps(lm, prefix_row, [tokens for tokens, _ in beams])  # (beams, V)
        candidates = [(total + logp[v], tokens, v) for (tokens, total), logp in zip(beams, logps)
                      for v in range(logp.shape[0])]
        candidates.sort(key=lambda c: -c[0].item())
        beams = []
        for rank, (total, tokens, v) in enumerate(candidates[: 2 * beam_size]):
            if v == eos:
                if rank < beam_size:
                    finished.append((score(total.item(), t, alpha), -len(finished), tokens))
            elif len(beams) < beam_size:
                beams.append((tokens + [v], total))
    finished += [(score(total.item(), max_length, alpha), -len(finished) - i, tokens)
                 for i, (tokens, total) in enumerate(beams)]
    return max(finished)[2]


def clipcap_generate_beam(lm, prefix_row, *, stop: int, beam_size: int, entry_length: int) -> list[int]:
    """ClipCap's generate_beam, its semantics written out.

    k slots start from the k most likely first tokens. Each step, a running slot offers every continuation,
    scored by its mean log p over its tokens; a slot that wrote the stop token offers only itself, its mean
    frozen. The k best offers fill the slots. The search ends when every slot has stopped or after
    ``entry_length`` tokens; the best mean wins. Returns the tokens before the stop token.
    """
    first = next_logp(lm, prefix_row, []).topk(beam_size)
    # a slot: (tokens, sum of log p, length, stopped)
    slots = [([v], total, 1, v == stop) for total, v in zip(first.values, first.indices.tolist())]
    for _ in range(entry_length - 1):
        if all(slot[3] for slot in slots):
            break
        offers = []
        running = [slot for slot in slots if not slot[3]]
        logps = next_logps(lm, prefix_row, [slot[0] for slot in running]) if running else []
        for (tokens, total, n, _), logp in zip(running, logps):
            offers += [(((total + logp[v]) / (n + 1)).item(), (tokens + [v], total + logp[v], n + 1, v == stop))
                       for v in range(logp.shape[0])]
        offers += [((total / n).item(), (tokens, total, n, True)) for tokens, total, n, stopped in slots if stopped]
        offers.sort(key=lambda o: -o[0])
        slots = [slot for _, slot in offers[:beam_size]]
    tokens = max(slots, key=lambda slot: (slot[1] / slot[2]).item())[0]
    return tokens[:-1] if tokens[-1] == stop else tokens


def clipcap_score(lm, prefix_row, caption: list[int], *, stop: int, entry_length: int) -> float:
    """generate_beam's score of a caption: mean log p of its tokens and the stop token (none when it was cut off
    at entry_length tokens)."""
    seq = caption + [stop] if len(caption) < entry_length else caption
    total = sum(next_logp(lm, prefix_row, seq[:i])[seq[i]].item() for i in range(len(seq)))
    return total / len(seq)
