"""Style-guided and cross-domain captioning in the toy world (``capdec demo --styles / --cross-domain``).

The paper's two transfer settings, reproduced offline:

- **styles** (FlickrStyle10K): a few thousand styled sentences per style (romantic, humorous) and no
  images. Compared, per style: the factual decoder as it is, a decoder trained on the styled text only,
  and the factual decoder fine-tuned on the styled text (``--init-from``). Scored against *styled*
  references of the test images (BLEU-1, BLEU-3, METEOR, CIDEr) and by a style classifier (the share
  of captions in the target style).
- **cross-domain** (COCO ↔ Flickr30k): decoders trained on one domain's captions caption the other
  domain's images, with and without noise, beside the in-domain scores.

:func:`run_styles` and :func:`run_cross_domain` build the toy world's data and call
:func:`styles_experiment` and :func:`cross_domain_experiment`, which run on any prepared data — the
user's stores and test splits too (``capdec experiment styles / cross-domain``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from capdec.lab.experiment import (
    ExperimentConfig,
    ToyData,
    VariantResult,
    embed_store,
    evaluate_checkpoint,
    prepare_data,
    train_variant,
)
from capdec.metrics import reusing_scorers
from capdec.noise import NoiseConfig
from capdec.utils import write_json

logger = logging.getLogger(__name__)

STYLE_METRICS = ("Bleu_1", "Bleu_3", "METEOR", "CIDEr")
DOMAIN_METRICS = ("CIDEr", "Bleu_4", "METEOR", "ROUGE_L")
STYLE_RUNS = {
    "factual": "decoder trained on the factual corpus only",
    "style_only": "decoder trained on the styled sentences only",
    "finetuned": "factual decoder fine-tuned on the styled sentences (--init-from)",
}


def _row(r: VariantResult, metrics: tuple[str, ...]) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for k in metrics:
        row[k] = r.scores.get(k)
        if k in r.se:
            row[f"{k}_se"] = r.se[k]
    row["train_seconds"] = round(r.train_seconds, 1)
    return row


def _transfer_config(config: ExperimentConfig | None) -> ExperimentConfig:
    """Styled and Flickr-like captions run longer than COCO-like ones: give the decoder room."""
    config = config or ExperimentConfig()
    return replace(config, model={"max_length": 48, **config.model})


@dataclass
class StyleSource:
    """One style: its training sentences, and the test images' references in that style."""

    store: Any  # EmbeddingStore of the styled sentences
    references: list[list[str]]  # per test image
    embeddings: Any = None  # the test images' embeddings (None: the experiment data's test images)
    images: Sequence[Any] | None = None  # the test images for the report (None: the experiment data's)


@reusing_scorers
def run_styles(out_dir: str | Path, *, config: ExperimentConfig | None = None, styles: tuple[str, ...] | None = None,
               n_style: int = 3000, finetune_steps: int | None = None, finetune_lr: float | None = None,
               encoder: Any = None, show_progress: bool | None = None) -> dict[str, Any]:
    """Style table: for each style, factual vs style-only vs factual + fine-tuning. Writes metrics.json, report.html."""
    from capdec.corpus import captions_from_list
    from capdec.lab.toyworld import STYLES, captions, corpus, sample_scenes
    from capdec.lab.toyworld.styles import train_style_classifier

    t0 = time.time()
    out_dir = Path(out_dir)
    config = _transfer_config(config)
    styles = tuple(styles or STYLES)
    data = prepare_data(config, out_dir / "data", encoder=encoder, show_progress=show_progress)
    encoder = data.encoder
    test_scenes = sample_scenes(config.n_test, config.seed, "test")
    classifier = train_style_classifier(seed=config.seed, styles=styles)
    sources = {}
    for style in styles:
        texts = list(corpus(n_style, seed=config.seed, split="train", grammar=style))
        store = embed_store(out_dir / "data" / f"{style}_store", captions_from_list(texts), encoder.encode_text,
                            encoder)
        # the test images' references, in this style (the scenes of test_set; no need to render them again)
        sources[style] = StyleSource(store, [captions(scene, 5, seed=config.seed, grammar=style)
                                             for scene in test_scenes])
    return styles_experiment(out_dir, data, sources, classifier, finetune_steps=finetune_steps,
                             finetune_lr=finetune_lr, show_progress=show_progress, t0=t0)


