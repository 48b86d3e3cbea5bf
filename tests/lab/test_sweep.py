"""capdec sweep: the SE formula and verdict on hand-made numbers, bad input, and a tiny resumable sweep."""

from __future__ import annotations

import json
import math

import pytest

from capdec.errors import InputError
from capdec.lab.sweep import (
    RunResult,
    aggregate,
    combined_se,
    format_markdown,
    plot_sweep,
    run_sweep,
    summarize,
    verdict,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(seed: int, variance: float, cider: float, se: float = 0.02, meteor: float | None = 0.2) -> RunResult:
    scores = {"Bleu_1": 0.5, "Bleu_4": 0.1 + variance, "METEOR": meteor, "ROUGE_L": 0.4, "CIDEr": cider}
    ses = {"Bleu_1": 0.01, "Bleu_4": 0.01, "ROUGE_L": 0.01, "CIDEr": se, **({"METEOR": 0.01} if meteor else {})}
    return RunResult(seed=seed, variance=variance, scores=scores, se=ses, checkpoint="x", train_seconds=1.0,
                     eval_seconds=1.0)


# -- the maths ----------------------------------------------------------------------------------
def test_combined_se_formula():
    # SE² = mean(b²)/n + var(m, ddof=1)/n
    within = (0.1 ** 2 + 0.05 ** 2) / 2 / 2
    between = ((1.0 - 1.1) ** 2 + (1.2 - 1.1) ** 2) / 1 / 2
    assert combined_se([1.0, 1.2], [0.1, 0.05]) == pytest.approx(math.sqrt(within + between))
    assert combined_se([1.0, 1.2], [0.1, 0.05]) == pytest.approx(0.1145644, abs=1e-6)
    assert combined_se([0.5], [0.03]) == pytest.approx(0.03)  # one seed: the bootstrap SE alone
    assert combined_se([0.7, 0.7, 0.7], [0.03, 0.03, 0.03]) == pytest.approx(0.03 / math.sqrt(3))
    with pytest.raises(ValueError):
        combined_se([1.0, 2.0], [0.1])


# hand-made sweep: a plateau from 4e-3 to 4e-2, calibrated 0.012 on it
CURVE = {0.0: (0.80, 0.84), 1e-3: (0.90, 0.94), 4e-3: (1.06, 1.10), 0.012: (1.08, 1.12),
         1.6e-2: (1.10, 1.14), 4e-2: (1.04, 1.08), 1e-1: (0.70, 0.74)}


def _hand_made_runs() -> list[RunResult]:
    return [_run(s, v, c[s]) for v, c in CURVE.items() for s in (0, 1)]


def test_aggregate_and_verdict_on_hand_made_numbers():
    rows = aggregate(_hand_made_runs())
    assert [r["variance"] for r in rows] == sorted(CURVE)
    top = rows[4]
    assert top["variance"] == 1.6e-2 and top["seeds"] == [0, 1] and top["epsilon"] == pytest.approx(math.sqrt(0.016))
    assert top["mean"]["CIDEr"] == pytest.approx(1.12) and top["per_seed"]["CIDEr"] == [1.10, 1.14]
    assert top["se"]["CIDEr"] == pytest.approx(combined_se([1.10, 1.14], [0.02, 0.02]))

    v = verdict(rows, "CIDEr", calibrated=0.012)
    assert v["best_variance"] == 1.6e-2 and v["best_mean"] == pytest.approx(1.12)
    assert v["best_variance_per_seed"] == {"0": 1.6e-2, "1": 1.6e-2} and "Best per seed" in v["text"]
    # SE of each row ≈ 0.0245, of a difference ≈ 0.035: 4e-3 (−0.04) is out, 0.012 (−0.02) in, 4e-2 (−0.06) out
    assert v["within_1se"]["variances"] == [0.012, 1.6e-2]
    assert v["within_1se"]["range"] == [0.012, 1.6e-2] and v["within_1se"]["calibrated_in_range"] is True
    assert v["within_1se"]["ratio"] == pytest.approx(1.6e-2 / 0.012)
    # within 10 % (≥ 1.008): 4e-3 … 4e-2, a 10× range, 1e-3 and 1e-1 outside
    assert v["within_pct"]["range"] == [4e-3, 4e-2] and v["within_pct"]["ratio"] == pytest.approx(10.0)
    assert v["within_pct"]["epsilon_ratio"] == pytest.approx(math.sqrt(10.0))
    assert v["gain_over_no_noise"] == pytest.approx(1.12 - 0.82)
    assert v["calibrated_gap_to_best"] == pytest.approx(0.02)
    assert "Best variance 0.016" in v["text"] and "inside the range" in v["text"]
    assert v["claim"]["robust_over_10x"] is True and v["claim"]["calibrated_near_best"] is True
    # a calibrated value off the plateau is reported as outside
    assert verdict(rows, "CIDEr", calibrated=1e-1)["within_pct"]["calibrated_in_range"] is False
    assert verdict(rows, "CIDEr", calibrated=1e-1)["claim"]["calibrated_near_best"] is False
    # a narrow peak: 4e-3 and 4e-2 drop below 90 % of the best -> not robust over 10×
    peaked = aggregate([_run(0, v, 2.0 if v == 1.6e-2 else c[0]) for v, c in CURVE.items()])
    assert verdict(peaked, "CIDEr")["claim"]["robust_over_10x"] is False


def test_verdict_range_reaching_zero_and_missing_metric():
    runs = [_run(0, 0.0, 1.0, meteor=None), _run(0, 1e-3, 0.99, meteor=None), _run(0, 1e-1, 0.5, meteor=None)]
    rows = aggregate(runs)
    assert rows[0]["mean"]["METEOR"] is None and "METEOR" not in rows[0]["se"]
    v = verdict(rows, "CIDEr")
    assert v["best_variance"] == 0.0 and v["within_1se"]["range"] == [0.0, 1e-3]
    assert v["within_1se"]["ratio"] is None and v["within_1se"]["calibrated_in_range"] is None
    with pytest.raises(InputError, match="METEOR"):
        verdict(rows, "METEOR")


def test_markdown_and_plot_of_hand_made_sweep(tmp_path):
    summary = summarize(_hand_made_runs(), metric="CIDEr", calibrated=0.012, calibrated_source="noise.json")
    md = format_markdown(summary)
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(lines) == 1 + len(CURVE)  # header + one row per variance
    assert "CIDEr ± SE" in lines[0] and "BLEU-4" in lines[0] and "METEOR" in lines[0] and "ROUGE-L" in lines[0]
    best = next(line for line in lines if line.startswith("| 0.016 |"))
    assert "**1.120 ± " in best and best.rstrip(" |").endswith("best") and "1.100, 1.140" in best
    assert next(line for line in lines if line.startswith("| 0.012 |")).rstrip(" |").endswith("calibrated")
    assert "**Verdict.**" in md and "sqrt(mean_s(b_s^2)/n + var_s(m_s)/n)" in md
    assert plot_sweep(summary, tmp_path / "s.png").read_bytes().startswith(PNG_MAGIC)
    # without a no-noise row, and with only the no-noise row
    only_pos = summarize([r for r in _hand_made_runs() if r.variance > 0], calibrated=0.012)
    assert plot_sweep(only_pos, tmp_path / "p.png").is_file()
    assert plot_sweep(summarize([_run(0, 0.0, 0.8)]), tmp_path / "z.png").is_file()


# -- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    ({"variances": [0.0, -1e-3]}, "finite number >= 0"),
    ({"variances": []}, "at least one noise variance"),
    ({"variances": [float("nan")]}, "finite number"),
    ({"seeds": []}, "at least one seed"),
    ({"seeds": [0, 0]}, "each seed once"),
    ({"metric": "SPICE"}, "not one of"),
    ({"calibrated": -0.5}, "calibrated"),
    ({"calibrated": {"epsilon": 0.1}}, "calibrated"),
])
def test_bad_input_is_refused_before_any_work(tmp_path, kwargs, match):
    args = {"variances": [0.0], "seeds": [0], **kwargs}
    with pytest.raises(InputError, match=match):
        run_sweep(tmp_path / "out", encoder=object(), **args)
    assert not (tmp_path / "out").exists()


