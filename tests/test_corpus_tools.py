"""capdec corpus sentences / rebalance-gender / stats, on real COCO captions and hand-made edge cases."""

from __future__ import annotations

import json
import re

import pytest

from capdec.cli import main
from capdec.corpus_tools import (
    corpus_stats,
    extract_sentences,
    gender_terms,
    rebalance_gender,
    split_sentences,
    swap_gender,
)


@pytest.fixture(scope="module")
def coco_captions(coco_dir) -> list[str]:
    anns = json.loads((coco_dir / "captions_val2017.json").read_text())["annotations"]
    return [a["caption"].strip() for a in sorted(anns, key=lambda a: a["id"])[:3000]]


# -- sentences ------------------------------------------------------------------------------------
def test_split_sentences_abbreviations_initials_quotes_unicode():
    text = ('Mr. Smith met Dr. Watson at St. Paul\'s today. He saw J. K. Rowling there! "Is it true?" '
            "she asked. Prices rose e.g. for bread. It was 3.5 m tall. Zoë ate crème brûlée… Éclairs followed.")
    assert split_sentences(text) == [
        "Mr. Smith met Dr. Watson at St. Paul's today.",
        "He saw J. K. Rowling there!",
        '"Is it true?" she asked.',
        "Prices rose e.g. for bread.",
        "It was 3.5 m tall.",
        "Zoë ate crème brûlée… Éclairs followed.",  # "…" is not one of . ! ? : no split
    ]


def test_extract_sentences_counts_every_drop():
    lines = ["A CHAPTER HEADING IN CAPITALS IS HERE.", "", "", "Mrs. Dalloway said she would buy the flowers",
             "herself. Too short. This sentence has far too many words to ever be used as a caption for any image "
             "at all in the whole wide world, really.", "", "Mrs. Dalloway said she would buy the flowers herself."]
    kept, stats = extract_sentences(lines, mode="text", min_words=4, max_words=20, dedupe=True)
    assert kept == ["Mrs. Dalloway said she would buy the flowers herself."]
    assert stats.as_dict() == {"documents": 3, "empty_lines": 3, "sentences": 5, "kept": 1, "too_short": 1,
                               "too_long": 1, "no_lowercase": 1, "duplicates": 1}
    # one document per line: the wrapped sentence is now two documents
    kept, stats = extract_sentences(lines, mode="lines", min_words=4, max_words=20)
    assert "Mrs. Dalloway said she would buy the flowers" in kept
    assert stats.documents == 4 and stats.empty_lines == 3


def test_sentences_cli_on_coco_text(tmp_path, coco_captions):
    # real captions glued into paragraphs (10 a line, blank line between paragraphs) come back one per line
    caps = [c if c.endswith(".") else c + "." for c in coco_captions[:200]]
    caps = [c[0].upper() + c[1:] for c in caps if 4 <= len(c.split()) <= 20 and not re.search(r"[.!?]\s", c[:-1])]
    paragraphs = ["\n".join(" ".join(caps[i + j: i + j + 5]) for j in (0, 5)) for i in range(0, len(caps), 10)]
    src = tmp_path / "book.txt"
    src.write_text("\ufeff" + "\n\n".join(paragraphs) + "\n", encoding="utf-8")  # with a BOM
    out, report = tmp_path / "sentences.txt", tmp_path / "report.json"
    assert main(["-q", "corpus", "sentences", str(src), "--out", str(out), "--report", str(report)]) == 0
    assert out.read_text(encoding="utf-8").splitlines() == [" ".join(c.split()) for c in caps]
    r = json.loads(report.read_text())
    assert r["kept"] == len(caps) and r["too_short"] == r["too_long"] == 0


def test_sentences_cli_errors(tmp_path, capsys):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("first line\ncaf\xe9 au lait\n".encode("latin-1"))
    assert main(["corpus", "sentences", str(bad), "--out", str(tmp_path / "o.txt")]) == 2
    assert "latin1.txt: line 2 column 4: not valid UTF-8" in capsys.readouterr().err
    assert main(["corpus", "sentences", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o.txt")]) == 2
    assert not (tmp_path / "o.txt").exists()


# -- gender ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("before, after", [
    ("A man and his dog.", "A woman and her dog."),
    ("A woman holding her umbrella.", "A man holding his umbrella."),
    ("A man hugging her.", "A woman hugging him."),  # object "her" at the end -> him
    ("She looks at her in the park", "He looks at him in the park"),  # "her" before a preposition -> him
    ("A woman lying on her back", "A man lying on his back"),  # "back" is a noun here (real COCO caption)
    ("Her dog and HER.", "His dog and HIM."),  # capitalised and all-caps
    ("MEN and Women", "WOMEN and Men"),
    ("The man's bag and the men's room", "The woman's bag and the women's room"),  # possessives
    ("A girl’s café", "A boy’s café"),  # typographic apostrophe, unicode around
    ("A human, a manager and a woman", "A human, a manager and a man"),  # no match inside words
    ("a man-made lake with a snowman", "a man-made lake with a snowman"),  # hyphenated: left alone
    ("Mr. Brown and his wife", "Mrs. Brown and her husband"),
])
def test_swap_gender_cases(before, after):
    assert swap_gender(before) == after


