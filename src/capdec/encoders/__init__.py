"""Encoders by name: ``load_encoder("hf:openai/clip-vit-base-patch32")``.

Spec strings (``KIND:REST``; the part after the first colon belongs to the backend):

- ``toy`` — the project's mini-CLIP shipped in the package (``toy:DIR`` for other weights);
- ``hf:HUB_ID_OR_DIR`` — a Hugging Face CLIP or SigLIP model (``transformers``);
- ``open_clip:MODEL@PRETRAINED`` — an open_clip model name with a pretrained tag or a local
  weights file (``open_clip:ViT-B-32@laion2b_s34b_b79k``, ``open_clip:ViT-B-32@/w/vitb32.bin``).

A spec may also be the JSON dict an encoder reports as ``encoder.spec`` (what embedding stores and
checkpoints record), so artefacts rebuild the encoder that made them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from capdec.errors import InputError

if TYPE_CHECKING:
    from capdec.encoders.base import Encoder

__all__ = [
    "PRECISIONS", "PRECISION_HELP", "Encoder", "EncoderError", "EncoderMismatchError", "check_identity",
    "load_encoder", "list_backends", "parse_spec", "resolve_device",
]

# the --precision flag of every command that loads an encoder
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
PRECISION_HELP = ("encoder compute precision; auto is fp16 on GPU and fp32 on CPU, except that hf and open_clip "
                  "text runs in bf16 on CPUs with bf16 units (AMX, AVX512-BF16): ~3x faster, cosine >= 0.999 to "
                  "fp32; fp32 for float32 everywhere (an embedding store records which)")

# kind -> "module:Class"; imported lazily so that e.g. open_clip is only needed when used.
_BACKENDS: dict[str, str] = {
    "toy": "capdec.encoders.toy:ToyEncoder",
    "hf": "capdec.encoders.hf:HFEncoder",
    "open_clip": "capdec.encoders.openclip:OpenCLIPEncoder",
}
# capdec.encoders.base imports torch: its names are loaded on first use, so that importing a torch-free
# submodule (capdec.encoders.miniclip_config: the toy world's grammar and `capdec toyworld --help`) stays light
_BASE_NAMES = ("Encoder", "EncoderError", "EncoderMismatchError", "check_identity", "resolve_device")


def __getattr__(name: str) -> Any:
    if name in _BASE_NAMES:
        from capdec.encoders import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def list_backends() -> list[str]:
    return sorted(_BACKENDS)


def _backend(kind: str) -> type[Encoder]:
    from capdec.encoders.base import EncoderError

    if kind not in _BACKENDS:
        raise EncoderError(f"unknown encoder kind {kind!r}; known kinds: {', '.join(list_backends())}")
    module, cls = _BACKENDS[kind].split(":")
    return getattr(importlib.import_module(module), cls)


def parse_spec(spec: str | dict[str, Any]) -> dict[str, Any]:
    """Turn a spec string (or JSON string, or dict) into the backend's spec dict."""
    from capdec.encoders.base import EncoderError

    if isinstance(spec, dict):
        if "kind" not in spec:
            raise EncoderError(f"encoder spec dict has no 'kind': {spec!r}")
        return dict(spec)
    spec = spec.strip()
    if spec.startswith("{"):
        from capdec.io.text import parse_json

        try:
            data = parse_json(spec, "encoder spec")
        except InputError as e:
            raise EncoderError(f"encoder spec looks like JSON but does not parse: {e}") from e
        return parse_spec(data)
    kind, _, rest = spec.partition(":")
    return _backend(kind).parse_spec_string(rest)


def load_encoder(spec: str | dict[str, Any], *, device: str | None = "auto", precision: str = "auto",
                 batch_size: int = 256) -> Encoder:
    """Build an encoder from a spec string or dict (see module docstring)."""
    parsed = parse_spec(spec)
    return _backend(parsed["kind"]).from_spec(parsed, device=device, precision=precision,
                                              batch_size=batch_size)
