"""capdec demo: the whole method, offline, in the toy world."""

from __future__ import annotations

import argparse

HELP = "run CapDec end to end in the toy world (text-only training, captioning, evaluation, HTML report)"
DESCRIPTION = """Generate a text-only caption corpus in the toy world, embed it with the shipped mini-CLIP's
text tower, train a CapDec decoder with noise, caption held-out test images from their image
embeddings, score them against 5 references each, and write DIR/metrics.json and DIR/report.html.
--compare also trains, on the same budget, a decoder without noise, a supervised decoder on paired
image embeddings (the upper bound), and scores the no-noise decoder with a centroid shift.
--methods adds later text-only methods (projection, centering, retrieval).
--styles runs the style-guided experiment instead (romantic and humorous styles learnt from a few
thousand styled sentences: style-only training vs factual pre-training + fine-tuning), and
--cross-domain the cross-domain one (COCO-like <-> Flickr-like captions and scenes, with and
without noise); each writes its own tables to DIR/metrics.json and DIR/report.html."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from capdec.lab.defaults import METHODS
    from capdec.lab.toyworld.config import TOY_GAP_SCALE, TOY_NOISE_VARIANCE

    p.add_argument("--out", default="demo_out", help="output directory")
    p.add_argument("--compare", action="store_true", help="also train no-noise, supervised and shifted baselines")
    p.add_argument("--methods", nargs="+", default=[], choices=METHODS, metavar="METHOD",
                   help=f"later methods to add: {', '.join(METHODS)}")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--styles", action="store_true",
                      help="style-guided captioning: per style, factual vs style-only vs factual + fine-tuning")
    mode.add_argument("--cross-domain", action="store_true",
                      help="cross-domain captioning: train on one domain's captions, caption the other's images")
    p.add_argument("--style-sentences", type=int, default=3000, help="styled sentences per style (with --styles)")
    p.add_argument("--finetune-steps", type=int, default=None,
                   help="fine-tuning steps from the factual decoder (with --styles; default: half of --steps)")
    p.add_argument("--seed", type=int, default=0, help="seeds the world and training")
    p.add_argument("--encoder", default="toy", help="toy-world CLIP: 'toy' (shipped) or 'toy:DIR' (e.g. from "
                                                    "'capdec toyworld train-clip')")
    p.add_argument("--captions", type=int, default=None, help="training captions (default 20000)")
    p.add_argument("--test-images", type=int, default=None, help="held-out test images (default 300)")
    p.add_argument("--steps", type=int, default=None, help="training steps of each decoder (default 600)")
    p.add_argument("--batch-size", type=int, default=None, help="training batch size (default 128)")
    p.add_argument("--noise-variance", type=float, default=None,
                   help=f"CapDec noise variance ε² (default {TOY_NOISE_VARIANCE}: picked for the shipped mini-CLIP on "
                        "validation seeds; the paper's 0.016 was picked for a 640-d CLIP)")
    p.add_argument("--gap-scale", type=float, default=None,
                   help=f"factor on the gap covariance of the gap runs' noise (capdec train --noise-gap-scale; default "
                        f"{TOY_GAP_SCALE}: picked for the shipped mini-CLIP on validation seeds)")
    p.add_argument("--strategy", choices=["beam", "greedy"], default=None, help="decoding (default beam of 3)")


def run(args: argparse.Namespace) -> int:
    from capdec.lab.demo import run_demo
    from capdec.lab.experiment import ExperimentConfig
    from capdec.utils import set_threads_from_env

    set_threads_from_env()
    cfg = ExperimentConfig(seed=args.seed)
    for flag, field in (("captions", "n_captions"), ("test_images", "n_test"), ("steps", "steps"),
                        ("batch_size", "batch_size"), ("noise_variance", "noise_variance"),
                        ("gap_scale", "gap_scale")):
        if getattr(args, flag) is not None:
            setattr(cfg, field, getattr(args, flag))
    if args.strategy == "greedy":
        cfg.decode = {"strategy": "greedy"}
    from capdec.encoders import load_encoder
    from capdec.errors import InputError

    if not args.encoder.split(":")[0] == "toy":
        raise InputError("the demo runs in the toy world: --encoder must be 'toy' or 'toy:DIR'")
    encoder = load_encoder(args.encoder, device="cpu")
    if args.styles or args.cross_domain:
        if args.compare or args.methods:
            raise InputError("--compare/--methods and --styles/--cross-domain are separate experiments: run them "
                             "one at a time")
        return _run_transfer(args, cfg, encoder)
    metrics = run_demo(args.out, config=cfg, compare=args.compare, methods=args.methods, encoder=encoder)
    cols = ["CIDEr", "Bleu_4", "METEOR", "ROUGE_L"]
    print(f"{'run':<22}" + "".join(f"{c:>18}" for c in cols))
    for name, row in metrics["results"].items():
        cells = "".join(f"{row[c]:>10.3f} ± {row.get(c + '_se', 0):.3f}" if row.get(c) is not None else f"{'—':>18}"
                        for c in cols)
        print(f"{name:<22}{cells}")
    print(f"\nwrote {args.out}/metrics.json and {args.out}/report.html in {metrics['seconds']:.0f} s")
    return 0


def _run_transfer(args: argparse.Namespace, cfg, encoder) -> int:
    from capdec.lab import transfer

    if args.styles:
        if args.style_sentences < 1:
            from capdec.errors import InputError

            raise InputError("--style-sentences must be at least 1")
        metrics = transfer.run_styles(args.out, config=cfg, n_style=args.style_sentences,
                                      finetune_steps=args.finetune_steps, encoder=encoder)
        cols = [*transfer.STYLE_METRICS, "style_accuracy"]
        for style, rows in metrics["results"].items():
            print(f"\nstyle: {style}\n{'run':<14}" + "".join(f"{c:>18}" for c in cols))
            for name, row in rows.items():
                print(f"{name:<14}" + "".join(_cell(row, c) for c in cols))
    else:
        metrics = transfer.run_cross_domain(args.out, config=cfg, encoder=encoder)
        cols = list(transfer.DOMAIN_METRICS)
        print(f"{'train→test':<26}" + "".join(f"{c:>18}" for c in cols))
        for name, row in metrics["results"].items():
            print(f"{name:<26}" + "".join(_cell(row, c) for c in cols))
    print(f"\nwrote {args.out}/metrics.json and {args.out}/report.html in {metrics['seconds']:.0f} s")
    return 0


def _cell(row: dict, c: str) -> str:
    if row.get(c) is None:
        return f"{'—':>18}"
    return f"{row[c]:>10.3f} ± {row.get(c + '_se', 0):.3f}"