def test_cli_bad_input(tmp_path, capsys):
    from capdec.cli import main

    out = str(tmp_path / "out")
    assert main(["sweep", "--out", out, "--variances", "0", "-0.01"]) == 2
    assert "--variances" in capsys.readouterr().err
    assert main(["sweep", "--out", out, "--steps", "0"]) == 2
    assert main(["sweep", "--out", out, "--encoder", "hf:x"]) == 2
    assert "without --store, capdec sweep runs in the toy world" in capsys.readouterr().err
    assert main(["sweep", "--out", out, "--store", str(tmp_path)]) == 2  # your data needs a test split too
    assert "needs both --store STORE and --test FILE" in capsys.readouterr().err
    assert main(["sweep", "--out", out, "--lm", "gpt2"]) == 2  # a decoder option of the --store mode
    assert "applies to a sweep on your data" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: an empty list
        main(["sweep", "--out", out, "--variances"])
    with pytest.raises(SystemExit):  # argparse: both calibration sources
        main(["sweep", "--out", out, "--noise-file", "n.json", "--calibrate-pairs", "3"])
    assert main(["sweep", "--out", out, "--noise-file", str(tmp_path / "missing.json")]) == 2
    assert "noise file not found" in capsys.readouterr().err


# -- a tiny real sweep through the CLI ----------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    """A random mini-CLIP (d=16) saved like `capdec toyworld train-clip` output: encoder spec toy:DIR."""
    import torch

    from capdec.encoders.miniclip import MiniCLIP, save_pretrained
    from capdec.lab.toyworld.config import MiniCLIPConfig

    out = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    model = MiniCLIP(MiniCLIPConfig(dim=16, channels=(8, 8), image_hidden=16, text_width=16, text_layers=1,
                                    text_heads=2)).eval()
    save_pretrained(model, out, half=False)
    return f"toy:{out}"


