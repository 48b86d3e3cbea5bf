"""Training on a mix of text and image stores (e.g. captions + pseudo-pairs of unlabelled images).

The noise (and the modality offset) is CapDec's stand-in for the gap between a caption's embedding and its
image's: it belongs on the text rows only. An image store's rows are what the decoder will see at caption
time and are given to it as the captioner gives an image (normalised). Checked on small stores of random
unit rows (tests/tiny_stores.py), against values worked out here from the equations.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from capdec.cli import main
from capdec.configs import ModelConfig, NoiseConfig, TrainConfig
from capdec.noise import add_noise
from capdec.textdata import load_text_data
from tiny_stores import make_store

N, DIM = 40, 16
OFFSET = [0.3] + [0.0] * (DIM - 1)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed_stores")
    return {"text": make_store(root / "text", n=N, dim=DIM), "image": make_store(root / "image", n=N, dim=DIM,
                                                                                  modality="image", seed=2)}


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _vectors(store) -> np.ndarray:
    """Each row's stored vector (an image store's through its caption -> image map), as float64 unit rows."""
    from capdec.store import EmbeddingStore

    s = EmbeddingStore.open(store)
    v = np.asarray(s.vectors, dtype=np.float64)
    return _unit(v if s.row_index is None else v[np.asarray(s.row_index)])


def test_only_the_text_rows_of_a_mix_get_noise_and_offset(stores):
    from capdec.train.loop import _model_input

    data = load_text_data([stores["text"], stores["image"]])
    assert data.modality == "mixed"
    idx = torch.from_numpy(np.random.default_rng(0).permutation(2 * N))
    image = idx.numpy() >= N  # rows are numbered across the stores in order: the image store's come second
    assert np.array_equal(data.image_rows(idx), image)
    clean = data.embeddings_at(idx).float()
    raw = np.concatenate([_vectors(stores["text"]), _vectors(stores["image"])])[idx.numpy()]
    noise = NoiseConfig(variance=0.05, offset=OFFSET)

    emb = _model_input(data, idx, clean, noise, generator=torch.Generator().manual_seed(7)).double().numpy()
    np.testing.assert_allclose(emb[image], raw[image], atol=1e-6)  # an image row: the normalised image, as captioned
    drawn = add_noise(clean, noise, generator=torch.Generator().manual_seed(7)).double().numpy()
    np.testing.assert_allclose(emb[~image], drawn[~image], atol=1e-6)  # a text row: the noise of the whole batch
    assert (emb[~image] * raw[~image]).sum(-1).max() < 0.99  # ... which moved it

    # the validation input: no noise, but the offset on text rows only: normalise(normalise(t) + offset)
    val = _model_input(data, idx, clean, noise, sample=False).double().numpy()
    np.testing.assert_allclose(val[image], raw[image], atol=1e-6)
    np.testing.assert_allclose(val[~image], _unit(raw[~image] + np.array(OFFSET)), atol=1e-6)


def test_one_modality_keeps_one_noise_setting(stores):
    """Text stores alone, and an image store alone (ClipCap, where noise is given only when asked), are
    unchanged: every row gets the configured noise."""
    from capdec.train.loop import _model_input

    for name in ("text", "image"):
        data = load_text_data([stores[name], stores[name]])
        assert data.modality == name and data.image_rows(torch.arange(2 * N)) is None
        idx = torch.arange(2 * N)
        clean = data.embeddings_at(idx).float()
        noise = NoiseConfig(variance=0.05)
        emb = _model_input(data, idx, clean, noise, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(emb, add_noise(clean, noise, generator=torch.Generator().manual_seed(3)))


def test_a_training_run_on_a_mix_feeds_image_rows_clean(stores, tmp_path, monkeypatch):
    """Through the training loop: every mapper input in training and validation is either an image row exactly
    (normalised) or a text row moved by the noise (training) / the offset (validation) — never a clean text row,
    never a noised image row. Half the rows are images, so both kinds must turn up."""
    from capdec.model import CapDecModel
    from capdec.train import plan_training, train

    seen: list[tuple[bool, torch.Tensor]] = []
    forward = CapDecModel.forward

    def spy(self, emb, *args, **kw):
        seen.append((self.training, emb.detach().double().clone()))
        return forward(self, emb, *args, **kw)

    monkeypatch.setattr(CapDecModel, "forward", spy)
    model = ModelConfig(embed_dim=DIM, mapper="mlp", prefix_length=2, lm_dim=32, lm_depth=1, lm_heads=2,
                        vocab_size=300)
    cfg = TrainConfig(epochs=1, batch_size=16, max_steps=3, val_fraction=0.2, eval_every=3, log_every=1,
                      save_memory=True)
    train([stores["text"], stores["image"]], tmp_path / "run", model_config=model,
          noise=NoiseConfig(variance=0.05, offset=OFFSET), config=cfg, show_progress=False)
    images, texts = _vectors(stores["image"]), _vectors(stores["text"])
    for training in (True, False):
        rows = torch.cat([e for t, e in seen if t == training]).numpy()
        is_image = (rows @ images.T).max(1) > 1 - 1e-6
        assert 0 < is_image.sum() < len(rows), (training, is_image.sum(), len(rows))
        assert (rows[~is_image] @ texts.T).max() < 0.999  # every text row was moved
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    assert recorded["data"]["modality"] == "mixed"
    # the saved memory (for --project at caption time) holds the training captions' text embeddings only
    memory = np.load(tmp_path / "run" / "memory" / "store" / "embeddings.npy").astype(np.float64)
    assert ((memory @ texts.T).max(1) > 1 - 1e-6).all() and ((memory @ images.T).max(1) < 1 - 1e-6).all()
    split = plan_training([stores["text"], stores["image"]], tmp_path / "again", model_config=model,
                          noise=NoiseConfig(variance=0.05, offset=OFFSET), config=cfg).split
    assert len(memory) == int((split.train_idx < N).sum()) > 0  # every text row trained on, once


def test_center_is_refused_on_a_mix(stores, tmp_path, capsys):
    mean = tmp_path / "mean.json"
    mean.write_text(json.dumps([0.0] * DIM))
    rc = main(["-q", "train", str(stores["text"]), str(stores["image"]), "--out", str(tmp_path / "o"), "--center",
               "--image-mean", str(mean), "--lm", "scratch", "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2 and "--center cannot be used with a mix of text and image stores" in err, err
    assert not (tmp_path / "o").exists()


def test_retrieval_is_refused_on_a_mix(stores, tmp_path, capsys):
    for flags in (["--retrieval-k", "2"], ["--entity-prompt"]):
        rc = main(["-q", "train", str(stores["text"]), str(stores["image"]), "--out", str(tmp_path / "o"), *flags,
                   "--lm", "scratch", "--dry-run"])
        err = capsys.readouterr().err
        assert rc == 2 and "cannot be used with a mix of text and image stores" in err, (flags, err)
