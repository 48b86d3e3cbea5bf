"""The noise-level ablation (``capdec sweep``): caption quality against the noise variance ε².

CapDec's claim (Nukrai et al. 2022, §3 and Fig. 3): results are robust to the noise level unless it
is off by about an order of magnitude, and ε calibrated from ~15 image/caption pairs lands near the
best. :func:`run_sweep` measures this: for each seed it prepares the data once, then for each
variance trains a decoder on the shared budget (:func:`capdec.lab.experiment.train_variant`) and scores
it on held-out images (:func:`capdec.lab.experiment.evaluate_checkpoint`).

It is resumable at two levels: a finished checkpoint of the same budget is reused by
``train_variant``, and each (seed, variance) score is written to ``results/`` as soon as it exists, so a
killed sweep loses at most the run in progress and a rerun skips what is done (a rerun may also add
variances or seeds). ``sweep_config.json`` pins the data sizes, budget and encoder of an output
directory; a rerun with other settings is refused rather than mixing incompatible runs.

Outputs in ``out_dir``: ``sweep.json`` (rows, per-seed values, verdict, config), ``sweep.md`` (the
table and verdict) and ``sweep.png`` (metric against variance).

**Standard error across seeds.** Per variance, with per-seed scores ``m_s`` and their per-image bootstrap
standard errors ``b_s`` (``s = 1..n``)::

    mean = (1/n) Σ m_s
    SE   = sqrt( mean_s(b_s²) / n  +  var_s(m_s) / n )        var_s with ddof=1; 0 when n = 1

The first term is the test-image sampling error of the mean, the second the seed-to-seed spread
(training randomness and, since each seed draws its own corpus and test set, data sampling). With
per-seed test sets the second term already contains some test-sampling variance, so the sum is
conservative: at most ~√2 too large, never too small in expectation.
"""

from __future__ import annotations

import json
import logging
import math
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from capdec.errors import InputError
from capdec.lab.defaults import DEFAULT_VARIANCES, TOY_CALIBRATION_SEED  # noqa: F401  (re-exported)
from capdec.lab.experiment import (
    REPORTED,
    ExperimentConfig,
    ToyData,
    evaluate_checkpoint,
    prepare_data,
    toy_model_config,
    train_variant,
)
from capdec.metrics import reusing_scorers
from capdec.utils import read_artifact_json, write_json

logger = logging.getLogger(__name__)

SWEEP_FORMAT = "capdec.sweep/1"
RESULT_FORMAT = "capdec.sweep.run/1"
TABLE_METRICS = ("CIDEr", "Bleu_4", "METEOR", "ROUGE_L")  # the Markdown table's columns, in order
METRIC_LABELS = {"Bleu_1": "BLEU-1", "Bleu_4": "BLEU-4", "METEOR": "METEOR", "ROUGE_L": "ROUGE-L", "CIDEr": "CIDEr"}
RELATIVE_TOLERANCE = 0.10  # the verdict's second notion of "near the best": within 10 % of it
SE_FORMULA = "SE = sqrt(mean_s(b_s^2)/n + var_s(m_s)/n), b_s per-image bootstrap SE, var_s ddof=1 (0 if n=1)"


# ---------------------------------------------------------------------------------------------
# one (seed, variance) run
# ---------------------------------------------------------------------------------------------
@dataclass
class RunResult:
    """The score of one decoder: one seed, one noise variance (``results/seed-S_var-V.json``)."""

    seed: int
    variance: float
    scores: dict[str, float | None]  # coco-caption metrics (×1)
    se: dict[str, float]  # per-image bootstrap standard errors
    checkpoint: str
    train_seconds: float
    eval_seconds: float
    predictions: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"format": RESULT_FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunResult:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def run_name(variance: float) -> str:
    """Directory/file name of a variance: ``var-`` + the float's repr (exact, so never two runs share one)."""
    return f"var-{float(variance)!r}"


def check_variances(variances: Sequence[float], what: str = "variances") -> list[float]:
    if not variances:
        raise InputError(f"{what}: give at least one noise variance")
    out = []
    for v in variances:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise InputError(f"{what}: a noise variance must be a finite number >= 0, got {v!r}")
        out.append(float(v))
    return out


