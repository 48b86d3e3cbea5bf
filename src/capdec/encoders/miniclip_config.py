"""The mini-CLIP's config and word splitting, kept free of torch so the CLI stays fast to start.

The model itself is in :mod:`capdec.encoders.miniclip`; training it is the lab's business
(:mod:`capdec.lab.toyworld.train_clip`).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from capdec.config_base import Config
from capdec.errors import InputError

_WORD = re.compile(r"[a-z0-9]+")


def tokenize_words(text: str) -> list[str]:
    """Lowercased words with punctuation stripped: the unit the toy tokenizer and tests work in."""
    return _WORD.findall(text.lower())


@dataclass
class MiniCLIPConfig(Config):
    """Every hyperparameter needed to rebuild a mini-CLIP (stored as ``config.json``)."""

    dim: int = 128  # joint embedding size
    image_size: int = 32  # input images are image_size x image_size RGB
    channels: tuple[int, ...] = (16, 32, 64, 128)  # conv widths; each stage after the first halves h and w
    image_hidden: int = 256  # width of the MLP head on the flattened final feature map
    vocab: tuple[str, ...] = ()  # known words; the lab's config fills in the toy grammar's vocabulary
    context_length: int = 40  # tokens, [CLS] included
    text_width: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_conv_kernel: int = 3  # width of the word convolution before attention (odd; 0: none)
    logit_scale: float = 100.0  # fixed inverse temperature of the contrastive loss
    pixel_mean: float = 0.5  # images are (x / 255 - mean) / std
    pixel_std: float = 0.25

    def __post_init__(self) -> None:
        self.channels = tuple(self.channels)
        self.vocab = tuple(self.vocab)
        if self.image_size % 2 ** (len(self.channels) - 1):
            raise InputError(f"image_size {self.image_size} must be divisible by 2^{len(self.channels) - 1} "
                             f"(one halving per conv stage after the first)")
        if self.text_conv_kernel < 0 or (self.text_conv_kernel and self.text_conv_kernel % 2 == 0):
            raise InputError(f"text_conv_kernel must be 0 or odd, got {self.text_conv_kernel}")
        if self.text_width % self.text_heads:
            raise InputError(f"text_width {self.text_width} must be divisible by text_heads {self.text_heads}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channels"], d["vocab"] = list(self.channels), list(self.vocab)
        return d

