"""Fine-tuning (--init-from), corpus mixing (--mix-weights), the toy styles and domains, and the
style/cross-domain demos at a tiny budget."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from capdec.cli import main
from capdec.lab import toyworld
from capdec.lab.toyworld.styles import DOMAINS, StyleClassifier, train_style_classifier

TINY_MODEL = ["--prefix-length", "4", "--mapper-depth", "1", "--mapper-heads", "2", "--max-length", "32",
              "--lm-dim", "32", "--lm-depth", "2", "--lm-heads", "2", "--vocab-size", "400"]


@pytest.fixture(scope="module")
def styled_store(tmp_path_factory, tiny_hf_clip) -> Path:
    """200 romantic toy-world sentences embedded with the same tiny HF CLIP as ``hf_store``."""
    d = tmp_path_factory.mktemp("styled")
    (d / "romantic.txt").write_text("\n".join(toyworld.corpus(200, grammar="romantic")) + "\n", encoding="utf-8")
    assert main(["-q", "embed", str(d / "romantic.txt"), "--out", str(d / "store"), "--encoder", tiny_hf_clip]) == 0
    return d / "store"


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory, hf_store) -> Path:
    out = tmp_path_factory.mktemp("base") / "ckpt"
    assert main(["-q", "train", str(hf_store), "--out", str(out), "--max-steps", "20", "--batch-size", "32",
                 "--lr", "2e-3", *TINY_MODEL]) == 0
    return out


def _distance(a: Path, b: Path) -> float:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    return sum(float((wa[k].float() - wb[k].float()).pow(2).sum()) for k in wa) ** 0.5


def test_init_from_fine_tunes_the_checkpoint(tmp_path, base_ckpt, styled_store):
    tuned, frozen = tmp_path / "tuned", tmp_path / "frozen"
    # no model flags: the checkpoint's architecture and tokenizer are kept
    assert main(["-q", "train", str(styled_store), "--out", str(tuned), "--init-from", str(base_ckpt),
                 "--max-steps", "10", "--batch-size", "32", "--lr", "5e-4"]) == 0
    # a vanishing learning rate leaves the starting weights: they must be the checkpoint's
    assert main(["-q", "train", str(styled_store), "--out", str(frozen), "--init-from", str(base_ckpt),
                 "--max-steps", "10", "--batch-size", "32", "--lr", "1e-12", "--weight-decay", "0"]) == 0
    base_cfg = json.loads((base_ckpt / "config.json").read_text())
    cfg = json.loads((tuned / "config.json").read_text())
    assert cfg["model"] == base_cfg["model"]
    assert cfg["init_from"] == str(base_ckpt)
    assert (tuned / "tokenizer" / "tokenizer.json").read_text() == (base_ckpt / "tokenizer" / "tokenizer.json").read_text()
    assert _distance(frozen, base_ckpt) < 1e-6
    assert _distance(tuned, base_ckpt) > 1e-2


def test_init_from_refuses_another_decoder_architecture(tmp_path, base_ckpt, styled_store, capsys):
    out = tmp_path / "tuned"
    code = main(["train", str(styled_store), "--out", str(out), "--init-from", str(base_ckpt), "--lm-dim", "64",
                 "--max-steps", "2"])
    assert code == 2
    err = capsys.readouterr().err
    assert "architecture differs" in err and "lm_dim: 32 vs 64" in err
    assert not out.exists()


def test_init_from_refuses_a_checkpoint_of_another_encoder(tmp_path, base_ckpt, coco_caption_file, tiny_open_clip,
                                                           capsys):
    store, out = tmp_path / "oc_store", tmp_path / "tuned"
    assert main(["-q", "embed", str(coco_caption_file), "--out", str(store), "--encoder", tiny_open_clip]) == 0
    capsys.readouterr()
    assert main(["train", str(store), "--out", str(out), "--init-from", str(base_ckpt), "--max-steps", "2"]) == 2
    err = capsys.readouterr().err
    assert "--init-from" in err and "encoder" in err
    assert not out.exists()


def test_mixing_two_corpora_by_weight(tmp_path, hf_store, styled_store, capsys):
    out = tmp_path / "mix"
    assert main(["-q", "train", str(hf_store), str(styled_store), "--mix-weights", "1", "3", "--out", str(out),
                 "--max-steps", "4", "--batch-size", "16", *TINY_MODEL]) == 0
    data = json.loads((out / "config.json").read_text())["data"]
    assert data["mix_weights"] == [1.0, 3.0] and data["count"] == 500 and len(data["stores"]) == 2
    # the tokenizer was trained on both corpora: toy-world words (absent from the COCO captions) are whole tokens
    vocab = json.loads((out / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
    assert {"Ġtriangle", "Ġdiamond"} <= set(vocab)

    # a weight per store is required, and weights must make sense
    capsys.readouterr()
    assert main(["train", str(hf_store), str(styled_store), "--mix-weights", "1", "--out", str(tmp_path / "bad"),
                 *TINY_MODEL]) == 2
    assert "1 mixing weights given for 2 stores" in capsys.readouterr().err
    assert main(["train", str(hf_store), str(styled_store), "--mix-weights", "0", "0", "--out",
                 str(tmp_path / "bad"), *TINY_MODEL]) == 2
    assert "not all 0" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_mix_weights_set_the_sampling_shares(hf_store, styled_store):
    from capdec.train import epoch_order, load_text_data

    data = load_text_data([hf_store, styled_store], [1.0, 3.0])
    order = epoch_order(len(data.captions), 0, seed=0, weights=data.sample_weights)
    share_styled = float((order >= 300).float().mean())
    assert abs(share_styled - 0.75) < 0.06  # 500 draws; weight 3 of 4 goes to the 200 styled captions


# -- the toy world's styles and domains ------------------------------------------------------------------
@pytest.mark.parametrize("style", toyworld.STYLES)
def test_styled_captions_keep_the_facts(style):
    for scene in toyworld.sample_scenes(30, seed=3, split="test"):
        factual_words = set()
        for cap in toyworld.captions(scene, 5, grammar="default"):
            factual_words |= set(toyworld.tokenize_words(cap))
        for cap in toyworld.captions(scene, 3, grammar=style):
            words = set(toyworld.tokenize_words(cap))
            for obj in scene.objects:  # every object's colour is named, in the style too
                colours = set(toyworld.get_grammar(style).lexicon.colours[obj.colour])
                assert words & colours, (cap, obj)
    g = toyworld.get_grammar(style)
    assert g.openers and g.closers and g.p_styled == 1.0


def test_style_classifier_separates_styles_it_was_trained_on():
    clf = train_style_classifier(400, seed=0)
    assert set(clf.labels) == {"factual", *toyworld.STYLES}
    for style, grammar in (("factual", "default"), ("romantic", "romantic"), ("humorous", "humorous")):
        _, refs = toyworld.test_set(40, seed=1, grammar=grammar)
        assert clf.accuracy([r[0] for r in refs], style) > 0.9, style
    with pytest.raises(Exception, match="two styles"):
        StyleClassifier.fit(["a", "b"], ["x", "x"])


def test_domains_differ_like_coco_and_flickr():
    coco, flickr = DOMAINS["coco"], DOMAINS["flickr"]
    words = {}
    for d in (coco, flickr):
        caps = list(toyworld.corpus(400, seed=0, grammar=d.grammar, world=d.world_config))
        words[d.name] = [toyworld.tokenize_words(c) for c in caps]
    mean_len = {k: sum(map(len, v)) / len(v) for k, v in words.items()}
    assert mean_len["flickr"] > 1.2 * mean_len["coco"]
    vocab = {k: {w for ws in v for w in ws} for k, v in words.items()}
    assert "circle" in vocab["coco"] and "circle" not in vocab["flickr"] and "disc" in vocab["flickr"]
    scenes = {d.name: toyworld.sample_scenes(300, seed=0, world=d.world_config) for d in (coco, flickr)}
    n_obj = {k: sum(len(s.objects) for s in v) / len(v) for k, v in scenes.items()}
    assert n_obj["flickr"] > n_obj["coco"] + 0.3
    assert all(s.background != "white" for s in scenes["flickr"])
    # the mini-CLIP knows every word of both domains
    from capdec.encoders.miniclip import load_pretrained

    tok = load_pretrained().tokenizer
    assert tok.count_unknown([" ".join(ws) for v in words.values() for ws in v]) == 0


# -- the demos ------------------------------------------------------------------------------------------
TINY_DEMO = ["--captions", "300", "--test-images", "10", "--steps", "8", "--batch-size", "32", "--strategy", "greedy"]


def test_demo_styles_tiny(tmp_path):
    out = tmp_path / "styles"
    assert main(["-q", "demo", "--styles", "--out", str(out), "--style-sentences", "120", "--finetune-steps", "4",
                 *TINY_DEMO]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["results"]) == set(toyworld.STYLES)
    for rows in m["results"].values():
        assert set(rows) == {"factual", "style_only", "finetuned"}
        for row in rows.values():
            for k in ("Bleu_1", "Bleu_3", "METEOR", "CIDEr", "CIDEr_se", "style_accuracy", "style_accuracy_se"):
                assert row[k] is not None, k
    assert m["finetune_steps"] == 4
    tuned_cfg = json.loads((out / "runs" / "romantic_finetuned" / "config.json").read_text())
    assert tuned_cfg["init_from"].endswith("factual")
    html = (out / "report.html").read_text()
    assert "romantic" in html and "style_accuracy" in html


def test_demo_cross_domain_tiny(tmp_path, capsys):
    out = tmp_path / "xd"
    assert main(["-q", "demo", "--cross-domain", "--out", str(out), *TINY_DEMO]) == 0
    m = json.loads((out / "metrics.json").read_text())
    keys = {f"{a}→{b} {n}" for a in ("coco", "flickr") for b in ("coco", "flickr") for n in ("noise", "no_noise")}
    assert set(m["results"]) == keys
    assert all(r["CIDEr"] is not None and "CIDEr_se" in r for r in m["results"].values())
    assert m["domains"]["flickr"]["mean_caption_words"] > m["domains"]["coco"]["mean_caption_words"]
    assert "coco→flickr" in (out / "report.html").read_text()
    capsys.readouterr()
    assert main(["demo", "--cross-domain", "--compare", "--out", str(tmp_path / "x2"), *TINY_DEMO]) == 2
    assert "separate experiments" in capsys.readouterr().err
