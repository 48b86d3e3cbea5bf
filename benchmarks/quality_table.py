"""Issue 22's final table: CIDEr per method and seed from ``capdec demo --compare`` runs, with the ratios to
the supervised decoder.

Each seed's numbers come from its ``metrics.json`` files (copies live in ``docs/results/quality/``; a run
comes from the first file of its seed that has it, and the first file given for a seed is that seed's own
run). A run missing from them is read from an earlier table (``--baselines``, a ``demo_compare.md`` whose
``## seed S`` sections hold ``| run | CIDEr ± SE | ...`` rows); the output marks (*) every row that is not
from the seed's own run.

    python benchmarks/quality_table.py docs/results/quality/seed[0-4].json docs/results/quality/gap_scale1/seed[2-4].json \\
        docs/results/quality/seed0_baselines.json --baselines docs/results/demo_compare.md \\
        --json docs/results/quality/summary.json

prints the Markdown table and, with ``--json FILE``, writes the means and ratios as JSON.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

# runs trained without any image-caption pair (projection decodes the no-noise decoder; the gap runs calibrate on
# unlabelled images, and gap_pseudo also trains on them, each with its nearest training captions)
TEXT_ONLY = ("capdec", "no_noise", "shifted", "projection", "capdec_projection", "centering", "retrieval",
             "retrieval_projection", "gap", "gap_projection", "ifcap", "gap_ifcap", "gap_pseudo")
# CapDec's method with a different noise only (same decoder, same decoding)
NOISE_ONLY = ("capdec", "gap")


def read_baselines(path: Path) -> dict[int, dict[str, tuple[float, float]]]:
    """``{seed: {run: (CIDEr, SE)}}`` from a demo_compare.md's first ``## seed S`` sections."""
    out: dict[int, dict[str, tuple[float, float]]] = {}
    seed = None
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            m = re.match(r"^## seed (\d+)\b", line)
            seed = int(m.group(1)) if m and int(m.group(1)) not in out else None
            if seed is not None:
                out[seed] = {}
            continue
        m = re.match(r"^\| (\w+) \| ([0-9.]+) ± ([0-9.]+) \|", line)
        if seed is not None and m:
            out[seed][m.group(1)] = (float(m.group(2)), float(m.group(3)))
    return out


def collect(files: list[Path], baselines: dict[int, dict[str, tuple[float, float]]]) -> dict:
    """``{seed: {run: {CIDEr, se, from}}}``: a run comes from the first file of its seed that has it, else from
    the baselines."""
    seeds: dict[int, dict[str, dict]] = {}
    for f in files:
        m = json.loads(f.read_text(encoding="utf-8"))
        seed = int(m["config"]["seed"])
        own = seed not in seeds  # the seed's first file: its own run
        rows = seeds.setdefault(seed, {})
        for name, r in m["results"].items():
            rows.setdefault(name, {"CIDEr": r["CIDEr"], "se": r["CIDEr_se"], "from": _name(f), "own": own})
    for seed, rows in seeds.items():
        for name, (cider, se) in baselines.get(seed, {}).items():
            rows.setdefault(name, {"CIDEr": cider, "se": se, "from": "baselines", "own": False})
    return seeds


def _name(f: Path) -> str:
    """A metrics file as the table names it: its folder and name (``gap_scale1/seed2.json``)."""
    return f"{f.parent.name}/{f.name}"


def summarise(seeds: dict[int, dict[str, dict]]) -> dict:
    order = sorted(seeds)
    runs = [r for r in dict.fromkeys(name for s in order for name in seeds[s]) if all(r in seeds[s] for s in order)]
    mean = {r: sum(seeds[s][r]["CIDEr"] for s in order) / len(order) for r in runs}
    ratio = {r: {s: seeds[s][r]["CIDEr"] / seeds[s]["supervised"]["CIDEr"] for s in order} for r in runs}
    text_only = [r for r in runs if r in TEXT_ONLY]
    best = max(text_only, key=mean.__getitem__)
    noise = max((r for r in runs if r in NOISE_ONLY), key=mean.__getitem__)
    sup = mean["supervised"]
    return {"seeds": order, "runs": runs, "mean": mean,
            "ratio_of_means": {r: mean[r] / sup for r in runs},
            "mean_of_ratios": {r: sum(ratio[r].values()) / len(order) for r in runs},
            "ratio": ratio, "best_text_only": best, "best_noise_only": noise,
            "reused": [f"seed {s} {r} ({seeds[s][r]['from']})" for s in order for r in runs
                       if not seeds[s][r]["own"]]}


def markdown(seeds: dict[int, dict[str, dict]], summary: dict) -> str:
    order = summary["seeds"]
    head = "| run | " + " | ".join(f"seed {s}" for s in order) + " | mean | mean / supervised |"
    lines = [head, "|---|" + "---:|" * (len(order) + 2)]
    for r in summary["runs"]:
        cells = []
        for s in order:
            row = seeds[s][r]
            mark = "" if row["own"] else "*"
            cells.append(f"{row['CIDEr']:.3f} ± {row['se']:.3f}{mark}")
        lines.append(f"| {r} | " + " | ".join(cells) + f" | {summary['mean'][r]:.3f} | "
                     f"{summary['ratio_of_means'][r]:.3f} |")
    lines.append("")
    lines.append("| ratio to supervised | " + " | ".join(f"seed {s}" for s in order) + " | mean of ratios |")
    lines.append("|---|" + "---:|" * (len(order) + 1))
    for r in summary["runs"]:
        if r == "supervised":
            continue
        lines.append(f"| {r} | " + " | ".join(f"{summary['ratio'][r][s]:.3f}" for s in order)
                     + f" | {summary['mean_of_ratios'][r]:.3f} |")
    best, noise = summary["best_text_only"], summary["best_noise_only"]
    lines += ["", f"Best text-only run (by mean CIDEr): **{best}**, {summary['ratio_of_means'][best]:.3f} × supervised "
              f"(mean of per-seed ratios {summary['mean_of_ratios'][best]:.3f}; goal ≥ 1.0).",
              f"CapDec with the better noise only: **{noise}**, {summary['ratio_of_means'][noise]:.3f} × supervised "
              f"(mean of per-seed ratios {summary['mean_of_ratios'][noise]:.3f}; goal ≥ 0.9)."]
    if summary["reused"]:
        lines.append("\\* not from the seed's own run: " + ", ".join(summary["reused"]) + ".")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("metrics", nargs="+", type=Path, help="capdec demo's metrics.json files (a seed's may be several)")
    p.add_argument("--baselines", type=Path, help="a demo_compare.md whose rows fill runs a seed's file lacks")
    p.add_argument("--json", type=Path, help="write the means and ratios here")
    a = p.parse_args(argv)
    seeds = collect(a.metrics, read_baselines(a.baselines) if a.baselines else {})
    summary = summarise(seeds)
    print(markdown(seeds, summary), end="")
    if a.json:
        a.json.write_text(json.dumps(summary, indent=1, default=str) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