def test_swap_gender_one_direction():
    assert swap_gender("A man and a woman", "male-to-female") == "A woman and a woman"
    assert swap_gender("A man and a woman", "female-to-male") == "A man and a man"
    assert swap_gender("A man and her dog", "female-to-male") == "A man and his dog"


def test_rebalance_on_coco_swaps_counts_exactly(coco_captions):
    new, swapped, rep = rebalance_gender(coco_captions, p=1.0, direction="both", seed=3)
    assert rep.before["male"] > 300 and rep.before["female"] > 100  # real COCO: men are over-represented
    # every term flips, and the pairs are one-to-one in count: the two totals exchange
    assert rep.after == {"male": rep.before["female"], "female": rep.before["male"]}
    assert rep.eligible == sum(1 for c in coco_captions if any(gender_terms(c)))
    assert rep.swapped == rep.eligible and sum(swapped) == rep.eligible
    assert rep.terms_after["woman"] == rep.terms_before["man"]
    # swapping twice restores every caption without the ambiguous her/him/hers
    plain = [c for c in coco_captions if not re.search(r"\b(her|him|hers)\b", c, re.I)]
    assert [swap_gender(swap_gender(c)) for c in plain] == plain
    # one direction only: every male term becomes female
    _, _, one = rebalance_gender(coco_captions, p=1.0, direction="male-to-female")
    assert one.after == {"male": 0, "female": rep.before["male"] + rep.before["female"]}


def test_rebalance_probability_and_seed(coco_captions):
    a, sa, ra = rebalance_gender(coco_captions, p=0.5, seed=1)
    b, sb, _ = rebalance_gender(coco_captions, p=0.5, seed=1)
    c, sc, _ = rebalance_gender(coco_captions, p=0.5, seed=2)
    assert a == b and sa == sb  # deterministic
    assert sa != sc
    n = ra.eligible
    assert abs(ra.swapped - n / 2) < 4 * (n * 0.25) ** 0.5  # binomial(n, 0.5) within 4 SD
    assert all(x == y for x, y, s in zip(a, coco_captions, sa) if not s)  # unswapped captions untouched
    _, none, r0 = rebalance_gender(coco_captions, p=0.0)
    assert not any(none) and r0.after == r0.before


def test_rebalance_cli_coco_jsonl_txt(tmp_path, coco_dir):
    data = json.loads((coco_dir / "captions_val2017.json").read_text())
    small = {**data, "images": data["images"][:50]}
    ids = {im["id"] for im in small["images"]}
    small["annotations"] = [a for a in data["annotations"] if a["image_id"] in ids]
    src = tmp_path / "coco.json"
    src.write_text(json.dumps(small))
    out, rep = tmp_path / "balanced.json", tmp_path / "rep.json"
    assert main(["-q", "corpus", "rebalance-gender", str(src), "--out", str(out), "--p", "1", "--seed", "0",
                 "--report", str(rep)]) == 0
    got = json.loads(out.read_text())
    assert [a["id"] for a in got["annotations"]] == [a["id"] for a in small["annotations"]]
    assert got["images"] == small["images"]
    assert [a["caption"] for a in got["annotations"]] == [swap_gender(a["caption"]) for a in small["annotations"]]
    r = json.loads(rep.read_text())
    assert r["after"]["male"] == r["before"]["female"] and r["direction"] == "both"

    jl = tmp_path / "balanced.jsonl"
    assert main(["-q", "corpus", "rebalance-gender", str(src), "--out", str(jl), "--direction", "female-to-male",
                 "--p", "1"]) == 0
    rows = [json.loads(x) for x in jl.read_text().splitlines()]
    assert len(rows) == len(small["annotations"]) and {"caption", "image_id", "id", "gender_swapped"} <= set(rows[0])
    assert all(gender_terms(r["caption"])[1] == [] for r in rows)
    assert main(["corpus", "rebalance-gender", str(tmp_path / "balanced.jsonl"), "--out", str(tmp_path / "x.json")]) == 2


# -- stats ----------------------------------------------------------------------------------------
def test_corpus_stats_exact():
    caps = ["A man rides a horse.", "A man rides a horse.", "Zoë's café is open", "two dogs"]
    s = corpus_stats(caps, top=3, max_length=4)
    assert s["captions"] == 4 and s["distinct_captions"] == 3 and s["duplicate_rate"] == 0.25
    assert s["words"] == 5 + 5 + 4 + 2 and s["vocabulary"] == 10
    assert s["length_histogram"] == {"2": 1, "4+": 3}
    assert s["top_words"] == {"a": 4, "man": 2, "rides": 2}
    assert "zoë's" in corpus_stats(caps, top=20)["top_content_words"]


def test_stats_cli_on_coco(tmp_path, coco_dir, capsys):
    src = tmp_path / "caps.txt"
    src.write_text("A dog on a bed.\n\n  \nA dog on a bed.\nA cat.\n", encoding="utf-8")
    out = tmp_path / "stats.json"
    assert main(["-q", "corpus", "stats", str(src), "--out", str(out)]) == 0
    s = json.loads(out.read_text())
    assert (s["captions"], s["empty_skipped"], s["distinct_captions"]) == (3, 2, 2)
    assert main(["-q", "corpus", "stats", str(coco_dir / "captions_val2014_subset.json"), "--top", "5"]) == 0
    text = capsys.readouterr().out
    assert "captions          24,019" in text and "top content words man (" in text
