"""The training loop: carries out a :class:`~capdec.train.plan.TrainPlan`, step by step, with its saves.

Each step takes a batch of caption embeddings, perturbs them with ``capdec.noise.add_noise`` and
teaches the decoder to reproduce the captions. Everything random in a step (batch order, noise,
dropout) is seeded by ``(seed, step)``, so a resumed run continues to exactly the result of an
uninterrupted one. Nothing is decided here: every option and derived value is the plan's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from capdec import distributed
from capdec.artifacts import read_jsonl
from capdec.checkpoint import load_checkpoint, save_checkpoint
from capdec.configs import TrainConfig
from capdec.errors import InputError, TrainingError
from capdec.model import CapDecModel, build_model
from capdec.noise import NoiseConfig, add_noise, normalize
from capdec.output import clean_stale
from capdec.textdata import CaptionTexts, TextData
from capdec.train.plan import TrainPlan, plan_training
from capdec.train.schedule import bucket_batches, epoch_order, lr_at, step_seed
from capdec.utils import cpu_has_bf16, progress, release_freed_memory

logger = logging.getLogger(__name__)

# corpora at least this large release freed heap memory after every training step
TRIM_EVERY_STEP_ROWS = 1_000_000


@dataclass
class TrainResult:
    path: Path
    steps: int
    train_loss: float | None
    val_loss: float | None
    seconds: float


def train(stores: list[Any] | Any, out_dir: str | os.PathLike, *, show_progress: bool | None = None,
          **plan_args: Any) -> TrainResult:
    """Train a CapDec decoder on caption embeddings; returns where the checkpoint is.

    Two steps: :func:`~capdec.train.plan_training` decides everything from ``stores``, ``out_dir`` and
    ``plan_args`` (``model_config``, ``noise``, ``config``, ``inference``, ``options``, ``recipe``,
    ``noise_file``, ``init_from``, ``resume``, ``mix_weights``, ``overwrite``, ...: see its docstring) and
    :func:`run_training` carries the plan out.

    Under ``torchrun`` each process trains a slice of every (global) batch with DistributedDataParallel;
    the result is the single-process run's (see :mod:`capdec.distributed`). Rank 0 writes the checkpoint.
    """
    return run_training(plan_training(stores, out_dir, **plan_args), show_progress=show_progress)


def run_training(plan: TrainPlan, *, show_progress: bool | None = None) -> TrainResult:
    """Carry out a :class:`TrainPlan`: build or load the model, then the training loop with its saves."""
    device = distributed.device_for(plan.config.device)
    dist_info = distributed.init(device)
    if not dist_info.is_main:
        show_progress = False
    else:  # what a save killed mid-write left beside --out (a whole checkpoint's size) goes before this run's
        clean_stale(plan.out_dir)
    torch.manual_seed(plan.config.seed)
    model = _start_model(plan).to(device).train()
    _attach_tokens(plan, model, dist_info, show_progress)
    memory, retrieval = None, None
    if model.config.retrieval_k or model.config.entity_prompt or plan.config.save_memory:
        memory, retrieval = _training_memory(model, plan.data, plan.split.train_idx, plan.out_dir, dist_info,
                                             show_progress)
    result = _Run(plan, model, device, dist_info, memory=memory, retrieval=retrieval).until_done(show_progress)
    if memory is not None and dist_info.is_main:
        shutil.rmtree(memory.store_path, ignore_errors=True)  # the checkpoints keep their own links to its files
    return result


def _start_model(plan: TrainPlan) -> CapDecModel:
    """The model the plan starts from: resumed, fine-tuned from a checkpoint, or new."""
    if plan.mode == "resume":
        return load_checkpoint(plan.out_dir, device="cpu").model
    if plan.mode == "init_from":
        return load_checkpoint(plan.init_from, device="cpu").model  # its architecture: checked by the plan
    config = replace(plan.model_config)
    return build_model(config, tokenizer=_shared_tokenizer(config, plan.data, plan.split.train_idx))


def _attach_tokens(plan: TrainPlan, model: CapDecModel, dist_info: distributed.DistInfo,
                   show_progress: bool | None) -> None:
    """Token ids: a cache beside each store, built once per (store, tokenizer) by one process per node."""
    data, val_data = plan.data, plan.split.val_data
    for d in (data,) if val_data is data else (data, val_data):
        if dist_info.local_rank == 0:
            d.attach_tokenizer(model.tokenizer, show_progress=show_progress)
        distributed.barrier()
        if dist_info.local_rank != 0:
            d.attach_tokenizer(model.tokenizer, build=False)
    cut = data.count_cut(plan.split.train_idx, model.config.max_length)
    if cut:
        logger.info("%d training captions are longer than %d tokens and will be cut", cut, model.config.max_length)


class _Run:
    """A run in progress: the model, its optimiser, and the bookkeeping between logs and saves."""

    def __init__(self, plan: TrainPlan, model: CapDecModel, device: torch.device, dist_info: distributed.DistInfo,
                 *, memory: Any, retrieval: Any):
        self.plan, self.model, self.device, self.dist = plan, model, device, dist_info
        self.memory, self.retrieval = memory, retrieval
        self.optimizer, self.autocast, self.scaler = _optimizer(plan, model, device)
        self.log = _MetricsLog(plan.out_dir, plan.state["step"] if plan.mode == "resume" else 0,
                               write=dist_info.is_main)
        self.state = plan.state
        self.step = plan.state["step"]
        self.last_loss, self.val_loss = plan.state.get("train_loss"), plan.state.get("val_loss")
        data, split = plan.data, plan.split
        self.step_kw = dict(model=_wrap(model, device, dist_info, compile_=plan.config.compile),
                            optimizer=self.optimizer, scaler=self.scaler, autocast=self.autocast, data=data,
                            noise=plan.noise, config=plan.config, device=device, dist_info=dist_info,
                            retrieval=retrieval, train_idx=split.train_idx)
        self.save_kw = dict(encoder_spec=data.encoder_spec, encoder_identity=data.encoder_identity, noise=plan.noise,
                            train=plan.config.to_dict(), inference=plan.inference,
                            extra={"data": {"stores": data.sources, "modality": data.modality,
                                            "mix_weights": plan.mix_weights, "count": len(data),
                                            "train": len(split.train_idx), "val": len(split.val_idx)},
                                   "init_from": plan.lineage})
        self.weights = data.sample_weights[split.train_idx] if data.sample_weights is not None else None
        self.order_epoch, self.order = -1, None
        # A heap trim makes the next step fault its freed pages back in (measured: toy demo training 27 s ->
        # 43 s over 120 steps when trimming every step), so only a large corpus, whose memory bound is the
        # point (benchmarks/scale.py), trims every step; others trim now and then to cap the creep.
        self.trim_every = 1 if len(data) >= TRIM_EVERY_STEP_ROWS else 100
        self._reset_running()

    def _reset_running(self) -> None:
        # the running loss stays on the device: reading it back syncs with the device, done at log/save steps only
        self.run_loss, self.run_n, self.run_tokens, self.t_log = torch.zeros((), device=self.device), 0, 0, time.time()

    def until_done(self, show_progress: bool | None) -> TrainResult:
        total = self.plan.schedule.total_steps
        bar = progress(total=total, initial=self.step, desc="train", show=show_progress)
        self.t_seg = time.time()  # wall time since the last save, accumulated into state["seconds"]
        try:
            while self.step < total:
                lr = self._one_step()
                bar.update(1)
                self._after_step(lr, bar)
        finally:
            bar.close()
        return TrainResult(path=self.plan.out_dir, steps=self.step, train_loss=self.last_loss, val_loss=self.val_loss,
                           seconds=time.time() - self.plan.started)

    def _batch(self) -> torch.Tensor:
        """The global batch of this step: the epoch's (seeded) order, cut into batches."""
        config, data, spe = self.plan.config, self.plan.data, self.plan.schedule.steps_per_epoch
        epoch, within = divmod(self.step, spe)
        if epoch != self.order_epoch:
            train_idx = self.plan.split.train_idx
            self.order = train_idx[epoch_order(len(train_idx), epoch, config.seed, self.weights)]
            if config.length_buckets:
                self.order = bucket_batches(self.order, data.token_counts(self.order, self.model.config.max_length),
                                            config.batch_size, seed=config.seed, epoch=epoch)
            self.order_epoch = epoch
        return self.order[within * config.batch_size : (within + 1) * config.batch_size]

    def _one_step(self) -> float:
        sched, config = self.plan.schedule, self.plan.config
        idx = self._batch()
        lr = lr_at(self.step, peak=sched.peak_lr, warmup=sched.warmup_steps, total=sched.total_steps,
                   schedule=config.schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss, n_tokens = _train_step(idx=idx, step=self.step, **self.step_kw)
        if self.step % self.trim_every == 0:  # batches change shape every step: keep the heap from growing
            release_freed_memory()
        self.step += 1
        self.run_loss += loss
        self.run_n += 1
        self.run_tokens += n_tokens
        return lr

    def _after_step(self, lr: float, bar: Any) -> None:
        """Log, validate, keep copies and save as the plan's cadence says."""
        config, sched, step = self.plan.config, self.plan.schedule, self.step
        row: dict[str, Any] = {}
        is_log = step % config.log_every == 0 or step == sched.total_steps
        is_save = step % sched.save_every == 0 or step == sched.total_steps
        is_eval = len(self.plan.split.val_idx) > 0 and (step % sched.eval_every == 0 or step == sched.total_steps)
        if is_log or is_save or is_eval:  # the only points where the host waits for the device
            self._read_loss()
            bar.set_postfix(loss=f"{self.last_loss:.3f}", lr=f"{lr:.2e}")
        if is_log:
            elapsed = max(time.time() - self.t_log, 1e-9)
            row.update(step=step, epoch=step / sched.steps_per_epoch, train_loss=self.last_loss, lr=lr,
                       samples_per_s=self.run_n * config.batch_size / elapsed, tokens_per_s=self.run_tokens / elapsed)
            self._reset_running()
        if is_eval:
            self._validate(row)
        if row:
            self.log.write(row)
        if config.keep_epochs and step % sched.steps_per_epoch == 0 and self.dist.is_main:
            self._keep(f"epoch{step // sched.steps_per_epoch:03d}", self.log.text())
        if is_save:
            self._save()

    def _read_loss(self) -> None:
        """The mean loss of the global batches since the last log row (a copy: the sum keeps running)."""
        mean = float(distributed.all_reduce_sum(self.run_loss.clone())) / self.run_n
        if not math.isfinite(mean):
            raise TrainingError(
                f"the training loss became {mean} between steps {self.step - self.run_n + 1} and {self.step}; "
                f"stopped. The last good checkpoint (step {self.state['step']}) is kept at {self.plan.out_dir}. "
                "Try a lower --lr or --grad-clip.")
        self.last_loss = mean

    def _validate(self, row: dict[str, Any]) -> None:
        plan, step = self.plan, self.step
        self.val_loss = evaluate_loss(self.model, plan.split.val_data, plan.split.val_idx, plan.noise, plan.config,
                                      self.device, retrieval=self.retrieval, autocast=self.autocast,
                                      dist_info=self.dist)
        row.update(step=step, epoch=step / plan.schedule.steps_per_epoch, val_loss=self.val_loss)
        logger.info("step %d: train loss %.4f, val loss %.4f", step, self.last_loss, self.val_loss)
        # val_loss is summed over ranks: every rank takes the same decision, rank 0 writes
        if plan.config.keep_best and self.val_loss < self.state.get("best_val_loss", math.inf):
            self.state["best_val_loss"], self.state["best_step"] = self.val_loss, step
            if self.dist.is_main:
                self._keep("best", self.log.text() + json.dumps(row) + "\n")
                logger.info("best validation loss so far: kept as %s", sibling(plan.out_dir, "best"))

    def _keep(self, tag: str, metrics: str) -> None:
        """A copy of the weights now beside --out (OUT-best, OUT-epoch003), without training state."""
        extra = {**self.save_kw["extra"], "step": self.step, "val_loss": self.val_loss}
        save_checkpoint(sibling(self.plan.out_dir, tag), self.model, files={"metrics.jsonl": metrics},
                        memory=self.memory, **{**self.save_kw, "extra": extra})

    def _save(self) -> None:
        """The resumable checkpoint in --out, written by rank 0 while the others wait."""
        sched = self.plan.schedule
        best = {k: self.state[k] for k in ("best_val_loss", "best_step") if k in self.state}
        self.state = {"step": self.step, "total_steps": sched.total_steps, "train_loss": self.last_loss,
                      "val_loss": self.val_loss, "peak_lr": sched.peak_lr, "warmup_steps": sched.warmup_steps,
                      "world_size": self.dist.world_size, **best,
                      "seconds": self.state.get("seconds", 0.0) + time.time() - self.t_seg}
        self.t_seg = time.time()
        if self.dist.is_main:
            save_checkpoint(self.plan.out_dir, self.model, training_state=self.state,
                            optimizer_state={"optimizer": self.optimizer.state_dict(),
                                             "scaler": self.scaler.state_dict() if self.scaler else None},
                            files={"metrics.jsonl": self.log.text()}, memory=self.memory, **self.save_kw)
            self.log.live = True
        distributed.barrier()  # nobody runs ahead of a checkpoint that is not written yet


def sibling(out_dir: Path, tag: str) -> Path:
    """Where a kept copy of the run in ``out_dir`` goes: ``OUT-best``, ``OUT-epoch003`` beside it."""
    return out_dir.with_name(f"{out_dir.name}-{tag}")


def _optimizer(plan: TrainPlan, model: CapDecModel, device: torch.device):
    """(AdamW, autocast context, grad scaler): new, or a resumed run's with the weight decay now planned."""
    opt_state = plan.opt_state
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], lr=plan.schedule.peak_lr,
                               weight_decay=plan.config.weight_decay, device=device)
    if opt_state is not None:
        try:
            optimizer.load_state_dict(opt_state["optimizer"])  # restores each group's recorded weight decay too
        except (ValueError, KeyError, TypeError, RuntimeError) as e:  # a state for other parameters, or altered
            raise InputError(f"{plan.out_dir / 'training' / 'optimizer.pt'}: does not fit the model's parameters "
                             f"({type(e).__name__}: {' '.join(str(e).split())[:160]}); the checkpoint is damaged or "
                             "was altered") from e
        optimizer.param_groups[0]["weight_decay"] = plan.config.weight_decay  # matrices; the rest stay at 0
    autocast, scaler = _autocast(device, plan.config.amp)
    if scaler is not None and opt_state is not None and opt_state.get("scaler"):
        scaler.load_state_dict(opt_state["scaler"])
    return optimizer, autocast, scaler


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


