"""The training planner: every decision about a run, made in one place before anything runs.

:func:`plan_training` turns what was given into a :class:`TrainPlan`: complete, validated, every default
resolved and every derived value computed. :func:`capdec.train.run_training` only carries it out, and
``capdec train --dry-run`` prints it (:meth:`TrainPlan.describe`). Each option takes its value from the
first of these sources that has one:

=============  ==========================================================================================
source         what it gives
=============  ==========================================================================================
flag           ``capdec train``'s flags; from Python, ``argument`` (a config object counts whole)
config file    ``capdec train --config FILE`` (the CLI makes them its parser's defaults, so flags win)
noise file     a calibrated ``noise.json`` (``--noise-file``): ε² (with ``--noise-shape gap``: its gap
               covariance instead), and with ``--use-offset`` its offset
recipe         ``--recipe NAME`` (:mod:`capdec.recipes`): never what a checkpoint fixes, never noise on an
               image store
checkpoint     ``--resume``: everything the run recorded; ``--init-from``: the architecture
store          the embedding size; noise 0 on an image store (ClipCap trains on what it will caption)
default        the config dataclasses' defaults (:mod:`capdec.configs`)
=============  ==========================================================================================

Derived values come after: ``--project`` keeps a memory, the validation split, the centering mean, and
the schedule (:func:`capdec.train.schedule.derive_schedule`: steps, peak lr, warm-up, eval/save cadence).

Resuming works like nanoGPT's: the architecture and tokenizer, the noise and the data stream (stores,
mixing weights, batch size, seed, validation split) are the checkpoint's, and a flag that would change
one of them is refused, naming it. Every other option given applies from the resume point on
(``--max-steps`` / ``--epochs`` extend the run, ``--lr``, ``--save-every``... change), and the log lists
what changed.
"""

from __future__ import annotations

import functools
import glob
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from capdec import distributed
from capdec.checkpoint import load_training_state, read_config, replaceable
from capdec.config_base import Config, Sourced, option_name
from capdec.configs import InferenceConfig, ModelConfig, NoiseConfig, TrainConfig
from capdec.encoders.base import check_identity
from capdec.errors import InputError
from capdec.output import check_replaceable
from capdec.recipes import get_recipe
from capdec.textdata import TextData, load_text_data
from capdec.train.schedule import Schedule, derive_schedule, split_indices, val_sample

logger = logging.getLogger(__name__)

SECTIONS: dict[str, type[Config]] = {"model": ModelConfig, "noise": NoiseConfig, "train": TrainConfig,
                                     "inference": InferenceConfig}
# a run's inputs besides config values (capdec train's other flags), by option name
INPUTS = ("recipe", "noise_file", "use_offset", "image_mean", "entity_vocab", "init_from", "mix_weights", "encoder",
          "resume", "overwrite")
EXPLICIT = ("flag", "argument", "config file", "noise file")  # sources the user gave for this run
# what a checkpoint fixes when resuming: the model, its noise, and the data stream (which rows each step sees)
FIXED_ON_RESUME = ("model.", "noise.", "train.batch_size", "train.seed", "train.val_fraction", "train.val_max",
                   "train.val_store")
BUILT = ("model.embed_dim", "model.lm_config")  # from the stores / filled at build: never asked for


def option_keys() -> dict[str, str]:
    """Option name (``capdec train``'s flag dest) -> ``section.field``, for every config field with a flag."""
    return {option_name(f): f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in fields(cls)  # type: ignore[arg-type]
            if f.metadata.get("cli", True)}


@dataclass
class Split:
    """Which rows train and which validate."""

    train_idx: torch.Tensor  # rows of the training data
    val_idx: torch.Tensor  # rows of ``val_data``
    val_data: TextData  # the training data itself (a held-out share), or the --val-store's


