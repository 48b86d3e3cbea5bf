"""The checkpoint directory: everything needed to caption with, or resume, a trained decoder.

Layout::

    CKPT/
      config.json          format, capdec version, model / encoder / noise / train / inference configs
      model.safetensors    mapper + LM weights (shared tensors handled by safetensors.torch.save_model)
      tokenizer/           the LM tokenizer (save_pretrained)
      README.md            the model card (capdec.model_card), model_card.json its recorded fields
      metrics.jsonl        the training log (one JSON row per logged step)
      memory/              optional: the training captions' embeddings (capdec.memory.TextMemory: meta.json
                           and the rows as an embedding store in memory/store/), needed by
                           retrieval-augmented models and used by --project
      training/            only while resumable: optimizer.pt (torch.save of tensors, loaded with
                           weights_only=True), state.json (step counters, RNG-free: see capdec.train)

A checkpoint is written into a temporary sibling directory and swapped in with renames, so a crash
never leaves a half-written checkpoint under the final name (``finish_swap`` finishes an interrupted swap).
No pickle anywhere.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from capdec import __version__
from capdec.artifacts import check_count, check_fields, load_tensors, own_dir, read_safetensors_header
from capdec.configs import InferenceConfig, TrainConfig
from capdec.encoders.base import check_identity, resolve_device
from capdec.errors import InputError
from capdec.hub import resolve_checkpoint
from capdec.model import CapDecModel, ModelConfig, model_from_config
from capdec.model_card import card_for_new_checkpoint
from capdec.noise import NoiseConfig
from capdec.output import atomic_dir, finish_swap
from capdec.utils import read_artifact_json, write_json

logger = logging.getLogger(__name__)

FORMAT = "capdec.checkpoint/1"
# what a checkpoint directory holds (the module docstring); a directory holding anything else is not replaced
CHECKPOINT_ENTRIES = frozenset({"config.json", "model.safetensors", "tokenizer", "README.md", "model_card.json",
                                "metrics.jsonl", "memory", "training"})


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model (eval mode) and its recorded configuration."""

    path: Path
    model: CapDecModel
    config: dict[str, Any]

    @property
    def model_config(self) -> ModelConfig:
        return self.model.config

    @property
    def encoder_spec(self) -> dict[str, Any]:
        return self.config["encoder"]

    @property
    def encoder_identity(self) -> dict[str, Any]:
        return self.config["encoder_identity"]

    @functools.cached_property
    def noise(self) -> NoiseConfig:
        return NoiseConfig.from_dict(self.config.get("noise"), where=str(self.path))

    @functools.cached_property
    def inference(self) -> InferenceConfig:
        return InferenceConfig.from_dict(self.config.get("inference"))

    def load_memory(self, path: str | os.PathLike | None = None):
        """The text memory saved in the checkpoint (or the store/memory directory ``path``), or None."""
        from capdec.memory import TextMemory

        where = Path(path) if path is not None else self.path / "memory"
        if path is None and not where.is_dir():
            return None
        memory = TextMemory.load(where)
        check_identity(self.encoder_identity, memory.encoder_identity or {}, what=f"memory {where}")
        return memory

    def check_encoder(self, identity: dict[str, Any]) -> None:
        check_identity(self.encoder_identity, identity, what=f"checkpoint {self.path}")

    def inference_config(self, **overrides: Any) -> InferenceConfig:
        """The recorded inference config with ``overrides`` (None values keep the recorded ones)."""
        cfg = self.inference
        for k in overrides:
            if not hasattr(cfg, k):
                raise InputError(f"unknown inference option {k!r}")
        return replace(cfg, **{k: val for k, val in overrides.items() if val is not None})  # checked again

    @functools.cached_property
    def memory(self):
        """The checkpoint's saved text memory (loaded once), or None."""
        return self.load_memory()


