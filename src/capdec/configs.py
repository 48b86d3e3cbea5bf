"""The pipeline's configs, one dataclass per stage, torch-free.

Every option of the pipeline is declared here once, with its default and its help text
(:func:`capdec.config_base.option`); the ``capdec train`` and ``capdec caption`` flags are generated from
these fields (:func:`capdec.config_base.add_arguments`), so building a command's parser imports no torch.
The stage modules re-export their config (``from capdec.train import TrainConfig`` keeps working).

==================  =======================================  ==========================================
config              what it decides                          used by
==================  =======================================  ==========================================
``NoiseConfig``     how text embeddings are perturbed        :mod:`capdec.noise`, recorded in checkpoints
``ModelConfig``     the decoder's architecture               :mod:`capdec.model`
``TrainConfig``     optimisation and bookkeeping             :mod:`capdec.train`
``InferenceConfig`` how image embeddings are prepared        :mod:`capdec.checkpoint`, :mod:`capdec.caption`
``DecodeConfig``    how tokens are chosen after the prefix   :mod:`capdec.decode`
``MemoryConfig``    how a text memory is searched            :mod:`capdec.memory`
==================  =======================================  ==========================================

The base class (dict round trips, the policy for unknown keys, flag generation) is :mod:`capdec.config_base`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar, TypeVar

from capdec.config_base import Config, option, short_repr, type_error
from capdec.errors import InputError
from capdec.recipes import get_recipe

PAPER_VARIANCE = 0.016  # CapDec's ε² for COCO (RN50x4, 640-d)
MAPPER_VARIANTS = ("clipcap", "legacy")  # transformer mapper layers: ClipCap's exact ones, or capdec's earlier GELU
STRATEGIES = ("beam", "greedy", "sample")
EARLY_STOPPING = ("exact", "heuristic")  # when a beam search may end (capdec.decode._beam)
NOISE_SHAPES = ("isotropic", "gap")
RETRIEVAL_FUSIONS = ("ifcap", "embedding")
DEFAULT_MAX_LENGTH = 40  # for a bare LM; a CapDecModel brings its own (ModelConfig.max_length)
MEMORY_BACKENDS = ("auto", "torch", "faiss")
MEMORY_INDEXES = ("flat", "ivf", "ivfpq")
# Bounds on sizes, checked when a config is built (from flags, a --config file or an artefact's JSON), so a
# crafted checkpoint cannot make capdec allocate without limit before its weights are even read.
MAX_DIM = 16384  # embedding and hidden sizes (CLIP: 512-1280; GPT-2 XL: 1600)
MAX_DEPTH = 256  # layers
MAX_HEADS = 256
MAX_TOKENS = 4096  # prefix vectors, clip tokens, caption tokens (GPT-2 has 1024 positions)
MAX_VOCAB = 1_000_000  # a trained tokenizer's vocabulary (real LMs: 50k-260k)
MAX_SEED = 2**63 - 1


R = TypeVar("R", bound="_FromRecipe")

# The size keys of a transformers LM config (GPT-2's names and the common ones), bounded like ModelConfig's
# own sizes: a checkpoint's recorded lm_config builds the LM before its weights are read.
_LM_SIZES = {"vocab_size": MAX_VOCAB, "n_positions": 1 << 20, "max_position_embeddings": 1 << 20, "n_ctx": 1 << 20,
             "n_embd": MAX_DIM, "hidden_size": MAX_DIM, "n_inner": 4 * MAX_DIM, "intermediate_size": 4 * MAX_DIM,
             "n_layer": MAX_DEPTH, "num_hidden_layers": MAX_DEPTH, "n_head": MAX_HEADS,
             "num_attention_heads": MAX_HEADS, "num_key_value_heads": MAX_HEADS}


def check_lm_config(config: dict[str, Any]) -> None:
    """A recorded transformers config: ``model_type`` a string, its sizes integers within bounds."""
    if not isinstance(config.get("model_type"), str):
        raise InputError(f"lm_config must name its model_type (a string), got {short_repr(config.get('model_type'))}")
    for key, high in _LM_SIZES.items():
        value = config.get(key)
        if value is None:
            continue
        if type_error(value, int) or not 1 <= value <= high:
            raise InputError(f"lm_config {key} must be an integer from 1 to {high}, got {short_repr(value)}")


class _FromRecipe:
    """A config that a named recipe (:mod:`capdec.recipes`) sets values of."""

    RECIPE_SECTION: ClassVar[str]

    @classmethod
    def from_recipe(cls: type[R], name: str, **changes: Any) -> R:
        """This config as recipe ``name`` sets it, with ``changes``; the fields neither sets keep their defaults."""
        return cls(**{**get_recipe(name).section(cls.RECIPE_SECTION), **changes})


@dataclass
class NoiseConfig(_FromRecipe, Config):
    """How text embeddings are perturbed during training (recorded in the checkpoint)."""

    RECIPE_SECTION: ClassVar[str] = "noise"

    variance: float = option(PAPER_VARIANCE, "per-coordinate noise variance ε² (default 0.016, the paper's; "
                                             "0 = no noise)", flag="noise-variance")
    distribution: str = option("gaussian", "gaussian (CapDec) or uniform in a ball of radius ε",
                               choices=("gaussian", "uniform"), flag="noise-distribution")
    normalize: bool = option(True, "L2-normalise before adding noise and after (as the paper)", cli=False)
    center: bool = option(False, "subtract the corpus's text mean before normalising (C3-style); pair with an "
                                 "image mean at caption time")
    text_mean: list[float] | None = option(None, "that mean (filled in by training)", cli=False, repr=False)
    offset: list[float] | None = option(None, "modality offset added to t (image − text mean)", cli=False,
                                        repr=False)
    source: str | None = option(None, "where the values came from (e.g. a calibrate noise.json path)", cli=False)
    shape: str = option("isotropic", "isotropic: CapDec's N(0, ε²·I); gap: shaped like the modality gap, N(0, "
                                     "gap-scale × the gap covariance of the --noise-file, from 'capdec calibrate "
                                     "--gap-rank'), plus isotropic noise only if --noise-variance is given",
                        choices=NOISE_SHAPES, flag="noise-shape")
    # the modality gap's covariance (capdec calibrate --gap-rank): noise n ~ N(0, gap_scale·(FᵀF + diag(g)))
    gap_factor: list[list[float]] | None = option(None, "low-rank factor F (r, d) of the gap covariance (filled from "
                                                        "a noise file)", cli=False, repr=False)
    gap_diag: list[float] | None = option(None, "diagonal variances of the gap covariance", cli=False, repr=False)
    gap_scale: float = option(1.0, "multiplies the gap covariance of a --noise-shape gap noise file (a variance "
                                   "factor: 2 doubles the variance)", flag="noise-gap-scale")
    scale_spread: float = option(0.0, "per-caption noise scale: each caption's noise std is multiplied by s drawn "
                                      "uniformly from [1 − spread, 1 + spread] (0 = every caption the same; 1 = from "
                                      "no noise to twice the std)", flag="noise-scale-spread")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.variance < 0 or not math.isfinite(self.variance):
            raise InputError(f"noise variance must be a finite number ≥ 0, got {self.variance}", options=("variance",))
        if self.gap_scale < 0 or not math.isfinite(self.gap_scale):
            raise InputError(f"noise gap scale must be a finite number ≥ 0, got {self.gap_scale}", options=("gap_scale",))
        if not 0 <= self.scale_spread <= 1:
            raise InputError(f"noise scale spread must be in [0, 1], got {self.scale_spread}", options=("scale_spread",))
        if (self.gap_factor is None) != (self.gap_diag is None):
            raise InputError("a gap covariance needs both its factor and its diagonal")
        if self.gap_diag is not None and self.gap_factor is not None:
            d = len(self.gap_diag)
            if not 1 <= d <= MAX_DIM or len(self.gap_factor) > d:
                raise InputError(f"the gap covariance must have a dimension from 1 to {MAX_DIM} and a rank at most "
                                 f"that, got dimension {d}, rank {len(self.gap_factor)}")
            if any(len(row) != d for row in self.gap_factor):
                raise InputError(f"each row of gap_factor must have gap_diag's length ({d})")
            if any(x < 0 for x in self.gap_diag):
                raise InputError("gap_diag holds variances: they must be ≥ 0")
        if self.shape == "gap" and self.gap_diag is None:
            raise InputError("noise shape 'gap' needs the gap covariance of a noise file made by 'capdec calibrate "
                             "--gap-rank R'", options=("shape",))

    @property
    def shaped(self) -> bool:
        """Whether the noise has the modality gap's covariance (from a calibrate noise file)."""
        return self.shape == "gap"

    @property
    def epsilon(self) -> float:
        return math.sqrt(self.variance)


