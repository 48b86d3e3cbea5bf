"""``capdec calibrate``: paired images + captions -> noise.json (ε, variance, modality offset, gap covariance);
with unlabelled images and the training store, a store of pseudo-pairs too."""

from __future__ import annotations

import argparse
import logging

from capdec.encoders import PRECISION_HELP, PRECISIONS  # torch-free: cheap for --help

HELP = "choose the noise level ε (and the modality offset) from a few paired images and captions"
DESCRIPTION = (
    "Embed a few paired images and captions with the encoder you will train with and compute CapDec's "
    "noise level: ε = mean over pairs of ||normalize(image) - normalize(caption)||∞ (about 15 pairs "
    "suffice), variance = ε². PAIRS is a JSON Lines file of {\"image\": path, \"caption\": text} or a "
    "folder of images with --captions (a file mapping file names to captions, e.g. {name: [captions]} "
    "or COCO annotations), or a Karpathy-split file (dataset_coco.json) with --split and --images-root. "
    "With --images DIR (unlabelled images) and/or --store STORE (the training captions' embedding store), "
    "also the image and text centroids and the modality offset (image mean - text mean): the image mean over "
    "the paired and unlabelled images, the text mean over the store's rows (else the paired captions). "
    "--reference-offset marks it for use the way CapDec's released code does (text centroid from 20,000 "
    "training rows: give --store and --max-texts 20000; at caption time the shift is added to the normalised "
    "image embedding without renormalising). --gap-rank R also fits the covariance of the pairs' gaps "
    "(normalize(image) - normalize(caption)) as a rank-R factor plus a diagonal, for 'capdec train "
    "--noise-shape gap'; with --gap-neighbours K, of the images and their K nearest training captions instead "
    "(no captions needed). Writes noise.json for 'capdec train --noise-file' and 'capdec caption --shift'. "
    "--pseudo-pairs PSEUDO also writes an image embedding store of pseudo-pairs: each unlabelled image of --images "
    "(not the paired ones) with its --pseudo-k nearest captions of --store, its real image embedding shared by "
    "them (the embeddings computed for the statistics: no image is encoded twice). Train on both stores: "
    "'capdec train TEXT_STORE PSEUDO --noise-file noise.json --noise-shape gap ...' mixes them by size (unless "
    "--mix-weights) and adds no noise to the image store's rows."
)

logger = logging.getLogger("capdec.cli.calibrate")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pairs", metavar="PAIRS",
                        help="JSON Lines of {image, caption}, a folder of images, or a Karpathy-split file")
    parser.add_argument("--encoder", required=True, metavar="SPEC",
                        help="encoder spec (toy, hf:HUB_ID_OR_DIR, open_clip:MODEL@PRETRAINED)")
    parser.add_argument("--captions", metavar="FILE",
                        help="with a folder PAIRS: the file mapping its image file names to caption(s)")
    parser.add_argument("--images-root", metavar="DIR",
                        help="folder that relative image paths in a pairs file are under (default: its folder)")
    parser.add_argument("--split", choices=["train", "restval", "val", "test", "all"],
                        help="with a Karpathy-split PAIRS file: the split whose images (under --images-root) "
                             "give the pairs (default val; --max-pairs takes the first ones)")
    parser.add_argument("--images", metavar="DIR",
                        help="more (unlabelled) images for the centroids and the modality offset")
    parser.add_argument("--store", metavar="STORE",
                        help="embedding store of the training captions ('capdec embed', same encoder): the text "
                             "centroid of the modality offset comes from its rows instead of the paired captions")
    parser.add_argument("--max-texts", type=int, metavar="N",
                        help="with --store: average its first N rows only (CapDec's released code used 20,000)")
    parser.add_argument("--reference-offset", action="store_true",
                        help="record that the offset is applied as CapDec's released code does: 'capdec caption "
                             "--shift' adds it to the normalised image embedding without renormalising")
    parser.add_argument("--gap-rank", type=int, default=0, metavar="R",
                        help="also fit the pairs' gap covariance as a rank-R factor plus a diagonal, for 'capdec "
                             "train --noise-shape gap' (R is cut to the number of pairs - 1; 0: none)")
    parser.add_argument("--gap-neighbours", type=int, default=0, metavar="K",
                        help="fit the gap covariance on the images (paired and --images) and their K nearest "
                             "captions in --store instead of on the labelled pairs: no captions needed (0: the pairs)")
    parser.add_argument("--gap-shrinkage", default="auto", metavar="ALPHA",
                        help="shrink the gap covariance toward a multiple of the identity by ALPHA in [0, 1]; auto: "
                             "Ledoit-Wolf's estimate (larger with fewer pairs)")
    parser.add_argument("--pseudo-pairs", metavar="STORE",
                        help="also write an image embedding store of pseudo-pairs: each --images image (not the paired "
                             "ones) with its --pseudo-k nearest captions in --store, to train on next to the text "
                             "store ('capdec train TEXT_STORE STORE')")
    parser.add_argument("--pseudo-k", type=int, metavar="K",
                        help="with --pseudo-pairs: nearest captions per image (default 5)")
    parser.add_argument("--overwrite", action="store_true",
                        help="with --pseudo-pairs: replace an embedding store already there, damaged or not (a directory "
                             "that is not an embedding store, or also holds other files, is never replaced)")
    parser.add_argument("--max-pairs", type=int, metavar="N",
                        help="use only the first N image/caption pairs (default: all)")
    parser.add_argument("--out", default="noise.json", metavar="FILE", help="where to write the noise file")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ...")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS, help=PRECISION_HELP)
    parser.add_argument("--batch-size", type=int, default=32, help="images per encoder batch")


