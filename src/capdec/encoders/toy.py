"""Encoder ``toy``: the mini-CLIP of the toy world (:mod:`capdec.encoders.miniclip`).

Spec strings: ``toy`` (the weights shipped in the package) or ``toy:DIR`` (a directory written by
``capdec toyworld train-clip --out DIR``). Spec dict: ``{"kind": "toy", "weights": null | "DIR"}``.
The identity carries the sha256 of the weights file, so embeddings of two different mini-CLIPs are
never mixed, while a copy of the same weights elsewhere still matches.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from capdec.encoders.base import Encoder, EncoderError, TextTokens
from capdec.errors import InputError

logger = logging.getLogger(__name__)


class ToyEncoder(Encoder):
    kind = "toy"

    def __init__(self, weights: str | Path | None = None, *, device: str | torch.device | None = "auto",
                 precision: str = "auto", batch_size: int = 256):
        super().__init__(device=device, precision=precision, batch_size=batch_size)
        from capdec.encoders.miniclip import load_pretrained, weights_fingerprint

        self.weights = None if weights is None else str(weights)
        try:
            self.model = load_pretrained(self.weights).to(self.device, self.dtype).eval()
            self._fingerprint = weights_fingerprint(self.weights)
        except InputError as e:
            where = "the shipped mini-CLIP" if weights is None else f"toy weights {weights!r}"
            raise EncoderError(f"cannot load {where}: {e}") from e
        self.tokenizer = self.model.tokenizer

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def parse_spec_string(cls, rest: str) -> dict[str, Any]:
        return {"kind": cls.kind, "weights": rest.strip() or None}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], *, device: str | torch.device | None = "auto",
                  precision: str = "auto", batch_size: int = 256) -> ToyEncoder:
        unknown = set(spec) - {"kind", "weights"}
        if unknown:
            raise EncoderError(f"toy encoder spec has unknown keys {sorted(unknown)}; it takes 'weights' only")
        return cls(spec.get("weights"), device=device, precision=precision, batch_size=batch_size)

    # -- what the interface asks for ------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.model.cfg.dim

    @property
    def image_size(self) -> int:
        return self.model.cfg.image_size

    @property
    def context_length(self) -> int:
        return self.model.cfg.context_length

    @property
    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "weights": self.weights}

    @property
    def identity(self) -> dict[str, Any]:
        cfg = self.model.cfg
        return {"kind": self.kind, "arch": "miniclip", "dim": cfg.dim, "image_size": cfg.image_size,
                "context_length": cfg.context_length, "weights_sha256": self._fingerprint}

    @property
    def trims_padding(self) -> bool:
        return True  # padding is masked out and zeroed before the convolution (TextTower)

    def tokenize_text(self, texts: Sequence[str]) -> TextTokens:
        from capdec.encoders.miniclip import PAD

        texts = list(texts)
        ids = self.tokenizer(texts)  # (n, context), [PAD] after the words
        return TextTokens(ids, (ids != PAD).sum(dim=1), self.tokenizer.count_truncated(texts))

    def _encode_tokens(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(ids.to(self.device))

    def image_transform(self) -> Callable[[Any], torch.Tensor]:
        return functools.partial(_image_pixels, self.model.cfg)

    def _encode_pixel_batch(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels.to(self.device, self.dtype))


def _image_pixels(cfg: Any, image: Any) -> torch.Tensor:
    """(3, s, s) input of one image, resized to the model's size if needed."""
    from capdec.encoders.miniclip import pixels_from_images

    return pixels_from_images([image], cfg)[0]
