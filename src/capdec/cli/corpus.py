"""``capdec corpus``: prepare text for training — open text to sentences, gender rebalancing, statistics."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from capdec.output import write_text

HELP = "corpus tools: open text -> sentences, gender rebalancing, corpus statistics"
DESCRIPTION = """Tools for the text a decoder learns from.

  sentences         open text (a book, a play, news; paragraphs or one document per line) -> one
                    sentence per line, 4-20 words by default, with counts of what was dropped and why.
                    Mix the result with captions at training time: capdec train CAPTIONS OPEN
                    --mix-weights 0.8 0.2.
  rebalance-gender  swap gendered terms (man/woman, he/she, his/her, ...) with probability P in one
                    direction or both, as the CapDec repository's balancing modes do; deterministic
                    for a seed; reports term counts before and after.
  stats             captions, vocabulary, length histogram, duplicate rate and top words of a corpus.

Run 'capdec corpus TOOL --help' for a tool's options."""


def _corpus_reader_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", default="auto", choices=["auto", "txt", "jsonl", "csv", "tsv", "coco"],
                   help="corpus format; auto picks it from each file's extension")
    p.add_argument("--field", default="caption", help="JSONL field holding the caption")
    p.add_argument("--column", default="caption", help="CSV/TSV column holding the caption")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from capdec.cli import HelpFormatter

    class ListingFormatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):
        """Keeps the description's line breaks (it lists the sub-commands)."""

    parser.formatter_class = ListingFormatter
    sub = parser.add_subparsers(dest="tool", metavar="TOOL", required=True)

    p = sub.add_parser("sentences", help="open text -> one caption-length sentence per line",
                       formatter_class=HelpFormatter,
                       description="Split open text into sentences (abbreviations such as 'Mr.' and initials do "
                                   "not end one) and keep those of --min-words..--max-words words.")
    p.add_argument("inputs", nargs="+", metavar="TEXT", help="UTF-8 text file(s)")
    p.add_argument("--out", required=True, metavar="FILE", help="output .txt, one sentence per line")
    p.add_argument("--mode", default="text", choices=["text", "lines"],
                   help="text: paragraphs separated by blank lines (wrapped lines are joined); lines: one "
                        "document per line")
    p.add_argument("--min-words", type=int, default=4, help="drop shorter sentences")
    p.add_argument("--max-words", type=int, default=20, help="drop longer sentences")
    p.add_argument("--dedupe", action="store_true", help="drop exact repeats of a kept sentence")
    p.add_argument("--report", metavar="FILE", help="also write the counts as JSON")

    p = sub.add_parser("rebalance-gender", help="swap gendered terms with probability P (deterministic per seed)",
                       formatter_class=HelpFormatter,
                       description="Swap the gendered terms of a caption corpus: each caption with a term of the "
                                   "chosen direction flips as a whole with probability --p ('a man and his dog' -> "
                                   "'a woman and her dog'); 'her' becomes 'his' before a noun phrase and 'him' "
                                   "otherwise. Output format follows --out's extension: .txt (one caption per "
                                   "line), .jsonl ({caption, ..., gender_swapped}), or .json for a COCO annotation "
                                   "input (the same file with its captions swapped).")
    p.add_argument("corpus", metavar="CORPUS", help="caption file (.txt, .jsonl, .csv/.tsv, COCO .json)")
    p.add_argument("--out", required=True, metavar="FILE", help="output file (.txt, .jsonl, or .json for COCO input)")
    p.add_argument("--p", type=float, default=0.5, help="probability of swapping an eligible caption")
    p.add_argument("--direction", default="both", choices=["both", "male-to-female", "female-to-male"],
                   help="which terms are swapped (the CapDec repository's modes)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the swap decisions")
    p.add_argument("--report", metavar="FILE", help="also write the term counts as JSON")
    _corpus_reader_args(p)

    p = sub.add_parser("stats", help="captions, vocabulary, length histogram, duplicates, top words",
                       formatter_class=HelpFormatter, description="Describe a caption corpus.")
    p.add_argument("corpus", nargs="+", metavar="CORPUS", help="caption file(s), read like 'capdec embed' reads them")
    p.add_argument("--top", type=int, default=20, help="how many frequent words to list")
    p.add_argument("--out", metavar="FILE", help="also write the statistics as JSON")
    _corpus_reader_args(p)


def _dump(obj) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def _read_lines(path: str) -> list[str]:
    from capdec.errors import InputError
    from capdec.io.text import decode_text

    p = Path(path)
    if not p.is_file():
        raise InputError(f"{path}: no such file")
    return decode_text(p.read_bytes(), path).split("\n")


def run(args: argparse.Namespace) -> int:
    return {"sentences": _sentences, "rebalance-gender": _rebalance, "stats": _stats}[args.tool](args)


