"""The training schedule: pure functions of the options, the data size and the step (no model, no device).

- which captions a step sees: :func:`split_indices` (train / validation), :func:`epoch_order`,
  :func:`bucket_batches`, all seeded through :func:`step_seed`;
- the learning rate: :func:`lr_at`, and the defaults that depend on other choices (:func:`default_lr`,
  :func:`default_warmup`);
- a run's derived numbers, :class:`Schedule` (:func:`derive_schedule`): steps per epoch, total steps, peak
  learning rate, warm-up, and the eval / save cadence. The planner (:mod:`capdec.train.plan`) fills them in
  once; the loop only reads them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from capdec.configs import TrainConfig


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


def default_lr(lm: str) -> float:
    """The peak learning rate when none is given: CapDec's 2e-5 for a pretrained LM, 5e-4 from scratch."""
    return 5e-4 if lm == "scratch" else 2e-5


def default_warmup(total: int) -> int:
    """Warm-up steps when none are given: 5% of the run, at most 5000."""
    return min(5000, int(0.05 * total))


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


def val_sample(n: int, config: TrainConfig) -> torch.Tensor:
    """The validation rows drawn from a separate validation store of ``n`` captions (at most ``val_max``)."""
    g = torch.Generator().manual_seed(step_seed(config.seed, 0, stream=5))
    return torch.randperm(n, generator=g)[: min(config.val_max, n)].sort().values


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


@dataclass(frozen=True)
class Schedule:
    """A run's derived numbers (each from its option when given, else from the rules below)."""

    steps_per_epoch: int  # ceil(training captions / batch size)
    total_steps: int  # steps_per_epoch x epochs, or max_steps when smaller
    peak_lr: float  # lr, else default_lr(lm); a resumed run keeps the one it started with
    warmup_steps: int  # warmup_steps, else default_warmup(total); a resumed run keeps its own
    eval_every: int  # eval_every, else once per epoch
    save_every: int  # save_every, else once per epoch

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def derive_schedule(config: TrainConfig, *, n_train: int, lm: str,
                    recorded: dict[str, Any] | None = None) -> tuple[Schedule, dict[str, str]]:
    """The :class:`Schedule` of a run on ``n_train`` captions, and for each value derived here why.

    ``recorded``: a resumed run's training state (``state.json``). Its peak learning rate and warm-up stay
    as they were unless ``config`` gives them, so extending a run moves only where the decay ends.
    """
    recorded = recorded or {}
    steps_per_epoch = math.ceil(n_train / config.batch_size)
    total = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    why: dict[str, str] = {}
    peak, warmup = config.lr, config.warmup_steps
    if peak is None:
        peak, why["peak_lr"] = ((recorded["peak_lr"], "checkpoint") if "peak_lr" in recorded else
                                (default_lr(lm), f"derived: default for lm {lm!r}"))
    if warmup is None:
        warmup, why["warmup_steps"] = ((recorded["warmup_steps"], "checkpoint") if "warmup_steps" in recorded else
                                       (default_warmup(total), "derived: 5% of the steps, at most 5000"))
    eval_every, save_every = config.eval_every or steps_per_epoch, config.save_every or steps_per_epoch
    why.update({k: "derived: once per epoch" for k, v in (("eval_every", config.eval_every),
                                                          ("save_every", config.save_every)) if v is None})
    why["steps_per_epoch"] = "derived: training captions / batch size"
    why["total_steps"] = "derived: " + ("max_steps" if total == config.max_steps else "epochs x steps per epoch")
    return Schedule(steps_per_epoch=steps_per_epoch, total_steps=total, peak_lr=float(peak),
                    warmup_steps=int(warmup), eval_every=eval_every, save_every=save_every), why
