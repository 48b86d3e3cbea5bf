"""The mini-CLIP: a small conv image tower and a small text transformer in one embedding space.

Read top to bottom: the word-level tokenizer, the two towers, the model (with its contrastive
loss), then saving and loading a weights directory. The config (:class:`MiniCLIPConfig`) lives in
:mod:`capdec.encoders.miniclip_config`, which does not import torch. This is the model the ``toy``
encoder (:mod:`capdec.encoders.toy`) runs; *training* it is the lab's (:mod:`capdec.lab.toyworld.train_clip`).

Notation: b - batch, n - tokens, d - width, c - channels, h/w - spatial size.

The logit scale is *fixed* (100, CLIP's final value) rather than learned: a learned temperature lets
the two modalities drift together, and CapDec is about the gap between them that real CLIPs have.

A weights directory holds ``config.json`` (everything needed to rebuild the model, vocabulary
included), ``model.safetensors`` (fp16 is fine) and optionally ``card.json`` (how it was trained,
what it measures).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from capdec.encoders.miniclip_config import MiniCLIPConfig, tokenize_words
from capdec.errors import InputError
from capdec.utils import read_artifact_json, sha256_file, write_json

logger = logging.getLogger(__name__)

FORMAT = "capdec.toyworld.miniclip/1"  # a format id (kept from the module's first home), not a module path
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "card.json"
SPECIALS = ("[PAD]", "[UNK]", "[CLS]")
PAD, UNK, CLS = 0, 1, 2


def shipped_weights_dir() -> Path:
    """Directory of the mini-CLIP shipped inside the package."""
    return Path(__file__).resolve().parent / "miniclip_weights"


# -- tokenizer --------------------------------------------------------------------------------------
class ToyTokenizer:
    """Word-level tokenizer: lowercase, strip punctuation, one id per known word, ``[UNK]`` otherwise.

    Every sequence starts with ``[CLS]`` (the text tower reads its output), so even an empty string
    encodes to something; sequences longer than ``context_length`` are cut at the end.
    """

    def __init__(self, vocab: list[str] | tuple[str, ...], context_length: int):
        if context_length < 2:
            raise InputError(f"context_length must be >= 2, got {context_length}")
        self.words = tuple(vocab)
        self.context_length = context_length
        self._ids = {w: i for i, w in enumerate((*SPECIALS, *self.words))}

    @property
    def vocab_size(self) -> int:
        return len(SPECIALS) + len(self.words)

    def ids(self, text: str) -> list[int]:
        """Token ids of ``text`` without truncation, ``[CLS]`` first."""
        return [CLS, *(self._ids.get(w, UNK) for w in tokenize_words(text))]

    def __call__(self, texts: list[str]) -> torch.Tensor:
        """(b, context_length) long tensor, padded with ``[PAD]``, truncated."""
        out = torch.full((len(texts), self.context_length), PAD, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = self.ids(text)[: self.context_length]
            out[i, : len(ids)] = torch.tensor(ids)
        return out

    def count_truncated(self, texts: list[str]) -> int:
        return sum(len(self.ids(t)) > self.context_length for t in texts)

    def count_unknown(self, texts: list[str]) -> int:
        """Number of words in ``texts`` that are not in the vocabulary."""
        return sum(i == UNK for t in texts for i in self.ids(t))


# -- image tower ------------------------------------------------------------------------------------
def _conv(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class ImageTower(nn.Module):
    """Conv stages, then an MLP on the *flattened* feature map (global pooling would throw away where
    things are, and captions talk about positions)."""

    def __init__(self, cfg: MiniCLIPConfig):
        super().__init__()
        stages: list[nn.Module] = [_conv(3, cfg.channels[0])]  # one cheap full-resolution layer
        for c_in, c_out in zip(cfg.channels, cfg.channels[1:]):
            stages += [_conv(c_in, c_out, stride=2), _conv(c_out, c_out)]
        self.features = nn.Sequential(*stages)
        side = cfg.image_size // 2 ** (len(cfg.channels) - 1)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(cfg.channels[-1] * side * side, cfg.image_hidden),
                                  nn.GELU(), nn.Linear(cfg.image_hidden, cfg.dim))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(pixels))  # (b, 3, h, w) -> (b, c, h', w') -> (b, dim)


# -- text tower -------------------------------------------------------------------------------------
class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (t.view(b, n, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))  # (b, nh, n, hs)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])  # padding is never attended
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(width), SelfAttention(width, heads)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), keep)
        return x + self.mlp(self.ln2(x))


class TextTower(nn.Module):
    """A bidirectional transformer over word ids; the ``[CLS]`` output, projected, is the embedding.

    Before attention, a convolution over neighbouring words (residual, GELU) gives "red circle" and
    "blue circle" different features from the start. Attention at initialisation is close to a bag
    of words, and contrastive training then sits at a saddle where neither tower learns which colour
    goes with which shape (the image tower ends up a bag of colours and shapes too).
    """

    def __init__(self, cfg: MiniCLIPConfig):
        super().__init__()
        self.tok = nn.Embedding(len(SPECIALS) + len(cfg.vocab), cfg.text_width)
        k = cfg.text_conv_kernel
        self.conv = nn.Conv1d(cfg.text_width, cfg.text_width, k, padding=k // 2) if k else None
        self.pos = nn.Parameter(torch.randn(cfg.context_length, cfg.text_width) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg.text_width, cfg.text_heads) for _ in range(cfg.text_layers))
        self.ln = nn.LayerNorm(cfg.text_width)
        self.proj = nn.Linear(cfg.text_width, cfg.dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        keep = ids != PAD  # (b, n)
        n = int(keep.sum(1).max())  # drop the all-padding tail: attention cost follows the longest text
        ids, keep = ids[:, :n], keep[:, :n]
        # padding as zero vectors: the convolution sees the same neighbours however a batch is padded
        x = self.tok(ids) * keep[..., None]  # (b, n, d)
        if self.conv is not None:
            x = x + F.gelu(self.conv(x.transpose(1, 2))).transpose(1, 2) * keep[..., None]  # (b, d, n) inside
        x = x + self.pos[:n]
        for block in self.blocks:
            x = block(x, keep)
        return self.proj(self.ln(x[:, 0]))  # (b, dim)


# -- the model --------------------------------------------------------------------------------------
class MiniCLIP(nn.Module):
    def __init__(self, cfg: MiniCLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.visual = ImageTower(cfg)
        self.text = TextTower(cfg)
        self.tokenizer = ToyTokenizer(cfg.vocab, cfg.context_length)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(b, 3, h, w) normalised pixels -> (b, dim) unnormalised features."""
        return self.visual(pixels)

    def encode_text(self, ids: torch.Tensor, *, chunks: int = 4) -> torch.Tensor:
        """(b, n) token ids -> (b, dim) unnormalised features.

        Texts are run in ``chunks`` groups of similar length, so short captions do not pay for the
        padding of the longest (texts are independent: the result is the same, up to float rounding).
        """
        if len(ids) < 2 * chunks:
            return self.text(ids)
        order = (ids != PAD).sum(1).argsort(stable=True)
        out = torch.cat([self.text(ids[part]) for part in order.chunk(chunks)])
        return out[order.argsort()]

    def forward(self, pixels: torch.Tensor, ids: torch.Tensor, same: torch.Tensor | None = None) -> torch.Tensor:
        """Symmetric InfoNCE loss at the fixed logit scale.

        ``same`` (b, b) bool marks pairs that are the same scene (a scene drawn twice in one batch):
        those are positives too, not negatives.
        """
        v = F.normalize(self.encode_image(pixels), dim=-1)
        t = F.normalize(self.encode_text(ids), dim=-1)
        logits = self.cfg.logit_scale * v @ t.T  # (b, b)
        if same is None:
            same = torch.eye(len(v), dtype=torch.bool, device=v.device)
        target = same.float() / same.sum(1, keepdim=True)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target.T)) / 2

    def num_parameters(self) -> dict[str, int]:
        return {"image": sum(p.numel() for p in self.visual.parameters()),
                "text": sum(p.numel() for p in self.text.parameters())}