# ---------------------------------------------------------------------------------------------
# aggregation and verdict (pure functions)
# ---------------------------------------------------------------------------------------------
def combined_se(values: Sequence[float], bootstrap_ses: Sequence[float]) -> float:
    """SE of the mean over seeds of ``values``, given each value's bootstrap SE (module docstring)."""
    n = len(values)
    if n == 0 or len(bootstrap_ses) != n:
        raise ValueError("combined_se needs one bootstrap SE per value, and at least one value")
    within = sum(b * b for b in bootstrap_ses) / n
    mean = sum(values) / n
    between = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return math.sqrt(within / n + between / n)


def aggregate(runs: Sequence[RunResult], *, metrics: Sequence[str] = REPORTED) -> list[dict[str, Any]]:
    """One row per variance (ascending): mean over seeds, combined SE, and per-seed values of each metric."""
    by_var: dict[float, list[RunResult]] = {}
    for r in runs:
        by_var.setdefault(r.variance, []).append(r)
    rows = []
    for variance in sorted(by_var):
        group = sorted(by_var[variance], key=lambda r: r.seed)
        row: dict[str, Any] = {"variance": variance, "epsilon": math.sqrt(variance), "seeds": [r.seed for r in group],
                               "mean": {}, "se": {}, "per_seed": {}}
        for m in metrics:
            vals = [r.scores.get(m) for r in group]
            row["per_seed"][m] = vals
            if any(v is None for v in vals):  # e.g. METEOR without Java
                row["mean"][m] = None
                continue
            row["mean"][m] = sum(vals) / len(vals)
            ses = [r.se.get(m) for r in group]
            if all(s is not None for s in ses):
                row["se"][m] = combined_se(vals, ses)
        rows.append(row)
    return rows


def _contiguous_range(rows: Sequence[dict[str, Any]], best: int, near: Sequence[bool]) -> tuple[float, float]:
    """The run of consecutive variances (ascending order) around ``best`` that are all near the best."""
    lo = hi = best
    while lo > 0 and near[lo - 1]:
        lo -= 1
    while hi < len(rows) - 1 and near[hi + 1]:
        hi += 1
    return rows[lo]["variance"], rows[hi]["variance"]


def _range_summary(rows: Sequence[dict[str, Any]], best: int, near: list[bool],
                   calibrated: float | None) -> dict[str, Any]:
    lo, hi = _contiguous_range(rows, best, near)
    return {
        "variances": [r["variance"] for r, ok in zip(rows, near) if ok],
        "range": [lo, hi],
        # max/min of the range: None when it reaches variance 0 (unbounded below)
        "ratio": hi / lo if lo > 0 else None,
        "epsilon_ratio": math.sqrt(hi / lo) if lo > 0 else None,
        "calibrated_in_range": None if calibrated is None else lo <= calibrated <= hi,
    }


