"""The coco-caption scorers and their tokenizer: which metrics exist, the Java PTB tokenizer (and the
Python fallback), METEOR's JVM, SPICE's jars, and :class:`ScorerContext`, the scorers kept open across
:func:`~capdec.metrics.evaluate` calls (see the package docstring for what this adds to pycocoevalcap).
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from capdec.errors import CapdecError, InputError

logger = logging.getLogger(__name__)

METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")

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

_LINE_BREAKS = re.compile("[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")

_SPICE_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")

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

def _ptb_jar() -> Path:
    """The Stanford CoreNLP jar pycocoevalcap ships for its PTB tokenizer."""
    from pycocoevalcap.tokenizer import ptbtokenizer as ptb

    return Path(ptb.__file__).resolve().parent / ptb.STANFORD_CORENLP_3_4_1_JAR

def ptb_unavailable() -> str | None:
    """Why coco-caption's PTB tokenizer cannot run here (no Java, or its jar missing), or None."""
    if _java() is None:
        return "no 'java' is on PATH (the PTB tokenizer, METEOR and SPICE run in the JVM)"
    jar = _ptb_jar()
    if not jar.is_file():
        return f"the PTB tokenizer's jar {jar} is missing (reinstall pycocoevalcap)"
    return None

def _tokenize_ptb(captions: dict[int, list[str]]) -> dict[int, list[str]]:
    """coco-caption's PTB tokenisation over every caption in one Java run.

    The same jar, command line (``-preserveLines -lowerCase``) and punctuation removal as
    pycocoevalcap 1.2's ``PTBTokenizer`` (the parity tests compare the two), with one difference:
    its input file goes to the temp directory, where ``PTBTokenizer`` writes it next to its jar and
    fails wherever site-packages is read-only (system, conda or container installs). Java's stderr
    (a progress line, per-character warnings) is logged at DEBUG, not shown on the terminal.
    """
    from pycocoevalcap.tokenizer import ptbtokenizer as ptb

    jar = _ptb_jar()
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

class ScorerContext:
    """Scorers kept open across :func:`~capdec.metrics.evaluate` calls (a METEOR JVM takes ~10 s to
    start). Pass one as ``evaluate(..., scorers=ctx)``, or open one for a block with
    :func:`keep_scorers_open` (every ``evaluate`` inside uses it). ``close()`` ends the JVM.
    """

    def __init__(self) -> None:
        self._meteor = None

    def meteor(self):
        """The shared METEOR scorer, started on first use."""
        if self._meteor is None:
            self._meteor = _open_meteor()
        return self._meteor

    def owns(self, scorer) -> bool:
        return scorer is not None and scorer is self._meteor

    def discard(self, scorer) -> None:
        """Forget a scorer that failed (a broken JVM is not handed to the next call) and close it."""
        if scorer is self._meteor:
            self._meteor = None
        scorer.close()

    def close(self) -> None:
        if self._meteor is not None:
            self._meteor.close()
            self._meteor = None

    def __enter__(self) -> ScorerContext:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_OPEN: list[ScorerContext] = []  # contexts opened by keep_scorers_open(), innermost last


def active_context() -> ScorerContext | None:
    """The innermost :func:`keep_scorers_open` context, or None."""
    return _OPEN[0] if _OPEN else None


@contextlib.contextmanager
def keep_scorers_open():
    """Reuse one METEOR JVM for every :func:`evaluate` inside the block (each start costs ~10 s).

    Experiments that score many runs (``capdec demo --compare``, sweeps) wrap their loop in it.
    Nested blocks share the outermost context.
    """
    ctx = _OPEN[0] if _OPEN else ScorerContext()
    _OPEN.append(ctx)
    try:
        yield ctx
    finally:
        _OPEN.pop()
        if not _OPEN:
            ctx.close()


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
