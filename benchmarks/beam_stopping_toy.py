"""The two beam-search stopping rules on the toy world's demo decoder: captions, scores and decoding time.

Trains the demo's CapDec decoder (``capdec demo``'s data and budget: 20,000 toy captions, 600 steps,
the shipped mini-CLIP) once, then captions the 300 held-out test images with the demo's beam of 3
under ``early_stopping="exact"`` (capdec's default: an image's search ends only when no running beam
can beat its best caption at max_length) and ``"heuristic"`` (Hugging Face's default rule), and
reports for each the coco-caption scores, the decoding seconds, and how many captions differ.
Prints one JSON object (also written to ``--out``)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/beam_stopping_toy.py      # ~3 min on one idle core
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from run_record import finish, start

from capdec.caption import Captioner
from capdec.lab.experiment import ExperimentConfig, prepare_data, score, train_variant
from capdec.noise import NoiseConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--beam", type=int, default=3, help="beam width (the demo's: 3)")
    parser.add_argument("--steps", type=int, default=ExperimentConfig.steps, help="training steps")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1") or 1))
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = replace(ExperimentConfig(), steps=args.steps)
    record = start(None, threads=args.threads)
    result: dict = {"benchmark": "beam_stopping_toy", "settings": {k: v for k, v in vars(args).items() if k != "out"}}
    with tempfile.TemporaryDirectory(prefix="capdec-beam-stop-") as tmp:
        data = prepare_data(config, Path(tmp) / "data", show_progress=False)
        ckpt, _ = train_variant(data, Path(tmp) / "capdec", noise=NoiseConfig(variance=config.noise_variance),
                                show_progress=False)
        captioner = Captioner.from_pretrained(ckpt, encoder=data.encoder, device="cpu")
        captions = {}
        for rule in ("exact", "heuristic"):
            t0 = time.perf_counter()
            captions[rule] = captioner.caption_embeddings(data.test_embeddings, batch_size=128, show_progress=False,
                                                          strategy="beam", beam_size=args.beam, early_stopping=rule)
            seconds = time.perf_counter() - t0
            scores, _ = score(captions[rule], data.references)
            rounded = {k: None if v is None else round(v, 4) for k, v in scores.items()}
            result[rule] = {"decode_seconds": round(seconds, 2), **rounded}
    result["captions_that_differ"] = sum(a != b for a, b in zip(captions["exact"], captions["heuristic"]))
    result["test_images"] = len(captions["exact"])
    result["run"] = finish(record)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
