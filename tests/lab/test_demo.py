"""capdec demo at a tiny budget, through the CLI: the whole pipeline runs and writes its artefacts."""

from __future__ import annotations

import json

from capdec.cli import main
from capdec.lab.toyworld.config import TOY_GAP_SCALE, TOY_NOISE_VARIANCE

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


def test_demo_gap_and_ifcap_methods_tiny(tmp_path):
    """The gap run is calibrated as a user would (15 paired images × 5 captions, the store's text centre,
    unlabelled images and their nearest store captions for the covariance); the ifcap run carries IFCap's settings and the toy world's shape nouns as entities."""
    import numpy as np

    from capdec.checkpoint import load_checkpoint
    from capdec.lab.experiment import entity_words

    out = tmp_path / "demo"
    assert main(["-q", "demo", "--out", str(out), "--methods", "gap", "ifcap", "gap_pseudo", *TINY]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["results"]) == {"capdec", "gap", "ifcap", "gap_pseudo"}
    assert all(r["CIDEr"] is not None for r in metrics["results"].values())
    cal = metrics["gap_calibration"]
    assert (cal["n_paired_images"], cal["n_pairs"], cal["gap_rank"], cal["n_texts"]) == (15, 75, 32, 400)
    assert cal["n_images"] == 15 + 1000  # the paired images and the unlabelled ones
    # the covariance from the unlabelled images and their 5 nearest training captions, not from the 75 pairs
    assert (cal["gap_source"], cal["gap_pairs"]) == ("images and their 5 nearest store captions", 5 * 1015)
    gap = load_checkpoint(out / "runs" / "gap", device="cpu")
    assert gap.noise.shape == "gap" and gap.noise.variance == 0.0 and len(gap.noise.gap_factor) == 32
    assert gap.noise.gap_scale == TOY_GAP_SCALE == metrics["config"]["gap_scale"]
    texts = np.load(out / "data" / "text_store" / "embeddings.npy").astype(np.float64)
    text_mean = (texts / np.linalg.norm(texts, axis=1, keepdims=True)).mean(0)
    image_mean = np.array(gap.noise.offset) + text_mean  # offset = image mean − the store's text mean
    assert np.linalg.norm(image_mean) > np.linalg.norm(text_mean) * 0.5  # an image centre, not zero
    # gap_pseudo: the same gap noise, trained on the text store and the unlabelled training scenes' pseudo-pairs
    pseudo = load_checkpoint(out / "runs" / "gap_pseudo", device="cpu")
    assert pseudo.noise == gap.noise
    data = json.loads((out / "runs" / "gap_pseudo" / "config.json").read_text())["data"]
    pairs_dir = out / "data" / "pseudo_pairs_k5"
    assert data["stores"] == [str(out / "data" / "text_store"), str(pairs_dir)] and data["modality"] == "mixed"
    assert data["mix_weights"] is None  # by size: 5,000 pseudo-pair captions beside the 400 captions
    vectors = np.load(pairs_dir / "embeddings.npy").astype(np.float64)
    assert vectors.shape == (1000, texts.shape[1])
    from capdec.encoders import load_encoder
    from capdec.lab import toyworld

    scenes, _ = toyworld.paired(1000, seed=0 + 10_007, split="train")  # the unlabelled scenes of seed 0
    own = load_encoder("toy").encode_image(scenes[:8]).double().numpy()
    own /= np.linalg.norm(own, axis=1, keepdims=True)
    np.testing.assert_allclose(vectors[:8], own, atol=2e-3)  # float16 rows
    nearest = np.argsort(-(own @ (texts / np.linalg.norm(texts, axis=1, keepdims=True)).T), axis=1)[:, :5]
    captions = (out / "data" / "text_store" / "captions.jsonl").read_text().splitlines()
    paired = (pairs_dir / "captions.jsonl").read_text().splitlines()
    assert [json.loads(paired[5 * i + j])["caption"] for i in range(8) for j in range(5)] == \
        [json.loads(captions[r])["caption"] for r in nearest.reshape(-1)]
    ifcap = load_checkpoint(out / "runs" / "ifcap", device="cpu").model_config
    assert (ifcap.retrieval_k, ifcap.retrieval_fusion, ifcap.entity_prompt) == (5, "ifcap", True)
    assert (ifcap.entity_retrieve, ifcap.entity_threshold, ifcap.entity_mask) == (9, 5, 0.4)
    assert ifcap.retrieval_variance == 2.5 * TOY_NOISE_VARIANCE
    assert ifcap.entity_vocab == entity_words() == ["box", "circle", "cross", "diamond", "disc", "dot", "rhombus",
                                                    "sign", "square", "triangle"]


def test_a_rerun_reuses_finished_runs_only_when_their_noise_is_the_same(tmp_path):
    """A demo rerun in the same --out reuses each finished run of the same budget, unless the run's noise would
    now differ (here --gap-scale): that run is trained again, not silently reused with the old noise."""
    from capdec.checkpoint import load_checkpoint

    out = tmp_path / "demo"
    assert main(["-q", "demo", "--out", str(out), "--methods", "gap", *TINY]) == 0
    weights = {name: (out / "runs" / name / "model.safetensors").stat().st_mtime_ns for name in ("capdec", "gap")}
    assert main(["-q", "demo", "--out", str(out), "--methods", "gap", "--gap-scale", "1.0", *TINY]) == 0
    assert (out / "runs" / "capdec" / "model.safetensors").stat().st_mtime_ns == weights["capdec"]  # reused
    assert (out / "runs" / "gap" / "model.safetensors").stat().st_mtime_ns != weights["gap"]  # trained again
    assert load_checkpoint(out / "runs" / "gap", device="cpu").noise.gap_scale == 1.0
    assert json.loads((out / "metrics.json").read_text())["config"]["gap_scale"] == 1.0