@dataclass
class TrainPlan:
    """A run decided but not started: :func:`plan_training` makes it, :func:`capdec.train.run_training` runs it."""

    out_dir: Path
    data: TextData
    mode: str  # "new", "resume" (out_dir's checkpoint) or "init_from" (fine-tune a checkpoint)
    model_config: ModelConfig  # complete: the stores' embed_dim; resume / init_from: the checkpoint's
    noise: NoiseConfig  # complete (text_mean computed when centering)
    config: TrainConfig  # the training options as recorded (None: derived, see schedule)
    inference: InferenceConfig
    split: Split
    schedule: Schedule
    sources: dict[str, str]  # "section.field", "schedule.name" or an input's name -> where its value came from
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # resume: option -> (recorded, now)
    init_from: str | os.PathLike | None = None  # the checkpoint to fine-tune (as given)
    lineage: str | None = None  # the checkpoint the model was fine-tuned from (recorded; kept on resume)
    mix_weights: list[float] | None = None
    recipe: str | None = None
    state: dict[str, Any] = field(default_factory=lambda: {"step": 0})  # resume: the recorded training state
    started: float = field(default_factory=time.time)

    @functools.cached_property
    def opt_state(self) -> dict[str, Any] | None:
        """Resume: the recorded optimizer and scaler state (read when first needed: it can be large)."""
        return load_training_state(self.out_dir)[1] if self.mode == "resume" else None

    def describe(self) -> dict[str, Any]:
        """The plan as JSON-ready data: every value with its source (``capdec train --dry-run`` prints it)."""
        configs = {"model": self.model_config, "noise": self.noise, "training": self.config,
                   "inference": self.inference}
        source = self.sources.get
        start = {"mode": self.mode, "step": self.state["step"], "total_steps": self.schedule.total_steps}
        if self.mode != "new":
            start["from"] = str(self.out_dir if self.mode == "resume" else self.init_from)
        return {
            "out": str(self.out_dir),
            "start": start,
            "recipe": self.recipe,
            "data": {"stores": self.data.sources, "modality": self.data.modality, "captions": len(self.data),
                     "train": len(self.split.train_idx), "val": len(self.split.val_idx),
                     "mix_weights": {"value": self.mix_weights, "source": source("mix_weights", "default")}},
            **{name: {f.name: {"value": _short(getattr(cfg, f.name)),
                               "source": source(f"{_section(name)}.{f.name}", "default")}
                      for f in fields(cfg)}  # type: ignore[arg-type]
               for name, cfg in configs.items()},
            "schedule": {k: {"value": v, "source": source(f"schedule.{k}")} for k, v in self.schedule.to_dict().items()},
            "changes": {k: {"from": _short(a), "to": _short(b)} for k, (a, b) in self.changes.items()},
        }


def _section(name: str) -> str:
    return "train" if name == "training" else name


def _short(value: Any) -> Any:
    """Long vectors and built configs summarised for reading."""
    if isinstance(value, (list, tuple)) and len(value) > 8:
        return f"[{len(value)} values]"
    if isinstance(value, dict):
        return f"{{{len(value)} entries}}"
    return value


