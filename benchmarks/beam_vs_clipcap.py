"""capdec's beam search against ClipCap's generate_beam, on many random inputs of small random LMs.

ClipCap's ``generate_beam`` (rmokady/CLIP_prefix_caption ``predict.py``; CapDec's ``gpt2_prefix_eval.py``
is the same) keeps k slots that finished captions hold on to, and ranks by mean log p (the '.' counted);
capdec keeps k running beams beside the k best finished captions (Hugging Face's scheme) and ranks by
``sum log p / length**length_penalty`` (1: the same mean). Both are pruned searches, so neither is
always the better one. This counts, over random prefixes of a few random one-layer GPT-2s (the
reference's semantics written out in ``tests/reference_search.py``), how often capdec's caption
(``--early-stopping exact`` and ``heuristic``) is the reference's, and when not, which scores higher
by the reference's own ranking. Prints one JSON object (also written to ``--out``)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/beam_vs_clipcap.py                 # ~2 min on one core
    .venv/bin/python benchmarks/beam_vs_clipcap.py --models 10 --inputs 100 --vocab 50

Token 0 plays the '.' that ends a caption (the references stop at '.', and capdec stops there for
imported models); ``--std`` sets how peaked the random LMs' next-token distributions are.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import run_record  # noqa: E402

from capdec.decode import generate  # noqa: E402
from reference_search import clipcap_generate_beam, clipcap_score, small_vocab_lm  # noqa: E402


def compare(args: argparse.Namespace) -> dict:
    modes = ("exact", "heuristic")
    counts = {m: {"same_caption": 0, "capdec_higher": 0, "reference_higher": 0, "equal_score": 0} for m in modes}
    seconds = {m: 0.0 for m in modes}
    for seed in range(args.models):
        lm = small_vocab_lm(args.vocab, seed=seed, std=args.std, positions=args.prefix_length + args.max_length + 1)
        g = torch.Generator().manual_seed(1000 + seed)
        prefix = 0.5 * torch.randn(args.inputs, args.prefix_length, 16, generator=g)
        ours = {}
        for m in modes:
            start = time.perf_counter()
            ours[m] = generate(lm, prefix, eos_token_id=0, strategy="beam", beam_size=args.beam,
                               max_length=args.max_length, length_penalty=1.0, early_stopping=m)
            seconds[m] += time.perf_counter() - start
        for i, row in enumerate(prefix):
            ref = clipcap_generate_beam(lm, row, stop=0, beam_size=args.beam, entry_length=args.max_length)
            ref_score = clipcap_score(lm, row, ref, stop=0, entry_length=args.max_length)
            for m in modes:
                if ours[m][i] == ref:
                    counts[m]["same_caption"] += 1
                    continue
                diff = clipcap_score(lm, row, ours[m][i], stop=0, entry_length=args.max_length) - ref_score
                key = "capdec_higher" if diff > 1e-6 else "reference_higher" if diff < -1e-6 else "equal_score"
                counts[m][key] += 1
    return {"inputs": args.models * args.inputs, "counts": counts,
            "capdec_decode_seconds": {m: round(s, 2) for m, s in seconds.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=5, help="random LMs (seeds 0..N-1)")
    parser.add_argument("--inputs", type=int, default=100, help="random prefixes per LM")
    parser.add_argument("--vocab", type=int, default=30, help="vocabulary size (token 0 ends a caption)")
    parser.add_argument("--std", type=float, default=0.5, help="std of the random weights")
    parser.add_argument("--beam", type=int, default=5, help="beam width (the reference's default: 5)")
    parser.add_argument("--max-length", type=int, default=20, help="most tokens (the reference: 67)")
    parser.add_argument("--prefix-length", type=int, default=4)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1") or 1))
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    record = run_record.start(None, threads=args.threads)
    result = {"benchmark": "beam_vs_clipcap", "settings": {k: v for k, v in vars(args).items() if k != "out"},
              **compare(args)}
    result["run"] = run_record.finish(record)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
