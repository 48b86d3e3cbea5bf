"""Benchmark capdec at scale on one CPU: a 5M-caption text store and a 1M-image image store, with peak
resident memory per phase, checked against targets (exit status 1 when one is missed).

**Text** (``--captions``, default 5M): a synthetic embedding store (512-d float16, ~5 GB for 5M;
captions drawn word by word from COCO's vocabulary with COCO's caption-length distribution, so
tokenised lengths are realistic) is written without a memory map (a written map's dirty pages would
count as this process's memory); then its token cache is built for a corpus-trained BPE tokenizer and
a small decoder trains ``--steps`` steps on it (``capdec.train.train``, which reuses that cache).

**Images** (``--images``, default 1M): small synthetic images (``--image-size`` pixels square: a
background and 1-3 coloured rectangles, PNG, 1,000 per folder) with ``--captions-per-image`` captions
each in a JSONL dataset (``{image, captions}`` lines); then ``embed_image_dataset`` (what ``capdec embed
--modality image`` runs: ``--workers`` decoding processes, the shipped mini-CLIP ``toy`` encoder, 32x32
input, 128-d) makes an image store, and the same decoder trains on it (ClipCap: one stored row per
image, captions mapped to it).

Embedding, the token cache and training each run in a fresh process (as ``capdec embed`` and ``capdec
train`` do), so each phase's **peak resident memory** (the kernel's ``VmHWM``) is its own; training
also samples anonymous vs file-backed memory, embedding the private memory of its worker processes.
Targets, checked at the end (exit status 1 when one is missed): training peak RSS < 2 GB on either store
(``--train-rss-limit-mb``); image embedding adds < 512 MB to its process once the dataset file is read
(``--pipeline-rss-limit-mb``; reading the dataset is the input layer's work, reported apart) and each
decoding worker holds < 512 MB of its own (``--worker-rss-limit-mb``)::

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/scale.py --out docs/results/bench/scale.json
    .venv/bin/python benchmarks/scale.py --parts images --images 20000 --steps 20     # a quick look

Everything is written under ``--workdir`` (default: a temporary directory, deleted at the end unless
``--keep``): ~6 GB for the 5M-caption store, ~4.5 GB for 1M images (mostly file-system blocks).
Prints one JSON object (also written to ``--out``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import multiprocessing
import shutil
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from coco import annotations
from PIL import Image
from rss import MemorySampler, check_targets, peak_rss_mb, reset_peak, rss_mb
from run_record import finish, start

from capdec.model import ModelConfig
from capdec.model.lm import train_tokenizer
from capdec.store import EmbeddingStore
from capdec.tokencache import token_cache
from capdec.train import TrainConfig, train

logger = logging.getLogger("capdec.benchmarks.scale")

_CHUNK = 20_000


class CaptionSampler:
    """Synthetic captions: COCO's words at COCO's frequencies, COCO's caption-length distribution."""

    def __init__(self, seed: int):
        caps = [a["caption"].strip().lower() for a in annotations("captions_val2017")]  # shipped in tests/data/coco
        words = Counter(w for c in caps for w in c.split())
        self.vocab = np.array(list(words), dtype=object)
        freq = np.array([words[w] for w in self.vocab], dtype=np.float64)
        lengths = np.bincount([len(c.split()) for c in caps])
        self.p_word, self.p_len = freq / freq.sum(), lengths / lengths.sum()
        self.rng = np.random.default_rng(seed)

    def sample(self, m: int) -> list[str]:
        lens = self.rng.choice(len(self.p_len), size=m, p=self.p_len)
        words = self.vocab[self.rng.choice(len(self.vocab), size=int(lens.sum()), p=self.p_word)]
        return [" ".join(ws) for ws in np.split(words, np.cumsum(lens)[:-1])]


def build_store(path: Path, n: int, dim: int, seed: int) -> tuple[EmbeddingStore, float]:
    """A synthetic text store of ``n`` captions, written in chunks (memory: one chunk)."""
    from capdec.store import _make_meta  # the store's own meta layout

    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    captions = CaptionSampler(seed)
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
            for caption in captions.sample(m):
                cap_f.write(json.dumps({"caption": caption}) + "\n")
                digest.update(caption.encode("utf-8") + b"\n")
            logger.info("store: %d / %d rows", lo + m, n)
    meta = _make_meta({"kind": "synthetic"}, {"kind": "synthetic", "dim": dim}, (n, dim), "float16",
                      {"paths": [], "captions_sha256": digest.hexdigest(), "format": "synthetic"},
                      {"read": n, "empty_skipped": 0, "duplicates_removed": 0, "truncated": 0})
    (path / "meta.json").write_text(json.dumps(meta, indent=2))
    return EmbeddingStore.open(path), time.perf_counter() - start


