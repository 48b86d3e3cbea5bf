"""``capdec evaluate``: generated captions + references -> coco-caption metrics (JSON)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from capdec.output import write_text

HELP = "score generated captions against references (BLEU, METEOR, ROUGE-L, CIDEr, SPICE, CLIPScore)"
DESCRIPTION = (
    "Score captions with the coco-caption toolkit's own scorers (pycocoevalcap: PTB tokenizer, BLEU-1..4, "
    "METEOR, ROUGE-L, CIDEr; SPICE when its jars are installed) and optionally CLIPScore/RefCLIPScore. "
    "PREDICTIONS is what 'capdec caption' writes: JSON Lines {\"image\": path, \"caption\": ...}, a COCO "
    "results JSON [{\"image_id\", \"caption\"}], or a CSV image,caption. References: a COCO caption "
    "annotation JSON, a Karpathy-split file (dataset_coco.json, dataset_flickr30k.json; the images of --split, "
    "default test), a FlickrStyle10K caption .txt (with its train.p), a JSON list / JSON Lines of "
    "{\"image\" or \"image_id\", \"captions\"} (e.g. karpathy_test_refs.json), or {file name: [captions]}. Predictions naming a path are matched to "
    "references by file name, then by the COCO id in the name (COCO_val2014_000000000257.jpg -> 257); "
    "unmatched images are reported, and are an error with --strict. Diversity diagnostics are always "
    "reported (distinct captions per image, the most common caption, vocabulary used; with --train-corpus, the "
    "share copied verbatim from the training captions)."
)

logger = logging.getLogger("capdec.cli.evaluate")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("predictions", metavar="PREDICTIONS", help="generated captions (.jsonl, .json or .csv)")
    parser.add_argument("--references", required=True, metavar="REFS", help="reference captions file")
    parser.add_argument("--split", metavar="SPLIT",
                        help="the references' split: selects the images of a Karpathy-split file (train, restval, "
                             "val, test, all; default test) or of a FlickrStyle10K file (train/test with "
                             "--style-test); for other references only recorded on the model card (--checkpoint)")
    parser.add_argument("--style-names", metavar="FILE",
                        help="FlickrStyle10K image-name list (default: train.p beside the caption file)")
    parser.add_argument("--style-test", type=int, default=0, metavar="N",
                        help="FlickrStyle10K: the last N images are the test split")
    parser.add_argument("--out", metavar="FILE", help="write the metrics JSON here (default: print it)")
    parser.add_argument("--per-image", metavar="FILE",
                        help="write per-image scores as JSON Lines {image_id, caption, metric: score, ...}")
    parser.add_argument("--metrics", default="all",
                        help="comma-separated metrics: Bleu, METEOR, ROUGE_L, CIDEr, SPICE, or all")
    parser.add_argument("--strict", action="store_true",
                        help="fail if any prediction lacks references or any reference image lacks a prediction")
    parser.add_argument("--tokenizer", default="auto", choices=["auto", "ptb", "simple"],
                        help="ptb: coco-caption's Java PTB tokenizer (an error without Java: use it for numbers to "
                             "compare with published ones); simple: a Python approximation; auto: ptb when Java and "
                             "the tokenizer's jar are there, else simple with a warning that the scores are not "
                             "comparable")
    parser.add_argument("--bootstrap", type=int, default=0, metavar="N",
                        help="also report bootstrap standard errors from N resamples of the images (0: off)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the bootstrap")
    parser.add_argument("--train-corpus", metavar="CORPUS_OR_STORE",
                        help="the decoder's training captions (a caption file or an embedding store directory): "
                             "the diversity report then gives the share of captions copied verbatim from it")
    card = parser.add_argument_group("model card")
    card.add_argument("--checkpoint", metavar="CKPT",
                      help="record the metrics in this checkpoint's model card (CKPT/README.md and model_card.json); "
                           "give the checkpoint that made PREDICTIONS")
    card.add_argument("--dataset-name", metavar="NAME",
                      help="what the references are, for the card (default: the references file name)")
    clip = parser.add_argument_group("CLIPScore (needs an encoder and the images)")
    clip.add_argument("--clip-score", action="store_true", help="also compute CLIPScore and RefCLIPScore")
    clip.add_argument("--encoder", metavar="SPEC", help="encoder spec for CLIPScore (toy, hf:..., open_clip:...)")
    clip.add_argument("--images-root", metavar="DIR",
                      help="folder that relative image paths (or the references' file names) are under")
    clip.add_argument("--device", default="auto", help="encoder device: auto, cpu, cuda, ...")
    clip.add_argument("--batch-size", type=int, default=64, help="images per encoder batch")


def _image_path(image_id, pred_path: str | None, refs, root: str | None) -> Path:
    from capdec.errors import InputError

    name = pred_path if pred_path is not None else refs.file_names.get(image_id)
    if name is None:
        raise InputError(f"CLIPScore: no image path for image {image_id!r} (the prediction has only an "
                         f"image_id and the references name no file); give predictions with 'image' paths")
    path = Path(name)
    if not path.is_absolute() and root is not None:
        path = Path(root) / path
        if not path.exists() and pred_path is None:
            path = Path(root) / Path(name).name
    return path


def run(args: argparse.Namespace) -> int:
    from capdec import metrics as M
    from capdec.errors import InputError

    if args.clip_score and not args.encoder:
        raise InputError("--clip-score needs --encoder SPEC")
    if args.bootstrap < 0:
        raise InputError(f"--bootstrap must be >= 0, got {args.bootstrap}")
    if args.checkpoint and not (Path(args.checkpoint) / "config.json").is_file():
        raise InputError(f"--checkpoint {args.checkpoint} is not a local capdec checkpoint directory (no config.json)")
    preds = M.load_predictions(args.predictions)
    refs = M.load_references(args.references, split=args.split, style_names=args.style_names,
                             style_test=args.style_test, split_label_only=True)
    captions, paths, nulls = M.align_predictions(preds, refs)
    if nulls:
        logger.warning("%d predictions have a null caption and were not scored (e.g. %s)", len(nulls), nulls[0])
        if args.strict:
            raise InputError(f"{len(nulls)} predictions have a null caption (strict), e.g. {nulls[0]}")
    need_per_image = bool(args.per_image or args.bootstrap)
    result = M.evaluate(captions, refs.captions, metrics=args.metrics, per_image=need_per_image,
                        strict=args.strict, tokenizer=args.tokenizer)
    result.missing.null_predictions = nulls
    out = result.to_dict()
    out["diversity"] = _diversity({k: v for k, v in captions.items() if k in refs.captions}, args.train_corpus)

    if args.clip_score:
        from capdec.encoders import load_encoder
        from capdec.utils import set_threads_from_env

        set_threads_from_env()
        ids = [i for i in refs.captions if i in captions]
        files = [_image_path(i, paths.get(i), refs, args.images_root) for i in ids]
        encoder = load_encoder(args.encoder, device=args.device, batch_size=args.batch_size)
        clip = M.clip_score(encoder, files, [captions[i] for i in ids], [refs.captions[i] for i in ids],
                            batch_size=args.batch_size)
        out.update(clip.scores)
        out["clip_encoder"] = encoder.spec
        for name, values in clip.per_image.items():
            result.per_image[name] = dict(zip(ids, values))

    if args.bootstrap:
        out["stderr"] = {name: M.bootstrap_se(values, n=args.bootstrap, seed=args.seed)
                         for name, values in result.per_image.items()}
        out["bootstrap"] = {"n": args.bootstrap, "seed": args.seed}
    out["predictions"] = os.fspath(args.predictions)
    out["references"] = os.fspath(args.references)

    if args.per_image:
        _write_per_image(args.per_image, result.per_image, captions)
    if args.out:
        write_text(args.out, json.dumps(out, indent=2, ensure_ascii=False) + "\n")
    table = ", ".join(f"{k} {out[k]:.4f}" if out.get(k) is not None else f"{k} n/a"
                      for k in (*M.METRICS, *M.CLIP_METRICS) if k in out)
    logger.info("%d images: %s", result.n_images, table)
    for name, reason in result.unavailable.items():
        logger.warning("%s unavailable: %s", name, reason)
    if args.checkpoint:
        from capdec.model_card import record_evaluation

        dataset = args.dataset_name or Path(args.references).name
        card = record_evaluation(args.checkpoint, out, dataset=dataset, split=args.split,
                                 predictions=os.fspath(args.predictions))
        logger.info("recorded the metrics in %s", card or f"{args.checkpoint}/model_card.json")
    if args.out:
        logger.info("wrote %s", args.out)
    else:
        json.dump(out, sys.stdout, indent=2, ensure_ascii=False)
        sys.stdout.write("\n")
    return 0


def _diversity(captions: dict, train_corpus: str | None) -> dict:
    """Diversity of the scored captions; copies from ``train_corpus`` (a caption file or a store) when given."""
    from capdec.metrics.diversity import caption_diversity

    training = None
    if train_corpus:
        if Path(train_corpus).is_dir():
            from capdec.store import EmbeddingStore

            training = EmbeddingStore.open(train_corpus).captions
        else:
            from capdec.corpus import read_corpus

            training = read_corpus(train_corpus).captions
    div = caption_diversity(captions, training=training)
    copied = f", {div['copied_share']:.1%} copied verbatim from the training captions" if training is not None else ""
    if div["images"]:
        logger.info("diversity: %d distinct captions for %d images (%.1f%%), most common on %.1f%% of the images, "
                    "%d words used%s", div["distinct_captions"], div["images"], 100 * div["distinct_share"],
                    100 * div["most_common_share"], div["vocabulary"], copied)
    return div


def _write_per_image(path: str, per_image: dict, captions: dict) -> None:
    """JSON Lines, one row per scored image: {image_id, caption, metric: score, ...}."""
    ids = list(next(iter(per_image.values()), {}))  # every metric covers the same images
    rows = []
    for i in ids:
        row = {"image_id": i, "caption": captions[i]}
        row.update({name: values.get(i) for name, values in per_image.items()})
        rows.append(json.dumps(row, ensure_ascii=False) + "\n")
    write_text(path, "".join(rows))
