"""What every benchmark writes beside its numbers: the command, the machine, the threads and the load.

A number measured on a shared machine means little without the load it ran under, and nothing without
the command that reproduces it. Each benchmark's JSON carries ``"run": run_record(...)`` (filled at the
start, closed by :func:`finish` at the end), so the checked-in outputs (``docs/results/bench/``) say how
they were made::

    record = start(argv, threads=args.threads)
    ...
    result["run"] = finish(record)
"""

from __future__ import annotations

import datetime
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def command_line(argv: list[str] | None) -> str:
    """The shell command that reruns this benchmark from the repository root (thread variables included)."""
    script = Path(sys.argv[0]).resolve()
    try:
        script_text = str(script.relative_to(ROOT))
    except ValueError:
        script_text = str(script)
    args = sys.argv[1:] if argv is None else argv
    env = [f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ]
    return shlex.join([*env, "python", script_text, *args])


def machine() -> dict[str, Any]:
    """CPU model, core count, memory, OS, Python and torch versions (and the GPU, when one is visible)."""
    import torch

    info: dict[str, Any] = {"cpu": _cpu_name(), "cores": os.cpu_count(), "memory_gb": _memory_gb(),
                            "cpu_flags_bf16": _bf16_flags(), "platform": platform.platform(),
                            "python": platform.python_version(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def start(argv: list[str] | None, *, threads: int) -> dict[str, Any]:
    """The record of a run that starts now (``argv``: the benchmark's arguments, None for ``sys.argv``)."""
    return {"command": command_line(argv), "threads": threads,
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": _git_commit(), "machine": machine(),
            "load_average_at_start": _load(), "_t0": time.time()}


def finish(record: dict[str, Any]) -> dict[str, Any]:
    """The record closed: the load average at the end (1, 5, 15 minutes), the wall time and the CPU time
    this process and its children used (wall well above CPU time per thread means the run waited for cores)."""
    out = {k: v for k, v in record.items() if k != "_t0"}
    out["load_average_at_end"] = _load()
    out["wall_seconds"] = round(time.time() - record["_t0"], 1)
    used = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    out["cpu_seconds"] = round(sum(u.ru_utime + u.ru_stime for u in used), 1)
    return out


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() + ("+dirty" if dirty else "")) if out.returncode == 0 else None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor() or platform.machine()


def _bf16_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return sorted(f for f in set(flags) if f in ("avx512_bf16", "amx_bf16", "amx_tile"))


def _memory_gb() -> float | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("MemTotal"))
    except (OSError, StopIteration, ValueError):
        return None
    return round(kb / 2**20, 1)
