"""Hub repo ids as checkpoints (offline, from a cache laid out as huggingface_hub lays it out), capdec push
(what can be checked without the Hub), and the generated model card."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from capdec.caption import Captioner
from capdec.checkpoint import load_checkpoint, save_checkpoint
from capdec.cli import main
from capdec.hub import HubError, is_repo_id, parse_repo_id, resolve_checkpoint
from capdec.model_card import CARD_DATA_FILE, MARKER, write_model_card
from capdec.noise import NoiseConfig

hf = pytest.importorskip("huggingface_hub")

REPO = "capdec-test/tiny-coco"
SHA = "0123456789abcdef0123456789abcdef01234567"  # a commit hash as the Hub writes them
TINY_MODEL = ["--prefix-length", "2", "--mapper", "mlp", "--max-length", "8", "--lm-dim", "32", "--lm-depth", "1",
              "--lm-heads", "2", "--vocab-size", "400"]
COCO_PHOTOS = ["000000000785.jpg", "COCO_val2014_000000000257.jpg", "COCO_val2014_000000000544.jpg"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, hf_store) -> Path:
    """A tiny checkpoint trained through the CLI on 300 real COCO captions (the session's tiny HF CLIP store)."""
    out = tmp_path_factory.mktemp("hub") / "tiny-coco"
    assert main(["-q", "train", str(hf_store), "--out", str(out), "--epochs", "1", "--batch-size", "64",
                 "--noise-variance", "0.01", *TINY_MODEL]) == 0
    return out


@pytest.fixture(scope="module")
def photos(coco_dir) -> list[Path]:
    return [coco_dir / "images" / name for name in COCO_PHOTOS]


def lay_out_hub_cache(cache: Path, repo_id: str, folder: Path, commit: str, refs: tuple[str, ...] = ("main",)) -> Path:
    """Copy ``folder`` into ``cache`` exactly as huggingface_hub stores a download: file contents in
    ``blobs/<hash>``, ``snapshots/<commit>/<path>`` relative symlinks to them, ``refs/<branch>`` holding the
    commit hash (no newline)."""
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if not path.is_file() or rel.parts[0] == "training":  # resolution never fetches the training state
            continue
        data = path.read_bytes()
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo_dir / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo_dir / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture()
def offline_cache(tmp_path, monkeypatch) -> Path:
    """HF_HOME / HF_HUB_CACHE in tmp_path, offline mode on (set as the user would, and in huggingface_hub's
    constants, which it reads from the environment when first imported)."""
    from huggingface_hub import constants

    home = tmp_path / "hf"
    cache = home / "hub"
    cache.mkdir(parents=True)
    for name, value in [("HF_HOME", str(home)), ("HF_HUB_CACHE", str(cache)), ("HF_HUB_OFFLINE", "1")]:
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


# -- repo ids and paths -----------------------------------------------------------------------------------


@pytest.mark.parametrize("text, parsed", [
    ("org/name", ("org/name", None)),
    ("my-org/capdec.coco_v2@v1.0", ("my-org/capdec.coco_v2", "v1.0")),
    (f"org/name@{SHA}", ("org/name", SHA)),
    ("org/name@refs/pr/3", ("org/name", "refs/pr/3")),
    ("name", None),                # no owner: a local path
    ("/abs/path", None), ("./org/name", None), ("~/org/name", None), ("a/b/c", None),
    ("org/../etc", None), ("org/name@", None), ("org/-name", None),
])
def test_parse_repo_id(text, parsed):
    assert parse_repo_id(text) == parsed


def test_an_existing_directory_wins_over_a_repo_id(checkpoint, tmp_path, monkeypatch, offline_cache):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(checkpoint, tmp_path / "capdec-test" / "tiny-coco")
    lay_out_hub_cache(offline_cache, REPO, checkpoint, SHA)
    assert not is_repo_id(REPO)
    assert resolve_checkpoint(REPO) == Path(REPO)  # the local copy, not the cached snapshot
    assert is_repo_id("capdec-test/other")


# -- resolution from the cache, offline -------------------------------------------------------------------


def test_checkpoint_resolves_from_the_hub_cache_offline(checkpoint, offline_cache, photos):
    snapshot = lay_out_hub_cache(offline_cache, REPO, checkpoint, SHA, refs=("main", "v1"))
    assert resolve_checkpoint(REPO) == snapshot
    assert resolve_checkpoint(f"{REPO}@v1") == snapshot
    assert resolve_checkpoint(f"{REPO}@{SHA}") == snapshot

    local = Captioner.from_pretrained(checkpoint, device="cpu")
    hub = Captioner.from_pretrained(REPO, device="cpu")
    assert hub.checkpoint.path == snapshot
    for a, b in zip(local.model.state_dict().values(), hub.model.state_dict().values()):
        assert torch.equal(a, b)
    assert hub.caption(photos) == local.caption(photos)


def test_cli_commands_take_a_repo_id(checkpoint, offline_cache, photos, tmp_path, capsys):
    lay_out_hub_cache(offline_cache, REPO, checkpoint, SHA)
    out = tmp_path / "caps.jsonl"
    assert main(["-q", "caption", REPO, *map(str, photos), "--out", str(out)]) == 0
    got = [json.loads(line)["caption"] for line in out.read_text().splitlines()]
    assert got == Captioner.from_pretrained(checkpoint, device="cpu").caption(sorted(photos, key=str))


@pytest.mark.parametrize("repo, reason", [
    ("capdec-test/not-there", "offline mode is on (HF_HUB_OFFLINE=1)"),
    (f"{REPO}@no-such-branch", "holds no copy of capdec-test/tiny-coco@no-such-branch"),
])
def test_a_repo_id_not_in_the_cache_is_a_clear_error(checkpoint, offline_cache, photos, capsys, repo, reason):
    lay_out_hub_cache(offline_cache, REPO, checkpoint, SHA)
    with pytest.raises(HubError, match="is not a local directory; as a Hugging Face Hub repo id") as err:
        resolve_checkpoint(repo)
    assert reason in str(err.value) and str(offline_cache) in str(err.value)
    assert main(["caption", repo, str(photos[0])]) == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("capdec caption: error:") and reason in stderr and "Traceback" not in stderr


# -- the model card ---------------------------------------------------------------------------------------


def test_training_writes_a_model_card(checkpoint, coco_caption_file):
    card = hf.ModelCard.load(checkpoint / "README.md")  # the Hub's own parser
    config = json.loads((checkpoint / "config.json").read_text())
    assert card.data.library_name == "capdec" and card.data.license == "unknown"
    assert card.data.pipeline_tag == "image-to-text" and "capdec" in card.data.tags
    text = card.text
    assert MARKER in text
    assert f"| {coco_caption_file.name} | txt | 300 |" in text  # the corpus, from the store's meta.json
    assert f"`hf:{config['encoder']['model']}` (32-d embeddings)" in text
    assert "| variance ε² | 0.01 |" in text and "| ε | 0.1 |" in text
    assert "| mapper | `mlp` |" in text and "| prefix length | 2 |" in text and "| max caption tokens | 8 |" in text
    assert "Not evaluated yet" in text
    assert f'Captioner.from_pretrained("path/to/{checkpoint.name}")' in text
    data = json.loads((checkpoint / CARD_DATA_FILE).read_text())
    assert data["training_data"][0]["captions"] == 300


def test_evaluate_records_metrics_and_push_round_trips_through_the_hub_layout(
        checkpoint, photos, coco_dir, tmp_path, offline_cache, capsys):
    ckpt = tmp_path / "tiny-coco"
    shutil.copytree(checkpoint, ckpt)
    preds, metrics = tmp_path / "preds.jsonl", tmp_path / "metrics.json"
    assert main(["-q", "caption", str(ckpt), *map(str, photos), "--out", str(preds)]) == 0
    assert main(["-q", "evaluate", str(preds), "--references", str(coco_dir / "images" / "captions.json"),
                 "--metrics", "Bleu,CIDEr", "--tokenizer", "simple", "--out", str(metrics),
                 "--checkpoint", str(ckpt), "--split", "test"]) == 0
    scores = json.loads(metrics.read_text())

    # push: offline it refuses clearly, after writing the card; --dry-run lists what would go up
    assert main(["push", str(ckpt), REPO, "--license", "cc-by-4.0"]) == 2
    err = capsys.readouterr().err
    assert "offline mode is on" in err and "README.md" in err and "Traceback" not in err
    assert main(["push", str(ckpt), REPO, "--dry-run"]) == 0
    listed = capsys.readouterr().out.split()
    assert {"README.md", "config.json", "model.safetensors", CARD_DATA_FILE} <= set(listed)
    assert not any(name.startswith("training/") for name in listed)  # the optimizer state stays home
    assert (ckpt / "training").is_dir()

    snapshot = lay_out_hub_cache(offline_cache, REPO, ckpt, SHA)
    card = hf.ModelCard.load(resolve_checkpoint(REPO) / "README.md")
    assert resolve_checkpoint(REPO) == snapshot
    assert card.data.license == "cc-by-4.0"  # kept from the refused push
    results = {r.metric_name: r for r in card.data.eval_results}
    assert set(results) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "CIDEr"}
    assert results["CIDEr"].metric_value == pytest.approx(scores["CIDEr"])
    assert results["CIDEr"].metric_type == "cider" and results["CIDEr"].dataset_name == "captions.json"
    assert results["CIDEr"].dataset_split == "test"
    assert f"| captions.json | 3 | {scores['Bleu_1']:.4g} |" in card.text
    assert f'Captioner.from_pretrained("{REPO}")' in card.text and f"capdec serve {REPO}" in card.text
    made = [json.loads(line)["caption"] for line in preds.read_text().splitlines()]  # photos are in sorted order
    assert Captioner.from_pretrained(REPO, device="cpu").caption(photos) == made