def _shared_tokenizer(model_config: Any, data: TextData, train_idx: torch.Tensor):
    """A from-scratch LM's tokenizer, trained on the training captions (streamed from the stores).

    Under torchrun rank 0 trains it and the others receive it, so every rank tokenises identically.
    None for a pretrained LM (its own tokenizer is loaded).
    """
    if model_config.lm != "scratch":
        return None
    from capdec.model.lm import tokenizer_from_json, train_tokenizer

    d = distributed.info()
    tok = train_tokenizer(CaptionTexts(data, train_idx), vocab_size=model_config.vocab_size,
                          lowercase=model_config.lowercase) if d.is_main else None
    if not d.enabled:
        return tok
    text = distributed.broadcast_object(tok.backend_tokenizer.to_str() if tok is not None else None)
    return tok if tok is not None else tokenizer_from_json(text)


def _memory_rows_dir(out_dir: Path) -> Path:
    """Where the training memory's rows are written: a hidden sibling of --out, removed at the end."""
    return out_dir.with_name(f".{out_dir.name}.memory")


def _training_memory(model: CapDecModel, data: TextData, train_idx: torch.Tensor, out_dir: Path,
                     dist_info: distributed.DistInfo, show_progress: bool | None):
    """The training captions' text memory (retrieval in training, and/or saved for --project at caption time).

    It stays off the heap: its rows are written once as an embedding store beside --out (by rank 0, a chunk
    at a time; a resumed run reuses it) and read through a memory map, unmapped as they are read, so a
    5M-caption memory costs no more RAM than a small one. Search is exact below AUTO_IVF_MIN_ROWS rows and
    through a faiss ``ivfpq`` index (32 bytes a row at d=512, candidates re-scored exactly) above, when faiss
    is installed. Each checkpoint links the store's files into its ``memory/``. In a mix of text and image
    stores it holds the text rows only (a memory of caption embeddings, as projection and retrieval expect).
    """
    from capdec.memory import AUTO_IVF_MIN_ROWS, MemoryConfig, TextMemory, faiss_available
    from capdec.retrieval import RetrievalContext

    image = data.image_rows(train_idx)
    rows = train_idx if image is None else train_idx[torch.from_numpy(~image)]
    rows_dir = _memory_rows_dir(out_dir)
    if dist_info.is_main:
        data.write_store(rows, rows_dir, show_progress=show_progress)
    distributed.barrier()
    big = len(rows) >= AUTO_IVF_MIN_ROWS and faiss_available()
    memory = TextMemory.from_store(rows_dir, config=MemoryConfig(index="ivfpq") if big else None)
    retrieval = RetrievalContext(memory, model) if model.config.retrieval_k or model.config.entity_prompt else None
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
    clean = data.embeddings_at(idx).to(device=device, dtype=torch.float32)
    gen = torch.Generator(device=device).manual_seed(step_seed(config.seed, step, stream=3))
    emb = _model_input(data, idx, clean, noise, generator=gen)
    mine = distributed.shard_rows(len(idx), dist_info.rank, dist_info.world_size)
    local = idx[mine]
    empty = len(local) == 0  # a short last batch can leave a rank without rows: it still joins the step
    if empty:
        local, mine = idx[:1], slice(0, 1)
    emb = emb[mine]
    ids, mask = data.tokens_at(local, max_length=_max_length(model), eos=_core(model).eos_token_id,
                               pad=_core(model).pad_token_id)
    ids, mask = _to_device(ids, device), _to_device(mask, device)
    # retrieval uses the noised query (as an image would be; or IFCap's own noise on the clean embedding)
    # and never returns the caption itself; its random draws are made for the global batch, as the noise
    extra = {}
    if retrieval is not None:
        draws = retrieval.training_draws(clean, torch.Generator(device=device).manual_seed(
            step_seed(config.seed, step, stream=6)))
        extra = retrieval(emb, exclude=torch.searchsorted(train_idx, local), **{k: v[mine] for k, v in draws.items()})
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


