"""Text-only CapDec training: embedding store(s) -> checkpoint.

Each step takes a batch of caption embeddings, perturbs them with ``capdec.noise.add_noise`` and
teaches the decoder to reproduce the captions. Everything random in a step (batch order, noise,
dropout) is seeded by ``(seed, step)``, so ``resume=True`` from a checkpoint continues to exactly the
result of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from capdec.artifacts import read_jsonl
from capdec.checkpoint import (
    InferenceConfig,
    load_checkpoint,
    load_training_state,
    read_config,
    save_checkpoint,
)
from capdec.config import Config, option
from capdec.encoders.base import check_identity, resolve_device
from capdec.errors import InputError, TrainingError
from capdec.model import CapDecModel, ModelConfig, build_model
from capdec.noise import NoiseConfig, add_noise, normalize
from capdec.utils import progress

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig(Config):
    """Optimisation and bookkeeping hyperparameters (recorded in the checkpoint)."""

    epochs: int = option(10, "passes over the training captions")
    max_steps: int | None = option(None, "stop after N steps (a fixed budget; wins over epochs when smaller)")
    batch_size: int = option(64, "captions per step")
    lr: float | None = option(None, "peak AdamW learning rate (default 2e-5 for a pretrained LM as CapDec, 5e-4 "
                                    "from scratch)")
    weight_decay: float = option(0.01, "AdamW weight decay")
    warmup_steps: int | None = option(None, "linear warm-up steps (default: 5% of the steps, at most 5000)")
    schedule: str = option("linear", "decay after warm-up", choices=("linear", "cosine", "constant"))
    grad_clip: float = option(1.0, "max gradient norm (0 = off)")
    amp: str = option("auto", "mixed precision (auto: bf16/fp16 on GPU, off on CPU)",
                      choices=("auto", "off", "fp16", "bf16"))
    val_fraction: float = option(0.02, "captions held out for the clean-embedding validation loss")
    val_max: int = option(2000, "at most this many validation captions", cli=False)
    eval_every: int | None = option(None, "validate every N steps (default: each epoch)")
    save_every: int | None = option(None, "checkpoint every N steps (default: each epoch)")
    log_every: int = option(20, "metrics.jsonl row every N steps")
    seed: int = option(0, "seeds data order, noise, dropout and initialisation")
    save_memory: bool = option(False, "keep the training captions' embeddings in the checkpoint (for --project)")
    keep_epochs: bool = option(False, "also keep each epoch's weights beside --out as OUT-epoch001, OUT-epoch002, ...")
    keep_best: bool = option(False, "also keep the weights of the lowest validation loss so far as OUT-best")
    val_store: str | None = option(None, "validate on this store's captions (e.g. 'capdec embed dataset_coco.json "
                                         "--split val') instead of holding out --val-fraction of the training "
                                         "captions", metavar="STORE")
    device: str = option("auto", "auto (cuda if present), cpu, cuda:N")

    def __post_init__(self) -> None:
        if self.schedule not in ("linear", "cosine", "constant"):
            raise InputError(f"schedule must be linear, cosine or constant, got {self.schedule!r}")
        if self.amp not in ("auto", "off", "fp16", "bf16"):
            raise InputError(f"amp must be auto, off, fp16 or bf16, got {self.amp!r}")
        if self.batch_size < 1 or self.epochs < 1:
            raise InputError("batch_size and epochs must be ≥ 1")
        if not 0 <= self.val_fraction < 1:
            raise InputError(f"val_fraction must be in [0, 1), got {self.val_fraction}")


# -- pure pieces -----------------------------------------------------------------------------------
def lr_at(step: int, *, peak: float, warmup: int, total: int, schedule: str) -> float:
    """Learning rate for 0-based ``step``: linear warm-up to ``peak``, then the chosen decay to 0."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return peak
    progress_ = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress_))
    return peak * (1.0 - progress_)


def step_seed(seed: int, step: int, stream: int = 0) -> int:
    """A distinct, reproducible seed per (run seed, step, purpose)."""
    return (seed * 1_000_003 + step * 7_919 + stream * 104_729) % (2**63 - 1)