# -- the planner -----------------------------------------------------------------------------------
def plan_training(stores: list[Any] | Any, out_dir: str | os.PathLike, *, model_config: ModelConfig | None = None,
                  noise: NoiseConfig | None = None, config: TrainConfig | None = None,
                  inference: InferenceConfig | None = None, options: Mapping[str, Any] | None = None,
                  recipe: str | None = None, noise_file: str | os.PathLike | None = None, use_offset: bool = False,
                  image_mean: str | os.PathLike | list[float] | None = None,
                  entity_vocab: str | os.PathLike | list[str] | None = None, encoder: Any = None,
                  init_from: str | os.PathLike | None = None, resume: bool = False,
                  mix_weights: list[float] | None = None, overwrite: bool = False) -> TrainPlan:
    """Decide a training run (see the module docstring for where each value comes from).

    ``stores``: embedding store paths or objects. A config object (``model_config``, ``noise``, ``config``,
    ``inference``) is used whole, but for the fields it leaves None ("decide for me"). ``options`` gives
    single options by name (``capdec train``'s flags with underscores, ``{"max_steps": 4}``), each a value
    or a :class:`~capdec.config_base.Sourced`.
    ``recipe``: a named recipe under them. ``noise_file``: a calibrate noise.json (its ε², and its offset
    with ``use_offset``). ``image_mean``: C3's image mean (a vector file or the vector) for ``center``.
    ``entity_vocab``: the entity words of ``entity_prompt`` (a file, one word per line, or the words).
    ``encoder``: a spec or Encoder the stores must have been made with (checked). ``init_from``: fine-tune
    this checkpoint (its architecture and tokenizer). ``resume``: continue the run in ``out_dir``; pass only
    what changes (``options={"max_steps": 4}``). ``mix_weights``: one sampling weight per store.
    ``overwrite``: replace a checkpoint at ``out_dir`` (kept until the first save).
    """
    started = time.time()
    given = _given(options, {"model": model_config, "noise": noise, "train": config, "inference": inference},
                   dict(recipe=recipe, noise_file=noise_file, use_offset=use_offset, image_mean=image_mean,
                        entity_vocab=entity_vocab, encoder=encoder, init_from=init_from, resume=resume,
                        mix_weights=mix_weights, overwrite=overwrite))
    inputs = {k: given[k].value if k in given else None for k in INPUTS}
    out_dir = Path(out_dir)
    _check_start(out_dir, inputs)
    mode = "resume" if inputs["resume"] else "init_from" if inputs["init_from"] is not None else "new"
    recorded = read_config(out_dir if mode == "resume" else inputs["init_from"]) if mode != "new" else None
    where = str(out_dir if mode == "resume" else inputs["init_from"])
    data, mix = _open_data(stores, inputs, recorded, mode, where=where)
    layers = _Layers(given, recorded, mode, data)
    _check_across_configs(layers, inputs)
    layers.add_files(inputs, data)
    layers.check_fixed(where=where)
    values = {s: layers.build(s) for s in SECTIONS}
    state = load_training_state(out_dir, optimizer=False)[0] if mode == "resume" else {"step": 0}
    split, schedule = _derive(values, data, out_dir, state if mode == "resume" else None, layers.sources)
    plan = TrainPlan(out_dir=out_dir, data=data, mode=mode, model_config=values["model"], noise=values["noise"],
                     config=values["train"], inference=values["inference"], split=split, schedule=schedule,
                     sources=layers.sources, changes=layers.changes(values), init_from=inputs["init_from"],
                     mix_weights=mix, recipe=inputs["recipe"], state=state, started=started,
                     lineage=str(inputs["init_from"]) if mode == "init_from" else (recorded or {}).get("init_from"))
    _log_plan(plan, layers)
    return plan


def _given(options: Mapping[str, Any] | None, configs: dict[str, Config | None],
           inputs: dict[str, Any]) -> dict[str, Sourced]:
    """What the caller gave, by ``section.field`` (config values) or input name, each with its source."""
    keys = option_keys()
    given: dict[str, Sourced] = {}
    for name, value in (options or {}).items():
        if name not in keys and name not in INPUTS:
            raise InputError(f"unknown option {name!r}")
        given[keys.get(name, name)] = value if isinstance(value, Sourced) else Sourced(value, "argument")
    for section, cfg in configs.items():  # a field left None ("decide for me") is not asked for
        for f in fields(cfg) if cfg is not None else ():  # type: ignore[arg-type]
            if getattr(cfg, f.name) is not None:
                given.setdefault(f"{section}.{f.name}", Sourced(getattr(cfg, f.name), "argument"))
    for name, value in inputs.items():
        if value is not None and value is not False:
            given.setdefault(name, Sourced(value, "argument"))
    return given


def _check_start(out_dir: Path, inputs: dict[str, Any]) -> None:
    """Refuse what cannot start, before any file is read."""
    if inputs["resume"] and inputs["init_from"] is not None:
        raise InputError("--resume and --init-from cannot be combined: resume continues --out itself",
                         options=("resume", "init_from"))
    if inputs["use_offset"] and not inputs["noise_file"]:
        raise InputError("--use-offset needs --noise-file (a calibrate noise.json with an offset)",
                         options=("use_offset", "noise_file"))
    if inputs["recipe"] is not None:
        recipe = get_recipe(inputs["recipe"])
        if recipe.needs_init_from and not (inputs["init_from"] or inputs["resume"]):
            raise InputError(f"recipe {recipe.name} fine-tunes a trained checkpoint: give --init-from CKPT",
                             options=("recipe", "init_from"))
    if not inputs["resume"] and not inputs["overwrite"] and out_dir.exists() and any(out_dir.iterdir()):
        raise InputError(f"{out_dir} already exists; use --resume to continue its training or --overwrite to "
                         "replace it")
    if inputs["overwrite"] and not inputs["resume"]:
        check_replaceable(out_dir, replaceable)  # only a checkpoint capdec wrote: never a user's directory