def verdict(rows: Sequence[dict[str, Any]], metric: str, calibrated: float | None = None, *,
            tolerance: float = RELATIVE_TOLERANCE) -> dict[str, Any]:
    """Where the best variance is and how flat the curve is around it.

    A variance is *near the best* (``within_1se``) when its mean is below the best mean by at most the
    SE of that difference, ``sqrt(SE_best² + SE_v²)``; ``within_pct`` when it is at least
    ``(1 − tolerance) × best``. For each, ``range`` is the contiguous run of variances around the best
    that are all near it, ``ratio`` its max/min (the paper's "robust within an order of magnitude" is a
    ratio ≥ 10), and ``calibrated_in_range`` whether the calibrated variance lies inside it.
    """
    scored = [r for r in rows if r["mean"].get(metric) is not None]
    if not scored:
        raise InputError(f"no run has a {metric} score")
    means = [r["mean"][metric] for r in scored]
    best = max(range(len(scored)), key=lambda i: (means[i], -i))  # ties: the smaller variance
    se = [r["se"].get(metric, 0.0) for r in scored]
    near_se = [means[best] - m <= math.sqrt(se[best] ** 2 + s ** 2) for m, s in zip(means, se)]
    near_pct = [m >= (1 - tolerance) * means[best] for m in means]
    out: dict[str, Any] = {
        "metric": metric,
        "best_variance": scored[best]["variance"],
        "best_epsilon": scored[best]["epsilon"],
        "best_mean": means[best],
        "best_se": se[best],
        "within_1se": _range_summary(scored, best, near_se, calibrated),
        "within_pct": {"tolerance": tolerance, **_range_summary(scored, best, near_pct, calibrated)},
        "calibrated_variance": calibrated,
    }
    # each seed's own best: the seed effect (corpus, test set) is shared by all variances of a seed, so
    # within-seed comparisons are sharper than the error bars suggest
    by_seed: dict[int, list[tuple[float, float]]] = {}  # seed -> [(variance, score)], ascending variance
    for r in scored:
        for seed, value in zip(r["seeds"], r["per_seed"][metric]):
            if value is not None:
                by_seed.setdefault(seed, []).append((r["variance"], value))
    out["best_variance_per_seed"] = {str(seed): max(pairs, key=lambda p: p[1])[0]  # ties: the first, smaller
                                     for seed, pairs in sorted(by_seed.items())}
    zero = next((r for r in scored if r["variance"] == 0), None)
    if zero is not None:
        out["no_noise_mean"] = zero["mean"][metric]
        out["gain_over_no_noise"] = means[best] - zero["mean"][metric]
    if calibrated is not None:
        cal = next((r for r in scored if r["variance"] == calibrated), None)
        if cal is not None:
            out["calibrated_mean"] = cal["mean"][metric]
            out["calibrated_gap_to_best"] = means[best] - cal["mean"][metric]
    # the paper's two claims, judged on the within-tolerance range (an effect size; with few seeds the
    # 1-SE range mostly measures the noise of the estimate)
    pct = out["within_pct"]
    out["claim"] = {
        "criterion": f"within {tolerance:.0%} of the best",
        "robust_over_10x": pct["ratio"] is None or pct["ratio"] >= 10 - 1e-9,
        "calibrated_near_best": pct["calibrated_in_range"],
    }
    out["text"] = _verdict_text(out)
    return out


def _fmt_var(v: float) -> str:
    return "0" if v == 0 else f"{v:.3g}"


def _verdict_text(v: dict[str, Any]) -> str:
    m = v["metric"]
    parts = [f"Best variance {_fmt_var(v['best_variance'])} (ε {v['best_epsilon']:.3g}): {m} "
             f"{v['best_mean']:.3f} ± {v['best_se']:.3f}."]
    if len(v.get("best_variance_per_seed", {})) > 1:
        parts.append("Best per seed: " + ", ".join(f"{_fmt_var(b)} (seed {s})"
                                                   for s, b in v["best_variance_per_seed"].items()) + ".")
    if "gain_over_no_noise" in v:
        parts.append(f"No noise: {v['no_noise_mean']:.3f} ({v['gain_over_no_noise']:+.3f} for the best).")
    for key, label in (("within_1se", "within 1 SE of the best"),
                       ("within_pct", f"within {v['within_pct']['tolerance']:.0%} of the best")):
        r = v[key]
        lo, hi = r["range"]
        text = f"Variances {label}: " + (f"{_fmt_var(lo)} … {_fmt_var(hi)}" if lo != hi else f"only {_fmt_var(lo)}")
        text += (f", down to no noise (below {_fmt_var(hi)} the amount of noise barely matters)" if r["ratio"] is None
                 else f", a {r['ratio']:.3g}× range of variances ({r['epsilon_ratio']:.3g}× of ε)")
        outside = [x for x in r["variances"] if not lo <= x <= hi]
        if outside:  # near the best, but cut off from it by a variance that is not
            text += f"; also {', '.join(_fmt_var(x) for x in outside)}, not adjacent"
        if r["calibrated_in_range"] is not None:
            text += "; the calibrated variance is " + ("inside the range" if r["calibrated_in_range"] else "outside it")
        parts.append(text + ".")
    if v.get("calibrated_variance") is not None and "calibrated_mean" in v:
        parts.append(f"Calibrated variance {_fmt_var(v['calibrated_variance'])} scores {v['calibrated_mean']:.3f} "
                     f"({-v['calibrated_gap_to_best']:+.3f} vs the best).")
    c = v["claim"]
    yes = {True: "yes", False: "no", None: "n/a (no calibrated variance)"}
    parts.append(f"Paper's claim, judged {c['criterion']}: robust over a ≥10× range of variances: "
                 f"{yes[c['robust_over_10x']]}; calibrated variance near the best: {yes[c['calibrated_near_best']]}.")
    return " ".join(parts)


