"""Dynamic batching: images of concurrent requests captioned together, on one worker thread.

A request hands its decoded images to :meth:`DynamicBatcher.submit` and waits on the returned future.
The worker takes the oldest job, then keeps collecting jobs until the batch holds ``max_batch`` images
or ``max_wait_ms`` have passed since the oldest job arrived (or, if it had to queue behind the previous
batch, since that batch ended, so that the callers just answered can join this one). Jobs asking for different decoding options are decoded
in separate groups of the same batch (one ``generate`` call per option set). A job larger than
``max_batch`` runs alone, in chunks. At most ``max_queue`` images wait at any time; beyond that
:meth:`submit` raises :class:`QueueFull` (the server answers 503).

Torch runs only on the worker thread, so the model is never used by two threads at once.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """Too many images are waiting; try again later."""


@dataclass
class _Job:
    images: list[Any]
    decode: dict[str, Any]  # DecodeConfig overrides (the same dict -> the same group)
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)

    @property
    def key(self) -> tuple:
        return tuple(sorted(self.decode.items()))


@dataclass
class BatchStats:
    """Counters since start: how well requests were batched."""

    batches: int = 0  # captioner calls made (one per decoding-option group)
    images: int = 0
    jobs: int = 0
    largest: int = 0  # most images in one batch
    busy_seconds: float = 0.0  # time spent captioning

    def to_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "images": self.images, "requests": self.jobs, "largest_batch": self.largest,
                "mean_batch": round(self.images / self.batches, 3) if self.batches else None,
                "busy_seconds": round(self.busy_seconds, 3)}


class DynamicBatcher:
    """Collects images from concurrent callers into batches for ``captioner.caption``."""

    def __init__(self, captioner: Any, *, max_batch: int = 32, max_wait_ms: float = 10.0, max_queue: int = 256):
        if max_batch < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError("max_batch and max_queue must be ≥ 1, max_wait_ms ≥ 0")
        self.captioner = captioner
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.stats = BatchStats()
        self._jobs: collections.deque[_Job] = collections.deque()
        self._queued_images = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._free_since = 0.0  # monotonic time the last batch ended

    # -- caller side ---------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="capdec-batcher", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the jobs already queued, then stop the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def submit(self, images: list[Any], decode: dict[str, Any] | None = None) -> Future:
        """A future of the captions of ``images`` (RGB PIL images), in order."""
        if not images:
            raise ValueError("no images to caption")
        job = _Job(list(images), dict(decode or {}))
        with self._cond:
            if self._stopping or self._thread is None:
                raise RuntimeError("the batcher is not running")
            if self._queued_images + len(job.images) > self.max_queue:
                raise QueueFull(f"{self._queued_images} images are already waiting (the limit is {self.max_queue})")
            self._jobs.append(job)
            self._queued_images += len(job.images)
            self._cond.notify()
        return job.future

    @property
    def queued(self) -> int:
        """Images waiting for a batch."""
        return self._queued_images

    @property
    def alive(self) -> bool:
        """Whether the worker thread is running."""
        return self._thread is not None and self._thread.is_alive()

    # -- worker side ---------------------------------------------------------------------------------
    def _take(self) -> list[_Job] | None:
        """The next batch of jobs (None: stopping and nothing left)."""
        with self._cond:
            while not self._jobs:
                if self._stopping:
                    return None
                self._cond.wait()
            # wait at most max_wait for the batch to fill, counted from when the oldest job arrived or, when
            # it queued behind the previous batch, from when that batch ended: the callers just answered are
            # then back in time to join (closed-loop clients would otherwise split into alternating halves)
            deadline = max(self._jobs[0].enqueued, self._free_since) + self.max_wait
            batch: list[_Job] = []
            n = 0
            while n < self.max_batch:
                if self._jobs:
                    if batch and n + len(self._jobs[0].images) > self.max_batch:
                        break  # it starts the next batch
                    job = self._jobs.popleft()
                    self._queued_images -= len(job.images)
                    if job.future.set_running_or_notify_cancel():  # False: its caller gave up waiting
                        batch.append(job)
                        n += len(job.images)
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stopping:
                    break
                self._cond.wait(remaining)
            return batch

    def _run(self) -> None:
        while (batch := self._take()) is not None:
            groups: dict[tuple, list[_Job]] = {}
            for job in batch:
                groups.setdefault(job.key, []).append(job)
            for jobs in groups.values():
                self._caption(jobs)
            self._free_since = time.monotonic()

    def _caption(self, jobs: list[_Job]) -> None:
        images = [im for job in jobs for im in job.images]
        t0 = time.perf_counter()
        try:
            captions = self.captioner.caption(images, batch_size=self.max_batch, show_progress=False,
                                              **jobs[0].decode)
        except Exception as e:  # the worker must survive anything a batch does; each caller gets the error
            logger.exception("captioning a batch of %d images failed", len(images))
            for job in jobs:
                job.future.set_exception(e)
            return
        elapsed = time.perf_counter() - t0
        s = self.stats
        s.batches += 1
        s.images += len(images)
        s.jobs += len(jobs)
        s.largest = max(s.largest, len(images))
        s.busy_seconds += elapsed
        logger.debug("captioned %d images from %d requests in %.3fs", len(images), len(jobs), elapsed)
        start = 0
        for job in jobs:
            job.future.set_result(captions[start:start + len(job.images)])
            start += len(job.images)