def _open_data(stores: list[Any] | Any, inputs: dict[str, Any], recorded: dict[str, Any] | None, mode: str, *,
               where: str) -> tuple[TextData, list[float] | None]:
    """The training data (and its mixing weights), checked against the encoder and the checkpoint."""
    stores = list(stores) if isinstance(stores, (list, tuple)) else [stores]
    was = ((recorded or {}).get("data") or {}) if mode == "resume" else {}  # what the resumed run trained on
    mix = inputs["mix_weights"] if inputs["mix_weights"] is not None else was.get("mix_weights")
    data = load_text_data(stores, mix)
    if inputs["encoder"] is not None:
        _check_encoder_arg(inputs["encoder"], data)
    if recorded is not None:
        check_identity(recorded["encoder_identity"], data.encoder_identity,
                       what=f"--init-from checkpoint {where} (vs the embedding store)" if mode == "init_from"
                       else f"checkpoint {where}")
    if was and (not _same_stores(was, data) or mix != was.get("mix_weights")):
            raise InputError(f"--resume: the run trained on {was.get('stores')} ({was.get('count')} captions, mixing "
                             f"weights {was.get('mix_weights')}); stores and mix_weights cannot change when a run "
                             f"resumes (given: {data.sources}, {len(data)} captions, {mix})", options=("mix_weights",))
    return data, mix


def _same_stores(was: dict[str, Any], data: TextData) -> bool:
    """Whether ``data`` is what a run recorded training on: as many stores and captions, and each recorded
    path that exists from here the same directory (a path recorded relative to another directory may not)."""
    recorded, now = was.get("stores") or [], data.sources or []
    return len(recorded) == len(now) and was.get("count", len(data)) == len(data) and \
        all(not Path(a).exists() or Path(a).resolve() == Path(b).resolve() for a, b in zip(recorded, now))


def _check_encoder_arg(encoder: Any, data: TextData) -> None:
    from capdec.encoders import Encoder, load_encoder

    enc = encoder if isinstance(encoder, Encoder) else load_encoder(encoder, device="cpu")
    check_identity(data.encoder_identity, enc.identity, what="the embedding store")