def build_image_dataset(root: Path, n: int, per_image: int, size: int, seed: int, *,
                        line_per: str = "image") -> tuple[Path, float, int]:
    """``n`` small PNGs under ``root/images/`` (1,000 per folder) and ``root/pairs.jsonl``, ``per_image`` captions
    each, one line per image (``{image, captions}``) or per caption (``{image, caption}``): (the dataset
    file, seconds, bytes of image files)."""
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    captions = CaptionSampler(seed + 1)
    image_bytes = 0
    root.mkdir(parents=True)
    with open(root / "pairs.jsonl", "w", encoding="utf-8") as f:
        for lo in range(0, n, 10_000):
            m = min(10_000, n - lo)
            pixels = np.broadcast_to(rng.integers(0, 256, (m, 1, 1, 3), dtype=np.uint8), (m, size, size, 3)).copy()
            for _ in range(3):  # up to three coloured rectangles per image
                x0, y0 = rng.integers(0, size * 3 // 4, (2, m))
                w, h = rng.integers(size // 8, size // 3, (2, m))
                colour = rng.integers(0, 256, (m, 3), dtype=np.uint8)
                drawn = rng.random(m) < 0.7
                for i in np.nonzero(drawn)[0]:
                    pixels[i, y0[i] : y0[i] + h[i], x0[i] : x0[i] + w[i]] = colour[i]
            texts = captions.sample(m * per_image)
            for j in range(m):
                k = lo + j
                name = f"images/{k // 1000:04d}/{k % 1000:03d}.png"
                if k % 1000 == 0:
                    (root / name).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels[j]).save(root / name, compress_level=1)
                image_bytes += (root / name).stat().st_size
                mine = texts[j * per_image : (j + 1) * per_image]
                if line_per == "image":
                    f.write(json.dumps({"image": name, "captions": mine}) + "\n")
                else:
                    f.writelines(json.dumps({"image": name, "caption": c}) + "\n" for c in mine)
            logger.info("images: %d / %d", lo + m, n)
    return root / "pairs.jsonl", time.perf_counter() - start, image_bytes


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


def in_child(fn: Any, threads: int, *args: Any) -> dict[str, Any]:
    """``fn(*args)`` in a fresh (spawned) process with ``threads`` torch threads, as ``capdec embed`` / ``capdec
    train`` run: its peak memory is its own, not what earlier phases left in this process's heap. ``fn``
    returns a JSON-able dict."""
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, fn.__name__, threads, args))
    proc.start()
    send.close()
    try:
        ok, value = receive.recv()
    except EOFError:
        ok, value = False, "the child process died without a result"
    proc.join()
    if not ok:
        raise RuntimeError(f"{fn.__name__} failed in its process (exit code {proc.exitcode}): {value}")
    return value


def _child(send: Any, name: str, threads: int, args: tuple) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(threads)
    try:
        send.send((True, globals()[name](*args)))
    except BaseException:
        send.send((False, traceback.format_exc()))
        raise


def build_token_cache(store_dir: str, lm_dir: str) -> dict[str, Any]:
    from transformers import AutoTokenizer

    store = EmbeddingStore.open(store_dir)
    tok = AutoTokenizer.from_pretrained(lm_dir)
    t0 = time.perf_counter()
    cache = token_cache(store, tok)
    tokens = int(cache.offsets[-1])
    return {"build_seconds": time.perf_counter() - t0, "tokens": tokens, "tokens_per_caption": tokens / len(store),
            "dtype": str(cache.ids.dtype),
            "bytes": (cache.path / "ids.bin").stat().st_size + (cache.path / "offsets.npy").stat().st_size,
            "peak_rss_mb": peak_rss_mb()}