def epoch_order(n: int, epoch: int, seed: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of one epoch: a permutation, or ``n`` weighted draws when mixing corpora."""
    g = torch.Generator().manual_seed(step_seed(seed, epoch, stream=1))
    if weights is None:
        return torch.randperm(n, generator=g)
    return torch.multinomial(weights, n, replacement=True, generator=g)


# -- data ------------------------------------------------------------------------------------------
@dataclass
class TextData:
    """Caption embeddings and captions from one or more stores, plus per-sample mixing weights."""

    embeddings: torch.Tensor  # (n, d), as stored (fp16 or fp32)
    captions: list[str]
    encoder_spec: dict[str, Any]
    encoder_identity: dict[str, Any]
    sample_weights: torch.Tensor | None = None  # (n,) when mixing corpora with weights
    sources: list[str] | None = None
    modality: str = "text"  # of the embeddings: "text" (CapDec) or "image" (paired images: ClipCap)


def load_text_data(stores: list[Any], mix_weights: list[float] | None = None) -> TextData:
    """Open the stores (paths or EmbeddingStore objects) and check they share one encoder."""
    from capdec.store import EmbeddingStore

    if not stores:
        raise InputError("no embedding store given")
    opened = [s if not isinstance(s, (str, os.PathLike)) else EmbeddingStore.open(s) for s in stores]
    first = opened[0]
    for s in opened[1:]:
        check_identity(first.encoder_identity, s.encoder_identity, what=f"embedding store {getattr(s, 'path', s)}")
    if mix_weights is not None:
        if len(mix_weights) != len(opened):
            raise InputError(f"{len(mix_weights)} mixing weights given for {len(opened)} stores")
        if any(w < 0 for w in mix_weights) or sum(mix_weights) <= 0:
            raise InputError("mixing weights must be ≥ 0 and not all 0")
    modalities = [getattr(s, "modality", "text") for s in opened]
    if len(set(modalities)) > 1:
        logger.warning("mixing text and image embedding stores (%s): one noise setting applies to both",
                       ", ".join(modalities))
    embs = [torch.as_tensor(np.array(s.embeddings)) for s in opened]  # a copy in memory, stored dtype
    captions = [c for s in opened for c in s.captions]
    weights = None
    if mix_weights is not None:
        # each store gets a share of every epoch proportional to its weight, whatever its size
        weights = torch.cat([torch.full((len(e),), w / max(1, len(e))) for e, w in zip(embs, mix_weights)])
    return TextData(embeddings=torch.cat(embs), captions=captions, encoder_spec=first.encoder_spec,
                    encoder_identity=first.encoder_identity, sample_weights=weights,
                    sources=[str(getattr(s, "path", "<memory>")) for s in opened],
                    modality="image" if set(modalities) == {"image"} else "text")


def split_indices(n: int, config: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic (train, val) split of ``n`` captions."""
    n_val = min(config.val_max, int(n * config.val_fraction)) if n >= 20 else 0
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(step_seed(config.seed, 0, stream=2)))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


# -- the loop --------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    path: Path
    steps: int
    train_loss: float | None
    val_loss: float | None
    seconds: float


def _autocast(device: torch.device, amp: str):
    if device.type != "cuda" or amp == "off":
        return contextlib.nullcontext(), None
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(amp)
    if dtype is None:  # auto
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return torch.autocast("cuda", dtype=dtype), scaler


def train(stores: list[Any] | Any, out_dir: str | os.PathLike, *, model_config: ModelConfig | None = None,
          noise: NoiseConfig | None = None, config: TrainConfig | None = None, encoder: Any = None,
          init_from: str | os.PathLike | None = None, resume: bool = False,
          mix_weights: list[float] | None = None, inference: InferenceConfig | None = None,
          overwrite: bool = False, show_progress: bool | None = None) -> TrainResult:
    """Train a CapDec decoder on caption embeddings; returns where the checkpoint is.

    ``encoder``: optional spec or Encoder the stores must have been made with (checked, not used).
    ``init_from``: start from a trained checkpoint's weights, architecture and tokenizer (fine-tuning, e.g.
    on a styled corpus); leave ``model_config`` None, or give one equal to the checkpoint's (else refused).
    ``mix_weights``: one sampling weight per store (a store's captions share its weight equally).
    ``resume``: continue the run whose checkpoint is ``out_dir`` with its recorded configuration.
    ``overwrite``: replace an existing checkpoint at ``out_dir`` (it is kept until the first save).

    Two steps: :func:`plan_training` decides everything (data, configs, where the model comes from)
    and :func:`run_training` carries the plan out.
    """
    plan = plan_training(stores, out_dir, model_config=model_config, noise=noise, config=config, encoder=encoder,
                         init_from=init_from, resume=resume, mix_weights=mix_weights, inference=inference,
                         overwrite=overwrite)
    return run_training(plan, show_progress=show_progress)