def _mtimes(root) -> dict[str, int]:
    """Modification times of every checkpoint, training state, data store and score file."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")
            if p.is_file() and (p.parent.name == "results" or p.suffix in (".safetensors", ".pt", ".npy")
                                or p.name in ("state.json", "meta.json", "config.json"))}


def test_tiny_sweep_through_cli_and_resume(tmp_path, tiny_clip, monkeypatch, capsys):
    import capdec.metrics
    from capdec.calibrate import read_noise_file
    from capdec.cli import main

    # no METEOR/PTB (a JVM start per scoring takes ~10 s): exercises the missing-metric path too
    monkeypatch.setattr(capdec.metrics.scorers, "_java", lambda: None)
    out = tmp_path / "sweep"
    argv = ["-q", "sweep", "--out", str(out), "--encoder", tiny_clip, "--variances", "0", "--seeds", "0",
            "--calibrate-pairs", "5", "--steps", "8", "--batch-size", "32", "--captions", "300",
            "--test-images", "20", "--strategy", "greedy"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    noise = read_noise_file(out / "noise.json")
    cal = noise["epsilon"] ** 2
    assert noise["n_pairs"] == 5 and "toyworld.paired(5" in noise["pairs_source"]

    summary = json.loads((out / "sweep.json").read_text())
    assert summary["variances"] == [0.0, cal] and summary["seeds"] == [0]
    assert summary["calibrated"]["variance"] == cal and summary["calibrated"]["source"] == str(out / "noise.json")
    rows = summary["rows"]
    assert [r["variance"] for r in rows] == [0.0, cal] and [r["calibrated"] for r in rows] == [False, True]
    assert sum(r["best"] for r in rows) == 1
    for r in rows:
        assert 0 <= r["mean"]["CIDEr"] and r["se"]["CIDEr"] >= 0 and len(r["per_seed"]["CIDEr"]) == 1
        assert r["mean"]["METEOR"] is None
    assert summary["verdict"]["best_variance"] in (0.0, cal)
    md = (out / "sweep.md").read_text()
    assert md in printed + "\n" and "| 0 | 0 |" in md and "calibrated" in md
    assert summary["decoder"]["max_length"] > 0 and "captions cut at" in md and "mini-CLIP weights sha256" in md
    assert (out / "sweep.png").read_bytes().startswith(PNG_MAGIC)
    for name in ("seed-0/var-0.0/model.safetensors", f"seed-0/var-{cal!r}/model.safetensors",
                 "results/seed-0_var-0.0.json"):
        assert (out / name).is_file(), name
    # each run's captions and checkpoint are recorded
    run0 = json.loads((out / "results" / "seed-0_var-0.0.json").read_text())
    assert len(run0["predictions"]) == 20 and run0["variance"] == 0.0

    # rerun: nothing is retrained or rescored
    before = _mtimes(out)
    assert len(before) >= 4
    assert main(argv) == 0
    assert _mtimes(out) == before
    assert json.loads((out / "sweep.json").read_text())["rows"] == rows

    # a sweep killed after training but before scoring: only the score is redone, no retraining
    (out / "results" / "seed-0_var-0.0.json").unlink()
    ckpt = out / "seed-0" / "var-0.0" / "model.safetensors"
    t_ckpt = ckpt.stat().st_mtime_ns
    assert main(argv) == 0
    assert ckpt.stat().st_mtime_ns == t_ckpt
    assert json.loads((out / "results" / "seed-0_var-0.0.json").read_text())["scores"] == run0["scores"]

    # other settings in the same directory are refused
    assert main([*argv[:-6], "--captions", "200", *argv[-4:]]) == 2
    assert "other settings" in capsys.readouterr().err
