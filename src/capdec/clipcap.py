"""Importing ClipCap / CapDec weights (``coco_weights.pt``, CapDec's released noise-level models).

Those files are ``torch.save(model.state_dict())`` of the reference ``ClipCaptionModel``: the mapping
network under ``clip_project.`` and GPT-2 (``GPT2LMHeadModel``) under ``gpt.``. The mapper is

- the transformer mapper (``clip_project.linear``, ``clip_project.prefix_const``,
  ``clip_project.transformer.layers.N.*``): capdec's :class:`~capdec.model.mapper.ClipCapTransformerMapper`
  has the same parameter names, so only the prefix changes (``clip_project.`` -> ``mapper.``);
- or the MLP (``clip_project.model.0`` / ``.2``: Linear, Tanh, Linear): capdec's ``mapper.net.0`` / ``.2``.

The file is read with ``torch.load(weights_only=True)``, which builds tensors and plain containers and
never runs code from the file. Buffers older transformers versions saved with GPT-2
(``attn.bias``, ``attn.masked_bias``: causal masks, not weights) are dropped when the LM does not have
them. Every other tensor must match the model built from the options in name and shape; the first
mismatch is reported with the key, the file's shape and the expected shape, and nothing is written.

The reference trained without an end token (captions padded with id 0, ignored by the loss), so the
checkpoint records ``stop_at_period``: decoding ends a caption at its first '.' by default; and it
decodes at most ``entry_length=67`` tokens (``generate_beam`` and ``generate2`` of both repositories),
so an imported checkpoint's ``max_length`` is 67 (or what the LM's positions leave after the prefix).

**Raw or normalised CLIP embeddings.** The two references feed the mapper different inputs, and the
checkpoint records which (``InferenceConfig.normalize``, used by ``capdec caption``):

- ClipCap's MLP models (``coco_weights.pt``, ``conceptual_weights.pt``) take the *raw*
  ``clip_model.encode_image`` output: ``predict.py`` and its inference notebook never normalise, nor
  does ``parse_coco.py`` when it makes the training features (``train.py``'s ``--normalize_prefix`` is off
  by default).
- CapDec's models take it divided by its L2 norm (``predictions_runner.py``, unless
  ``--dont_normalize_prefix``; its ``train.py`` normalises unless ``--dont_norm``), and so do ClipCap's
  transformer-mapper weights (its ``transformer_inference.ipynb`` divides by the norm).

Both repositories save the same key names from the same mapper classes, so which code made a file
cannot be read from it. What can be told is the mapper: a transformer mapper takes normalised
embeddings under both references' inference code, so ``source`` is then optional; an MLP mapper's
input depends on the source, which must be given (``source="clipcap"`` or ``"capdec"``), or the
input stated directly with ``normalize`` (weights trained with ``--normalize_prefix`` or ``--dont_norm``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from capdec.artifacts import load_tensors
from capdec.errors import InputError

logger = logging.getLogger(__name__)

SOURCES = ("clipcap", "capdec")  # the code that trained the file: rmokady/CLIP_prefix_caption, DavidHuji/CapDec
REFERENCE_MAX_LENGTH = 67  # entry_length of both references' generate_beam / generate2

_STALE_BUFFERS = re.compile(r"\.attn\.(bias|masked_bias)$")
_LAYER = re.compile(r"^clip_project\.transformer\.layers\.(\d+)\.")


@dataclass
class ClipCapLayout:
    """What a ClipCap state dict holds, read from its tensor shapes."""

    mapper: str  # "mlp" or "transformer"
    embed_dim: int  # d: the CLIP embedding size the mapper takes (640 for RN50x4, 512 for ViT-B/32)
    hidden: int  # h: GPT-2's hidden size
    prefix_length: int  # L
    clip_length: int | None  # c (transformer)
    depth: int | None  # transformer layers


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a ``.pt`` state dict, loaded without unpickling code (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such weights file")
    state = load_tensors(path, what="a ClipCap / CapDec state dict")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # some trainers wrap it
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{path}: expected a state dict (a mapping of names to tensors)")
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    if not any(k.startswith("clip_project.") for k in state) or not any(k.startswith("gpt.") for k in state):
        found = sorted({k.split(".", 1)[0] for k in state})
        raise InputError(f"{path}: not a ClipCap / CapDec state dict: it needs 'clip_project.*' (mapper) and "
                         f"'gpt.*' (GPT-2) keys; found top-level names {found[:8]}")
    return state


def _shape(state: dict[str, torch.Tensor], key: str, path: Any) -> tuple[int, ...]:
    if key not in state:
        raise InputError(f"{path}: the key {key!r} is missing")
    return tuple(state[key].shape)


def inspect_layout(state: dict[str, torch.Tensor], path: Any = "the state dict") -> ClipCapLayout:
    """Mapper kind and sizes, read from the tensor shapes."""
    hidden = _shape(state, "gpt.transformer.wte.weight", path)[1]
    if "clip_project.linear.weight" in state:
        out, d = _shape(state, "clip_project.linear.weight", path)
        L = _shape(state, "clip_project.prefix_const", path)[0]
        layers = {int(m.group(1)) for k in state if (m := _LAYER.match(k))}
        return ClipCapLayout("transformer", d, hidden, L, out // hidden, len(layers))
    if "clip_project.model.0.weight" in state:
        d = _shape(state, "clip_project.model.0.weight", path)[1]
        out = _shape(state, "clip_project.model.2.weight", path)[0]
        return ClipCapLayout("mlp", d, hidden, out // hidden, None, None)
    raise InputError(f"{path}: unknown mapper: neither 'clip_project.linear.weight' (transformer) nor "
                     f"'clip_project.model.0.weight' (MLP) is in the file")


def to_capdec_names(state: dict[str, torch.Tensor], mapper: str) -> dict[str, torch.Tensor]:
    """ClipCap names -> CapDecModel names (``gpt.`` -> ``lm.``, ``clip_project.`` -> ``mapper.``)."""
    out = {}
    for key, value in state.items():
        if key.startswith("gpt."):
            out["lm." + key[len("gpt."):]] = value
        elif key.startswith("clip_project."):
            rest = key[len("clip_project."):]
            if mapper == "mlp" and rest.startswith("model."):
                rest = "net." + rest[len("model."):]
            out["mapper." + rest] = value
        else:
            out[key] = value
    return out


def _file_key(name: str, mapper: str) -> str:
    """CapDecModel name -> the ClipCap name (for messages)."""
    if name.startswith("lm."):
        return "gpt." + name[3:]
    if name.startswith("mapper."):
        rest = name[len("mapper."):]
        if mapper == "mlp" and rest.startswith("net."):
            rest = "model." + rest[4:]
        return "clip_project." + rest
    return name


def _check_values(tensor: torch.Tensor, expected: torch.dtype, key: str, path: Any) -> None:
    """Refuse a tensor that cannot be the weight the model expects: another kind of number, or NaN / Inf.

    Any floating-point width is a weight (float16 / float64 files are cast to the model's dtype); an
    integer or boolean tensor in a weight's place would be cast silently into wrong numbers.
    """
    if tensor.is_floating_point() != expected.is_floating_point or tensor.is_complex():
        got, want = (str(t).removeprefix("torch.") for t in (tensor.dtype, expected))
        raise InputError(f"{path}: {key!r} holds {got} values where the model has {want} weights; the file is not "
                         "a ClipCap / CapDec state dict or was altered")
    if tensor.is_floating_point():
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise InputError(f"{path}: {key!r} has {bad} non-finite value(s) (NaN or Inf); the weights are damaged "
                             "(or come from a diverged run)")


def load_into(model: Any, state: dict[str, torch.Tensor], *, path: Any = "the state dict") -> None:
    """Copy a ClipCap state dict into ``model`` (a CapDecModel); refuse any missing, extra or misshapen key."""
    mapper = model.config.mapper
    renamed = to_capdec_names(state, mapper)
    expected = model.state_dict()
    for key in [k for k in renamed if k not in expected and _STALE_BUFFERS.search(k)]:
        del renamed[key]  # causal-mask buffers of older transformers versions, not weights
    tied = getattr(model.lm.config, "tie_word_embeddings", False)
    for key, tensor in expected.items():
        if key not in renamed:
            if tied and key.endswith("lm_head.weight"):
                continue  # tied to the token embeddings, which the file has
            raise InputError(f"{path}: the key {_file_key(key, mapper)!r} is missing (expected shape "
                             f"{tuple(tensor.shape)})")
        if tuple(renamed[key].shape) != tuple(tensor.shape):
            raise InputError(f"{path}: {_file_key(key, mapper)!r} has shape {tuple(renamed[key].shape)} in the "
                             f"file but the model built from the options expects {tuple(tensor.shape)}")
        _check_values(renamed[key], tensor.dtype, _file_key(key, mapper), path)
    extra = sorted(_file_key(k, mapper) for k in renamed if k not in expected)
    if extra:
        raise InputError(f"{path}: {len(extra)} key(s) the model has no place for, e.g. {extra[:3]}; the options "
                         "(mapper, depth, LM) do not describe this file")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in renamed.items()}, strict=False)


def input_normalization(mapper: str, source: str | None, normalize: bool | None = None) -> tuple[bool, str]:
    """Whether the mapper takes L2-normalised CLIP embeddings (else raw ones), and the reason (see the module doc)."""
    if source is not None and source not in SOURCES:
        raise InputError(f"--source must be one of {', '.join(SOURCES)}, got {source!r}")
    if normalize is not None:
        return normalize, f"given: {'--normalize' if normalize else '--no-normalize'}"
    if source == "capdec":
        return True, "CapDec's predictions_runner.py divides the CLIP image embedding by its L2 norm"
    if mapper == "transformer":
        return True, ("the transformer mapper takes L2-normalised CLIP embeddings (CapDec's predictions_runner.py, "
                      "ClipCap's transformer_inference.ipynb)")
    if source == "clipcap":
        return False, "ClipCap's predict.py feeds the raw CLIP image embedding to its MLP mapper"
    raise InputError("this file has an MLP mapper, whose input depends on the code that trained it, and both "
                     "references save the same keys: give --source clipcap (ClipCap's coco_weights.pt / "
                     "conceptual_weights.pt: raw CLIP embeddings) or --source capdec (L2-normalised), or state "
                     "the input with --normalize / --no-normalize")


def _lm_config(lm: str) -> dict[str, Any]:
    """The LM's transformers config (no weights are read: the file brings them)."""
    from transformers import AutoConfig

    local = os.path.isdir(lm)
    try:
        return AutoConfig.from_pretrained(lm, local_files_only=local).to_dict()
    except (OSError, ValueError) as e:
        raise InputError(f"could not read the language model config of {lm!r}: {e}. Give a local directory "
                         "with config.json and the tokenizer files (e.g. a saved 'gpt2'), or a hub id with "
                         "network access") from e


def import_clipcap(weights: str | os.PathLike, out: str | os.PathLike, *, lm: str, encoder: Any,
                   mapper: str | None = None, prefix_length: int | None = None, clip_length: int | None = None,
                   mapper_depth: int | None = None, max_length: int | None = None, stop_at_period: bool = True,
                   source: str | None = None, normalize: bool | None = None, overwrite: bool = False) -> Path:
    """Turn a ClipCap / CapDec ``.pt`` state dict into a capdec checkpoint directory at ``out``.

    ``lm``: the GPT-2 the weights were fine-tuned from (hub id or local directory: its config and
    tokenizer are used, its weights are not). ``encoder``: the CLIP the mapper was trained on (spec
    string or Encoder), recorded so captioning uses the same one. ``source``: the code that trained the
    file (``"clipcap"`` or ``"capdec"``), which decides whether captioning feeds the mapper raw or
    L2-normalised image embeddings (``normalize`` states it directly); required for an MLP mapper (see
    the module docstring). Options left None are read from the file's shapes; options given must agree
    with them. ``max_length`` defaults to the reference's 67 tokens (fewer if the LM's positions end
    sooner). Nothing is written if anything does not match.
    """
    from capdec.checkpoint import InferenceConfig, replaceable, save_checkpoint
    from capdec.encoders import Encoder, load_encoder
    from capdec.model import ModelConfig, build_model
    from capdec.model.lm import load_tokenizer
    from capdec.noise import NoiseConfig
    from capdec.output import check_replaceable

    out = Path(out)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InputError(f"{out} already exists; use --overwrite to replace it")
    check_replaceable(out, replaceable)  # --overwrite replaces a checkpoint capdec wrote, nothing else
    if mapper is not None and mapper not in ("mlp", "transformer"):
        raise InputError(f"mapper must be mlp or transformer, got {mapper!r}")
    state = read_state_dict(weights)
    layout = inspect_layout(state, weights)
    if mapper is not None and mapper != layout.mapper:
        key = "clip_project.linear.weight" if layout.mapper == "transformer" else "clip_project.model.0.weight"
        raise InputError(f"{weights}: --mapper {mapper} but the file holds a {layout.mapper} mapper ({key!r})")
    normalized, why = input_normalization(layout.mapper, source, normalize)

    enc = encoder if isinstance(encoder, Encoder) else load_encoder(encoder, device="cpu")
    if enc.dim != layout.embed_dim:
        raise InputError(f"{weights}: the mapper takes {layout.embed_dim}-d CLIP embeddings (640: RN50x4, 512: "
                         f"ViT-B/32) but the encoder {enc.spec} gives {enc.dim}-d ones; import with the CLIP the "
                         "weights were trained on")
    tokenizer = load_tokenizer(lm)
    lm_config = _lm_config(lm)
    L = prefix_length or layout.prefix_length
    positions = lm_config.get("n_positions") or lm_config.get("max_position_embeddings") or 1024
    config = ModelConfig(
        embed_dim=layout.embed_dim, mapper=layout.mapper, mapper_variant="clipcap", prefix_length=L,
        clip_length=(clip_length or layout.clip_length) if layout.mapper == "transformer" else None,
        mapper_depth=mapper_depth or layout.depth or 8, mapper_heads=8, lm=lm, freeze_lm=False,
        max_length=max_length or min(REFERENCE_MAX_LENGTH, positions - L), stop_at_period=stop_at_period, lm_config=lm_config)
    model = build_model(config, tokenizer=tokenizer, pretrained=False)
    load_into(model, state, path=weights)
    model.eval()
    digest = hashlib.sha256(Path(weights).read_bytes()).hexdigest()
    fed = f"{'L2-normalised' if normalized else 'raw'} CLIP embeddings ({why})"
    save_checkpoint(out, model, encoder_spec=enc.spec, encoder_identity=enc.identity,
                    noise=NoiseConfig(source="unknown: imported weights"),
                    inference=InferenceConfig(normalize=normalized),
                    extra={"imported": {"from": str(Path(weights).resolve()), "sha256": digest, "format": "clipcap",
                                        "keys": len(state), "source": source, "input": fed}})
    logger.info("imported %s (%s mapper, prefix %d, %d-d CLIP, %s embeddings) -> %s", weights, layout.mapper, L,
                layout.embed_dim, "normalised" if normalized else "raw", out)
    return out