@dataclass
class TrainPlan:
    """A training run decided but not started: :func:`plan_training` makes it, :func:`run_training` runs it."""

    out_dir: Path
    data: TextData
    mode: str  # "new" (build model_config), "resume" (out_dir's checkpoint) or "init_from" (fine-tune a checkpoint)
    config: TrainConfig
    noise: NoiseConfig
    inference: InferenceConfig
    model_config: ModelConfig | None = None  # new: the architecture; init_from: the one asked for (checked), or None
    init_from: str | os.PathLike | None = None  # the checkpoint to fine-tune (as given)
    mix_weights: list[float] | None = None
    state: dict[str, Any] = field(default_factory=lambda: {"step": 0})  # resume: the recorded training state
    opt_state: dict[str, Any] | None = None  # resume: optimizer and scaler state
    started: float = field(default_factory=time.time)


def plan_training(stores: list[Any] | Any, out_dir: str | os.PathLike, *, model_config: ModelConfig | None = None,
                  noise: NoiseConfig | None = None, config: TrainConfig | None = None, encoder: Any = None,
                  init_from: str | os.PathLike | None = None, resume: bool = False,
                  mix_weights: list[float] | None = None, inference: InferenceConfig | None = None,
                  overwrite: bool = False) -> TrainPlan:
    """Check the arguments, read the stores and decide new / resume / init-from (see :func:`train`)."""
    started = time.time()
    out_dir = Path(out_dir)
    if not resume and not overwrite and out_dir.exists() and any(out_dir.iterdir()):
        raise InputError(f"{out_dir} already exists; use --resume to continue its training or --overwrite to "
                         "replace it")
    stores = stores if isinstance(stores, (list, tuple)) else [stores]
    data = load_text_data(list(stores), mix_weights)
    if encoder is not None:
        _check_encoder_arg(encoder, data)

    state: dict[str, Any] = {"step": 0}
    opt_state = None
    if resume:
        recorded = read_config(out_dir)
        check_identity(recorded["encoder_identity"], data.encoder_identity, what=f"checkpoint {out_dir}")
        state, opt_state = load_training_state(out_dir)
        config = TrainConfig.from_dict(recorded["train"], where=str(out_dir))
        noise = NoiseConfig(**recorded["noise"])
        inference = InferenceConfig.from_dict(recorded.get("inference"), where=str(out_dir))
        logger.info("resuming %s from step %d with its recorded configuration", out_dir, state["step"])
    mode = "resume" if resume else "init_from" if init_from is not None else "new"
    if noise is None and data.modality == "image":
        noise = NoiseConfig(variance=0.0)  # ClipCap: the decoder sees the embeddings it will caption
    noise = noise or NoiseConfig()
    if data.modality == "image":
        logger.info("training on image embeddings (supervised, ClipCap) with noise variance %g%s", noise.variance,
                    "" if noise.variance else " (no noise; pass a variance to add some)")
    return TrainPlan(out_dir=out_dir, data=data, mode=mode, config=config or TrainConfig(),
                     noise=noise, inference=inference or InferenceConfig(),
                     model_config=model_config, init_from=init_from,
                     mix_weights=mix_weights, state=state, opt_state=opt_state, started=started)


def _plan_model(plan: TrainPlan, train_idx: torch.Tensor) -> CapDecModel:
    """The model the plan starts from: resumed, fine-tuned from a checkpoint, or new."""
    data = plan.data
    if plan.mode == "resume":
        return load_checkpoint(plan.out_dir, device="cpu").model
    if plan.mode == "init_from":
        return _init_from(plan.init_from, data, plan.model_config)
    model_config = plan.model_config or ModelConfig()
    if model_config.embed_dim != data.embeddings.shape[1]:
        model_config.embed_dim = int(data.embeddings.shape[1])
    return build_model(model_config, captions=[data.captions[i] for i in train_idx.tolist()])


