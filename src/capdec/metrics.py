"""Caption metrics: coco-caption's BLEU-1..4, METEOR, ROUGE-L, CIDEr (and SPICE), plus CLIPScore.

The n-gram metrics are *pycocoevalcap 1.2's own scorers* fed by its PTB tokenizer's jar; nothing here
re-implements their maths, so the numbers equal what the coco-caption toolkit reports (names and
scale too: ``Bleu_1``..``Bleu_4``, ``METEOR``, ``ROUGE_L``, ``CIDEr``, ``SPICE``; ×1, not ×100).
What this module adds around them:

- **One tokenizer run.** Predictions and references go through the Java PTB tokenizer in one call
  (``COCOEvalCap.evaluate`` runs it twice; each line is tokenised on its own, so the tokens are the
  same). Characters Java treats as line breaks (``\\r``, ``\\v``, ``\\f``, U+2028/2029, ...) are
  replaced by spaces first: pycocoevalcap only replaces ``\\n``, and any other break shifts every
  later caption onto the wrong image.
  The tokenizer's input file goes to the temp directory (pycocoevalcap writes it next to its
  jar, which fails where site-packages is read-only); the command line and punctuation removal are its.
- **Image order.** Images are scored in the references' order (the ``images`` list of a COCO
  annotation file), as ``COCOEvalCap`` does; that fixes the floating-point summation order, so the
  corpus scores are bit-identical to coco-caption's.
- **METEOR** starts its JVM (≈10 s to load the paraphrase table) before tokenising and scores in a
  thread while BLEU/ROUGE/CIDEr run in Python; its process is always closed.
- **SPICE** needs Stanford CoreNLP jars that pycocoevalcap downloads on first use, and
  ``COCOEvalCap.evaluate`` fails entirely without them. We never download: without the jars (or
  Java) ``SPICE`` is ``None`` and ``unavailable["SPICE"]`` says why; the other metrics still come.
- **No Java** (``shutil.which("java")`` is None): METEOR and SPICE are unavailable, and the
  tokenizer falls back to :func:`simple_tokenize`, a regex approximation of PTB tokenisation (scores
  then differ slightly from coco-caption's; ``EvalResult.tokenizer`` says ``"simple"``). Pass
  ``tokenizer="ptb"`` to make a missing Java an error instead.
- **Empty predictions** are scored as they are (every scorer gives them 0) and reported in
  ``EvalResult.missing.empty_predictions``: a captioner that says nothing should lose points, not
  crash the evaluation.

Image ids and matching (``read_predictions``/``read_references`` and the CLI)
-----------------------------------------------------------------------------
Every image gets one id by :func:`capdec.images.image_key`: an integer ``image_id`` stays an int; a file name or
path whose stem is a COCO-style number (``COCO_val2014_000000000257.jpg`` → 257,
``000000000785.jpg`` → 785, ``1000092795.jpg`` → 1000092795) becomes that int; any other path becomes
its file name (``photos/dog.jpg`` → ``"dog.jpg"``). A prediction that names an image *path* is matched
to a reference by file name first (the ``file_name`` of a COCO annotation image, or the reference's
own path), then by the id its name gives. A prediction with an ``image_id`` matches that id, or
else the reference whose file name ends in ``_<that number>`` (``capdec caption --format coco``
numbers images that way when it has no id map).
Predictions without references and references without predictions are scored out, counted and
logged (``EvalResult.missing``); ``strict=True`` makes them an error.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from capdec.errors import CapdecError, InputError
from capdec.formats import (  # noqa: F401  (the readers, re-exported: capdec.metrics.read_references etc.)
    Prediction,
    ReferenceSet,
    load_predictions,
    load_references,
    read_predictions,
    read_references,
)
from capdec.images import ImageId, basename, image_key  # noqa: F401  (image_key re-exported)

logger = logging.getLogger(__name__)


#: every metric this module reports, in coco-caption's spelling and order
METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
CLIP_METRICS = ("CLIPScore", "RefCLIPScore")

# scorer group -> the metrics it reports (BLEU-1..4 come from one scorer)
_GROUPS: dict[str, tuple[str, ...]] = {
    "bleu": ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"),
    "meteor": ("METEOR",),
    "rouge": ("ROUGE_L",),
    "cider": ("CIDEr",),
    "spice": ("SPICE",),
}
_ALIASES = {"bleu": "bleu", "bleu_1": "bleu", "bleu_2": "bleu", "bleu_3": "bleu", "bleu_4": "bleu",
            "meteor": "meteor", "rouge": "rouge", "rouge_l": "rouge", "rougel": "rouge",
            "cider": "cider", "cider-d": "cider", "spice": "spice"}

# every character the Java PTB tokenizer (or Python) treats as a line break; see module docstring
_LINE_BREAKS = re.compile("[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")
_SPICE_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
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
def _java() -> str | None:
    return shutil.which("java")


def simple_tokenize(caption: str) -> str:
    """Fallback when Java is missing: lower-case, PTB-like word splitting, punctuation dropped.

    Approximates ``PTBTokenizer`` (it splits clitics such as ``n't``/``'s`` and drops the same
    punctuation); scores computed with it are close to, but not exactly, coco-caption's.
    """
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS

    text = re.sub(r"(\w)(n't)\b", r"\1 \2", _LINE_BREAKS.sub(" ", caption).lower())
    tokens = re.findall(r"n't|'\w+|\w+(?:[-./&]\w+)*|[^\w\s]+", text)
    drop = set(PUNCTUATIONS) | {'"', "(", ")", "{", "}"}
    return " ".join(t for t in tokens if t not in drop)


_PTB_CLASS = "edu.stanford.nlp.process.PTBTokenizer"


def _tokenize_ptb(captions: dict[int, list[str]]) -> dict[int, list[str]]:
    """coco-caption's PTB tokenisation over every caption in one Java run.

    The same jar, command line (``-preserveLines -lowerCase``) and punctuation removal as
    pycocoevalcap 1.2's ``PTBTokenizer`` (the parity tests compare the two), with one difference:
    its input file goes to the temp directory, where ``PTBTokenizer`` writes it next to its jar and
    fails wherever site-packages is read-only (system, conda or container installs). Java's stderr
    (a progress line, per-character warnings) is logged at DEBUG, not shown on the terminal.
    """
    from pycocoevalcap.tokenizer import ptbtokenizer as ptb

    jar = Path(ptb.__file__).resolve().parent / ptb.STANFORD_CORENLP_3_4_1_JAR
    keys = [k for k, caps in captions.items() for _ in caps]
    text = "\n".join(_LINE_BREAKS.sub(" ", c) for caps in captions.values() for c in caps)
    with tempfile.TemporaryDirectory(prefix="capdec-ptb-") as tmp:
        path = Path(tmp) / "captions.txt"
        path.write_bytes(text.encode())
        cmd = [_java() or "java", "-cp", str(jar), _PTB_CLASS, "-preserveLines", "-lowerCase", str(path)]
        proc = subprocess.run(cmd, capture_output=True, check=False)
    messages = proc.stderr.decode("utf-8", "replace").strip()
    if messages:
        logger.debug("PTB tokenizer (java) said:\n%s", messages)
    lines = proc.stdout.decode().split("\n")
    if proc.returncode != 0 or len(lines) < len(keys) or any(line.strip() for line in lines[len(keys):]):
        # Java failed or split a line: refuse rather than score captions against the wrong images
        raise CapdecError(f"the PTB tokenizer (java, {jar}) returned {len(lines)} lines for {len(keys)} "
                          f"captions (exit status {proc.returncode}); check that 'java -version' works. "
                          f"Java said: {messages[-1000:] or '(nothing)'}")
    drop = set(ptb.PUNCTUATIONS)
    out: dict[int, list[str]] = {k: [] for k in captions}
    for k, line in zip(keys, lines):
        out[k].append(" ".join(w for w in line.rstrip().split(" ") if w not in drop))
    return out


def _tokenize(captions: dict[int, list[str]], kind: str) -> dict[int, list[str]]:
    if kind == "ptb":
        return _tokenize_ptb(captions)
    return {k: [simple_tokenize(c) for c in caps] for k, caps in captions.items()}


# ---------------------------------------------------------------------------------------------
# scorers
# ---------------------------------------------------------------------------------------------
def resolve_metrics(metrics: str | Sequence[str] | None) -> list[str]:
    """Metric names (any case; ``Bleu_4``, ``bleu``, ``rouge``, ``CIDEr``, ...) -> scorer groups."""
    if metrics is None or metrics == "all":
        return list(_GROUPS)
    if isinstance(metrics, str):
        metrics = [m for m in re.split(r"[,\s]+", metrics) if m]
    groups: list[str] = []
    for name in metrics:
        group = _ALIASES.get(name.strip().lower())
        if group is None:
            raise InputError(f"unknown metric {name!r}; known: {', '.join(METRICS)} (or bleu, rouge, all)")
        if group not in groups:
            groups.append(group)
    return [g for g in _GROUPS if g in groups]


_SHARED: dict[str, Any] = {}  # scorers kept open by keep_scorers_open(): "depth", "meteor"


@contextlib.contextmanager
def keep_scorers_open():
    """Reuse one METEOR JVM for every :func:`evaluate` inside the block (each start costs ~10 s).

    Experiments that score many runs (``capdec demo --compare``, sweeps) wrap their loop in it.
    """
    _SHARED["depth"] = _SHARED.get("depth", 0) + 1
    try:
        yield
    finally:
        _SHARED["depth"] -= 1
        if not _SHARED["depth"]:
            meteor = _SHARED.pop("meteor", None)
            if meteor is not None:
                meteor.close()


def reusing_scorers(fn):
    """Decorator: run ``fn`` inside :func:`keep_scorers_open`."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with keep_scorers_open():
            return fn(*args, **kwargs)

    return wrapper


