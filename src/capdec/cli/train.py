"""capdec train: embedding store(s) -> CapDec checkpoint."""

from __future__ import annotations

import argparse
import logging
from dataclasses import fields

HELP = "train a CapDec decoder on caption embeddings (text only, with noise)"
DESCRIPTION = """Train a CapDec decoder from one or more embedding stores made by 'capdec embed'.

Each training caption's embedding is normalised, perturbed with noise (--noise-variance, the
paper's 0.016 by default, or the ε of a 'capdec calibrate' noise.json) and renormalised; the decoder
learns to reproduce the caption. On an image-embedding store ('capdec embed --modality image') this is
ClipCap, the supervised baseline: noise is off unless --noise-variance is given; '--init-from' such a
checkpoint and train on a text store for the paper's pre-train-on-images, fine-tune-on-text recipe. The checkpoint directory (--out) holds config.json, weights, the
tokenizer and metrics.jsonl, and is replaced atomically at every save. --resume continues an
interrupted run with its recorded configuration (also with a different number of processes).

Several GPUs or nodes: start it with torchrun, e.g. 'torchrun --nproc_per_node 4 -m capdec train ...';
--batch-size stays the global batch and rank 0 writes the checkpoint (see the README, "Scaling up").

--recipe NAME applies the CapDec paper's reference settings (flags given on the command line win,
then --config values, then the recipe, then the defaults below); see docs/reproduce.md."""


def _recipes_help() -> str:
    from capdec.recipes import describe_recipes

    return "recipes:\n" + describe_recipes()

logger = logging.getLogger(__name__)

def add_arguments(p: argparse.ArgumentParser) -> None:
    # the option flags are generated from the config dataclasses (capdec.config): name, type, choices,
    # default and help live in one place, the field (capdec.configs: torch-free, so --help stays fast)
    from capdec.config import add_arguments as add_config_arguments
    from capdec.configs import InferenceConfig, ModelConfig, NoiseConfig, TrainConfig

    p.add_argument("stores", nargs="+", metavar="STORE", help="embedding store directories ('capdec embed')")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--config", help="JSON file of option defaults (keys as the flags, with underscores); "
                                    "flags given on the command line win")
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
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint in --out")

    g = p.add_argument_group("noise (training-time embedding perturbation)")
    # None = not given: a --noise-file's variance applies, else the NoiseConfig default (0 on image stores)
    add_config_arguments(g, NoiseConfig, ["variance"], overrides={"variance": {
        "default": None, "help": "per-coordinate noise variance ε² (default 0.016, the paper's, on text stores; 0 on "
                                 "image stores; 0 = no noise)"}})
    g.add_argument("--noise-file", help="noise.json from 'capdec calibrate': its variance (unless "
                                        "--noise-variance is given) and, with --use-offset, its modality offset")
    add_config_arguments(g, NoiseConfig, ["distribution"])
    g.add_argument("--use-offset", action="store_true",
                   help="add the noise file's modality offset (image mean − text mean) to text embeddings")
    add_config_arguments(g, NoiseConfig, ["center"])

    # None = not given: the ModelConfig default applies, or with --init-from the checkpoint's value
    retrieval = ["retrieval_k", "entity_slots", "entity_min_count"]
    add_config_arguments(p.add_argument_group("model"), ModelConfig,
                         [f for f in _field_names(ModelConfig) if f not in retrieval], unset_default=True)

    g = p.add_argument_group("closing the modality gap further (recorded; 'capdec caption' can override)")
    add_config_arguments(g, ModelConfig, retrieval, unset_default=True)
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


def explicit_options(args: argparse.Namespace) -> set[str]:
    """The dests of the options given on the command line (not defaults)."""
    argv = getattr(args, "_command_argv", None)
    if argv is None:
        return set()
    p = argparse.ArgumentParser(add_help=False)
    add_arguments(p)
    for action in p._actions:
        action.default = argparse.SUPPRESS
        action.required = False
        if not action.option_strings:
            action.nargs = "*"
    given, _ = p.parse_known_args(argv)
    return set(vars(given))


def _apply_recipe(args: argparse.Namespace, explicit: set[str], config_keys: set[str]) -> None:
    """The recipe's values for every option neither given on the command line nor in --config."""
    from capdec.configs import ModelConfig
    from capdec.errors import InputError
    from capdec.recipes import get_recipe

    model_fields = set(_field_names(ModelConfig))
    recipe = get_recipe(args.recipe)
    if recipe.needs_init_from and not (args.init_from or args.resume):
        raise InputError(f"recipe {recipe.name} fine-tunes a trained checkpoint: give --init-from CKPT")
    for name, value in recipe.values.items():
        if args.init_from and name in model_fields:
            continue  # fine-tuning keeps the checkpoint's architecture
        if name == "noise_variance" and args.noise_file:
            continue  # a calibrated noise file's variance wins over the recipe's
        if name not in explicit and name not in config_keys:
            setattr(args, name, value)
    logger.info("recipe %s: %s", recipe.name, ", ".join(
        f"{k}={getattr(args, k)}{'' if k not in explicit | config_keys else ' (given)'}" for k in recipe.values))