def save_checkpoint(path: str | os.PathLike, model: CapDecModel, *, encoder_spec: dict[str, Any],
                    encoder_identity: dict[str, Any], noise: NoiseConfig, train: dict[str, Any] | None = None,
                    inference: InferenceConfig | None = None, extra: dict[str, Any] | None = None,
                    training_state: dict[str, Any] | None = None,
                    optimizer_state: dict[str, Any] | None = None,
                    files: dict[str, str] | None = None, memory: Any = None) -> Path:
    """Write a checkpoint directory atomically (replacing an older one at ``path``)."""
    from safetensors.torch import save_model

    config = {
        "format": FORMAT,
        "capdec_version": __version__,
        "model": model.config.to_dict(),
        "encoder": encoder_spec,
        "encoder_identity": encoder_identity,
        "noise": noise.to_dict(),
        "train": train or {},
        "inference": (inference or InferenceConfig()).to_dict(),
        **(extra or {}),
    }
    path = Path(path)
    allowed = CHECKPOINT_ENTRIES | set(files or {})
    with atomic_dir(path, overwrite=True, replaceable=lambda p: replaceable(p, allowed)) as tmp:
        write_json(tmp / "config.json", config)
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        model.tokenizer.save_pretrained(tmp / "tokenizer")
        for name, text in (files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        if memory is not None:
            memory.save(tmp / "memory", reference=False)  # self-contained: its own store inside
        card_for_new_checkpoint(tmp, path, config)  # README.md: the model card the Hub shows
        if training_state is not None:
            (tmp / "training").mkdir()
            write_json(tmp / "training" / "state.json", training_state)
            if optimizer_state is not None:
                torch.save(optimizer_state, tmp / "training" / "optimizer.pt")
    return path


def replaceable(path: str | os.PathLike, allowed: set[str] | frozenset[str] = CHECKPOINT_ENTRIES) -> str | None:
    """None when the directory ``path`` is a checkpoint capdec wrote (its ``config.json`` says so) holding only
    what capdec writes in one (``allowed``), else why it is not: ``--overwrite`` and every save replace only
    such a directory (or an empty one)."""
    return own_dir(path, marker="config.json", recognised=lambda c: isinstance(c, dict) and c.get("format") == FORMAT,
                   entries=allowed, kind="a capdec checkpoint", marked=f"format {FORMAT}")


_REDO = "the checkpoint is damaged or was altered (re-train or re-download it)"
# config.json's sections and the types they must have; the configs in them are checked whole (their types
# and bounds: capdec.config_base) before any model is built from them
_SECTIONS = {"model": dict, "encoder": dict, "encoder_identity": dict, "noise": dict | None, "train": dict | None,
             "inference": dict | None, "data": dict | None}
_STATE = {"step": int, "total_steps": int, "peak_lr": float, "warmup_steps": int, "world_size": int | None,
          "seconds": float | None, "train_loss": float | None, "val_loss": float | None,
          "best_val_loss": float | None, "best_step": int | None}


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's config.json, validated (no weights loaded). ``path``: a directory or a Hub repo id.

    A checkpoint may come from anyone (the Hub), so each recorded config is checked as the configs check
    flags (types, bounds: a ``prefix_length`` of a million is refused here, before a mapper is allocated).
    """
    path = resolve_checkpoint(path)
    finish_swap(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise InputError(f"{path} is not a capdec checkpoint (no config.json)")
    try:
        config = read_artifact_json(cfg_file)
    except (ValueError, OSError) as e:
        raise InputError(f"{cfg_file} is not valid JSON: {e}") from e
    fmt = config.get("format") if isinstance(config, dict) else None
    if fmt != FORMAT:
        raise InputError(f"{path}: unknown checkpoint format {fmt!r} (this capdec reads {FORMAT})")
    for key in ("model", "encoder", "encoder_identity"):
        if key not in config:
            raise InputError(f"{cfg_file} has no {key!r} entry; the checkpoint is incomplete")
    check_fields(config, cfg_file, _SECTIONS, redo=_REDO)
    for section, cls in (("model", ModelConfig), ("noise", NoiseConfig), ("inference", InferenceConfig),
                         ("train", TrainConfig)):
        try:
            cls.from_dict(config.get(section), where=f"{cfg_file}: {section}")
        except InputError as e:
            raise InputError(f"{e}; {_REDO}") from e
    return config


def load_checkpoint(path: str | os.PathLike, *, device: str | torch.device | None = "auto",
                    dtype: torch.dtype | None = None) -> Checkpoint:
    """Load a checkpoint for inference (eval mode) on ``device`` (``auto``: cuda if present).

    ``path``: a checkpoint directory, or a Hugging Face Hub repo id ``org/name[@revision]``
    (see :func:`capdec.hub.resolve_checkpoint`).
    """
    from safetensors.torch import load_model

    from capdec.model.lm import load_tokenizer

    path = resolve_checkpoint(path)
    config = read_config(path)
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise InputError(f"{path} has no model.safetensors; the checkpoint is incomplete")
    header = read_safetensors_header(weights, redo=_REDO)
    tokenizer = load_tokenizer(str(path / "tokenizer"), local_only=True)
    model_config = ModelConfig.from_dict(config["model"])
    with torch.device("meta"):  # shapes only: the file must hold every tensor the config asks for, before any is made
        _check_weights(model_from_config(model_config, tokenizer), header, weights)
    model = model_from_config(model_config, tokenizer)
    missing, unexpected = load_model(model, str(weights), strict=False)
    if missing or unexpected:
        raise InputError(f"{path}/model.safetensors does not match its config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    bad = next((name for name, p in model.named_parameters() if not torch.isfinite(p).all()), None)
    if bad is not None:
        raise InputError(f"{weights}: {bad!r} holds NaN or infinite values; {_REDO}")
    model.to(resolve_device(device))
    if dtype is not None:
        model.to(dtype)
    model.eval()
    return Checkpoint(path=path, model=model, config=config)


def _check_weights(model: torch.nn.Module, header: dict[str, tuple[str, tuple[int, ...]]], weights: Path) -> None:
    """Every tensor of ``model`` (built on the meta device) is in the file's ``header`` with its shape and a
    floating-point dtype, and the file holds nothing else. Tied weights are saved under one of their names."""
    names: dict[int, list[str]] = {}
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        names.setdefault(id(tensor), []).append(name)
    shapes = dict(model.state_dict(keep_vars=True).items())
    expected = {n for group in names.values() for n in group if n in shapes}
    unexpected = sorted(set(header) - expected)
    if unexpected:
        raise InputError(f"{weights}: {len(unexpected)} tensor(s) its config has no place for, e.g. {unexpected[:3]}; "
                         f"{_REDO}")
    for group in names.values():
        group = [n for n in group if n in shapes]
        saved = [n for n in group if n in header]
        if group and not saved:
            raise InputError(f"{weights}: no tensor {group[0]!r}, which its config needs; {_REDO}")
        for name in saved:
            dtype, shape = header[name]
            if shape != tuple(shapes[name].shape):
                raise InputError(f"{weights}: {name!r} has shape {shape} but its config makes "
                                 f"{tuple(shapes[name].shape)}; {_REDO}")
            if shapes[name].is_floating_point() and not dtype.startswith(("F", "BF")):
                raise InputError(f"{weights}: {name!r} holds {dtype} values where the model has floating-point "
                                 f"weights; {_REDO}")


def load_training_state(path: str | os.PathLike, *,
                        optimizer: bool = True) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(state.json, optimizer state) of a resumable checkpoint (``optimizer=False``: the state only, None)."""
    path = Path(path)
    state_file = path / "training" / "state.json"
    if not state_file.is_file():
        raise InputError(f"{path} holds no training state to resume from (it was saved without it, or is a "
                         "final-only checkpoint)")
    try:
        state = read_artifact_json(state_file)
    except (ValueError, OSError) as e:
        raise InputError(f"{state_file}: not valid JSON ({e}); {_REDO}") from e
    check_fields(state, state_file, _STATE, redo=_REDO)
    for key in ("step", "total_steps", "warmup_steps"):
        check_count(state[key], key, state_file, redo=_REDO)
    opt_file = path / "training" / "optimizer.pt"
    opt = None
    if optimizer and opt_file.is_file():
        opt = load_tensors(opt_file, what="a checkpoint's optimizer state")
        if not isinstance(opt, dict) or not isinstance(opt.get("optimizer"), dict):
            raise InputError(f"{opt_file}: not an optimizer state (expected a dict with 'optimizer'); {_REDO}")
    return state, opt