def run_training(plan: TrainPlan, *, show_progress: bool | None = None) -> TrainResult:
    """Carry out a :class:`TrainPlan`: build or load the model, then the training loop with its saves."""
    t0 = plan.started
    out_dir, data, config, noise, inference = plan.out_dir, plan.data, plan.config, plan.noise, plan.inference
    resume, init_from, mix_weights = plan.mode == "resume", plan.init_from, plan.mix_weights
    state, opt_state = plan.state, plan.opt_state
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)

    if config.val_store is not None:
        val_data = load_text_data([config.val_store])
        check_identity(data.encoder_identity, val_data.encoder_identity, what=f"--val-store {config.val_store}")
        train_idx = torch.arange(len(data.captions))
        n_val = min(config.val_max, len(val_data.captions))
        g = torch.Generator().manual_seed(step_seed(config.seed, 0, stream=5))
        val_idx = torch.randperm(len(val_data.captions), generator=g)[:n_val].sort().values
    else:
        val_data = data
        train_idx, val_idx = split_indices(len(data.captions), config)
    if len(train_idx) == 0:
        raise InputError("no training captions")
    if config.keep_best and len(val_idx) == 0:
        logger.warning("--keep-best: no validation captions (give --val-store, or more captions / a larger "
                       "--val-fraction), so no best checkpoint will be kept")
    if (config.keep_best or config.keep_epochs) and out_dir.name in ("", ".", ".."):
        raise InputError(f"--keep-best / --keep-epochs write siblings of --out; give --out a directory name, "
                         f"not {str(out_dir)!r}")
    model = _plan_model(plan, train_idx)
    model.to(device).train()

    memory, retrieval = None, None
    if model.config.retrieval_k or config.save_memory:
        from capdec.memory import TextMemory
        from capdec.retrieval import RetrievalContext

        memory = TextMemory(normalize(data.embeddings[train_idx].float()).to(data.embeddings.dtype),
                            captions=[data.captions[i] for i in train_idx.tolist()],
                            encoder_identity=data.encoder_identity)
        if model.config.retrieval_k:
            retrieval = RetrievalContext(memory, model)

    if noise.center and noise.text_mean is None:
        noise.text_mean = normalize(data.embeddings[train_idx].float()).mean(0).tolist()

    logger.info("tokenizing %d captions", len(data.captions))
    input_ids, attn, cut = model.tokenize(data.captions)
    if cut:
        logger.info("%d captions were longer than %d tokens and were cut", cut, model.config.max_length)
    val_ids, val_attn = (input_ids, attn) if val_data is data else model.tokenize(val_data.captions)[:2]

    n_train = len(train_idx)
    steps_per_epoch = math.ceil(n_train / config.batch_size)
    total = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    peak = config.lr if config.lr is not None else (5e-4 if model.config.lm == "scratch" else 2e-5)
    warmup = config.warmup_steps if config.warmup_steps is not None else min(5000, int(0.05 * total))
    eval_every = config.eval_every or steps_per_epoch
    save_every = config.save_every or steps_per_epoch

    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=peak)
    if opt_state is not None:
        optimizer.load_state_dict(opt_state["optimizer"])
    autocast, scaler = _autocast(device, config.amp)
    if scaler is not None and opt_state is not None and opt_state.get("scaler"):
        scaler.load_state_dict(opt_state["scaler"])

    emb_train_w = data.sample_weights[train_idx] if data.sample_weights is not None else None
    log = _MetricsLog(out_dir, state["step"] if resume else 0)
    save_kw = dict(encoder_spec=data.encoder_spec, encoder_identity=data.encoder_identity, noise=noise,
                   train=config.to_dict(), inference=inference,
                   extra={"data": {"stores": data.sources, "modality": data.modality, "mix_weights": mix_weights,
                                   "count": len(data.captions),
                                   "train": n_train, "val": len(val_idx)},
                          "init_from": str(init_from) if init_from else None})

    step = state["step"]
    last_loss = state.get("train_loss")
    val_loss = state.get("val_loss")
    run_loss, run_n, t_log = 0.0, 0, time.time()
    order_epoch, order = -1, None
    bar = progress(total=total, initial=step, desc="train", show=show_progress)
    t_seg = time.time()  # wall time since the last save, accumulated into state["seconds"]
    try:
        while step < total:
            epoch, within = divmod(step, steps_per_epoch)
            if epoch != order_epoch:
                order = train_idx[epoch_order(n_train, epoch, config.seed, emb_train_w)]
                order_epoch = epoch
            idx = order[within * config.batch_size : (within + 1) * config.batch_size]
            lr = lr_at(step, peak=peak, warmup=warmup, total=total, schedule=config.schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = _train_step(model, optimizer, scaler, autocast, data.embeddings, input_ids, attn, idx,
                               noise, config, step, device, retrieval=retrieval, train_idx=train_idx)
            if not math.isfinite(loss):
                raise TrainingError(
                    f"the training loss became {loss} at step {step + 1}; stopped. The last good checkpoint "
                    f"(step {state['step']}) is kept at {out_dir}. Try a lower --lr or --grad-clip.")
            step += 1
            run_loss += loss
            run_n += 1
            last_loss = loss
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}")
            row: dict[str, Any] = {}
            if step % config.log_every == 0 or step == total:
                elapsed = time.time() - t_log
                row.update(step=step, epoch=step / steps_per_epoch, train_loss=run_loss / run_n, lr=lr,
                           samples_per_s=run_n * config.batch_size / max(elapsed, 1e-9))
                run_loss, run_n, t_log = 0.0, 0, time.time()
            if len(val_idx) and (step % eval_every == 0 or step == total):
                val_loss = evaluate_loss(model, val_data.embeddings, val_ids, val_attn, val_idx, noise, config, device,
                                         retrieval=retrieval)
                row.update(step=step, epoch=step / steps_per_epoch, val_loss=val_loss)
                logger.info("step %d: train loss %.4f, val loss %.4f", step, last_loss, val_loss)
                if config.keep_best and val_loss < state.get("best_val_loss", math.inf):
                    state["best_val_loss"], state["best_step"] = val_loss, step
                    save_checkpoint(sibling(out_dir, "best"), model, files={"metrics.jsonl": log.text() + json.dumps(row) + "\n"},
                                    memory=memory, **{**save_kw, "extra": {**save_kw["extra"], "step": step,
                                                                          "val_loss": val_loss}})
                    logger.info("best validation loss so far: kept as %s", sibling(out_dir, "best"))
            if row:
                log.write(row)
            if config.keep_epochs and step % steps_per_epoch == 0:
                epoch_dir = sibling(out_dir, f"epoch{step // steps_per_epoch:03d}")
                save_checkpoint(epoch_dir, model, files={"metrics.jsonl": log.text()}, memory=memory,
                                **{**save_kw, "extra": {**save_kw["extra"], "step": step, "val_loss": val_loss}})
            if step % save_every == 0 or step == total:
                best = {k: state[k] for k in ("best_val_loss", "best_step") if k in state}
                state = {"step": step, "total_steps": total, "train_loss": last_loss, "val_loss": val_loss,
                         "peak_lr": peak, "warmup_steps": warmup, **best,
                         "seconds": state.get("seconds", 0.0) + time.time() - t_seg}
                t_seg = time.time()
                save_checkpoint(out_dir, model, training_state=state,
                                optimizer_state={"optimizer": optimizer.state_dict(),
                                                 "scaler": scaler.state_dict() if scaler else None},
                                files={"metrics.jsonl": log.text()}, memory=memory, **save_kw)
                log.live = True
    finally:
        bar.close()
    return TrainResult(path=out_dir, steps=step, train_loss=last_loss, val_loss=val_loss, seconds=time.time() - t0)


