"""``capdec embed``: caption files -> an embedding store (resumable; reruns are no-ops)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

from capdec.encoders import PRECISION_HELP, PRECISIONS  # torch-free: cheap for --help

HELP = "embed a caption corpus with a CLIP text encoder into an embedding store"
DESCRIPTION = (
    "Read captions (one per line .txt, .jsonl, .csv/.tsv, a COCO annotation .json, a Karpathy-split .json "
    "such as dataset_coco.json with --split, or a FlickrStyle10K caption file), encode them with "
    "a CLIP text encoder and write an embedding store directory (meta.json, embeddings.npy, "
    "captions.jsonl). An interrupted run resumes where it stopped; rerunning a finished store with the "
    "same corpus and encoder does nothing. With --modality image, CORPUS is one captioned-image dataset (a COCO "
    "annotation file, a Karpathy-split file with --split, a JSON list of {file_name, captions}, or a JSONL of "
    "{image, caption}) and every image is "
    "embedded once with the image tower; its captions share that embedding (an image store, for the supervised "
    "ClipCap baseline). Worker processes (--workers) decode and resize the images while batches are encoded; "
    "unreadable images are listed and skipped; an interrupted image run resumes too. Under torchrun "
    "('torchrun --nproc_per_node N -m capdec embed ...') the processes share the shards (one GPU each) and the "
    "store is the one a single process writes."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("corpus", nargs="+", metavar="CORPUS",
                        help="caption file(s); several are concatenated (--modality image: one dataset file)")
    parser.add_argument("--out", required=True, metavar="STORE", help="output store directory")
    parser.add_argument("--encoder", required=True, metavar="SPEC",
                        help="encoder spec: toy, hf:HUB_ID_OR_DIR, open_clip:MODEL@PRETRAINED")
    parser.add_argument("--format", default="auto",
                        choices=["auto", "txt", "jsonl", "csv", "tsv", "coco", "karpathy", "flickrstyle"],
                        help="corpus format; auto picks it from each file's extension (a .json file is COCO or "
                             "Karpathy by its content; FlickrStyle10K files need --format flickrstyle)")
    parser.add_argument("--split", choices=["train", "restval", "val", "test", "all"],
                        help="images of a Karpathy-split file whose captions are read (default train, which "
                             "includes restval); FlickrStyle10K: train/test with --style-test")
    parser.add_argument("--style-names", metavar="FILE",
                        help="FlickrStyle10K image-name list of the caption lines (default: train.p beside the file; "
                             "a pickle is read without running code, or a text file of names)")
    parser.add_argument("--style-test", type=int, default=0, metavar="N",
                        help="FlickrStyle10K: the last N images are the test split (CapDec: 1000)")
    parser.add_argument("--field", default="caption", help="JSONL field holding the caption")
    parser.add_argument("--column", default="caption", help="CSV/TSV column holding the caption")
    parser.add_argument("--dedupe", action="store_true", help="drop exact duplicate captions (after whitespace "
                                                              "normalisation), keeping the first")
    parser.add_argument("--dtype", default="float16", choices=["float16", "float32"],
                        help="dtype of the stored embeddings")
    parser.add_argument("--batch-size", type=int, default=256,
                        help="captions (images) per encoder batch, at most: a shard's captions run shortest first, "
                             "each batch cut to its longest caption and, on a CPU, of at most 2048 tokens")
    parser.add_argument("--shard-size", type=int, default=4096,
                        help="captions (images) per resumable work shard (an interrupted run redoes at most one "
                             "per process)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS, help=PRECISION_HELP)
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing store made from a different corpus or encoder, or a damaged one (only a "
                             "store capdec wrote, holding nothing else: a directory holding other files is never "
                             "replaced)")
    img = parser.add_argument_group("image stores (--modality image)")
    img.add_argument("--modality", default="text", choices=["text", "image"],
                     help="text: embed the captions (CapDec); image: embed each image of a captioned-image dataset "
                          "once, paired with its captions (the supervised baseline)")
    img.add_argument("--images-root", metavar="DIR",
                     help="folder the dataset's image file names are under (default: the dataset's folder)")
    img.add_argument("--workers", type=int, default=None,
                     help="processes that decode and resize images while the encoder runs (default: 4, or the "
                          "number of CPUs if fewer; 0: all in the main process); each holds about two batches")


def run(args: argparse.Namespace) -> int:
    from capdec.corpus import read_corpus
    from capdec.io.text import MAX_CAPTION_CHARS
    from capdec.store import embed_corpus
    from capdec.utils import set_threads_from_env

    set_threads_from_env()
    if args.modality == "image":
        return _run_image(args)
    if args.images_root:
        from capdec.errors import InputError

        raise InputError("--images-root applies to image stores: add --modality image")
    start = time.perf_counter()
    # read (and validate) the corpus before loading a possibly large model
    corpus = read_corpus(args.corpus, format=args.format, field=args.field, column=args.column, dedupe=args.dedupe,
                         split=args.split, style_names=args.style_names, style_test=args.style_test)
    store = _in_process_group(args, lambda encoder: embed_corpus(
        corpus, args.out, encoder, dtype=args.dtype, batch_size=args.batch_size, shard_size=args.shard_size,
        overwrite=args.overwrite))
    if store is None:  # not rank 0
        return 0
    stats = store.meta["stats"]
    seconds = time.perf_counter() - start
    if store.embed_run is not None and store.embed_run.up_to_date:
        print(f"{args.out} is up to date: {len(store)} captions, nothing to do ({seconds:.1f} s)")
    else:
        resumed = store.embed_run.resumed if store.embed_run is not None else 0
        cut = f", {stats['too_long']} cut to {MAX_CAPTION_CHARS} characters" if stats.get("too_long") else ""
        print(f"embedded {len(store)} captions ({stats['empty_skipped']} empty skipped, "
              f"{stats['duplicates_removed']} duplicates removed{cut}, {stats['truncated']} truncated"
              f"{f', {resumed} resumed' if resumed else ''}) in {seconds:.1f} s -> {args.out}")
    return 0


def _in_process_group(args: argparse.Namespace, embed: Callable[[Any], Any]) -> Any:
    """``embed(encoder)`` with the encoder on this process's device (cuda:LOCAL_RANK under torchrun), in the
    process group when launched by torchrun; the store on rank 0, None on the other ranks."""
    from capdec import distributed
    from capdec.encoders import load_encoder

    device = distributed.device_for(args.device)
    try:
        distributed.init(device)
        encoder = load_encoder(args.encoder, device=str(device), precision=args.precision, batch_size=args.batch_size)
        store = embed(encoder)
    finally:
        distributed.shutdown()
    return store if distributed.info().is_main else None


def _run_image(args: argparse.Namespace) -> int:
    from capdec.errors import InputError
    from capdec.image_store import embed_image_dataset
    from capdec.io.image_datasets import read_image_dataset

    if len(args.corpus) != 1:
        raise InputError(f"--modality image embeds one dataset file, got {len(args.corpus)}")
    if args.dedupe or args.format != "auto":
        raise InputError("--dedupe and --format apply to caption corpora (--modality text)")
    if args.workers is not None and args.workers < 0:
        raise InputError(f"--workers must be ≥ 0, got {args.workers}")
    start = time.perf_counter()
    dataset = read_image_dataset(args.corpus[0], split=args.split, images_root=args.images_root)
    store = _in_process_group(args, lambda encoder: embed_image_dataset(
        dataset, args.out, encoder, dtype=args.dtype, batch_size=args.batch_size, shard_size=args.shard_size,
        overwrite=args.overwrite, num_workers=args.workers))
    if store is None:  # not rank 0
        return 0
    seconds = time.perf_counter() - start
    if store.embed_run is not None and store.embed_run.up_to_date:
        print(f"{args.out} is up to date: {len(store.vectors)} images, {len(store)} captions, nothing to do "
              f"({seconds:.1f} s)")
    else:
        skipped = store.meta["stats"]["skipped_images"]
        resumed = store.embed_run.resumed if store.embed_run is not None else 0
        print(f"embedded {len(store.vectors)} images ({len(store)} captions; {len(skipped)} unreadable images "
              f"skipped{f'; {resumed} resumed' if resumed else ''}) in {seconds:.1f} s -> {args.out}")
        for s in skipped[:10]:
            print(f"  skipped {s['image']}: {s['reason']}")
        if len(skipped) > 10:
            print(f"  ... and {len(skipped) - 10} more (meta.json, stats.skipped_images)")
    return 0