def train_on(store_dir: str, lm_dir: str, ckpt: str, steps: int, batch_size: int, seed: int) -> dict[str, Any]:
    store = EmbeddingStore.open(store_dir)
    t0 = time.perf_counter()
    with MemorySampler() as sampler:
        run = train(store_dir, ckpt,
                    model_config=ModelConfig(embed_dim=store.dim, lm=lm_dir, prefix_length=10, mapper_depth=2,
                                             mapper_heads=4, max_length=40),
                    config=TrainConfig(max_steps=steps, batch_size=batch_size, log_every=max(1, steps // 5),
                                       val_max=500, seed=seed))
    rows = [json.loads(r) for r in (Path(ckpt) / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in rows if "samples_per_s" in r]
    return {"steps": run.steps, "batch_size": batch_size, "seconds_total": time.perf_counter() - t0,
            "steps_per_s": (rates[-1] / batch_size) if rates else None,
            "samples_per_s": rates[-1] if rates else None, "train_loss": run.train_loss, "val_loss": run.val_loss,
            "model": "transformer mapper (2 layers, prefix 10) + GPT-2 4x256 (random weights)",
            "token_caches": len(list((Path(store_dir) / "token-cache").iterdir())),
            "peak_rss_mb": peak_rss_mb(), "sampled_anon_mb": sampler.peak["RssAnon"],
            "sampled_file_mb": sampler.peak["RssFile"]}


def embed_images(jsonl: str, store_dir: str, batch_size: int, workers: int) -> dict[str, Any]:
    """What ``capdec embed --modality image`` does: read the dataset, then the pipeline (timed and measured apart)."""
    from capdec.encoders import load_encoder
    from capdec.image_store import embed_image_dataset
    from capdec.io import read_image_dataset

    before = rss_mb()  # torch and capdec imported, nothing read
    t0 = time.perf_counter()
    dataset = read_image_dataset(jsonl)
    read = {"seconds": time.perf_counter() - t0, "rss_before_mb": before, "peak_rss_mb": peak_rss_mb(),
            "rss_after_mb": rss_mb()}
    reset_peak()
    encoder = load_encoder("toy", device="cpu", batch_size=batch_size)
    t0 = time.perf_counter()
    with MemorySampler() as sampler:
        store = embed_image_dataset(dataset, store_dir, encoder, batch_size=batch_size, num_workers=workers)
    seconds = time.perf_counter() - t0
    return {"read_dataset": read, "seconds": seconds, "images_per_s": len(dataset) / seconds,
            "stored_rows": len(store.vectors), "captions": len(store), "resumed_images": store.embed_run.resumed,
            "bytes": {name: (Path(store_dir) / name).stat().st_size
                      for name in ("embeddings.npy", "rows.npy", "captions.jsonl")},
            "peak_rss_mb": peak_rss_mb(), "sampled_anon_mb": sampler.peak["RssAnon"],
            "worker_rss_max_mb": sampler.peak["child_rss_max"],
            "worker_private_max_mb": sampler.peak["child_private_max"],
            "workers_private_sum_mb": sampler.peak["children_private_sum"],
            "workers_seen": sampler.peak["children_seen"]}


def killed_and_resumed(jsonl: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The first ``--resume-images`` images embedded once without a stop, and once killed (SIGKILL, workers and
    all) when half of its shards are on disk, then rerun: the resumed store must be byte-identical to the
    uninterrupted one, having embedded only the missing shards."""
    subset = jsonl.with_name("resume.jsonl")
    with open(jsonl, encoding="utf-8") as f, open(subset, "w", encoding="utf-8") as out:
        out.writelines(line for _, line in zip(range(args.resume_images), f))
    whole = in_child(embed_images, args.threads, str(subset), str(work / "whole"), args.image_batch_size,
                     args.workers)
    shards = -(-args.resume_images // 4096)  # embed_image_dataset's shard size
    partial = work / ".resumed.partial"
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, "embed_images", args.threads,
                                            (str(subset), str(work / "resumed"), args.image_batch_size, args.workers)))
    t0 = time.perf_counter()
    proc.start()
    while proc.is_alive() and len(list(partial.glob("shard-*.npy"))) < shards // 2:
        time.sleep(0.05)
    proc.kill()
    proc.join()
    killed = {"after_seconds": time.perf_counter() - t0, "shards_on_disk": len(list(partial.glob("shard-*.npy"))),
              "shards": shards, "exit_code": proc.exitcode}
    resumed = in_child(embed_images, args.threads, str(subset), str(work / "resumed"), args.image_batch_size,
                       args.workers)
    identical = {name: (work / "whole" / name).read_bytes() == (work / "resumed" / name).read_bytes()
                 for name in ("embeddings.npy", "rows.npy", "captions.jsonl")}
    return {"images": args.resume_images, "uninterrupted_seconds": whole["seconds"], "killed": killed,
            "resume_seconds": resumed["seconds"], "resumed_images": resumed["resumed_images"],
            "byte_identical": identical}


def cache_and_train(store: EmbeddingStore, work: Path, args: argparse.Namespace, out: dict[str, Any]) -> None:
    """Token cache, then ``--steps`` training steps on ``store``, each in its own process; fills ``out``."""
    save_lm(work / "lm", store, sample=200_000, seed=args.seed)
    out["token_cache"] = in_child(build_token_cache, args.threads, str(store.path), str(work / "lm"))
    out["train"] = in_child(train_on, args.threads, str(store.path), str(work / "lm"), str(work / "ckpt"),
                            args.steps, args.batch_size, args.seed)
    out["token_cache"]["reused_by_train"] = out["train"].pop("token_caches") == 1


def text_scale(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    store, seconds = build_store(work / "store", args.captions, args.dim, args.seed)
    out: dict[str, Any] = {"captions": args.captions, "dim": args.dim, "dtype": "float16",
                           "store": {"build_seconds": seconds,
                                     "embeddings_bytes": (work / "store" / "embeddings.npy").stat().st_size,
                                     "captions_bytes": (work / "store" / "captions.jsonl").stat().st_size}}
    cache_and_train(store, work, args, out)
    return out


def image_scale(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    jsonl, seconds, image_bytes = build_image_dataset(work / "data", args.images, args.captions_per_image,
                                                      args.image_size, args.seed, line_per=args.jsonl_line_per)
    out: dict[str, Any] = {"images": args.images, "captions_per_image": args.captions_per_image,
                           "jsonl_line_per": args.jsonl_line_per,
                           "image_size": args.image_size, "encoder": "toy (the shipped mini-CLIP, 128-d)",
                           "workers": args.workers, "encode_batch_size": args.image_batch_size,
                           "dataset": {"build_seconds": seconds, "image_bytes": image_bytes,
                                       "jsonl_bytes": jsonl.stat().st_size}}
    if args.resume_images:
        out["resume"] = killed_and_resumed(jsonl, work, args)
    out["embed"] = in_child(embed_images, args.threads, str(jsonl), str(work / "store"), args.image_batch_size,
                            args.workers)
    cache_and_train(EmbeddingStore.open(work / "store"), work, args, out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--parts", nargs="+", choices=["text", "images"], default=["text", "images"])
    p.add_argument("--captions", type=int, default=5_000_000, help="text store rows")
    p.add_argument("--dim", type=int, default=512, help="text store embedding dimension")
    p.add_argument("--images", type=int, default=1_000_000, help="images of the image dataset")
    p.add_argument("--captions-per-image", type=int, default=5)
    p.add_argument("--image-size", type=int, default=32, help="side of the synthetic images, pixels")
    p.add_argument("--jsonl-line-per", choices=["image", "caption"], default="image",
                   help="the dataset file's lines: {image, captions} per image or {image, caption} per caption "
                        "(both are read by capdec.io; per caption takes ~2x the memory to read)")
    p.add_argument("--image-batch-size", type=int, default=256, help="images per encoder batch")
    p.add_argument("--workers", type=int, default=2, help="image decoding processes")
    p.add_argument("--resume-images", type=int, default=20_000,
                   help="images of the kill-and-resume check (0: skip it)")
    p.add_argument("--steps", type=int, default=100, help="training steps (each store)")
    p.add_argument("--batch-size", type=int, default=64, help="training batch")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--train-rss-limit-mb", type=float, default=2048, help="target: training peak RSS")
    p.add_argument("--pipeline-rss-limit-mb", type=float, default=512,
                   help="target: what image embedding adds to the embedding process's memory once the dataset is read")
    p.add_argument("--worker-rss-limit-mb", type=float, default=512,
                   help="target: private memory of each image decoding worker")
    p.add_argument("--workdir", help="where stores and images go (default: a temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="capdec-scale-"))
    record = start(argv, threads=args.threads)
    result: dict[str, Any] = {"benchmark": "scale"}
    try:
        if "text" in args.parts:
            result["text"] = text_scale(args, work / "text")
        if "images" in args.parts:
            result["images"] = image_scale(args, work / "images")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    targets = {}
    if "text" in result:
        targets["text_train_peak_rss_mb"] = (result["text"]["train"]["peak_rss_mb"], args.train_rss_limit_mb)
    if "images" in result:
        embed = result["images"]["embed"]
        targets.update(image_embed_pipeline_rss_mb=(embed["peak_rss_mb"] - embed["read_dataset"]["rss_after_mb"],
                                                    args.pipeline_rss_limit_mb),
                       image_embed_worker_private_mb=(embed["worker_private_max_mb"], args.worker_rss_limit_mb),
                       image_train_peak_rss_mb=(result["images"]["train"]["peak_rss_mb"], args.train_rss_limit_mb))
        if "resume" in result["images"]:  # a kill leaves finished shards that the rerun does not embed again
            r = result["images"]["resume"]
            targets.update(resume_files_differing=(sum(not same for same in r["byte_identical"].values()), 1),
                           resume_images_embedded_again=(r["images"] - r["resumed_images"], r["images"]))
    missed = check_targets(result, targets)
    result["run"] = finish(record)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    if missed:
        print("scale.py: missed " + "; ".join(missed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