@dataclass
class ModelConfig(_FromRecipe, Config):
    """Everything needed to rebuild a CapDec decoder without the training script."""

    RECIPE_SECTION: ClassVar[str] = "model"

    embed_dim: int = option(512, "d: the encoder's embedding size (taken from the stores)", cli=False,
                            bounds=(1, MAX_DIM))
    mapper: str = option("transformer", "mapping network: transformer (CapDec's) or mlp (ClipCap's)",
                         choices=("transformer", "mlp"))
    # a checkpoint config without this field gets "legacy" (from_dict), so old checkpoints load and decode as before
    mapper_variant: str = option("clipcap", "transformer mapper: clipcap (ClipCap's / CapDec's exact layers: ReLU, "
                                            "no q/k/v bias) or legacy (capdec's earlier GELU mapper)",
                                 choices=MAPPER_VARIANTS)
    prefix_length: int = option(10, "prefix vectors (L) given to the LM", bounds=(1, MAX_TOKENS))
    clip_length: int | None = option(None, "transformer mapper clip tokens (default: prefix length)",
                                     bounds=(1, MAX_TOKENS))
    mapper_depth: int = option(8, "transformer mapper layers", bounds=(1, MAX_DEPTH))
    mapper_heads: int = option(8, "transformer mapper heads", bounds=(1, MAX_HEADS))
    lm: str = option("scratch", "'scratch' (a small LM trained from scratch with a corpus tokenizer) or a Hugging "
                                "Face causal LM id/directory (e.g. gpt2)")
    freeze_lm: bool = option(False, "train the mapper only (ClipCap's prefix-only variant); off: fine-tune the LM too")
    max_length: int = option(40, "caption tokens incl. end-of-sequence (longer captions are cut)",
                             bounds=(1, MAX_TOKENS))
    stop_at_period: bool = option(False, "the model never learned an end token (imported ClipCap / CapDec weights, "
                                         "see capdec.clipcap): decoding ends a caption at its first '.' by default",
                                  cli=False)
    # from-scratch LM (lm == "scratch")
    lm_dim: int = option(256, "scratch LM hidden size", bounds=(1, MAX_DIM))
    lm_depth: int = option(4, "scratch LM layers", bounds=(1, MAX_DEPTH))
    lm_heads: int = option(4, "scratch LM heads", bounds=(1, MAX_HEADS))
    vocab_size: int = option(8000, "scratch tokenizer vocabulary (an upper bound: small corpora give fewer)",
                             bounds=(16, MAX_VOCAB))
    lowercase: bool = option(True, "lowercase text for the scratch tokenizer")
    dropout: float = option(0.1, "scratch LM dropout (a probability, below 1)")
    # retrieval augmentation (IFCap): needs the training captions as a memory (saved in the checkpoint)
    retrieval_k: int = option(0, "IFCap: fuse the k nearest training captions (of the noised query) with the query "
                                 "through cross-attention before the mapper (0 = off); the memory is kept in the "
                                 "checkpoint", bounds=(0, MAX_TOKENS))
    retrieval_fusion: str = option("ifcap", "how retrieved captions are fused: ifcap (IFCap's Fusion Module: the "
                                            "mapper's clip tokens cross-attend over the retrieved captions mapped to "
                                            "the LM size; transformer mapper) or embedding (capdec's earlier fusion "
                                            "in CLIP space)", choices=RETRIEVAL_FUSIONS)
    retrieval_variance: float | None = option(None, "IFCap image-like retrieval: in training, retrieve with the "
                                                    "caption's embedding plus isotropic noise of this variance "
                                                    "(IFCap: 0.04) instead of the decoder's noised input")
    entity_slots: int = option(0, "capdec's earlier entity filtering: up to N words frequent among the retrieved "
                                  "captions become extra prefix vectors the decoder can copy (needs --retrieval-k)",
                               bounds=(0, MAX_TOKENS))
    entity_min_count: int = option(2, "with --entity-slots: a word must occur in at least this many retrieved "
                                      "captions to be an entity", bounds=(1, None))
    entity_prompt: bool = option(False, "IFCap / ViECap entity hard prompt after the soft prefix: 'There are e1, e2 "
                                        "in image.' In training the caption's own entities (words of "
                                        "--entity-vocab), each left out with probability --entity-mask; at caption "
                                        "time IFCap's frequency-based entity filtering: the entities found at least "
                                        "--entity-threshold times in the image's --entity-retrieve nearest captions")
    entity_vocab: list[str] | None = option(None, "the entity words (filled from --entity-vocab FILE)", cli=False,
                                            repr=False)
    entity_mask: float = option(0.4, "training: probability of leaving each entity out of the prompt (IFCap 0.4)")
    entity_retrieve: int = option(9, "caption time: captions retrieved for entity filtering (IFCap: 9 on COCO, 7 on "
                                     "Flickr30k)", bounds=(1, MAX_TOKENS))
    entity_threshold: int = option(5, "caption time: occurrences among them that make an entity (IFCap: 5 on COCO, "
                                      "3 on Flickr30k)", bounds=(1, None))
    entity_max: int = option(10, "at most this many entities in a prompt", bounds=(1, MAX_TOKENS))
    lm_config: dict[str, Any] | None = option(None, "resolved transformers config (filled at build)", cli=False,
                                              repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.dropout < 1:
            raise InputError(f"dropout must be in [0, 1), got {self.dropout}", options=("dropout",))
        if self.lm_config is not None:
            check_lm_config(self.lm_config)
        if self.entity_slots and not self.retrieval_k:
            raise InputError("entity_slots needs retrieval (retrieval_k > 0): entities come from retrieved captions", options=("entity_slots", "retrieval_k"))
        if self.retrieval_k and self.retrieval_fusion == "ifcap" and self.mapper != "transformer":
            raise InputError("IFCap's fusion works on the transformer mapper's clip tokens: use --mapper transformer "
                             "or --retrieval-fusion embedding",
                             options=("retrieval_fusion", "mapper"))
        if self.retrieval_variance is not None and not (self.retrieval_variance >= 0
                                                         and math.isfinite(self.retrieval_variance)):
            raise InputError(f"retrieval_variance must be a finite number ≥ 0, got {self.retrieval_variance}", options=("retrieval_variance",))
        if self.entity_prompt and not self.entity_vocab:
            raise InputError("entity prompts need an entity vocabulary (--entity-vocab FILE: one word per line)", options=("entity_prompt", "entity_vocab"))
        if not 0 <= self.entity_mask < 1:
            raise InputError(f"entity_mask must be in [0, 1), got {self.entity_mask}", options=("entity_mask",))
        if self.lm == "scratch" and self.lm_dim % self.lm_heads:
            raise InputError(f"lm_dim ({self.lm_dim}) must be divisible by lm_heads ({self.lm_heads})", options=("lm_dim", "lm_heads"))

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, *, strict: bool = False, where: str = "") -> ModelConfig:
        d = dict(d or {})
        if not strict:
            d.setdefault("mapper_variant", "legacy")  # written before the field existed: the GELU mapper
            d.setdefault("retrieval_fusion", "embedding")  # likewise: capdec's earlier fusion in CLIP space
        return super().from_dict(d, strict=strict, where=where)


