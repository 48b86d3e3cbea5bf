"""Issue 22's final table (docs/results/quality_final.md) is benchmarks/quality_table.py's output from the
checked-in demo metrics, and the baseline rows it takes from the earlier table are ones today's code
reproduces."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
QUALITY = RESULTS / "quality"



def _benchmark(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


quality_table = _benchmark("quality_table")


def _rows(name: str) -> dict[str, tuple[float, float]]:
    m = json.loads((QUALITY / name).read_text(encoding="utf-8"))
    return {run: (round(r["CIDEr"], 3), round(r["CIDEr_se"], 3)) for run, r in m["results"].items()}


def test_the_earlier_tables_seed_0_is_reproduced_run_for_run():
    """A full re-run of seed 0 gives the earlier table's seed-0 rows (its first section, the 0.008 runs)."""
    earlier = quality_table.read_baselines(RESULTS / "demo_compare.md")
    rerun = _rows("seed0_baselines.json")
    assert set(rerun) == {"capdec", "no_noise", "supervised", "shifted", "projection"}
    assert {run: earlier[0][run] for run in rerun} == rerun


def test_todays_code_reproduces_the_earlier_capdec_rows_it_reuses_baselines_next_to():
    earlier = quality_table.read_baselines(RESULTS / "demo_compare.md")
    for seed in (0, 1):
        assert _rows(f"gap_scale1/seed{seed}.json")["capdec"] == earlier[seed]["capdec"], seed
    for seed in range(5):  # the second table's runs re-scored the same capdec checkpoints: the same rows
        assert _rows(f"seed{seed}.json")["capdec"] == _rows(f"gap_scale1/seed{seed}.json")["capdec"], seed
        # the final table's runs trained capdec again (same budget, same seed): the same rows
        assert _rows(f"pseudo/seed{seed}.json")["capdec"] == _rows(f"seed{seed}.json")["capdec"], seed


def _final(earlier: bool = False) -> tuple[dict, dict]:
    """The documented command's inputs, as benchmarks/quality_table.py reads them (``earlier``: the first final
    table's, with the gap covariance unscaled)."""
    scale1 = sorted((QUALITY / "gap_scale1").glob("seed[0-9].json"))
    if earlier:
        files = scale1 + [QUALITY / "seed0_baselines.json"]
    else:
        files = sorted(QUALITY.glob("seed[0-9].json")) + scale1[2:] + [QUALITY / "seed0_baselines.json"]
    seeds = quality_table.collect(files, quality_table.read_baselines(RESULTS / "demo_compare.md"))
    return seeds, quality_table.summarise(seeds)


def _pseudo() -> tuple[dict, dict]:
    """The final table's inputs (gap noise + pseudo-pairs), as its documented command gives them."""
    files = (sorted((QUALITY / "pseudo").glob("seed[0-9].json")) + sorted(QUALITY.glob("seed[0-9].json"))
             + sorted((QUALITY / "gap_scale1").glob("seed[0-9].json"))[2:] + [QUALITY / "seed0_baselines.json"])
    seeds = quality_table.collect(files, quality_table.read_baselines(RESULTS / "demo_compare.md"))
    return seeds, quality_table.summarise(seeds)


def test_the_pseudo_pair_table_is_the_scripts_output_and_its_runs_are_what_it_says():
    doc = (RESULTS / "quality_final.md").read_text(encoding="utf-8")
    seeds, summary = _pseudo()
    assert sorted(seeds) == [0, 1, 2, 3, 4]
    assert quality_table.markdown(seeds, summary) in doc
    for s in range(5):  # each seed's own runs: capdec and gap_pseudo (gap scale 0.3, 5 nearest captions)
        m = json.loads((QUALITY / "pseudo" / f"seed{s}.json").read_text(encoding="utf-8"))
        assert set(m["results"]) == {"capdec", "gap_pseudo"} and m["config"]["seed"] == s
        assert (m["config"]["gap_scale"], m["config"]["pseudo_k"], m["config"]["n_unlabelled"]) == (0.3, 5, 1000)
        assert seeds[s]["gap_pseudo"]["own"] and not seeds[s]["gap"]["own"]
    sup = [seeds[s]["supervised"]["CIDEr"] for s in range(5)]
    pseudo = [seeds[s]["gap_pseudo"]["CIDEr"] for s in range(5)]
    assert summary["best_text_only"] == "gap_pseudo" and summary["best_noise_only"] == "gap"
    assert abs(summary["ratio_of_means"]["gap_pseudo"] - sum(pseudo) / sum(sup)) < 1e-12
    assert abs(summary["mean_of_ratios"]["gap_pseudo"] - sum(g / s for g, s in zip(pseudo, sup)) / 5) < 1e-12
    written = json.loads((QUALITY / "pseudo" / "summary.json").read_text(encoding="utf-8"))
    assert written["ratio_of_means"] == summary["ratio_of_means"]


