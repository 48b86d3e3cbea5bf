"""``capdec import``: a ClipCap / CapDec ``.pt`` state dict -> a capdec checkpoint directory."""

from __future__ import annotations

import argparse

HELP = "turn released ClipCap / CapDec weights (.pt state dict) into a capdec checkpoint"
DESCRIPTION = (
    "Convert a ClipCap / CapDec state dict (clip_project.* mapper + gpt.* GPT-2 keys, e.g. ClipCap's "
    "coco_weights.pt or CapDec's released noise-level models) into a checkpoint directory that "
    "'capdec caption' uses like any other. The file is read with torch.load(weights_only=True), so it "
    "cannot run code. The mapper kind and sizes are read from the file; options given are checked against "
    "it (a mismatch names the key, the file's shape and the expected one, and nothing is written). "
    "--lm is the GPT-2 the weights were fine-tuned from (its config and tokenizer; the weights come from "
    "the file), --encoder the CLIP the mapper was trained on (CapDec's paper: RN50x4, 640-d; most ClipCap "
    "weights: ViT-B/32, 512-d). Such models never learned an end token, so captions stop at the first '.' "
    "unless --no-stop-at-period, and are at most 67 tokens long (the reference's entry_length). "
    "--source says which code trained the file, which decides the mapper's input: ClipCap's MLP models "
    "(coco_weights.pt, conceptual_weights.pt) take raw CLIP image embeddings (its predict.py never "
    "normalises), CapDec's models and ClipCap's transformer-mapper weights take L2-normalised ones. Both "
    "codes save the same keys, so the source cannot be read from the file: it is required for an MLP "
    "mapper (a transformer mapper is normalised under both). The choice is recorded in the checkpoint "
    "and 'capdec caption' follows it."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("weights", metavar="WEIGHTS.pt", help="ClipCap / CapDec state dict")
    parser.add_argument("--out", required=True, metavar="CKPT", help="checkpoint directory to write")
    parser.add_argument("--lm", required=True,
                        help="the LM the weights belong to: a hub id (gpt2) or a local directory with its config "
                             "and tokenizer")
    parser.add_argument("--encoder", required=True, metavar="SPEC",
                        help="the CLIP the mapper was trained on, e.g. open_clip:RN50x4@openai or "
                             "open_clip:ViT-B-32@openai")
    parser.add_argument("--mapper", choices=["mlp", "transformer"], help="mapper kind (default: read from the file)")
    parser.add_argument("--prefix-length", type=int, metavar="L", help="prefix length (default: read from the file)")
    parser.add_argument("--clip-length", type=int, metavar="C",
                        help="transformer mapper clip tokens (default: read from the file)")
    parser.add_argument("--mapper-depth", type=int, metavar="N",
                        help="transformer mapper layers (default: read from the file)")
    parser.add_argument("--source", choices=["clipcap", "capdec"],
                        help="the code that trained the file: clipcap (rmokady/CLIP_prefix_caption: its MLP models take "
                             "raw CLIP embeddings) or capdec (DavidHuji/CapDec: L2-normalised). Required for an MLP "
                             "mapper; recorded in the checkpoint")
    parser.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                        help="state the mapper's input directly: L2-normalised (--normalize) or raw (--no-normalize) "
                             "CLIP embeddings, e.g. for weights trained with ClipCap's --normalize_prefix or "
                             "CapDec's --dont_norm (default: as --source's inference code does)")
    parser.add_argument("--max-length", type=int, help="most caption tokens, the end token included (default: 67 "
                                                       "as the reference decodes, or what the LM's positions leave "
                                                       "after the prefix)")
    parser.add_argument("--stop-at-period", action=argparse.BooleanOptionalAction, default=True,
                        help="record that captions end at their first '.' (the model never learned an end token)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the checkpoint at --out (only a checkpoint capdec wrote: any other directory is "
                             "refused)")


def run(args: argparse.Namespace) -> int:
    from capdec.clipcap import import_clipcap
    from capdec.errors import InputError
    from capdec.utils import set_threads_from_env

    set_threads_from_env()
    for name in ("prefix_length", "clip_length", "mapper_depth", "max_length"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise InputError(f"--{name.replace('_', '-')} must be ≥ 1, got {value}")
    out = import_clipcap(args.weights, args.out, lm=args.lm, encoder=args.encoder, mapper=args.mapper,
                         prefix_length=args.prefix_length, clip_length=args.clip_length,
                         mapper_depth=args.mapper_depth, max_length=args.max_length,
                         stop_at_period=args.stop_at_period, source=args.source, normalize=args.normalize,
                         overwrite=args.overwrite)
    print(f"imported {args.weights} -> {out}")
    return 0
