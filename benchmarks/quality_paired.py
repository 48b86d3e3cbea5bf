"""Issue 22's paired comparison: per-image CIDEr differences between two runs that captioned the same test images,
with bootstrap standard errors, from the captions checked in under ``docs/results/quality/captions/``.

Each ``seedS.jsonl.gz`` holds one line per test image: ``{"image", "references", RUN: caption, ...}`` (the runs'
``captions.jsonl`` lines, merged). A difference's standard error resamples the images (2,000 draws, numpy seed 0);
the mean over seeds has the SE ``sqrt(Σ SE²) / n``.

    python benchmarks/quality_paired.py docs/results/quality/captions/seed[0-4].jsonl.gz --run gap_pseudo \\
        --against gap supervised capdec

prints the Markdown table (``--json FILE``: each seed's mean CIDEr per run and the differences as JSON).
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import re
from pathlib import Path

import numpy as np

DRAWS = 2000


def read_captions(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def per_image_cider(rows: list[dict], run: str) -> dict[str, float]:
    from capdec.metrics.evaluation import evaluate

    refs = {r["image"]: r["references"] for r in rows}
    return evaluate({r["image"]: r[run] for r in rows}, refs, metrics=["CIDEr"], per_image=True).per_image["CIDEr"]


def paired(a: dict[str, float], b: dict[str, float]) -> tuple[float, float]:
    """Mean of ``a − b`` over the images and its bootstrap SE."""
    ids = sorted(b)
    d = np.array([a[i] - b[i] for i in ids])
    idx = np.random.default_rng(0).integers(0, len(ids), (DRAWS, len(ids)))
    return float(d.mean()), float(d[idx].mean(1).std(ddof=1))


def compare(files: list[Path], run: str, against: list[str]) -> dict:
    seeds = {}
    for f in files:
        seed = int(re.search(r"seed(\d+)", f.name).group(1))
        rows = read_captions(f)
        scores = {name: per_image_cider(rows, name) for name in [run, *against]}
        seeds[seed] = {"mean": {name: float(np.mean(list(s.values()))) for name, s in scores.items()},
                       "diff": {name: paired(scores[run], scores[name]) for name in against}}
    return {"run": run, "against": against, "seeds": seeds}


def markdown(result: dict) -> str:
    run, against, seeds = result["run"], result["against"], result["seeds"]
    lines = ["| seed | " + " | ".join(f"{run} − {name}" for name in against) + " |",
             "|---|" + "---:|" * len(against)]
    fmt = lambda m, se: f"{m:+.3f} ± {se:.3f}".replace("-", "−")  # noqa: E731
    for s in sorted(seeds):
        lines.append(f"| {s} | " + " | ".join(fmt(*seeds[s]["diff"][name]) for name in against) + " |")
    means = []
    for name in against:
        d = [seeds[s]["diff"][name] for s in seeds]
        means.append(fmt(sum(m for m, _ in d) / len(d), math.sqrt(sum(se * se for _, se in d)) / len(d)))
    lines.append("| mean | " + " | ".join(means) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("captions", nargs="+", type=Path, help="seedS.jsonl.gz files (one per seed)")
    p.add_argument("--run", required=True, help="the run compared")
    p.add_argument("--against", nargs="+", required=True, help="the runs it is compared with")
    p.add_argument("--json", type=Path, help="write the means and differences here")
    a = p.parse_args(argv)
    result = compare(a.captions, a.run, a.against)
    print(markdown(result), end="")
    if a.json:
        a.json.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
