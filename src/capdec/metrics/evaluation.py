"""evaluate(): match predictions to references, tokenise once, run the scorers, report what was not scored."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import capdec.metrics.scorers as S
from capdec.errors import CapdecError, InputError
from capdec.images import ImageId, basename, image_key
from capdec.io.predictions import Prediction
from capdec.io.references import ReferenceSet
from capdec.metrics.scorers import ScorerContext

logger = logging.getLogger(__name__)


#: every metric this module reports, in coco-caption's spelling and order

# scorer group -> the metrics it reports (BLEU-1..4 come from one scorer)

# every character the Java PTB tokenizer (or Python) treats as a line break; see module docstring
_MAX_EXAMPLES = 10


# ---------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------
@dataclass
class MatchReport:
    """Which images were scored and which were not (lists hold ids, in input order)."""

    n_predictions: int  # predictions given (after dropping null captions)
    n_references: int  # images with references given
    n_scored: int  # images with both, the ones scored
    predictions_without_references: list[ImageId] = field(default_factory=list)
    references_without_predictions: list[ImageId] = field(default_factory=list)
    empty_predictions: list[ImageId] = field(default_factory=list)  # scored, as an empty caption
    empty_references: list[ImageId] = field(default_factory=list)  # images with an empty reference
    null_predictions: list[str] = field(default_factory=list)  # "file:line" of caption null (CLI)

    @property
    def complete(self) -> bool:
        """True when every prediction and every reference image took part."""
        return not (self.predictions_without_references or self.references_without_predictions
                    or self.null_predictions)

    def to_dict(self, max_examples: int = _MAX_EXAMPLES) -> dict[str, Any]:
        def entry(ids: list) -> dict[str, Any]:
            return {"count": len(ids), "examples": list(ids[:max_examples])}
        return {
            "n_predictions": self.n_predictions, "n_references": self.n_references,
            "n_scored": self.n_scored,
            "predictions_without_references": entry(self.predictions_without_references),
            "references_without_predictions": entry(self.references_without_predictions),
            "empty_predictions": entry(self.empty_predictions),
            "empty_references": entry(self.empty_references),
            "null_predictions": entry(self.null_predictions),
        }


@dataclass
class EvalResult:
    """What :func:`evaluate` returns.

    ``scores`` maps each requested metric to its corpus score (``None`` when unavailable, with the
    reason in ``unavailable``); ``per_image`` maps metric -> image id -> score when asked for.
    """

    scores: dict[str, float | None]
    per_image: dict[str, dict[ImageId, float]]
    unavailable: dict[str, str]
    missing: MatchReport
    tokenizer: str  # "ptb" (coco-caption's) or "simple" (Python fallback, approximate)
    n_images: int  # images scored
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """The metrics JSON: metric names at the top level (coco-caption's), then the details."""
        return {**self.scores, "unavailable": dict(self.unavailable), "n_images": self.n_images,
                "tokenizer": self.tokenizer, "missing": self.missing.to_dict()}


# ---------------------------------------------------------------------------------------------
# ids and readers
# ---------------------------------------------------------------------------------------------


def align_predictions(predictions: Iterable[Prediction], references: ReferenceSet,
                      ) -> tuple[dict[ImageId, str], dict[ImageId, str | None], list[str]]:
    """Key predictions by their reference's id (the rule is in the module docstring).

    Returns ``(captions, image_paths, null_predictions)``: captions by id (predictions that match no
    reference keep their own :func:`image_key`, so :func:`evaluate` reports them), the image path a
    prediction named (``None`` for ``image_id`` predictions), and ``file:line`` of null captions.
    """
    aliases = references.alias_table()
    numbers = references.number_table()
    captions: dict[ImageId, str] = {}
    paths: dict[ImageId, str | None] = {}
    seen: dict[ImageId, str] = {}
    nulls: list[str] = []
    for p in predictions:
        if p.image_id is not None:
            key = p.image_id
            if key not in references.captions and key in numbers:
                key = numbers[key]
        else:
            base = basename(p.image)  # type: ignore[arg-type]
            key = aliases[base] if base in aliases else image_key(p.image)  # type: ignore[arg-type]
        if key in seen:
            raise InputError(f"{p.where}: a second prediction for image {key!r} (first at {seen[key]})")
        seen[key] = p.where
        if p.caption is None:
            nulls.append(p.where)
            continue
        captions[key] = p.caption
        paths[key] = p.image
    return captions, paths, nulls


# ---------------------------------------------------------------------------------------------
# tokenisation
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# scorers
# ---------------------------------------------------------------------------------------------


def _check_inputs(predictions: Mapping[Any, Any], references: Mapping[Any, Any]) -> None:
    for image_id, cap in predictions.items():
        if not isinstance(cap, str):
            raise InputError(f"the prediction for image {image_id!r} is not a string: {cap!r}")
    for image_id, caps in references.items():
        if isinstance(caps, str) or not isinstance(caps, (list, tuple)) \
                or not all(isinstance(c, str) for c in caps):
            raise InputError(f"the references of image {image_id!r} must be a list of strings")
        if not caps:
            raise InputError(f"image {image_id!r} has an empty list of references")


def match_report(predictions: Mapping[ImageId, str], references: Mapping[ImageId, Sequence[str]]) -> MatchReport:
    """Count which ids have both a prediction and references (and empty captions)."""
    scored = [i for i in references if i in predictions]
    return MatchReport(
        n_predictions=len(predictions), n_references=len(references), n_scored=len(scored),
        predictions_without_references=[i for i in predictions if i not in references],
        references_without_predictions=[i for i in references if i not in predictions],
        empty_predictions=[i for i in scored if not predictions[i].strip()],
        empty_references=[i for i in scored if any(not c.strip() for c in references[i])],
    )


def _warn_mismatch(report: MatchReport) -> None:
    def ex(ids: list) -> str:
        more = f", ... ({len(ids)} in all)" if len(ids) > 5 else ""
        return ", ".join(map(repr, ids[:5])) + more

    for ids, what in ((report.predictions_without_references, "predictions have no references and were not scored"),
                      (report.references_without_predictions,
                       "reference images have no prediction and were not scored"),
                      (report.empty_predictions, "predictions are empty strings (scored as empty captions)"),
                      (report.empty_references, "images have an empty reference caption")):
        if ids:
            logger.warning("%d %s: %s", len(ids), what, ex(ids))


def evaluate(predictions: Mapping[ImageId, str], references: Mapping[ImageId, Sequence[str]], *,
             metrics: str | Sequence[str] | None = None, per_image: bool = False, strict: bool = False,
             tokenizer: str = "auto", scorers: ScorerContext | None = None) -> EvalResult:
    """coco-caption metrics of ``predictions`` (id -> caption) against ``references`` (id -> captions).

    Images with both are scored, in the references' order; the rest are reported in
    ``result.missing`` (``strict=True``: an :class:`InputError`). ``metrics``: names or groups
    (default: all of :data:`METRICS`; naming any BLEU gives all four). ``tokenizer``: ``"auto"``
    (PTB when Java exists, else the simple fallback), ``"ptb"`` or ``"simple"``. ``per_image=True``
    fills ``result.per_image`` (metric -> id -> score), e.g. for :func:`bootstrap_se`. ``scorers``: a
    :class:`~capdec.metrics.scorers.ScorerContext` whose METEOR JVM to reuse (default: the one
    :func:`~capdec.metrics.keep_scorers_open` opened, else a JVM for this call only).
    """
    S._require_pycocoevalcap()
    context = scorers if scorers is not None else S.active_context()
    start = time.perf_counter()
    groups = S.resolve_metrics(metrics)
    report, ids = _matched_ids(predictions, references, strict=strict)
    java = S._java()
    tok_kind = _tokenizer_kind(tokenizer)
    if "cider" in groups and len(ids) < 10:
        logger.warning("CIDEr weighs n-grams by IDF over the references of the images scored; with %d "
                       "images that is unreliable (with 1, every IDF is 0 and so is CIDEr)", len(ids))

    unavailable: dict[str, str] = {}  # metric -> why it could not run
    meteor = _start_meteor(groups, java, context, unavailable)  # its JVM loads while Python tokenises
    try:
        # one tokenizer run: keys 0..n-1 are the references, n..2n-1 the predictions
        n = len(ids)
        both = {k: list(references[i]) for k, i in enumerate(ids)}
        both.update({n + k: [predictions[i]] for k, i in enumerate(ids)})
        with S._timed(f"tokenising {sum(map(len, both.values()))} captions ({tok_kind})"):
            tokens = S._tokenize(both, tok_kind)
        gts = {k: tokens[k] for k in range(n)}
        res = {k: tokens[n + k] for k in range(n)}
        raw = _run_scorers(groups, gts, res, meteor=meteor, context=context, unavailable=unavailable)
    finally:
        if meteor is not None and not (context is not None and context.owns(meteor)):
            meteor.close()
    scores, per = _collect_scores(groups, raw, ids, per_image=per_image)
    seconds = time.perf_counter() - start
    logger.info("scored %d images in %.1fs", n, seconds)
    return EvalResult(scores=scores, per_image=per, unavailable=unavailable, missing=report,
                      tokenizer=tok_kind, n_images=n, seconds=seconds)


def _matched_ids(predictions: Mapping[ImageId, str], references: Mapping[ImageId, Sequence[str]], *,
                 strict: bool) -> tuple[MatchReport, list[ImageId]]:
    """The ids with both a prediction and references (in the references' order), and the mismatch report."""
    _check_inputs(predictions, references)
    report = match_report(predictions, references)
    _warn_mismatch(report)
    if strict and not report.complete:
        raise InputError(
            f"predictions and references do not match (strict): "
            f"{len(report.predictions_without_references)} predictions without references "
            f"(e.g. {report.predictions_without_references[:3]}), "
            f"{len(report.references_without_predictions)} references without predictions "
            f"(e.g. {report.references_without_predictions[:3]})")
    ids = [i for i in references if i in predictions]
    if not ids:
        raise InputError(
            f"no prediction matches a reference image ({len(predictions)} predictions, e.g. "
            f"{list(predictions)[:3]}; {len(references)} references, e.g. {list(references)[:3]}); "
            f"ids come from image_id fields or file names (see capdec.images.image_key)")
    return report, ids


def _tokenizer_kind(tokenizer: str) -> str:
    """``"ptb"`` or ``"simple"`` for the asked ``tokenizer`` (auto: PTB when it can run, else loudly the fallback)."""
    if tokenizer not in ("auto", "ptb", "simple"):
        raise InputError(f"unknown tokenizer {tokenizer!r}; use auto, ptb or simple")
    if tokenizer == "simple":
        logger.warning("tokenising with the Python fallback (--tokenizer simple): scores approximate coco-caption's")
        return "simple"
    missing = S.ptb_unavailable()
    if missing is None:
        return "ptb"
    if tokenizer == "ptb":
        raise CapdecError(f"the PTB tokenizer needs Java and its jar: {missing}. Install a JRE (java on PATH), or "
                          "use the approximate tokenizer (--tokenizer simple)")
    logger.warning("coco-caption's PTB tokenizer cannot run: %s. Tokenising with a Python approximation instead; "
                   "these scores are NOT comparable with published coco-caption numbers. Install Java, or pass "
                   "--tokenizer ptb to make this an error", missing)
    return "simple"


def _start_meteor(groups: Sequence[str], java: str | None, context: ScorerContext | None,
                  unavailable: dict[str, str]) -> Any:
    """The METEOR scorer to use (None: not asked, or no Java: noted in ``unavailable``); the caller closes
    one it owns. Also notes whether SPICE can run."""
    meteor = None
    if "meteor" in groups:
        if java is None:
            unavailable["METEOR"] = "Java is not installed (no 'java' on PATH); METEOR runs in the JVM"
        elif context is not None:  # one JVM for all calls in the context
            meteor = context.meteor()
        else:  # the JVM loads its paraphrase table (~10 s) while Python tokenises and scores
            meteor = S._open_meteor()
    spice_reason = S.spice_unavailable_reason() if "spice" in groups else None
    if spice_reason:
        unavailable["SPICE"] = spice_reason
    return meteor


def _run_scorers(groups: Sequence[str], gts: dict[int, Any], res: dict[int, Any], *, meteor: Any,
                 context: ScorerContext | None, unavailable: dict[str, str]) -> dict[str, tuple[Any, Any]]:
    """Each metric group's raw ``(corpus score, per-image scores)``; a scorer that fails is noted in
    ``unavailable`` and the others still run."""
    raw: dict[str, tuple[Any, Any]] = {}
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="capdec-spice")
    spice_future = None
    try:
        if "spice" in groups and "SPICE" not in unavailable:  # a separate JVM; no GIL traffic
            spice_future = pool.submit(S._run_spice, gts, res)
        if "bleu" in groups:
            from pycocoevalcap.bleu.bleu import Bleu
            with S._timed("BLEU"):
                raw["bleu"] = Bleu(4).compute_score(gts, res, verbose=0)
        if "rouge" in groups:
            from pycocoevalcap.rouge.rouge import Rouge
            with S._timed("ROUGE_L"):
                raw["rouge"] = Rouge().compute_score(gts, res)
        if "cider" in groups:
            from pycocoevalcap.cider.cider import Cider
            with S._timed("CIDEr"):
                raw["cider"] = Cider().compute_score(gts, res)
        # METEOR last and in this thread: it makes one pipe round trip per image, and from a second
        # thread each would wait for the GIL behind the Python scorers (many times slower)
        if meteor is not None:
            try:
                with S._timed("METEOR"):
                    raw["meteor"] = meteor.compute_score(gts, res)
            except Exception as e:  # the JVM died or refused: report it, keep the rest
                logger.warning("METEOR failed: %s", e, exc_info=logger.isEnabledFor(logging.DEBUG))
                unavailable["METEOR"] = f"METEOR failed: {type(e).__name__}: {e}"
                if context is not None and context.owns(meteor):  # no broken JVM for the next call
                    context.discard(meteor)
        if spice_future is not None:
            try:
                with S._timed("waiting for SPICE"):
                    raw["spice"] = spice_future.result()
            except Exception as e:
                logger.warning("SPICE failed: %s", e, exc_info=logger.isEnabledFor(logging.DEBUG))
                unavailable["SPICE"] = f"SPICE failed: {type(e).__name__}: {e}"
    finally:
        pool.shutdown(wait=True)
    return raw


def _collect_scores(groups: Sequence[str], raw: dict[str, tuple[Any, Any]], ids: list[ImageId], *,
                    per_image: bool) -> tuple[dict[str, float | None], dict[str, dict[ImageId, float]]]:
    """Metric name -> corpus score (None: not computed), and with ``per_image`` metric -> id -> score."""
    scores: dict[str, float | None] = {}
    per: dict[str, dict[ImageId, float]] = {}
    for group in groups:
        names = S._GROUPS[group]
        if group not in raw:
            scores.update(dict.fromkeys(names, None))
            continue
        corpus, each = raw[group]
        pairs = list(zip(names, corpus, each)) if group == "bleu" else [(names[0], corpus, each)]
        for name, value, values in pairs:
            scores[name] = float(value)
            if per_image:
                per[name] = {i: float(v) for i, v in zip(ids, values)}
    return scores, per


# ---------------------------------------------------------------------------------------------
# CLIPScore (Hessel et al., 2021)
# ---------------------------------------------------------------------------------------------


