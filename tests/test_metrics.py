"""capdec.metrics / ``capdec evaluate``: parity with pycocoevalcap, readers, matching, bad inputs.

The parity test is the contract: on the real COCO val2017 captions, leave-one-out over all 5,000
images (each image's lowest-id caption is the prediction, the others its references), ``capdec
evaluate`` through the CLI must give *exactly* the numbers of pycocoevalcap's PTBTokenizer + scorers
called directly, the way ``COCOEvalCap.evaluate`` calls them. The 5,000-image run with every
metric takes ~40 s (CLI + direct run) on an idle machine and is marked slow (``pytest -m slow``); the
default suite runs the same check on the first 1,000 images without METEOR (whose JVM takes ~12 s of
CPU to start, twice).
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import pytest

from capdec import metrics as M
from capdec.cli import main
from capdec.errors import InputError

pytest.importorskip("pycocoevalcap")
NO_JAVA = "Java is not installed (Debian: apt-get install default-jre-headless); METEOR and the PTB tokenizer need it"
needs_java = pytest.mark.skipif(M.scorers._java() is None, reason=NO_JAVA)
FAST = "bleu,rouge,cider"  # METEOR's JVM takes ~10 s to start; only a few tests pay for it


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def start_meteor():
    """pycocoevalcap's Meteor, as coco-caption builds it; its JVM takes ~10 s to load, so tests start
    it before running the CLI (results do not depend on when it started)."""
    from pycocoevalcap.meteor.meteor import Meteor

    return Meteor()


def coco_caption_direct(gts_raw: dict, res_raw: dict, meteor=None) -> dict[str, float]:
    """What coco-caption computes: COCOEvalCap.evaluate's steps (without SPICE), called directly;
    METEOR only when given a started ``Meteor``."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    try:
        tokenizer = PTBTokenizer()
        gts = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in gts_raw.items()})
        res = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in res_raw.items()})
        out = dict(zip(["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"], Bleu(4).compute_score(gts, res, verbose=0)[0]))
        out["ROUGE_L"] = Rouge().compute_score(gts, res)[0]
        out["CIDEr"] = Cider().compute_score(gts, res)[0]
        if meteor is not None:
            out["METEOR"] = meteor.compute_score(gts, res)[0]
    finally:
        if meteor is not None:
            meteor.meteor_p.kill()
            meteor.meteor_p.wait()
    return out


@pytest.fixture(scope="module")
def val2017(coco_dir):
    return json.loads((coco_dir / "captions_val2017.json").read_text(encoding="utf-8"))


def leave_one_out(data: dict, n_images: int, out):
    """Leave-one-out over the first ``n_images`` of captions_val2017.json: each image's lowest-id
    caption is its prediction, the others its references. Writes the CLI's inputs to ``out`` and
    returns the direct run's (gts, res) dicts, in the annotation file's image order."""
    images = data["images"][:n_images]
    keep = {img["id"] for img in images}
    anns = [a for a in data["annotations"] if a["image_id"] in keep]
    first: dict[int, dict] = {}
    for a in anns:
        if a["image_id"] not in first or a["id"] < first[a["image_id"]]["id"]:
            first[a["image_id"]] = a
    ref_anns = [a for a in anns if a is not first[a["image_id"]]]
    (out / "refs.json").write_text(json.dumps(dict(data, images=images, annotations=ref_anns)), encoding="utf-8")
    # predictions as `capdec caption` writes them: JSON Lines keyed by image path
    with open(out / "preds.jsonl", "w", encoding="utf-8") as f:
        for img in images:
            f.write(json.dumps({"image": f"/data/coco/val2017/{img['file_name']}",
                                "caption": first[img["id"]]["caption"]}) + "\n")
    gts: dict[int, list[str]] = {img["id"]: [] for img in images}  # COCOEvalCap's order
    for a in ref_anns:
        gts[a["image_id"]].append(a["caption"])
    res = {i: [first[i]["caption"]] for i in gts}
    return gts, res


