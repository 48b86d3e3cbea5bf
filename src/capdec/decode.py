"""Decoding a caption from an LM prefix: greedy, beam search and nucleus/top-k sampling.

Pure, batched functions over a Hugging Face causal LM. Every row of a batch has a prefix of the same
length L, so no padding or attention mask is needed: rows that have finished are dropped from the
batch (and from the key/value cache) as they finish. With ``use_cache=True`` (the default) each step
feeds one new token and reuses the cached keys/values of everything before it; ``use_cache=False``
re-runs the whole sequence every step (for tests and benchmarks: the tokens are the same).

Notation: b - batch (images), k - beam size, n - rows currently decoded (b or b·k, fewer as rows
finish), L - prefix length, t - tokens generated so far, h - LM hidden size, V - vocabulary.

Returned token ids never include the end-of-sequence token; a caption that reached ``max_length``
tokens without one is returned as is. With ``stop_at_period`` a period token also ends a caption (and
is kept): models trained the ClipCap way never learned an end token, and stop at '.' instead.
"""

from __future__ import annotations

import contextlib
import heapq
import inspect
import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from capdec.configs import DEFAULT_MAX_LENGTH, STRATEGIES, DecodeConfig  # noqa: F401  (re-exported)
from capdec.errors import InputError

logger = logging.getLogger(__name__)



# -- the LM, one step at a time ----------------------------------------------------------------------