def _open_meteor():
    """pycocoevalcap's Meteor (JVM starts now), with a ``close()`` that always ends the process.

    Meteor's own ``__del__`` takes a lock that an exception mid-scoring leaves held (a hang at
    garbage collection), so the subclass replaces it.
    """
    from pycocoevalcap.meteor.meteor import Meteor

    class ClosableMeteor(Meteor):
        def close(self) -> None:
            proc = getattr(self, "meteor_p", None)
            self.meteor_p = None
            if proc is None:
                return
            with contextlib.suppress(OSError):
                proc.stdin.close()
            proc.kill()
            proc.wait()
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()

        def __del__(self) -> None:
            self.close()

    return ClosableMeteor()


def spice_unavailable_reason() -> str | None:
    """Why SPICE cannot run here (``None`` when it can be tried); never downloads anything."""
    if _java() is None:
        return "Java is not installed (no 'java' on PATH); SPICE runs in the JVM"
    try:
        from pycocoevalcap.spice import spice as spice_module
    except ImportError as e:  # pragma: no cover - pycocoevalcap is required anyway
        return f"pycocoevalcap.spice cannot be imported: {e}"
    lib = Path(spice_module.__file__).parent / "lib"
    missing = [jar for jar in _SPICE_JARS if not (lib / jar).is_file()]
    if missing:
        return (f"SPICE needs Stanford CoreNLP 3.6.0 ({', '.join(missing)} in {lib}), which pycocoevalcap "
                f"downloads from nlp.stanford.edu on first use; no download was attempted. Put the jars "
                f"there to enable SPICE.")
    return None