# ---------------------------------------------------------------------------------------------
# parity (the contract)
# ---------------------------------------------------------------------------------------------
@needs_java
@pytest.mark.parametrize("n_images,metrics", [
    pytest.param(5000, "all", marks=pytest.mark.slow),
    (1000, FAST),  # the default suite skips METEOR: each side's JVM would spend ~12 s CPU loading it
])
def test_parity_coco_val2017_leave_one_out(val2017, n_images, metrics, tmp_path, monkeypatch):
    gts, res = leave_one_out(val2017, n_images, tmp_path)
    assert len(res) == n_images and all(len(v) >= 4 for v in gts.values())
    jvms = []  # capdec's METEOR process, to check that it is ended
    open_meteor = M.scorers._open_meteor
    monkeypatch.setattr(M.scorers, "_open_meteor", lambda: jvms.append(open_meteor()) or jvms[-1])
    meteor = start_meteor() if metrics == "all" else None
    start = time.perf_counter()
    code = main(["-q", "evaluate", str(tmp_path / "preds.jsonl"), "--references", str(tmp_path / "refs.json"),
                 "--metrics", metrics, "--out", str(tmp_path / "metrics.json"),
                 "--per-image", str(tmp_path / "per_image.jsonl")])
    seconds = time.perf_counter() - start
    assert code == 0
    assert all(jvm.meteor_p is None for jvm in jvms)  # closed, not left to the garbage collector
    got = json.loads((tmp_path / "metrics.json").read_text())
    expected = coco_caption_direct(gts, res, meteor)
    for name, value in expected.items():
        assert got[name] == value, (name, got[name], value)  # exact, not approximate
    if metrics == "all":
        assert len(jvms) == 1 and "METEOR" in expected
        if got["SPICE"] is None:
            assert "SPICE" in got["unavailable"]
    assert got["n_images"] == n_images and got["tokenizer"] == "ptb"
    assert got["missing"]["predictions_without_references"]["count"] == 0
    assert got["missing"]["references_without_predictions"]["count"] == 0
    # per-image rows for every image; corpus CIDEr and ROUGE-L are their per-image means
    rows = [json.loads(line) for line in (tmp_path / "per_image.jsonl").read_text().splitlines()]
    assert [r["image_id"] for r in rows] == list(res)
    assert np.mean([r["CIDEr"] for r in rows]) == pytest.approx(got["CIDEr"], rel=1e-12)
    assert np.mean([r["ROUGE_L"] for r in rows]) == pytest.approx(got["ROUGE_L"], rel=1e-12)
    print(f"capdec evaluate, {n_images} images, metrics {metrics}: {seconds:.1f}s")
    # ~20 s for 5000 images on an idle machine; the bound is loose because CPUs here are shared
    assert seconds < 120


def test_tokenizer_runs_once_per_call(monkeypatch):
    import subprocess
    from pathlib import Path

    if M.scorers._java() is None:
        pytest.skip(NO_JAVA)
    calls = []
    original = subprocess.run

    def counting(cmd, *args, **kwargs):
        if M.scorers._PTB_CLASS in cmd:
            calls.append(len(Path(cmd[-1]).read_text(encoding="utf-8").split("\n")))
        return original(cmd, *args, **kwargs)

    monkeypatch.setattr(subprocess, "run", counting)
    refs = {1: ["a dog runs on the grass", "a brown dog running"], 2: ["a red car on a street", "a car"]}
    M.evaluate({1: "a dog runs", 2: "a red car"}, refs, metrics=FAST)
    assert calls == [6]  # one run, references and predictions together


