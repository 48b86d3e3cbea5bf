"""How benchmarks measure resident memory (the run itself is recorded by :mod:`run_record`).

Peak memory is the kernel's own high-water mark (``VmHWM``), which :func:`reset_peak` restarts between
phases, and :class:`MemorySampler` follows anonymous vs file-backed memory of this process and the private
memory of its worker processes; :func:`check_targets` records each target met or missed.
"""

from __future__ import annotations

import os
import resource
import threading
from typing import Any


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (or since :func:`reset_peak`), in MiB."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def rss_mb() -> float:
    """Resident memory of this process now, in MiB."""
    return _status_kb("self", ("VmRSS",))["VmRSS"]


def reset_peak() -> bool:
    """Start a new peak-memory measurement (Linux: ``5`` to ``/proc/self/clear_refs``); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_kb(pid: str | int, keys: tuple[str, ...]) -> dict[str, float]:
    out = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            key = line.split(":")[0]
            if key in keys:
                out[key] = int(line.split()[1]) / 1024
    return out


def _private_mb(pid: str) -> float:
    """Memory only this process holds (shared pages of a forked parent left out)."""
    with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
        return sum(int(line.split()[1]) for line in f if line.startswith(("Private_Clean:", "Private_Dirty:"))) / 1024


def _children() -> list[str]:
    kids: list[str] = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children", encoding="ascii") as f:
                kids += f.read().split()
        except OSError:
            pass
    return kids


class MemorySampler:
    """Samples (every ``every`` s, in a thread) this process's anonymous and file-backed resident memory
    and the resident and private memory of each child process (DataLoader workers).

    File-backed pages (memory-mapped stores and token caches) are shared and reclaimable; anonymous
    memory is what the process itself holds. Both count in RSS.
    """

    def __init__(self, every: float = 0.2):
        self.every = every
        self.peak = {"RssAnon": 0.0, "RssFile": 0.0, "child_rss_max": 0.0, "child_private_max": 0.0,
                     "children_private_sum": 0.0, "children_seen": 0}
        self._seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        for key, mb in _status_kb("self", ("RssAnon", "RssFile")).items():
            self.peak[key] = max(self.peak[key], mb)
        total = 0.0
        for pid in _children():
            try:
                rss, private = _status_kb(pid, ("VmRSS",)).get("VmRSS", 0.0), _private_mb(pid)
            except OSError:  # it just exited
                continue
            self._seen.add(pid)
            self.peak["child_rss_max"] = max(self.peak["child_rss_max"], rss)
            self.peak["child_private_max"] = max(self.peak["child_private_max"], private)
            total += private
        self.peak["children_private_sum"] = max(self.peak["children_private_sum"], total)
        self.peak["children_seen"] = len(self._seen)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._sample()
            except OSError:
                return
            self._stop.wait(self.every)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def check_targets(result: dict[str, Any], targets: dict[str, tuple[float | None, float]]) -> list[str]:
    """Record ``{name: (value, limit)}`` (value must be below limit) in ``result["targets"]``; return the misses."""
    missed = []
    result["targets"] = {}
    for name, (value, limit) in targets.items():
        met = value is not None and value < limit
        result["targets"][name] = {"value": value, "limit": limit, "met": met}
        if not met:
            missed.append(f"{name}: {value} (limit {limit})")
    return missed
