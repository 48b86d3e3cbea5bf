"""capdec train: embedding store(s) -> CapDec checkpoint."""

from __future__ import annotations

import argparse
import logging
from dataclasses import fields

HELP = "train a CapDec decoder on caption embeddings (text only, with noise)"
DESCRIPTION = """Train a CapDec decoder from one or more embedding stores made by 'capdec embed'.

Each training caption's embedding is normalised, perturbed with noise (--noise-variance, the
paper's 0.016 by default, or the ε of a 'capdec calibrate' noise.json) and renormalised; the decoder
learns to reproduce the caption. The checkpoint directory (--out) holds config.json, weights, the
tokenizer and metrics.jsonl, and is replaced atomically at every save. --resume continues an
interrupted run with its recorded configuration."""

logger = logging.getLogger(__name__)

# flags whose value None means "not given": the dataclass default applies (or, with --init-from, the checkpoint's)
_MODEL_FLAGS = {
    "mapper": "mapper", "prefix_length": "prefix_length", "clip_length": "clip_length",
    "mapper_depth": "mapper_depth", "mapper_heads": "mapper_heads", "lm": "lm", "freeze_lm": "freeze_lm",
    "max_length": "max_length", "lm_dim": "lm_dim", "lm_depth": "lm_depth", "lm_heads": "lm_heads",
    "vocab_size": "vocab_size", "lowercase": "lowercase", "dropout": "dropout",
    "retrieval_k": "retrieval_k", "entity_slots": "entity_slots", "entity_min_count": "entity_min_count",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("stores", nargs="+", metavar="STORE", help="embedding store directories ('capdec embed')")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--config", help="JSON file of option defaults (keys as the flags, with underscores); "
                                    "flags given on the command line win")
    p.add_argument("--mix-weights", type=float, nargs="+", metavar="W",
                   help="sampling weight of each store (default: every caption equally likely)")
    p.add_argument("--encoder", help="encoder spec the stores must have been made with (checked)")
    p.add_argument("--init-from", metavar="CKPT", help="start from a trained checkpoint (fine-tuning, e.g. on a "
                                                        "styled corpus); its architecture and tokenizer are kept")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint in --out")

    g = p.add_argument_group("noise (training-time embedding perturbation)")
    g.add_argument("--noise-variance", type=float, default=None,
                   help="per-coordinate noise variance ε² (default 0.016, the paper's; 0 = no noise)")
    g.add_argument("--noise-file", help="noise.json from 'capdec calibrate': its variance (unless "
                                        "--noise-variance is given) and, with --use-offset, its modality offset")
    g.add_argument("--noise-distribution", choices=["gaussian", "uniform"], default="gaussian",
                   help="gaussian (CapDec) or uniform in a ball of radius ε")
    g.add_argument("--use-offset", action="store_true",
                   help="add the noise file's modality offset (image mean − text mean) to text embeddings")
    g.add_argument("--center", action="store_true",
                   help="subtract the corpus's text mean before normalising (C3-style); pair with an image "
                        "mean at caption time")

    g = p.add_argument_group("model")
    g.add_argument("--mapper", choices=["transformer", "mlp"], default=None, help="mapping network (default transformer)")
    g.add_argument("--prefix-length", type=int, default=None, help="prefix vectors (default 10)")
    g.add_argument("--clip-length", type=int, default=None, help="transformer mapper clip tokens (default: prefix length)")
    g.add_argument("--mapper-depth", type=int, default=None, help="transformer mapper layers (default 8)")
    g.add_argument("--mapper-heads", type=int, default=None, help="transformer mapper heads (default 8)")
    g.add_argument("--lm", default=None, help="'scratch' (default: a small LM trained from scratch with a corpus "
                                              "tokenizer) or a Hugging Face causal LM id/directory (e.g. gpt2)")
    g.add_argument("--freeze-lm", action=argparse.BooleanOptionalAction, default=None,
                   help="train the mapper only (default: fine-tune the LM too)")
    g.add_argument("--max-length", type=int, default=None, help="caption tokens incl. end-of-sequence (default 40)")
    g.add_argument("--lm-dim", type=int, default=None, help="scratch LM hidden size (default 256)")
    g.add_argument("--lm-depth", type=int, default=None, help="scratch LM layers (default 4)")
    g.add_argument("--lm-heads", type=int, default=None, help="scratch LM heads (default 4)")
    g.add_argument("--vocab-size", type=int, default=None, help="scratch tokenizer vocabulary (default 8000)")
    g.add_argument("--lowercase", action=argparse.BooleanOptionalAction, default=None,
                   help="lowercase text for the scratch tokenizer (default on)")
    g.add_argument("--dropout", type=float, default=None, help="scratch LM dropout (default 0.1)")

    g = p.add_argument_group("closing the modality gap further (recorded; 'capdec caption' can override)")
    g.add_argument("--retrieval-k", type=int, default=None,
                   help="IFCap: fuse the k nearest training captions (of the noised query) with the query through "
                        "cross-attention before the mapper (default 0 = off); the memory is kept in the checkpoint")
    g.add_argument("--entity-slots", type=int, default=None,
                   help="IFCap entity filtering: up to N words frequent among the retrieved captions become extra "
                        "prefix vectors the decoder can copy (needs --retrieval-k; default 0)")
    g.add_argument("--entity-min-count", type=int, default=None,
                   help="a word must occur in at least this many retrieved captions to be an entity (default 2)")
    g.add_argument("--save-memory", action="store_true",
                   help="keep the training captions' embeddings in the checkpoint (for --project)")
    g.add_argument("--project", action="store_true",
                   help="DeCap: at caption time, replace image embeddings by their softmax-weighted projection onto "
                        "the text memory (implies --save-memory)")
    g.add_argument("--tau", type=float, default=0.01, help="projection temperature")
    g.add_argument("--project-k", type=int, default=None, help="project over the top-k memory items only "
                                                               "(default: all, exact)")
    g.add_argument("--image-mean", metavar="FILE",
                   help="C3: mean image embedding subtracted at caption time (.npy, JSON list, or a calibrate "
                        "noise.json's image_mean); use with --center")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=10, help="passes over the training captions")
    g.add_argument("--max-steps", type=int, default=None, help="stop after N steps (a fixed budget)")
    g.add_argument("--batch-size", type=int, default=64, help="captions per step")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default 2e-5 pretrained LM, 5e-4 scratch)")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    g.add_argument("--warmup-steps", type=int, default=None, help="default: 5%% of the steps, at most 5000")
    g.add_argument("--schedule", choices=["linear", "cosine", "constant"], default="linear", help="decay after warm-up")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0 = off)")
    g.add_argument("--amp", choices=["auto", "off", "fp16", "bf16"], default="auto",
                   help="mixed precision (auto: bf16/fp16 on GPU, off on CPU)")
    g.add_argument("--val-fraction", type=float, default=0.02, help="captions held out for validation")
    g.add_argument("--eval-every", type=int, default=None, help="validate every N steps (default: each epoch)")
    g.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps (default: each epoch)")
    g.add_argument("--log-every", type=int, default=20, help="metrics.jsonl row every N steps")
    g.add_argument("--seed", type=int, default=0, help="seeds data order, noise, dropout and initialisation")
    g.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda:N")


