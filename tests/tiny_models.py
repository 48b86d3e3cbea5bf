"""Tiny real CLIP models with random weights, saved the way a user's local copy is laid out.

No pretrained weights exist offline, so tests build the *real* architectures (transformers'
``CLIPModel``, open_clip's ``CLIP``) at a tiny size, with the *real* CLIP BPE tokenizer (49408 tokens,
built from the vocabulary file open_clip ships), and save them to a directory:

- :func:`make_tiny_hf_clip` writes what ``CLIPModel.save_pretrained`` + ``CLIPProcessor.save_pretrained``
  write (the layout of a Hugging Face snapshot such as ``openai/clip-vit-base-patch32``), so
  ``load_encoder("hf:<dir>")`` takes exactly the path a user's local directory takes;
- :func:`make_tiny_open_clip` writes ``open_clip_config.json`` + ``open_clip_model.safetensors`` (the layout
  of an open_clip Hugging Face repo, which open_clip loads with ``local-dir:``) and returns the spec
  string ``open_clip:local-dir:<dir>``.

Both are deterministic for a given ``seed`` and cached: a directory that is already complete (marker
file written last, matching the parameters) is reused untouched.

Usage in tests (``tests/`` is on ``sys.path`` via ``pythonpath`` in pyproject)::

    from tiny_models import make_tiny_hf_clip, make_tiny_open_clip
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import torch

TINY_DIM = 32  # joint embedding size of both tiny models
IMAGE_SIZE = 32
CONTEXT_LENGTH = 77
CLIP_VOCAB_SIZE = 49408
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_MARKER = "capdec_tiny_model.json"  # written last: its presence (with matching params) means "complete"


def _is_complete(directory: Path, params: dict[str, Any]) -> bool:
    marker = directory / _MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()) == params
    except json.JSONDecodeError:
        return False


def _write_marker(directory: Path, params: dict[str, Any]) -> None:
    (directory / _MARKER).write_text(json.dumps(params, sort_keys=True))


def clip_bpe_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The OpenAI CLIP BPE vocabulary (49408 tokens) and merges, from the file open_clip ships.

    Mirrors ``open_clip.tokenizer.SimpleTokenizer.__init__`` but with the special-token spellings
    Hugging Face uses (``<|startoftext|>``/``<|endoftext|>``, ids 49406/49407).
    """
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    assert len(vocab) == CLIP_VOCAB_SIZE, len(vocab)
    return vocab, merges  # type: ignore[return-value]


def _hf_tower_configs(width: int, layers: int) -> dict[str, dict[str, Any]]:
    """``text_config`` and ``vision_config`` of a tiny transformers dual encoder with the CLIP vocabulary."""
    heads = max(1, width // 16)
    return {
        "text_config": dict(
            vocab_size=CLIP_VOCAB_SIZE, hidden_size=width, intermediate_size=2 * width,
            num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=CONTEXT_LENGTH,
            # the real token ids, so pooling picks the end-of-text token (as in laion/* CLIP configs)
            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        ),
        "vision_config": dict(
            hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
            num_attention_heads=heads, image_size=IMAGE_SIZE, patch_size=8,
        ),
    }


def make_tiny_hf_clip(directory: str | Path, *, seed: int = 0, width: int = 32, layers: int = 2) -> Path:
    """Save a tiny random-weight transformers ``CLIPModel`` with a real CLIP tokenizer to ``directory``.

    Different ``seed`` values give different weights of the same architecture.
    """
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    directory = Path(directory)
    params = {"kind": "hf_clip", "seed": seed, "width": width, "layers": layers}
    if _is_complete(directory, params):
        return directory
    directory.mkdir(parents=True, exist_ok=True)

    config = CLIPConfig(
        **_hf_tower_configs(width, layers),
        projection_dim=TINY_DIM,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    model.save_pretrained(directory)

    vocab, merges = clip_bpe_vocab_and_merges()
    # the plain vocab/merges files a hub snapshot also carries (tokenizer.json is what gets loaded)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges,
                              model_max_length=CONTEXT_LENGTH)
    assert len(tokenizer) == CLIP_VOCAB_SIZE, len(tokenizer)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)
    _write_marker(directory, params)
    return directory


def make_tiny_hf_siglip(directory: str | Path, *, seed: int = 0, width: int = 32, layers: int = 2) -> Path:
    """Save a tiny random-weight transformers ``SiglipModel`` to ``directory``.

    SigLIP's own sentencepiece tokenizer cannot be built offline, so it carries the real CLIP BPE
    tokenizer; what matters is SigLIP's text tower: bidirectional, read out at the *last* position, so
    trailing padding changes its embedding.
    """
    from transformers import CLIPTokenizer, SiglipConfig, SiglipImageProcessor, SiglipModel

    directory = Path(directory)
    params = {"kind": "hf_siglip", "seed": seed, "width": width, "layers": layers}
    if _is_complete(directory, params):
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    config = SiglipConfig(**_hf_tower_configs(width, layers))
    torch.manual_seed(seed)
    SiglipModel(config).eval().save_pretrained(directory)
    vocab, merges = clip_bpe_vocab_and_merges()
    CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CONTEXT_LENGTH).save_pretrained(directory)
    SiglipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(directory)
    _write_marker(directory, params)
    return directory


def tiny_open_clip_config(*, width: int = 32, layers: int = 2, text: dict[str, Any] | None = None) -> dict[str, Any]:
    """``open_clip_config.json`` contents: a ViT-B-32-shaped model (ViT image tower + text transformer);
    ``text`` overrides text tower options (e.g. ``no_causal_mask``, ``pool_type``)."""
    heads = max(1, width // 16)
    return {
        "model_cfg": {
            "embed_dim": TINY_DIM,
            "vision_cfg": {"image_size": IMAGE_SIZE, "layers": layers, "width": width, "head_width": width // heads,
                           "patch_size": 8},
            "text_cfg": {"context_length": CONTEXT_LENGTH, "vocab_size": CLIP_VOCAB_SIZE, "width": width,
                         "heads": heads, "layers": layers, **(text or {})},
        },
        "preprocess_cfg": {"mean": list(CLIP_MEAN), "std": list(CLIP_STD)},
    }


def make_tiny_open_clip(directory: str | Path, *, seed: int = 0, width: int = 32, layers: int = 2,
                        text: dict[str, Any] | None = None) -> str:
    """Save a tiny random-weight open_clip ``CLIP`` to ``directory``; return the capdec spec string.

    The directory holds ``open_clip_config.json`` and ``open_clip_model.safetensors``, which is what an
    open_clip model repo on the Hugging Face hub contains; open_clip loads such a local copy with
    ``create_model_and_transforms("local-dir:<dir>")``.
    """
    import open_clip
    from safetensors.torch import save_file

    directory = Path(directory)
    params = {"kind": "open_clip", "seed": seed, "width": width, "layers": layers, **({"text": text} if text else {})}
    if not _is_complete(directory, params):
        directory.mkdir(parents=True, exist_ok=True)
        config = tiny_open_clip_config(width=width, layers=layers, text=text)
        torch.manual_seed(seed)
        model = open_clip.CLIP(**config["model_cfg"]).eval()
        # safetensors refuses shared storage; open_clip's own save_for_hf clones the same way
        state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(directory / "open_clip_model.safetensors"))
        (directory / "open_clip_config.json").write_text(json.dumps(config, indent=2))
        _write_marker(directory, params)
    return f"open_clip:local-dir:{directory}"