def test_the_final_tables_are_the_scripts_output_from_the_checked_in_metrics():
    doc = (RESULTS / "quality_final.md").read_text(encoding="utf-8")
    for earlier, scale in ((False, 0.3), (True, 1.0)):
        seeds, summary = _final(earlier)
        assert sorted(seeds) == [0, 1, 2, 3, 4]
        assert quality_table.markdown(seeds, summary) in doc, earlier
        for s in range(5):  # each seed's own gap run has the gap scale its table says
            own = QUALITY / ("gap_scale1" if earlier else "") / f"seed{s}.json"
            assert json.loads(own.read_text(encoding="utf-8"))["config"].get("gap_scale", 1.0) == scale
            assert seeds[s]["gap"]["own"] and seeds[s]["supervised"]["own"] == (earlier and s >= 2)
    seeds, summary = _final()
    assert {"capdec", "no_noise", "supervised", "projection", "gap", "gap_projection"} <= set(summary["runs"])
    # the ratios are the seeds' CIDEr, written out here
    sup = [seeds[s]["supervised"]["CIDEr"] for s in range(5)]
    gap = [seeds[s]["gap"]["CIDEr"] for s in range(5)]
    assert abs(summary["ratio_of_means"]["gap"] - sum(gap) / sum(sup)) < 1e-12
    assert abs(summary["mean_of_ratios"]["gap"] - sum(g / s for g, s in zip(gap, sup)) / 5) < 1e-12


def test_the_readme_quotes_the_final_tables_ratios():
    _, summary = _final()
    written = json.loads((QUALITY / "summary.json").read_text(encoding="utf-8"))
    assert written["ratio_of_means"] == summary["ratio_of_means"]
    earlier = json.loads((QUALITY / "gap_scale1" / "summary.json").read_text(encoding="utf-8"))
    assert earlier["ratio_of_means"] == _final(earlier=True)[1]["ratio_of_means"]
    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    ratios = summary["ratio_of_means"]
    assert f"reaches {ratios['gap']:.3f}× the supervised decoder's CIDEr" in readme
    assert f"against {ratios['capdec']:.3f}× with CapDec's isotropic noise" in readme
    assert f"(`--methods gap_pseudo`), reaches {_pseudo()[1]['ratio_of_means']['gap_pseudo']:.3f}×" in readme


def test_the_paired_table_is_the_scripts_output_from_the_checked_in_captions():
    """The final table's paired differences (quality_final.md) recomputed from the checked-in captions; each run's
    mean per-image CIDEr there is the table's CIDEr for that seed, so they are those runs' captions."""
    quality_paired = _benchmark("quality_paired")
    files = sorted((QUALITY / "captions").glob("seed[0-9].jsonl.gz"))
    result = quality_paired.compare(files, "gap_pseudo", ["gap", "supervised", "capdec"])
    assert quality_paired.markdown(result) in (RESULTS / "quality_final.md").read_text(encoding="utf-8")
    seeds, _ = _pseudo()
    assert sorted(result["seeds"]) == [0, 1, 2, 3, 4]
    for s, row in result["seeds"].items():
        for run, mean in row["mean"].items():
            table = seeds[s][run]
            # seed 1's supervised row is the earlier table's, printed to 3 digits; its captions are a re-training's
            assert abs(mean - table["CIDEr"]) < (5e-4 if table["from"] == "baselines" else 1e-9), (s, run)