def _sentences(args: argparse.Namespace) -> int:
    from capdec.corpus_tools import extract_sentences

    lines = [line for path in args.inputs for line in [*_read_lines(path), ""]]  # a file ends a paragraph
    kept, stats = extract_sentences(lines, mode=args.mode, min_words=args.min_words, max_words=args.max_words,
                                    dedupe=args.dedupe)
    write_text(args.out, "".join(s + "\n" for s in kept))
    report = {"inputs": list(args.inputs), "out": args.out, "mode": args.mode, "min_words": args.min_words,
              "max_words": args.max_words, **stats.as_dict()}
    if args.report:
        write_text(args.report, _dump(report))
    dropped = ", ".join(f"{stats.as_dict()[k]} {k.replace('_', ' ')}" for k in
                        ("too_short", "too_long", "no_lowercase", "duplicates"))
    print(f"{stats.kept} of {stats.sentences} sentences kept ({dropped}; {stats.documents} documents, "
          f"{stats.empty_lines} empty lines) -> {args.out}")
    return 0


def _rebalance(args: argparse.Namespace) -> int:
    from capdec.corpus import detect_format, read_corpus
    from capdec.corpus_tools import rebalance_gender
    from capdec.errors import InputError

    out_ext = Path(args.out).suffix.lower()
    fmt = detect_format(args.corpus) if args.format == "auto" else args.format
    if out_ext not in (".txt", ".jsonl", ".json"):
        raise InputError(f"--out {args.out}: write .txt, .jsonl, or .json (COCO input only)")
    if out_ext == ".json" and fmt != "coco":
        raise InputError(f"--out {args.out}: a .json output is a COCO annotation file and needs a COCO input; "
                         f"write .txt or .jsonl for a {fmt} corpus")
    if out_ext == ".json":
        # the same COCO file with each annotation's caption rebalanced (ids, images, licences untouched)
        from capdec.io.text import read_json

        read_corpus(args.corpus, format="coco")  # validates the annotations with the usual errors
        data = read_json(args.corpus)
        anns = data["annotations"]
        new, swapped, report = rebalance_gender([a["caption"] for a in anns], p=args.p, direction=args.direction,
                                                seed=args.seed)
        for a, c in zip(anns, new):
            a["caption"] = c
        write_text(args.out, json.dumps(data, ensure_ascii=False) + "\n")
    else:
        corpus = read_corpus(args.corpus, format=args.format, field=args.field, column=args.column)
        new, swapped, report = rebalance_gender(corpus.captions, p=args.p, direction=args.direction, seed=args.seed)
        if out_ext == ".txt":
            write_text(args.out, "".join(c + "\n" for c in new))
        else:
            write_text(args.out, "".join(json.dumps({"caption": c, **m, "gender_swapped": s}, ensure_ascii=False)
                                         + "\n" for c, m, s in zip(new, corpus.meta, swapped)))
    summary = {"corpus": args.corpus, "out": args.out, "p": args.p, "direction": args.direction, "seed": args.seed,
               **report.as_dict()}
    if args.report:
        write_text(args.report, _dump(summary))
    b, a = report.before, report.after
    print(f"swapped {report.swapped} of {report.eligible} eligible captions ({report.captions} in all); "
          f"terms male/female: {b['male']}/{b['female']} before, {a['male']}/{a['female']} after -> {args.out}")
    return 0


def _stats(args: argparse.Namespace) -> int:
    from capdec.corpus import read_corpus
    from capdec.corpus_tools import corpus_stats
    from capdec.errors import InputError

    if args.top < 1:
        raise InputError(f"--top must be >= 1, got {args.top}")
    corpus = read_corpus(args.corpus, format=args.format, field=args.field, column=args.column)
    stats = {"corpus": list(args.corpus), "empty_skipped": corpus.stats.empty_skipped,
             **corpus_stats(corpus.captions, top=args.top)}
    if args.out:
        write_text(args.out, _dump(stats))
    w = sys.stdout.write
    w(f"captions          {stats['captions']:,} ({stats['distinct_captions']:,} distinct, duplicate rate "
      f"{stats['duplicate_rate']:.2%}; {stats['empty_skipped']} empty skipped)\n")
    w(f"words             {stats['words']:,} ({stats['mean_words']:.2f} per caption)\n")
    w(f"vocabulary        {stats['vocabulary']:,} words ({stats['singleton_words']:,} seen once)\n")
    hist = stats["length_histogram"]
    peak = max(hist.values(), default=1)
    w("length (words)\n")
    for k, v in hist.items():
        w(f"  {k:>4} {v:>8,} {'#' * max(1, round(40 * v / peak)) if v else ''}\n")
    w("top words         " + ", ".join(f"{k} ({v:,})" for k, v in stats["top_words"].items()) + "\n")
    w("top content words " + ", ".join(f"{k} ({v:,})" for k, v in stats["top_content_words"].items()) + "\n")
    return 0