def sibling(out_dir: Path, tag: str) -> Path:
    """Where a kept copy of the run in ``out_dir`` goes: ``OUT-best``, ``OUT-epoch003`` beside it."""
    return out_dir.with_name(f"{out_dir.name}-{tag}")


def _train_step(model: CapDecModel, optimizer, scaler, autocast, embeddings, input_ids, attn, idx, noise: NoiseConfig,
                config: TrainConfig, step: int, device: torch.device, *, retrieval=None,
                train_idx: torch.Tensor | None = None) -> float:
    ids, mask = _batch_tokens(input_ids, attn, idx, device)
    emb = embeddings[idx].to(device=device, dtype=torch.float32)
    gen = torch.Generator(device=device).manual_seed(step_seed(config.seed, step, stream=3))
    emb = add_noise(emb, noise, generator=gen)
    # retrieval uses the noised query (as an image would be) and never returns the caption itself
    extra = retrieval(emb, exclude=torch.searchsorted(train_idx, idx)) if retrieval is not None else {}
    torch.manual_seed(step_seed(config.seed, step, stream=4))  # dropout
    with autocast:
        loss = model(emb, ids, mask, **extra)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if config.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return float(loss.detach())


def _batch_tokens(input_ids: torch.Tensor, attn: torch.Tensor, idx: torch.Tensor, device: torch.device):
    mask = attn[idx]
    t = int(mask.sum(1).max())  # trim shared padding columns
    return input_ids[idx, :t].to(device), mask[:, :t].to(device)


