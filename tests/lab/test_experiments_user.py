"""The paper's experiments on the user's own data, through the CLI, on small real-format fixtures.

Training captions: real COCO captions (CC BY 4.0); test images: the CC-licensed COCO photos in
tests/data/coco/images with their 5 human captions; CLIP: a tiny random transformers CLIP. Decoders
are tiny and train a few steps: these tests check that each experiment runs end to end on real formats
and writes its table, not caption quality.
"""

from __future__ import annotations

import json

import pytest

from capdec.cli import main

TINY_DECODER = {"mapper": "mlp", "prefix_length": 2, "lm_dim": 32, "lm_depth": 1, "lm_heads": 2, "vocab_size": 300,
                "max_length": 40, "dropout": 0.0}


@pytest.fixture(autouse=True)
def no_java(monkeypatch):
    """Score without Java (Python tokenizer, no METEOR): the Java scorers are tested in test_metrics.py, and
    starting them for every decoder here would cost more than the experiments themselves."""
    import capdec.metrics.scorers

    monkeypatch.setattr(capdec.metrics.scorers, "_java", lambda: None)


@pytest.fixture(scope="module")
def user_data(coco_dir, tiny_hf_clip, hf_store, tmp_path_factory):
    """Stores, a test split and a decoder config as a user would have them."""
    photos = coco_dir / "images"
    root = tmp_path_factory.mktemp("user_data")
    caps = json.loads((photos / "captions.json").read_text())
    test = root / "test_refs.json"  # the karpathy_test_refs.json layout: [{file_name, captions}]
    test.write_text(json.dumps([{"file_name": n, "captions": c} for n, c in caps.items()]))
    meta = json.loads((photos / "images_meta.json").read_text())
    karpathy = root / "dataset_coco.json"  # the Karpathy split file layout; its test split: 5 of the photos
    karpathy.write_text(json.dumps({"dataset": "coco", "images": [
        {"filepath": "val2014", "filename": n, "cocoid": meta[n]["image_id"],
         "split": "test" if meta[n]["in_karpathy_test"] else "train", "sentences": [{"raw": x} for x in c]}
        for n, c in caps.items()]}))
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"image": str(photos / n), "caption": c[0]}) + "\n" for n, c in caps.items()))
    image_store = root / "image_store"
    assert main(["-q", "embed", str(pairs), "--modality", "image", "--out", str(image_store),
                 "--encoder", tiny_hf_clip]) == 0
    noise = root / "noise.json"
    assert main(["-q", "calibrate", str(pairs), "--encoder", tiny_hf_clip, "--out", str(noise)]) == 0
    decoder = root / "decoder.json"
    decoder.write_text(json.dumps(TINY_DECODER))
    return {"store": hf_store, "image_store": image_store, "test": test, "karpathy": karpathy, "images": photos, "noise": noise,
            "decoder": decoder, "root": root, "captions": caps}


def _budget(d) -> list[str]:
    return ["--steps", "3", "--batch-size", "16", "--model-config", str(d["decoder"]), "--strategy", "greedy",
            "--device", "cpu"]


def test_sweep_on_user_data_resumes_and_marks_calibrated(user_data, tmp_path, capsys):
    d = user_data
    out = tmp_path / "sweep"
    args = ["-q", "sweep", "--store", str(d["store"]), "--test", str(d["test"]), "--images-root", str(d["images"]),
            "--variances", "0", "0.01", "--seeds", "0", "1", "--noise-file", str(d["noise"]), "--out", str(out),
            *_budget(d)]
    assert main(args) == 0
    summary = json.loads((out / "sweep.json").read_text())
    cal = json.loads(d["noise"].read_text())["variance"]
    assert [r["variance"] for r in summary["rows"]] == sorted({0.0, 0.01, cal})
    assert [r["calibrated"] for r in summary["rows"]] == [r["variance"] == cal for r in summary["rows"]]
    assert all(len(r["per_seed"]["CIDEr"]) == 2 and r["se"]["CIDEr"] >= 0 for r in summary["rows"])
    assert summary["data"]["test_images_scored"] == 17 and summary["config"]["n_test"] == 17
    md = (out / "sweep.md").read_text()
    assert "calibrated" in md and f"Store {d['store']}" in md and (out / "sweep.png").stat().st_size > 10_000
    # resumable: a rerun trains and scores nothing again and gives the same table
    stamps = {p: p.stat().st_mtime_ns for p in (out / "results").iterdir()}
    capsys.readouterr()
    assert main(args) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "results").iterdir()} == stamps
    assert json.loads((out / "sweep.json").read_text())["rows"] == summary["rows"]
    # another store is another sweep: refused in the same directory
    assert main([*args[:2], "--store", str(d["image_store"]), *args[4:]]) == 2
    assert "a image store, but this needs a text store" in capsys.readouterr().err


