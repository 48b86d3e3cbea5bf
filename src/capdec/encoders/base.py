"""The one interface every CLIP-like encoder implements.

An encoder maps captions and images into one embedding space. Everything downstream (the
embedding store, training, captioning, evaluation) talks to this interface only, so adding a
backend means writing one subclass and one line in the registry (``capdec.encoders``).

Contract for every backend:
- ``encode_text(list[str]) -> (N, dim)`` and ``encode_image(list[PIL.Image]) -> (N, dim)``:
  float32, L2-normalised, on the CPU, computed in batches under ``torch.inference_mode``
  (``encode_image(..., normalize=False)``: the raw features, for decoders trained on them, as ClipCap's).
- Images go through two steps: ``image_transform()`` (a picklable function, one RGB PIL image -> its
  ``(3, H, W)`` model input; image stores run it in DataLoader worker processes) and
  ``encode_pixels((N, 3, H, W)) -> (N, dim)``; ``encode_image`` is the two in one process.
- ``spec``: a JSON-able dict that rebuilds the encoder with ``load_encoder(spec)``.
- ``identity``: a JSON-able dict naming the architecture and output space; two encoders whose
  identities differ produce embeddings that must not be mixed (a checkpoint trained on one refuses
  the other). Identity leaves out *where* weights come from, so a local copy of the same model
  passes.
- ``count_truncated(texts)``: how many captions the tokenizer cuts (over-long captions are truncated
  by the tokenizer, never by characters).
- ``image_size``: the side images are resized to before the vision tower, when known.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from capdec.errors import CapdecError

logger = logging.getLogger(__name__)


class EncoderError(CapdecError, RuntimeError):
    """An encoder could not be built or used (unknown spec, missing weights, missing extra)."""


class EncoderMismatchError(CapdecError, ValueError):
    """Embeddings from one encoder were about to be mixed with another's."""


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto``/``None`` → cuda if available, else cpu; anything else is passed to torch."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """``auto`` → fp16 on GPU (CLIP was trained with it), fp32 on CPU."""
    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if precision not in table:
        raise EncoderError(f"unknown precision {precision!r}; use one of auto, {', '.join(table)}")
    return table[precision]


def batched(items: Sequence[Any], batch_size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), batch_size):
        yield items[start : start + batch_size]


class Encoder(ABC):
    """Base class; subclasses implement the four ``_encode_*``/``count_truncated``/properties."""

    #: short backend name used in spec strings ("hf", "open_clip", "toy")
    kind: str = ""

    def __init__(self, *, device: str | torch.device | None = "auto", precision: str = "auto",
                 batch_size: int = 256):
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(precision, self.device)
        self.precision = precision
        self.batch_size = batch_size

    # -- what a subclass provides -------------------------------------------------------------
    @classmethod
    @abstractmethod
    def parse_spec_string(cls, rest: str) -> dict[str, Any]:
        """``rest`` is the part of ``KIND:REST`` after the colon; return the spec dict."""

    @classmethod
    @abstractmethod
    def from_spec(cls, spec: dict[str, Any], *, device: str | torch.device | None = "auto",
                  precision: str = "auto", batch_size: int = 256) -> Encoder:
        """Build the encoder a spec dict describes (never downloads when it names a local path)."""

    @property
    @abstractmethod
    def dim(self) -> int:
        """Size of the joint embedding space."""

    @property
    @abstractmethod
    def spec(self) -> dict[str, Any]:
        """JSON-able dict with ``kind`` and whatever rebuilds this encoder."""

    @property
    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """JSON-able architecture/output-space identity (no file locations)."""

    @property
    def context_length(self) -> int | None:
        """Maximum number of text tokens, if the tokenizer has one."""
        return None

    @property
    def image_size(self) -> int | None:
        """The side, in pixels, the image preprocessing resizes to (None: unknown). Images may be decoded
        reduced as long as their short side stays at least this (``capdec.images.load_image(min_side=)``)."""
        return None

    @abstractmethod
    def _encode_text_batch(self, texts: list[str]) -> torch.Tensor:
        """Unnormalised text features for one batch, any dtype/device."""

    @abstractmethod
    def image_transform(self) -> Callable[[Any], torch.Tensor]:
        """One RGB PIL image -> its (3, H, W) float model input (CPU); picklable, free of the model's weights."""

    @abstractmethod
    def _encode_pixel_batch(self, pixels: torch.Tensor) -> torch.Tensor:
        """Unnormalised image features of one (B, 3, H, W) batch of model inputs, any dtype/device."""

    def count_truncated(self, texts: Sequence[str]) -> int:
        """Number of ``texts`` longer than the tokenizer's context (0 if unknown)."""
        return 0

    # -- shared behaviour ---------------------------------------------------------------------
    @torch.inference_mode()
    def encode_text(self, texts: Sequence[str], *, batch_size: int | None = None) -> torch.Tensor:
        """(N, dim) float32 L2-normalised CPU tensor."""
        if isinstance(texts, str):
            raise TypeError("encode_text takes a list of strings, not a single string")
        texts = list(texts)
        # batches of similar length waste little on padding (2-3x faster on real captions); order restored
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = self._run(self._encode_text_batch, [texts[i] for i in order], batch_size)
        restored = torch.empty_like(out)
        restored[torch.tensor(order, dtype=torch.long)] = out
        return restored

    @torch.inference_mode()
    def encode_image(self, images: Sequence[Any], *, batch_size: int | None = None,
                     normalize: bool = True) -> torch.Tensor:
        """(N, dim) float32 CPU tensor, L2-normalised unless ``normalize=False``; images are PIL images (converted
        to RGB)."""
        images = [im if getattr(im, "mode", "RGB") == "RGB" else im.convert("RGB") for im in images]
        transform = self.image_transform()
        return self._run(lambda chunk: self._encode_pixel_batch(torch.stack([transform(im) for im in chunk])),
                         images, batch_size, normalize=normalize)

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor, *, batch_size: int | None = None,
                      normalize: bool = True) -> torch.Tensor:
        """(N, dim) float32 CPU tensor of (N, 3, H, W) inputs made by :meth:`image_transform`, L2-normalised
        unless ``normalize=False``."""
        return self._run(self._encode_pixel_batch, pixels, batch_size, normalize=normalize)

    def _run(self, fn, items: list[Any] | torch.Tensor, batch_size: int | None, *,
             normalize: bool = True) -> torch.Tensor:
        if len(items) == 0:
            return torch.empty(0, self.dim)
        prepare = (lambda x: F.normalize(x, dim=-1)) if normalize else (lambda x: x)  # noqa: E731
        # a list is passed on as a list, a tensor (a batch of model inputs) as a slice of it
        out = [prepare(fn(chunk if isinstance(chunk, torch.Tensor) else list(chunk)).float()).cpu()
               for chunk in batched(items, batch_size or self.batch_size)]
        return torch.cat(out)

    def check_compatible(self, identity: dict[str, Any], *, what: str = "this artefact") -> None:
        """Raise :class:`EncoderMismatchError` unless ``identity`` matches this encoder's."""
        check_identity(identity, self.identity, what=what)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(spec={self.spec}, dim={self.dim}, device={self.device})"


def check_identity(expected: dict[str, Any], actual: dict[str, Any], *, what: str = "this artefact") -> None:
    """Raise :class:`EncoderMismatchError` when two encoder identities differ, naming the fields."""
    diffs = {k: (expected.get(k), actual.get(k)) for k in sorted(set(expected) | set(actual))
             if expected.get(k) != actual.get(k)}
    if diffs:
        lines = ", ".join(f"{k}: {a!r} (expected) vs {b!r} (given)" for k, (a, b) in diffs.items())
        raise EncoderMismatchError(
            f"{what} was made with a different encoder ({lines}). Use the encoder it was made with, "
            f"or re-embed/retrain with this one.")