def _run_spice(gts: dict[int, list[str]], res: dict[int, list[str]]) -> tuple[float, list[float]]:
    from pycocoevalcap.spice.spice import Spice

    score, scores = Spice().compute_score(gts, res)
    return float(score), [float(s["All"]["f"]) for s in scores]


@contextlib.contextmanager
def _timed(what: str):
    t0 = time.perf_counter()
    yield
    logger.debug("%s took %.1fs", what, time.perf_counter() - t0)


def _require_pycocoevalcap() -> None:
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError as e:
        raise CapdecError("caption metrics need pycocoevalcap: pip install 'capdec[eval]'") from e


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

    if report.predictions_without_references:
        logger.warning("%d predictions have no references and were not scored: %s",
                       len(report.predictions_without_references), ex(report.predictions_without_references))
    if report.references_without_predictions:
        logger.warning("%d reference images have no prediction and were not scored: %s",
                       len(report.references_without_predictions), ex(report.references_without_predictions))
    if report.empty_predictions:
        logger.warning("%d predictions are empty strings (scored as empty captions): %s",
                       len(report.empty_predictions), ex(report.empty_predictions))
    if report.empty_references:
        logger.warning("%d images have an empty reference caption: %s",
                       len(report.empty_references), ex(report.empty_references))