def _apply_config_file(args: argparse.Namespace, parser_defaults: dict, explicit: set[str] | None = None) -> set[str]:
    """Values from --config replace flags not given on the command line (or, without that knowledge,
    flags still at their defaults); returns the option names the file set."""
    from capdec.errors import InputError

    if not args.config:
        return set()
    from capdec.io.text import read_json

    try:
        values = read_json(args.config)
    except InputError as e:
        raise InputError(f"cannot read --config {args.config}: {e}") from e
    if not isinstance(values, dict):
        raise InputError(f"--config {args.config}: expected a JSON object of option names and values")
    keys: set[str] = set()
    for k, v in values.items():
        k = k.replace("-", "_")
        if not hasattr(args, k):
            raise InputError(f"--config {args.config}: unknown option {k!r}")
        if (k not in explicit) if explicit is not None else (getattr(args, k) == parser_defaults.get(k)):
            setattr(args, k, v)
            keys.add(k)
    return keys


def run(args: argparse.Namespace) -> int:
    from capdec import distributed
    from capdec.checkpoint import InferenceConfig
    from capdec.config import given as config_given
    from capdec.errors import InputError
    from capdec.model import ModelConfig
    from capdec.noise import PAPER_VARIANCE, NoiseConfig
    from capdec.train import TrainConfig, train
    from capdec.utils import set_threads_from_env

    set_threads_from_env()
    defaults = {a.dest: a.default for a in _parser_actions()}
    explicit = explicit_options(args) if hasattr(args, "_command_argv") else None
    config_keys = _apply_config_file(args, defaults, explicit)
    if args.recipe:
        _apply_recipe(args, explicit or set(), config_keys)
    _check_combinations(args)  # before reading any file: a refused combination costs nothing

    variance, offset, source = args.noise_variance, None, None
    if args.noise_file:
        from capdec.calibrate import read_noise_file
        from capdec.store import EmbeddingStore

        nf = read_noise_file(args.noise_file, encoder_identity=EmbeddingStore.open(args.stores[0]).encoder_identity)
        source = args.noise_file
        if variance is None:
            variance = float(nf["variance"])
        if args.use_offset:
            if nf.get("offset") is None:
                raise InputError(f"{args.noise_file} has no modality offset; calibrate with --images to compute one")
            offset = list(nf["offset"])
    elif args.use_offset:
        raise InputError("--use-offset needs --noise-file (a calibrate noise.json with an offset)")
    if variance is None and not args.resume and _all_image_stores(args.stores):
        variance = 0.0  # ClipCap: trained on the embeddings it will caption; train() logs it
    noise = NoiseConfig(variance=PAPER_VARIANCE if variance is None else variance,
                        distribution=args.noise_distribution, center=args.center, offset=offset, source=source)

    inference = InferenceConfig(project=args.project, tau=args.tau, project_k=args.project_k)
    if args.image_mean:
        from capdec.io.vectors import read_vector

        inference.image_mean = read_vector(args.image_mean, keys=("image_mean",))

    given = config_given(args, ModelConfig)
    if args.init_from and given:
        # flags not given take the checkpoint's values, so only the ones given can conflict with it
        from capdec.checkpoint import read_config

        model_config = ModelConfig.from_dict({**read_config(args.init_from)["model"], **given})
    else:
        model_config = ModelConfig(**given) if (given or not args.init_from) else None
    args.save_memory = args.save_memory or args.project
    train_config = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)
                                  if hasattr(args, f.name) and f.name != "val_max"})
    try:
        result = train(args.stores, args.out, model_config=model_config, noise=noise, config=train_config,
                       encoder=args.encoder, init_from=args.init_from, resume=args.resume,
                       mix_weights=args.mix_weights, inference=inference, overwrite=args.overwrite)
    finally:
        distributed.shutdown()
    if not distributed.info().is_main:
        return 0
    val = f", val loss {result.val_loss:.4f}" if result.val_loss is not None else ""
    print(f"trained {result.steps} steps in {result.seconds:.1f}s: train loss {result.train_loss:.4f}{val}; "
          f"checkpoint: {result.path}")
    return 0


def _all_image_stores(paths: list[str]) -> bool:
    """Whether every store holds image embeddings (then training is supervised and noise is off by default)."""
    from capdec.store import EmbeddingStore

    return all(EmbeddingStore.open(p).modality == "image" for p in paths)


def _check_combinations(args: argparse.Namespace) -> None:
    """Refuse option combinations that cannot work together, saying why."""
    from capdec.errors import InputError

    if args.entity_slots and not args.retrieval_k:
        raise InputError("--entity-slots needs --retrieval-k: entities are words of the retrieved captions")
    if args.center and args.use_offset:
        raise InputError("--center and --use-offset cannot be combined: centering removes the modality offset "
                         "that --use-offset would add back")
    if args.center and not args.image_mean:
        raise InputError("--center needs --image-mean FILE (the mean image embedding, e.g. from 'capdec calibrate "
                         "--images'): images must be centred at caption time as captions were in training")
    if args.image_mean and not args.center:
        raise InputError("--image-mean only makes sense with --center")
    if args.project and args.center:
        raise InputError("--project and --center cannot be combined: the memory holds uncentred text embeddings")
    if args.resume and args.init_from:
        raise InputError("--resume and --init-from cannot be combined: resume continues --out itself")
    for name in ("retrieval_k", "entity_slots", "project_k"):
        value = getattr(args, name)
        if value is not None and value < (0 if name != "project_k" else 1):
            raise InputError(f"--{name.replace('_', '-')} must be ≥ {0 if name != 'project_k' else 1}")
    if args.tau <= 0:
        raise InputError("--tau must be > 0")


def _parser_actions():
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p._actions
