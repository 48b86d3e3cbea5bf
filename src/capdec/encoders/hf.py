"""Hugging Face ``transformers`` dual encoders: CLIP (and SigLIP) as ``hf:HUB_ID_OR_DIR``.

``hf:openai/clip-vit-base-patch32`` loads from the hub (or its local cache; set ``HF_HUB_OFFLINE=1``
to forbid downloads); ``hf:/models/clip-vit-base-patch32`` loads a local directory (a hub snapshot or
anything written by ``save_pretrained``) and never touches the network. A name that looks like a path
(absolute, ``./``, ``~``, several ``/``) but does not exist is an error, not a hub lookup.

The model is loaded in float32 first so the weights fingerprint in :attr:`HFEncoder.identity` does not
depend on the precision asked for, then cast to ``self.dtype`` (fp16 on GPU by default).

SigLIP (``model_type`` ``siglip``/``siglip2``) goes through the same code, padding text to the model's
maximum length as SigLIP was trained; it is untested here because its sentencepiece tokenizer files
cannot be built offline.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from capdec.encoders.base import Encoder, EncoderError, TextTokens, padded_tokens

logger = logging.getLogger(__name__)

# "name" or "org/name" as the hub spells repo ids; anything else is treated as a local path
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
# weights that pin the joint space; hashed (as float32) into the identity
_FINGERPRINT_PARAMS = ("text_projection.weight", "visual_projection.weight", "text_model.head.weight")


def looks_like_path(name: str) -> bool:
    """True when ``name`` can only be a filesystem path, never a hub repo id."""
    return (os.path.isabs(name) or name.startswith((".", "~")) or "\\" in name
            or not _HUB_ID.match(name))


def weights_fingerprint(named: dict[str, torch.Tensor], preferred: tuple[str, ...]) -> str:
    """Short sha256 over the float32 bytes of the ``preferred`` tensors that exist.

    Projections are small and pin the joint space, so two pretrained weights of one architecture
    differ there; a model with none of them falls back to its last two tensors.
    """
    names = [n for n in preferred if n in named] or list(named)[-2:]
    h = hashlib.sha256()
    for name in names:
        h.update(name.encode())
        h.update(named[name].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _features(out: Any) -> torch.Tensor:
    """``get_*_features`` returns a tensor in transformers 4.x and an output object in 5.x."""
    if isinstance(out, torch.Tensor):
        return out
    if getattr(out, "pooler_output", None) is not None:
        return out.pooler_output
    raise EncoderError(f"unexpected output type from the transformers model: {type(out).__name__}")


class HFEncoder(Encoder):
    """A transformers model with ``get_text_features``/``get_image_features`` (CLIP, SigLIP)."""

    kind = "hf"
    bf16_text_on_cpu = True

    def __init__(self, model: Any, tokenizer: Any, image_processor: Any, *, source: str,
                 device: str | torch.device | None = "auto", precision: str = "auto", batch_size: int = 256):
        super().__init__(device=device, precision=precision, batch_size=batch_size)
        self.source = source
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.config = model.config
        self.model_type = str(model.config.model_type)
        # fingerprint in float32 before casting, so fp16-on-GPU and fp32-on-CPU copies agree
        self._fingerprint = weights_fingerprint(dict(model.named_parameters()), _FINGERPRINT_PARAMS)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        if not hasattr(model, "text_model"):  # the towers are not apart: one precision for both
            self.text_dtype = self.dtype
        for part in (getattr(model, "text_model", None), getattr(model, "text_projection", None)):
            if part is not None:
                part.to(self.text_dtype)
        self._dim = self._infer_dim(model)
        self._context_length = self._infer_context_length()
        # SigLIP was trained on max-length padded text without an attention mask
        self._pad_to_max = self.model_type.startswith("siglip")
        self._attention_mask = tokenizer is not None and "attention_mask" in tokenizer.model_input_names

    # -- building -------------------------------------------------------------------------------
    @classmethod
    def parse_spec_string(cls, rest: str) -> dict[str, Any]:
        rest = rest.strip()
        if not rest:
            raise EncoderError("empty hf encoder spec; use hf:HUB_ID (e.g. hf:openai/clip-vit-base-patch32) "
                               "or hf:/path/to/local/model_dir")
        return {"kind": cls.kind, "model": rest}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], *, device: str | torch.device | None = "auto",
                  precision: str = "auto", batch_size: int = 256) -> HFEncoder:
        name = spec.get("model")
        if not isinstance(name, str) or not name.strip():
            raise EncoderError(f"hf encoder spec needs a 'model' (hub id or directory): {spec!r}")
        name = name.strip()
        local = Path(os.path.expanduser(name))
        if local.exists():
            source, local_only = _check_local_dir(local), True
        elif looks_like_path(name):
            raise EncoderError(f"hf encoder: no such directory {name!r} (resolved to {local.resolve()}); "
                               f"give the directory holding the model's config.json, or a hub id")
        else:
            source, local_only = name, False
        model, tokenizer, image_processor = _load_parts(source, local_only=local_only)
        return cls(model, tokenizer, image_processor, source=source, device=device, precision=precision,
                   batch_size=batch_size)

    @staticmethod
    def _infer_dim(model: Any) -> int:
        dim = getattr(model.config, "projection_dim", None)
        if dim is None:  # SigLIP: no projection, the text hidden size is the joint space
            dim = model.config.text_config.hidden_size
        return int(dim)

    def _infer_context_length(self) -> int:
        limits = [int(self.config.text_config.max_position_embeddings)]
        max_len = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(max_len, int) and 0 < max_len < 1_000_000:  # "no limit" is a huge sentinel
            limits.append(max_len)
        return min(limits)

    # -- interface ------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self._dim

    @property
    def context_length(self) -> int:
        return self._context_length

    @property
    def image_size(self) -> int | None:
        # CLIP: resize the short side to size["shortest_edge"], crop crop_size; SigLIP: resize to height x width
        # (a dict in older transformers, a SizeDict with the same keys as attributes in newer ones)
        sides = []
        for sizes in (getattr(self.image_processor, "size", None), getattr(self.image_processor, "crop_size", None)):
            for key in ("shortest_edge", "height", "width"):
                value = sizes.get(key) if isinstance(sizes, dict) else getattr(sizes, key, None)
                if isinstance(value, int) and value > 0:
                    sides.append(value)
        return max(sides) if sides else None

    @property
    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "model": self.source}

    @property
    def identity(self) -> dict[str, Any]:
        text, vision = self.config.text_config, self.config.vision_config
        architectures = getattr(self.config, "architectures", None) or [type(self.model).__name__]
        return {
            "kind": self.kind,
            "model_type": self.model_type,
            "architecture": architectures[0],
            "dim": self.dim,
            "text": {"hidden_size": text.hidden_size, "layers": text.num_hidden_layers,
                     "heads": text.num_attention_heads, "vocab_size": text.vocab_size,
                     "context_length": self.context_length},
            # getattr: SigLIP2's vision config has num_patches instead of image_size
            "vision": {k: getattr(vision, attr, None) for k, attr in [
                ("hidden_size", "hidden_size"), ("layers", "num_hidden_layers"), ("heads", "num_attention_heads"),
                ("image_size", "image_size"), ("patch_size", "patch_size"), ("num_patches", "num_patches")]},
            "weights_sha256": self._fingerprint,
        }

    @property
    def trims_padding(self) -> bool:
        # CLIP's text tower is causal and pools at the end token, and padding is masked out anyway; SigLIP
        # was trained on max-length padding that it attends to
        return not self._pad_to_max and self._attention_mask

    def tokenize_text(self, texts: Sequence[str]) -> TextTokens:
        texts, context = list(texts), self.context_length
        # one token past the context: a caption that reaches it is one the context truncates
        rows = self.tokenizer(texts, truncation=True, max_length=context + 1, verbose=False)["input_ids"]
        long = [i for i, row in enumerate(rows) if len(row) > context]
        if long:
            cut = self.tokenizer([texts[i] for i in long], truncation=True, max_length=context)["input_ids"]
            for i, row in zip(long, cut):
                rows[i] = row
        pad = self.tokenizer.pad_token_id
        return padded_tokens(rows, context, pad if pad is not None else 0, truncated=len(long))

    def _encode_tokens(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        inputs = {"input_ids": ids.to(self.device)}
        if self._attention_mask:
            inputs["attention_mask"] = (torch.arange(ids.shape[1]) < lengths[:, None]).long().to(self.device)
        return _features(self.model.get_text_features(**inputs))

    def image_transform(self) -> Callable[[Any], torch.Tensor]:
        return functools.partial(_process_image, self.image_processor)

    def _encode_pixel_batch(self, pixels: torch.Tensor) -> torch.Tensor:
        return _features(self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype)))


def _process_image(processor: Any, image: Any) -> torch.Tensor:
    """(3, H, W) pixel values of one image (the processor works image by image; a batch is a stack)."""
    return processor(images=[image], return_tensors="pt")["pixel_values"][0]


def _check_local_dir(path: Path) -> str:
    if not path.is_dir():
        raise EncoderError(f"hf encoder: {str(path)!r} is a file; give the model directory that holds "
                           f"config.json (as written by save_pretrained or a hub snapshot)")
    if not (path / "config.json").is_file():
        raise EncoderError(f"hf encoder: no config.json in {str(path)!r}; give the model directory written "
                           f"by save_pretrained (or a hub snapshot directory)")
    return str(path.resolve())


def _load_parts(source: str, *, local_only: bool) -> tuple[Any, Any, Any]:
    """Model (float32, eval), tokenizer and image processor; errors become :class:`EncoderError`."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer

    where = f"local directory {source!r}" if local_only else f"hub model {source!r}"
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=local_only)
    except (OSError, ValueError) as e:
        hint = ("" if local_only else " If you are offline, download it once (or pass a local directory: "
                "hf:/path/to/model_dir); set HF_HUB_OFFLINE=1 to use only the local cache.")
        raise EncoderError(f"hf encoder: cannot load the config of {where}: {e}.{hint}") from e
    if not hasattr(config, "text_config") or not hasattr(config, "vision_config"):
        raise EncoderError(f"hf encoder: {where} is a {config.model_type!r} model, not a text-image dual "
                           f"encoder (CLIP or SigLIP)")
    try:
        model = AutoModel.from_pretrained(source, local_files_only=local_only, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
        image_processor = AutoImageProcessor.from_pretrained(source, local_files_only=local_only)
    except (OSError, ValueError) as e:
        raise EncoderError(f"hf encoder: cannot load {where} (model weights, tokenizer and image processor "
                           f"files are all needed): {e}") from e
    if not (hasattr(model, "get_text_features") and hasattr(model, "get_image_features")):
        raise EncoderError(f"hf encoder: {where} ({type(model).__name__}) has no get_text_features/"
                           f"get_image_features; only CLIP-like dual encoders are supported")
    # a tokenizer built without its vocabulary files silently has a handful of tokens
    if len(tokenizer) < config.text_config.vocab_size // 2:
        raise EncoderError(f"hf encoder: the tokenizer of {where} has {len(tokenizer)} tokens but the model "
                           f"expects {config.text_config.vocab_size}; its tokenizer files are missing or broken")
    model.eval()
    logger.info("loaded hf encoder %s (%s)", source, type(model).__name__)
    return model, tokenizer, image_processor