def _apply_config_file(args: argparse.Namespace, parser_defaults: dict) -> None:
    """Values from --config replace flags still at their defaults."""
    from capdec.errors import InputError

    if not args.config:
        return
    from capdec.formats import read_json

    try:
        values = read_json(args.config)
    except InputError as e:
        raise InputError(f"cannot read --config {args.config}: {e}") from e
    if not isinstance(values, dict):
        raise InputError(f"--config {args.config}: expected a JSON object of option names and values")
    for k, v in values.items():
        k = k.replace("-", "_")
        if not hasattr(args, k):
            raise InputError(f"--config {args.config}: unknown option {k!r}")
        if getattr(args, k) == parser_defaults.get(k):
            setattr(args, k, v)


def run(args: argparse.Namespace) -> int:
    from capdec.checkpoint import InferenceConfig
    from capdec.errors import InputError
    from capdec.model import ModelConfig
    from capdec.noise import PAPER_VARIANCE, NoiseConfig
    from capdec.train import TrainConfig, train
    from capdec.utils import set_threads_from_env

    set_threads_from_env()
    defaults = {a.dest: a.default for a in _parser_actions()}
    _apply_config_file(args, defaults)
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
    noise = NoiseConfig(variance=PAPER_VARIANCE if variance is None else variance,
                        distribution=args.noise_distribution, center=args.center, offset=offset, source=source)

    inference = InferenceConfig(project=args.project, tau=args.tau, project_k=args.project_k)
    if args.image_mean:
        from capdec.caption import read_vector

        inference.image_mean = read_vector(args.image_mean, keys=("image_mean",))

    given = {f: getattr(args, a) for a, f in _MODEL_FLAGS.items() if getattr(args, a) is not None}
    if args.init_from and given:
        # flags not given take the checkpoint's values, so only the ones given can conflict with it
        from capdec.checkpoint import read_config

        model_config = ModelConfig.from_dict({**read_config(args.init_from)["model"], **given})
    else:
        model_config = ModelConfig(**given) if (given or not args.init_from) else None
    args.save_memory = args.save_memory or args.project
    train_config = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)
                                  if hasattr(args, f.name) and f.name != "val_max"})
    result = train(args.stores, args.out, model_config=model_config, noise=noise, config=train_config,
                   encoder=args.encoder, init_from=args.init_from, resume=args.resume,
                   mix_weights=args.mix_weights, inference=inference, overwrite=args.overwrite)
    val = f", val loss {result.val_loss:.4f}" if result.val_loss is not None else ""
    print(f"trained {result.steps} steps in {result.seconds:.1f}s: train loss {result.train_loss:.4f}{val}; "
          f"checkpoint: {result.path}")
    return 0


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
