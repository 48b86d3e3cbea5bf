"""Benchmark training on a corpus far larger than memory-resident data would allow: 5M captions.

Builds a synthetic embedding store (``--captions`` rows, 512-d float16, ~5 GB for 5M; captions drawn
word by word from COCO's vocabulary with COCO's caption-length distribution, so tokenised lengths are
realistic), then:

1. builds the store's token cache for a corpus-trained BPE tokenizer (timed: the streaming pass over
   ``captions.jsonl``);
2. trains a small decoder on the store for ``--steps`` steps with ``capdec.train.train`` (which finds
   and reuses that cache), reporting steps/s;
3. reports the **peak resident memory** of each phase (``VmHWM``, reset between phases) and of the
   whole process. The target is < 2 GB for training: embeddings are memory-mapped and read per batch,
   token ids come from the cache, captions are never held as Python strings.

The store is written without a memory map (a written map's dirty pages would count as this process's
memory) into ``--workdir`` (default: a temporary directory, deleted at the end unless ``--keep``)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/scale.py                 # 5M captions, ~10 min, 5 GB disk
    .venv/bin/python benchmarks/scale.py --captions 200000 --steps 50      # a quick look

Prints one JSON object (also written to ``--out``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import resource
import shutil
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from capdec.model import ModelConfig
from capdec.model.lm import train_tokenizer
from capdec.store import EmbeddingStore
from capdec.tokencache import token_cache
from capdec.train import TrainConfig, train

logger = logging.getLogger("capdec.benchmarks.scale")

COCO = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco"
_CHUNK = 20_000


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (or since :func:`reset_peak`), in MiB."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def reset_peak() -> bool:
    """Start a new peak-memory measurement (Linux: ``5`` to ``/proc/self/clear_refs``); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


