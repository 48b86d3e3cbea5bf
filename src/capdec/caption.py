"""The inference pipeline: images -> CLIP image embeddings -> prefix -> caption.

::

    captioner = Captioner.from_pretrained("runs/coco/checkpoint")
    captioner.caption(["a.jpg", "b.jpg"])                     # paths, PIL images or an (n, d) tensor
    stream = captioner.stream(find_images("photos/"))         # many files: results as they come
    for result in stream:
        print(result.image, result.caption)
    print(stream.skipped)                                     # files that could not be used, and why

The encoder is rebuilt from the spec the checkpoint recorded (``load_encoder(ckpt.encoder_spec)``),
or from an override (e.g. a local copy of the same weights); an encoder whose embedding size or
identity differs from the one the decoder was trained with is refused (:class:`EncoderMismatchError`).
Image embeddings are prepared as the checkpoint's inference config says (normalise, subtract an
image mean, add a shift, project onto a text memory), each field overridable; retrieval-augmented
checkpoints get their retrieved captions from the checkpoint's memory or the one given.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

from capdec.checkpoint import Checkpoint, InferenceConfig, load_checkpoint
from capdec.decode import DecodeConfig, generate
from capdec.encoders import Encoder, EncoderMismatchError, load_encoder
from capdec.errors import InputError
from capdec.images import (
    DEFAULT_MAX_ASPECT,
    DEFAULT_MAX_PIXELS,
    ImageLoadError,
    Skipped,
    iter_image_batches,
    load_image,
)
from capdec.noise import NoiseConfig, shift_embeddings
from capdec.utils import progress

logger = logging.getLogger(__name__)

_INFERENCE_FIELDS = frozenset(f.name for f in fields(InferenceConfig))


@dataclass
class CaptionResult:
    """One captioned image."""

    image: str  # the path as given
    caption: str


def _is_image(x: Any) -> bool:
    return hasattr(x, "mode") and hasattr(x, "size") and hasattr(x, "convert")  # a PIL image


class Captioner:
    """A checkpoint's decoder plus the encoder it was trained with."""

    def __init__(self, checkpoint: Checkpoint, *, encoder: Encoder | str | dict[str, Any] | None = None,
                 device: str | torch.device | None = "auto", precision: str = "auto",
                 decode: DecodeConfig | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 max_aspect_ratio: float | None = DEFAULT_MAX_ASPECT, num_workers: int = 4, memory: Any = None,
                 **inference: Any):
        self.checkpoint = checkpoint
        self.model = checkpoint.model
        if device in (None, "auto"):
            self.device = next(self.model.parameters()).device
        else:
            self.device = torch.device(device)
            self.model.to(self.device)
        self.precision = precision
        self.decode = decode or DecodeConfig()
        self.max_pixels = max_pixels
        if max_aspect_ratio is not None and not max_aspect_ratio >= 1:
            raise InputError(f"max_aspect_ratio must be ≥ 1 (or None: no limit), got {max_aspect_ratio}")
        self.max_aspect_ratio = max_aspect_ratio
        self.num_workers = num_workers
        self.inference = self._check_inference(inference)
        # the checkpoint's inference config with these overrides, built (and checked) once, not per batch
        self.inference_config = checkpoint.inference_config(**self.inference)
        # a TextMemory or its directory (checked against the encoder); None: the checkpoint's own, if any
        self.memory = checkpoint.load_memory(memory) if isinstance(memory, (str, os.PathLike)) else memory
        self._encoder: Encoder | None = None
        self._encoder_spec: str | dict[str, Any] = checkpoint.encoder_spec
        if isinstance(encoder, Encoder):
            self._set_encoder(encoder)
        elif encoder is not None:
            self._encoder_spec = encoder

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, encoder: Encoder | str | dict[str, Any] | None = None,
                        device: str | torch.device | None = "auto", precision: str = "auto",
                        decode: DecodeConfig | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                        max_aspect_ratio: float | None = DEFAULT_MAX_ASPECT, num_workers: int = 4,
                        memory: Any = None, **inference: Any) -> Captioner:
        """Load a checkpoint directory, or a Hugging Face Hub repo id ``org/name[@revision]``.

        ``encoder``: a spec (string or dict) or an :class:`Encoder` to use instead of the recorded one
        (it must be the same model); built on first use of images, so captioning precomputed
        embeddings needs no encoder weights. ``memory``: a text memory (or its directory, e.g. an
        embedding store) for projection / retrieval instead of the checkpoint's own. ``inference``:
        fields of :class:`~capdec.checkpoint.InferenceConfig` (``normalize``, ``shift``,
        ``image_mean``, ``project``, ``tau``, ``project_k``) overriding the recorded ones. ``max_pixels`` and
        ``max_aspect_ratio``: image files over either are refused (skipped by :meth:`stream`).
        """
        ckpt = load_checkpoint(path, device=device)
        return cls(ckpt, encoder=encoder, device=device, precision=precision, decode=decode,
                   max_pixels=max_pixels, max_aspect_ratio=max_aspect_ratio, num_workers=num_workers,
                   memory=memory, **inference)

    # -- setup ----------------------------------------------------------------------------------------
    def _check_inference(self, overrides: dict[str, Any]) -> dict[str, Any]:
        unknown = set(overrides) - _INFERENCE_FIELDS
        if unknown:
            raise InputError(f"unknown inference option(s) {', '.join(sorted(unknown))}; "
                             f"known: {', '.join(sorted(_INFERENCE_FIELDS))}")
        dim = self.model.config.embed_dim
        out = dict(overrides)
        for name in ("shift", "image_mean"):
            value = out.get(name)
            if value is None:
                continue
            vec = torch.as_tensor(value, dtype=torch.float32).flatten()
            if vec.numel() != dim:
                raise InputError(f"the {name} vector has {vec.numel()} values; the checkpoint's embeddings have "
                                 f"dimension {dim}")
            if not torch.isfinite(vec).all():
                raise InputError(f"the {name} vector has non-finite values")
            out[name] = vec.tolist()
        return out

    def _set_encoder(self, encoder: Encoder) -> None:
        dim = self.model.config.embed_dim
        if encoder.dim != dim:
            raise EncoderMismatchError(
                f"encoder {encoder.spec} gives {encoder.dim}-d embeddings, but checkpoint {self.checkpoint.path} "
                f"was trained on {dim}-d embeddings of {self.checkpoint.encoder_spec}. Use the encoder it was "
                "trained with.")
        self.checkpoint.check_encoder(encoder.identity)
        self._encoder = encoder

    @property
    def encoder(self) -> Encoder:
        """The image encoder (built from the recorded or overriding spec on first use, then checked)."""
        if self._encoder is None:
            logger.info("loading encoder %s", self._encoder_spec)
            self._set_encoder(load_encoder(self._encoder_spec, device=self.device, precision=self.precision))
        assert self._encoder is not None
        return self._encoder

    def load_options(self) -> dict[str, Any]:
        """How image files are decoded (:func:`capdec.images.load_image`'s options), as ``capdec serve`` decodes
        uploads: reduced as far as the encoder's input size allows (it resizes to that anyway), so a large file
        costs about that size once decoded, and its embedding does not depend on which command read it."""
        return {"max_pixels": self.max_pixels, "min_side": self.encoder.image_size,
                "max_aspect": self.max_aspect_ratio}

    # -- embeddings -> captions -----------------------------------------------------------------------
    def prepare(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(n, d) raw image embeddings -> the mapper's input (the inference config applied)."""
        cfg = self.inference_config
        return prepare_image_embeddings(self._check_dim(embeddings).float(), cfg, noise=self.checkpoint.noise,
                                        memory=self._memory(retrieval=False, project=cfg.project))

    def prefix(self, embeddings: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """(n, d) raw image embeddings -> the LM prefix (n, L', h): prepared, then retrieval-augmented if the
        checkpoint is (with its own memory unless one was given). A model with entity prompts gets one
        (L' + p_i, h) prefix per image instead, its hard prompt appended (for :func:`capdec.decode.generate`)."""
        cfg = self.inference_config
        retrieval = bool(self.model.config.retrieval_k or self.model.config.entity_prompt)
        memory = self._memory(retrieval=retrieval, project=cfg.project)
        q = prepare_image_embeddings(self._check_dim(embeddings).float(), cfg, noise=self.checkpoint.noise,
                                     memory=memory)
        extra: dict[str, Any] = {}
        if retrieval:
            from capdec.retrieval import RetrievalContext

            extra = RetrievalContext(memory, self.model)(q)
        prompts = extra.pop("prompt_ids", None)
        with torch.inference_mode():
            prefix = self.model.prefix(q, **extra)
            return prefix if prompts is None else self.model.with_prompts(prefix, prompts)

    def _memory(self, *, retrieval: bool, project: bool) -> Any:
        """The text memory projection / retrieval use: the one given, else the checkpoint's (None when unused)."""
        if not (retrieval or project):
            return self.memory
        memory = self.memory if self.memory is not None else self.checkpoint.memory
        if memory is None and retrieval:
            raise InputError(f"{self.checkpoint.path} retrieves training captions but has no memory/; give --memory")
        return memory

    def _check_dim(self, embeddings: torch.Tensor) -> torch.Tensor:
        if embeddings.shape[-1] != self.model.config.embed_dim:
            raise InputError(f"embeddings have dimension {embeddings.shape[-1]}, the checkpoint expects "
                             f"{self.model.config.embed_dim}")
        return embeddings

    def _decode_config(self, options: dict[str, Any]) -> DecodeConfig:
        return self.decode.replace(**options) if options else self.decode

    def _caption_embeddings(self, emb: torch.Tensor, cfg: DecodeConfig) -> list[str]:
        """Raw (b, d) image embeddings -> captions: prepare, prefix (with retrieval), decode."""
        prefix = self.prefix(emb)  # (b, L, h), or one (L + p_i, h) per image with entity prompts
        prefix = [p.to(self.device) for p in prefix] if isinstance(prefix, list) else prefix.to(self.device)
        return self.model.decode_ids(generate(self.model, prefix, config=cfg))

    @torch.inference_mode()
    def caption_embeddings(self, embeddings: Any, *, batch_size: int = 64, show_progress: bool | None = None,
                           **decode: Any) -> list[str]:
        """Captions of (n, d) image embeddings (torch or numpy), made by this checkpoint's encoder."""
        emb = torch.as_tensor(embeddings)
        if emb.ndim == 1:
            emb = emb.unsqueeze(0)
        if emb.ndim != 2:
            raise InputError(f"embeddings must be a (n, d) matrix, got shape {tuple(emb.shape)}")
        if emb.shape[1] != self.model.config.embed_dim:
            raise InputError(f"embeddings have dimension {emb.shape[1]}, the checkpoint expects "
                             f"{self.model.config.embed_dim}")
        cfg = self._decode_config(decode)
        out: list[str] = []
        with progress(total=emb.shape[0], unit="img", desc="captioning", show=show_progress) as bar:
            for start in range(0, emb.shape[0], batch_size):
                chunk = emb[start:start + batch_size]
                out.extend(self._caption_embeddings(chunk, cfg))
                bar.update(chunk.shape[0])
        return out

    # -- images -> captions ---------------------------------------------------------------------------
    def embed_images(self, images: Sequence[Any]) -> torch.Tensor:
        """(n, d) image embeddings of RGB PIL images: L2-normalised, or the encoder's raw features for a decoder
        that takes them (``normalize`` off, e.g. ClipCap's MLP models)."""
        return self.encoder.encode_image(list(images), normalize=self._normalize)

    @property
    def _normalize(self) -> bool:
        return self.inference_config.normalize

    @torch.inference_mode()
    def caption(self, inputs: Any, *, batch_size: int = 64, show_progress: bool | None = None,
                **decode: Any) -> list[str]:
        """Captions of PIL images, image paths (mixed freely) or an (n, d) embedding tensor/array.

        A path that cannot be loaded raises :class:`~capdec.images.ImageLoadError` naming it; use
        :meth:`stream` to skip bad files instead.
        """
        if isinstance(inputs, torch.Tensor) or type(inputs).__module__ == "numpy":
            return self.caption_embeddings(inputs, batch_size=batch_size, show_progress=show_progress, **decode)
        if isinstance(inputs, (str, os.PathLike)) or _is_image(inputs):
            inputs = [inputs]
        items = list(inputs)
        cfg = self._decode_config(decode)
        out: list[str] = []
        with progress(total=len(items), unit="img", desc="captioning", show=show_progress) as bar:
            for start in range(0, len(items), batch_size):
                chunk = items[start:start + batch_size]
                images = [x if _is_image(x) else self._load(x) for x in chunk]
                out.extend(self._caption_embeddings(self.embed_images(images), cfg))
                bar.update(len(chunk))
        return out

    def _load(self, x: Any) -> Any:
        if not isinstance(x, (str, os.PathLike)):
            raise InputError(f"cannot caption a {type(x).__name__}; give PIL images, paths or an embedding matrix")
        return load_image(x, **self.load_options())

    def stream(self, paths: Sequence[str | os.PathLike], *, batch_size: int = 64,
               show_progress: bool | None = None, **decode: Any) -> CaptionStream:
        """Caption many files, yielding results as each batch is done; bad files are skipped and collected."""
        return CaptionStream(self, paths, batch_size=batch_size, decode=self._decode_config(decode),
                             show_progress=show_progress)


def prepare_image_embeddings(v: torch.Tensor, cfg: InferenceConfig, *, noise: NoiseConfig,
                             memory: Any = None) -> torch.Tensor:
    """Image embeddings (b, d) -> the decoder's query, as ``cfg`` says: centre (subtract the image mean),
    normalise, shift, then project onto the text ``memory`` (DeCap) if asked.

    ``noise`` is the training's: a decoder trained on centred text embeddings needs centred images.
    """
    if noise.center and cfg.image_mean is None:
        raise InputError("this checkpoint was trained with --center: give the image mean "
                         "(--image-mean FILE, e.g. a calibrate noise.json) so images are centred too")
    vec = lambda x: None if x is None else torch.as_tensor(x, dtype=torch.float32)  # noqa: E731
    q = shift_embeddings(v.float(), shift=vec(cfg.shift), mean=vec(cfg.image_mean), normalize_output=cfg.normalize,
                         renormalize_shift=cfg.renormalize_shift)
    if cfg.project:
        if memory is None:
            raise InputError("projection needs a text memory: train with --save-memory or give --memory")
        q = memory.project(q, tau=cfg.tau, k=cfg.project_k)
    return q


class CaptionStream:
    """Iterate for :class:`CaptionResult` (in input order, skipped files left out); ``batches()`` for lists.

    ``skipped`` collects :class:`~capdec.images.Skipped` (file and reason) as the run goes;
    ``captioned`` counts the results yielded so far.
    """

    def __init__(self, captioner: Captioner, paths: Sequence[str | os.PathLike], *, batch_size: int,
                 decode: DecodeConfig, show_progress: bool | None = None):
        if batch_size < 1:
            raise InputError(f"batch_size must be ≥ 1, got {batch_size}")
        self.captioner = captioner
        self.paths = [os.fspath(p) for p in paths]
        self.batch_size = batch_size
        self.decode = decode
        self.show_progress = show_progress
        self.skipped: list[Skipped] = []
        self.captioned = 0

    def __len__(self) -> int:
        return len(self.paths)

    def __iter__(self) -> Iterator[CaptionResult]:
        for batch in self.batches():
            yield from batch

    def batches(self) -> Iterator[list[CaptionResult]]:
        """One list of results per batch of ``batch_size`` files (empty when all of them were skipped)."""
        cap = self.captioner
        encoder = cap.encoder  # built (and checked) before any file is read
        batches = iter_image_batches(self.paths, batch_size=self.batch_size, num_workers=cap.num_workers,
                                     **cap.load_options())
        with progress(total=len(self.paths), unit="img", desc="captioning", show=self.show_progress) as bar:
            for batch in batches:
                self.skipped.extend(batch.skipped)
                results: list[CaptionResult] = []
                if batch.images:
                    paths, emb = self._encode(encoder, batch.paths, batch.images)
                    if paths:
                        with torch.inference_mode():
                            captions = cap._caption_embeddings(emb, self.decode)
                        results = [CaptionResult(p, c) for p, c in zip(paths, captions)]
                self.captioned += len(results)
                bar.update(len(batch))
                if self.skipped:
                    bar.set_postfix(skipped=len(self.skipped), refresh=False)
                yield results

    def _skip(self, path: str, reason: str) -> None:
        logger.warning("skipping %s: %s", path, reason)
        self.skipped.append(Skipped(path, reason))

    def _encode(self, encoder: Encoder, paths: list[str], images: list[Any]) -> tuple[list[str], torch.Tensor]:
        """Embeddings of a batch; when the encoder fails on the batch, image by image, skipping failures."""
        normalize = self.captioner._normalize
        try:
            emb = encoder.encode_image(images, normalize=normalize)
        except (RuntimeError, ValueError, TypeError, OSError, MemoryError) as e:
            logger.debug("encoding a batch failed (%s); retrying image by image", e)
            kept, rows = [], []
            for p, im in zip(paths, images):
                try:
                    rows.append(encoder.encode_image([im], normalize=normalize))
                    kept.append(p)
                except (RuntimeError, ValueError, TypeError, OSError, MemoryError) as err:
                    self._skip(p, f"the encoder failed on it ({type(err).__name__}: {err})")
            paths = kept
            emb = torch.cat(rows) if rows else torch.empty(0, encoder.dim)
        finite = torch.isfinite(emb).all(dim=1)
        if not finite.all():
            for p, ok in zip(paths, finite.tolist()):
                if not ok:
                    self._skip(p, "the encoder produced a non-finite embedding")
            paths = [p for p, ok in zip(paths, finite.tolist()) if ok]
            emb = emb[finite]
        return paths, emb


__all__ = ["CaptionResult", "CaptionStream", "Captioner", "ImageLoadError", "prepare_image_embeddings"]
