"""``capdec experiment``: the paper's tables on your own stores, test split and images."""

from __future__ import annotations

import argparse
import json
import logging

HELP = "the paper's experiments on your data: text-only vs supervised (Table 1), cross-domain (Table 2), styles"
DESCRIPTION = """Run CapDec's experiments on your own embedding stores ('capdec embed'), a test split with
references (a Karpathy-split file with --split test, a COCO annotation file, a JSON list of
{file_name, captions}, or a JSONL of {image, caption})
and its images. Every decoder is trained on the same budget; test images are encoded once with the stores'
CLIP and scored with coco-caption metrics and per-image bootstrap standard errors. Each experiment writes
OUT/metrics.json (table), OUT/report.html (tables, training curves, a captioned gallery) and its checkpoints.

  compare       text-only with noise (CapDec) vs no noise vs supervised on image embeddings (ClipCap) vs the
                no-noise decoder with a centroid shift, on the same test images (the paper's Table 1 layout)
  cross-domain  train on each domain's store, caption every domain's test split, with and without noise
                (Table 2)
  styles        per style: factual decoder, style-only decoder, factual + fine-tuning (--init-from) on the
                styled store; scored against styled references and by a style classifier trained on the
                corpora

The ε sweep is 'capdec sweep --store S --test FILE ...'. The toy-world versions of these runs are
'capdec demo --compare / --cross-domain / --styles'."""

logger = logging.getLogger("capdec.cli.experiment")


def add_user_data_arguments(p: argparse.ArgumentParser, *, test: bool = True) -> None:
    """Options shared by every experiment on the user's data (also used by 'capdec sweep --store')."""
    g = p.add_argument_group("test split")
    if test:
        g.add_argument("--test", metavar="FILE",
                       help="test split with references: a Karpathy-split .json (with --split), a COCO annotation "
                            ".json, a JSON list of {file_name, captions}, or a JSONL of {image, caption}")
    g.add_argument("--split", help="the split to score, for a file with splits: test or val of a Karpathy-split file "
                                   "(required there), or a JSONL 'split' value")
    g.add_argument("--images-root", metavar="DIR", help="folder the test images' file names are under "
                                                         "(default: the test file's folder)")
    g.add_argument("--max-test-images", type=int, metavar="N", help="score only the first N test images")
    g = p.add_argument_group("decoder and budget (the same for every decoder)")
    g.add_argument("--lm", help="LM of the decoder: scratch (default) or a Hugging Face causal LM id/directory")
    g.add_argument("--model-config", metavar="JSON", help="decoder options as a JSON file of ModelConfig fields "
                                                          "(mapper, prefix_length, lm_dim, ...)")
    g.add_argument("--lr", type=float, help="peak learning rate (default: 5e-4 scratch LM, 2e-5 pretrained)")
    g.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda:N")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from capdec.cli import HelpFormatter

    class ListingFormatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):
        """Keeps the description's line breaks (it lists the sub-commands)."""

    parser.formatter_class = ListingFormatter
    sub = parser.add_subparsers(dest="experiment", metavar="EXPERIMENT", required=True)

    def common(p: argparse.ArgumentParser, *, test: bool = True) -> None:
        p.add_argument("--out", required=True, metavar="DIR", help="output directory")
        p.add_argument("--steps", type=int, default=1000, help="training steps of every decoder")
        p.add_argument("--batch-size", type=int, default=64, help="training batch size")
        p.add_argument("--seed", type=int, default=0, help="training seed")
        p.add_argument("--noise-variance", type=float, help="CapDec noise variance ε² (default 0.016, the paper's, "
                                                            "or --noise-file's)")
        p.add_argument("--noise-file", metavar="FILE", help="a 'capdec calibrate' noise.json: its variance")
        p.add_argument("--strategy", choices=["beam", "greedy"], default="beam",
                       help="decoding of the test images (beam: beam search of 3)")
        add_user_data_arguments(p, test=test)

    p = sub.add_parser("compare", help="text-only vs no noise vs supervised (Table 1)", formatter_class=HelpFormatter,
                       description="CapDec (noise), no noise, supervised (ClipCap on an image store) and the no-noise "
                                   "decoder with a centroid shift (text mean − image mean of the image store), on "
                                   "the same test images.")
    p.add_argument("--store", required=True, metavar="STORE", help="text store of the training captions")
    p.add_argument("--image-store", required=True, metavar="STORE",
                   help="image store of paired training images ('capdec embed --modality image')")
    common(p)

    p = sub.add_parser("cross-domain", help="train on one domain, caption another's (Table 2)",
                       formatter_class=HelpFormatter,
                       description="Each domain's decoder (with and without noise) captions every domain's test "
                                   "split.")
    p.add_argument("--domain", action="append", nargs="+", required=True, metavar="NAME STORE TEST [IMAGES_ROOT]",
                   help="a domain: its name, text store, test split, and optionally the folder of its test images "
                        "(repeat for each domain; at least two)")
    common(p, test=False)

    p = sub.add_parser("styles", help="factual pre-training + fine-tuning on styled text", formatter_class=HelpFormatter,
                       description="Per style: the factual decoder, a decoder trained on the styled store only, and "
                                   "the factual decoder fine-tuned on it (--init-from); scored against the style's "
                                   "references and by a naive Bayes style classifier trained on the corpora.")
    p.add_argument("--store", required=True, metavar="STORE", help="text store of the factual captions")
    p.add_argument("--style", action="append", nargs=3, required=True, metavar=("NAME", "STORE", "TEST"),
                   help="a style: its name, the text store of its sentences, and a test split of images with "
                        "references in that style (repeat for each style)")
    p.add_argument("--finetune-steps", type=int, help="fine-tuning steps (default: half of --steps)")
    p.add_argument("--finetune-lr", type=float, help="fine-tuning learning rate (default: half of --lr)")
    common(p, test=False)