# ---------------------------------------------------------------------------------------------
# calibration in the toy world
# ---------------------------------------------------------------------------------------------
def calibrate_toy(encoder: Any, n_pairs: int, *, seed: int = TOY_CALIBRATION_SEED,
                  grammar: str = "default") -> dict[str, Any]:
    """CapDec's ε from ``n_pairs`` paired *training* scenes of the toy world (a noise.json dict)."""
    from capdec.calibrate import calibrate
    from capdec.lab import toyworld

    if n_pairs < 1:
        raise InputError(f"calibration needs at least 1 pair, got {n_pairs}")
    images, captions = toyworld.paired(n_pairs, seed=seed, split="train", grammar=grammar)
    stats = calibrate(encoder, images, captions)
    stats["pairs_source"] = f"toyworld.paired({n_pairs}, seed={seed}, split='train', grammar={grammar!r})"
    return stats


# ---------------------------------------------------------------------------------------------
# the sweep
# ---------------------------------------------------------------------------------------------
def _pinned_settings(config: ExperimentConfig, encoder: Any, source: dict[str, Any] | None = None) -> dict[str, Any]:
    """What every run of one output directory must share (the seed is per run; ``source``: the user's data)."""
    settings = config.to_dict()
    settings.pop("seed")
    settings.pop("noise_variance")  # the sweep sets the variance per run
    # the decoder as built (library defaults included: a changed default must not reuse old checkpoints)
    settings["model"] = toy_model_config(**config.model).to_dict()
    if source is not None:
        settings["data"] = source
    return {"experiment": settings, "encoder_identity": getattr(encoder, "identity", None)}


def _check_pinned(out_dir: Path, pinned: dict[str, Any]) -> None:
    path = out_dir / "sweep_config.json"
    pinned = json.loads(json.dumps(pinned))  # compare as JSON, as it was written
    if not path.is_file():
        write_json(path, pinned)
        return
    old = read_artifact_json(path)
    if old == pinned:
        return
    before, now = old.get("experiment", {}), pinned["experiment"]
    diff = [f"{k} {before.get(k)!r} -> {now.get(k)!r}" for k in sorted({*before, *now}) if before.get(k) != now.get(k)]
    if old.get("encoder_identity") != pinned["encoder_identity"]:
        diff.append("another encoder")
    raise InputError(f"{out_dir} holds a sweep with other settings ({'; '.join(diff) or 'format'}); its runs "
                     f"cannot be mixed with these: use another --out, or delete {out_dir} to start over")


def resolve_calibrated(calibrated: float | str | Path | dict[str, Any] | None, *,
                       encoder: Any = None) -> tuple[float | None, str | None]:
    """``calibrated`` as (variance, where it came from): a number is a variance, a path a noise.json,
    a dict a :func:`capdec.calibrate.calibrate` result."""
    if calibrated is None:
        return None, None
    if isinstance(calibrated, dict):
        if "variance" not in calibrated:
            raise InputError("calibrated: expected a calibrate() result, with a 'variance'")
        return check_variances([calibrated["variance"]], "calibrated")[0], "calibrated"
    if isinstance(calibrated, (str, Path)):
        from capdec.calibrate import read_noise_file

        identity = getattr(encoder, "identity", None)
        noise = read_noise_file(calibrated, encoder_identity=identity)
        return float(noise["variance"]), str(calibrated)  # as `capdec train --noise-file` uses it
    return check_variances([calibrated], "calibrated")[0], "given"