def evaluate(predictions: Mapping[ImageId, str], references: Mapping[ImageId, Sequence[str]], *,
             metrics: str | Sequence[str] | None = None, per_image: bool = False, strict: bool = False,
             tokenizer: str = "auto") -> EvalResult:
    """coco-caption metrics of ``predictions`` (id -> caption) against ``references`` (id -> captions).

    Images with both are scored, in the references' order; the rest are reported in
    ``result.missing`` (``strict=True``: an :class:`InputError`). ``metrics``: names or groups
    (default: all of :data:`METRICS`; naming any BLEU gives all four). ``tokenizer``: ``"auto"``
    (PTB when Java exists, else the simple fallback), ``"ptb"`` or ``"simple"``. ``per_image=True``
    fills ``result.per_image`` (metric -> id -> score), e.g. for :func:`bootstrap_se`.
    """
    _require_pycocoevalcap()
    start = time.perf_counter()
    groups = resolve_metrics(metrics)
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

    if "cider" in groups and len(ids) < 10:
        logger.warning("CIDEr weighs n-grams by IDF over the references of the images scored; with %d "
                       "images that is unreliable (with 1, every IDF is 0 and so is CIDEr)", len(ids))
    java = _java()
    if tokenizer not in ("auto", "ptb", "simple"):
        raise InputError(f"unknown tokenizer {tokenizer!r}; use auto, ptb or simple")
    if tokenizer == "ptb" and java is None:
        raise CapdecError("the PTB tokenizer needs Java, and no 'java' is on PATH; install a JRE or "
                          "use the approximate tokenizer (--tokenizer simple)")
    tok_kind = tokenizer if tokenizer != "auto" else ("ptb" if java else "simple")
    if tok_kind == "simple":
        logger.warning("tokenising with the Python fallback (Java %s): scores approximate coco-caption's",
                       "not found" if java is None else "not used")

    unavailable: dict[str, str] = {}
    n = len(ids)
    meteor = None
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="capdec-spice")
    spice_future = None
    raw: dict[str, tuple[Any, Any]] = {}
    try:
        if "meteor" in groups:
            if java is None:
                unavailable["METEOR"] = "Java is not installed (no 'java' on PATH); METEOR runs in the JVM"
            elif _SHARED.get("depth"):  # inside keep_scorers_open(): one JVM for all calls
                if "meteor" not in _SHARED:
                    _SHARED["meteor"] = _open_meteor()
                meteor = _SHARED["meteor"]
            else:  # the JVM loads its paraphrase table (~10 s) while Python tokenises and scores
                meteor = _open_meteor()
        spice_reason = spice_unavailable_reason() if "spice" in groups else None
        if spice_reason:
            unavailable["SPICE"] = spice_reason

        # one tokenizer run: keys 0..n-1 are the references, n..2n-1 the predictions
        both = {k: list(references[i]) for k, i in enumerate(ids)}
        both.update({n + k: [predictions[i]] for k, i in enumerate(ids)})
        with _timed(f"tokenising {sum(map(len, both.values()))} captions ({tok_kind})"):
            tokens = _tokenize(both, tok_kind)
        gts = {k: tokens[k] for k in range(n)}
        res = {k: tokens[n + k] for k in range(n)}

        if "spice" in groups and "SPICE" not in unavailable:  # a separate JVM; no GIL traffic
            spice_future = pool.submit(_run_spice, gts, res)
        if "bleu" in groups:
            from pycocoevalcap.bleu.bleu import Bleu
            with _timed("BLEU"):
                raw["bleu"] = Bleu(4).compute_score(gts, res, verbose=0)
        if "rouge" in groups:
            from pycocoevalcap.rouge.rouge import Rouge
            with _timed("ROUGE_L"):
                raw["rouge"] = Rouge().compute_score(gts, res)
        if "cider" in groups:
            from pycocoevalcap.cider.cider import Cider
            with _timed("CIDEr"):
                raw["cider"] = Cider().compute_score(gts, res)
        # METEOR last and in this thread: it makes one pipe round trip per image, and from a second
        # thread each would wait for the GIL behind the Python scorers (many times slower)
        if meteor is not None:
            try:
                with _timed("METEOR"):
                    raw["meteor"] = meteor.compute_score(gts, res)
            except Exception as e:  # the JVM died or refused: report it, keep the rest
                logger.warning("METEOR failed: %s", e, exc_info=logger.isEnabledFor(logging.DEBUG))
                unavailable["METEOR"] = f"METEOR failed: {type(e).__name__}: {e}"
                if _SHARED.get("meteor") is meteor:  # do not hand a broken JVM to the next call
                    _SHARED.pop("meteor")
        if spice_future is not None:
            try:
                with _timed("waiting for SPICE"):
                    raw["spice"] = spice_future.result()
            except Exception as e:
                logger.warning("SPICE failed: %s", e, exc_info=logger.isEnabledFor(logging.DEBUG))
                unavailable["SPICE"] = f"SPICE failed: {type(e).__name__}: {e}"
    finally:
        if meteor is not None and _SHARED.get("meteor") is not meteor:
            meteor.close()
        pool.shutdown(wait=True)

    scores: dict[str, float | None] = {}
    per: dict[str, dict[ImageId, float]] = {}
    for group in groups:
        names = _GROUPS[group]
        if group not in raw:
            scores.update(dict.fromkeys(names, None))
            continue
        corpus, each = raw[group]
        if group == "bleu":
            pairs = list(zip(names, corpus, each))
        else:
            pairs = [(names[0], corpus, each)]
        for name, value, values in pairs:
            scores[name] = float(value)
            if per_image:
                per[name] = {i: float(v) for i, v in zip(ids, values)}
    seconds = time.perf_counter() - start
    logger.info("scored %d images in %.1fs", n, seconds)
    return EvalResult(scores=scores, per_image=per, unavailable=unavailable, missing=report,
                      tokenizer=tok_kind, n_images=n, seconds=seconds)


