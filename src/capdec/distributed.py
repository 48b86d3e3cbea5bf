"""Several processes, one job: torchrun / torch.distributed helpers for training and embedding.

capdec never starts processes itself: ``torchrun --nproc_per_node N -m capdec train ...`` (or
``... embed``) starts N copies and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and the rendezvous
address) in each one's environment. :func:`init` reads them, picks the device (``cuda:LOCAL_RANK``
on a GPU machine) and joins the process group (NCCL on GPUs, gloo on CPU). Without those variables
everything here is a no-op for a single process, so library code calls these helpers unconditionally.

Conventions (what makes N ranks compute what one process would):
- every rank draws the *same* global batch (same seed, same order) and takes the disjoint slice
  :func:`shard_rows` of it;
- losses are sums over tokens divided by the *global* token count, so gradients add up across ranks
  (see :func:`capdec.train` for the factor DDP's gradient averaging needs);
- rank 0 alone writes files and shows progress.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from capdec.errors import InputError

logger = logging.getLogger(__name__)

# long enough for the slowest rank to catch up at a barrier (an embedding shard, a checkpoint save)
DEFAULT_TIMEOUT_MINUTES = 60


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the job (rank 0 of 1 when not launched by torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """True inside a process started by torchrun (or anything that sets WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def info() -> DistInfo:
    """This process's rank, world size and local rank (from the process group, else the environment)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return DistInfo(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                    int(os.environ.get("LOCAL_RANK", "0")))


def device_for(requested: str | torch.device | None = "auto") -> torch.device:
    """The device this rank should use: ``cuda:LOCAL_RANK`` for ``auto``/``cuda`` under torchrun.

    An explicit ``cuda:K`` is refused under torchrun: every rank would pile onto one GPU.
    """
    requested = "auto" if requested is None else str(requested)
    if not launched():
        from capdec.encoders.base import resolve_device

        return resolve_device(requested)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if requested in ("auto", "cuda"):
        if torch.cuda.is_available():
            if local >= torch.cuda.device_count():
                raise InputError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPUs are visible; "
                                 f"start at most {torch.cuda.device_count()} processes per node")
            torch.cuda.set_device(local)
            return torch.device("cuda", local)
        if requested == "cuda":
            raise InputError("--device cuda but no GPU is visible")
        return torch.device("cpu")
    if requested == "cpu":
        return torch.device("cpu")
    raise InputError(f"--device {requested} under torchrun: use auto/cuda (each rank takes cuda:LOCAL_RANK) "
                     "or cpu; pick GPUs with CUDA_VISIBLE_DEVICES")


def init(device: torch.device) -> DistInfo:
    """Join the process group when launched by torchrun (idempotent); returns this rank's place."""
    if not launched():
        return DistInfo()
    if not dist.is_available():
        raise InputError("this PyTorch build has no torch.distributed; run a single process")
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        minutes = float(os.environ.get("CAPDEC_DIST_TIMEOUT_MINUTES", DEFAULT_TIMEOUT_MINUTES))
        kwargs: dict[str, Any] = {"backend": backend, "timeout": datetime.timedelta(minutes=minutes)}
        if device.type == "cuda":
            kwargs["device_id"] = device  # binds NCCL to this rank's GPU (no guessing at the first collective)
        dist.init_process_group(**kwargs)
        d = info()
        logger.info("joined the process group: rank %d of %d (local rank %d, %s on %s)", d.rank, d.world_size,
                    d.local_rank, backend, device)
    return info()


def shutdown() -> None:
    """Leave the process group (call once, at the end of the command)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` as rank ``src`` has it, on every rank (small picklable values: lists, dicts, numbers)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks (in place on ``t``, returned for chaining).

    NCCL reduces GPU tensors only: a CPU tensor makes a round trip through this rank's GPU.
    """
    if dist.is_available() and dist.is_initialized():
        if t.device.type == "cpu" and dist.get_backend() == "nccl":
            on_gpu = t.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM)
            t.copy_(on_gpu)
        else:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def check_batch(batch_size: int, world_size: int) -> None:
    """A global batch must split evenly across ranks, else ranks would do unequal, unmatched work."""
    if batch_size % world_size:
        lo = batch_size - batch_size % world_size
        raise InputError(f"--batch-size {batch_size} is the global batch and cannot be split evenly over "
                         f"{world_size} processes; use a multiple of {world_size} (e.g. {lo or world_size} or "
                         f"{lo + world_size})")


def shard_rows(n: int, rank: int, world_size: int) -> slice:
    """Contiguous slice of ``n`` rows taken by ``rank`` (the first ``n % world_size`` ranks take one more).

    Training batches are checked to split evenly (:func:`check_batch`); the last, short batch of an
    epoch and validation batches may not, hence the general rule.
    """
    base, extra = divmod(n, world_size)
    lo = rank * base + min(rank, extra)
    return slice(lo, lo + base + (1 if rank < extra else 0))


__all__ = ["DistInfo", "all_reduce_sum", "barrier", "broadcast_object", "check_batch", "device_for", "info",
           "init", "launched", "shard_rows", "shutdown"]