@reusing_scorers
def run_sweep(out_dir: str | Path, *, variances: Sequence[float], seeds: Sequence[int],
              config: ExperimentConfig | None = None,
              calibrated: float | str | Path | dict[str, Any] | None = None,
              metric: str = "CIDEr", encoder: Any = None,
              prepare: Callable[..., ToyData] = prepare_data, source: dict[str, Any] | None = None,
              show_progress: bool | None = None) -> dict[str, Any]:
    """Train and score one decoder per (seed, variance); write sweep.json, sweep.md, sweep.png.

    ``config``: data sizes, budget and decoding shared by every run (its ``seed`` and
    ``noise_variance`` are ignored: ``seeds`` and ``variances`` set them). ``calibrated``: a variance,
    a noise.json path, or a :func:`capdec.calibrate.calibrate` result (e.g. :func:`calibrate_toy`; written
    to ``out_dir/noise.json``); its variance is added to the grid and marked. ``encoder``:
    the CLIP (default: the shipped mini-CLIP). ``prepare(config, workdir, encoder=...)`` builds a
    seed's data (default: the toy world's :func:`capdec.lab.experiment.prepare_data`; swap it for another
    data source returning a :class:`ToyData`). Returns the sweep.json dict.
    """
    t0 = time.time()
    out_dir = Path(out_dir)
    config = config or ExperimentConfig()
    variances = check_variances(variances)
    if not seeds:
        raise InputError("seeds: give at least one seed")
    if len(set(seeds)) != len(seeds):
        raise InputError(f"seeds: each seed once, got {list(seeds)}")
    if metric not in REPORTED:
        raise InputError(f"metric {metric!r} is not one of {', '.join(REPORTED)}")
    if encoder is None:
        from capdec.encoders import load_encoder

        encoder = load_encoder("toy", device="cpu")
    cal_variance, cal_source = resolve_calibrated(calibrated, encoder=encoder)
    grid = sorted(set(variances) | ({cal_variance} if cal_variance is not None else set()))
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_pinned(out_dir, _pinned_settings(config, encoder, source))
    if isinstance(calibrated, dict):  # calibrated on the fly: keep it next to the results
        from capdec.calibrate import write_noise_file

        write_noise_file(out_dir / "noise.json", calibrated)
        cal_source = str(out_dir / "noise.json")

    runs: list[RunResult] = []
    total, done = len(seeds) * len(grid), 0
    for seed in seeds:
        cfg = replace(config, seed=int(seed), noise_variance=0.0)
        seed_dir = out_dir / f"seed-{seed}"
        data: ToyData | None = None
        for variance in grid:
            done += 1
            where = f"[{done}/{total}] seed {seed}, variance {_fmt_var(variance)}"
            result_path = out_dir / "results" / f"seed-{seed}_{run_name(variance)}.json"
            if result_path.is_file():
                runs.append(RunResult.from_dict(read_artifact_json(result_path)))
                logger.info("%s: already scored (%s %.3f)", where, metric, runs[-1].scores.get(metric) or float("nan"))
                continue
            if data is None:
                logger.info("seed %d: preparing data (%d captions, %d test images)", seed, cfg.n_captions, cfg.n_test)
                data = prepare(cfg, seed_dir / "data", encoder=encoder, show_progress=show_progress)
            runs.append(_run_one(data, seed_dir / run_name(variance), seed, variance, where, show_progress))
            write_json(result_path, runs[-1].to_dict())
            logger.info("%s: %s %.3f ± %.3f", where, metric, runs[-1].scores.get(metric) or float("nan"),
                        runs[-1].se.get(metric, float("nan")))

    summary = summarize(runs, metric=metric, seeds=seeds, calibrated=cal_variance, calibrated_source=cal_source,
                        config=config, encoder=encoder)
    if source is not None:
        summary["data"] = source
    summary["seconds"] = round(time.time() - t0, 1)  # of this invocation (a resumed one reuses earlier work)
    write_outputs(summary, out_dir)
    logger.info("sweep done in %.0f s: %s", summary["seconds"], out_dir)
    return summary