def bootstrap_se(per_image: Mapping[Any, float] | Sequence[float] | np.ndarray, n: int = 1000,
                 seed: int = 0) -> float:
    """Bootstrap standard error of the mean of per-image scores.

    Resamples images with replacement ``n`` times and returns the standard deviation (ddof=1) of
    the resampled means. The per-image scores are fixed, so CIDEr's IDF (document frequencies over
    the whole reference set) is held at its full-set value rather than recomputed per resample; for
    corpus BLEU (not a mean of per-image BLEU) this is the SE of the per-image mean, an
    approximation.
    """
    values = np.asarray(list(per_image.values()) if isinstance(per_image, Mapping) else per_image,
                        dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise InputError("bootstrap_se needs a non-empty 1-d set of per-image scores")
    if n < 2:
        raise InputError(f"bootstrap_se needs n >= 2 resamples, got {n}")
    rng = np.random.default_rng(seed)
    means = np.empty(n)
    for b in range(n):  # a loop, not an (n, N) index matrix: N may be large
        means[b] = values[rng.integers(0, values.size, values.size)].mean()
    return float(means.std(ddof=1))


# ---------------------------------------------------------------------------------------------
# CLIPScore (Hessel et al., 2021)
# ---------------------------------------------------------------------------------------------
@dataclass
class ClipScoreResult:
    """``scores``: CLIPScore / RefCLIPScore means; ``per_image``: metric -> list (input order)."""

    scores: dict[str, float | None]
    per_image: dict[str, list[float]]


def clip_score(encoder: Any, images: Sequence[Any], captions: Sequence[str],
               references: Sequence[Sequence[str]] | None = None, w: float = 2.5, *,
               prefix: str = "A photo depicts ", batch_size: int = 64) -> ClipScoreResult:
    """Reference-free CLIP-S and (with ``references``) RefCLIP-S of each caption (Hessel et al. 2021).

    CLIP-S = ``w * max(cos(image, caption), 0)``; RefCLIP-S = harmonic mean of CLIP-S and
    ``max(max_r cos(caption, r), 0)``. ``encoder`` is any :class:`capdec.encoders.Encoder`; ``images``
    are PIL images or paths. Like the authors' code, captions and references are prefixed with
    ``"A photo depicts "`` (pass ``prefix=""`` to turn that off). The numbers depend on the encoder:
    compare them only between runs with the same one.
    """
    from capdec.images import load_image
    from capdec.utils import progress

    if len(images) != len(captions):
        raise InputError(f"clip_score: {len(images)} images but {len(captions)} captions")
    if references is not None and len(references) != len(captions):
        raise InputError(f"clip_score: {len(captions)} captions but {len(references)} reference lists")
    if not captions:
        raise InputError("clip_score: no images to score")
    image_chunks = []
    for start in progress(range(0, len(images), batch_size), desc="CLIPScore images", unit="batch"):
        chunk = [im if hasattr(im, "convert") else load_image(im) for im in images[start:start + batch_size]]
        image_chunks.append(encoder.encode_image(chunk))
    import torch

    img = torch.cat(image_chunks).float()
    cap = encoder.encode_text([prefix + c for c in captions]).float()
    clip = w * (img * cap).sum(-1).clamp(min=0)
    scores: dict[str, float | None] = {"CLIPScore": float(clip.mean()), "RefCLIPScore": None}
    per = {"CLIPScore": clip.tolist()}
    if references is not None:
        flat = [prefix + r for refs in references for r in refs]
        owner = torch.tensor([i for i, refs in enumerate(references) for _ in refs])
        if len(owner) != len(flat) or any(len(r) == 0 for r in references):
            raise InputError("clip_score: every image needs at least one reference caption for RefCLIPScore")
        ref = encoder.encode_text(flat).float()
        sims = (cap[owner] * ref).sum(-1)
        best = torch.full((len(captions),), -math.inf).scatter_reduce(0, owner, sims, reduce="amax")
        best = best.clamp(min=0)
        denom = clip + best
        ref_clip = torch.where(denom > 0, 2 * clip * best / denom.clamp(min=1e-12), torch.zeros_like(denom))
        scores["RefCLIPScore"] = float(ref_clip.mean())
        per["RefCLIPScore"] = ref_clip.tolist()
    return ClipScoreResult(scores=scores, per_image=per)