@dataclass
class TrainConfig(_FromRecipe, Config):
    """Optimisation and bookkeeping hyperparameters (recorded in the checkpoint)."""

    RECIPE_SECTION: ClassVar[str] = "train"

    epochs: int = option(10, "passes over the training captions", bounds=(1, None))
    max_steps: int | None = option(None, "stop after N steps (a fixed budget; wins over epochs when smaller)",
                                   bounds=(1, None))
    batch_size: int = option(64, "captions per step; under torchrun the global batch, split evenly over the "
                                 "processes", bounds=(1, None))
    lr: float | None = option(None, "peak AdamW learning rate (default 2e-5 for a pretrained LM as CapDec, 5e-4 "
                                    "from scratch)", bounds=(0, None))
    weight_decay: float = option(0.01, "AdamW weight decay", bounds=(0, None))
    warmup_steps: int | None = option(None, "linear warm-up steps (default: 5% of the steps, at most 5000)",
                                      bounds=(0, None))
    schedule: str = option("linear", "decay after warm-up", choices=("linear", "cosine", "constant"))
    grad_clip: float = option(1.0, "max gradient norm (0 = off)", bounds=(0, None))
    amp: str = option("auto", "mixed precision (auto: bf16, or fp16 on GPUs without bf16; bf16 on CPUs with AMX or "
                              "AVX512-BF16, else fp32; off: fp32 everywhere)", choices=("auto", "off", "fp16", "bf16"))
    length_buckets: bool = option(False, "batch captions of similar length together: less padding, faster steps; "
                                         "batches are shuffled within windows of 50")
    compile: bool = option(False, "torch.compile the model (slower first steps, faster after)")
    val_fraction: float = option(0.02, "captions held out for the clean-embedding validation loss")
    val_max: int = option(2000, "at most this many validation captions", cli=False, bounds=(0, None))
    eval_every: int | None = option(None, "validate every N steps (default: each epoch)", bounds=(1, None))
    save_every: int | None = option(None, "checkpoint every N steps (default: each epoch)", bounds=(1, None))
    log_every: int = option(20, "metrics.jsonl row every N steps", bounds=(1, None))
    seed: int = option(0, "seeds data order, noise, dropout and initialisation", bounds=(0, MAX_SEED))
    save_memory: bool = option(False, "keep the training captions' embeddings in the checkpoint (for --project)")
    keep_epochs: bool = option(False, "also keep each epoch's weights beside --out as OUT-epoch001, OUT-epoch002, ...")
    keep_best: bool = option(False, "also keep the weights of the lowest validation loss so far as OUT-best")
    val_store: str | None = option(None, "validate on this store's captions (e.g. 'capdec embed dataset_coco.json "
                                         "--split val') instead of holding out --val-fraction of the training "
                                         "captions", metavar="STORE")
    device: str = option("auto", "auto (cuda if present; cuda:LOCAL_RANK under torchrun), cpu, cuda:N")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lr == 0:
            raise InputError("lr must be > 0", options=("lr",))
        if not 0 <= self.val_fraction < 1:
            raise InputError(f"val_fraction must be in [0, 1), got {self.val_fraction}", options=("val_fraction",))


