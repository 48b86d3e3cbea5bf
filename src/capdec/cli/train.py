"""capdec train: embedding store(s) -> CapDec checkpoint."""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

HELP = "train a CapDec decoder on caption embeddings (text only, with noise)"
DESCRIPTION = """Train a CapDec decoder from one or more embedding stores made by 'capdec embed'.

Each training caption's embedding is normalised, perturbed with noise (--noise-variance, the
paper's 0.016 by default, or the ε of a 'capdec calibrate' noise.json) and renormalised; the decoder
learns to reproduce the caption. On an image-embedding store ('capdec embed --modality image') this is
ClipCap, the supervised baseline: noise is off unless --noise-variance is given; '--init-from' such a
checkpoint and train on a text store for the paper's pre-train-on-images, fine-tune-on-text recipe. The checkpoint directory (--out) holds config.json, weights, the
tokenizer and metrics.jsonl, and is replaced atomically at every save. --resume continues an
interrupted run (also with a different number of processes).

Several GPUs or nodes: start it with torchrun, e.g. 'torchrun --nproc_per_node 4 -m capdec train ...';
--batch-size stays the global batch and rank 0 writes the checkpoint (see the README, "Scaling up").

Where each option comes from, first that has it: a flag on the command line, the --config file, a
--noise-file's variance, the --recipe (the CapDec paper's reference settings, see docs/reproduce.md), the
checkpoint (--resume: the run's; --init-from: its architecture), the store (noise 0 on an image store),
the defaults below. --dry-run prints the resulting plan, each value with its source, and writes nothing.

--resume continues the run in --out from its last save, with its architecture, tokenizer, noise and data
(stores, mixing weights, batch size, seed, validation split): a flag that would change one of these is
refused. Other options given apply from the resume point on: --max-steps / --epochs extend the run,
--lr, --save-every, --eval-every... change; the log lists what changed. An unchanged peak learning rate
and warm-up stay as the run had them."""


def _recipes_help() -> str:
    from capdec.recipes import describe_recipes

    return "recipes:\n" + describe_recipes()

logger = logging.getLogger(__name__)

def add_arguments(p: argparse.ArgumentParser) -> None:
    # the option flags are generated from the config dataclasses (capdec.config_base): name, type, choices,
    # default and help live in one place, the field (capdec.configs: torch-free, so --help stays fast)
    from capdec.config_base import add_arguments as add_config_arguments
    from capdec.configs import InferenceConfig, ModelConfig, NoiseConfig, TrainConfig

    p.add_argument("stores", nargs="+", metavar="STORE",
                   help="embedding store directories ('capdec embed'; image stores, e.g. 'capdec calibrate "
                        "--pseudo-pairs', may be mixed with text stores: their rows get no noise)")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--config", help="JSON file of option defaults (keys as the flags, with underscores; "
                                    "read before the other flags, which win)")
    p.add_argument("--mix-weights", type=float, nargs="+", metavar="W",
                   help="sampling weight of each store (default: every caption equally likely)")
    p.add_argument("--encoder", help="encoder spec the stores must have been made with (checked)")
    p.add_argument("--init-from", metavar="CKPT", help="start from a trained checkpoint (fine-tuning, e.g. on a "
                                                        "styled corpus); its architecture and tokenizer are kept. "
                                                        "A directory or a Hub repo id org/name[@revision]")
    from capdec.recipes import RECIPES

    p.add_argument("--recipe", choices=list(RECIPES), metavar="NAME",
                   help=f"reference settings to start from ({', '.join(RECIPES)}); options given explicitly "
                        "override them")
    p.epilog = _recipes_help()
    p.formatter_class = _formatter_with_epilog(p.formatter_class)
    p.add_argument("--resume", action="store_true", help="continue the run in --out (options given change it from "
                                                          "the resume point on; see above)")
    p.add_argument("--overwrite", action="store_true", help="replace the checkpoint in --out (only a checkpoint capdec "
                                                             "wrote, holding nothing else: any other directory is refused)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (JSON: every value with its source) and "
                                                          "exit without writing anything")

    g = p.add_argument_group("noise (training-time embedding perturbation)")
    # None = not given: a --noise-file's variance applies, else the NoiseConfig default (0 on image stores)
    add_config_arguments(g, NoiseConfig, ["variance"], overrides={"variance": {
        "default": None, "help": "per-coordinate noise variance ε² (default 0.016, the paper's, on text stores; 0 on "
                                 "image stores; 0 = no noise)"}})
    g.add_argument("--noise-file", help="noise.json from 'capdec calibrate': its variance (unless "
                                        "--noise-variance is given) and, with --use-offset, its modality offset")
    add_config_arguments(g, NoiseConfig, ["distribution", "shape", "gap_scale", "scale_spread"])
    g.add_argument("--use-offset", action="store_true",
                   help="add the noise file's modality offset (image mean − text mean) to text embeddings")
    add_config_arguments(g, NoiseConfig, ["center"])

    # None = not given: the ModelConfig default applies, or with --init-from the checkpoint's value
    retrieval = ["retrieval_k", "retrieval_fusion", "retrieval_variance", "entity_prompt", "entity_mask",
                 "entity_retrieve", "entity_threshold", "entity_max", "entity_slots", "entity_min_count"]
    add_config_arguments(p.add_argument_group("model"), ModelConfig,
                         [f for f in _field_names(ModelConfig) if f not in retrieval], unset_default=True)

    g = p.add_argument_group("closing the modality gap further (recorded; 'capdec caption' can override)")
    add_config_arguments(g, ModelConfig, retrieval, unset_default=True)
    g.add_argument("--entity-vocab", metavar="FILE",
                   help="entity words for --entity-prompt, one per line (e.g. COCO's object categories or Visual "
                        "Genome's objects); kept in the checkpoint")
    add_config_arguments(g, TrainConfig, ["save_memory"])
    add_config_arguments(g, InferenceConfig, ["project", "tau", "project_k"])
    g.add_argument("--image-mean", metavar="FILE",
                   help="C3: mean image embedding subtracted at caption time (.npy, JSON list, or a calibrate "
                        "noise.json's image_mean); use with --center")

    # BooleanOptionalAction: a recipe may turn these on, and --no-keep-epochs must be able to turn them off
    add_config_arguments(p.add_argument_group("optimisation"), TrainConfig,
                         [f for f in _field_names(TrainConfig) if f != "save_memory"],
                         overrides={"keep_epochs": {"action": argparse.BooleanOptionalAction},
                                    "keep_best": {"action": argparse.BooleanOptionalAction}})


