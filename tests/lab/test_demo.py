"""capdec demo at a tiny budget, through the CLI: the whole pipeline runs and writes its artefacts."""

from __future__ import annotations

import json

from capdec.cli import main
from capdec.lab.toyworld.config import TOY_NOISE_VARIANCE

TINY = ["--captions", "400", "--test-images", "12", "--steps", "12", "--batch-size", "32", "--strategy", "greedy"]


def test_demo_tiny_budget_writes_metrics_and_report(tmp_path):
    out = tmp_path / "demo"
    assert main(["-q", "demo", "--out", str(out), *TINY]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    row = metrics["results"]["capdec"]
    for k in ("CIDEr", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr_se", "text_to_text_CIDEr"):
        assert k in row and row[k] is not None and row[k] >= 0
    assert metrics["noise_variance"] == TOY_NOISE_VARIANCE and metrics["n_test_images"] == 12
    assert metrics["clip"]["text_to_image_r1"] > 0.5  # the shipped mini-CLIP's card
    html = (out / "report.html").read_text()
    assert html.count("<img alt='test image'") == 12 and "CIDEr" in html and "training curves" in html
    assert "<th>statistic</th><th>value</th>" in html  # the CLIP card's table
    rows = [json.loads(r) for r in (out / "captions.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and all(len(r["references"]) == 5 and isinstance(r["capdec"], str) for r in rows)


def test_demo_compare_and_methods_tiny(tmp_path):
    out = tmp_path / "demo"
    assert main(["-q", "demo", "--out", str(out), "--compare", "--methods", "projection", "retrieval", *TINY]) == 0
    results = json.loads((out / "metrics.json").read_text())["results"]
    assert set(results) == {"capdec", "no_noise", "supervised", "shifted", "projection", "retrieval"}
    assert all(r["CIDEr"] is not None for r in results.values())


def test_experiments_decode_with_the_beam_stop_their_documented_numbers_had():
    """docs/results' toy numbers were decoded with the heuristic beam stop (the product's default is now the
    exact one, which changes many of the demo decoder's captions); an experiment may still ask for either."""
    from dataclasses import replace

    from capdec.decode import DecodeConfig
    from capdec.lab.experiment import ExperimentConfig, decode_config

    cfg = decode_config(ExperimentConfig())
    assert (cfg.strategy, cfg.beam_size, cfg.early_stopping) == ("beam", 3, "heuristic")
    assert DecodeConfig().early_stopping == "exact"
    assert decode_config(replace(ExperimentConfig(), decode={"early_stopping": "exact"})).early_stopping == "exact"
