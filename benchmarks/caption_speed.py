"""Benchmark captioning speed: images/s for greedy and beam-5 decoding at batch 1 and batch 64, and the
speed-up of the key/value cache over re-running the whole sequence every step.

Real sizes, random weights (no pretrained weights exist offline; speed does not depend on them):
a ViT-B/32 CLIP (transformers ``CLIPModel`` with the default ``CLIPConfig``: 224 px, patch 32, 512-d),
CapDec's transformer mapper (8 layers, prefix 10) and a GPT-2-small LM (``GPT2Config()``: 12 layers,
768 wide, vocabulary 50257). A random LM practically never writes end-of-sequence, so every caption
runs to ``--max-length`` tokens: the worst case, and the same work in every run.

Images are the 17 real COCO photos in tests/data/coco/images, cycled to the count asked for. Each configuration runs once through ``Captioner.stream`` (image
load + encode + decode: "end_to_end"); the time spent in prefix + decoding + detokenising within that
run is "decode". Prints one JSON object (also written to ``--out``), with the run's command, machine,
threads and load average (``run``)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/caption_speed.py   # ~2.5 min of CPU time on one core
    .venv/bin/python benchmarks/caption_speed.py --threads 4 --max-length 16 --images-b64 128

The default ``--max-length 12`` is about a COCO caption's length (10-11 words plus end-of-sequence).
At batch 1 a GPT-2-small step is bound by memory bandwidth (all 124M weights are read for every token),
so batching many images per call is what makes CPU captioning fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from coco import PHOTOS, annotations
from run_record import finish, start

from capdec.caption import Captioner
from capdec.checkpoint import Checkpoint
from capdec.decode import generate
from capdec.encoders.hf import HFEncoder
from capdec.model import CapDecModel, ModelConfig
from capdec.model.lm import train_tokenizer

logger = logging.getLogger("capdec.benchmarks.caption_speed")


def build_captioner(*, max_length: int, prefix_length: int, seed: int) -> Captioner:
    """A ViT-B/32 CLIP + GPT-2-small CapDec captioner with random weights, on the CPU."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    clip = CLIPModel(CLIPConfig()).eval()  # ViT-B/32 image tower, 512-d joint space
    # images only: no text tokenizer is needed (the encoder's text side is never called)
    encoder = HFEncoder(clip, None, CLIPImageProcessor(), source="random ViT-B/32", device="cpu", precision="fp32")

    captions = _captions()
    tokenizer = train_tokenizer(captions, vocab_size=8000)  # ids it lacks decode to nothing
    lm = GPT2LMHeadModel(GPT2Config(eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)).eval()
    config = ModelConfig(embed_dim=encoder.dim, mapper="transformer", prefix_length=prefix_length, mapper_depth=8,
                         mapper_heads=8, lm="random-gpt2-small", max_length=max_length, lm_config=lm.config.to_dict())
    model = CapDecModel(config, lm, tokenizer).eval()
    ckpt = Checkpoint(path=Path("<random benchmark model>"), model=model,
                      config={"encoder": encoder.spec, "encoder_identity": encoder.identity, "inference": {}})
    return Captioner(ckpt, encoder=encoder, device="cpu", num_workers=4)


def _captions() -> list[str]:
    return [a["caption"] for a in annotations("captions_val2017")[:5000]]


def image_files(n: int) -> list[str]:
    """``n`` image paths: the shipped COCO photos, cycled."""
    photos = sorted(PHOTOS.glob("*.jpg"))
    return [str(photos[i % len(photos)]) for i in range(n)]


def run_config(captioner: Captioner, paths: list[str], *, strategy: str, beam_size: int, batch_size: int,
               use_cache: bool = True) -> dict[str, Any]:
    """One pass of Captioner.stream over ``paths``; wall time split into decode and the rest."""
    decode_s = 0.0
    original = captioner._caption_embeddings

    def timed(emb: torch.Tensor, cfg: Any) -> list[str]:
        nonlocal decode_s
        t = time.perf_counter()
        out = original(emb, cfg)
        decode_s += time.perf_counter() - t
        return out

    captioner._caption_embeddings = timed  # type: ignore[method-assign]
    try:
        t0 = time.perf_counter()
        results = list(captioner.stream(paths, batch_size=batch_size, show_progress=False, strategy=strategy,
                                        beam_size=beam_size, use_cache=use_cache))
        total = time.perf_counter() - t0
    finally:
        del captioner._caption_embeddings
    n = len(results)
    return {
        "strategy": strategy if strategy != "beam" else f"beam-{beam_size}",
        "batch_size": batch_size,
        "images": n,
        "end_to_end_s": round(total, 3),
        "decode_s": round(decode_s, 3),
        "end_to_end_images_per_s": round(n / total, 3),
        "decode_images_per_s": round(n / decode_s, 3),
    }


