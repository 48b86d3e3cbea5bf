"""Benchmark: embed ~45k real COCO captions and train the from-scratch decoder on a fixed budget.

Captions: COCO val2017 + the first val2014 subset shipped in tests/data/coco, deduplicated by
annotation id (45,9xx captions; ``--all-subsets`` adds the second val2014 slice, ~67k). Encoder: a CLIP ViT-B/32-sized transformers model with *random* weights (no pretrained weights
exist offline), saved to a temp dir with the real CLIP BPE tokenizer and loaded through ``hf:DIR``,
the path a user's local copy takes. Prints one JSON object:

- embedding: captions/s, seconds, truncated captions;
- training: samples/s, steps, seconds, first/last loss, peak memory (RSS, and CUDA when used);
- text→text reconstruction on held-out captions: decode each caption's clean text embedding and
  score it against the caption itself (CIDEr, BLEU-4, via pycocoevalcap);
- the run's command, machine, threads and load average (``run``).

Usage: python benchmarks/train_coco.py [--steps 600] [--held-out 500] [--limit N] [--device auto] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from coco import annotations
from run_record import finish, start

ROOT = Path(__file__).resolve().parents[1]


def coco_captions(limit: int | None, all_subsets: bool = False) -> list[str]:
    seen: dict[int, str] = {}
    names = ["captions_val2017", "captions_val2014_subset"]
    if all_subsets:
        names.append("captions_val2014_subset2")
    for name in names:
        for ann in annotations(name):
            seen.setdefault(ann["id"], ann["caption"])
    caps = [seen[k] for k in sorted(seen)]
    return caps[:limit] if limit else caps


def vit_b32_random(directory: Path) -> str:
    """A ViT-B/32-sized CLIP (transformers' default CLIPConfig) with random weights and the real tokenizer."""
    sys.path.insert(0, str(ROOT / "tests"))
    from transformers import CLIPConfig, CLIPModel

    from tiny_models import make_tiny_hf_clip  # noqa: E402  (tokenizer + processor writer)

    make_tiny_hf_clip(directory)  # writes the tokenizer and image processor files
    torch.manual_seed(0)
    CLIPModel(CLIPConfig()).save_pretrained(directory)  # replaces the tiny weights/config: ViT-B/32 sized
    return f"hf:{directory}"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=600, help="training steps (the fixed budget)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--held-out", type=int, default=500, help="held-out captions for text→text CIDEr")
    p.add_argument("--limit", type=int, default=None, help="use only the first N captions (quick runs)")
    p.add_argument("--all-subsets", action="store_true", help="also use the second val2014 slice (~67k captions)")
    p.add_argument("--device", default="auto")
    p.add_argument("--workdir", default=None, help="keep artefacts here (default: a temp dir)")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    record = start(argv, threads=torch.get_num_threads())

    from capdec.caption import Captioner
    from capdec.corpus import captions_from_list
    from capdec.decode import DecodeConfig
    from capdec.encoders import load_encoder
    from capdec.lab.experiment import score
    from capdec.model import ModelConfig
    from capdec.noise import NoiseConfig
    from capdec.store import embed_corpus
    from capdec.train import TrainConfig, train

    work = Path(args.workdir or tempfile.mkdtemp(prefix="capdec-bench-"))
    captions = coco_captions(args.limit, args.all_subsets)
    held = captions[-args.held_out:]
    train_caps = captions[: -args.held_out]
    out: dict = {"captions": len(captions), "train_captions": len(train_caps), "held_out": len(held),
                 "threads": torch.get_num_threads(), "torch": torch.__version__}

    spec = vit_b32_random(work / "clip-vit-b32-random")
    encoder = load_encoder(spec, device=args.device)
    out["device"] = str(encoder.device)
    out["encoder"] = "CLIP ViT-B/32 size (transformers CLIPConfig(), random weights), text tower"
    t = time.perf_counter()
    store = embed_corpus(captions_from_list(train_caps), work / "store", encoder, batch_size=256, overwrite=True)
    sec = time.perf_counter() - t
    out["embed"] = {"seconds": round(sec, 1), "captions_per_s": round(len(train_caps) / sec, 1),
                    "truncated": store.meta["stats"].get("truncated")}

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    # the legacy mapper: docs/results/train_coco_cpu.json was measured with it
    model_cfg = ModelConfig(mapper="transformer", mapper_variant="legacy", prefix_length=10, mapper_depth=4,
                            lm_dim=256, lm_depth=4, lm_heads=4, vocab_size=8000, max_length=40)
    t = time.perf_counter()
    res = train([store], work / "ckpt", model_config=model_cfg, noise=NoiseConfig(variance=0.016),
                config=TrainConfig(epochs=1000, max_steps=args.steps, batch_size=args.batch_size, lr=1e-3,
                                   log_every=20, save_every=args.steps, device=args.device), overwrite=True)
    sec = time.perf_counter() - t
    curve = [json.loads(r) for r in (work / "ckpt" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in curve if "train_loss" in r]
    sps = [r["samples_per_s"] for r in curve if "samples_per_s" in r]
    out["train"] = {"steps": res.steps, "batch_size": args.batch_size, "seconds": round(sec, 1),
                    "samples_per_s": round(sorted(sps)[len(sps) // 2], 1) if sps else None,
                    "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
                    "val_loss": res.val_loss, "decoder": model_cfg.to_dict() | {"lm_config": None}}
    out["peak_rss_mb"] = round(peak_rss_mb(), 1)
    if torch.cuda.is_available():
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)

    captioner = Captioner.from_pretrained(work / "ckpt", encoder=encoder, device=args.device)
    t = time.perf_counter()
    emb = encoder.encode_text(held)
    preds = captioner.caption_embeddings(emb, batch_size=128, **DecodeConfig(strategy="greedy").to_dict())
    scores, se = score(preds, [[h] for h in held])
    out["text_to_text"] = {"CIDEr": scores["CIDEr"], "CIDEr_se": se.get("CIDEr"), "Bleu_4": scores["Bleu_4"],
                           "seconds": round(time.perf_counter() - t, 1),
                           "examples": [{"caption": h, "decoded": p} for h, p in list(zip(held, preds))[:5]]}
    out["run"] = finish(record)
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