def _field_names(cls) -> list[str]:
    from dataclasses import fields

    return [f.name for f in fields(cls)]


def _formatter_with_epilog(base):
    class Formatter(base):  # keep the recipe list's line breaks
        def _fill_text(self, text, width, indent):
            return "".join(indent + line + "\n" for line in text.splitlines())
    return Formatter


# -- options in layers (timm's train.py): --config is read first and becomes the parser's defaults --------
def prepare(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """Read --config before the full parse and make its values the parser's defaults, so flags given on the
    command line win because argparse says so. Every default is marked with its source (``Sourced``: "config
    file" or "default"), so the planner can tell a flag from a default without looking at argv."""
    from capdec.config_base import Sourced

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    values = _read_config_file(known.config, parser) if known.config else {}
    parser.set_defaults(**{a.dest: Sourced(values[a.dest], "config file") if a.dest in values else
                           Sourced(a.default, "default") for a in _options(parser)})


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The options a config file may set (not --help, --config, the stores or --out)."""
    return [a for a in parser._actions if a.option_strings and a.dest not in ("help", "config", "out")]


def _read_config_file(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The --config file's options by dest, each converted as its flag's value would be."""
    from capdec.config_base import short_repr, type_error
    from capdec.errors import InputError
    from capdec.io.text import read_json

    try:
        values = read_json(path)
    except InputError as e:
        raise InputError(f"cannot read --config {path}: {e}") from e
    if not isinstance(values, dict):
        raise InputError(f"--config {path}: expected a JSON object of option names and values")
    actions = {a.dest: a for a in _options(parser)}
    out = {}
    for key, value in values.items():
        dest = key.replace("-", "_")
        if dest not in actions:
            raise InputError(f"--config {path}: unknown option {key!r}")
        action = actions[dest]
        wrong = type_error(value, _json_type(action))
        if wrong:  # JSON's own types, as the flag's: "2" is no integer, 2.5 no integer either
            raise InputError(f"--config {path}: {key} must be {wrong}, got {short_repr(value)}")
        if action.choices is not None and value not in action.choices:
            raise InputError(f"--config {path}: {key} must be one of {', '.join(map(str, action.choices))}, "
                             f"got {short_repr(value)}")
        out[dest] = value
    return out


def _json_type(action: argparse.Action) -> Any:
    """The JSON value a config file gives for a flag: what its command-line value would parse to."""
    if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):
        return bool
    kind = action.type if action.type in (int, float) else str
    many = action.nargs in ("+", "*") or isinstance(action.nargs, int)
    return list[kind] if many else kind


def options_given(args: argparse.Namespace, names: set[str]) -> dict[str, Any]:
    """The options among ``names`` given for this run (a flag, or the config file), each ``Sourced``."""
    from capdec.config_base import Sourced

    out = {}
    for name in names & set(vars(args)):
        value = getattr(args, name)
        value = value if isinstance(value, Sourced) else Sourced(value, "flag")  # argparse set it from argv
        if value.source != "default":
            out[name] = value
    return out


def plan_json(plan: dict[str, Any]) -> str:
    """The plan as indented JSON, each ``{"value": ..., "source": ...}`` on one line."""
    import re

    text = json.dumps(plan, indent=2)
    return re.sub(r'\{\n\s*("value": .*),\n\s*("source": .*)\n\s*\}', r"{\1, \2}", text)


def run(args: argparse.Namespace) -> int:
    from capdec import distributed
    from capdec.config_base import Sourced
    from capdec.errors import InputError
    from capdec.train import plan_training, run_training
    from capdec.train.plan import INPUTS, option_keys
    from capdec.utils import set_threads_from_env

    assert isinstance(args.dry_run, Sourced) or args.dry_run, "parse with capdec.cli.main (it marks the defaults)"
    set_threads_from_env()
    options = options_given(args, set(option_keys()) | set(INPUTS))
    try:
        plan = plan_training(args.stores, args.out, options=options)
    except InputError as e:  # a check refused a value the --config file gave: name the file
        fields = {option_keys()[k].split(".")[1] if k in option_keys() else k  # a config field, or an input
                  for k, v in options.items() if v.source == "config file"}
        if args.config and fields & set(e.options):
            raise InputError(f"--config {args.config}: {e}", options=e.options) from e
        raise
    if args.dry_run is True:  # a flag; not given it is Sourced(False, "default")
        print(plan_json(plan.describe()))
        return 0
    try:
        result = run_training(plan)
    finally:
        distributed.shutdown()
    if not distributed.info().is_main:
        return 0
    val = f", val loss {result.val_loss:.4f}" if result.val_loss is not None else ""
    loss = f"{result.train_loss:.4f}" if result.train_loss is not None else "n/a"
    print(f"trained {result.steps} steps in {result.seconds:.1f}s: train loss {loss}{val}; checkpoint: {result.path}")
    return 0