class _Layers:
    """The sources of a run's config values, highest precedence first (see the module docstring)."""

    def __init__(self, given: dict[str, Sourced], recorded: dict[str, Any] | None, mode: str, data: TextData):
        self.mode, self.data = mode, data
        self.explicit = {k: v for k, v in given.items() if "." in k}
        self.checkpoint = _recorded_values(recorded, mode)
        self.recipe, self.skipped = self._recipe_values(given.get("recipe"))
        built = {k: self.checkpoint[k] for k in BUILT if k in self.checkpoint} if mode != "new" else \
            {"model.embed_dim": Sourced(data.dim, "store")}
        store = {"noise.variance": Sourced(0.0, "store")} if data.modality == "image" else {}
        self.noise_file: dict[str, Sourced] = {}  # read by add_files
        self.layers = [built, self.explicit, self.noise_file, self.recipe, self.checkpoint, store]
        self.sources: dict[str, str] = {k: v.source for k, v in given.items() if "." not in k}

    def _recipe_values(self, name: Sourced | None) -> tuple[dict[str, Sourced], dict[str, Any]]:
        """The recipe's values this run takes, and those it skips (fixed by a checkpoint, noise on images)."""
        if name is None:
            return {}, {}
        recipe = get_recipe(name.value)
        values = {f"{s}.{k}": v for s in ("model", "train", "noise") for k, v in recipe.section(s).items()}
        # ClipCap trains on the embeddings it will caption: a recipe's (text-only) noise is not for an image store
        skip = {k: v for k, v in values.items() if self.fixed(k) or (k.startswith("noise.") and
                                                                     self.data.modality == "image")}
        return {k: Sourced(v, "recipe") for k, v in values.items() if k not in skip}, skip

    def fixed(self, key: str) -> bool:
        """Whether the checkpoint fixes ``key`` (its value cannot be asked for differently)."""
        prefixes = FIXED_ON_RESUME if self.mode == "resume" else ("model.",) if self.mode == "init_from" else ()
        return key.startswith(prefixes) and key not in BUILT and key != "noise.source"  # a note, not a value

    def recorded(self, key: str) -> Any:
        """The checkpoint's value; an option added since it was written: the default the run had."""
        section, name = key.split(".")
        return self.checkpoint[key].value if key in self.checkpoint else SECTIONS[section].default(name)

    def get(self, key: str) -> Sourced:
        for layer in self.layers:
            if key in layer:
                return layer[key]
        section, name = key.split(".")
        return Sourced(SECTIONS[section].default(name), "default")

    def check_fixed(self, *, where: str) -> None:
        """Refuse an explicit value for what the checkpoint fixes, naming each."""
        asked = {k: v for k, v in {**self.noise_file, **self.explicit}.items()
                 if self.fixed(k) and v.value != self.recorded(k)}
        if not asked:
            return
        listed = ", ".join(f"{_name(k)}: {self.recorded(k)} vs {v.value}" for k, v in sorted(asked.items()))
        refused = tuple("noise_file" if v.source == "noise file" else k.split(".")[1]  # the options that asked
                        for k, v in sorted(asked.items()))
        if self.mode == "init_from":
            raise InputError(f"--init-from {where}: its decoder architecture differs from the one asked for ({listed}); "
                             "drop the conflicting model options to fine-tune it as it is", options=refused)
        raise InputError(f"--resume {where}: cannot change {listed} (recorded vs asked): the architecture, noise and "
                         "data stream of a run stay as they were when it resumes; drop these options, or start a "
                         f"new run from it with --init-from {where}", options=refused)

    def add_files(self, inputs: dict[str, Any], data: TextData) -> None:
        """The values read from files (noise file, image mean), once the combinations are known to be valid."""
        if inputs["noise_file"]:
            self.noise_file.update(_noise_file_values(inputs["noise_file"], inputs["use_offset"], data,
                                                      shape=self.get("noise.shape").value))
        if inputs["image_mean"] is not None:
            self.explicit["inference.image_mean"] = Sourced(_vector(inputs["image_mean"]), self.sources["image_mean"])
        if inputs["entity_vocab"] is not None:
            from capdec.retrieval import read_entity_vocab

            vocab = inputs["entity_vocab"]
            self.explicit["model.entity_vocab"] = Sourced(
                read_entity_vocab(vocab) if isinstance(vocab, (str, os.PathLike)) else sorted(set(vocab)),
                self.sources["entity_vocab"])

    def build(self, section: str) -> Config:
        """The section's config from the first source of each field (checked by the config itself)."""
        cls = SECTIONS[section]
        values = {f.name: self.get(f"{section}.{f.name}") for f in fields(cls)}  # type: ignore[arg-type]
        self.sources.update({f"{section}.{k}": v.source for k, v in values.items()})
        return cls(**{k: v.value for k, v in values.items()})

    def changes(self, values: dict[str, Config]) -> dict[str, tuple[Any, Any]]:
        """Resume: option -> (recorded, now) for each value that differs from the checkpoint's."""
        if self.mode != "resume":
            return {}
        keys = [f"{s}.{f.name}" for s, cfg in values.items() for f in fields(cfg)]  # type: ignore[arg-type]
        return {_name(k): (self.recorded(k), getattr(values[k.split(".")[0]], k.split(".")[1])) for k in keys
                if getattr(values[k.split(".")[0]], k.split(".")[1]) != self.recorded(k)}


def _name(key: str) -> str:
    """``section.field`` -> its option name (``noise.variance`` -> ``noise_variance``)."""
    return next((name for name, k in option_keys().items() if k == key), key.split(".")[1])


def _recorded_values(recorded: dict[str, Any] | None, mode: str) -> dict[str, Sourced]:
    """The checkpoint's values: all of a resumed run's, the architecture of one to fine-tune."""
    if recorded is None:
        return {}
    sections = {"model": ModelConfig.from_dict(recorded["model"])}
    if mode == "resume":
        sections.update(noise=NoiseConfig.from_dict(recorded.get("noise")),
                        train=TrainConfig.from_dict(recorded.get("train")),
                        inference=InferenceConfig.from_dict(recorded.get("inference")))
    present = {"model": recorded["model"], "noise": recorded.get("noise") or {}, "train": recorded.get("train") or {},
               "inference": recorded.get("inference") or {}}
    # only what the checkpoint recorded: an option added since takes its default, as the run had it
    return {f"{s}.{k}": Sourced(getattr(cfg, k), "checkpoint") for s, cfg in sections.items()
            for k in (f.name for f in fields(cfg)) if k in present[s] or s == "model"}  # type: ignore[arg-type]


