"""Exact search and DeCap projection over a matrix of L2-normalised rows: pure functions of tensors.

Everything runs in torch over chunks of the memory (float32 maths whatever the storage dtype), so a
1M x 512 float16 memory needs its 1 GB plus ~100 MB of work space (measured); a memory-mapped one only
the work space, when ``release`` unmaps each chunk's pages once it is read. Device and dtype of the
results follow the queries.

**Why top-k projection is safe.** With cosines ``s_1 ≥ s_2 ≥ ...`` the weight of item ``j`` relative
to the best one is ``exp(-(s_1 - s_j) / τ)``; with τ = 0.01 an item 0.1 below the best weighs
``e^-10 ≈ 5e-5`` of it, one 0.2 below ``2e-9``. So everything outside the top ``k`` together weighs at
most ``(n - k) · exp(-(s_1 - s_k) / τ)`` of the total (:func:`topk_mass_bound`): once the cosines fall
by ~0.25 within the top few hundred, ``k=256`` reproduces the exact projection to float precision at
the cost of one top-k search instead of a second pass over the memory. The tests check this on
clustered data; on the 1M synthetic benchmark the 256th cosine sits 0.28 below the best and top-256
agrees with the exact projection to a cosine of 1 - 1e-7. Real CLIP memories could not be measured
here: :meth:`~capdec.memory.TextMemory.project` logs a warning when the bound exceeds 1e-3 (raise
``k``, or use ``k=None``).

Notation: b - batch of queries, n - memory rows, c - rows in one chunk, d - embedding dim, k - results.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from capdec.errors import InputError

# work space per chunk (the float32 copy of the rows and the (b, c) scores); small enough to stay in cache
CHUNK_BYTES = 16 << 20


def default_chunk_size(dim: int, batch: int) -> int:
    """Rows per chunk so that the float32 rows plus the (batch, rows) scores take about CHUNK_BYTES."""
    return max(1024, CHUNK_BYTES // (4 * (dim + batch)))


Release = Callable[[int, int], None]  # release(lo, hi): rows lo:hi of a memory-mapped memory are done with


def iter_chunks(memory: torch.Tensor, device: torch.device, chunk_size: int, *,
                release: Release | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(start, rows)`` with ``rows`` a float32 (c, d) block of ``memory`` on ``device``.

    A CPU float16 memory is converted into one reused buffer (fast, no allocation per chunk), so a
    yielded block is only valid until the next one; float32 blocks on the right device are views.
    ``release(lo, hi)`` is called once a block has been used.
    """
    n, d = memory.shape
    same = memory.device == device and memory.dtype == torch.float32
    buf = None
    if not same and device.type == "cpu":
        buf = torch.empty(min(chunk_size, n), d, dtype=torch.float32, device=device)
    for lo in range(0, n, chunk_size):
        rows = memory[lo : lo + chunk_size]
        if same:
            yield lo, rows
        elif buf is not None and memory.device.type == "cpu":
            out = buf[: rows.shape[0]]
            out.copy_(rows)
            yield lo, out
        else:
            yield lo, rows.to(device=device, dtype=torch.float32, non_blocking=True)
        if release is not None:
            release(lo, lo + rows.shape[0])