@reusing_scorers
def styles_experiment(out_dir: str | Path, data: ToyData, sources: dict[str, StyleSource], classifier: Any, *,
                      finetune_steps: int | None = None, finetune_lr: float | None = None,
                      show_progress: bool | None = None, t0: float | None = None) -> dict[str, Any]:
    """Per style: the factual decoder, a style-only decoder, and the factual one fine-tuned on the style
    (``--init-from``), scored against the style's references and by ``classifier`` (``accuracy(texts,
    style)``). Writes metrics.json and report.html in ``out_dir``; returns the metrics."""
    t0 = time.time() if t0 is None else t0
    out_dir = Path(out_dir)
    config = data.config
    finetune_steps = finetune_steps or max(1, config.steps // 2)
    finetune_lr = finetune_lr or config.lr / 2
    noise = NoiseConfig(variance=config.noise_variance)
    logger.info("training the factual decoder (%d captions, %d steps)", len(data.text_store), config.steps)
    factual = train_variant(data, out_dir / "runs" / "factual", noise=noise, show_progress=show_progress)

    results: dict[str, dict[str, Any]] = {}
    style_refs: dict[str, list[list[str]]] = {}
    predictions: dict[str, dict[str, list[str]]] = {}
    classifier_check: dict[str, float] = {}
    for style, source in sources.items():
        store, refs = source.store, source.references
        style_refs[style] = refs
        classifier_check[style] = classifier.accuracy([r for rs in refs for r in rs], style)
        logger.info("%s: training on %d styled sentences only (%d steps)", style, len(store), config.steps)
        only = train_variant(data, out_dir / "runs" / f"{style}_only", noise=noise, stores=[store],
                             show_progress=show_progress)
        logger.info("%s: fine-tuning the factual decoder (%d steps)", style, finetune_steps)
        tuned = train_variant(data, out_dir / "runs" / f"{style}_finetuned", noise=noise, stores=[store],
                              init_from=factual[0], steps=finetune_steps, lr=finetune_lr, show_progress=show_progress)
        results[style], predictions[style] = {}, {}
        for name, ck in (("factual", factual), ("style_only", only), ("finetuned", tuned)):
            r = evaluate_checkpoint(data, ck[0], name, train_seconds=ck[1], references=refs,
                                    embeddings=source.embeddings, show_progress=show_progress)
            acc = classifier.accuracy(r.predictions, style)
            row = _row(r, STYLE_METRICS)
            row["style_accuracy"] = round(acc, 4)
            row["style_accuracy_se"] = round(math.sqrt(acc * (1 - acc) / len(r.predictions)), 4)
            results[style][name] = row
            predictions[style][name] = r.predictions
            logger.info("%s / %s: CIDEr %.3f, style accuracy %.3f", style, name, row["CIDEr"] or 0.0, acc)

    metrics = {
        "results": results,
        "descriptions": STYLE_RUNS,
        "style_sentences": (len(next(iter(sources.values())).store) if data.source.get("kind") == "toy"
                            else {style: len(s.store) for style, s in sources.items()}),
        "finetune_steps": finetune_steps,
        "finetune_lr": finetune_lr,
        "classifier_accuracy_on_styled_references": classifier_check,
        "noise_variance": config.noise_variance,
        "encoder": data.encoder.spec,
        "config": config.to_dict(),
        "n_test_images": (len(data.test_images) if data.source.get("kind") == "toy"
                          else {style: len(s.references) for style, s in sources.items()}),
        "seconds": round(time.time() - t0, 1),
    }
    if data.source.get("kind") != "toy":
        metrics["data"] = {**data.source, "styles": {style: getattr(s.store, "path", None) and str(s.store.path)
                                                     for style, s in sources.items()}}
    write_json(out_dir / "metrics.json", metrics)
    _styles_report(out_dir / "report.html", data, metrics, predictions, style_refs, sources)
    return metrics


@reusing_scorers
def run_cross_domain(out_dir: str | Path, *, config: ExperimentConfig | None = None,
                     domains: tuple[str, ...] = ("coco", "flickr"), encoder: Any = None,
                     show_progress: bool | None = None) -> dict[str, Any]:
    """Cross-domain table: train on each domain's captions (with and without noise), test on every domain."""
    from capdec.lab.toyworld.styles import get_domain

    t0 = time.time()
    out_dir = Path(out_dir)
    config = _transfer_config(config)
    datas = {}
    for name in domains:
        d = get_domain(name)
        datas[name] = prepare_data(replace(config, grammar=d.grammar, world=d.world, test_grammar=None, test_world=None),
                                   out_dir / "data" / name, encoder=encoder, show_progress=show_progress)
        encoder = datas[name].encoder
    return cross_domain_experiment(out_dir, datas, config=config, show_progress=show_progress, t0=t0)


@reusing_scorers
def cross_domain_experiment(out_dir: str | Path, datas: dict[str, ToyData], *, config: ExperimentConfig | None = None,
                            show_progress: bool | None = None, t0: float | None = None) -> dict[str, Any]:
    """Train on each domain's captions (with and without noise) and caption every domain's test images.

    ``datas``: domain name -> its prepared data (training store + test images); ``config`` (default: the
    first domain's) gives the noise variance recorded. Writes metrics.json and report.html in ``out_dir``.
    """
    t0 = time.time() if t0 is None else t0
    out_dir = Path(out_dir)
    domains = tuple(datas)
    config = config or next(iter(datas.values())).config
    encoder = next(iter(datas.values())).encoder
    noise = NoiseConfig(variance=config.noise_variance)
    variants = {"noise": noise, "no_noise": replace(noise, variance=0.0)}
    results: dict[str, dict[str, Any]] = {}
    predictions: dict[str, list[str]] = {}
    for train_d in domains:
        for vname, nz in variants.items():
            logger.info("training on %s captions, %s", train_d, vname)
            ck = train_variant(datas[train_d], out_dir / "runs" / f"{train_d}_{vname}", noise=nz,
                               show_progress=show_progress)
            for test_d in domains:
                key = f"{train_d}→{test_d} {vname}"
                r = evaluate_checkpoint(datas[test_d], ck[0], key, train_seconds=ck[1], show_progress=show_progress)
                results[key] = {"train": train_d, "test": test_d, "noise": nz.variance, **_row(r, DOMAIN_METRICS)}
                predictions[key] = r.predictions
                logger.info("%s: CIDEr %.3f", key, r.scores.get("CIDEr") or 0.0)

    metrics = {
        "results": results,
        "domains": {name: _domain_stats(datas[name]) for name in domains},
        "noise_variance": config.noise_variance,
        "encoder": encoder.spec,
        "config": config.to_dict(),
        "n_test_images": {name: len(datas[name].test_images) for name in domains},
        "seconds": round(time.time() - t0, 1),
    }
    if next(iter(datas.values())).source.get("kind") != "toy":
        metrics["data"] = {name: d.source for name, d in datas.items()}
    write_json(out_dir / "metrics.json", metrics)
    _domains_report(out_dir / "report.html", datas, metrics, predictions)
    return metrics


def _domain_stats(data: Any) -> dict[str, Any]:
    from capdec.lab.toyworld import get_world, tokenize_words

    if data.source.get("kind") != "toy":
        from capdec.corpus_tools import corpus_stats

        s = corpus_stats(data.text_store.captions, top=1)
        return {"store": data.source["store"], "captions": s["captions"], "mean_caption_words": s["mean_words"],
                "vocabulary": s["vocabulary"], "test": data.source["test"]["path"], "test_images": len(data.ids)}
    caps = data.text_store.captions
    words = [tokenize_words(c) for c in caps]
    world = get_world(data.config.world)
    counts = world.count_weights
    return {"grammar": data.config.grammar, "world": data.config.world,
            "mean_caption_words": round(sum(map(len, words)) / max(1, len(words)), 2),
            "vocabulary": len({w for ws in words for w in ws}),
            "mean_objects_per_scene": round(sum((i + 1) * w for i, w in enumerate(counts)) / sum(counts), 2),
            "backgrounds": list(world.backgrounds)}


# -- reports --------------------------------------------------------------------------------------
def _styles_report(path: Path, data: Any, metrics: dict[str, Any], predictions: dict[str, dict[str, list[str]]],
                   style_refs: dict[str, list[list[str]]], sources: dict[str, StyleSource]) -> None:
    from capdec.lab.report import metrics_table, write_report

    cols = [*STYLE_METRICS, "style_accuracy"]
    tables = [(f"Style “{style}” — scored against {style} references (×1, ± per-image bootstrap SE; style accuracy "
               f"± binomial SE)", metrics_table(rows, cols, descriptions=STYLE_RUNS))
              for style, rows in metrics["results"].items()]
    check = metrics["classifier_accuracy_on_styled_references"]
    trained_on = "val-split captions" if data.source.get("kind") == "toy" else "the factual and styled corpora"
    tables.append((f"The style classifier (naive Bayes on word uni/bigrams, trained on {trained_on})",
                   metrics_table({s: {"accuracy on the styled references": a} for s, a in check.items()},
                                 ["accuracy on the styled references"], row_header="style")))
    toy = data.source.get("kind") == "toy"
    styled = (f"{metrics['style_sentences']:,} styled sentences per style" if toy else
              "styled sentences (" + ", ".join(f"{s}: {n:,}" for s, n in metrics["style_sentences"].items()) + ")")
    tests = (f"{len(data.test_images)} held-out test images" if toy else
             "test images with styled references (" + ", ".join(f"{s}: {n:,}" for s, n in
                                                                metrics["n_test_images"].items()) + ")")
    intro = (f"Text only: {len(data.text_store):,} factual captions and {styled}, no images. Factual and style-only "
             f"decoders: {data.config.steps} steps; fine-tuning: "
             f"{metrics['finetune_steps']} steps from the factual checkpoint at lr {metrics['finetune_lr']}. Noise "
             f"variance {metrics['noise_variance']}. {tests}. Total "
             f"{metrics['seconds']:.0f} s.")
    gallery = []
    if not toy:  # each style has its own test images
        for style, source in sources.items():
            images = source.images if source.images is not None else data.test_images
            for i in range(min(8, len(images))):
                gallery.append({"image": images[i], "references": style_refs[style][i][:2],
                                "captions": {f"{style}/{run}": p[i] for run, p in predictions[style].items()}})
        write_report(path, title="capdec experiment styles: style-guided captioning from text alone", intro=intro,
                     tables=tables, gallery=gallery, footer="references shown: the style's own")
        return
    for i in range(min(16, len(data.test_images))):
        caps = {f"{style}/{run}": predictions[style][run][i] for style in predictions for run in predictions[style]
                if run != "factual"}
        caps = {"factual": next(iter(predictions.values()))["factual"][i], **caps}
        refs = [data.references[i][0], *(style_refs[s][i][0] for s in style_refs)]
        gallery.append({"image": data.test_images[i], "captions": caps, "references": refs})
    write_report(path, title="capdec demo --styles: style-guided captioning from text alone", intro=intro,
                 tables=tables, gallery=gallery, footer="references shown: one factual, then one per style")


def _domains_report(path: Path, datas: dict[str, Any], metrics: dict[str, Any],
                    predictions: dict[str, list[str]]) -> None:
    from capdec.lab.report import metrics_table, write_report

    results = metrics["results"]
    summary = {}
    for key, row in results.items():
        if row["noise"] == 0:
            continue
        base = results[key.replace(" noise", " no_noise")]
        summary[key.split(" ")[0]] = {"CIDEr no noise": base["CIDEr"], "CIDEr no noise_se": base.get("CIDEr_se"),
                                      "CIDEr with noise": row["CIDEr"], "CIDEr with noise_se": row.get("CIDEr_se"),
                                      "gain": round(row["CIDEr"] - base["CIDEr"], 4)}
    first = next(iter(datas.values()))
    toy = first.source.get("kind") == "toy"
    domain_cols = (["grammar", "world", "mean_caption_words", "vocabulary", "mean_objects_per_scene"] if toy else
                   ["store", "captions", "mean_caption_words", "vocabulary", "test", "test_images"])
    tables = [("CIDEr, train domain → test domain", metrics_table(summary, ["CIDEr no noise", "CIDEr with noise",
                                                                             "gain"], row_header="train → test")),
              ("All scores (×1, ± per-image bootstrap SE)", metrics_table(results, list(DOMAIN_METRICS))),
              ("The domains", metrics_table(metrics["domains"], domain_cols, row_header="domain"))]
    intro = (f"Each decoder is trained on one domain's {len(first.text_store):,} captions (no images), "
             f"{first.config.steps} steps, with noise variance {metrics['noise_variance']} or none, and captions "
             f"every domain's {len(first.test_images)} held-out test images. Total {metrics['seconds']:.0f} s.")
    gallery = []
    for test_d, data in datas.items():
        for i in range(min(8, len(data.test_images))):
            caps = {k.replace(f"→{test_d}", ""): v[i] for k, v in predictions.items() if f"→{test_d} " in k}
            gallery.append({"image": data.test_images[i], "captions": caps, "references": data.references[i][:3]})
    title = ("capdec demo --cross-domain: COCO-like ↔ Flickr-like in the toy world" if toy else
             "capdec experiment cross-domain: " + " ↔ ".join(datas))
    write_report(path, title=title, intro=intro,
                 tables=tables, gallery=gallery, footer="gallery: test images of each domain, captioned by every "
                                                        "decoder (label: training domain and noise)")
