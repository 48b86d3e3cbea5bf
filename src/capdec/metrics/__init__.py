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

Layout: :mod:`~capdec.metrics.evaluation` (``evaluate``, matching, results),
:mod:`~capdec.metrics.scorers` (tokenizer, METEOR/SPICE, :class:`ScorerContext`),
:mod:`~capdec.metrics.bootstrap`, :mod:`~capdec.metrics.clipscore`; the file readers are the input
layer's (:mod:`capdec.io`) and are re-exported here.
"""

from __future__ import annotations

from capdec.images import ImageId, image_key
from capdec.io.predictions import Prediction, load_predictions, read_predictions
from capdec.io.references import ReferenceSet, load_references, read_references
from capdec.metrics.bootstrap import bootstrap_se
from capdec.metrics.clipscore import CLIP_METRICS, ClipScoreResult, clip_score
from capdec.metrics.evaluation import EvalResult, MatchReport, align_predictions, evaluate, match_report
from capdec.metrics.scorers import (
    METRICS,
    ScorerContext,
    keep_scorers_open,
    resolve_metrics,
    reusing_scorers,
    simple_tokenize,
    spice_unavailable_reason,
)

__all__ = [
    "CLIP_METRICS", "METRICS", "ClipScoreResult", "EvalResult", "ImageId", "MatchReport", "Prediction",
    "ReferenceSet", "ScorerContext", "align_predictions", "bootstrap_se", "clip_score", "evaluate", "image_key",
    "keep_scorers_open", "load_predictions", "load_references", "match_report", "read_predictions",
    "read_references", "resolve_metrics", "reusing_scorers", "simple_tokenize", "spice_unavailable_reason",
]