def _model_input(data: TextData, idx: torch.Tensor, clean: torch.Tensor, noise: NoiseConfig,
                 **kw: Any) -> torch.Tensor:
    """The mapper's input for rows ``idx`` (embeddings ``clean``): :func:`add_noise` (``kw``: its generator or
    ``sample``), except that in a mix of text and image stores the image rows are taken as an image is at
    caption time: normalised, without the noise, the modality offset or centering meant for text."""
    emb = add_noise(clean, noise, **kw)
    image = data.image_rows(idx)
    if image is not None and image.any():
        rows = torch.from_numpy(image).to(emb.device)
        emb = torch.where(rows[:, None], normalize(clean) if noise.normalize else clean, emb)
    return emb


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
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (loss sum, tokens)
    for start in range(0, len(idx), config.batch_size):
        b = idx[start : start + config.batch_size]
        b = b[distributed.shard_rows(len(b), dist_info.rank, dist_info.world_size)]
        if len(b) == 0:
            continue
        ids, mask = data.tokens_at(b, max_length=model.config.max_length, eos=model.eos_token_id,
                                   pad=model.pad_token_id)
        ids, mask = _to_device(ids, device), _to_device(mask, device)
        emb = _model_input(data, b, data.embeddings_at(b).to(device=device, dtype=torch.float32), noise, sample=False)
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
