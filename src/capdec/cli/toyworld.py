"""``capdec toyworld``: the procedural toy world and its mini-CLIP.

Subcommands: ``sample`` (images + reference captions), ``corpus`` (text-only captions),
``train-clip`` (train a mini-CLIP) and ``clip-stats`` (retrieval and modality-gap statistics of an
encoder on held-out toy scenes).
"""

from __future__ import annotations

import argparse
import logging
import shlex

HELP = "the toy world: sample scenes and captions, train and measure the mini-CLIP"
DESCRIPTION = ("Procedurally rendered scenes (coloured shapes on a 3x3 grid) with grammar-generated "
               "captions, and the small CLIP trained on them that capdec ships as encoder 'toy'.")

logger = logging.getLogger(__name__)

_FORMATTER = argparse.ArgumentDefaultsHelpFormatter


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="toyworld_command", metavar="SUBCOMMAND", required=True)

    p = sub.add_parser("sample", formatter_class=_FORMATTER,
                       help="render scenes to PNG files with their reference captions (references.jsonl)")
    p.add_argument("--out", required=True, metavar="DIR", default=argparse.SUPPRESS,
                   help="output directory (created)")
    p.add_argument("--n", type=int, default=100, help="number of scenes")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="which split to draw from")
    p.add_argument("--refs", type=int, default=5, help="reference captions per image")
    p.add_argument("--size", type=int, default=32, help="image side in pixels")
    _grammar_arg(p)
    p.set_defaults(_toy_run=_run_sample)

    p = sub.add_parser("corpus", formatter_class=_FORMATTER,
                       help="write text-only captions, one per line (a training corpus for 'capdec embed')")
    p.add_argument("--out", required=True, metavar="FILE", default=argparse.SUPPRESS, help="output text file")
    p.add_argument("--n", type=int, default=50000, help="number of captions")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--split", default="train", choices=["train", "val", "test"], help="which split to draw from")
    p.add_argument("--per-scene", type=int, default=1, help="distinct captions per scene")
    _grammar_arg(p)
    p.set_defaults(_toy_run=_run_corpus)

    from capdec.lab.toyworld.config import ClipTrainConfig  # light: no torch

    d = ClipTrainConfig()
    p = sub.add_parser("train-clip", formatter_class=_FORMATTER,
                       help="train a mini-CLIP into a weights directory (usable as encoder 'toy:DIR')")
    p.add_argument("--out", required=True, metavar="DIR", default=argparse.SUPPRESS, help="output weights directory")
    p.add_argument("--seed", type=int, default=d.seed, help="random seed (weights and data)")
    p.add_argument("--steps", type=int, default=d.steps, help="training steps")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="image-caption pairs per step")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (AdamW, warm-up then cosine)")
    p.add_argument("--warmup", type=int, default=d.warmup, help="learning-rate warm-up steps")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    p.add_argument("--dim", type=int, default=d.model.dim, help="joint embedding size")
    p.add_argument("--logit-scale", type=float, default=d.model.logit_scale,
                   help="fixed inverse temperature of the contrastive loss (CLIP ends training at 100); "
                        "it is not learned, so that a CLIP-like modality gap remains")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between validation checks (0: never)")
    p.add_argument("--eval-pairs", type=int, default=d.eval_pairs,
                   help="validation pairs per check (multiple of 100)")
    p.add_argument("--save-every", type=int, default=d.save_every,
                   help="steps between resumable state saves (0: never)")
    p.add_argument("--text-conv-kernel", type=int, default=d.model.text_conv_kernel,
                   help="width of the word convolution before the text tower's attention (odd; 0: none, as in the "
                        "shipped weights)")
    p.add_argument("--hard-negatives", type=float, default=d.hard_negatives,
                   help="fraction of each batch that are near-duplicates of other scenes in it (one colour, "
                        "shape, size or position changed, or two colours swapped)")
    p.add_argument("--stats-pairs", type=int, default=d.stats_pairs,
                   help="held-out pairs for the final statistics in card.json (multiple of 100)")
    p.add_argument("--stats-hard-negative-pairs", type=int, default=d.stats_hard_negative_pairs,
                   help="held-out near-duplicate pairs per kind for card.json (0: skip)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--overwrite", action="store_true", help="replace a trained model already in --out")
    p.add_argument("--device", default="cpu", help="torch device ('auto': cuda when available)")
    _grammar_arg(p)
    p.set_defaults(_toy_run=_run_train_clip)

    p = sub.add_parser("clip-stats", formatter_class=_FORMATTER,
                       help="print R@1 and modality-gap statistics of an encoder on held-out toy scenes")
    p.add_argument("--encoder", default="toy", help="encoder spec (default: the shipped mini-CLIP)")
    p.add_argument("--n", type=int, default=1000, help="held-out image-caption pairs (multiple of 100)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the held-out sample")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="which split to draw from")
    p.add_argument("--hard-negative-pairs", type=int, default=300,
                   help="near-duplicate pairs per kind for the colour/shape/binding/size/position checks (0: skip)")
    p.add_argument("--card", action="store_true", help="print the statistics recorded in the weights' card instead")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--device", default="auto", help="torch device")
    p.set_defaults(_toy_run=_run_clip_stats)


