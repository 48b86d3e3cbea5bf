"""``capdec demo``: CapDec end to end in the toy world, on a CPU, in minutes.

A text-only corpus is generated (no images), embedded with the shipped mini-CLIP's text tower, a
decoder is trained on noise-injected text embeddings, and held-out test images are captioned from
their *image* embeddings and scored against 5 references each. ``compare=True`` trains the
baselines on the same budget: no noise, a supervised decoder on paired image embeddings (the upper
bound), and the no-noise decoder with a centroid shift. ``methods`` adds the later text-only methods.
The same comparison runs on the user's stores and test split when ``data`` comes from
:func:`capdec.lab.experiment_data.prepare_user_data` (``capdec experiment compare``: the paper's Table 1).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from capdec.checkpoint import InferenceConfig
from capdec.lab.defaults import METHODS
from capdec.lab.experiment import (
    REPORTED,
    ExperimentConfig,
    ToyData,
    VariantResult,
    entity_words,
    evaluate_checkpoint,
    gap_noise,
    prepare_data,
    pseudo_pairs,
    train_variant,
)
from capdec.metrics import reusing_scorers
from capdec.noise import NoiseConfig
from capdec.utils import write_json

logger = logging.getLogger(__name__)

#: what each run is, for the report
DESCRIPTIONS = {
    "capdec": "text-only, noise-injected text embeddings (CapDec)",
    "no_noise": "text-only, clean text embeddings",
    "supervised": "trained on paired image embeddings (upper bound)",
    "shifted": "no-noise decoder, image embeddings shifted by the text−image centroid difference",
    "projection": "no-noise decoder, image embeddings projected onto the text memory (DeCap, τ=0.01)",
    "capdec_projection": "CapDec decoder + projection onto the text memory",
    "centering": "CapDec noise on mean-centred embeddings; images centred by their mean (C3)",
    "gap": "CapDec with noise shaped like the modality gap (its mean: the image − text centroid difference; its "
           "covariance: of 1,000 unlabelled images minus their 5 nearest training captions, times the gap scale)",
    "gap_projection": "gap-noise decoder + projection onto the text memory",
    "retrieval": "CapDec noise + 5 retrieved captions fused by cross-attention in CLIP space, entity slots (capdec's "
                 "earlier IFCap approximation)",
    "retrieval_projection": "retrieval model + projection of the image embedding before retrieval",
    "ifcap": "IFCap: image-like retrieval of 5 captions, its Fusion Module, entity hard prompts with frequency "
             "filtering (9 retrieved, threshold 5), CapDec noise",
    "gap_ifcap": "IFCap with the gap-shaped noise",
    "gap_pseudo": "gap noise on the training captions + pseudo-pairs: the 1,000 unlabelled images' own embeddings, "
                  "each with its 5 nearest training captions, mixed in by size without noise",
}
#: IFCap's settings (its COCO scripts: k 5, L 9, K 5, mask 0.4); the image-like retrieval variance is 2.5x the
#: training noise's, as IFCap's 0.04 is of its 0.016
IFCAP_MODEL = {"retrieval_k": 5, "retrieval_fusion": "ifcap", "entity_prompt": True, "entity_retrieve": 9,
               "entity_threshold": 5, "entity_mask": 0.4}
COMPARE = ("capdec", "no_noise", "supervised", "shifted")


@reusing_scorers
def run_demo(out_dir: str | Path, *, config: ExperimentConfig | None = None, compare: bool = False,
             methods: Sequence[str] = (), encoder: Any = None, data: ToyData | None = None,
             show_progress: bool | None = None) -> dict[str, Any]:
    """Run the demo; writes ``metrics.json`` and ``report.html`` in ``out_dir`` and returns the metrics.

    ``data``: prepared data to run on instead of the toy world's (``config`` and ``encoder`` are then its own).
    """
    t0 = time.time()
    out_dir = Path(out_dir)
    runs = ["capdec", *(COMPARE[1:] if compare else ()), *methods]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        from capdec.errors import InputError

        raise InputError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
    needs_images = any(r in runs for r in ("shifted", "centering", "gap", "gap_projection", "gap_ifcap", "gap_pseudo"))
    if data is None:
        config = config or ExperimentConfig()
        config = replace(config, n_paired=config.n_paired or (config.n_captions if "supervised" in runs else 0),
                         n_unlabelled=config.n_unlabelled or (1000 if needs_images else 0))
        data = prepare_data(config, out_dir / "data", encoder=encoder, show_progress=show_progress)
    else:
        from capdec.errors import InputError

        config = data.config
        if "supervised" in runs and data.paired_store is None:
            raise InputError("the supervised run needs paired image embeddings: give an image store (--image-store)")
        if needs_images and data.image_mean is None:
            raise InputError("the shifted/centering runs need an image mean: give an image store (--image-store)")
    logger.info("data ready in %.1fs: %d captions, %d test images", data.seconds, len(data.text_store),
                len(data.test_images))

    noise = NoiseConfig(variance=config.noise_variance)
    clean = replace(noise, variance=0.0)
    results: dict[str, VariantResult] = {}
    ckpts: dict[str, tuple[Path, float]] = {}

    def trained(name: str, **kw: Any) -> tuple[Path, float]:
        if name not in ckpts:
            logger.info("training %s (%d steps)", name, config.steps)
            ckpts[name] = train_variant(data, out_dir / "runs" / name, show_progress=show_progress, **kw)
        return ckpts[name]

    def evaluate(name: str, ckpt: tuple[Path, float], **kw: Any) -> None:
        logger.info("captioning and scoring %s", name)
        results[name] = r = evaluate_checkpoint(data, ckpt[0], name, train_seconds=ckpt[1],
                                                show_progress=show_progress, **kw)
        logger.info("%s: CIDEr %.3f ± %.3f, BLEU-4 %.3f", name, r.scores.get("CIDEr") or 0.0, r.se.get("CIDEr", 0.0),
                    r.scores.get("Bleu_4") or 0.0)

    memory_needed = any(r in runs for r in ("projection", "capdec_projection", "retrieval_projection"))
    gap: dict[str, Any] = {}

    def gap_config() -> NoiseConfig:
        if not gap:
            gap["noise"], stats = gap_noise(data)
            gap["calibration"] = {k: stats[k] for k in ("n_pairs", "n_paired_images", "gap_rank", "gap_pairs",
                                                        "gap_source", "gap_shrinkage", "offset_norm", "n_images",
                                                        "n_texts")}
        return gap["noise"]

    def ifcap_model() -> dict[str, Any]:
        return {**IFCAP_MODEL, "entity_vocab": entity_words(config.grammar)}
    for name in runs:
        if name == "capdec":
            evaluate(name, trained("capdec", noise=noise, save_memory=memory_needed), text_to_text=True)
        elif name == "no_noise":
            evaluate(name, trained("no_noise", noise=clean, save_memory=memory_needed), text_to_text=True)
        elif name == "supervised":
            evaluate(name, trained("supervised", noise=clean, supervised=True))
        elif name == "shifted":
            shift = (data.text_mean - data.image_mean).tolist()
            evaluate(name, trained("no_noise", noise=clean, save_memory=memory_needed), inference={"shift": shift})
        elif name == "projection":
            evaluate(name, trained("no_noise", noise=clean, save_memory=True), inference={"project": True})
        elif name == "capdec_projection":
            evaluate(name, trained("capdec", noise=noise, save_memory=True), inference={"project": True})
        elif name == "centering":
            ck = trained("centering", noise=replace(noise, center=True),
                         inference=InferenceConfig(image_mean=data.image_mean.tolist()))
            evaluate(name, ck, text_to_text=True)
        elif name in ("retrieval", "retrieval_projection"):
            ck = trained("retrieval", noise=noise, model={"retrieval_k": 5, "entity_slots": 3,
                                                          "retrieval_fusion": "embedding"})
            evaluate(name, ck, inference={"project": True} if name == "retrieval_projection" else None)
        elif name == "gap":
            evaluate(name, trained("gap", noise=gap_config(), save_memory=True), text_to_text=True)
        elif name == "gap_projection":
            evaluate(name, trained("gap", noise=gap_config(), save_memory=True), inference={"project": True})
        elif name == "gap_pseudo":
            ck = trained(name, noise=gap_config(), stores=[data.text_store, pseudo_pairs(data)])
            evaluate(name, ck, text_to_text=True)
        elif name in ("ifcap", "gap_ifcap"):
            ck = trained(name, noise=gap_config() if name == "gap_ifcap" else noise,
                         model={**ifcap_model(), "retrieval_variance": 2.5 * noise.variance})
            evaluate(name, ck)

    metrics = {
        "results": {name: r.row() for name, r in results.items()},
        "descriptions": {name: DESCRIPTIONS[name] for name in results},
        "noise_variance": config.noise_variance,
        **({"gap_calibration": gap["calibration"]} if gap else {}),
        "clip": _clip_card(data.encoder),
        "encoder": data.encoder.spec,
        "config": config.to_dict(),
        "n_test_images": len(data.test_images),
        "seconds": round(time.time() - t0, 1),
    }
    if data.source.get("kind") != "toy":
        metrics["data"] = data.source
    write_json(out_dir / "metrics.json", metrics)
    _write_predictions(out_dir / "captions.jsonl", data, results)
    _report(out_dir / "report.html", data, results, metrics)
    return metrics


def _clip_card(encoder: Any) -> dict[str, Any]:
    """The mini-CLIP's card (retrieval accuracy and gap statistics), if its weights directory has one."""
    from capdec.encoders.miniclip import shipped_weights_dir
    from capdec.utils import read_artifact_json

    if encoder.spec.get("kind") != "toy":
        return {}
    where = Path(encoder.spec.get("weights") or shipped_weights_dir())
    for name in ("card.json",):
        p = where / name
        if p.is_file():
            card = read_artifact_json(p)
            return card.get("stats", card)
    return {}


