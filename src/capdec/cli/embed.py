"""``capdec embed``: caption files -> an embedding store (resumable; reruns are no-ops)."""

from __future__ import annotations

import argparse
import time

HELP = "embed a caption corpus with a CLIP text encoder into an embedding store"
DESCRIPTION = (
    "Read captions (one per line .txt, .jsonl, .csv/.tsv, a COCO annotation .json, a Karpathy-split .json "
    "such as dataset_coco.json with --split, or a FlickrStyle10K caption file), encode them with "
    "a CLIP text encoder and write an embedding store directory (meta.json, embeddings.npy, "
    "captions.jsonl). An interrupted run resumes where it stopped; rerunning a finished store with the "
    "same corpus and encoder does nothing."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("corpus", nargs="+", metavar="CORPUS", help="caption file(s); several are concatenated")
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
    parser.add_argument("--batch-size", type=int, default=256, help="captions per encoder batch")
    parser.add_argument("--shard-size", type=int, default=4096,
                        help="captions per resumable work shard (an interrupted run redoes at most one)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                        help="encoder compute precision; auto is fp16 on GPU, fp32 on CPU")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing store made from a different corpus or encoder")


def run(args: argparse.Namespace) -> int:
    from capdec.corpus import read_corpus
    from capdec.encoders import load_encoder
    from capdec.store import embed_corpus
    from capdec.utils import set_threads_from_env

    set_threads_from_env()
    start = time.perf_counter()
    # read (and validate) the corpus before loading a possibly large model
    corpus = read_corpus(args.corpus, format=args.format, field=args.field, column=args.column, dedupe=args.dedupe,
                         split=args.split, style_names=args.style_names, style_test=args.style_test)
    encoder = load_encoder(args.encoder, device=args.device, precision=args.precision, batch_size=args.batch_size)
    store = embed_corpus(corpus, args.out, encoder, dtype=args.dtype, batch_size=args.batch_size,
                         shard_size=args.shard_size, overwrite=args.overwrite)
    stats = store.meta["stats"]
    seconds = time.perf_counter() - start
    if store.embed_run is not None and store.embed_run.up_to_date:
        print(f"{args.out} is up to date: {len(store)} captions, nothing to do ({seconds:.1f} s)")
    else:
        resumed = store.embed_run.resumed if store.embed_run is not None else 0
        print(f"embedded {len(store)} captions ({stats['empty_skipped']} empty skipped, "
              f"{stats['duplicates_removed']} duplicates removed, {stats['truncated']} truncated"
              f"{f', {resumed} resumed' if resumed else ''}) in {seconds:.1f} s -> {args.out}")
    return 0
