"""ClipCap-exact mappers and ``capdec import`` of ClipCap / CapDec state dicts.

The state dicts are built here with the reference's key names (rmokady/CLIP_prefix_caption and
DavidHuji/CapDec ``train.py``: ``clip_project.*`` + ``gpt.*``, the stale ``attn.bias`` /
``attn.masked_bias`` buffers older transformers saved), and the prefixes of the imported checkpoint
are compared with an independent implementation of ClipCap's equations written below.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from capdec.checkpoint import load_checkpoint
from capdec.cli import main

D, H, L, C, DEPTH, HEADS = 32, 32, 4, 3, 2, 8  # tiny CLIP dim, tiny GPT-2 width, prefix, clip tokens


# -- ClipCap's equations, written out independently ---------------------------------------------------

def _ln(x, sd, name):
    return F.layer_norm(x, (x.shape[-1],), sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-5)


def clipcap_transformer_prefix(sd: dict, x: torch.Tensor, *, clip_length: int, heads: int) -> torch.Tensor:
    """TransformerMapper.forward of the reference, one head at a time."""
    p = "clip_project."
    h = sd[p + "prefix_const"].shape[1]
    b = x.shape[0]
    tokens = (x @ sd[p + "linear.weight"].T + sd[p + "linear.bias"]).reshape(b, clip_length, h)
    seq = torch.cat([tokens, sd[p + "prefix_const"].expand(b, -1, -1)], dim=1)
    e = h // heads
    i = 0
    while f"{p}transformer.layers.{i}.norm1.weight" in sd:
        q_ = f"{p}transformer.layers.{i}."
        y = _ln(seq, sd, q_ + "norm1")
        q = y @ sd[q_ + "attn.to_queries.weight"].T
        kv = y @ sd[q_ + "attn.to_keys_values.weight"].T
        k, v = kv[..., :h], kv[..., h:]  # reshape (b, m, 2, heads, e): the first h outputs are the keys
        out = torch.zeros_like(q)
        for j in range(heads):
            s = slice(j * e, (j + 1) * e)
            w = torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / math.sqrt(e), dim=-1)  # (b, n, m)
            out[..., s] = w @ v[..., s]
        seq = seq + out @ sd[q_ + "attn.project.weight"].T + sd[q_ + "attn.project.bias"]
        y = _ln(seq, sd, q_ + "norm2")
        hidden = torch.relu(y @ sd[q_ + "mlp.fc1.weight"].T + sd[q_ + "mlp.fc1.bias"])
        seq = seq + hidden @ sd[q_ + "mlp.fc2.weight"].T + sd[q_ + "mlp.fc2.bias"]
        i += 1
    return seq[:, clip_length:]


def clipcap_mlp_prefix(sd: dict, x: torch.Tensor, *, prefix_length: int) -> torch.Tensor:
    hidden = torch.tanh(x @ sd["clip_project.model.0.weight"].T + sd["clip_project.model.0.bias"])
    out = hidden @ sd["clip_project.model.2.weight"].T + sd["clip_project.model.2.bias"]
    return out.reshape(x.shape[0], prefix_length, -1)


# -- ClipCap-layout files -------------------------------------------------------------------------------

def _gpt_state(gpt2_dir, seed: int) -> dict:
    """The tiny GPT-2's architecture with *other* weights than the directory's, plus stale buffers."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config.from_pretrained(gpt2_dir)
    gpt = GPT2LMHeadModel(cfg)
    sd = {f"gpt.{k}": v.clone() for k, v in gpt.state_dict().items()}
    n = cfg.n_positions
    for i in range(cfg.n_layer):  # what transformers < 4.3x saved with every GPT-2
        sd[f"gpt.transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
        sd[f"gpt.transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    return sd


def clipcap_state(gpt2_dir, mapper: str, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.3  # noqa: E731
    sd = {}
    if mapper == "transformer":
        sd["clip_project.linear.weight"], sd["clip_project.linear.bias"] = r(C * H, D), r(C * H)
        sd["clip_project.prefix_const"] = r(L, H)
        for i in range(DEPTH):
            p = f"clip_project.transformer.layers.{i}."
            sd[p + "norm1.weight"], sd[p + "norm1.bias"] = 1 + r(H), r(H)
            sd[p + "attn.to_queries.weight"] = r(H, H)
            sd[p + "attn.to_keys_values.weight"] = r(2 * H, H)
            sd[p + "attn.project.weight"], sd[p + "attn.project.bias"] = r(H, H), r(H)
            sd[p + "norm2.weight"], sd[p + "norm2.bias"] = 1 + r(H), r(H)
            sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"] = r(2 * H, H), r(2 * H)
            sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"] = r(H, 2 * H), r(H)
    else:
        sd["clip_project.model.0.weight"], sd["clip_project.model.0.bias"] = r(H * L // 2, D), r(H * L // 2)
        sd["clip_project.model.2.weight"], sd["clip_project.model.2.bias"] = r(H * L, H * L // 2), r(H * L)
    sd.update(_gpt_state(gpt2_dir, seed + 100))
    return sd


def _import(tmp_path, state, gpt2_dir, encoder, *extra, name="ckpt"):
    weights = tmp_path / f"{name}.pt"
    torch.save(state, weights)
    out = tmp_path / name
    rc = main(["-q", "import", str(weights), "--out", str(out), "--lm", str(gpt2_dir), "--encoder", encoder, *extra])
    return rc, out


@pytest.mark.parametrize("mapper", ["transformer", "mlp"])
def test_import_gives_clipcap_prefixes_and_the_files_lm(tmp_path, tiny_gpt2_dir, tiny_hf_clip, mapper):
    state = clipcap_state(tiny_gpt2_dir, mapper)
    flags = ["--mapper", mapper, "--prefix-length", str(L), "--source", "capdec"]
    if mapper == "transformer":
        flags += ["--clip-length", str(C), "--mapper-depth", str(DEPTH)]
    rc, out = _import(tmp_path, state, tiny_gpt2_dir, tiny_hf_clip, *flags)
    assert rc == 0
    ckpt = load_checkpoint(out, device="cpu")
    cfg = ckpt.model_config
    assert (cfg.mapper, cfg.mapper_variant, cfg.prefix_length, cfg.stop_at_period) == (mapper, "clipcap", L, True)

    x = F.normalize(torch.randn(5, D, generator=torch.Generator().manual_seed(3)), dim=-1)
    with torch.no_grad():
        got = ckpt.model.prefix(x)
    if mapper == "transformer":
        want = clipcap_transformer_prefix(state, x, clip_length=C, heads=HEADS)
    else:
        want = clipcap_mlp_prefix(state, x, prefix_length=L)
    assert got.shape == (5, L, H)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)

    lm = ckpt.model.lm.state_dict()
    gpt_keys = [k for k in state if k.startswith("gpt.") and not k.endswith(("attn.bias", "attn.masked_bias"))]
    assert gpt_keys and all(torch.equal(lm[k[len("gpt."):]], state[k]) for k in gpt_keys)


def test_import_infers_the_layout_from_the_file(tmp_path, tiny_gpt2_dir, tiny_hf_clip):
    state = clipcap_state(tiny_gpt2_dir, "transformer", seed=1)
    rc, out = _import(tmp_path, state, tiny_gpt2_dir, tiny_hf_clip)  # no --mapper / sizes
    assert rc == 0
    cfg = json.loads((out / "config.json").read_text())["model"]
    assert (cfg["mapper"], cfg["prefix_length"], cfg["clip_length"], cfg["mapper_depth"]) == ("transformer", L, C, DEPTH)


@pytest.mark.parametrize("change, flags, key", [
    (lambda sd: sd.update({"clip_project.prefix_const": torch.zeros(L + 1, H)}), ["--prefix-length", str(L)],
     "clip_project.prefix_const"),
    (lambda sd: sd.pop("clip_project.transformer.layers.1.attn.to_queries.weight"), [],
     "clip_project.transformer.layers.1.attn.to_queries.weight"),
    (lambda sd: sd.update({"gpt.transformer.wpe.weight": torch.zeros(7, H)}), [], "gpt.transformer.wpe.weight"),
    (lambda sd: None, ["--mapper", "mlp"], "clip_project.linear.weight"),
])
def test_a_mismatched_file_is_refused_naming_the_key(tmp_path, tiny_gpt2_dir, tiny_hf_clip, capsys, change, flags,
                                                      key):
    state = clipcap_state(tiny_gpt2_dir, "transformer")
    change(state)
    rc, out = _import(tmp_path, state, tiny_gpt2_dir, tiny_hf_clip, *flags)
    err = capsys.readouterr().err
    assert rc == 2 and key in err, err
    assert not out.exists()  # nothing written


def test_an_encoder_of_another_width_is_refused(tmp_path, tiny_gpt2_dir, tiny_hf_clip, capsys):
    state = clipcap_state(tiny_gpt2_dir, "mlp")
    state["clip_project.model.0.weight"] = torch.zeros(H * L // 2, 640)  # an RN50x4 mapper
    rc, out = _import(tmp_path, state, tiny_gpt2_dir, tiny_hf_clip, "--source", "capdec")
    assert rc == 2 and "640-d" in capsys.readouterr().err and not out.exists()


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_pickle_with_code_is_refused(tmp_path, tiny_gpt2_dir, tiny_hf_clip, capsys):
    state = clipcap_state(tiny_gpt2_dir, "mlp")
    state["extra"] = _Evil()
    rc, out = _import(tmp_path, state, tiny_gpt2_dir, tiny_hf_clip)
    captured = capsys.readouterr()
    assert rc == 2 and "this must never run" not in captured.out
    # one line naming the file and what it would call (torch's own text is several paragraphs)
    assert captured.err.count("\n") == 1 and "ckpt.pt: refused" in captured.err and "print" in captured.err
    assert not out.exists()


def test_imported_checkpoint_captions_through_the_cli(tmp_path, tiny_gpt2_dir, tiny_hf_clip, coco_dir):
    rc, out = _import(tmp_path, clipcap_state(tiny_gpt2_dir, "transformer"), tiny_gpt2_dir, tiny_hf_clip)
    assert rc == 0
    preds = tmp_path / "preds.jsonl"
    image = coco_dir / "images" / "COCO_val2014_000000000257.jpg"
    assert main(["-q", "caption", str(out), str(image), "--out", str(preds), "--device", "cpu", "--workers", "0",
                 "--max-length", "8"]) == 0
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert len(rows) == 1 and isinstance(rows[0]["caption"], str)


# -- the mapper itself -----------------------------------------------------------------------------------

def test_clipcap_mapper_matches_the_equations_with_its_own_weights():
    from capdec.model.mapper import ClipCapTransformerMapper

    torch.manual_seed(0)
    m = ClipCapTransformerMapper(dim=D, hidden=H, prefix_length=L, clip_length=C, depth=DEPTH, heads=HEADS)
    for p in m.parameters():  # LayerNorms away from the identity, so their weights matter too
        p.data.add_(torch.randn_like(p) * 0.1)
    sd = {f"clip_project.{k}": v for k, v in m.state_dict().items()}
    x = torch.randn(4, D)
    with torch.no_grad():
        torch.testing.assert_close(m(x), clipcap_transformer_prefix(sd, x, clip_length=C, heads=HEADS),
                                   atol=1e-5, rtol=0)
    # no bias on the query / key-value projections, a biased output projection, ReLU MLP of ratio 2
    names = set(sd)
    assert "clip_project.transformer.layers.0.attn.to_queries.bias" not in names
    assert "clip_project.transformer.layers.0.attn.to_keys_values.bias" not in names
    assert "clip_project.transformer.layers.0.attn.project.bias" in names
    assert sd["clip_project.transformer.layers.0.mlp.fc1.weight"].shape == (2 * H, H)


# -- tensors the model cannot take ----------------------------------------------------------------------

def _poison(key: str, value: float):
    def change(sd):
        t = sd[key].clone()
        t.view(-1)[3] = value
        sd[key] = t
    return change


@pytest.mark.parametrize("change, words", [
    (_poison("clip_project.linear.weight", float("nan")), ["clip_project.linear.weight", "NaN"]),
    (_poison("gpt.transformer.h.1.mlp.c_fc.weight", float("inf")), ["gpt.transformer.h.1.mlp.c_fc.weight", "Inf"]),
    (lambda sd: sd.update({"clip_project.prefix_const": (sd["clip_project.prefix_const"] * 100).long()}),
     ["clip_project.prefix_const", "int64"]),
    (lambda sd: sd.update({"gpt.transformer.wte.weight": sd["gpt.transformer.wte.weight"] > 0}),
     ["gpt.transformer.wte.weight", "bool"]),
    (lambda sd: sd.update({"clip_project.extra.weight": torch.zeros(3, H)}), ["clip_project.extra.weight"]),
    (lambda sd: sd.update({"gpt.transformer.h.7.ln_1.weight": torch.ones(H)}), ["gpt.transformer.h.7.ln_1.weight"]),
])
def test_a_file_with_tensors_the_model_cannot_take_is_refused(tmp_path, tiny_gpt2_dir, tiny_hf_clip, capsys, change,
                                                               words):
    """NaN / Inf values, integer or boolean tensors and extra tensors: one line naming the key, exit 2, nothing written."""
    state = clipcap_state(tiny_gpt2_dir, "transformer")
    change(state)
    rc, out = _import(tmp_path, state, tiny_gpt2_dir, tiny_hf_clip)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert rc == 2 and len(errors) == 1 and errors[0].startswith("capdec import: error: "), err
    assert all(w in errors[0] for w in words) and "Traceback" not in err, err
    assert not out.exists()


def test_float16_and_float64_files_are_taken(tmp_path, tiny_gpt2_dir, tiny_hf_clip):
    """Other floating-point widths are weights too (cast to the model's float32)."""
    state = clipcap_state(tiny_gpt2_dir, "mlp")
    state["clip_project.model.0.weight"] = state["clip_project.model.0.weight"].double()
    for key in ("gpt.transformer.wte.weight", "gpt.lm_head.weight"):  # tied in GPT-2
        state[key] = state[key].half()
    rc, out = _import(tmp_path, state, tiny_gpt2_dir, tiny_hf_clip, "--source", "clipcap")
    assert rc == 0
    model = load_checkpoint(out, device="cpu").model
    assert torch.equal(model.lm.state_dict()["transformer.wte.weight"], state["gpt.transformer.wte.weight"].float())
    assert torch.equal(model.mapper.state_dict()["net.0.weight"], state["clip_project.model.0.weight"].float())


# -- which code made the file: raw or normalised CLIP embeddings ------------------------------------------

def _raw_image_features(clip_spec: str, paths) -> torch.Tensor:
    """``clip_model.encode_image(image)`` as the references call it: CLIP's projected image features, unnormalised."""
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPModel

    directory = clip_spec.removeprefix("hf:")
    model = CLIPModel.from_pretrained(directory).eval()
    pixels = CLIPImageProcessor.from_pretrained(directory)(
        images=[Image.open(p).convert("RGB") for p in paths], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model.get_image_features(pixel_values=pixels)
    return (out if isinstance(out, torch.Tensor) else out.pooler_output).float()


def _reference_gpt(state: dict, gpt2_dir):
    """GPT-2 with the file's ``gpt.*`` weights, as the reference's ``ClipCaptionModel.gpt``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt = GPT2LMHeadModel(GPT2Config.from_pretrained(gpt2_dir)).eval()
    gpt.load_state_dict({k[4:]: v for k, v in state.items()
                         if k.startswith("gpt.") and not k.endswith(("attn.bias", "attn.masked_bias"))}, strict=False)
    return gpt


def _reference_greedy(gpt, prefix: torch.Tensor, *, steps: int, eos: int) -> list[int]:
    """Greedy decoding as the reference's generate2 does it (whole sequence re-run each step), ending at eos."""
    seq, out = prefix.unsqueeze(0), []  # (1, L, h)
    with torch.no_grad():
        for _ in range(steps):
            tok = int(gpt(inputs_embeds=seq).logits[0, -1].argmax())
            if tok == eos:
                break
            out.append(tok)
            seq = torch.cat([seq, gpt.transformer.wte(torch.tensor([[tok]]))], dim=1)
    return out


def _caption_cli(ckpt, images, out, *flags) -> dict:
    assert main(["-q", "caption", str(ckpt), *map(str, images), "--out", str(out), "--device", "cpu", "--workers",
                 "0", *flags]) == 0
    return {Path(r["image"]).name: r["caption"] for r in map(json.loads, out.read_text().splitlines())}


@pytest.mark.parametrize("source", ["clipcap", "capdec"])
def test_an_imported_model_captions_from_the_input_its_reference_gives_it(tmp_path, tiny_gpt2_dir, tiny_hf_clip,
                                                                         coco_dir, source):
    """ClipCap's predict.py feeds ``clip_project`` the raw ``encode_image`` output; CapDec's predictions_runner.py
    divides it by its norm first. The prefix and the greedy captions must follow the file's own reference."""
    from transformers import AutoTokenizer

    from capdec.caption import Captioner
    from capdec.images import load_image

    state = clipcap_state(tiny_gpt2_dir, "mlp", seed=4)
    rc, out = _import(tmp_path, state, tiny_gpt2_dir, tiny_hf_clip, "--source", source)
    assert rc == 0
    config = json.loads((out / "config.json").read_text())
    assert config["imported"]["source"] == source
    assert config["inference"]["normalize"] is (source == "capdec")

    images = sorted((coco_dir / "images").glob("*.jpg"))[:3]
    raw = _raw_image_features(tiny_hf_clip, images)  # (3, D)
    assert (raw.norm(dim=-1) - 1).abs().min() > 0.2  # raw and normalised inputs really differ
    unit = raw / raw.norm(dim=-1, keepdim=True)
    want = clipcap_mlp_prefix(state, raw if source == "clipcap" else unit, prefix_length=L)

    captioner = Captioner.from_pretrained(out, device="cpu", num_workers=0)
    emb = captioner.embed_images([load_image(p) for p in images])
    got = captioner.prefix(emb)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

    # the captions `capdec caption` writes are the reference's greedy decoding of that prefix
    gpt, tok = _reference_gpt(state, tiny_gpt2_dir), AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    words = lambda ids: " ".join(tok.decode(ids, skip_special_tokens=True).split())  # noqa: E731
    flags = ["--strategy", "greedy", "--max-length", "6", "--no-stop-at-period"]
    captions = _caption_cli(out, images, tmp_path / "preds.jsonl", *flags)
    assert captions == {p.name: words(_reference_greedy(gpt, x, steps=6, eos=tok.eos_token_id))
                        for p, x in zip(images, want)}
    if source == "clipcap":  # --normalize at caption time gives CapDec's input instead
        forced = _caption_cli(out, images, tmp_path / "normalised.jsonl", *flags, "--normalize")
        other = clipcap_mlp_prefix(state, unit, prefix_length=L)
        assert forced == {p.name: words(_reference_greedy(gpt, x, steps=6, eos=tok.eos_token_id))
                          for p, x in zip(images, other)}
        assert forced != captions


def test_an_mlp_file_needs_its_source_and_a_transformer_file_does_not(tmp_path, tiny_gpt2_dir, tiny_hf_clip,
                                                                     capsys):
    """Both references write the same keys; only the MLP files' input differs between them (see capdec.clipcap)."""
    rc, out = _import(tmp_path, clipcap_state(tiny_gpt2_dir, "mlp"), tiny_gpt2_dir, tiny_hf_clip, name="mlp")
    err = capsys.readouterr().err
    assert rc == 2 and "--source clipcap" in err and "--source capdec" in err and not out.exists()

    rc, out = _import(tmp_path, clipcap_state(tiny_gpt2_dir, "mlp"), tiny_gpt2_dir, tiny_hf_clip, "--no-normalize",
                      name="mlp_raw")
    assert rc == 0
    config = json.loads((out / "config.json").read_text())
    assert config["inference"]["normalize"] is False and config["imported"]["source"] is None

    rc, out = _import(tmp_path, clipcap_state(tiny_gpt2_dir, "transformer"), tiny_gpt2_dir, tiny_hf_clip,
                      name="transformer")
    assert rc == 0 and json.loads((out / "config.json").read_text())["inference"]["normalize"] is True


# -- how long a caption may be: the reference's 67 tokens ----------------------------------------------------

@pytest.fixture(scope="module")
def long_gpt2_dir(tmp_path_factory, tiny_gpt2_dir):
    """The tiny GPT-2 with room for a prefix and the reference's 67 caption tokens (128 positions)."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    out = tmp_path_factory.mktemp("gpt2_long")
    cfg = GPT2Config.from_pretrained(tiny_gpt2_dir)
    cfg.n_positions = 128
    GPT2LMHeadModel(cfg).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_gpt2_dir).save_pretrained(out)
    return out


def test_an_imported_model_decodes_up_to_the_references_67_tokens(tmp_path, long_gpt2_dir, tiny_gpt2_dir,
                                                                  tiny_hf_clip, coco_dir):
    """The reference's generate_beam / generate2 stop after entry_length=67 tokens: so does an imported model."""
    from transformers import AutoTokenizer

    from capdec.decode import period_token_ids

    tok = AutoTokenizer.from_pretrained(long_gpt2_dir)
    state = clipcap_state(long_gpt2_dir, "transformer", seed=2)
    # a GPT-2 whose final LayerNorm outputs one constant vector: every step's argmax is one token, never a stop
    stops = {tok.eos_token_id, *period_token_ids(tok), *tok.all_special_ids}
    wte = state["gpt.transformer.wte.weight"]
    j = next(j for j in range(len(tok)) if j not in stops and int((wte @ (10 * wte[j])).argmax()) == j)
    state["gpt.transformer.ln_f.weight"] = torch.zeros(H)
    state["gpt.transformer.ln_f.bias"] = 10 * wte[j]
    rc, out = _import(tmp_path, state, long_gpt2_dir, tiny_hf_clip)
    assert rc == 0 and json.loads((out / "config.json").read_text())["model"]["max_length"] == 67
    image = coco_dir / "images" / "COCO_val2014_000000000257.jpg"
    caption = _caption_cli(out, [image], tmp_path / "preds.jsonl", "--strategy", "greedy")[image.name]
    assert caption == " ".join(tok.decode([j] * 67).split())

    # an LM with fewer positions: as many tokens as fit after the prefix (64 positions - L)
    rc, out = _import(tmp_path, clipcap_state(tiny_gpt2_dir, "transformer"), tiny_gpt2_dir, tiny_hf_clip,
                      name="short")
    assert rc == 0 and json.loads((out / "config.json").read_text())["model"]["max_length"] == 64 - L
