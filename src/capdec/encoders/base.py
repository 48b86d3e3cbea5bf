"""The one interface every CLIP-like encoder implements.

An encoder maps captions and images into one embedding space. Everything downstream (the
embedding store, training, captioning, evaluation) talks to this interface only, so adding a
backend means writing one subclass and one line in the registry (``capdec.encoders``).

Contract for every backend:
- ``encode_text(list[str]) -> (N, dim)`` and ``encode_image(list[PIL.Image]) -> (N, dim)``:
  float32, L2-normalised, on the CPU, computed in batches under ``torch.inference_mode``, rows in the
  order given (``encode_image(..., normalize=False)``: the raw features, for decoders trained on them, as
  ClipCap's).
- text in two steps a backend provides: ``tokenize_text(texts) -> TextTokens`` (ids padded to the
  context, lengths, how many were truncated) and ``_encode_tokens(ids, lengths)`` (one batch). The base
  class sorts captions by length and batches them; where ``trims_padding`` holds (a causal text tower
  that pools at the end-of-text token: CLIP) each batch is cut to its longest caption, which changes
  nothing but the cost (``tests/test_text_batching.py`` checks it on both real backends).
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

Precision: ``auto`` is fp16 on a GPU. On a CPU it is fp32, except that the text tower of a backend
that opts in (``bf16_text_on_cpu``: hf, open_clip) runs in bf16 where the CPU has bf16 matrix units
(AMX, AVX512-BF16): ~3x faster, within cosine 0.9999 of fp32 at ViT-B/32's size
(``benchmarks/embed_speed.py``). ``fp32`` forces float32 everywhere. ``text_precision`` names what text
ran in; embedding stores record it.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from capdec.errors import CapdecError
from capdec.utils import cpu_has_bf16

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


@dataclass
class TextTokens:
    """Token ids of a list of captions, as a backend's tokenizer makes them."""

    ids: torch.Tensor  # (n, context) int64, padded to the context with the tokenizer's padding id
    lengths: torch.Tensor  # (n,) int64 tokens per caption before the padding (special tokens included)
    truncated: int  # captions longer than the context, cut by the tokenizer

    def __len__(self) -> int:
        return len(self.ids)


def padded_tokens(rows: Sequence[Sequence[int]], context: int, pad: int, *, truncated: int) -> TextTokens:
    """:class:`TextTokens` of token id lists no longer than ``context``, padded with ``pad``."""
    ids = torch.full((len(rows), context), pad, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return TextTokens(ids, torch.tensor([len(row) for row in rows], dtype=torch.long), truncated)


def length_batches(lengths: torch.Tensor, *, max_items: int, max_tokens: int | None) -> list[torch.Tensor]:
    """Indices of ``lengths`` in batches of similar length: shortest first, order-stable.

    Each batch holds at most ``max_items`` rows and, padded to its longest row, at most ``max_tokens``
    tokens (None: no token limit); a row longer than ``max_tokens`` gets a batch of its own.
    """
    order = torch.argsort(lengths, stable=True)
    sorted_lengths = lengths[order].tolist()
    batches, start = [], 0
    while start < len(order):
        end = start + 1
        while (end < len(order) and end - start < max_items
               and (max_tokens is None or (end - start + 1) * sorted_lengths[end] <= max_tokens)):
            end += 1
        batches.append(order[start:end])
        start = end
    return batches


def batched(items: Sequence[Any], batch_size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), batch_size):
        yield items[start : start + batch_size]


class Encoder(ABC):
    """Base class; subclasses implement ``tokenize_text``, ``_encode_tokens``, ``_encode_image_batch``
    and the properties."""

    #: short backend name used in spec strings ("hf", "open_clip", "toy")
    kind: str = ""
    #: whether ``precision="auto"`` runs the text tower in bf16 on a CPU with bf16 matrix units
    bf16_text_on_cpu: bool = False
    #: on a CPU, text batches hold at most this many tokens (padding included): larger batches spill out of
    #: the cache (ViT-B/32 text tower, one thread: flat from 512 to 2048, -5% at 4096, -25% at 8192)
    cpu_batch_tokens: int = 2048

    def __init__(self, *, device: str | torch.device | None = "auto", precision: str = "auto",
                 batch_size: int = 256):
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(precision, self.device)
        self.text_dtype = (torch.bfloat16 if precision == "auto" and self.device.type == "cpu"
                           and self.bf16_text_on_cpu and cpu_has_bf16() else self.dtype)
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

    @property
    def text_precision(self) -> str:
        """What text is computed in: "float32", "bfloat16" or "float16" (embedding stores record it)."""
        return str(self.text_dtype).removeprefix("torch.")

    @property
    def trims_padding(self) -> bool:
        """True when trailing padding cannot change a caption's embedding, so a batch may be cut to its
        longest caption (causal attention and pooling at the end token, or a padding mask)."""
        return False

    @abstractmethod
    def tokenize_text(self, texts: Sequence[str]) -> TextTokens:
        """Token ids padded to the context, lengths and the number of truncated captions."""

    @abstractmethod
    def _encode_tokens(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Unnormalised text features of one batch (any dtype/device); ``ids`` (b, n) on the CPU, cut to
        ``n = lengths.max()`` when :attr:`trims_padding`, else the full context."""

    @abstractmethod
    def image_transform(self) -> Callable[[Any], torch.Tensor]:
        """One RGB PIL image -> its (3, H, W) float model input (CPU); picklable, free of the model's weights."""

    @abstractmethod
    def _encode_pixel_batch(self, pixels: torch.Tensor) -> torch.Tensor:
        """Unnormalised image features of one (B, 3, H, W) batch of model inputs, any dtype/device."""

    def count_truncated(self, texts: Sequence[str]) -> int:
        """Number of ``texts`` longer than the tokenizer's context."""
        return self.tokenize_text(list(texts)).truncated if texts else 0

    # -- shared behaviour ---------------------------------------------------------------------
    def encode_text(self, texts: Sequence[str], *, batch_size: int | None = None) -> torch.Tensor:
        """(N, dim) float32 L2-normalised CPU tensor."""
        if isinstance(texts, str):
            raise TypeError("encode_text takes a list of strings, not a single string")
        texts = list(texts)
        if not texts:
            return torch.empty(0, self.dim)
        return self.encode_tokens(self.tokenize_text(texts), batch_size=batch_size)

    @torch.inference_mode()
    def encode_tokens(self, tokens: TextTokens, *, batch_size: int | None = None,
                      on_batch: Callable[[int], Any] | None = None) -> torch.Tensor:
        """(N, dim) float32 L2-normalised CPU tensor of :meth:`tokenize_text`'s output, rows in its order.

        Captions run shortest first in batches of at most ``batch_size`` captions (and, on a CPU,
        :attr:`cpu_batch_tokens` tokens), each cut to its longest caption when :attr:`trims_padding`;
        ``on_batch(n)`` is called after each batch of ``n`` captions (a progress bar's ``update``).
        """
        out = torch.empty(len(tokens), self.dim)
        context = tokens.ids.shape[1] if len(tokens) else 0
        lengths = tokens.lengths if self.trims_padding else torch.full_like(tokens.lengths, context)
        max_tokens = self.cpu_batch_tokens if self.device.type == "cpu" else None
        for idx in length_batches(lengths, max_items=batch_size or self.batch_size, max_tokens=max_tokens):
            ids = tokens.ids[idx, : int(lengths[idx].max())]  # (b, n)
            out[idx] = F.normalize(self._encode_tokens(ids, tokens.lengths[idx]).float(), dim=-1).cpu()
            if on_batch is not None:
                on_batch(len(idx))
        return out

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