class MemorySampler:
    """Samples this process's anonymous and file-backed resident memory (``/proc/self/status``) in a thread.

    File-backed pages (the memory-mapped store and token cache) are shared and reclaimable; anonymous
    memory is what the process itself holds. Both count in RSS.
    """

    def __init__(self, every: float = 0.2):
        self.every, self.peak = every, {"RssAnon": 0.0, "RssFile": 0.0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with open("/proc/self/status", encoding="ascii") as f:
                    for line in f:
                        key = line.split(":")[0]
                        if key in self.peak:
                            self.peak[key] = max(self.peak[key], int(line.split()[1]) / 1024)
            except OSError:
                return
            self._stop.wait(self.every)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def coco_statistics() -> tuple[list[str], np.ndarray, np.ndarray]:
    """COCO's words with their frequencies, and its caption-length (in words) distribution."""
    path = COCO / "captions_val2017.json"
    if path.is_file():
        caps = [a["caption"].strip().lower() for a in json.loads(path.read_text())["annotations"]]
    else:  # a small grammar stands in when the shared data folder is absent
        rng = np.random.default_rng(0)
        base = "a man woman dog cat red blue small large sitting standing on in with next to the table street".split()
        caps = [" ".join(rng.choice(base, size=rng.integers(8, 16))) for _ in range(5000)]
    words = Counter(w for c in caps for w in c.split())
    vocab = list(words)
    freq = np.array([words[w] for w in vocab], dtype=np.float64)
    lengths = np.bincount([len(c.split()) for c in caps])
    return vocab, freq / freq.sum(), lengths / lengths.sum()


def build_store(path: Path, n: int, dim: int, seed: int) -> tuple[EmbeddingStore, float]:
    """A synthetic store of ``n`` captions, written in chunks (memory: one chunk)."""
    from capdec.store import _make_meta  # the store's own meta layout

    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    vocab, p_word, p_len = coco_statistics()
    vocab_arr = np.array(vocab, dtype=object)
    path.mkdir(parents=True)
    digest = hashlib.sha256()
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)), "fortran_order": False, "shape": (n, dim)}
    with open(path / "embeddings.npy", "wb") as emb_f, open(path / "captions.jsonl", "w", encoding="utf-8") as cap_f:
        np.lib.format.write_array_header_1_0(emb_f, header)
        for lo in range(0, n, _CHUNK):
            m = min(_CHUNK, n - lo)
            x = rng.standard_normal((m, dim), dtype=np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            emb_f.write(x.astype(np.float16).tobytes())
            lens = rng.choice(len(p_len), size=m, p=p_len)
            words = vocab_arr[rng.choice(len(vocab), size=int(lens.sum()), p=p_word)]
            cuts = np.cumsum(lens)[:-1]
            for ws in np.split(words, cuts):
                caption = " ".join(ws)
                cap_f.write(json.dumps({"caption": caption}) + "\n")
                digest.update(caption.encode("utf-8") + b"\n")
            logger.info("store: %d / %d rows", lo + m, n)
    meta = _make_meta({"kind": "synthetic"}, {"kind": "synthetic", "dim": dim}, (n, dim), "float16",
                      {"paths": [], "captions_sha256": digest.hexdigest(), "format": "synthetic"},
                      {"read": n, "empty_skipped": 0, "duplicates_removed": 0, "truncated": 0})
    (path / "meta.json").write_text(json.dumps(meta, indent=2))
    return EmbeddingStore.open(path), time.perf_counter() - start


def save_lm(directory: Path, store: EmbeddingStore, sample: int, seed: int) -> Any:
    """A small GPT-2 (random weights) with a BPE tokenizer trained on a sample of the store, saved as a local LM."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from capdec.tokencache import iter_captions

    keep = np.zeros(len(store), dtype=bool)
    keep[np.random.default_rng(seed).choice(len(store), size=min(sample, len(store)), replace=False)] = True
    tok = train_tokenizer(list(iter_captions(store.path / "captions.jsonl", keep)), vocab_size=8000)
    torch.manual_seed(seed)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=256, n_layer=4, n_head=4,
                               eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)).save_pretrained(directory)
    tok.save_pretrained(directory)
    return tok


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--captions", type=int, default=5_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--steps", type=int, default=100, help="training steps")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workdir", help="where the store goes (default: a temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the store and checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="capdec-scale-"))
    result: dict[str, Any] = {"benchmark": "scale", "captions": args.captions, "dim": args.dim, "dtype": "float16",
                              "conditions": {"threads": args.threads, "torch": torch.__version__,
                                             "python": platform.python_version(), "loadavg_start": os.getloadavg()}}
    try:
        store, seconds = build_store(work / "store", args.captions, args.dim, args.seed)
        result["store"] = {"build_seconds": seconds, "embeddings_bytes": (work / "store" / "embeddings.npy").stat().st_size,
                           "captions_bytes": (work / "store" / "captions.jsonl").stat().st_size}
        result["peak_rss_mb"] = {"store_build": peak_rss_mb()}
        per_phase = reset_peak()

        tok = save_lm(work / "lm", store, sample=200_000, seed=args.seed)
        t0 = time.perf_counter()
        cache = token_cache(store, tok)
        tokens = int(cache.offsets[-1])
        result["token_cache"] = {"build_seconds": time.perf_counter() - t0, "tokens": tokens,
                                 "tokens_per_caption": tokens / len(store), "dtype": str(cache.ids.dtype),
                                 "bytes": (cache.path / "ids.bin").stat().st_size
                                 + (cache.path / "offsets.npy").stat().st_size}
        del cache
        result["peak_rss_mb"]["token_cache"] = peak_rss_mb()
        reset_peak()

        t0 = time.perf_counter()
        sampler = MemorySampler()
        with sampler:
            run = train(store.path, work / "ckpt",
                        model_config=ModelConfig(embed_dim=args.dim, lm=str(work / "lm"), prefix_length=10,
                                                 mapper_depth=2, mapper_heads=4, max_length=40),
                        config=TrainConfig(max_steps=args.steps, batch_size=args.batch_size,
                                           log_every=max(1, args.steps // 5), val_max=500, seed=args.seed))
        train_seconds = time.perf_counter() - t0
        rows = [json.loads(r) for r in (work / "ckpt" / "metrics.jsonl").read_text().splitlines()]
        rates = [r["samples_per_s"] for r in rows if "samples_per_s" in r]
        result["train"] = {"steps": run.steps, "batch_size": args.batch_size, "seconds_total": train_seconds,
                           "steps_per_s": (rates[-1] / args.batch_size) if rates else None,
                           "samples_per_s": rates[-1] if rates else None,
                           "train_loss": run.train_loss, "val_loss": run.val_loss,
                           "model": "transformer mapper (2 layers, prefix 10) + GPT-2 4x256 (random weights)"}
        result["token_cache"]["reused_by_train"] = len(list((store.path / "token-cache").iterdir())) == 1
        result["peak_rss_mb"]["train"] = peak_rss_mb()
        result["peak_rss_mb"]["train_sampled_anon"] = sampler.peak["RssAnon"]
        result["peak_rss_mb"]["train_sampled_file"] = sampler.peak["RssFile"]
        result["peak_rss_mb"]["per_phase"] = per_phase  # False: each value is the peak since the start
        result["peak_rss_mb"]["process_max"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result["train_peak_rss_under_2gb"] = result["peak_rss_mb"]["train"] < 2048
        result["conditions"]["loadavg_end"] = os.getloadavg()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