@needs_java
def test_ptb_tokenizer_refuses_misaligned_or_failed_java(monkeypatch):
    import re

    from capdec.errors import CapdecError

    with monkeypatch.context() as m:  # without our line-break cleaning, "\r" splits a caption in two
        m.setattr(M.scorers, "_LINE_BREAKS", re.compile("(?!)"))
        with pytest.raises(CapdecError, match="returned 3 lines for 2 captions"):
            M.scorers._tokenize_ptb({1: ["a red\rcar"], 2: ["a dog"]})
    monkeypatch.setattr(M.scorers, "_PTB_CLASS", "edu.stanford.nlp.process.NoSuchTokenizer")
    with pytest.raises(CapdecError, match="exit status 1"):
        M.scorers._tokenize_ptb({1: ["a red car"]})


@needs_java
def test_ptb_tokenizer_matches_pycocoevalcap_and_writes_nothing_beside_its_jar(monkeypatch):
    """Our Java call tokenises exactly as pycocoevalcap's PTBTokenizer, without its temp file in
    site-packages (which fails where that is read-only)."""
    import tempfile

    from pycocoevalcap.tokenizer import ptbtokenizer

    captions = {1: ["A man's bike, isn't it?", "Two dogs (brown) play -- outside...", ""],
                2: ["Café crème on a table; \"quoted\" text!", "   spaces   around  ", "U.S. flag at 3:30 p.m."],
                3: ["a caption with a\rcarriage return and a\u2028line separator", "e-mail & co. `tick`"]}
    with monkeypatch.context() as m:  # a read-only site-packages, as far as pycocoevalcap's wrapper goes
        def read_only(*args, **kwargs):
            raise PermissionError("site-packages is read-only")

        m.setattr(ptbtokenizer.tempfile, "NamedTemporaryFile", read_only)
        with pytest.raises(PermissionError):
            ptbtokenizer.PTBTokenizer().tokenize({1: [{"caption": "a dog"}]})
        ours = M.scorers._tokenize_ptb(captions)
    assert ptbtokenizer.tempfile.NamedTemporaryFile is tempfile.NamedTemporaryFile
    clean = {k: [{"caption": M.scorers._LINE_BREAKS.sub(" ", c)} for c in caps] for k, caps in captions.items()}
    assert ours == ptbtokenizer.PTBTokenizer().tokenize(clean)
    assert ours[1][0] == "a man 's bike is n't it" and ours[1][2] == ""


# ---------------------------------------------------------------------------------------------
# ids, readers, matching
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,key", [
    (257, 257), ("257", 257), ("COCO_val2014_000000000257.jpg", 257), ("000000000785.jpg", 785),
    ("/x/val2017/000000000785.jpg", 785), ("COCO_train2014_000000000009.png", 9),
    ("photos/dog.jpg", "dog.jpg"), ("C:\\pics\\cat.png", "cat.png"), ("img_12.jpg", "img_12.jpg"),
    ("1000092795.jpg", 1000092795),
])
def test_image_key(name, key):
    assert M.image_key(name) == key


def test_read_references_formats(coco_dir, tmp_path):
    karpathy = M.read_references(coco_dir / "karpathy_test_refs.json")
    assert len(karpathy) == 1097 and 179765 in karpathy and len(karpathy[179765]) == 5
    mapping = M.read_references(coco_dir / "images" / "captions.json")
    assert set(mapping) >= {257, 785} and len(mapping) == 17
    coco = M.load_references(coco_dir / "captions_val2017.json")
    assert len(coco.captions) == 5000 and coco.file_names[397133] == "000000397133.jpg"
    # JSON Lines, one caption per line, merged per image
    p = tmp_path / "refs.jsonl"
    p.write_text('{"image": "a/dog.jpg", "caption": "a dog"}\n{"image": "a/dog.jpg", "caption": "the dog"}\n'
                 '{"image_id": 7, "captions": ["x y"]}\n', encoding="utf-8")
    assert M.read_references(p) == {"dog.jpg": ["a dog", "the dog"], 7: ["x y"]}
    # two different images that would get one id are refused, not merged
    p.write_text('{"image": "a/1.jpg", "caption": "a"}\n{"image": "b/1.jpg", "caption": "b"}\n')
    with pytest.raises(InputError, match="both get the id 1"):
        M.read_references(p)