def test_push_refuses_bad_arguments(checkpoint, tmp_path, capsys):
    assert main(["push", str(checkpoint), "not a repo"]) == 2
    assert "is not a Hub repo id" in capsys.readouterr().err
    assert main(["push", str(checkpoint), f"{REPO}@main"]) == 2
    assert main(["push", str(tmp_path / "nothing"), REPO]) == 2
    assert "is not a checkpoint directory" in capsys.readouterr().err
    assert main(["evaluate", "x.jsonl", "--references", "y.json", "--checkpoint", str(tmp_path)]) == 2
    assert "not a local capdec checkpoint directory" in capsys.readouterr().err


def test_a_hand_written_card_is_kept_and_the_licence_survives_a_new_save(checkpoint, tmp_path):
    ckpt = tmp_path / "mine"
    shutil.copytree(checkpoint, ckpt)
    write_model_card(ckpt, license="mit")
    assert hf.ModelCard.load(ckpt / "README.md").data.license == "mit"

    loaded = load_checkpoint(ckpt, device="cpu")
    cfg = loaded.config

    def save_again() -> None:
        save_checkpoint(ckpt, loaded.model, encoder_spec=cfg["encoder"], encoder_identity=cfg["encoder_identity"],
                        noise=NoiseConfig(**cfg["noise"]), train=cfg["train"], extra={"data": cfg["data"]})

    save_again()  # a new version of the weights: the licence carries over, the card is regenerated
    assert hf.ModelCard.load(ckpt / "README.md").data.license == "mit"

    mine = "---\nlicense: apache-2.0\n---\n# My captioner\n\nWritten by hand.\n"
    (ckpt / "README.md").write_text(mine)
    assert write_model_card(ckpt, license="mit") is None
    save_again()
    assert (ckpt / "README.md").read_text() == mine
