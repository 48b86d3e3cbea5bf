"""faiss inner-product indexes over a memory's rows: build, search (same outputs as the exact kernels), read, write.

``index="flat"`` is an exact ``IndexFlatIP`` (a float32 copy of the memory); ``index="ivf"`` an
approximate inverted-file index (``nlist ≈ 4·√n`` lists, ``nprobe`` of them scanned per query) holding
the rows (2·d bytes each); ``index="ivfpq"`` the same lists holding product-quantised codes (``pq_m``
bytes a row, d/16 by default: 32 bytes for 512-d, 1/32 of the float16 rows), for memories that should
not live in RAM -- :class:`~capdec.memory.TextMemory` re-scores its candidates exactly from the
(memory-mapped) rows. Check recall on your data (benchmarks/memory_1m.py prints recall@5 against exact
search for a few ``nprobe``). faiss is optional (``pip install 'capdec[faiss]'``) and imported on use.
"""

from __future__ import annotations

import logging
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from capdec.configs import MEMORY_INDEXES as INDEXES
from capdec.errors import InputError
from capdec.memory.kernels import Release, exclude_matrix
from capdec.utils import progress

logger = logging.getLogger(__name__)


def import_faiss():
    # faiss logs its SIMD-library probing at INFO ("Could not load library with AVX2 support ..."): noise
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    try:
        import faiss
    except ImportError as e:
        raise InputError("the faiss memory backend needs faiss: pip install 'capdec[faiss]' (faiss-cpu), "
                         "or use backend='torch'") from e
    return faiss


def faiss_available() -> bool:
    try:
        import_faiss()
    except InputError:
        return False
    return True