def user_config(args: argparse.Namespace, *, seed: int = 0):
    """The ExperimentConfig of the shared decoder/budget options (noise: --noise-variance, --noise-file, 0.016)."""
    from capdec.errors import InputError
    from capdec.lab.experiment_data import user_config as make
    from capdec.noise import PAPER_VARIANCE

    for flag in ("steps", "batch_size", "max_test_images"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise InputError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    model = {}
    if args.model_config:
        from capdec.io.text import read_json

        try:
            model = read_json(args.model_config)
        except InputError as e:
            raise InputError(f"cannot read --model-config: {e}") from e
        if not isinstance(model, dict):
            raise InputError(f"--model-config {args.model_config}: expected a JSON object of decoder options")
    if args.lm:
        model["lm"] = args.lm
    variance = getattr(args, "noise_variance", None)
    if variance is None and getattr(args, "noise_file", None):
        from capdec.calibrate import read_noise_file

        variance = float(read_noise_file(args.noise_file)["variance"])
    decode = {"strategy": "greedy"} if args.strategy == "greedy" else None
    return make(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=seed,
                noise_variance=PAPER_VARIANCE if variance is None else variance, model=model, decode=decode)


def run(args: argparse.Namespace) -> int:
    from capdec.utils import set_threads_from_env

    set_threads_from_env()
    return {"compare": _compare, "cross-domain": _cross_domain, "styles": _styles}[args.experiment](args)


def _prepare(args, config, *, store, test, images_root, image_store=None, cache=None, encoder=None):
    from pathlib import Path

    from capdec.lab.experiment_data import prepare_user_data

    return prepare_user_data(config, store=store, test=test, split=args.split, images_root=images_root,
                             image_store=image_store, encoder=encoder, device=args.device,
                             cache_dir=cache or Path(args.out) / "test_data", max_test_images=args.max_test_images)


def _pin(args: argparse.Namespace, config, inputs: dict) -> None:
    """Refuse to reuse an output directory made with other inputs or settings: its finished checkpoints
    would be taken as this run's (OUT/experiment.json records what the directory holds)."""
    from pathlib import Path

    from capdec.errors import InputError
    from capdec.utils import read_artifact_json, write_json

    cfg = config.to_dict()
    cfg.pop("n_captions"), cfg.pop("n_test"), cfg.pop("n_paired")
    pinned = json.loads(json.dumps({"experiment": args.experiment, "inputs": inputs, "config": cfg,
                                    "split": args.split, "max_test_images": args.max_test_images,
                                    "finetune": [getattr(args, "finetune_steps", None),
                                                 getattr(args, "finetune_lr", None)]}, default=str))
    path = Path(args.out) / "experiment.json"
    if path.is_file():
        old = read_artifact_json(path)
        if old != pinned:
            diff = [k for k in sorted({*old, *pinned}) if old.get(k) != pinned.get(k)]
            raise InputError(f"{args.out} holds an experiment with other settings ({', '.join(diff)} differ); its "
                             f"checkpoints would be reused: choose another --out, or delete {args.out}")
        return
    write_json(path, pinned)


def _print_table(rows: dict, cols: list[str], header: str) -> None:
    width = max([len(header), *map(len, rows)]) + 2
    print(f"{header:<{width}}" + "".join(f"{c:>18}" for c in cols))
    for name, row in rows.items():
        print(f"{name:<{width}}" + "".join(f"{row[c]:>10.3f} ± {row.get(c + '_se', 0):.3f}" if row.get(c) is not None
                                           else f"{'—':>18}" for c in cols))


def _compare(args: argparse.Namespace) -> int:
    from capdec.errors import InputError
    from capdec.lab.demo import run_demo

    if not args.test:
        raise InputError("compare needs --test FILE (the test split with references)")
    config = user_config(args, seed=args.seed)
    _pin(args, config, {"store": args.store, "image_store": args.image_store, "test": args.test,
                        "images_root": args.images_root})
    data = _prepare(args, config, store=args.store, test=args.test, images_root=args.images_root,
                    image_store=args.image_store)
    metrics = run_demo(args.out, compare=True, data=data)
    _print_table(metrics["results"], ["CIDEr", "Bleu_4", "METEOR", "ROUGE_L"], "run")
    print(f"\nwrote {args.out}/metrics.json and {args.out}/report.html in {metrics['seconds']:.0f} s")
    return 0


def _cross_domain(args: argparse.Namespace) -> int:
    from pathlib import Path

    from capdec.errors import InputError
    from capdec.lab.transfer import DOMAIN_METRICS, cross_domain_experiment

    if len(args.domain) < 2:
        raise InputError("cross-domain needs at least two --domain NAME STORE TEST [IMAGES_ROOT]")
    config = user_config(args, seed=args.seed)
    _pin(args, config, {"domains": args.domain, "images_root": args.images_root})
    datas, encoder = {}, None
    for spec in args.domain:
        if len(spec) not in (3, 4):
            raise InputError(f"--domain {' '.join(spec)}: expected NAME STORE TEST [IMAGES_ROOT]")
        name, store, test = spec[:3]
        if name in datas:
            raise InputError(f"--domain {name} is given twice")
        datas[name] = _prepare(args, config, store=store, test=test,
                               images_root=spec[3] if len(spec) == 4 else args.images_root,
                               cache=Path(args.out) / "test_data" / name, encoder=encoder)
        encoder = datas[name].encoder
        if datas[name].text_store.encoder_identity != next(iter(datas.values())).text_store.encoder_identity:
            raise InputError(f"--domain {name}: its store was made with another encoder than the first domain's")
    metrics = cross_domain_experiment(args.out, datas, config=config)
    _print_table(metrics["results"], list(DOMAIN_METRICS), "train→test")
    print(f"\nwrote {args.out}/metrics.json and {args.out}/report.html in {metrics['seconds']:.0f} s")
    return 0


def _styles(args: argparse.Namespace) -> int:
    from pathlib import Path

    from capdec.errors import InputError
    from capdec.lab.experiment_data import corpus_style_classifier, user_style_sources
    from capdec.lab.transfer import STYLE_METRICS, styles_experiment

    styles = {}
    for name, store, test in args.style:
        if name in styles or name == "factual":
            raise InputError(f"--style {name}: each style once, and not named 'factual'")
        styles[name] = (store, test)
    first, (_, first_test) = next(iter(styles.items()))
    cache = Path(args.out) / "test_data"
    config = user_config(args, seed=args.seed)
    _pin(args, config, {"store": args.store, "styles": args.style, "images_root": args.images_root})
    data = _prepare(args, config, store=args.store, test=first_test,
                    images_root=args.images_root, cache=cache / first)
    sources = user_style_sources(styles, data, split=args.split, images_root=args.images_root, cache_dir=cache,
                                 max_test_images=args.max_test_images)
    classifier = corpus_style_classifier(data.text_store.captions,
                                         {name: s.store.captions for name, s in sources.items()}, seed=args.seed)
    metrics = styles_experiment(args.out, data, sources, classifier, finetune_steps=args.finetune_steps,
                                finetune_lr=args.finetune_lr)
    cols = [*STYLE_METRICS, "style_accuracy"]
    for style, rows in metrics["results"].items():
        print(f"\nstyle: {style}")
        _print_table(rows, cols, "run")
    print(f"\nwrote {args.out}/metrics.json and {args.out}/report.html in {metrics['seconds']:.0f} s")
    return 0