def _write_predictions(path: Path, data: Any, results: dict[str, VariantResult]) -> None:
    import json

    files = getattr(data.test_images, "paths", None)  # the user's test images: their files
    with open(path, "w", encoding="utf-8") as f:
        for i, ident in enumerate(data.ids):
            row = {"image": ident, **({"file": files[i]} if files is not None else {}),
                   "references": data.references[i], **{name: r.predictions[i] for name, r in results.items()}}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _report(path: Path, data: Any, results: dict[str, VariantResult], metrics: dict[str, Any]) -> None:
    from capdec.lab.report import metrics_table, write_report

    cfg = data.config
    rows = {name: metrics["results"][name] for name in results}
    columns = [*REPORTED, *(["text_to_text_CIDEr"] if any("text_to_text_CIDEr" in r for r in rows.values()) else [])]
    clip = metrics.get("clip") or {}
    clip_rows = {k: v for k, v in clip.items() if isinstance(v, (int, float))}
    tables = [("Caption quality on held-out images (coco-caption metrics ×1, ± per-image bootstrap SE)",
               metrics_table(rows, columns, descriptions=DESCRIPTIONS))]
    if clip_rows:
        tables.append(("The mini-CLIP (shipped) and its modality gap",
                       metrics_table({k: {"value": v} for k, v in clip_rows.items()}, ["value"], row_header="statistic")))
    toy = data.source.get("kind") == "toy"
    intro = (f"A decoder was trained on <b>{len(data.text_store):,} captions and no images</b> "
             f"({cfg.steps} steps of batch {cfg.batch_size}, noise variance {cfg.noise_variance}), then captioned "
             f"{len(data.test_images)} held-out test images from their {'mini-CLIP' if toy else 'CLIP'} image "
             f"embeddings. Total time {metrics['seconds']:.0f} s.")
    if not toy:
        intro += (f" Training captions: {data.source['store']}; test split: {data.source['test']['path']}"
                  + (f"; supervised baseline: {len(data.paired_store.vectors):,} images of "
                     f"{data.source['image_store']}" if data.paired_store is not None else "") + ".")
    gallery = [{"image": data.test_images[i], "references": data.references[i],
                "captions": {name: r.predictions[i] for name, r in results.items()}}
               for i in range(min(24, len(data.test_images)))]
    title = ("capdec demo: text-only captioning in the toy world" if toy
             else "capdec experiment compare: text-only vs supervised vs no noise")
    write_report(path, title=title, intro=intro, tables=tables,
                 curves=_unique_curves(results),
                 gallery=gallery, footer="metrics: pycocoevalcap (BLEU, METEOR, ROUGE-L, CIDEr); "
                                         "written by capdec demo")


def _unique_curves(results: dict[str, VariantResult]) -> dict[str, list[dict[str, Any]]]:
    """One training curve per trained checkpoint (several runs may decode the same one)."""
    seen: dict[str, str] = {}
    for name, r in results.items():
        if r.train_curve and r.checkpoint not in seen:
            seen[r.checkpoint] = name
    return {name: results[name].train_curve for name in seen.values()}
