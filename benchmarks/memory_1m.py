"""Benchmark capdec.memory on a 1,000,000-caption memory (d=512, float16): build, bytes, query latency.

The memory is synthetic but shaped like CLIP text embeddings: every row shares a common direction
(the "text cone", so random pairs have cosine ≈ 0.4), belongs to one of ``--clusters`` topics, and has
its own noise. Queries are "image-like": a topic centre plus a different shared direction (a modality
gap) plus noise, so their best cosines (≈ 0.5) sit well below the text-text ones, as with real CLIP.

Measured, per thread count: exact search k=5, exact DeCap projection (chunked log-sum-exp) and top-k
projection (k=256) with torch; search and top-k projection with faiss IndexFlatIP and IVF; batch 1
and batch 64; plus IVF recall@5 against the exact results and the top-k projection's agreement with
the exact one. Prints one JSON object (also written to ``--out``). ::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/memory_1m.py            # ~3 min on one shared core
    .venv/bin/python benchmarks/memory_1m.py --threads 1,all --n 200000   # all cores, smaller memory

``--threads`` defaults to 1 and the thread count allowed by OMP_NUM_THREADS (all cores if unset).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from capdec.memory import MemoryConfig, TextMemory, faiss_available, project_candidates

logger = logging.getLogger("capdec.benchmarks.memory_1m")


def rss_bytes() -> dict[str, int]:
    """Current and peak resident set size of this process."""
    with open("/proc/self/statm") as f:
        current = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"rss": current, "peak_rss": peak}


def synthetic_memory(n: int, d: int, clusters: int, seed: int) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """(n, d) float16 unit rows with a shared direction and topic clusters; also the centres and labels."""
    g = torch.Generator().manual_seed(seed)
    cone = F.normalize(torch.randn(d, generator=g), dim=0)
    centres = F.normalize(torch.randn(clusters, d, generator=g), dim=-1)
    labels = torch.randint(0, clusters, (n,), generator=g)
    out = np.empty((n, d), dtype=np.float16)
    step = 65536
    for lo in range(0, n, step):
        hi = min(lo + step, n)
        noise = torch.randn(hi - lo, d, generator=g) / d**0.5  # norm ≈ 1
        rows = cone + centres[labels[lo:hi]] + 0.8 * noise
        out[lo:hi] = F.normalize(rows, dim=-1).half().numpy()
    return out, centres, labels


def image_queries(b: int, centres: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    d = centres.shape[1]
    gap = F.normalize(torch.randn(d, generator=g), dim=0)  # the image modality's own direction
    topics = torch.randint(0, len(centres), (b,), generator=g)
    return F.normalize(gap + centres[topics] + 1.0 * torch.randn(b, d, generator=g) / d**0.5, dim=-1)


def time_call(fn: Callable[[], object], *, budget_s: float, max_reps: int = 5) -> dict[str, float]:
    """Seconds per call: at least one call, more (up to ``max_reps``) while within ``budget_s``."""
    times = []
    total = 0.0
    while len(times) < max_reps and (not times or total + times[-1] <= budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        total += times[-1]
    return {"s_per_call": float(np.median(times)), "reps": len(times)}


def measure(memory: TextMemory, queries: dict[int, torch.Tensor], *, label: str, backend: str,
            exact_projection: bool, topk: int, budget_s: float) -> dict[str, dict]:
    out = {}
    for b, q in queries.items():
        for op, fn in [("search_k5", lambda q=q: memory.search(q, 5, backend=backend)),
                       (f"project_top{topk}", lambda q=q: memory.project(q, k=topk, backend=backend)),
                       *([("project_exact", lambda q=q: memory.project(q))] if exact_projection else [])]:
            r = time_call(fn, budget_s=budget_s)
            r["ms_per_image"] = 1000 * r["s_per_call"] / b
            out[f"{op}/b{b}"] = r
            logger.info("%-22s %-20s b=%-3d %9.1f ms/call %8.2f ms/image (%d reps)", label, op, b,
                        1000 * r["s_per_call"], r["ms_per_image"], r["reps"])
    return out


def recall(found: torch.Tensor, exact: torch.Tensor) -> float:
    return float(np.mean([len(set(a) & set(b)) / exact.shape[1] for a, b in zip(found.tolist(), exact.tolist())]))


def ivf_sweep(mem: TextMemory, q: torch.Tensor, exact_i: torch.Tensor, text_q: tuple[torch.Tensor, torch.Tensor],
              text_exact_i: torch.Tensor, exact_proj: torch.Tensor, args: argparse.Namespace) -> list[dict]:
    """Recall@5 (image-like and noised-text queries) and batch-64 latency for a few nprobe values."""
    out = []
    configured = mem.config
    for nprobe in sorted({args.nprobe, 4 * args.nprobe, 16 * args.nprobe}):
        if nprobe > args.nlist:
            continue
        mem.config = MemoryConfig(**{**configured.to_dict(), "nprobe": nprobe})
        t0 = time.perf_counter()
        found = mem.search(q, 5)[1]
        ms = 1000 * (time.perf_counter() - t0) / len(q)
        proj_cos = (exact_proj * mem.project(q, k=args.topk)).sum(-1)
        row = {"nprobe": nprobe, "search_k5_ms_per_image_b64": ms,
               "recall_at_5_image_queries": recall(found, exact_i),
               "recall_at_5_text_queries": recall(mem.search(text_q[0], 5, exclude=text_q[1])[1], text_exact_i),
               "topk_vs_exact_projection_cos_mean": proj_cos.mean().item(),
               "topk_vs_exact_projection_cos_min": proj_cos.min().item()}
        logger.info("ivf sweep: %s", json.dumps(row))
        out.append(row)
    mem.config = configured
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000, help="memory rows (captions)")
    p.add_argument("--dim", type=int, default=512, help="embedding dimension")
    p.add_argument("--clusters", type=int, default=10_000, help="topics in the synthetic memory")
    p.add_argument("--threads", default=None,
                   help="comma-separated thread counts ('all' = OMP_NUM_THREADS or all cores); default 1,all")
    p.add_argument("--topk", type=int, default=256, help="k of the top-k projection")
    p.add_argument("--nlist", type=int, default=512,
                   help="IVF lists (the library default 4·sqrt(n) = 4000 for 1M would take an estimated 15+ min "
                        "to train and fill on one shared core; 512 took 27 s)")
    p.add_argument("--nprobe", type=int, default=16, help="IVF lists scanned per query")
    p.add_argument("--train-size", type=int, default=25_000, help="rows sampled to train the IVF k-means")
    p.add_argument("--budget-s", type=float, default=3.0, help="time spent repeating one measurement")
    p.add_argument("--no-faiss", action="store_true", help="torch backend only")
    p.add_argument("--seed", type=int, default=0, help="random seed of the synthetic data")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)

    allowed = int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
    spec = args.threads or "1,all"
    threads = sorted({allowed if t.strip() == "all" else int(t) for t in spec.split(",")})
    use_faiss = faiss_available() and not args.no_faiss
    if use_faiss:
        import faiss

    result: dict = {
        "n": args.n, "dim": args.dim, "storage": "float16", "clusters": args.clusters, "topk": args.topk,
        "machine": {"cpu_count": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                    "platform": platform.platform(), "torch": torch.__version__,
                    "faiss": faiss.__version__ if use_faiss else None,
                    "loadavg_start": os.getloadavg()},
        "rss_start": rss_bytes(),
    }

    torch.set_num_threads(max(threads))
    t0 = time.perf_counter()
    emb, centres, _ = synthetic_memory(args.n, args.dim, args.clusters, args.seed)
    memory = TextMemory(emb, encoder_identity={"synthetic": True, "seed": args.seed}, validate=False,
                        config=MemoryConfig(backend="torch"), source="synthetic")
    result["build"] = {"synthetic_data_s": time.perf_counter() - t0, "embeddings_bytes": emb.nbytes,
                       **rss_bytes()}
    t0 = time.perf_counter()
    q64 = image_queries(64, centres, args.seed + 1)
    queries = {1: q64[:1], 64: q64}

    # quality: the data's cosine structure, top-k vs exact projection (one pass each, reused below)
    torch.set_num_threads(max(threads))
    top_s, top_i = memory.search(q64, args.topk, backend="torch")
    exact_i = top_i[:, :5]
    topk_proj = project_candidates(top_s, memory.gather(top_i), tau=0.01)  # = memory.project(q64, k=topk)
    exact_proj = memory.project(q64)
    # text-like queries (IFCap training): a memory row plus CapDec's training noise, its own row excluded
    own = torch.from_numpy(np.random.default_rng(1).choice(args.n, 64, replace=False))
    g = torch.Generator().manual_seed(args.seed + 2)
    text_q = F.normalize(memory.gather(own) + 0.016**0.5 * torch.randn(64, args.dim, generator=g), dim=-1)
    text_exact_s, text_exact_i = memory.search(text_q, 5, exclude=own, backend="torch")
    text_q = (text_q, own)
    rand_rows = torch.from_numpy(emb[np.random.default_rng(0).integers(0, args.n, 2000)].astype(np.float32))
    result["data"] = {
        "query_top1_cos_mean": top_s[:, 0].mean().item(),
        "query_top256_cos_mean": top_s[:, -1].mean().item(),
        "text_query_top1_cos_mean": text_exact_s[:, 0].mean().item(),
        "query_random_row_cos_mean": (q64 @ rand_rows.T).mean().item(),
        "text_text_random_pair_cos_mean": (rand_rows[:1000] @ rand_rows[1000:].T).mean().item(),
        "topk_vs_exact_projection_cos_min": (exact_proj * topk_proj).sum(-1).min().item(),
        "projection_to_query_cos_mean": (exact_proj * q64).sum(-1).mean().item(),
        "quality_pass_s": time.perf_counter() - t0,
    }
    logger.info("data: %s", json.dumps(result["data"]))

    runs = {}
    for t in threads:
        torch.set_num_threads(t)
        if use_faiss:
            faiss.omp_set_num_threads(t)
        runs[f"torch/threads={t}"] = measure(memory, queries, label=f"torch t={t}", backend="torch",
                                             exact_projection=True, topk=args.topk, budget_s=args.budget_s)
    result["rss_after_torch"] = rss_bytes()  # the exact (chunked) torch path's footprint, before any faiss index

    if use_faiss:
        faiss.omp_set_num_threads(max(threads))
        torch.set_num_threads(max(threads))
        for kind in ("flat", "ivf"):
            mem = TextMemory(emb, validate=False, source="synthetic",
                             config=MemoryConfig(backend="faiss", index=kind, nlist=args.nlist, nprobe=args.nprobe,
                                                 train_size=args.train_size))
            t0 = time.perf_counter()
            mem.faiss_index(show_progress=False)
            build = {"build_s": time.perf_counter() - t0, "threads": max(threads),
                     "index_bytes": mem.nbytes - emb.nbytes, **rss_bytes()}
            if kind == "ivf":
                build.update(nlist=args.nlist, train_size=args.train_size, nprobe_sweep=ivf_sweep(
                    mem, q64, exact_i, text_q, text_exact_i, exact_proj, args))
            else:
                build["identical_to_torch"] = bool(torch.equal(mem.search(q64, 5)[1], exact_i))
            logger.info("faiss %s index: %s", kind, json.dumps(build))
            result[f"faiss_{kind}_index"] = build
            for t in threads:
                faiss.omp_set_num_threads(t)
                torch.set_num_threads(t)
                runs[f"faiss-{kind}/threads={t}"] = measure(mem, queries, label=f"faiss-{kind} t={t}",
                                                            backend="faiss", exact_projection=False,
                                                            topk=args.topk, budget_s=args.budget_s)
            mem.drop_faiss_index()
            del mem

    result["latency"] = runs
    result["rss_end"] = rss_bytes()
    result["machine"]["loadavg_end"] = os.getloadavg()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