def test_read_predictions_formats(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"image": "/im/COCO_val2014_000000000257.jpg", "caption": "a bus"}\n'
                     '{"image": "dog.jpg", "caption": "a dog"}\n', encoding="utf-8")
    assert M.read_predictions(jsonl) == {257: "a bus", "dog.jpg": "a dog"}
    results = tmp_path / "results.json"
    results.write_text(json.dumps([{"image_id": 257, "caption": "a bus"}, {"image_id": "785", "caption": "x"}]))
    assert M.read_predictions(results) == {257: "a bus", 785: "x"}
    csv = tmp_path / "p.csv"
    csv.write_text('image,caption\nCOCO_val2014_000000000257.jpg,"a bus, parked"\n', encoding="utf-8")
    assert M.read_predictions(csv) == {257: "a bus, parked"}
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"image_id": 1, "caption": "a"}\n{"image_id": 1, "caption": "b"}\n')
    with pytest.raises(InputError, match=r"line 2: a second prediction for image 1 \(first at .*line 1\)"):
        M.read_predictions(dup)


def test_paths_match_references_by_file_name_then_coco_id(tmp_path):
    # ids that are not the numbers in the file names (as in a COCO-format Flickr30k file)
    refs = {"images": [{"id": 0, "file_name": "1000092795.jpg"}, {"id": 1, "file_name": "dog.jpg"},
                       {"id": 785, "file_name": "000000000785.jpg"}],
            "annotations": [{"image_id": 0, "id": 1, "caption": "two men"},
                            {"image_id": 1, "id": 2, "caption": "a dog"},
                            {"image_id": 785, "id": 3, "caption": "a woman skiing"}]}
    rp = tmp_path / "refs.json"
    rp.write_text(json.dumps(refs))
    preds = [M.Prediction("two men", image="/x/1000092795.jpg"), M.Prediction("a dog", image="dog.jpg"),
             M.Prediction("a skier", image="val2017/000000000785.jpg"), M.Prediction("?", image="cat.jpg"),
             M.Prediction(None, image="broken.jpg", where="p: line 5")]
    captions, paths, nulls = M.align_predictions(preds, M.load_references(rp))
    assert captions == {0: "two men", 1: "a dog", 785: "a skier", "cat.jpg": "?"}
    assert paths[785] == "val2017/000000000785.jpg" and nulls == ["p: line 5"]
    # an image_id that is no reference id: the number at the end of a reference's file name
    # (what `capdec caption --format coco` writes without an id map), unless two files share it
    refs["images"] += [{"id": 9, "file_name": "photo_17.jpg"}, {"id": 10, "file_name": "a_3.jpg"},
                       {"id": 11, "file_name": "b_3.jpg"}]
    refs["annotations"] += [{"image_id": i, "id": 10 + i, "caption": "x"} for i in (9, 10, 11)]
    rp.write_text(json.dumps(refs))
    preds = [M.Prediction("x", image_id=17), M.Prediction("y", image_id=3), M.Prediction("z", image_id=785)]
    captions, _, _ = M.align_predictions(preds, M.load_references(rp))
    assert captions == {9: "x", 3: "y", 785: "z"}


# ---------------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------------
def test_empty_predictions_file(tmp_path, coco_dir, capsys):
    p = tmp_path / "empty.jsonl"
    p.write_text("\n  \n")
    with pytest.raises(InputError, match="empty"):
        M.read_predictions(p)
    assert main(["evaluate", str(p), "--references", str(coco_dir / "karpathy_test_refs.json")]) == 2
    assert "empty.jsonl: the file is empty" in capsys.readouterr().err
    (tmp_path / "none.json").write_text("[]")
    with pytest.raises(InputError, match="no predictions"):
        M.read_predictions(tmp_path / "none.json")


