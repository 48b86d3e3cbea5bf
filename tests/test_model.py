"""The decoder: mappers, real padding, end-of-sequence, and the checkpoint round trip."""

from __future__ import annotations

import pytest
import torch

from capdec.caption import Captioner
from capdec.checkpoint import InferenceConfig, load_checkpoint, save_checkpoint
from capdec.errors import InputError
from capdec.model import IGNORE_INDEX, MLPMapper, ModelConfig, TransformerMapper, build_model
from capdec.noise import NoiseConfig

CAPTIONS = ["a red circle left of a blue square", "two green triangles on a white background",
            "a small yellow star above a big red circle", "three blue squares in a row"] * 10


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(ModelConfig(embed_dim=16, prefix_length=3, mapper_depth=1, mapper_heads=2, lm_dim=32,
                                   lm_depth=1, lm_heads=2, vocab_size=400, max_length=12, dropout=0.0),
                       captions=CAPTIONS)


@pytest.mark.parametrize("mapper", [MLPMapper(dim=16, hidden=24, prefix_length=5),
                                    TransformerMapper(dim=16, hidden=24, prefix_length=5, clip_length=3, depth=2,
                                                      heads=4)])
def test_mappers_make_prefixes(mapper):
    out = mapper(torch.randn(7, 16))
    assert out.shape == (7, 5, 24) and torch.isfinite(out).all()


def test_tokenize_appends_eos_and_pads_with_a_masked_non_token(model):
    ids, mask, cut = model.tokenize(["a red circle", "two green triangles on a white background"])
    eos = model.eos_token_id
    for row, m in zip(ids, mask):
        n = int(m.sum())
        assert row[n - 1] == eos and eos not in row[: n - 1].tolist()
        assert (row[n:] == model.pad_token_id).all()
    assert model.tokenizer.pad_token_id not in (eos, None)
    assert cut == 0
    long_ids, _, cut = model.tokenize(["a " * 50])
    assert cut == 1 and long_ids.shape[1] == model.config.max_length


def test_loss_ignores_padding(model):
    model.eval()
    emb = torch.randn(2, 16)
    ids, mask, _ = model.tokenize(["a red circle", "two green triangles on a white background"])
    loss = model(emb, ids, mask)
    other = ids.masked_fill(mask == 0, 5)  # different filler under the mask: same loss
    assert torch.allclose(loss, model(emb, other, mask))
    assert IGNORE_INDEX < 0


def test_decode_ids_stops_at_eos(model):
    ids, _, _ = model.tokenize(["a red circle"])
    row = ids[0].tolist() + model.tokenizer("two blue", add_special_tokens=False)["input_ids"]
    assert model.decode_ids([row]) == ["a red circle"]


def test_checkpoint_round_trip(model, tmp_path):
    out = save_checkpoint(tmp_path / "ck", model, encoder_spec={"kind": "toy"}, encoder_identity={"kind": "toy"},
                          noise=NoiseConfig(variance=0.02), inference=InferenceConfig(shift=[0.0] * 16))
    ck = load_checkpoint(out, device="cpu")
    assert ck.noise.variance == 0.02 and ck.model_config.prefix_length == 3
    assert not ck.model.training
    emb = torch.randn(2, 16)
    ids, mask, _ = model.tokenize(["a red circle", "three blue squares"])
    model.eval()
    assert torch.allclose(model(emb, ids, mask), ck.model(emb, ids, mask))
    with pytest.raises(InputError, match="dimension"):
        Captioner(ck).prepare(torch.randn(2, 8))


def test_bad_model_configs():
    with pytest.raises(InputError):
        ModelConfig(mapper="lstm")
    with pytest.raises(InputError):
        ModelConfig(lm_dim=30, lm_heads=4)
    with pytest.raises(InputError, match="empty"):
        build_model(ModelConfig(), captions=[])


def test_a_frozen_lm_stays_in_eval_mode_while_training(tiny_gpt2_dir):
    """ClipCap's prefix-only model keeps its frozen GPT-2 in eval mode: no dropout in the frozen LM."""
    cfg = ModelConfig(embed_dim=16, prefix_length=3, mapper="mlp", lm=str(tiny_gpt2_dir), freeze_lm=True,
                      max_length=20)
    model = build_model(cfg)
    assert model.lm.config.resid_pdrop > 0  # the LM has dropout to switch off
    model.train()
    assert model.mapper.training and not any(m.training for m in model.lm.modules())
    ids, mask, _ = model.tokenize(CAPTIONS[:4])
    emb = torch.randn(4, 16)
    torch.manual_seed(1)
    first = model(emb, ids, mask)
    torch.manual_seed(2)
    assert torch.equal(first, model(emb, ids, mask))  # same loss under different dropout seeds
    model.config.freeze_lm = False  # a fine-tuned LM trains with its dropout
    model.train()
    assert model.lm.training


def test_old_checkpoint_configs_keep_the_legacy_mapper():
    legacy = ModelConfig.from_dict({"embed_dim": 16, "mapper": "transformer", "prefix_length": 3})
    assert legacy.mapper_variant == "legacy" and ModelConfig().mapper_variant == "clipcap"
    cfg = dict(embed_dim=16, prefix_length=3, mapper_depth=1, mapper_heads=2, lm_dim=32, lm_depth=1, lm_heads=2,
               vocab_size=400, max_length=12)
    assert isinstance(build_model(ModelConfig.from_dict(cfg), captions=CAPTIONS).mapper, TransformerMapper)
    from capdec.model.mapper import ClipCapTransformerMapper

    assert isinstance(build_model(ModelConfig(**cfg), captions=CAPTIONS).mapper, ClipCapTransformerMapper)


def test_a_checkpoint_written_before_mapper_variant_loads_and_decodes_as_before(tmp_path):
    """A config.json without mapper_variant / stop_at_period (capdec before them) rebuilds the GELU mapper."""
    import json

    from capdec.decode import generate

    torch.manual_seed(0)
    cfg = ModelConfig(embed_dim=16, prefix_length=3, mapper_depth=1, mapper_heads=2, lm_dim=32, lm_depth=1,
                      lm_heads=2, vocab_size=400, max_length=12, mapper_variant="legacy")
    old = build_model(cfg, captions=CAPTIONS).eval()
    save_checkpoint(tmp_path / "ckpt", old, encoder_spec={"backend": "toy"}, encoder_identity={"backend": "toy"},
                    noise=NoiseConfig())
    config_file = tmp_path / "ckpt" / "config.json"
    config = json.loads(config_file.read_text())
    del config["model"]["mapper_variant"], config["model"]["stop_at_period"]
    config_file.write_text(json.dumps(config))
    loaded = load_checkpoint(tmp_path / "ckpt", device="cpu").model
    assert isinstance(loaded.mapper, TransformerMapper) and loaded.config.mapper_variant == "legacy"
    x = torch.randn(4, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.prefix(x), old.prefix(x), atol=0, rtol=0)
        assert generate(loaded, loaded.prefix(x), strategy="beam") == generate(old, old.prefix(x), strategy="beam")