def _check_across_configs(layers: _Layers, inputs: dict[str, Any]) -> None:
    """Refuse options that cannot work together (across configs; each config checks its own values)."""
    center = layers.get("noise.center").value
    image_mean = inputs["image_mean"] if inputs["image_mean"] is not None else layers.get("inference.image_mean").value
    if center and inputs["use_offset"]:
        raise InputError("--center and --use-offset cannot be combined: centering removes the modality offset "
                         "that --use-offset would add back", options=("center", "use_offset"))
    if center and image_mean is None:
        raise InputError("--center needs --image-mean FILE (the mean image embedding, e.g. from 'capdec calibrate "
                         "--images'): images must be centred at caption time as captions were in training",
                         options=("center", "image_mean"))
    if image_mean is not None and not center:
        raise InputError("--image-mean only makes sense with --center", options=("image_mean", "center"))
    if layers.data.modality == "mixed" and (layers.get("model.retrieval_k").value or
                                            layers.get("model.entity_prompt").value):
        raise InputError("retrieval and entity prompts (--retrieval-k, --entity-prompt) cannot be used with a mix of "
                         "text and image stores: they retrieve for each training caption from the text memory, "
                         "which an image store's rows are not in (train on the text stores alone)",
                         options=("retrieval_k", "entity_prompt"))
    if center and layers.data.modality == "mixed":
        raise InputError("--center cannot be used with a mix of text and image stores: only the text rows would be "
                         "centred on the text mean (train on the text stores alone, or without --center)",
                         options=("center",))
    if layers.get("inference.project").value and center:
        raise InputError("--project and --center cannot be combined: the memory holds uncentred text embeddings",
                         options=("project", "center"))
    if inputs["entity_vocab"] is not None and not layers.get("model.entity_prompt").value:
        raise InputError("--entity-vocab only makes sense with --entity-prompt",
                         options=("entity_vocab", "entity_prompt"))
    if (layers.get("noise.shape").value == "gap" and layers.get("noise.gap_diag").value is None
            and not inputs["noise_file"]):
        raise InputError("--noise-shape gap needs --noise-file (a 'capdec calibrate --gap-rank R' noise.json)",
                         options=("shape", "noise_file"))


def _noise_file_values(path: str | os.PathLike, use_offset: bool, data: TextData, *,
                       shape: str = "isotropic") -> dict[str, Sourced]:
    """A calibrated noise.json's ε² (and modality offset, with ``use_offset``). With ``shape`` "gap", its gap
    covariance instead of the ε² (isotropic noise then only from an explicit --noise-variance)."""
    from capdec.calibrate import read_noise_file

    nf = read_noise_file(path, encoder_identity=data.encoder_identity)
    values = {"noise.variance": float(nf["variance"]), "noise.source": str(path)}
    if shape == "gap":
        if nf.get("gap_diag") is None:
            raise InputError(f"{path} has no gap covariance; calibrate with --gap-rank R",
                             options=("shape", "noise_file"))
        values.update({"noise.variance": 0.0, "noise.gap_factor": nf["gap_factor"], "noise.gap_diag": nf["gap_diag"]})
    if use_offset:
        if nf.get("offset") is None:
            raise InputError(f"{path} has no modality offset; calibrate with --images to compute one",
                             options=("use_offset", "noise_file"))
        values["noise.offset"] = list(nf["offset"])
    return {k: Sourced(v, "noise file") for k, v in values.items()}


def _vector(value: str | os.PathLike | list[float]) -> list[float]:
    if isinstance(value, (str, os.PathLike)):
        from capdec.io.vectors import read_vector

        return read_vector(value, keys=("image_mean",))
    return [float(x) for x in value]