def _first_pairs(paths: list, caps: list[list[str]], n: int) -> tuple[list, list[list[str]]]:
    out_paths, out_caps, left = [], [], n
    for path, cs in zip(paths, caps):
        if left <= 0:
            break
        out_paths.append(path)
        out_caps.append(cs[:left])
        left -= len(out_caps[-1])
    return out_paths, out_caps


def run(args: argparse.Namespace) -> int:
    from capdec.calibrate import (
        calibrate,
        encode_images,
        list_images,
        pseudo_pair_store,
        read_pairs,
        unlabelled_images,
        write_noise_file,
    )
    from capdec.encoders import load_encoder
    from capdec.errors import InputError
    from capdec.utils import set_threads_from_env

    set_threads_from_env()
    if args.max_pairs is not None and args.max_pairs < 1:
        raise InputError(f"--max-pairs must be >= 1, got {args.max_pairs}")
    # check every input before loading a possibly large model
    paths, caps = read_pairs(args.pairs, captions=args.captions, images_root=args.images_root, split=args.split)
    if args.max_pairs is not None:
        paths, caps = _first_pairs(paths, caps, args.max_pairs)
    if args.max_texts is not None and args.max_texts < 1:
        raise InputError(f"--max-texts must be >= 1, got {args.max_texts}")
    if args.max_texts is not None and not args.store:
        raise InputError("--max-texts needs --store (the rows it averages)")
    if args.gap_rank < 0:
        raise InputError(f"--gap-rank must be >= 0, got {args.gap_rank}")
    if args.gap_neighbours < 0:
        raise InputError(f"--gap-neighbours must be >= 0, got {args.gap_neighbours}")
    if args.gap_neighbours and not (args.gap_rank and args.store and args.images):
        raise InputError("--gap-neighbours needs --gap-rank, --store (the captions) and --images (the images)")
    shrinkage = None
    if args.gap_shrinkage != "auto":
        try:
            shrinkage = float(args.gap_shrinkage)
        except ValueError:
            shrinkage = -1.0
        if not 0.0 <= shrinkage <= 1.0:
            raise InputError(f"--gap-shrinkage must be 'auto' or a number in [0, 1], got {args.gap_shrinkage!r}")
    if args.reference_offset and not (args.store or args.images):
        raise InputError("--reference-offset needs an offset: give --store and/or --images")
    pseudo_k = _check_pseudo_pairs(args)
    store = None
    if args.store:
        from capdec.store import EmbeddingStore

        store = EmbeddingStore.open(args.store)
        if store.modality != "text":
            raise InputError(f"--store {args.store} holds image embeddings; give the training captions' text store")
    extra = None
    if args.images:
        extra = list_images(args.images)
        if not extra:
            raise InputError(f"--images {args.images}: no image files found")
        extra = unlabelled_images(extra, paths)
        if args.pseudo_pairs and not extra:
            raise InputError(f"--pseudo-pairs: every image of --images {args.images} is a paired one; "
                             "give unlabelled images")
    n_pairs = sum(map(len, caps))
    if n_pairs < 5:
        logger.warning("only %d pairs: ε will be a rough estimate (the paper uses about 15)", n_pairs)
    encoder = load_encoder(args.encoder, device=args.device, precision=args.precision, batch_size=args.batch_size)
    # encoded here, once: the statistics and the pseudo-pairs share them
    extra_v = encode_images(encoder, extra, batch_size=args.batch_size) if extra is not None else None
    stats = calibrate(encoder, paths, caps, extra_images=extra_v, batch_size=args.batch_size, text_store=store,
                      max_texts=args.max_texts, gap_rank=args.gap_rank, gap_shrinkage=shrinkage,
                      gap_neighbours=args.gap_neighbours,
                      reference_offset=args.reference_offset)
    stats["pairs_source"] = str(args.pairs)
    if args.images:
        stats["images_source"] = str(args.images)
    if args.store:
        stats["store_source"] = str(args.store)
    pseudo = ""
    if args.pseudo_pairs:
        pairs_store = pseudo_pair_store(extra_v, store, pseudo_k, names=[str(p) for p in extra], source=args.images)
        pairs_store.save(args.pseudo_pairs, overwrite=args.overwrite)
        stats["pseudo_pairs"] = str(args.pseudo_pairs)
        pseudo = (f"; pseudo-pairs: {len(extra)} images x {pairs_store.meta['corpus']['neighbours']} nearest captions "
                  f"-> {args.pseudo_pairs}")
    write_noise_file(args.out, stats)
    offset = ""
    if "offset" in stats:
        offset = (f", offset norm {stats['offset_norm']:.4f} ({stats['n_images']} images, {stats['n_texts']} "
                  f"{'store rows' if store is not None else 'captions'})")
    if "gap_rank" in stats:
        offset += (f", gap covariance of rank {stats['gap_rank']} (+ diagonal, shrinkage "
                   f"{stats['gap_shrinkage']:.3f}) from {stats['gap_pairs']} {stats['gap_source']}")
    print(f"ε = {stats['epsilon']:.5f} (variance {stats['variance']:.6f}) from {stats['n_pairs']} pairs "
          f"of {stats['n_paired_images']} images; mean L2 {stats['mean_l2']:.4f}, mean cosine "
          f"{stats['mean_cosine']:.4f}{offset} -> {args.out}{pseudo}")
    return 0


def _check_pseudo_pairs(args: argparse.Namespace) -> int:
    """The --pseudo-pairs flags checked before any work (the output too): its K (5 unless --pseudo-k)."""
    from pathlib import Path

    from capdec.errors import InputError
    from capdec.store import check_out_dir

    if not args.pseudo_pairs:
        for flag, given in (("--pseudo-k", args.pseudo_k is not None), ("--overwrite", args.overwrite)):
            if given:
                raise InputError(f"{flag} applies to --pseudo-pairs (the store it writes)")
        return 0
    if not (args.images and args.store):
        raise InputError("--pseudo-pairs needs --images (the unlabelled images) and --store (the training captions "
                         "paired with them)")
    k = 5 if args.pseudo_k is None else args.pseudo_k
    if k < 1:
        raise InputError(f"--pseudo-k must be >= 1, got {k}")
    if Path(args.pseudo_pairs).resolve() == Path(args.store).resolve():
        raise InputError(f"--pseudo-pairs {args.pseudo_pairs} is the --store it pairs with; write it elsewhere")
    check_out_dir(args.pseudo_pairs, overwrite=args.overwrite)
    return k
