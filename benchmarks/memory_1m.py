"""Benchmark capdec.memory on a memory of 5,000,000 captions (``--n``; 1M: ``--n 1000000``), d=512, float16,
read from an embedding store on disk: build time, query latency, recall@k against exact search and peak
resident memory, checked against a target (exit status 1 when missed).

The memory is synthetic but shaped like CLIP text embeddings: every row shares a common direction
(the "text cone", so random pairs have cosine ≈ 0.4), belongs to one of ``--clusters`` topics, and has
its own noise. Queries are "image-like": a topic centre plus a different shared direction (a modality
gap) plus noise, so their best cosines (≈ 0.5) sit well below the text-text ones, as with real CLIP;
"text-like" queries (IFCap training) are memory rows plus CapDec's training noise, their own row excluded.

The rows are written as an embedding store (chunk by chunk) and the memory is
``TextMemory.from_store``: memory-mapped, each chunk's pages unmapped once read, never copied. Measured:

1. exact search (k=5) and DeCap projection (all rows; top-``--topk``) with torch, batch 1 and 64;
2. the faiss ``ivfpq`` index (inverted lists of ``pq_m``-byte codes; candidates re-scored exactly from
   the rows): build time and bytes, search and top-k projection latency, recall@5 of image-like and
   text-like queries against exact search and top-k projection agreement, for a few ``nprobe``;
3. optionally (``--indexes flat ivf``) the indexes that hold the rows in RAM (4·n·d and 2·n·d bytes);
4. peak resident memory (``VmHWM``) of each phase. Target: < ``--rss-limit-mb`` (1 GB) while querying,
   exact or through ivfpq, and while building ivfpq. ::

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/memory_1m.py --out docs/results/bench/memory_5m.json
    .venv/bin/python benchmarks/memory_1m.py --n 200000 --nlist 256 --threads 1,all     # a quick look

The store (~5 GB for 5M) goes to ``--workdir`` (default: a temporary directory, deleted at the end).
Prints one JSON object (also written to ``--out``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rss import check_targets, peak_rss_mb, reset_peak, rss_mb
from run_record import finish, start

from capdec.memory import MemoryConfig, TextMemory, faiss_available, project_candidates
from capdec.memory.text_memory import RESCORED_MIN
from capdec.store import CAPTIONS, EMBEDDINGS, META, NpyWriter, _make_meta

logger = logging.getLogger("capdec.benchmarks.memory")


def write_synthetic_store(path: Path, n: int, d: int, clusters: int, seed: int) -> torch.Tensor:
    """An embedding store of ``n`` float16 unit rows with a shared direction and topic clusters, written in
    chunks (memory: one chunk); returns the topic centres."""
    g = torch.Generator().manual_seed(seed)
    cone = F.normalize(torch.randn(d, generator=g), dim=0)
    centres = F.normalize(torch.randn(clusters, d, generator=g), dim=-1)
    path.mkdir(parents=True)
    step = 65536
    with open(path / EMBEDDINGS, "wb") as f, open(path / CAPTIONS, "w", encoding="utf-8") as cap:
        out = NpyWriter(f, (n, d), "float16")
        for lo in range(0, n, step):
            hi = min(lo + step, n)
            labels = torch.randint(0, clusters, (hi - lo,), generator=g)
            noise = torch.randn(hi - lo, d, generator=g) / d**0.5  # norm ≈ 1
            out.write(F.normalize(cone + centres[labels] + 0.8 * noise, dim=-1).half().numpy())
            cap.writelines(f'{{"caption": "caption {i} of topic {int(t)}"}}\n' for i, t in zip(range(lo, hi), labels))
        out.close()
    meta = _make_meta({"kind": "synthetic"}, {"kind": "synthetic", "seed": seed, "dim": d}, (n, d), "float16",
                      {"paths": [], "captions_sha256": None, "format": "synthetic"},
                      {"read": n, "empty_skipped": 0, "duplicates_removed": 0, "truncated": 0})
    (path / META).write_text(json.dumps(meta))
    return centres


def image_queries(b: int, centres: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    d = centres.shape[1]
    gap = F.normalize(torch.randn(d, generator=g), dim=0)  # the image modality's own direction
    topics = torch.randint(0, len(centres), (b,), generator=g)
    return F.normalize(gap + centres[topics] + 1.0 * torch.randn(b, d, generator=g) / d**0.5, dim=-1)


def time_call(fn: Callable[[], object], *, budget_s: float, max_reps: int = 5) -> dict[str, float]:
    """Seconds per call: at least one call, more (up to ``max_reps``) while within ``budget_s``."""
    times: list[float] = []
    while len(times) < max_reps and (not times or sum(times) + times[-1] <= budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"s_per_call": float(np.median(times)), "reps": len(times)}


def measure(memory: TextMemory, queries: dict[int, torch.Tensor], *, label: str, backend: str, exact: bool,
            topk: int, budget_s: float) -> dict[str, dict]:
    out = {}
    for b, q in queries.items():
        for op, fn in [("search_k5", lambda q=q: memory.search(q, 5, backend=backend)),
                       (f"project_top{topk}", lambda q=q: memory.project(q, k=topk, backend=backend)),
                       *([("project_exact", lambda q=q: memory.project(q))] if exact else [])]:
            r = time_call(fn, budget_s=budget_s)
            r["ms_per_image"] = 1000 * r["s_per_call"] / b
            out[f"{op}/b{b}"] = r
            logger.info("%-16s %-18s b=%-3d %9.1f ms/call %8.2f ms/image (%d reps)", label, op, b,
                        1000 * r["s_per_call"], r["ms_per_image"], r["reps"])
    return out


def recall(found: torch.Tensor, exact: torch.Tensor) -> float:
    return float(np.mean([len(set(a) & set(b)) / exact.shape[1] for a, b in zip(found.tolist(), exact.tolist())]))


def nprobe_sweep(mem: TextMemory, q: torch.Tensor, exact_i: torch.Tensor, text_q: torch.Tensor, own: torch.Tensor,
                 text_exact_i: torch.Tensor, exact_proj: torch.Tensor, args: argparse.Namespace) -> list[dict]:
    """Recall@5 (image-like and text-like queries), top-k projection agreement and batch-64 latency per nprobe."""
    out = []
    configured = mem.config
    for nprobe in sorted({args.nprobe, 4 * args.nprobe, 16 * args.nprobe, 64 * args.nprobe}):
        if nprobe > args.nlist:
            continue
        mem.config = MemoryConfig(**{**configured.to_dict(), "nprobe": nprobe})
        t0 = time.perf_counter()
        found = mem.search(q, 5)[1]
        ms = 1000 * (time.perf_counter() - t0) / len(q)
        proj_cos = (exact_proj * mem.project(q, k=args.topk)).sum(-1)
        row = {"nprobe": nprobe, "search_k5_ms_per_image_b64": ms,
               "recall_at_5_image_queries": recall(found, exact_i),
               "recall_at_5_text_queries": recall(mem.search(text_q, 5, exclude=own)[1], text_exact_i),
               "topk_vs_exact_projection_cos_mean": proj_cos.mean().item(),
               "topk_vs_exact_projection_cos_min": proj_cos.min().item()}
        logger.info("nprobe sweep: %s", json.dumps(row))
        out.append(row)
    mem.config = configured
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--n", type=int, default=5_000_000, help="memory rows (captions); 1000000 for the 1M memory")
    p.add_argument("--dim", type=int, default=512, help="embedding dimension")
    p.add_argument("--clusters", type=int, default=10_000, help="topics in the synthetic memory")
    p.add_argument("--threads", default="1", help="comma-separated thread counts ('all' = OMP_NUM_THREADS or all cores)")
    p.add_argument("--topk", type=int, default=256, help="k of the top-k projection")
    p.add_argument("--indexes", nargs="+", choices=["ivfpq", "ivf", "flat"], default=["ivfpq"],
                   help="faiss indexes to measure (ivf and flat hold the rows in RAM: 2·n·d and 4·n·d bytes)")
    p.add_argument("--nlist", type=int, default=2048,
                   help="inverted lists (the library default 4·sqrt(n) = 8944 for 5M would take an hour or more "
                        "to train and fill on one shared core)")
    p.add_argument("--nprobe", type=int, default=16, help="lists scanned per query (the sweep adds 4x, 16x and 64x)")
    p.add_argument("--train-size", type=int, default=80_000,
                   help="rows sampled to train the k-means and codes (faiss asks for 39 per list: 79,872 for 2048)")
    p.add_argument("--budget-s", type=float, default=3.0, help="time spent repeating one measurement")
    p.add_argument("--rss-limit-mb", type=float, default=1024, help="target: peak RSS while querying")
    p.add_argument("--seed", type=int, default=0, help="random seed of the synthetic data")
    p.add_argument("--workdir", type=Path, help="where the store goes (default: a temporary directory)")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)

    allowed = int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
    threads = sorted({allowed if t.strip() == "all" else int(t) for t in args.threads.split(",")})
    use_faiss = faiss_available()
    if use_faiss:
        import faiss
    if not use_faiss and args.indexes:
        logger.warning("faiss is not installed: measuring the exact torch search only")

    torch.set_num_threads(max(threads))
    record = start(argv, threads=max(threads))
    result: dict[str, Any] = {
        "benchmark": "memory", "n": args.n, "dim": args.dim, "storage": "float16, memory-mapped embedding store",
        "clusters": args.clusters, "topk": args.topk,
        "faiss": faiss.__version__ if use_faiss else None, "threads_measured": threads,
        "rss_mb": {"start": rss_mb()},
    }
    work = args.workdir or Path(tempfile.mkdtemp(prefix="capdec-memory-"))
    try:
        t0 = time.perf_counter()
        centres = write_synthetic_store(work / "store", args.n, args.dim, args.clusters, args.seed)
        result["store"] = {"write_s": time.perf_counter() - t0,
                           "embeddings_bytes": (work / "store" / EMBEDDINGS).stat().st_size}
        result["rss_mb"]["after_store"] = rss_mb()

        reset_peak()
        memory = TextMemory.from_store(work / "store", config=MemoryConfig(backend="torch"))
        assert memory.mapped
        q64 = image_queries(64, centres, args.seed + 1)
        queries = {1: q64[:1], 64: q64}
        # quality: exact neighbours and projections (one pass each), the references for the approximate index
        t0 = time.perf_counter()
        top_s, top_i = memory.search(q64, args.topk)
        exact_i = top_i[:, :5]
        topk_proj = project_candidates(top_s, memory.gather(top_i), tau=0.01)  # = memory.project(q64, k=topk)
        exact_proj = memory.project(q64)
        own = torch.from_numpy(np.random.default_rng(1).choice(args.n, 64, replace=False))
        g = torch.Generator().manual_seed(args.seed + 2)
        text_q = F.normalize(memory.gather(own) + 0.016**0.5 * torch.randn(64, args.dim, generator=g), dim=-1)
        text_exact_s, text_exact_i = memory.search(text_q, 5, exclude=own)
        rand_rows = memory.gather(torch.from_numpy(np.random.default_rng(0).integers(0, args.n, 2000)))
        result["data"] = {
            "query_top1_cos_mean": top_s[:, 0].mean().item(),
            "query_top256_cos_mean": top_s[:, -1].mean().item(),
            "text_query_top1_cos_mean": text_exact_s[:, 0].mean().item(),
            "query_random_row_cos_mean": (q64 @ rand_rows.T).mean().item(),
            "text_text_random_pair_cos_mean": (rand_rows[:1000] @ rand_rows[1000:].T).mean().item(),
            "topk_vs_exact_projection_cos_min": (exact_proj * topk_proj).sum(-1).min().item(),
            "quality_pass_s": time.perf_counter() - t0,
        }
        logger.info("data: %s", json.dumps(result["data"]))
        runs = {}
        for t in threads:
            torch.set_num_threads(t)
            runs[f"torch-exact/threads={t}"] = measure(memory, queries, label=f"torch t={t}", backend="torch",
                                                       exact=True, topk=args.topk, budget_s=args.budget_s)
        result["rss_mb"]["exact_queries_peak"] = peak_rss_mb()

        for kind in args.indexes if use_faiss else []:
            reset_peak()
            faiss.omp_set_num_threads(max(threads))
            torch.set_num_threads(max(threads))
            mem = TextMemory.from_store(work / "store", config=MemoryConfig(
                backend="faiss", index=kind, nlist=args.nlist, nprobe=args.nprobe, train_size=args.train_size))
            t0 = time.perf_counter()
            mem.faiss_index(show_progress=False)
            build = {"build_s": time.perf_counter() - t0, "threads": max(threads), "nlist": args.nlist,
                     "train_size": args.train_size, "index_bytes": mem.nbytes - args.n * args.dim * 2,
                     "peak_rss_mb": peak_rss_mb()}
            if kind == "ivfpq":
                ivf = faiss.downcast_index(faiss.extract_index_ivf(mem.faiss_indexes[kind]))
                build.update(pq_m=ivf.pq.M, pq_bits=ivf.pq.nbits, rescored_per_query_k5=max(5 * mem.config.rerank,
                                                                                            RESCORED_MIN))
            logger.info("faiss %s index: %s", kind, json.dumps(build))
            reset_peak()
            if kind == "flat":
                build["identical_to_exact"] = bool(torch.equal(mem.search(q64, 5)[1], exact_i))
            else:
                build["nprobe_sweep"] = nprobe_sweep(mem, q64, exact_i, text_q, own, text_exact_i, exact_proj, args)
            for t in threads:
                faiss.omp_set_num_threads(t)
                torch.set_num_threads(t)
                runs[f"faiss-{kind}/threads={t}"] = measure(mem, queries, label=f"faiss-{kind} t={t}",
                                                            backend="faiss", exact=False, topk=args.topk,
                                                            budget_s=args.budget_s)
            build["queries_peak_rss_mb"] = peak_rss_mb()
            result[f"faiss_{kind}_index"] = build
            mem.drop_faiss_index()
            del mem
        result["latency"] = runs
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    result["rss_mb"]["end"] = rss_mb()
    targets = {"exact_queries_peak_rss_mb": (result["rss_mb"]["exact_queries_peak"], args.rss_limit_mb)}
    if "faiss_ivfpq_index" in result:
        targets.update(ivfpq_build_peak_rss_mb=(result["faiss_ivfpq_index"]["peak_rss_mb"], args.rss_limit_mb),
                       ivfpq_queries_peak_rss_mb=(result["faiss_ivfpq_index"]["queries_peak_rss_mb"], args.rss_limit_mb))
    missed = check_targets(result, targets)
    result["run"] = finish(record)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    if missed:
        print("memory_1m.py: missed " + "; ".join(missed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
