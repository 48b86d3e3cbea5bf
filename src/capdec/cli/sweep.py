"""``capdec sweep``: the noise-variance ablation, on your store and test split or in the toy world."""

from __future__ import annotations

import argparse
import logging

HELP = "train and score decoders over a list of noise variances and seeds; table + plot"
DESCRIPTION = """The ε ablation of CapDec. On your data (--store STORE --test FILE [--images-root DIR]): for each
seed and noise variance ε², train a decoder on the store with the same budget and score it on the test
split's images (encoded once with the store's CLIP; a seed changes training only). Without --store, in the
toy world: each seed generates its own text-only corpus and held-out test images. Scores: coco-caption
metrics, per-image bootstrap SEs. Writes DIR/sweep.json,
DIR/sweep.md (table: mean over seeds ± SE, per-seed values, best and calibrated rows, a verdict on how
flat the curve is around the best) and DIR/sweep.png (metric vs variance, log x-axis). Resumable: rerun
the same command and finished trainings and scores are reused; a rerun may add variances or seeds.
--noise-file (a 'capdec calibrate' noise.json) or, in the toy world, --calibrate-pairs N adds the calibrated
variance, marked in the table and plot."""

logger = logging.getLogger("capdec.cli.sweep")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from capdec.cli.experiment import add_user_data_arguments
    from capdec.lab.defaults import DEFAULT_VARIANCES, TOY_CALIBRATION_SEED

    p.add_argument("--out", required=True, metavar="DIR", help="output directory (reused to resume)")
    p.add_argument("--store", metavar="STORE", help="your text store ('capdec embed'); with --test, sweeps on your "
                                                    "data instead of the toy world")
    p.add_argument("--variances", nargs="+", type=float, default=list(DEFAULT_VARIANCES), metavar="V",
                   help="noise variances ε² to train with (0 = no noise)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1], metavar="S",
                   help="seeds; each draws its own corpus, test set and training seed")
    cal = p.add_mutually_exclusive_group()
    cal.add_argument("--noise-file", metavar="FILE",
                     help="a noise.json from 'capdec calibrate' (toy encoder): its variance is added and marked "
                          "as calibrated")
    cal.add_argument("--calibrate-pairs", type=int, metavar="N",
                     help=f"calibrate ε on the fly from N paired toy-world training images and captions "
                          f"(scenes of seed {TOY_CALIBRATION_SEED}), write DIR/noise.json, add its variance")
    p.add_argument("--steps", type=int, default=None, help="training steps of every decoder (default 600 toy, "
                                                           "1000 --store)")
    p.add_argument("--captions", type=int, default=None, help="toy: text-only training captions per seed "
                                                              "(default 20000)")
    p.add_argument("--test-images", type=int, default=None, help="toy: held-out test images per seed (default 300)")
    p.add_argument("--batch-size", type=int, default=None, help="training batch size (default 128 toy, 64 --store)")
    p.add_argument("--strategy", choices=["beam", "greedy"], default="beam",
                   help="decoding of the test images (beam: beam search of 3)")
    p.add_argument("--metric", default="CIDEr", choices=["CIDEr", "Bleu_4", "METEOR", "ROUGE_L", "Bleu_1"],
                   help="the metric the verdict and plot use")
    p.add_argument("--encoder", default="toy", metavar="SPEC",
                   help="the mini-CLIP: toy (shipped weights) or toy:DIR (from 'capdec toyworld train-clip'); with "
                        "--store the CLIP is the one the store records, unless another spec is given here")
    add_user_data_arguments(p)


def run(args: argparse.Namespace) -> int:
    from capdec.encoders import load_encoder
    from capdec.errors import InputError
    from capdec.lab.experiment import ExperimentConfig
    from capdec.lab.sweep import calibrate_toy, check_variances, format_markdown, run_sweep
    from capdec.utils import set_threads_from_env

    set_threads_from_env()
    check_variances(args.variances, "--variances")
    if args.store or args.test:
        return _run_user(args)
    for flag in ("split", "images_root", "max_test_images", "lm", "model_config", "lr"):
        if getattr(args, flag) is not None:
            raise InputError(f"--{flag.replace('_', '-')} applies to a sweep on your data (--store and --test)")
    for flag in ("steps", "captions", "test_images", "batch_size", "calibrate_pairs"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise InputError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if not args.encoder.split(":", 1)[0] == "toy":
        raise InputError(f"--encoder {args.encoder!r}: without --store, capdec sweep runs in the toy world; use toy "
                         f"or toy:DIR, or sweep your own data with --store STORE --test FILE")

    cfg = ExperimentConfig()
    for flag, name in (("captions", "n_captions"), ("test_images", "n_test"), ("steps", "steps"),
                       ("batch_size", "batch_size")):
        if getattr(args, flag) is not None:
            setattr(cfg, name, getattr(args, flag))
    if args.strategy == "greedy":
        cfg.decode = {"strategy": "greedy"}
    if args.noise_file:
        from capdec.calibrate import read_noise_file

        read_noise_file(args.noise_file)  # a bad file fails before any model is loaded
    encoder = load_encoder(args.encoder, device="cpu")

    calibrated = args.noise_file
    if args.calibrate_pairs:
        calibrated = calibrate_toy(encoder, args.calibrate_pairs)  # run_sweep writes it to DIR/noise.json
        logger.info("calibrated from %d toy pairs: ε = %.5f, variance %.6f", calibrated["n_pairs"],
                    calibrated["epsilon"], calibrated["variance"])
    summary = run_sweep(args.out, variances=args.variances, seeds=args.seeds, config=cfg, calibrated=calibrated,
                        metric=args.metric, encoder=encoder)
    print(format_markdown(summary))
    print(f"wrote {args.out}/sweep.json, sweep.md and sweep.png in {summary['seconds']:.0f} s")
    return 0


def _run_user(args: argparse.Namespace) -> int:
    from capdec.cli.experiment import user_config
    from capdec.errors import InputError
    from capdec.lab.experiment_data import run_user_sweep
    from capdec.lab.sweep import format_markdown

    if not (args.store and args.test):
        raise InputError("a sweep on your data needs both --store STORE and --test FILE")
    for flag in ("captions", "test_images", "calibrate_pairs"):
        if getattr(args, flag) is not None:
            raise InputError(f"--{flag.replace('_', '-')} applies to the toy world; with --store the data is yours")
    args.steps = args.steps or 1000
    args.batch_size = args.batch_size or 64
    calibrated_file = args.noise_file  # its variance is added to the grid and marked
    args.noise_variance = args.noise_file = None  # the sweep sets every variance itself
    encoder = None
    if args.encoder != "toy":  # the default: take the CLIP the store records
        from capdec.encoders import load_encoder

        encoder = load_encoder(args.encoder, device=args.device)
    summary = run_user_sweep(args.out, store=args.store, test=args.test, split=args.split,
                             images_root=args.images_root, variances=args.variances, seeds=args.seeds,
                             config=user_config(args), calibrated=calibrated_file, metric=args.metric,
                             encoder=encoder, device=args.device, max_test_images=args.max_test_images)
    print(format_markdown(summary))
    print(f"wrote {args.out}/sweep.json, sweep.md and sweep.png in {summary['seconds']:.0f} s")
    return 0