@torch.no_grad()
def evaluate_loss(model: CapDecModel, embeddings: torch.Tensor, input_ids: torch.Tensor, attn: torch.Tensor,
                  idx: torch.Tensor, noise: NoiseConfig, config: TrainConfig, device: torch.device, *,
                  retrieval=None) -> float:
    """Mean caption loss from *clean* embeddings (the noise-free text embedding, as an image would be)."""
    was_training = model.training
    model.eval()
    clean = NoiseConfig(**{**noise.to_dict(), "variance": 0.0})
    total, count = 0.0, 0
    for start in range(0, len(idx), config.batch_size):
        b = idx[start : start + config.batch_size]
        ids, mask = _batch_tokens(input_ids, attn, b, device)
        emb = add_noise(embeddings[b].to(device=device, dtype=torch.float32), clean)
        n_tok = int(mask.sum())
        extra = retrieval(emb) if retrieval is not None else {}
        total += float(model(emb, ids, mask, **extra)) * n_tok
        count += n_tok
    model.train(was_training)
    return total / max(1, count)


class _MetricsLog:
    """``metrics.jsonl`` inside the checkpoint: appended live, copied into every saved checkpoint."""

    def __init__(self, out_dir: Path, resume_step: int):
        self.path = out_dir / "metrics.jsonl"
        self.live = bool(resume_step)  # append to the file only once it belongs to this run
        self.rows: list[str] = []
        if resume_step and self.path.exists():  # keep the rows up to the step we resume from
            self.rows = [json.dumps(r) for r in read_jsonl(self.path) if r.get("step", 0) <= resume_step]

    def write(self, row: dict[str, Any]) -> None:
        line = json.dumps(row)
        self.rows.append(line)
        if self.live:
            with open(self.path, "a") as f:
                f.write(line + "\n")

    def text(self) -> str:
        return "".join(r + "\n" for r in self.rows)


def _check_encoder_arg(encoder: Any, data: TextData) -> None:
    from capdec.encoders import Encoder, load_encoder

    enc = encoder if isinstance(encoder, Encoder) else load_encoder(encoder, device="cpu")
    check_identity(data.encoder_identity, enc.identity, what="the embedding store")


def _init_from(path: str | os.PathLike, data: TextData, model_config: ModelConfig | None) -> CapDecModel:
    """Weights (and architecture, tokenizer) of a trained checkpoint, checked against the data and request."""
    recorded = read_config(path)
    check_identity(recorded["encoder_identity"], data.encoder_identity,
                   what=f"--init-from checkpoint {path} (vs the embedding store)")
    model = load_checkpoint(path, device="cpu").model
    if model_config is not None:
        # every model option is the checkpoint's when fine-tuning; asking for another value is refused
        want = {**model_config.to_dict(), "embed_dim": model.config.embed_dim}
        have = model.config.to_dict()
        diffs = {k: (have.get(k), want.get(k)) for k in set(have) | set(want)
                 if k != "lm_config" and have.get(k) != want.get(k)}
        if diffs:
            raise InputError(f"--init-from {path}: its decoder architecture differs from the one asked for "
                             f"({', '.join(f'{k}: {a} vs {b}' for k, (a, b) in sorted(diffs.items()))}); "
                             "drop the conflicting model options to fine-tune it as it is")
    return model