# -- images in --------------------------------------------------------------------------------------
def pixels_from_array(array: np.ndarray, cfg: MiniCLIPConfig) -> torch.Tensor:
    """(b, h, w, 3) uint8 -> (b, 3, h, w) normalised float32."""
    x = torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).float() / 255.0
    return (x - cfg.pixel_mean) / cfg.pixel_std


def pixels_from_images(images: list[Image.Image], cfg: MiniCLIPConfig) -> torch.Tensor:
    """PIL images (any size, any mode) -> (b, 3, image_size, image_size) normalised float32."""
    s = cfg.image_size
    arrays = []
    for im in images:
        im = im.convert("RGB")
        if im.size != (s, s):  # box filter when shrinking (what the renderer does), bicubic when growing
            im = im.resize((s, s), Image.BOX if min(im.size) >= s else Image.BICUBIC)
        arrays.append(np.asarray(im))
    return pixels_from_array(np.stack(arrays), cfg)


# -- weights directories ----------------------------------------------------------------------------
def save_pretrained(model: MiniCLIP, directory: str | Path, *, card: dict[str, Any] | None = None,
                    half: bool = True) -> Path:
    """Write ``config.json``, ``model.safetensors`` (fp16 unless ``half=False``) and ``card.json``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dtype = torch.float16 if half else torch.float32
    state = {k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu().contiguous()
             for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": FORMAT})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory / WEIGHTS_FILE, 0o666 & ~umask)  # safetensors writes owner-only files
    write_json(directory / CONFIG_FILE, {"format": FORMAT, "model": model.cfg.to_dict()})
    if card is not None:
        write_json(directory / CARD_FILE, card)
    return directory


def load_pretrained(directory: str | Path | None = None, *, map_location: str | torch.device = "cpu") -> MiniCLIP:
    """Load a weights directory (``None``: the shipped mini-CLIP) as an fp32 model in eval mode."""
    from safetensors.torch import load_file

    directory = shipped_weights_dir() if directory is None else Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise InputError(f"{path} not found: a mini-CLIP weights directory needs {CONFIG_FILE} and "
                             f"{WEIGHTS_FILE} (make one with 'capdec toyworld train-clip --out DIR')")
    meta = read_artifact_json(config_path)
    if meta.get("format") != FORMAT:
        raise InputError(f"{config_path}: format {meta.get('format')!r} is not {FORMAT!r}")
    model = MiniCLIP(MiniCLIPConfig.from_dict(meta["model"]))
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(weights_path)).items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise InputError(f"{weights_path} does not match {config_path}: {e}") from e
    return model.to(map_location).eval()


def weights_fingerprint(directory: str | Path | None = None) -> str:
    """sha256 of the weights file: two mini-CLIPs with different weights never share embeddings."""
    directory = shipped_weights_dir() if directory is None else Path(directory)
    return sha256_file(directory / WEIGHTS_FILE)


# -- convenience for an in-memory model -------------------------------------------------------------
@torch.inference_mode()
def embed_images(model: MiniCLIP, images: list[Image.Image], *, batch_size: int = 256) -> torch.Tensor:
    """(b, dim) L2-normalised CPU embeddings of PIL images (the model is used as it is: call .eval())."""
    device = next(model.parameters()).device
    out = [F.normalize(model.encode_image(pixels_from_images(images[i : i + batch_size], model.cfg).to(device)),
                       dim=-1).float().cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(out) if out else torch.empty(0, model.cfg.dim)


@torch.inference_mode()
def embed_texts(model: MiniCLIP, texts: list[str], *, batch_size: int = 256) -> torch.Tensor:
    """(b, dim) L2-normalised CPU embeddings of texts."""
    device = next(model.parameters()).device
    out = [F.normalize(model.encode_text(model.tokenizer(list(texts[i : i + batch_size])).to(device)),
                       dim=-1).float().cpu() for i in range(0, len(texts), batch_size)]
    return torch.cat(out) if out else torch.empty(0, model.cfg.dim)