def default_nlist(n: int) -> int:
    """IVF list count: about 4·√n (at least 1, at most n / 39 so every list can be trained)."""
    return max(1, min(int(round(4 * math.sqrt(n))), n // 39 or 1))


SAMPLE_ROWS = 64  # training rows read from a memory-mapped memory between two unmappings
ADD_WORK_BYTES = 2**27  # an ivfpq batch's distance tables while adding rows (128 MB: 4,096 rows at pq_m 32)


def default_pq_m(d: int) -> int:
    """Bytes per row of an ivfpq index: one 8-bit code per 16 dimensions (the largest divisor of d up to d/16).

    32 bytes at d=512, 1/32 of the float16 rows: with faiss's 8-byte row ids, 200 MB for 5M rows, which keeps a
    5M-row memory under 1 GB of RSS beside torch's own ~0.5 GB (benchmarks/memory_1m.py); the codes only pick
    the candidates, whose exact cosines decide.
    """
    return max(m for m in range(1, max(1, d // 16) + 1) if d % m == 0)


def build_faiss_index(memory: torch.Tensor, *, index: str = "flat", nlist: int | None = None,
                      train_size: int | None = None, pq_m: int | None = None, seed: int = 0,
                      show_progress: bool | None = None, release: Release | None = None):
    """A faiss inner-product index over ``memory`` (n, d) rows (CPU tensor, any float dtype).

    ``flat``: exact ``IndexFlatIP`` (a float32 copy: 4·n·d bytes). ``ivf``: ``nlist`` spherical k-means
    lists trained on ``train_size`` sampled rows; rows are stored as float16 (exact for a float16
    memory, 2·n·d bytes) or float32 to match the memory. ``ivfpq``: the same lists holding ``pq_m``-byte
    product-quantised codes of each row's residual (n·pq_m bytes). Rows are added in chunks behind a
    progress bar; ``release(lo, hi)`` is called after each (a memory-mapped memory unmaps them).
    """
    faiss = import_faiss()
    if index not in INDEXES:
        raise InputError(f"unknown faiss index {index!r}; use one of {', '.join(INDEXES)}")
    n, d = memory.shape
    memory = memory.cpu()
    start = time.perf_counter()
    if index == "flat":
        idx = faiss.IndexFlatIP(d)
    else:
        nlist = nlist or default_nlist(n)
        if nlist > n:
            raise InputError(f"{index} index: nlist={nlist} is more than the {n} memory rows; use a smaller nlist "
                             f"or index='flat'")
        # a product quantiser learns 2^bits codes per sub-vector (faiss asks for 39 training rows per code)
        train_size = min(n, train_size or max(50 * nlist, 256 * 39 if index == "ivfpq" else 0))
        if index == "ivfpq":
            pq_m = pq_m or default_pq_m(d)
            if d % pq_m:
                raise InputError(f"ivfpq index: pq_m={pq_m} does not divide the dimension {d}")
            bits = min(8, max(1, int(math.log2(max(2, train_size // 39)))))  # 8 from 9,984 rows; fewer below
            storage = f"PQ{pq_m}x{bits}"  # codes of residuals (faiss's by_residual): the candidates are re-scored
        else:
            storage = "SQfp16" if memory.dtype in (torch.float16, torch.bfloat16) else "Flat"
        idx = faiss.index_factory(d, f"IVF{nlist},{storage}", faiss.METRIC_INNER_PRODUCT)
        ivf = faiss.extract_index_ivf(idx)
        if index == "ivf":
            ivf.by_residual = False  # store the rows themselves: float16 rows stay exact (residuals would not)
        else:  # the codes only rank candidates (re-scored exactly): no polysemous training (minutes, for Hamming
            # filtering we do not use), a quicker k-means per sub-vector
            ivfpq = faiss.downcast_index(ivf)
            ivfpq.do_polysemous_training = False
            ivfpq.pq.cp.niter, ivfpq.pq.cp.max_points_per_centroid = 10, 64
        ivf.cp.spherical = True  # centroids on the sphere, like the data
        ivf.cp.niter = 10
        ivf.cp.seed = seed
        ivf.cp.max_points_per_centroid = max(1, -(-train_size // nlist))  # we sample; faiss should not
        g = torch.Generator().manual_seed(seed)
        sample = torch.randperm(n, generator=g)[:train_size].sort().values
        logger.info("training an %s%d faiss index on %d of %d rows (d=%d)", index.upper(), nlist, train_size, n, d)
        rows = np.empty((len(sample), d), dtype=np.float32)
        # a few rows at a time, unmapped after each, from a memory-mapped memory: a row read maps its whole
        # page-cache folio (up to 2 MB), so the sample at once would map most of the file
        block = len(sample) if release is None else SAMPLE_ROWS
        for lo in range(0, len(sample), block):
            part = sample[lo : lo + block]
            rows[lo : lo + len(part)] = memory[part].float().numpy()
            if release is not None:
                release(int(part[0]), int(part[-1]) + 1)
        idx.train(rows)
        del rows
    step = 32768  # rows converted to float32 at a time (64 MB at d=512)
    if index == "ivfpq":  # faiss encodes a batch through its distance tables: pq_m·256 floats a row (32 KB at pq_m 32)
        step = max(256, ADD_WORK_BYTES // (4 * pq_m * 2**bits))
    with progress(total=n, desc=f"faiss {index} index", unit="row", show=show_progress) as bar:
        for lo in range(0, n, step):
            idx.add(np.ascontiguousarray(memory[lo : lo + step].float().numpy()))
            if release is not None:
                release(lo, min(lo + step, n))
            bar.update(min(step, n - lo))
    logger.info("built a faiss %s index over %d rows in %.1f s", index, n, time.perf_counter() - start)
    return idx


def faiss_topk(idx, queries: torch.Tensor, k: int, *, exclude: torch.Tensor | None = None,
               nprobe: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`cosine_topk` through a faiss inner-product index (same outputs; approximate for IVF)."""
    faiss = import_faiss()
    b, device = queries.shape[0], queries.device
    q = F.normalize(queries.detach().float(), dim=-1).cpu().numpy()
    ex = exclude_matrix(exclude, b, torch.device("cpu"))
    extra = 0 if ex is None else ex.shape[1]
    fetch = min(k + extra, idx.ntotal)
    params = faiss.SearchParametersIVF(nprobe=nprobe) if nprobe is not None else None
    s, i = idx.search(np.ascontiguousarray(q), fetch, params=params)
    s, i = torch.from_numpy(s), torch.from_numpy(i)  # (b, fetch)
    drop = i < 0
    if ex is not None:
        drop |= (i[:, :, None] == ex[:, None, :]).any(dim=-1)
    s = s.masked_fill(drop, -math.inf)
    if fetch < k:
        s = torch.cat([s, s.new_full((b, k - fetch), -math.inf)], dim=1)
        i = torch.cat([i, i.new_full((b, k - fetch), -1)], dim=1)
    s, pos = s.topk(k, dim=1)  # excluded ones sink to the end; order otherwise kept
    i = i.gather(1, pos).masked_fill(s == -math.inf, -1)
    return s.to(device), i.to(device)


def read_index(path: str | os.PathLike, shape: tuple[int, int]):
    """A saved faiss index, which must hold ``shape`` = (rows, dim) like the memory it belongs to."""
    faiss = import_faiss()
    idx = faiss.read_index(str(path))
    if (idx.ntotal, idx.d) != tuple(shape):
        raise InputError(f"{path}: faiss index of {idx.ntotal} x {idx.d} does not match the memory's "
                         f"{shape[0]} x {shape[1]}; delete it (it is rebuilt on demand)")
    return idx


def write_index(idx, path: str | os.PathLike) -> None:
    import_faiss().write_index(idx, str(path))


def index_nbytes(idx) -> int:
    """Approximate bytes held by a faiss index (its stored vectors)."""
    try:
        import faiss

        ivf = faiss.extract_index_ivf(idx)
        return int(ivf.ntotal * (ivf.code_size + 8) + ivf.nlist * ivf.d * 4)
    except (ImportError, RuntimeError):
        return int(idx.ntotal * idx.d * 4)


__all__ = ["build_faiss_index", "default_nlist", "default_pq_m", "faiss_available", "faiss_topk", "read_index",
           "write_index"]
