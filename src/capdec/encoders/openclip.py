"""open_clip models as ``open_clip:MODEL@PRETRAINED`` (needs ``pip install capdec[open_clip]``).

Spec strings (the part after ``open_clip:``), mirroring open_clip's own ``create_model`` arguments:

- ``ViT-B-32@laion2b_s34b_b79k`` — a built-in model name with a pretrained tag (downloads, or uses
  open_clip's cache);
- ``ViT-B-32@/weights/vitb32.safetensors`` — a built-in model name with a local weights file (no
  download; the file must match the name's architecture, e.g. OpenAI weights need ``ViT-B-32-quickgelu``);
- ``local-dir:/models/CLIP-ViT-B-32-laion2B`` (or just the directory) — a local copy of an open_clip
  hub repo: ``open_clip_config.json`` plus a weights file (no download);
- ``hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K`` — such a repo on the Hugging Face hub.

The spec dict is ``{"kind": "open_clip", "model": ..., "pretrained": ...}``; local paths are stored
absolute. The model is built in float32 (so the weights fingerprint in the identity does not depend on
the precision asked for) and then cast to ``self.dtype`` (its text tower to ``self.text_dtype``).

Text runs through open_clip's own modules, but a batch is cut to its longest caption when the text
tower allows it (a causal transformer pooled at the end-of-text token, as in every CLIP; open_clip's
``encode_text`` always runs all 77 positions), with the attention of plain blocks in one fused
``scaled_dot_product_attention`` call. Other text towers (bidirectional, class-token pooled, Hugging
Face text models) run ``encode_text`` as it is.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from capdec.artifacts import jsonable
from capdec.encoders.base import Encoder, EncoderError, TextTokens
from capdec.encoders.hf import looks_like_path, weights_fingerprint

logger = logging.getLogger(__name__)

LOCAL_DIR = "local-dir:"
HF_HUB = "hf-hub:"
_CONFIG_NAME = "open_clip_config.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
_FINGERPRINT_PARAMS = ("text_projection", "visual.proj", "text.proj.weight", "text.text_projection.weight",
                       "visual.head.proj.weight")


def _import_open_clip() -> Any:
    try:
        import open_clip
    except ImportError as e:
        raise EncoderError("the open_clip encoder backend needs open_clip_torch: "
                           "`pip install capdec[open_clip]`") from e
    return open_clip


def _drop_pretrained_flags(cfg: Any) -> Any:
    """Model config without the "load base tower weights" switches open_clip toggles at build time."""
    if isinstance(cfg, dict):
        return {k: _drop_pretrained_flags(v) for k, v in cfg.items() if "pretrained" not in k}
    return cfg


class OpenCLIPEncoder(Encoder):
    """An open_clip ``CLIP``/``CustomTextCLIP`` with its tokenizer and evaluation preprocessing."""

    kind = "open_clip"
    bf16_text_on_cpu = True

    def __init__(self, model: Any, tokenizer: Any, preprocess: Any, *, model_name: str,
                 pretrained: str | None, model_cfg: dict[str, Any], device: str | torch.device | None = "auto",
                 precision: str = "auto", batch_size: int = 256):
        super().__init__(device=device, precision=precision, batch_size=batch_size)
        self.model_name = model_name
        self.pretrained = pretrained
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.model_cfg = _drop_pretrained_flags(model_cfg)
        self._preprocess_cfg = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
        # fingerprint in float32 before casting, so fp16-on-GPU and fp32-on-CPU copies agree
        self._fingerprint = weights_fingerprint(dict(model.named_parameters()), _FINGERPRINT_PARAMS)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        for part in _text_parts(model):
            part.data = part.data.to(self.text_dtype)
        self._tower = _causal_text_tower(model, tokenizer)

    # -- building -------------------------------------------------------------------------------
    @classmethod
    def parse_spec_string(cls, rest: str) -> dict[str, Any]:
        rest = rest.strip()
        if not rest:
            raise EncoderError("empty open_clip encoder spec; use open_clip:MODEL@PRETRAINED "
                               "(e.g. open_clip:ViT-B-32@laion2b_s34b_b79k) or open_clip:local-dir:/path/to/dir")
        if rest.startswith((LOCAL_DIR, HF_HUB)):
            return {"kind": cls.kind, "model": rest, "pretrained": None}
        model, sep, pretrained = rest.partition("@")
        model = model.strip()
        if not sep and (Path(os.path.expanduser(model)).is_dir() or looks_like_path(model)):
            return {"kind": cls.kind, "model": LOCAL_DIR + model, "pretrained": None}
        if not model:
            raise EncoderError(f"open_clip encoder spec {rest!r} has no model name before '@'")
        return {"kind": cls.kind, "model": model, "pretrained": pretrained.strip() or None}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], *, device: str | torch.device | None = "auto",
                  precision: str = "auto", batch_size: int = 256) -> OpenCLIPEncoder:
        open_clip = _import_open_clip()
        name = spec.get("model")
        if not isinstance(name, str) or not name.strip():
            raise EncoderError(f"open_clip encoder spec needs a 'model': {spec!r}")
        name, pretrained = _resolve(open_clip, name.strip(), spec.get("pretrained"))
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=pretrained, precision="fp32", device="cpu")
            tokenizer = open_clip.get_tokenizer(name)
            model_cfg = open_clip.get_model_config(name)
        except (RuntimeError, OSError, ValueError, KeyError) as e:
            raise EncoderError(f"open_clip encoder: cannot build {name!r} with pretrained={pretrained!r}: {e}. "
                               f"Offline? Pass local weights: open_clip:MODEL@/path/to/weights or "
                               f"open_clip:local-dir:/path/to/dir") from e
        model.eval()
        logger.info("loaded open_clip encoder %s (pretrained=%s)", name, pretrained)
        return cls(model, tokenizer, preprocess, model_name=name, pretrained=pretrained, model_cfg=model_cfg or {},
                   device=device, precision=precision, batch_size=batch_size)

    # -- interface ------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return int(self.model_cfg["embed_dim"])

    @property
    def context_length(self) -> int:
        return int(self.tokenizer.context_length)

    @property
    def image_size(self) -> int | None:
        size = self._preprocess_cfg.get("size")  # an int, or (height, width)
        sides = [size] if isinstance(size, int) else list(size) if isinstance(size, (list, tuple)) else []
        return max(sides) if sides and all(isinstance(s, int) for s in sides) else None

    @property
    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "model": self.model_name, "pretrained": self.pretrained}

    @property
    def identity(self) -> dict[str, Any]:
        pre = self._preprocess_cfg
        # JSON round trip: the identity is compared with one read back from a JSON file
        return jsonable({
            "kind": self.kind,
            "dim": self.dim,
            "model_cfg": self.model_cfg,
            "preprocess": {k: pre.get(k) for k in ("size", "mean", "std", "interpolation", "resize_mode")},
            "tokenizer": type(self.tokenizer).__name__,
            "context_length": self.context_length,
            "weights_sha256": self._fingerprint,
        }, sort_keys=True)

    @property
    def trims_padding(self) -> bool:
        return self._tower is not None

    def tokenize_text(self, texts: Sequence[str]) -> TextTokens:
        texts, tok, context = list(texts), self.tokenizer, self.context_length
        if self._tower is None:  # lengths are not needed (batches keep the full context)
            ids = tok(texts)
            return TextTokens(ids, torch.full((len(ids),), ids.shape[1]), self._count_truncated(texts))
        # one token past the context: a caption that reaches it is one the context truncates
        wide = tok(texts, context_length=context + 1)
        long = torch.nonzero(wide[:, context] != 0).flatten()
        ids = wide[:, :context].clone()
        if len(long):
            ids[long] = tok([texts[i] for i in long.tolist()])  # cut with the end token kept, as open_clip does
        # the end-of-text token has the largest id: pooling reads it there (open_clip's "argmax" pooling)
        return TextTokens(ids, ids.argmax(dim=1) + 1, len(long))

    def _encode_tokens(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        ids = ids.to(self.device)
        if self._tower is None:
            return self.model.encode_text(ids)
        return _causal_text_features(self._tower, ids)

    def image_transform(self) -> Callable[[Any], torch.Tensor]:
        return self.preprocess  # open_clip's evaluation transform: resize, crop, to tensor, normalise

    def _encode_pixel_batch(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels.to(self.device, self.dtype))  # (B, 3, H, W) in

    def _count_truncated(self, texts: list[str]) -> int:
        tok = self.tokenizer
        if hasattr(tok, "encode") and hasattr(tok, "sot_token_id"):  # open_clip's own BPE tokenizer
            lengths = [len(tok.encode(t)) + 2 for t in texts]  # + start/end of text
        elif hasattr(tok, "tokenizer"):  # HFTokenizer wrapper (SigLIP, multilingual text towers)
            cleaned = [tok.clean_fn(t) for t in texts] if hasattr(tok, "clean_fn") else list(texts)
            lengths = [len(x) for x in tok.tokenizer(cleaned, truncation=False, verbose=False)["input_ids"]]
        else:
            return 0
        return sum(n > self.context_length for n in lengths)


# -- the text tower, cut to the longest caption -------------------------------------------------------
def _text_parts(model: Any) -> list[torch.Tensor]:
    """The text tower's parameters (``model.text`` of a CustomTextCLIP, the text attributes of a CLIP)."""
    if isinstance(getattr(model, "text", None), nn.Module):
        return list(model.text.parameters())
    parts = []
    for name in ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection"):
        part = getattr(model, name, None)
        parts += list(part.parameters()) if isinstance(part, nn.Module) else [part] if part is not None else []
    return parts