def summarize(runs: Sequence[RunResult], *, metric: str = "CIDEr", seeds: Sequence[int] | None = None,
              calibrated: float | None = None, calibrated_source: str | None = None,
              config: ExperimentConfig | None = None, encoder: Any = None) -> dict[str, Any]:
    """The sweep.json dict of finished runs: rows per variance (marked best/calibrated) and the verdict."""
    rows = aggregate(runs)
    result = verdict(rows, metric, calibrated)
    for row in rows:
        row["calibrated"] = calibrated is not None and row["variance"] == calibrated
        row["best"] = row["variance"] == result["best_variance"]
    config = config or ExperimentConfig()
    return {
        "format": SWEEP_FORMAT,
        "metric": metric,
        "variances": [r["variance"] for r in rows],
        "seeds": sorted({r.seed for r in runs}) if seeds is None else [int(s) for s in seeds],
        "calibrated": None if calibrated is None else {"variance": calibrated, "epsilon": math.sqrt(calibrated),
                                                       "source": calibrated_source},
        "rows": rows,
        "verdict": result,
        "se_formula": SE_FORMULA,
        "config": {**config.to_dict(), "seed": None, "noise_variance": None},
        "encoder": getattr(encoder, "spec", None),
        "encoder_identity": getattr(encoder, "identity", None),
        "decoder": _decoder_config(runs),
        "train_seconds": round(sum(r.train_seconds for r in runs), 1),
    }


def _decoder_config(runs: Sequence[RunResult]) -> dict[str, Any] | None:
    """The decoder's hyperparameters as one run's checkpoint recorded them (None if none is readable)."""
    for r in runs:
        path = Path(r.checkpoint) / "config.json"
        if path.is_file():
            model = dict(read_artifact_json(path).get("model") or {})
            model.pop("lm_config", None)  # the Hugging Face config of the LM: long, and derived from the rest
            return model
    return None


def write_outputs(summary: dict[str, Any], out_dir: str | Path) -> None:
    """sweep.json, sweep.md and sweep.png in ``out_dir``."""
    out_dir = Path(out_dir)
    write_json(out_dir / "sweep.json", summary)
    (out_dir / "sweep.md").write_text(format_markdown(summary), encoding="utf-8")
    plot_sweep(summary, out_dir / "sweep.png")


def _run_one(data: ToyData, run_dir: Path, seed: int, variance: float, where: str,
             show_progress: bool | None) -> RunResult:
    from capdec.noise import NoiseConfig

    logger.info("%s: training (%d steps)", where, data.config.steps)
    ckpt, train_seconds = train_variant(data, run_dir, noise=NoiseConfig(variance=variance),
                                        show_progress=show_progress)
    logger.info("%s: captioning and scoring %d test images", where, len(data.test_images))
    t = time.time()
    res = evaluate_checkpoint(data, ckpt, run_name(variance), train_seconds=train_seconds,
                              show_progress=show_progress)
    return RunResult(seed=seed, variance=variance, scores=res.scores, se=res.se, checkpoint=str(ckpt),
                     train_seconds=train_seconds, eval_seconds=time.time() - t, predictions=res.predictions)


# ---------------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------------
def _num(v: float | None, digits: int = 3) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + "."


def _decoding(decode: dict[str, Any]) -> str:
    strategy = decode.get("strategy", "beam")
    return f"beam-search (beam {decode.get('beam_size', 3)})" if strategy == "beam" else str(strategy)