def _derive(values: dict[str, Any], data: TextData, out_dir: Path, recorded_state: dict[str, Any] | None,
            sources: dict[str, str]) -> tuple[Split, Schedule]:
    """What follows from the options: memory for --project, the split, the centering mean, the schedule."""
    config, noise = values["train"], values["noise"]
    if values["inference"].project and not config.save_memory:
        config.save_memory, sources["train.save_memory"] = True, "derived: --project needs the memory"
    split = _split(data, config)
    if len(split.train_idx) == 0:
        raise InputError("no training captions")
    if config.keep_best and len(split.val_idx) == 0:
        logger.warning("--keep-best: no validation captions (give --val-store, or more captions / a larger "
                       "--val-fraction), so no best checkpoint will be kept")
    if (config.keep_best or config.keep_epochs) and out_dir.name in ("", ".", ".."):
        raise InputError(f"--keep-best / --keep-epochs write siblings of --out; give --out a directory name, "
                         f"not {str(out_dir)!r}", options=("keep_best", "keep_epochs"))
    name = glob.escape(out_dir.name)
    kept = ([out_dir.with_name(f"{out_dir.name}-best")] if config.keep_best else []) + (
        sorted(out_dir.parent.glob(f"{name}-epoch[0-9][0-9][0-9]*")) if config.keep_epochs else [])
    for path in kept:  # replaced when kept: each must be absent, empty or a checkpoint (checked before training)
        check_replaceable(path, replaceable, flag="--keep-best / --keep-epochs")
    if noise.center and noise.text_mean is None:
        noise.text_mean = data.mean_normalized(split.train_idx).tolist()
        sources["noise.text_mean"] = "derived: mean of the training captions' embeddings"
    schedule, why = derive_schedule(config, n_train=len(split.train_idx), lm=values["model"].lm, recorded=recorded_state)
    for name in schedule.to_dict():
        sources[f"schedule.{name}"] = why.get(name) or sources[f"train.{'lr' if name == 'peak_lr' else name}"]
    if recorded_state is not None:
        _check_budget(config, schedule, sources)
    distributed.check_batch(config.batch_size, distributed.info().world_size)  # before any process waits on another
    return split, schedule


def _check_budget(config: TrainConfig, schedule: Schedule, sources: dict[str, str]) -> None:
    """Resume: a budget asked for (--max-steps, --epochs) must not be cut short by the other, recorded one."""
    steps, epochs = (sources["train.max_steps"] in EXPLICIT, sources["train.epochs"] in EXPLICIT)
    by_epochs = schedule.steps_per_epoch * config.epochs
    if steps and not epochs and config.max_steps is not None and by_epochs < config.max_steps:
        raise InputError(f"--max-steps {config.max_steps}: the run's epochs ({config.epochs}, recorded) end it at "
                         f"step {by_epochs}; give --epochs as well", options=("max_steps", "epochs"))
    if epochs and not steps and config.max_steps is not None and config.max_steps < by_epochs:
        raise InputError(f"--epochs {config.epochs}: the run's max_steps ({config.max_steps}, recorded) ends it at "
                         f"step {config.max_steps}; give --max-steps as well",
                         options=("epochs", "max_steps"))


def _split(data: TextData, config: TrainConfig) -> Split:
    """The training rows and validation rows (held out, or drawn from --val-store)."""
    if config.val_store is None:
        train_idx, val_idx = split_indices(len(data), config)
        return Split(train_idx, val_idx, data)
    val_data = load_text_data([config.val_store])
    check_identity(data.encoder_identity, val_data.encoder_identity, what=f"--val-store {config.val_store}")
    return Split(torch.arange(len(data)), val_sample(len(val_data), config), val_data)


def _log_plan(plan: TrainPlan, layers: _Layers) -> None:
    """What the user should know before the run starts: recipe, resume changes, image-store noise."""
    if plan.recipe is not None:
        taken = [_name(k) for k in layers.recipe if plan.sources.get(k) == "recipe"]
        over = [_name(k) for k in layers.recipe if plan.sources.get(k) != "recipe"]
        logger.info("recipe %s: %s%s%s", plan.recipe, ", ".join(taken) or "nothing taken",
                    f"; given instead: {', '.join(over)}" if over else "",
                    f"; not applied (fixed by the checkpoint, or noise on an image store): "
                    f"{', '.join(map(_name, layers.skipped))}" if layers.skipped else "")
    if plan.mode == "resume":
        changed = "; ".join(f"{k}: {a} -> {b}" for k, (a, b) in plan.changes.items())
        logger.info("resuming %s from step %d of %d%s", plan.out_dir, plan.state["step"], plan.schedule.total_steps,
                    f", with changes: {changed}" if changed else " with its recorded configuration")
        if plan.state["step"] >= plan.schedule.total_steps:
            logger.warning("%s is already at step %d of %d: nothing to train (give a larger --max-steps or --epochs "
                           "to extend it)", plan.out_dir, plan.state["step"], plan.schedule.total_steps)
    if plan.data.modality == "image":
        logger.info("training on image embeddings (supervised, ClipCap) with noise variance %g%s", plan.noise.variance,
                    "" if plan.noise.variance else " (no noise; pass a variance to add some)")