def _causal_text_tower(model: Any, tokenizer: Any) -> Any | None:
    """The module holding a causal text transformer pooled at the end-of-text token, or None.

    Only then is trailing padding invisible to the embedding: positions attend to earlier ones only,
    and the end token (the largest id of open_clip's BPE tokenizer) is read out. A class token,
    bidirectional attention or another tokenizer (whose padding id may be read) rule it out.
    """
    from open_clip.transformer import TextTransformer

    if not hasattr(tokenizer, "sot_token_id") or getattr(tokenizer, "reduction_fn", None) is not None:
        return None
    text = getattr(model, "text", None)
    if isinstance(text, TextTransformer):  # CustomTextCLIP
        tower, pool = text, text.pool_type
        if text.cls_emb is not None:
            return None
    elif isinstance(getattr(model, "transformer", None), nn.Module):  # CLIP: the text tower's parts on the model
        tower, pool = model, getattr(model, "text_pool_type", None)
    else:
        return None
    if getattr(tower, "attn_mask", None) is None or pool != "argmax":
        return None
    return tower


def _causal_text_features(tower: Any, ids: torch.Tensor) -> torch.Tensor:
    """open_clip's ``encode_text`` on ``ids`` (b, n) cut after the longest caption's end token."""
    from open_clip.transformer import text_global_pool

    n = ids.shape[1]
    cast = tower.transformer.get_cast_dtype()
    x = tower.token_embedding(ids).to(cast) + tower.positional_embedding[:n].to(cast)  # (b, n, d)
    blocks = tower.transformer.resblocks
    if getattr(tower.transformer, "batch_first", True) and all(_plain_block(r) for r in blocks):
        for r in blocks:
            x = _causal_block(r, x)
    else:
        x = tower.transformer(x, attn_mask=tower.attn_mask[:n, :n])
    pooled = text_global_pool(tower.ln_final(x), ids, "argmax")  # (b, d)
    proj = tower.text_projection
    if proj is None:
        return pooled
    return proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj


