"""Diversity diagnostics (capdec.metrics.diversity and ``capdec evaluate``'s "diversity" block)."""

from __future__ import annotations

import json

from capdec.cli import main
from capdec.metrics.diversity import caption_diversity, caption_key


def test_caption_diversity_exact():
    caps = {1: "A dog on a bed.", 2: "a dog on a bed", 3: "A DOG ON A BED!", 4: "Two cats sleep.", 5: "a red bus"}
    d = caption_diversity(caps, training=["a red bus", "Two cats sleep", "a dog on the bed"])
    assert caption_key("A dog, on a bed.") == "a dog on a bed"
    assert d["images"] == 5 and d["distinct_captions"] == 3 and d["distinct_share"] == 0.6
    assert d["most_common_caption"] == "A dog on a bed." and d["most_common_count"] == 3
    assert d["most_common_share"] == 0.6
    assert d["vocabulary"] == len({"a", "dog", "on", "bed", "two", "cats", "sleep", "red", "bus"})
    assert d["mean_words"] == (5 * 3 + 3 + 3) / 5
    assert d["training_distinct_captions"] == 3
    assert d["copied_from_training"] == 2 and d["copied_share"] == 0.4  # "a dog on the bed" is not a copy
    assert "copied_share" not in caption_diversity(caps)


def test_evaluate_reports_diversity_and_copies(tmp_path, coco_dir, hf_store):
    from capdec.store import EmbeddingStore

    refs = json.loads((coco_dir / "karpathy_test_refs.json").read_text())[:20]
    train_caps = EmbeddingStore.open(hf_store).captions
    # 20 predictions: 8 copies of one training caption, 4 other training captions, 8 own captions
    preds = [train_caps[0]] * 8 + train_caps[1:5] + [r["captions"][0] for r in refs[12:]]
    (tmp_path / "preds.jsonl").write_text("".join(json.dumps({"image_id": r["image_id"], "caption": c}) + "\n"
                                                  for r, c in zip(refs, preds)))
    (tmp_path / "refs.json").write_text(json.dumps(refs))
    own = [str(tmp_path / "preds.jsonl"), "--references", str(tmp_path / "refs.json"), "--metrics", "Bleu",
           "--tokenizer", "simple"]
    for corpus in (str(hf_store), str(tmp_path / "train.txt")):
        (tmp_path / "train.txt").write_text("\n".join(train_caps) + "\n")
        assert main(["-q", "evaluate", *own, "--out", str(tmp_path / "m.json"), "--train-corpus", corpus]) == 0
        d = json.loads((tmp_path / "m.json").read_text())["diversity"]
        assert (d["images"], d["distinct_captions"], d["most_common_count"]) == (20, 13, 8)
        assert d["copied_from_training"] == 12 and d["copied_share"] == 0.6
    assert main(["-q", "evaluate", *own, "--out", str(tmp_path / "n.json")]) == 0
    d = json.loads((tmp_path / "n.json").read_text())["diversity"]
    assert "copied_share" not in d and d["distinct_share"] == 13 / 20
