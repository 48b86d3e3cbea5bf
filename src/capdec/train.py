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

from capdec import distributed
from capdec.artifacts import read_jsonl
from capdec.checkpoint import (
    InferenceConfig,
    load_checkpoint,
    load_training_state,
    read_config,
    save_checkpoint,
)
from capdec.configs import TrainConfig
from capdec.encoders.base import check_identity
from capdec.errors import InputError, TrainingError
from capdec.model import CapDecModel, ModelConfig, build_model
from capdec.noise import NoiseConfig, add_noise
from capdec.textdata import CaptionStream, TextData, load_text_data
from capdec.utils import progress, release_freed_memory

logger = logging.getLogger(__name__)

# corpora at least this large release freed heap memory after every training step
TRIM_EVERY_STEP_ROWS = 1_000_000


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


def split_indices(n: int, config: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic (train, val) split of ``n`` captions."""
    n_val = min(config.val_max, int(n * config.val_fraction)) if n >= 20 else 0
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(step_seed(config.seed, 0, stream=2)))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def bucket_batches(order: torch.Tensor, lengths: np.ndarray | torch.Tensor, batch_size: int, *, seed: int,
                   epoch: int, window: int = 50) -> torch.Tensor:
    """``order`` regrouped so that each batch holds captions of similar length (less padding to compute).

    Within each window of ``window`` batches the captions are sorted by length and cut into batches,
    then the window's full batches are shuffled (seeded by ``seed, epoch``); a short last batch stays
    last. Every caption is still seen once per epoch, and batches stay as random as the window allows.
    """
    lengths = torch.as_tensor(np.asarray(lengths))
    g = torch.Generator().manual_seed(step_seed(seed, epoch, stream=5))
    span = window * batch_size
    out = []
    for lo in range(0, len(order), span):
        chunk = order[lo : lo + span]
        chunk = chunk[torch.sort(lengths[lo : lo + span], stable=True).indices]
        full = len(chunk) // batch_size
        batches = chunk[: full * batch_size].view(full, batch_size)[torch.randperm(full, generator=g)]
        out += [batches.reshape(-1), chunk[full * batch_size :]]
    return torch.cat(out) if out else order


# -- the loop --------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    path: Path
    steps: int
    train_loss: float | None
    val_loss: float | None
    seconds: float


def cpu_has_bf16() -> bool:
    """True on CPUs with bf16 matrix units (AMX or AVX512-BF16), where bf16 autocast pays off."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:  # not Linux: ask PyTorch which kernels it would dispatch to
        return "AMX" in str(torch.backends.cpu.get_cpu_capability())
    return "amx_bf16" in flags or "avx512_bf16" in flags


def amp_dtype(device: torch.device, amp: str) -> torch.dtype | None:
    """The autocast dtype of ``amp`` on ``device`` (None: fp32)."""
    if amp == "off":
        return None
    if device.type == "cuda":
        if amp == "auto":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return {"fp16": torch.float16, "bf16": torch.bfloat16}[amp]
    if device.type == "cpu":
        if amp == "fp16":
            raise InputError("--amp fp16 needs a GPU; on CPU use --amp bf16 (or auto) or off")
        return torch.bfloat16 if amp == "bf16" or cpu_has_bf16() else None
    return None


def _autocast(device: torch.device, amp: str):
    dtype = amp_dtype(device, amp)
    if dtype is None:
        return contextlib.nullcontext(), None
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return torch.autocast(device.type, dtype=dtype), scaler


def make_optimizer(params: list[torch.nn.Parameter], *, lr: float, weight_decay: float,
                   device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only, fused into one kernel per step where PyTorch has it."""
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    impl = {"fused": True} if device.type in ("cuda", "cpu") else {"foreach": True}
    return torch.optim.AdamW(groups, lr=lr, **impl)


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

    Under ``torchrun`` each process trains a slice of every (global) batch with DistributedDataParallel;
    the result is the single-process run's (see :mod:`capdec.distributed`). Rank 0 writes the checkpoint.
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
    config = config or TrainConfig()
    distributed.check_batch(config.batch_size, distributed.info().world_size)  # before any process waits on another
    return TrainPlan(out_dir=out_dir, data=data, mode=mode, config=config,
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
    if model_config.embed_dim != data.dim:
        model_config.embed_dim = data.dim
    return build_model(model_config, tokenizer=_shared_tokenizer(model_config, data, train_idx))


def run_training(plan: TrainPlan, *, show_progress: bool | None = None) -> TrainResult:
    """Carry out a :class:`TrainPlan`: build or load the model, then the training loop with its saves."""
    t0 = plan.started
    out_dir, data, config, noise, inference = plan.out_dir, plan.data, plan.config, plan.noise, plan.inference
    resume, init_from, mix_weights = plan.mode == "resume", plan.init_from, plan.mix_weights
    state, opt_state = plan.state, plan.opt_state
    device = distributed.device_for(config.device)
    dist_info = distributed.init(device)
    if not dist_info.is_main:
        show_progress = False
    torch.manual_seed(config.seed)

    if config.val_store is not None:
        val_data = load_text_data([config.val_store])
        check_identity(data.encoder_identity, val_data.encoder_identity, what=f"--val-store {config.val_store}")
        train_idx = torch.arange(len(data))
        n_val = min(config.val_max, len(val_data))
        g = torch.Generator().manual_seed(step_seed(config.seed, 0, stream=5))
        val_idx = torch.randperm(len(val_data), generator=g)[:n_val].sort().values
    else:
        val_data = data
        train_idx, val_idx = split_indices(len(data), config)
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

    # token ids: a cache beside each store, built once per (store, tokenizer) by one process per node
    for d in (data,) if val_data is data else (data, val_data):
        if dist_info.local_rank == 0:
            d.attach_tokenizer(model.tokenizer, show_progress=show_progress)
        distributed.barrier()
        if dist_info.local_rank != 0:
            d.attach_tokenizer(model.tokenizer, build=False)
    cut = data.count_cut(train_idx, model.config.max_length)
    if cut:
        logger.info("%d training captions are longer than %d tokens and will be cut", cut, model.config.max_length)

    memory, retrieval = None, None
    if model.config.retrieval_k or config.save_memory:
        memory, retrieval = _training_memory(model, data, train_idx, config)

    if noise.center and noise.text_mean is None:
        noise.text_mean = data.mean_normalized(train_idx).tolist()

    n_train = len(train_idx)
    steps_per_epoch = math.ceil(n_train / config.batch_size)
    total = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    peak = config.lr if config.lr is not None else (5e-4 if model.config.lm == "scratch" else 2e-5)
    warmup = config.warmup_steps if config.warmup_steps is not None else min(5000, int(0.05 * total))
    eval_every = config.eval_every or steps_per_epoch
    save_every = config.save_every or steps_per_epoch

    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], lr=peak,
                               weight_decay=config.weight_decay, device=device)
    if opt_state is not None:
        optimizer.load_state_dict(opt_state["optimizer"])
    autocast, scaler = _autocast(device, config.amp)
    if scaler is not None and opt_state is not None and opt_state.get("scaler"):
        scaler.load_state_dict(opt_state["scaler"])
    step_model = _wrap(model, device, dist_info, compile_=config.compile)

    emb_train_w = data.sample_weights[train_idx] if data.sample_weights is not None else None
    log = _MetricsLog(out_dir, state["step"] if resume else 0, write=dist_info.is_main)
    save_kw = dict(encoder_spec=data.encoder_spec, encoder_identity=data.encoder_identity, noise=noise,
                   train=config.to_dict(), inference=inference,
                   extra={"data": {"stores": data.sources, "modality": data.modality, "mix_weights": mix_weights,
                                   "count": len(data), "train": n_train, "val": len(val_idx)},
                          "init_from": str(init_from) if init_from else None})
    step_kw = dict(model=step_model, optimizer=optimizer, scaler=scaler, autocast=autocast, data=data, noise=noise,
                   config=config, device=device, dist_info=dist_info, retrieval=retrieval, train_idx=train_idx)

    step = state["step"]
    last_loss = state.get("train_loss")
    val_loss = state.get("val_loss")
    # the running loss stays on the device: reading it back syncs with the device, done at log/save steps only
    run_loss, run_n, run_tokens, t_log = torch.zeros((), device=device), 0, 0, time.time()
    order_epoch, order = -1, None
    # A heap trim makes the next step fault its freed pages back in (measured: toy demo training 27 s ->
    # 43 s over 120 steps when trimming every step), so only a large corpus, whose memory bound is the
    # point (benchmarks/scale.py), trims every step; others trim now and then to cap the creep.
    trim_every = 1 if len(data) >= TRIM_EVERY_STEP_ROWS else 100
    bar = progress(total=total, initial=step, desc="train", show=show_progress)
    t_seg = time.time()  # wall time since the last save, accumulated into state["seconds"]
    try:
        while step < total:
            epoch, within = divmod(step, steps_per_epoch)
            if epoch != order_epoch:
                order = train_idx[epoch_order(n_train, epoch, config.seed, emb_train_w)]
                if config.length_buckets:
                    order = bucket_batches(order, data.token_counts(order, model.config.max_length),
                                           config.batch_size, seed=config.seed, epoch=epoch)
                order_epoch = epoch
            idx = order[within * config.batch_size : (within + 1) * config.batch_size]
            lr = lr_at(step, peak=peak, warmup=warmup, total=total, schedule=config.schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss, n_tokens = _train_step(idx=idx, step=step, **step_kw)
            if step % trim_every == 0:  # batches change shape every step: keep the heap from growing
                release_freed_memory()
            step += 1
            run_loss += loss
            run_n += 1
            run_tokens += n_tokens
            bar.update(1)
            row: dict[str, Any] = {}
            is_log = step % config.log_every == 0 or step == total
            is_save = step % save_every == 0 or step == total
            is_eval = len(val_idx) > 0 and (step % eval_every == 0 or step == total)
            if is_log or is_save or is_eval:  # the only points where the host waits for the device
                # the mean loss of the global batches since the last log row (a copy: the sum keeps running)
                mean = float(distributed.all_reduce_sum(run_loss.clone())) / run_n
                if not math.isfinite(mean):
                    raise TrainingError(
                        f"the training loss became {mean} between steps {step - run_n + 1} and {step}; stopped. "
                        f"The last good checkpoint (step {state['step']}) is kept at {out_dir}. Try a lower --lr "
                        "or --grad-clip.")
                last_loss = mean
                bar.set_postfix(loss=f"{mean:.3f}", lr=f"{lr:.2e}")
            if is_log:
                elapsed = max(time.time() - t_log, 1e-9)
                row.update(step=step, epoch=step / steps_per_epoch, train_loss=last_loss, lr=lr,
                           samples_per_s=run_n * config.batch_size / elapsed, tokens_per_s=run_tokens / elapsed)
                run_loss, run_n, run_tokens, t_log = torch.zeros((), device=device), 0, 0, time.time()
            if is_eval:
                val_loss = evaluate_loss(model, val_data, val_idx, noise, config, device, retrieval=retrieval,
                                         autocast=autocast, dist_info=dist_info)
                row.update(step=step, epoch=step / steps_per_epoch, val_loss=val_loss)
                logger.info("step %d: train loss %.4f, val loss %.4f", step, last_loss, val_loss)
                # val_loss is summed over ranks: every rank takes the same decision, rank 0 writes
                if config.keep_best and val_loss < state.get("best_val_loss", math.inf):
                    state["best_val_loss"], state["best_step"] = val_loss, step
                    if dist_info.is_main:
                        save_checkpoint(sibling(out_dir, "best"), model,
                                        files={"metrics.jsonl": log.text() + json.dumps(row) + "\n"}, memory=memory,
                                        **{**save_kw, "extra": {**save_kw["extra"], "step": step,
                                                                "val_loss": val_loss}})
                        logger.info("best validation loss so far: kept as %s", sibling(out_dir, "best"))
            if row:
                log.write(row)
            if config.keep_epochs and step % steps_per_epoch == 0 and dist_info.is_main:
                epoch_dir = sibling(out_dir, f"epoch{step // steps_per_epoch:03d}")
                save_checkpoint(epoch_dir, model, files={"metrics.jsonl": log.text()}, memory=memory,
                                **{**save_kw, "extra": {**save_kw["extra"], "step": step, "val_loss": val_loss}})
            if is_save:
                best = {k: state[k] for k in ("best_val_loss", "best_step") if k in state}
                state = {"step": step, "total_steps": total, "train_loss": last_loss, "val_loss": val_loss,
                         "peak_lr": peak, "warmup_steps": warmup, "world_size": dist_info.world_size, **best,
                         "seconds": state.get("seconds", 0.0) + time.time() - t_seg}
                t_seg = time.time()
                if dist_info.is_main:
                    save_checkpoint(out_dir, model, training_state=state,
                                    optimizer_state={"optimizer": optimizer.state_dict(),
                                                     "scaler": scaler.state_dict() if scaler else None},
                                    files={"metrics.jsonl": log.text()}, memory=memory, **save_kw)
                    log.live = True
                distributed.barrier()  # nobody runs ahead of a checkpoint that is not written yet
    finally:
        bar.close()
    return TrainResult(path=out_dir, steps=step, train_loss=last_loss, val_loss=val_loss, seconds=time.time() - t0)


def sibling(out_dir: Path, tag: str) -> Path:
    """Where a kept copy of the run in ``out_dir`` goes: ``OUT-best``, ``OUT-epoch003`` beside it."""
    return out_dir.with_name(f"{out_dir.name}-{tag}")


def _shared_tokenizer(model_config: ModelConfig, data: TextData, train_idx: torch.Tensor):
    """A from-scratch LM's tokenizer, trained on the training captions (streamed from the stores).

    Under torchrun rank 0 trains it and the others receive it, so every rank tokenises identically.
    None for a pretrained LM (its own tokenizer is loaded).
    """
    if model_config.lm != "scratch":
        return None
    from capdec.model.lm import tokenizer_from_json, train_tokenizer

    d = distributed.info()
    tok = train_tokenizer(CaptionStream(data, train_idx), vocab_size=model_config.vocab_size,
                          lowercase=model_config.lowercase) if d.is_main else None
    if not d.enabled:
        return tok
    text = distributed.broadcast_object(tok.backend_tokenizer.to_str() if tok is not None else None)
    return tok if tok is not None else tokenizer_from_json(text)


def _training_memory(model: CapDecModel, data: TextData, train_idx: torch.Tensor, config: TrainConfig):
    """The training captions' text memory (retrieval in training, and/or saved for --project at caption time)."""
    from capdec.memory import AUTO_IVF_MIN_ROWS, MemoryConfig, TextMemory, faiss_available
    from capdec.retrieval import RetrievalContext

    # a large memory is searched through faiss's inverted-file index (approximate, sub-linear)
    big = len(train_idx) >= AUTO_IVF_MIN_ROWS and faiss_available()
    memory = TextMemory(data.gather(train_idx, normalized=True), None, data.encoder_identity,
                        config=MemoryConfig(index="ivf") if big else None, validate=False,
                        caption_loader=lambda: list(data.iter_captions(train_idx)))  # read only if used (entities, saving)
    retrieval = RetrievalContext(memory, model) if model.config.retrieval_k else None
    return memory, retrieval


def _wrap(model: CapDecModel, device: torch.device, dist_info: distributed.DistInfo, *, compile_: bool):
    """The module the training step calls: DDP across ranks (when launched so), compiled if asked."""
    wrapped: torch.nn.Module = model
    if dist_info.enabled:
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if compile_:
        wrapped = torch.compile(wrapped)
    return wrapped


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device; on CUDA through pinned memory without blocking the host."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _train_step(*, model, optimizer, scaler, autocast, data: TextData, idx: torch.Tensor, noise: NoiseConfig,
                config: TrainConfig, step: int, device: torch.device, dist_info: distributed.DistInfo,
                retrieval=None, train_idx: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """One optimiser step on the global batch ``idx``; returns (its mean loss on the device, its tokens).

    Every rank draws the noise of the whole global batch (so a sample's noise does not depend on the
    number of ranks) and keeps its own slice. The loss is the sum over this rank's tokens divided by
    the global batch's token count (known on every rank from the token cache, no communication), so
    the ranks' gradients add up to the single-process gradient; DDP averages gradients over ranks,
    hence the factor ``world_size``.
    """
    counts = data.token_counts(idx, _max_length(model))
    n_tokens = int(counts.sum())
    emb = data.embeddings_at(idx).to(device=device, dtype=torch.float32)
    gen = torch.Generator(device=device).manual_seed(step_seed(config.seed, step, stream=3))
    emb = add_noise(emb, noise, generator=gen)
    mine = distributed.shard_rows(len(idx), dist_info.rank, dist_info.world_size)
    local = idx[mine]
    empty = len(local) == 0  # a short last batch can leave a rank without rows: it still joins the step
    if empty:
        local, mine = idx[:1], slice(0, 1)
    emb = emb[mine]
    ids, mask = data.tokens_at(local, max_length=_max_length(model), eos=_core(model).eos_token_id,
                               pad=_core(model).pad_token_id)
    ids, mask = _to_device(ids, device), _to_device(mask, device)
    # retrieval uses the noised query (as an image would be) and never returns the caption itself
    extra = retrieval(emb, exclude=torch.searchsorted(train_idx, local)) if retrieval is not None else {}
    torch.manual_seed(step_seed(config.seed, step, stream=4) + dist_info.rank)  # dropout
    with autocast:
        loss_sum = model(emb, ids, mask, reduction="sum", **extra)
    loss = loss_sum * (0.0 if empty else dist_info.world_size / n_tokens)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if config.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(_core(model).parameters(), config.grad_clip, foreach=True)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return loss.detach() / dist_info.world_size, n_tokens


def _core(model: torch.nn.Module) -> CapDecModel:
    """The CapDecModel inside DDP / torch.compile wrappers."""
    while not isinstance(model, CapDecModel):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def _max_length(model: torch.nn.Module) -> int:
    return _core(model).config.max_length


@torch.no_grad()
def evaluate_loss(model: CapDecModel, data: TextData, idx: torch.Tensor, noise: NoiseConfig, config: TrainConfig,
                  device: torch.device, *, retrieval=None, autocast=None,
                  dist_info: distributed.DistInfo | None = None) -> float:
    """Mean caption loss from *clean* embeddings (the noise-free text embedding, as an image would be).

    Under torchrun each rank scores a slice of every batch and the sums are added up.
    """
    dist_info = dist_info or distributed.DistInfo()
    autocast = autocast or contextlib.nullcontext()
    was_training = model.training
    model.eval()
    clean = NoiseConfig(**{**noise.to_dict(), "variance": 0.0})
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (loss sum, tokens)
    for start in range(0, len(idx), config.batch_size):
        b = idx[start : start + config.batch_size]
        b = b[distributed.shard_rows(len(b), dist_info.rank, dist_info.world_size)]
        if len(b) == 0:
            continue
        ids, mask = data.tokens_at(b, max_length=model.config.max_length, eos=model.eos_token_id,
                                   pad=model.pad_token_id)
        ids, mask = _to_device(ids, device), _to_device(mask, device)
        emb = add_noise(data.embeddings_at(b).to(device=device, dtype=torch.float32), clean)
        extra = retrieval(emb) if retrieval is not None else {}
        with autocast:
            total[0] += model(emb, ids, mask, reduction="sum", **extra).double()
        total[1] += mask.sum()
    model.train(was_training)
    loss_sum, count = distributed.all_reduce_sum(total).tolist()
    return loss_sum / max(1.0, count)


class _MetricsLog:
    """``metrics.jsonl`` inside the checkpoint: appended live, copied into every saved checkpoint."""

    def __init__(self, out_dir: Path, resume_step: int, *, write: bool = True):
        self.path = out_dir / "metrics.jsonl"
        self.live = bool(resume_step)  # append to the file only once it belongs to this run
        self.enabled = write  # False on every rank but 0
        self.rows: list[str] = []
        if resume_step and self.path.exists():  # keep the rows up to the step we resume from
            self.rows = [json.dumps(r) for r in read_jsonl(self.path) if r.get("step", 0) <= resume_step]

    def write(self, row: dict[str, Any]) -> None:
        line = json.dumps(row)
        self.rows.append(line)
        if self.live and self.enabled:
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
