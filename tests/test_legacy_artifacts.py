"""Artefacts written by the pre-restructure capdec (tests/data/legacy, see its README) still load, are
accepted as made by the same encoder, and give the same outputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from capdec.calibrate import read_noise_file
from capdec.caption import Captioner
from capdec.checkpoint import load_checkpoint, load_training_state
from capdec.cli import main
from capdec.encoders import check_identity, load_encoder
from capdec.images import load_image
from capdec.memory import TextMemory
from capdec.store import EmbeddingStore

LEGACY = Path(__file__).resolve().parent / "data" / "legacy"


@pytest.fixture(scope="module")
def toy():
    return load_encoder("toy", device="cpu")


@pytest.fixture(scope="module")
def legacy(tmp_path_factory) -> Path:
    """A copy (captioning and resuming write next to the files)."""
    out = tmp_path_factory.mktemp("legacy") / "legacy"
    shutil.copytree(LEGACY, out)
    return out


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_the_shipped_mini_clip_is_the_same_encoder(legacy, toy):
    store = EmbeddingStore.open(legacy / "store")
    check_identity(store.meta["encoder_identity"], toy.identity, what="legacy store")  # raises on a mismatch
    assert store.meta["encoder"] == toy.spec == {"kind": "toy", "weights": None}
    # and it embeds as it did: the store's rows are the captions' embeddings under today's encoder
    captions = [r["caption"] for r in store.records[:5]]
    now = toy.encode_text(captions).float()
    assert torch.allclose(now, torch.from_numpy(store.embeddings[:5].astype("float32")), atol=2e-3)


def test_the_legacy_store_loads(legacy):
    store = EmbeddingStore.open(legacy / "store")
    corpus = (legacy / "corpus.txt").read_text().splitlines()
    assert len(store) == store.meta["count"] == len(corpus) == 1000
    assert store.embeddings.shape == (1000, 128)
    assert [r["caption"] for r in store.records] == corpus


def test_the_legacy_noise_file_loads_and_matches_the_encoder(legacy, toy):
    noise = read_noise_file(legacy / "noise.json", encoder_identity=toy.identity)
    assert noise["epsilon"] == pytest.approx(0.12492, abs=5e-6)
    assert noise["variance"] == pytest.approx(noise["epsilon"] ** 2)


def test_the_legacy_text_memory_loads(legacy, toy):
    memory = TextMemory.load(legacy / "checkpoint" / "memory")
    store = EmbeddingStore.open(legacy / "store")
    check_identity(memory.encoder_identity, toy.identity, what="legacy memory")
    assert len(memory) == 980 and memory.dim == 128  # the training split
    assert set(memory.captions) <= {r["caption"] for r in store.records}


def test_the_legacy_checkpoint_loads_resumes_and_scores_as_before(legacy):
    ckpt = load_checkpoint(legacy / "checkpoint", device="cpu")
    assert ckpt.model is not None
    state, optimizer = load_training_state(legacy / "checkpoint")
    assert state["step"] == 620 and optimizer is not None

    cap = Captioner.from_pretrained(legacy / "checkpoint", device="cpu")
    pairs = _jsonl(legacy / "pairs.jsonl")
    emb = cap.embed_images([load_image(legacy / p["image"]) for p in pairs])
    expected = json.loads((legacy / "reference_outputs.json").read_text())
    assert emb[0, :8].tolist() == pytest.approx(expected["image_embedding_0_first8"], abs=1e-5)
    model = cap.model.eval()
    losses = []
    with torch.no_grad():
        for i, p in enumerate(pairs):
            ids, mask, _ = model.tokenize([p["caption"]])
            losses.append(float(model(cap.prepare(emb[i : i + 1]), ids, mask)))
    assert losses == pytest.approx(expected["caption_losses"], abs=1e-4)


@pytest.mark.parametrize("extra, recorded", [([], "captions_greedy.jsonl"),
                                             (["--project"], "captions_greedy_project.jsonl")])
def test_the_legacy_checkpoint_captions_as_the_old_code_did(legacy, tmp_path, extra, recorded, monkeypatch):
    monkeypatch.chdir(legacy)  # the recorded outputs name images relative to the fixture folder
    expected = _jsonl(legacy / recorded)
    # the old code captioned each image differently, so the pin sees how every image reaches the decoder
    assert len({row["caption"] for row in expected}) == len(expected) == 6
    out = tmp_path / "captions.jsonl"
    assert main(["-q", "caption", "checkpoint", "images", "--strategy", "greedy", *extra, "--out", str(out)]) == 0
    assert _jsonl(out) == expected


def test_a_legacy_run_plans_as_a_resume_with_its_recorded_configuration(legacy, tmp_path):
    from capdec.train import plan_training

    plan = plan_training(legacy / "store", legacy / "checkpoint", resume=True)
    recorded = json.loads((legacy / "checkpoint" / "config.json").read_text())
    assert plan.mode == "resume" and plan.state["step"] == 620 and plan.opt_state is not None
    planned = plan.config.to_dict()
    assert {k: planned[k] for k in recorded["train"]} == recorded["train"]
    # options added since (issues 12, 14) take their defaults, which keep the old behaviour
    assert {k: v for k, v in planned.items() if k not in recorded["train"]} == \
        {"keep_epochs": False, "keep_best": False, "val_store": None, "length_buckets": False, "compile": False}
    assert plan.noise.variance == recorded["noise"]["variance"]
    fresh = plan_training(legacy / "store", tmp_path / "new")
    assert fresh.mode == "new" and fresh.state == {"step": 0} and fresh.opt_state is None
    tuned = plan_training(legacy / "store", tmp_path / "tuned", init_from=legacy / "checkpoint")
    assert tuned.mode == "init_from" and tuned.init_from == legacy / "checkpoint"


def test_a_checkpoint_whose_noise_has_a_field_this_version_lacks_still_loads(legacy, tmp_path, caplog):
    # a checkpoint written by another capdec version (e.g. a newer noise shape) must still caption
    ckpt_dir = tmp_path / "checkpoint"
    shutil.copytree(legacy / "checkpoint", ckpt_dir)
    config = json.loads((ckpt_dir / "config.json").read_text())
    config["noise"] = {**config.get("noise", {}), "from_the_future": 1}
    (ckpt_dir / "config.json").write_text(json.dumps(config))
    with caplog.at_level("WARNING", logger="capdec.config_base"):
        noise = load_checkpoint(ckpt_dir, device="cpu").noise
    assert noise.variance == config["noise"]["variance"]
    assert "from_the_future" in caplog.text and str(ckpt_dir) in caplog.text