def format_markdown(summary: dict[str, Any]) -> str:
    """sweep.md: the table (one row per variance) and the verdict."""
    metric = summary["metric"]
    others = [m for m in TABLE_METRICS if m != metric]
    label = METRIC_LABELS.get(metric, metric)
    head = ["variance ε²", "ε", f"{label} ± SE", *(METRIC_LABELS.get(m, m) for m in others),
            f"{label} per seed ({', '.join(str(s) for s in summary['seeds'])})", ""]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---:"] * (len(head) - 1) + [":---"]) + "|"]
    for r in summary["rows"]:
        mean, se = r["mean"].get(metric), r["se"].get(metric)
        main = _num(mean) + ("" if se is None or mean is None else f" ± {se:.3f}")
        if mean is not None and r.get("best"):
            main = f"**{main}**"
        marks = [m for m, on in (("best", r.get("best")), ("calibrated", r.get("calibrated"))) if on]
        per_seed = ", ".join(_num(v) for v in r["per_seed"].get(metric, []))
        cells = [_fmt_var(r["variance"]), f"{r['epsilon']:.4g}", main, *(_num(r["mean"].get(m)) for m in others),
                 per_seed, " ".join(marks)]
        lines.append("| " + " | ".join(cells) + " |")
    cfg = summary["config"]
    cal = summary.get("calibrated")
    dec = summary.get("decoder") or {}
    data = summary.get("data")
    sha = (summary.get("encoder_identity") or {}).get("weights_sha256")
    models = []
    if dec:
        models.append(f"decoder: {dec.get('mapper')} mapper (prefix {dec.get('prefix_length')}), {dec.get('lm')} LM "
                      f"{dec.get('lm_depth')}×{dec.get('lm_dim')}, captions cut at {dec.get('max_length')} tokens")
    if sha and data is None:
        models.append(f"mini-CLIP weights sha256 {sha[:12]}")
    if data is not None:  # the user's store and test split: the same data for every seed
        test = data["test"]
        split = f" ({test['split']})" if test.get("split") else ""
        where = (f"Store {data['store']} ({cfg['n_captions']:,} training captions), {cfg['steps']} steps of batch "
                 f"{cfg['batch_size']} per decoder; test split {test['path']}{split}: "
                 f"{data['test_images_scored']} images, {_decoding(cfg['decode'])} decoding; "
                 f"{len(summary['seeds'])} training seed(s) ({', '.join(str(s) for s in summary['seeds'])}).")
    else:
        where = (f"Toy world: {cfg['n_captions']:,} text-only training captions, {cfg['steps']} steps of batch "
                 f"{cfg['batch_size']} per decoder, {cfg['n_test']} held-out test images (5 references each) per "
                 f"seed, {_decoding(cfg['decode'])} decoding; {len(summary['seeds'])} seed(s) "
                 f"({', '.join(str(s) for s in summary['seeds'])}), each with its own corpus, test set and "
                 f"training seed.")
    notes = [
        where,
        *([_sentence("; ".join(models))] if models else []),
        f"Metrics ×1 (pycocoevalcap), mean over seeds. SE combines seeds and test images: {summary['se_formula']}.",
    ]
    if cal:
        notes.append(f"Calibrated: ε = {cal['epsilon']:.4g}, variance {cal['variance']:.4g} ({cal['source']}).")
    return ("\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes)
            + f"\n\n**Verdict.** {summary['verdict']['text']}\n")