def cache_speedup(captioner: Captioner, emb: torch.Tensor, *, strategy: str, beam_size: int) -> dict[str, Any]:
    """Decode-only seconds with and without the key/value cache on the same prefixes (same tokens)."""
    model = captioner.model
    with torch.inference_mode():
        prefix = captioner.prefix(emb)
    times, tokens = {}, {}
    for use_cache in (True, False):
        t = time.perf_counter()
        tokens[use_cache] = generate(model, prefix, strategy=strategy, beam_size=beam_size, use_cache=use_cache)
        times[use_cache] = time.perf_counter() - t
    return {
        "strategy": strategy if strategy != "beam" else f"beam-{beam_size}",
        "batch_size": emb.shape[0],
        "cached_s": round(times[True], 3),
        "uncached_s": round(times[False], 3),
        "speedup": round(times[False] / times[True], 2),
        "same_tokens": tokens[True] == tokens[False],
        "mean_tokens": round(float(np.mean([len(x) for x in tokens[True]])), 1),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1") or 1),
                        help="torch CPU threads (default: OMP_NUM_THREADS, else 1)")
    parser.add_argument("--max-length", type=int, default=12, help="tokens per caption (all of them are generated)")
    parser.add_argument("--prefix-length", type=int, default=10, help="prefix vectors")
    parser.add_argument("--images-b1", type=int, default=2, help="images captioned one at a time")
    parser.add_argument("--images-b64", type=int, default=64, help="images captioned in batches of --batch-size")
    parser.add_argument("--batch-size", type=int, default=64, help="the large batch size")
    parser.add_argument("--beam-size", type=int, default=5, help="beam width of the beam runs")
    parser.add_argument("--uncached-greedy-batch", type=int, default=4, help="images in the greedy cache comparison")
    parser.add_argument("--uncached-beam-batch", type=int, default=1, help="images in the beam cache comparison")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    os.environ["CAPDEC_QUIET"] = "1"
    torch.set_num_threads(args.threads)
    record = start(argv, threads=args.threads)

    t_start = time.perf_counter()
    captioner = build_captioner(max_length=args.max_length, prefix_length=args.prefix_length, seed=args.seed)
    build_s = time.perf_counter() - t_start
    paths = image_files(max(args.images_b1, args.images_b64))
    run_config(captioner, paths[:1], strategy="greedy", beam_size=1, batch_size=1)  # warm-up
    runs = []
    for batch_size, n in ((1, args.images_b1), (args.batch_size, args.images_b64)):
        for strategy, beam in (("greedy", 1), ("beam", args.beam_size)):
            logger.info("%s, batch %d, %d images", strategy, batch_size, n)
            runs.append(run_config(captioner, paths[:n], strategy=strategy, beam_size=beam, batch_size=batch_size))
            logger.info("  %s", runs[-1])

    from capdec.images import load_image

    images = [load_image(p) for p in paths[: args.batch_size]]
    t = time.perf_counter()
    emb = captioner.embed_images(images)
    encode_s = time.perf_counter() - t
    logger.info("cache comparison")
    speedups = [cache_speedup(captioner, emb[: args.uncached_greedy_batch], strategy="greedy", beam_size=1),
                cache_speedup(captioner, emb[: args.uncached_beam_batch], strategy="beam",
                              beam_size=args.beam_size)]
    report = {
        "benchmark": "caption_speed",
        "device": "cpu",
        "encoder": "CLIP ViT-B/32 (transformers CLIPModel, default CLIPConfig, random weights, fp32)",
        "decoder": f"transformer mapper (8 layers, prefix {args.prefix_length}) + GPT-2 small "
                   "(GPT2Config(): 12 layers, 768 wide, vocab 50257, random weights)",
        "max_length": args.max_length,
        "encode_images_per_s": round(len(images) / encode_s, 2),
        "runs": runs,
        "cache_speedup": speedups,
        "build_s": round(build_s, 1),
        "total_s": round(time.perf_counter() - t_start, 1),
        "run": finish(record),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