def test_compare_table1(user_data, tmp_path, capsys):
    d = user_data
    out = tmp_path / "compare"
    # the test split of a Karpathy-format file (dataset_coco.json --split test)
    assert main(["-q", "experiment", "compare", "--store", str(d["store"]), "--image-store", str(d["image_store"]),
                 "--test", str(d["karpathy"]), "--split", "test", "--images-root", str(d["images"]), "--out", str(out),
                 *_budget(d)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert list(m["results"]) == ["capdec", "no_noise", "supervised", "shifted"]
    assert all(r["CIDEr"] is not None and "CIDEr_se" in r for r in m["results"].values())
    assert m["n_test_images"] == 5 and m["noise_variance"] == 0.016 and m["data"]["image_store"]
    assert m["data"]["test"]["format"] == "karpathy" and m["data"]["test"]["split"] == "test"
    assert m["clip"] == {}  # no toy mini-CLIP card for a real encoder
    rows = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    first = rows[0]["file"].rsplit("/", 1)[-1]
    assert len(rows) == 5 and rows[0]["image"] == json.loads((d["images"] / "images_meta.json").read_text())[first]["image_id"]
    assert rows[0]["references"] == [" ".join(c.split()) for c in d["captions"][first]]
    assert set(rows[0]) >= {"capdec", "no_noise", "supervised", "shifted"}
    sup = json.loads((out / "runs" / "supervised" / "config.json").read_text())
    assert sup["data"]["modality"] == "image" and sup["noise"]["variance"] == 0.0
    html = (out / "report.html").read_text()
    assert "text-only vs supervised vs no noise" in html and html.count("<div class='card'>") == 5
    # the same directory with other inputs would reuse these checkpoints: refused
    assert main(["-q", "experiment", "compare", "--store", str(d["store"]), "--image-store", str(d["image_store"]),
                 "--test", str(d["karpathy"]), "--split", "test", "--images-root", str(d["images"]), "--out", str(out),
                 *_budget(d), "--noise-variance", "0.1"]) == 2
    assert "holds an experiment with other settings (config differ)" in capsys.readouterr().err
    # a Karpathy file holds several splits: the one to score must be named
    assert main(["-q", "experiment", "compare", "--store", str(d["store"]), "--image-store", str(d["image_store"]),
                 "--test", str(d["karpathy"]), "--images-root", str(d["images"]), "--out", str(tmp_path / "x"),
                 *_budget(d)]) == 2
    assert "name the split to score with --split" in capsys.readouterr().err


def test_cross_domain_table2(user_data, coco_dir, tiny_hf_clip, tmp_path):
    d = user_data
    # a second domain: other real COCO captions (the 2014 slice), and the photos' references as JSONL
    anns = json.loads((coco_dir / "captions_val2014_subset2.json").read_text())["annotations"][:200]
    other = tmp_path / "other.txt"
    other.write_text("".join(a["caption"].strip() + "\n" for a in anns))
    other_store = tmp_path / "other_store"
    assert main(["-q", "embed", str(other), "--out", str(other_store), "--encoder", tiny_hf_clip]) == 0
    test_b = tmp_path / "test_b.jsonl"
    test_b.write_text("".join(json.dumps({"image": n, "caption": c}) + "\n"
                              for n, cs in list(d["captions"].items())[:8] for c in cs))
    out = tmp_path / "xdomain"
    assert main(["-q", "experiment", "cross-domain", "--domain", "a", str(d["store"]), str(d["test"]), str(d["images"]),
                 "--domain", "b", str(other_store), str(test_b), str(d["images"]), "--out", str(out),
                 *_budget(d)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert sorted(m["results"]) == sorted(f"{t}→{e} {v}" for t in "ab" for e in "ab" for v in ("noise", "no_noise"))
    assert m["n_test_images"] == {"a": 17, "b": 8}
    assert m["domains"]["b"]["captions"] == 200 and m["results"]["a→b noise"]["noise"] == 0.016
    assert "a ↔ b" in (out / "report.html").read_text()


def test_styles_with_finetuning(user_data, coco_dir, tiny_hf_clip, tmp_path):
    d = user_data
    # a "style" made with the corpus tools: every gendered term female (training text and test references)
    styled_txt = tmp_path / "female.txt"
    store_caps = (d["store"] / "captions.jsonl").read_text().splitlines()
    (tmp_path / "factual.txt").write_text("".join(json.loads(r)["caption"] + "\n" for r in store_caps))
    assert main(["-q", "corpus", "rebalance-gender", str(tmp_path / "factual.txt"), "--out", str(styled_txt),
                 "--direction", "male-to-female", "--p", "1"]) == 0
    styled_store = tmp_path / "female_store"
    assert main(["-q", "embed", str(styled_txt), "--out", str(styled_store), "--encoder", tiny_hf_clip]) == 0
    from capdec.corpus_tools import swap_gender

    styled_refs = tmp_path / "female_refs.json"
    styled_refs.write_text(json.dumps([{"file_name": n, "captions": [swap_gender(c, "male-to-female") for c in cs]}
                                       for n, cs in d["captions"].items()]))
    out = tmp_path / "styles"
    assert main(["-q", "experiment", "styles", "--store", str(d["store"]), "--style", "female", str(styled_store),
                 str(styled_refs), "--images-root", str(d["images"]), "--finetune-steps", "2", "--out", str(out),
                 *_budget(d)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert list(m["results"]["female"]) == ["factual", "style_only", "finetuned"]
    row = m["results"]["female"]["finetuned"]
    assert row["CIDEr"] is not None and 0 <= row["style_accuracy"] <= 1 and "style_accuracy_se" in row
    assert m["style_sentences"] == {"female": 300} and m["finetune_steps"] == 2
    tuned = json.loads((out / "runs" / "female_finetuned" / "config.json").read_text())
    assert tuned["init_from"] == str(out / "runs" / "factual")
    assert "style-guided captioning" in (out / "report.html").read_text()