def plot_sweep(summary: dict[str, Any], path: str | Path) -> Path | None:
    """sweep.png: mean ± SE against variance on a log axis; variance 0 in its own panel on the left.

    Per-seed values are the small grey dots, the star is the best variance, the dashed line the
    calibrated variance, the shaded band the variances within 1 SE of the best. Returns None (with a
    warning) when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        logger.warning("matplotlib is not installed: no sweep.png")
        return None
    metric = summary["metric"]
    rows = [r for r in summary["rows"] if r["mean"].get(metric) is not None]
    zero = [r for r in rows if r["variance"] == 0]
    pos = [r for r in rows if r["variance"] > 0]
    v = summary["verdict"]
    label = METRIC_LABELS.get(metric, metric)

    if zero and pos:
        fig, (ax0, ax) = plt.subplots(1, 2, sharey=True, figsize=(8, 4.6), dpi=110,
                                      gridspec_kw={"width_ratios": [1, 7], "wspace": 0.04})
    elif zero:
        fig, ax0 = plt.subplots(figsize=(4, 4.6), dpi=110)
        ax = None
    else:
        fig, ax = plt.subplots(figsize=(8, 4.6), dpi=110)
        ax0 = None

    def draw(axis, xs, rs):
        ys = [r["mean"][metric] for r in rs]
        es = [r["se"].get(metric, 0.0) for r in rs]
        axis.errorbar(xs, ys, yerr=es, color="C0", marker="o", capsize=4, lw=1.5, zorder=3)
        for x, r in zip(xs, rs):
            seeds = [s for s in r["per_seed"].get(metric, []) if s is not None]
            axis.scatter([x] * len(seeds), seeds, s=12, color="0.55", zorder=2)
            if r.get("best"):
                axis.scatter([x], [r["mean"][metric]], s=260, marker="*", color="C3", zorder=4,
                             label=f"best: ε² = {_fmt_var(r['variance'])}")
        axis.grid(alpha=0.3, which="both")

    if ax0 is not None:
        draw(ax0, [0.0] * len(zero), zero)
        ax0.set_xlim(-1, 1)
        ax0.set_xticks([0.0], ["0"])
        ax0.set_ylabel(f"{label} (mean ± SE over seeds)")
        ax0.set_xlabel("no noise" if ax is not None else "noise variance ε²")
    if ax is not None:
        draw(ax, [r["variance"] for r in pos], pos)
        ax.set_xscale("log")
        ax.set_xlabel("noise variance ε² (log scale)")
        xlim = (pos[0]["variance"] / 2, pos[-1]["variance"] * 2)
        ax.set_xlim(*xlim)
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # on a short axis they collide
        lo, hi = v["within_1se"]["range"]
        if hi > 0:  # the band of variances within 1 SE of the best (from the left edge when it reaches 0)
            ax.axvspan(lo / 1.15 if lo > 0 else xlim[0], hi * 1.15, color="C2", alpha=0.10,
                       label="within 1 SE of the best")
        if lo == 0 and ax0 is not None:
            ax0.axvspan(-1, 1, color="C2", alpha=0.10)
        cal = summary.get("calibrated")
        if cal and cal["variance"] > 0:
            ax.axvline(cal["variance"], color="C2", ls="--", lw=1.5,
                       label=f"calibrated ε² = {cal['variance']:.3g} (ε = {cal['epsilon']:.3g})")
        top = ax.secondary_xaxis("top", functions=(lambda x: x ** 0.5, lambda e: e ** 2))
        top.set_xlabel("ε")
        top.set_xticks([e for e in (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0) if xlim[0] <= e * e <= xlim[1]],
                       minor=False)
        top.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        top.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        if ax0 is None:
            ax.set_ylabel(f"{label} (mean ± SE over seeds)")
        else:  # broken-axis marks between the two panels
            ax0.spines["right"].set_visible(False)
            ax.spines["left"].set_visible(False)
            ax.tick_params(axis="y", left=False)
            kw = dict(marker=[(-1, -1.5), (1, 1.5)], markersize=10, linestyle="none", color="k", mec="k", mew=1,
                      clip_on=False)
            ax0.plot([1, 1], [0, 1], transform=ax0.transAxes, **kw)
            ax.plot([0, 0], [0, 1], transform=ax.transAxes, **kw)
        handles, labels = ax.get_legend_handles_labels()
        if ax0 is not None:
            extra = ax0.get_legend_handles_labels()
            handles, labels = extra[0] + handles, extra[1] + labels
        ax.legend(handles, labels, fontsize=8, loc="best")
    n = len(summary["seeds"])
    caption = (f"{label} against the noise variance; x axis log scale"
               + ("; variance 0 (no noise) is drawn in the separate left panel (broken axis)" if zero and pos else "")
               + f". Error bars ±1 SE over {n} seed(s) and the test images; grey dots: single seeds.")
    where = "toy world" if summary.get("data") is None else Path(summary["data"]["store"]).name
    fig.suptitle(f"capdec sweep: {label} vs noise variance ({where})", fontsize=11)
    fig.text(0.5, 0.015, "\n".join(textwrap.wrap(caption, 125)), ha="center", va="bottom", fontsize=7.5)
    fig.subplots_adjust(left=0.09, right=0.98, top=0.80, bottom=0.2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