@dataclass
class InferenceConfig(Config):
    """How image embeddings are prepared before decoding (recorded; overridable at caption time)."""

    normalize: bool = option(True, "L2-normalise image embeddings (as the training text embeddings were)", cli=False)
    shift: list[float] | None = option(None, "added after normalising, then renormalised", cli=False, repr=False)
    renormalize_shift: bool = option(True, "renormalise after adding the shift (off: as CapDec's released "
                                           "predictions_runner.py, which decodes normalize(v) + shift as is)",
                                     cli=False)
    image_mean: list[float] | None = option(None, "subtracted first (C3 centering)", cli=False, repr=False)
    project: bool = option(False, "DeCap: at caption time, replace image embeddings by their softmax-weighted "
                                  "projection onto the text memory (implies --save-memory)")
    tau: float = option(0.01, "projection temperature")
    project_k: int | None = option(None, "project over the top-k memory items only (default: all, exact)",
                                   bounds=(1, None))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tau <= 0 or not math.isfinite(self.tau):
            raise InputError(f"tau (the projection temperature) must be > 0, got {self.tau}", options=("tau",))


@dataclass
class DecodeConfig(Config):
    """How token ids are chosen after the prefix."""

    strategy: str = option("beam", "decoding strategy", choices=STRATEGIES)
    max_length: int | None = option(None, "most tokens per caption, end-of-sequence included (default: the "
                                          "checkpoint's)", bounds=(1, MAX_TOKENS))
    beam_size: int = option(5, "beam: hypotheses kept per image", bounds=(1, None))
    length_penalty: float = option(1.0, "beam: finished captions are ranked by sum log p / length**this")
    early_stopping: str = option("exact", "beam: exact ends an image's search once no running beam can beat its best "
                                          "caption even at max_length (the result of searching to the end); "
                                          "heuristic once the best running beam, scored at its current length, "
                                          "does not beat the k finished ones (faster; Hugging Face's default; can "
                                          "end too soon)", choices=EARLY_STOPPING)
    top_k: int = option(0, "sample: keep the k most likely tokens (0: all)", bounds=(0, None))
    top_p: float = option(1.0, "sample: nucleus probability mass (the fewest tokens whose probability sums to "
                               "≥ this; 1: all)")
    temperature: float = option(1.0, "sample: logits are divided by this")
    seed: int | None = option(None, "sample: random seed (reproducible for a given --batch-size; default: "
                                    "torch's global RNG)", bounds=(0, MAX_SEED))
    use_cache: bool = option(True, "reuse the LM's key/value cache (off: re-run the whole sequence each step)",
                             cli=False)
    stop_at_period: bool | None = option(None, "end a caption at its first '.' (for models that never learned an "
                                               "end token, as ClipCap/CapDec's released weights; default: as the "
                                               "checkpoint records, on for imported ones)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.top_p <= 1.0:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.temperature <= 0.0:
            raise InputError(f"temperature must be > 0, got {self.temperature} (use strategy 'greedy' for argmax)")

    def replace(self, **changes: Any) -> DecodeConfig:
        """A copy with some fields changed (unknown names are an error)."""
        known = {f.name for f in fields(self)}
        unknown = set(changes) - known
        if unknown:
            raise InputError(f"unknown decoding option(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
        return replace(self, **changes)


@dataclass
class MemoryConfig(Config):
    """How a :class:`TextMemory` is searched (recorded in its ``meta.json``)."""

    backend: str = "auto"  # "torch" (exact, chunked), "faiss", or "auto" (faiss for an ivf index over >= 100k rows)
    # faiss index: "flat" (exact IndexFlatIP, a float32 copy of the rows), "ivf" (approximate: inverted lists
    # holding the rows, 2·d bytes each) or "ivfpq" (approximate: inverted lists of product-quantised codes,
    # pq_m bytes a row, whose candidates are re-scored exactly from the rows; for memories larger than RAM)
    index: str = "flat"
    nlist: int | None = None  # ivf, ivfpq: number of inverted lists; None = 4·√n
    nprobe: int = 32  # ivf, ivfpq: lists scanned per query (more = better recall, slower)
    train_size: int | None = None  # ivf, ivfpq: rows sampled to train the k-means; None = min(n, 50·nlist)
    chunk_size: int | None = None  # torch: memory rows per chunk; None = from CHUNK_BYTES
    pq_m: int | None = None  # ivfpq: bytes per row (one 8-bit code per d/pq_m dimensions); None = d/16
    rerank: int = 4  # ivfpq: candidates per result re-scored exactly from the rows (k·rerank, at least 256)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.backend not in MEMORY_BACKENDS:
            raise InputError(f"unknown memory backend {self.backend!r}; use one of {', '.join(MEMORY_BACKENDS)}")
        if self.index not in MEMORY_INDEXES:
            raise InputError(f"unknown memory index {self.index!r}; use one of {', '.join(MEMORY_INDEXES)}")
        if self.backend == "torch" and self.index in ("ivf", "ivfpq"):
            raise InputError(f"index={self.index!r} needs backend='faiss' (or 'auto'); the torch backend is exact only")
        for name in ("nlist", "train_size", "chunk_size", "pq_m"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InputError(f"memory option {name} must be a positive integer (got {value})")
        for name in ("nprobe", "rerank"):
            if getattr(self, name) < 1:
                raise InputError(f"memory option {name} must be a positive integer (got {getattr(self, name)})")