def _grammar_arg(p: argparse.ArgumentParser) -> None:
    from capdec.lab.toyworld.grammar import list_grammars

    p.add_argument("--grammar", default="default", choices=list_grammars(), help="caption grammar")


def run(args: argparse.Namespace) -> int:
    from capdec.utils import set_threads_from_env

    set_threads_from_env()
    return args._toy_run(args)


def _run_sample(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from capdec.lab.toyworld.grammar import captions
    from capdec.lab.toyworld.render import render
    from capdec.lab.toyworld.world import sample_scenes

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "references.jsonl", "w", encoding="utf-8") as f:
        for i, scene in enumerate(sample_scenes(args.n, args.seed, args.split)):
            name = f"{args.split}_{args.seed}_{i:06d}.png"
            render(scene, args.size).save(out / name)
            refs = captions(scene, args.refs, seed=args.seed, grammar=args.grammar)
            f.write(json.dumps({"image": name, "references": refs, "scene": scene.canonical()}) + "\n")
    logger.info("wrote %d images and %s", args.n, out / "references.jsonl")
    return 0


def _run_corpus(args: argparse.Namespace) -> int:
    from capdec.lab.toyworld.data import corpus
    from capdec.output import write_text

    write_text(args.out, "".join(text + "\n" for text in corpus(args.n, args.seed, args.split,
                                                               captions_per_scene=args.per_scene,
                                                               grammar=args.grammar)))
    logger.info("wrote %d captions to %s", args.n, args.out)
    return 0


def _run_train_clip(args: argparse.Namespace) -> int:
    from capdec.encoders.base import resolve_device
    from capdec.lab.toyworld.config import ClipTrainConfig, MiniCLIPConfig
    from capdec.lab.toyworld.grammar import get_grammar
    from capdec.lab.toyworld.stats import format_stats
    from capdec.lab.toyworld.train_clip import train_clip

    # the default grammar's words, plus any a styled grammar adds
    vocab = sorted(set(get_grammar("default").vocabulary()) | set(get_grammar(args.grammar).vocabulary()))
    cfg = ClipTrainConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup, weight_decay=args.weight_decay,
        seed=args.seed, grammar=args.grammar, hard_negatives=args.hard_negatives, eval_every=args.eval_every,
        eval_pairs=args.eval_pairs, save_every=args.save_every, stats_pairs=args.stats_pairs,
        stats_hard_negative_pairs=args.stats_hard_negative_pairs,
        model=MiniCLIPConfig(dim=args.dim, logit_scale=args.logit_scale, vocab=vocab,
                             text_conv_kernel=args.text_conv_kernel),
    )
    # the fully resolved command (every option spelled out), so the card says exactly how to redo it
    command = "capdec toyworld train-clip " + shlex.join(_as_flags(args))
    card = train_clip(cfg, args.out, resume=args.resume, overwrite=args.overwrite, command=command,
                      device=str(resolve_device(args.device)))
    print(format_stats(card["stats"]))
    print(f"weights: {args.out} (use as encoder 'toy:{args.out}')")
    return 0


def _as_flags(args: argparse.Namespace) -> list[str]:
    flags = []
    for name in ("out", "seed", "steps", "batch_size", "lr", "warmup", "weight_decay", "dim", "logit_scale",
                 "text_conv_kernel", "hard_negatives", "eval_every", "eval_pairs", "save_every", "stats_pairs",
                 "stats_hard_negative_pairs", "grammar", "device"):
        flags += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return flags  # --resume/--overwrite say how a run was started, not what it trains


def _run_clip_stats(args: argparse.Namespace) -> int:
    import json

    from capdec.encoders import load_encoder
    from capdec.errors import InputError
    from capdec.lab.toyworld.stats import clip_stats, format_stats

    if args.card:
        from capdec.encoders import parse_spec
        from capdec.encoders.miniclip import CARD_FILE, shipped_weights_dir
        from capdec.utils import read_artifact_json

        spec = parse_spec(args.encoder)
        if spec["kind"] != "toy":
            raise InputError(f"--card needs a toy encoder, got {args.encoder!r}")
        from pathlib import Path

        path = Path(spec.get("weights") or shipped_weights_dir()) / CARD_FILE
        if not path.is_file():
            raise InputError(f"{path} not found (weights trained without a card)")
        card = read_artifact_json(path)
        print(json.dumps(card, indent=2) if args.json else
              f"{card.get('command')}\n{format_stats(card['stats'])}")
        return 0
    if args.n < 100 or args.n % 100:
        raise InputError(f"--n must be a positive multiple of 100 (R@1 is measured among 100), got {args.n}")
    encoder = load_encoder(args.encoder, device=args.device)
    stats = clip_stats(encoder.encode_image, encoder.encode_text, n=args.n, seed=args.seed, split=args.split,
                       hard_negatives=args.hard_negative_pairs)
    stats["encoder"] = encoder.spec
    print(json.dumps(stats, indent=2) if args.json else f"encoder: {encoder.spec}\n{format_stats(stats)}")
    return 0