class _LMStepper:
    """Feeds a causal LM one token per step, with or without the key/value cache.

    ``start`` runs the prefix; ``step`` appends one token per row; ``select`` keeps (and reorders,
    repeats) rows of the state: beam reordering and dropping finished rows are both a ``select``.
    """

    def __init__(self, lm: Any, *, use_cache: bool):
        self.lm = lm
        self.use_cache = use_cache
        self.embed = lm.get_input_embeddings()
        params = inspect.signature(lm.forward).parameters
        # transformers ≥ 5 renamed past_key_values to cache (the old name is deprecated)
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.keep_kw = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
        self.cache: Any = None
        self.seq: torch.Tensor | None = None  # uncached: the whole input so far (n, L+t, h)

    def _forward(self, inputs: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
        kwargs: dict[str, Any] = {"inputs_embeds": inputs, "use_cache": self.use_cache}
        if self.use_cache and cache is not None:
            kwargs[self.cache_kw] = cache
        if self.keep_kw:
            kwargs[self.keep_kw] = 1  # logits of the last position only
        out = self.lm(**kwargs)
        new_cache = None
        if self.use_cache:
            new_cache = getattr(out, "cache", None)
            if new_cache is None:
                new_cache = getattr(out, "past_key_values", None)
        return out.logits[:, -1].float(), new_cache  # (n, V)

    def start(self, prefix: torch.Tensor) -> torch.Tensor:
        """Run the prefix (n, L, h); next-token logits (n, V) in float32."""
        if self.use_cache:
            logits, self.cache = self._forward(prefix, None)
        else:
            self.seq = prefix
            logits, _ = self._forward(prefix, None)
        return logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per row (n,); next-token logits (n, V)."""
        emb = self.embed(tokens.unsqueeze(1))  # (n, 1, h)
        if self.use_cache:
            logits, self.cache = self._forward(emb, self.cache)
        else:
            assert self.seq is not None
            self.seq = torch.cat([self.seq, emb.to(self.seq.dtype)], dim=1)  # (n, L+t, h)
            logits, _ = self._forward(self.seq, None)
        return logits

    def select(self, rows: torch.Tensor) -> None:
        """Keep rows ``rows`` (any length, repeats allowed) of the decoding state, in that order."""
        if self.use_cache:
            self.cache = _select_cache(self.cache, rows)
        else:
            assert self.seq is not None
            self.seq = self.seq.index_select(0, rows.to(self.seq.device))


def _select_cache(cache: Any, rows: torch.Tensor) -> Any:
    """Index the batch dimension of a key/value cache: a transformers ``Cache`` or legacy tuples."""
    if hasattr(cache, "batch_select_indices"):  # transformers Cache objects (DynamicCache, ...)
        cache.batch_select_indices(rows)
        return cache
    if isinstance(cache, (tuple, list)):  # legacy: ((k, v), ...) with (n, heads, t, head_dim) tensors
        return tuple(tuple(x.index_select(0, rows.to(x.device)) for x in layer) for layer in cache)
    raise TypeError(f"cannot reorder a key/value cache of type {type(cache).__name__}; use use_cache=False")


# -- strategies ---------------------------------------------------------------------------------------


def _filter_logits(logits: torch.Tensor, *, top_k: int, top_p: float) -> torch.Tensor:
    """Set the logits outside the top-k / nucleus (top-p) set to -inf; (n, V) -> (n, V)."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (n, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked before it already reach top_p (the first is always kept)
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def period_token_ids(tokenizer: Any) -> list[int]:
    """Ids of the tokens that are a period, with or without a leading space (GPT-2: '.' and ' .')."""
    candidates = [i for tok, i in tokenizer.get_vocab().items() if "." in tok]
    return sorted(i for i in candidates if tokenizer.decode([i]).strip() == ".")


def _pointwise(stepper: _LMStepper, prefix: torch.Tensor, *, eos_token_id: int, max_length: int,
               cfg: DecodeConfig, stop: torch.Tensor) -> list[list[int]]:
    """Greedy or sampling: one token per row per step; finished rows leave the batch."""
    b = prefix.shape[0]
    out: list[list[int]] = [[] for _ in range(b)]
    generator = None
    if cfg.strategy == "sample" and cfg.seed is not None:
        generator = torch.Generator(device=prefix.device).manual_seed(cfg.seed)
    active = torch.arange(b, device=prefix.device)  # batch index of each row still decoding
    logits = stepper.start(prefix)  # (n, V)
    for t in range(max_length):
        if cfg.strategy == "greedy":
            tokens = logits.argmax(dim=-1)  # (n,)
        else:
            logits = _filter_logits(logits / cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
            tokens = torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)  # (n,)
        finished = torch.isin(tokens, stop)
        for i, tok in zip(active.tolist(), tokens.tolist()):
            if tok != eos_token_id:
                out[i].append(tok)
        if t == max_length - 1:
            break
        if finished.any():
            keep = (~finished).nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            stepper.select(keep)
            active, tokens = active[keep], tokens[keep]
        logits = stepper.step(tokens)
    return out


def _beam(stepper: _LMStepper, prefix: torch.Tensor, *, eos_token_id: int, max_length: int,
          cfg: DecodeConfig, stop: torch.Tensor) -> list[list[int]]:
    """Beam search with length normalisation.

    Each step ranks the (s+1)·k best continuations of an image's k beams, s being the number of ending
    tokens (1, the end-of-sequence token; more with ``stop_at_period``): 2k usually. An ending token among
    the first k finishes that hypothesis with score ``sum log p / length**length_penalty`` (length
    counts the end-of-sequence token); the best k others continue. At ``max_length`` the running beams
    are finished as they are. The best finished hypothesis is the caption (the first found among equal
    scores). When an image's search may end is :func:`_may_stop`'s ``cfg.early_stopping`` rule. With
    k = 1 and the heuristic rule (or no length penalty) this is exactly greedy decoding.
    """
    b, k = prefix.shape[0], cfg.beam_size
    device = prefix.device
    finished: list[list[tuple[float, int, list[int]]]] = [[] for _ in range(b)]  # min-heaps of k
    result: list[list[int] | None] = [None] * b
    counter = 0  # tie-breaker so the heaps never compare token lists

    logits = stepper.start(prefix)  # (b, V)
    V = logits.shape[-1]
    n_cand = (stop.numel() + 1) * k  # s ending tokens (end-of-sequence, periods): 2k without periods
    if stop.numel() >= V:  # then fewer than k of the (s+1)·k candidates could continue
        raise InputError(f"every token of the {V}-token vocabulary ends a caption; beam search needs one that does not")
    # all k beams of an image start identical; only the first may be extended at the first step
    stepper.select(torch.arange(b, device=device).repeat_interleave(k))
    logits = logits.repeat_interleave(k, dim=0)  # (b·k, V)
    scores = torch.full((b, k), float("-inf"), device=device)
    scores[:, 0] = 0.0
    tokens = torch.empty((b, k, 0), dtype=torch.long, device=device)  # (n_img, k, t)
    active = torch.arange(b, device=device)  # batch index of each image still decoding

    for t in range(1, max_length + 1):
        n_img = active.numel()
        logp = F.log_softmax(logits, dim=-1)  # (n_img·k, V)
        cand = (scores.reshape(-1, 1) + logp).view(n_img, k * V)  # (n_img, k·V)
        top_scores, top_idx = cand.topk(n_cand, dim=1)  # (n_img, (s+1)·k), best first
        top_beam, top_tok = top_idx // V, top_idx % V

        # hypotheses that end here: an end-of-sequence token ranked within the first k
        is_eos = torch.isin(top_tok, stop)
        rank = torch.arange(n_cand, device=device).expand(n_img, -1)
        for r, c in (is_eos & (rank < k)).nonzero().tolist():
            s = top_scores[r, c].item()
            if s == float("-inf"):
                continue
            seq = tokens[r, top_beam[r, c]].tolist()
            if top_tok[r, c].item() != eos_token_id:  # a period that ends the caption is part of it
                seq.append(top_tok[r, c].item())
            heap, entry = finished[active[r].item()], (s / t**cfg.length_penalty, counter, seq)
            counter += 1
            if len(heap) < k:
                heapq.heappush(heap, entry)
            elif entry[0] > heap[0][0]:
                heapq.heapreplace(heap, entry)

        # the k best continuations that do not end: each beam has s ending tokens, so at least k of the
        # (s+1)·k candidates continue
        pick = torch.argsort(is_eos.long() * n_cand + rank, dim=1)[:, :k]  # (n_img, k), best first
        scores = top_scores.gather(1, pick)
        beam = top_beam.gather(1, pick)
        new_tok = top_tok.gather(1, pick)
        rows = (torch.arange(n_img, device=device) * k).unsqueeze(1) + beam  # (n_img, k) rows of the state
        tokens = torch.cat([tokens.reshape(n_img * k, t - 1)[rows.view(-1)].view(n_img, k, t - 1),
                            new_tok.unsqueeze(-1)], dim=-1)  # (n_img, k, t)

        best_running = scores[:, 0].tolist()  # sum log p of each image's best running beam
        done = []
        for r, i in enumerate(active.tolist()):
            heap = finished[i]
            done_i = t < max_length and _may_stop(heap, best_running[r], t=t, k=k, max_length=max_length, cfg=cfg)
            if not done_i and t == max_length:  # out of room: the running beams compete as they are
                for j in range(k):
                    s = scores[r, j].item()
                    if s > float("-inf"):
                        heap.append((s / t**cfg.length_penalty, counter, tokens[r, j].tolist()))
                        counter += 1
                done_i = True
            if done_i:  # best score; among equal scores the earliest found
                result[i] = max(heap, key=lambda e: (e[0], -e[1]))[2]
            done.append(done_i)
        if all(done):
            break
        keep = torch.tensor([not d for d in done], device=device)
        active, scores, tokens, rows, new_tok = active[keep], scores[keep], tokens[keep], rows[keep], new_tok[keep]
        stepper.select(rows.reshape(-1))
        logits = stepper.step(new_tok.reshape(-1))
    return [r if r is not None else [] for r in result]


def _may_stop(heap: list[tuple[float, int, list[int]]], best_running: float, *, t: int, k: int, max_length: int,
              cfg: DecodeConfig) -> bool:
    """Whether an image's beam search may end after step ``t`` (``best_running``: its best running beam's sum log p).

    ``exact``: a running beam's sum only falls (log p ≤ 0), and it can finish at any length n in
    [t+1, max_length]; ``sum / n**length_penalty`` is largest at one end of that range. When even that
    bound does not beat the best finished score, no later hypothesis can change the result: the caption
    is the one searching to ``max_length`` gives. ``heuristic`` (Hugging Face's ``early_stopping=False``):
    k hypotheses have finished and the best running beam, scored at its current length t, does not beat
    the worst of them; a length-normalised score can still rise, so this can end too soon.
    """
    alpha = cfg.length_penalty
    if cfg.early_stopping == "heuristic":
        return len(heap) == k and heap[0][0] >= best_running / t**alpha
    if not heap:
        return False
    bound = max(best_running / (t + 1) ** alpha, best_running / max_length**alpha)
    return max(entry[0] for entry in heap) >= bound


# -- entry point --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Dropout off while decoding; the caller's train/eval mode is restored afterwards."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def _max_positions(lm: Any) -> int | None:
    cfg = getattr(lm, "config", None)
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def generate(model_or_lm: Any, prefix: torch.Tensor | list[torch.Tensor], *, eos_token_id: int | None = None,
             config: DecodeConfig | None = None, **options: Any) -> list[list[int]]:
    """Decode token ids after ``prefix`` (b, L, h), one list per row (end-of-sequence not included).

    ``prefix`` may also be a list of (L_i, h) prefixes of different lengths (entity prompts): rows of
    one length are decoded together, and the results come back in the list's order.
    ``model_or_lm`` is a :class:`~capdec.model.CapDecModel` (its LM, end-of-sequence token and
    ``max_length`` are used) or a Hugging Face causal LM (then ``eos_token_id`` is required).
    Options are :class:`DecodeConfig` fields, given as ``config`` and/or keywords (keywords win)::

        generate(model, model.prefix(emb), strategy="beam", beam_size=5)
    """
    if isinstance(prefix, (list, tuple)):
        out: list[list[int]] = [[] for _ in prefix]
        by_length: dict[int, list[int]] = {}
        for i, p in enumerate(prefix):
            by_length.setdefault(p.shape[0], []).append(i)
        for rows in by_length.values():
            ids = generate(model_or_lm, torch.stack([prefix[i] for i in rows]), eos_token_id=eos_token_id,
                           config=config, **options)
            for i, seq in zip(rows, ids):
                out[i] = seq
        return out
    cfg = (config or DecodeConfig()).replace(**options) if options else (config or DecodeConfig())
    lm = getattr(model_or_lm, "lm", model_or_lm)
    if eos_token_id is None:
        eos_token_id = getattr(model_or_lm, "eos_token_id", None)
        if eos_token_id is None:
            raise InputError("generate() needs eos_token_id when given a bare language model")
    max_length = cfg.max_length
    if max_length is None:  # a CapDecModel's caption length; 40 for a bare LM
        max_length = model_or_lm.config.max_length if hasattr(model_or_lm, "lm") else DEFAULT_MAX_LENGTH
    if prefix.ndim != 3:
        raise InputError(f"prefix must be (batch, prefix_length, hidden), got shape {tuple(prefix.shape)}")
    positions = _max_positions(lm)
    # the last generated token is never fed back, so L + max_length - 1 positions are used
    if positions is not None and prefix.shape[1] + max_length - 1 > positions:
        raise InputError(f"max_length {max_length} with a prefix of {prefix.shape[1]} needs "
                         f"{prefix.shape[1] + max_length - 1} positions; the LM has {positions}. "
                         f"Use max_length ≤ {positions - prefix.shape[1] + 1}.")
    if prefix.shape[0] == 0:
        return []
    stop_ids = [eos_token_id]
    stop_at_period = cfg.stop_at_period
    if stop_at_period is None:
        stop_at_period = bool(getattr(getattr(model_or_lm, "config", None), "stop_at_period", False))
    if stop_at_period:
        tokenizer = getattr(model_or_lm, "tokenizer", None)
        if tokenizer is None:
            raise InputError("stop_at_period needs the model's tokenizer (give a CapDecModel, not a bare LM)")
        stop_ids += period_token_ids(tokenizer)
    stop = torch.tensor(stop_ids, device=prefix.device)
    stepper = _LMStepper(lm, use_cache=cfg.use_cache)
    with torch.inference_mode(), _eval_mode(lm):
        if cfg.strategy == "beam":
            return _beam(stepper, prefix, eos_token_id=eos_token_id, max_length=max_length, cfg=cfg, stop=stop)
        return _pointwise(stepper, prefix, eos_token_id=eos_token_id, max_length=max_length, cfg=cfg, stop=stop)