def cosine_topk(queries: torch.Tensor, memory: torch.Tensor, k: int, *, exclude: torch.Tensor | None = None,
                chunk_size: int | None = None, release: Release | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` cosine similarities of ``queries`` (b, d) against the rows of ``memory`` (n, d).

    ``memory`` rows must be L2-normalised (any float dtype, any device); queries are normalised here.
    ``exclude`` (b,) or (b, m) holds row indices to leave out of each query's results (negative = none).
    Returns ``(scores, indices)``, both (b, k), best first, float32 and int64 on the queries' device;
    where fewer than ``k`` rows remain the tail is score ``-inf``, index ``-1``. ``release``: see
    :func:`iter_chunks`.
    """
    b, device = queries.shape[0], queries.device
    q = F.normalize(queries.float(), dim=-1)  # (b, d)
    ex = exclude_matrix(exclude, b, device)
    chunk_size = chunk_size or default_chunk_size(memory.shape[1], b)
    best_s = torch.empty(b, 0, device=device)
    best_i = torch.empty(b, 0, dtype=torch.long, device=device)
    for lo, rows in iter_chunks(memory, device, chunk_size, release=release):
        s = q @ rows.T  # (b, c)
        if ex is not None:
            _mask_excluded(s, ex, lo)
        s, i = s.topk(min(k, s.shape[1]), dim=1)  # (b, <=k)
        best_s, pos = torch.cat([best_s, s], dim=1).topk(min(k, best_s.shape[1] + s.shape[1]), dim=1)
        best_i = torch.cat([best_i, i + lo], dim=1).gather(1, pos)
    if best_s.shape[1] < k:  # only possible when k > n
        pad = k - best_s.shape[1]
        best_s = torch.cat([best_s, best_s.new_full((b, pad), -math.inf)], dim=1)
        best_i = torch.cat([best_i, best_i.new_full((b, pad), -1)], dim=1)
    best_i = best_i.masked_fill(best_s == -math.inf, -1)
    return best_s, best_i


def project_exact(queries: torch.Tensor, memory: torch.Tensor, *, tau: float = 0.01,
                  chunk_size: int | None = None, release: Release | None = None) -> torch.Tensor:
    """DeCap projection ``normalize(Σ_i softmax(cos(v, M) / τ)_i · M_i)`` over every row of ``memory``.

    The softmax runs chunk by chunk with a running log-sum-exp (maximum, rescaled sum and weighted
    sum), so no (b, n) matrix is formed. Float32 maths; the result has the queries' device and dtype.
    """
    check_tau(tau)
    b, d = queries.shape
    device = queries.device
    q = F.normalize(queries.float(), dim=-1)  # (b, d)
    chunk_size = chunk_size or default_chunk_size(d, b)
    run_max = torch.full((b, 1), -math.inf, device=device)
    run_sum = torch.zeros(b, 1, device=device)
    acc = torch.zeros(b, d, device=device)
    for _, rows in iter_chunks(memory, device, chunk_size, release=release):
        s = (q @ rows.T) / tau  # (b, c)
        new_max = torch.maximum(run_max, s.amax(dim=1, keepdim=True))
        scale = torch.exp(run_max - new_max)  # (b, 1); 0 on the first chunk
        e = torch.exp(s - new_max)  # (b, c)
        acc = acc * scale + e @ rows  # (b, d)
        run_sum = run_sum * scale + e.sum(dim=1, keepdim=True)
        run_max = new_max
    return F.normalize(acc / run_sum, dim=-1).to(queries.dtype)


def rescore(queries: torch.Tensor, candidates: torch.Tensor, rows: torch.Tensor, k: int) -> tuple[torch.Tensor,
                                                                                              torch.Tensor]:
    """The top ``k`` of ``candidates`` (b, m) row indices (``-1`` = none) by their exact cosine with ``queries``
    (b, d); ``rows`` (b, m, d) are their embeddings. Same outputs as :func:`cosine_topk`."""
    q = F.normalize(queries.float(), dim=-1)
    s = torch.einsum("bd,bmd->bm", q, rows.float()).masked_fill(candidates < 0, -math.inf)  # (b, m)
    if s.shape[1] < k:
        pad = k - s.shape[1]
        s = torch.cat([s, s.new_full((s.shape[0], pad), -math.inf)], dim=1)
        candidates = torch.cat([candidates, candidates.new_full((s.shape[0], pad), -1)], dim=1)
    s, pos = s.topk(k, dim=1)
    return s, candidates.gather(1, pos).masked_fill(s == -math.inf, -1)


def project_candidates(scores: torch.Tensor, items: torch.Tensor, *, tau: float = 0.01) -> torch.Tensor:
    """DeCap projection restricted to given candidates: ``normalize(Σ_j softmax(scores / τ)_j · items_j)``.

    ``scores`` (b, k) are the candidates' cosines (``-inf`` = no candidate), ``items`` (b, k, d) their
    embeddings. Used with the top-k of :func:`cosine_topk` / :meth:`TextMemory.search`.
    """
    check_tau(tau)
    w = torch.softmax(scores.float() / tau, dim=-1)  # (b, k)
    out = torch.einsum("bk,bkd->bd", w, items.float())
    return F.normalize(out, dim=-1)


def topk_mass_bound(scores: torch.Tensor, n: int, *, tau: float = 0.01) -> torch.Tensor:
    """Upper bound on the softmax weight a top-k projection leaves out, per query: (b,).

    ``scores`` (b, k) are the top-k cosines, best first. Every row outside them scores at most
    ``s_k``, so their total weight is at most ``(n - k) · exp((s_k - s_1) / τ)`` times the best
    row's weight, itself at most the total.
    """
    k = scores.shape[1]
    if n <= k:
        return scores.new_zeros(scores.shape[0])
    gap = (scores[:, 0] - scores[:, -1]).float().clamp(min=0)  # -inf padding: no rows left, gap inf
    return ((n - k) * torch.exp(-gap / tau)).clamp(max=1.0)


def check_tau(tau: float) -> None:
    if not (isinstance(tau, (int, float)) and tau > 0 and math.isfinite(tau)):
        raise InputError(f"projection temperature tau must be a positive number (got {tau!r}); DeCap uses 0.01")


def exclude_matrix(exclude: torch.Tensor | Sequence[int] | None, b: int, device: torch.device) -> torch.Tensor | None:
    if exclude is None:
        return None
    ex = torch.as_tensor(exclude, device=device)
    if ex.dtype.is_floating_point or ex.dtype == torch.bool:
        raise InputError(f"exclude must hold integer row indices (got dtype {ex.dtype})")
    ex = ex.long()
    if ex.ndim == 1:
        ex = ex[:, None]
    if ex.ndim != 2 or ex.shape[0] != b:
        raise InputError(f"exclude must have shape ({b},) or ({b}, m) for {b} queries (got {tuple(ex.shape)})")
    return ex


def _mask_excluded(s: torch.Tensor, ex: torch.Tensor, lo: int) -> None:
    """Set ``s[r, ex[r, j] - lo] = -inf`` where that index falls in this chunk (in place)."""
    local = ex - lo
    inside = (local >= 0) & (local < s.shape[1])  # (b, m)
    r, j = inside.nonzero(as_tuple=True)
    if r.numel():
        s[r, local[r, j]] = -math.inf


__all__ = ["Release", "cosine_topk", "default_chunk_size", "iter_chunks", "project_candidates", "project_exact",
           "rescore", "topk_mass_bound"]