def test_malformed_json_names_file_and_line(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"image_id": 1, "caption": "a"}\n{"image_id": 2, "caption": "b"}\n{"image_id": 3, "caption": \n')
    with pytest.raises(InputError, match=r"p\.jsonl: line 3 column \d+: malformed JSON"):
        M.read_predictions(p)
    q = tmp_path / "r.json"
    q.write_text('[\n  {"image_id": 1, "caption": "a"},\n  {"image_id": 2 "caption": "b"}\n]\n')
    with pytest.raises(InputError, match=r"r\.json: line 3 column \d+: malformed JSON"):
        M.read_predictions(q)
    r = tmp_path / "refs.jsonl"
    r.write_text('{"image_id": 1, "captions": ["a"]}\n{"image_id": 2}\n')
    with pytest.raises(InputError, match=r"refs\.jsonl: line 2: no 'captions'"):
        M.read_references(r)
    s = tmp_path / "nocap.jsonl"
    s.write_text('{"image": "a.jpg", "text": "a"}\n')
    with pytest.raises(InputError, match=r"nocap\.jsonl: line 1: no 'caption' field"):
        M.read_predictions(s)


@needs_java
def test_unmatched_ids_are_reported_and_strict_fails(tmp_path, capsys):
    refs = tmp_path / "refs.jsonl"
    refs.write_text("".join(json.dumps({"image_id": i, "captions": [f"a photo of thing {i}", f"thing number {i}"]})
                            + "\n" for i in range(1, 6)))
    preds = tmp_path / "preds.jsonl"
    preds.write_text("".join(json.dumps({"image_id": i, "caption": f"a photo of thing {i}"}) + "\n"
                             for i in (1, 2, 3, 98, 99)))
    out = tmp_path / "m.json"
    assert main(["-q", "evaluate", str(preds), "--references", str(refs), "--metrics", FAST, "--out", str(out)]) == 0
    missing = json.loads(out.read_text())["missing"]
    assert missing["n_scored"] == 3
    assert missing["predictions_without_references"] == {"count": 2, "examples": [98, 99]}
    assert missing["references_without_predictions"] == {"count": 2, "examples": [4, 5]}
    capsys.readouterr()
    assert main(["-q", "evaluate", str(preds), "--references", str(refs), "--metrics", FAST, "--strict"]) == 2
    assert "do not match (strict)" in capsys.readouterr().err
    # nothing in common is an error that shows both kinds of ids
    other = tmp_path / "other.jsonl"
    other.write_text('{"image": "cat.jpg", "caption": "a cat"}\n')
    assert main(["-q", "evaluate", str(other), "--references", str(refs), "--metrics", FAST]) == 2
    assert "no prediction matches a reference" in capsys.readouterr().err


@needs_java
def test_mismatch_is_logged(caplog):
    with caplog.at_level(logging.WARNING, logger="capdec.metrics"):
        res = M.evaluate({1: "a dog", 5: "x"}, {1: ["a dog"], 2: ["a cat"]}, metrics="bleu")
    assert res.missing.predictions_without_references == [5]
    assert res.missing.references_without_predictions == [2]
    assert "1 predictions have no references" in caplog.text
    assert "1 reference images have no prediction" in caplog.text


@needs_java
def test_empty_and_unicode_captions():
    refs = {1: ["A dog runs on the grass.", "a brown dog running"],
            2: ["Un café à Paris, naïve façade.", "東京 の 夜景"],
            3: ["a man rides a wave on a surfboard", "a surfer riding a wave"],
            4: ["a cat sleeps on a bed", "the cat is asleep"],
            5: ["two birds on a wire", "birds sitting on a power line"]}
    preds = {1: "",  # empty: scored as an empty caption (0), reported
             2: "Un café à Paris 😀 naïve",  # unicode, an emoji Java cannot tokenise
             3: "a man rides\u2028a wave\ron a\x0bsurfboard",  # line breaks Java would split on
             4: "   ",
             5: "two birds on a wire"}
    res = M.evaluate(preds, refs, metrics=FAST, per_image=True)
    assert res.missing.empty_predictions == [1, 4]
    for name in ("Bleu_1", "ROUGE_L", "CIDEr"):
        assert res.per_image[name][1] == 0 and res.per_image[name][4] == 0
    # had any line break split a caption, image 3 and 5 would be scored against the wrong text
    assert res.per_image["ROUGE_L"][3] == 1.0 and res.per_image["ROUGE_L"][5] == 1.0
    assert res.per_image["Bleu_1"][2] > 0.5
    assert all(np.isfinite(v) for v in res.scores.values())


def test_bad_caption_types():
    with pytest.raises(InputError, match="not a string"):
        M.evaluate({1: None}, {1: ["a"]})
    with pytest.raises(InputError, match="list of strings"):
        M.evaluate({1: "a"}, {1: "a"})
    with pytest.raises(InputError, match="unknown metric 'blue'"):
        M.evaluate({1: "a"}, {1: ["a"]}, metrics="blue")


# ---------------------------------------------------------------------------------------------
# Java, METEOR, SPICE
# ---------------------------------------------------------------------------------------------
def test_without_java_falls_back_and_reports(monkeypatch):
    monkeypatch.setattr(M.scorers, "_java", lambda: None)
    refs = {1: ["A dog runs on the grass.", "a brown dog running"], 2: ["A red car.", "the car is red"]}
    res = M.evaluate({1: "a dog runs.", 2: "a red car"}, refs)
    assert res.tokenizer == "simple"
    assert res.scores["METEOR"] is None and "Java" in res.unavailable["METEOR"]
    assert res.scores["SPICE"] is None and "Java" in res.unavailable["SPICE"]
    assert res.scores["CIDEr"] > 0 and res.scores["Bleu_4"] is not None
    with pytest.raises(Exception, match="needs Java"):
        M.evaluate({1: "a"}, {1: ["a"]}, tokenizer="ptb")


def _tiny_eval_files(tmp_path):
    refs = [{"image_id": i, "captions": [f"a dog number {i} runs on the grass", f"the dog {i} is running"]}
            for i in range(3)]
    (tmp_path / "refs.json").write_text(json.dumps(refs))
    (tmp_path / "preds.json").write_text(json.dumps([{"image_id": i, "caption": f"a dog {i} runs"} for i in range(3)]))
    return tmp_path / "preds.json", tmp_path / "refs.json"


def test_evaluate_without_java_fails_with_ptb_and_warns_loudly_without_it(tmp_path, monkeypatch, capsys):
    """Paper-comparable numbers need coco-caption's Java PTB tokenizer (and METEOR, SPICE: Java too). With no
    'java' on PATH, --tokenizer ptb is one error line and nothing written; the default says loudly that the
    numbers it still writes are not comparable."""
    preds, refs = _tiny_eval_files(tmp_path)
    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # a PATH without java
    out = tmp_path / "metrics.json"
    assert main(["-q", "evaluate", str(preds), "--references", str(refs), "--tokenizer", "ptb", "--metrics", "bleu",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("capdec evaluate: error: ") and len(err.strip().splitlines()) == 1, err
    assert "Java" in err and "PATH" in err and not out.exists()

    assert main(["-q", "evaluate", str(preds), "--references", str(refs), "--metrics", "bleu", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "NOT comparable" in err and "--tokenizer ptb" in err, err
    assert json.loads(out.read_text())["tokenizer"] == "simple"


def test_evaluate_without_the_ptb_jar_fails_with_ptb_and_warns_loudly_without_it(tmp_path, monkeypatch, capsys):
    preds, refs = _tiny_eval_files(tmp_path)
    monkeypatch.setattr(M.scorers, "_java", lambda: "/usr/bin/java")  # Java present, the jar gone
    monkeypatch.setattr(M.scorers, "_ptb_jar", lambda: tmp_path / "stanford-corenlp-3.4.1.jar")
    out = tmp_path / "metrics.json"
    assert main(["-q", "evaluate", str(preds), "--references", str(refs), "--tokenizer", "ptb", "--metrics", "bleu",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "stanford-corenlp-3.4.1.jar" in err and "missing" in err and not out.exists(), err
    assert main(["-q", "evaluate", str(preds), "--references", str(refs), "--metrics", "bleu", "--out", str(out)]) == 0
    assert "NOT comparable" in capsys.readouterr().err and json.loads(out.read_text())["tokenizer"] == "simple"


def test_reproduce_md_evaluates_with_the_ptb_tokenizer():
    """docs/reproduce.md's numbers are to be set beside the paper's: every evaluate command asks for the PTB
    tokenizer, so a machine without Java fails instead of printing approximate scores."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "reproduce.md").read_text()
    commands = [line for line in doc.replace("\\\n", " ").splitlines() if line.strip().startswith("capdec evaluate")]
    assert len(commands) >= 6 and all("--tokenizer ptb" in c for c in commands), commands


@needs_java
def test_simple_tokenizer_approximates_ptb(coco_dir):
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    anns = json.loads((coco_dir / "captions_val2017.json").read_text())["annotations"][:500]
    ptb = PTBTokenizer().tokenize({i: [{"caption": a["caption"]}] for i, a in enumerate(anns)})
    same = sum(M.simple_tokenize(a["caption"]) == ptb[i][0] for i, a in enumerate(anns))
    assert same / len(anns) > 0.95


def test_spice_is_reported_unavailable_without_downloading(monkeypatch):
    import urllib.request

    def no_download(*args, **kwargs):
        raise AssertionError("SPICE tried to download")

    monkeypatch.setattr(urllib.request, "urlretrieve", no_download)
    reason = M.spice_unavailable_reason()
    if reason is None:
        pytest.skip("SPICE's CoreNLP jars are installed here")
    if M.scorers._java() is None:
        pytest.skip(NO_JAVA)
    res = M.evaluate({1: "a dog"}, {1: ["a dog runs"]}, metrics="bleu,spice")
    assert res.scores["SPICE"] is None and res.unavailable["SPICE"] == reason
    assert res.scores["Bleu_1"] is not None
    assert res.to_dict()["SPICE"] is None and res.to_dict()["unavailable"]["SPICE"] == reason


@needs_java
def test_meteor_process_is_closed_even_when_it_fails(monkeypatch):
    opened = []
    original = M.scorers._open_meteor

    def spy():
        meteor = original()
        opened.append((meteor, meteor.meteor_p))
        meteor.meteor_p.kill()  # the JVM dies before scoring: METEOR is reported, the rest still comes
        return meteor

    monkeypatch.setattr(M.scorers, "_open_meteor", spy)
    res = M.evaluate({1: "a dog"}, {1: ["a dog runs"]}, metrics="bleu,meteor")
    meteor, proc = opened[0]
    assert proc.poll() is not None and meteor.meteor_p is None
    assert res.scores["METEOR"] is None and res.unavailable["METEOR"].startswith("METEOR failed")
    assert res.scores["Bleu_1"] is not None


@needs_java
def test_keep_scorers_open_reuses_one_meteor_jvm(monkeypatch):
    opened = []
    original = M.scorers._open_meteor

    def spy():
        opened.append(original())
        return opened[-1]

    monkeypatch.setattr(M.scorers, "_open_meteor", spy)
    preds = [{1: "a dog runs", 2: "a red bus"}, {1: "two dogs", 2: "a bus on a street"}]
    refs = {1: ["a dog runs on grass", "a brown dog"], 2: ["a red bus on a street", "a bus"]}
    alone = [M.evaluate(p, refs, metrics="meteor").scores["METEOR"] for p in preds]
    assert len(opened) == 2
    opened.clear()
    with M.keep_scorers_open():
        shared = [M.evaluate(p, refs, metrics="meteor").scores["METEOR"] for p in preds]
        assert len(opened) == 1 and opened[0].meteor_p.poll() is None  # still running between calls
    assert shared == alone
    assert opened[0].meteor_p is None  # closed on leaving the block


# ---------------------------------------------------------------------------------------------
# bootstrap, CLIPScore
# ---------------------------------------------------------------------------------------------
def test_bootstrap_se():
    rng = np.random.default_rng(1)
    x = rng.normal(0.8, 0.5, 2000)
    se = M.bootstrap_se(x, n=500, seed=0)
    assert se == pytest.approx(x.std(ddof=1) / np.sqrt(x.size), rel=0.1)
    assert M.bootstrap_se(dict(enumerate(x)), n=500, seed=0) == se  # dict and array agree
    assert M.bootstrap_se(x, n=500, seed=1) != se
    assert M.bootstrap_se(np.ones(10), n=50) == 0.0
    with pytest.raises(InputError):
        M.bootstrap_se([], n=10)


@pytest.fixture(scope="module")
def photos(coco_dir):
    """The real COCO photos (CC BY / BY-SA, see images_meta.json) with their human captions."""
    caps = json.loads((coco_dir / "images" / "captions.json").read_text(encoding="utf-8"))
    names = sorted(caps)[:6]
    return [coco_dir / "images" / n for n in names], [caps[n] for n in names]


def test_clip_score_matches_hand_computation(tiny_hf_clip, photos):
    import torch

    from capdec.encoders import load_encoder
    from capdec.images import load_image

    enc = load_encoder(tiny_hf_clip, device="cpu")
    paths, caps = photos
    preds = [c[0] for c in caps]
    refs = [c[1:] for c in caps]
    out = M.clip_score(enc, paths, preds, refs)
    img = enc.encode_image([load_image(p) for p in paths]).double()
    cap = enc.encode_text(["A photo depicts " + c for c in preds]).double()
    clip = 2.5 * torch.clamp((img * cap).sum(-1), min=0)
    assert out.per_image["CLIPScore"] == pytest.approx(clip.tolist(), abs=1e-5)
    assert out.scores["CLIPScore"] == pytest.approx(clip.mean().item(), abs=1e-5)
    for i in range(len(paths)):
        r = enc.encode_text(["A photo depicts " + x for x in refs[i]]).double()
        best = max(float((cap[i] * r).sum(-1).max()), 0.0)
        c = clip[i].item()
        expected = 2 * c * best / (c + best) if c + best > 0 else 0.0
        assert out.per_image["RefCLIPScore"][i] == pytest.approx(expected, abs=1e-5)
    assert M.clip_score(enc, paths, preds).scores["RefCLIPScore"] is None


@needs_java
def test_cli_clip_score_and_bootstrap(tiny_hf_clip, photos, tmp_path):
    paths, caps = photos
    preds = tmp_path / "preds.jsonl"
    preds.write_text("".join(json.dumps({"image": p.name, "caption": c[0]}) + "\n" for p, c in zip(paths, caps)))
    refs = tmp_path / "refs.json"
    refs.write_text(json.dumps({p.name: c[1:] for p, c in zip(paths, caps)}))
    out = tmp_path / "m.json"
    assert main(["-q", "evaluate", str(preds), "--references", str(refs), "--metrics", FAST, "--out", str(out),
                 "--clip-score", "--encoder", tiny_hf_clip, "--device", "cpu",
                 "--images-root", str(paths[0].parent), "--bootstrap", "100"]) == 0
    got = json.loads(out.read_text())
    assert got["n_images"] == 6 and got["CLIPScore"] >= 0 and got["RefCLIPScore"] >= 0
    assert set(got["stderr"]) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr",
                                  "CLIPScore", "RefCLIPScore"}
    assert got["stderr"]["CIDEr"] > 0