def _plain_block(block: nn.Module) -> bool:
    """An open_clip ``ResidualAttentionBlock`` whose attention is a plain ``nn.MultiheadAttention``."""
    from open_clip.transformer import ResidualAttentionBlock

    attn = getattr(block, "attn", None)
    return (type(block) is ResidualAttentionBlock and type(attn) is nn.MultiheadAttention and attn.batch_first
            and attn._qkv_same_embed_dim and attn.bias_k is None and not attn.add_zero_attn
            and not hasattr(block, "ln_1_kv"))


def _causal_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``ResidualAttentionBlock.forward`` with its causal mask, the attention fused into one SDPA call."""
    attn = block.attn
    b, n, d = x.shape
    qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)  # (b, n, 3d)
    q, k, v = qkv.view(b, n, 3, attn.num_heads, d // attn.num_heads).permute(2, 0, 3, 1, 4)  # (b, nh, n, hs) each
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, n, d)
    x = x + block.ls_1(attn.out_proj(y))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def _resolve(open_clip: Any, name: str, pretrained: str | None) -> tuple[str, str | None]:
    """Check a spec before open_clip sees it: local paths must exist, names and tags must be known."""
    if name.startswith(LOCAL_DIR):
        return LOCAL_DIR + _check_local_dir(Path(os.path.expanduser(name[len(LOCAL_DIR):]))), None
    if name.startswith(HF_HUB):
        return name, None
    cleaned = name.replace("/", "-")
    known = open_clip.list_models()
    if cleaned not in known:
        close = difflib.get_close_matches(cleaned, known, n=5)
        raise EncoderError(f"open_clip encoder: unknown model {name!r}"
                           + (f"; did you mean {', '.join(close)}?" if close else "")
                           + " (see open_clip.list_models(); a local model directory is open_clip:local-dir:DIR)")
    tags = open_clip.list_pretrained_tags_by_model(cleaned)
    if not pretrained:
        raise EncoderError(f"open_clip encoder: {name!r} needs weights: open_clip:{name}@TAG "
                           f"(tags: {', '.join(tags) or 'none'}) or open_clip:{name}@/path/to/weights")
    path = Path(os.path.expanduser(pretrained))
    if path.exists() or looks_like_path(pretrained) or pretrained.endswith(_WEIGHT_SUFFIXES):
        if not path.is_file():
            raise EncoderError(f"open_clip encoder: no such weights file {pretrained!r} (resolved to "
                               f"{path.resolve()})")
        return cleaned, str(path.resolve())
    if not open_clip.is_pretrained_cfg(cleaned, pretrained):
        raise EncoderError(f"open_clip encoder: unknown pretrained tag {pretrained!r} for {cleaned}; known tags: "
                           f"{', '.join(tags) or 'none'} (or give a local weights file after '@')")
    return cleaned, pretrained


def _check_local_dir(path: Path) -> str:
    if not path.is_dir():
        raise EncoderError(f"open_clip encoder: no such directory {str(path)!r}; a local open_clip model is a "
                           f"directory with {_CONFIG_NAME} and a weights file")
    config = path / _CONFIG_NAME
    if not config.is_file():
        raise EncoderError(f"open_clip encoder: no {_CONFIG_NAME} in {str(path)!r}; a local open_clip model is "
                           f"a directory with {_CONFIG_NAME} (holding 'model_cfg') and a weights file, as in an "
                           f"open_clip Hugging Face repo")
    # open_clip would silently build random weights when the directory has none
    if not any(p.suffix in (".safetensors", ".bin", ".pth") for p in path.iterdir()):
        raise EncoderError(f"open_clip encoder: no weights file (*.safetensors, *.bin, *.pth) in {str(path)!r}")
    return str(path.resolve())
