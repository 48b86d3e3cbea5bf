"""Child processes that cannot outlive the test that started them (torchrun and its ranks above all).

torchrun starts each rank in a session of its own, so killing torchrun (or its process group) leaves the
ranks running, reparented to init: a test that failed or timed out between starting torchrun and killing it
left ranks training for hours. Here every process a test starts is killed with its whole tree, each
descendant's process group included, in a ``finally`` (:func:`spawned`, :func:`run`), and asks the kernel
to send it SIGTERM if the test process itself dies first (:func:`die_with_parent`; torchrun answers SIGTERM
by stopping its ranks). Linux only (/proc, prctl).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Have the kernel send ``sig`` to this process when its parent exits (a ``preexec_fn``, or the first
    call of a forked worker)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (read from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # "pid (comm) state ppid ..."
        except (OSError, IndexError, ValueError):
            continue  # ended while we looked
        if ppid == pid:
            found.append(int(stat.parent.name))
    return found


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``: its children, theirs, ..."""
    found, todo = [], [pid]
    while todo:
        for child in children(todo.pop()):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has ended; only its exit status waits to be collected


def kill_tree(proc: subprocess.Popen, *, timeout: float = 60) -> list[int]:
    """SIGKILL ``proc``, every descendant and every descendant's process group (a torchrun rank leads a
    session of its own, its DataLoader workers share its group); wait until all are gone. Returns the
    descendants that were running. (A process that has already ended and been waited for has no tree left to
    read: its group is still killed.)"""
    tree = []
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGSTOP)  # no new rank starts while the tree is read
        tree = descendants(proc.pid)
    own = os.getpgrp()
    groups = set()
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            groups.add(os.getpgid(pid))
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for group in groups | {proc.pid}:
        if group != own:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + timeout
    while any(map(alive, tree)) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [pid for pid in tree if alive(pid)]
    assert not left, f"processes {left} outlived the kill"
    return tree


@contextlib.contextmanager
def spawned(argv: list[str], **popen_kwargs) -> Iterator[subprocess.Popen]:
    """``subprocess.Popen(argv)`` in a session of its own, SIGTERMed if this process dies, and killed with
    all its descendants when the block ends, however it ends (an assertion, a timeout, Ctrl-C)."""
    proc = subprocess.Popen(argv, start_new_session=True, preexec_fn=die_with_parent, **popen_kwargs)
    try:
        yield proc
    finally:
        kill_tree(proc)


def run(argv: list[str], *, timeout: float, check: bool = False, capture_output: bool = False, text: bool = False,
        **popen_kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run`` for a command that starts processes of its own (torchrun): on a timeout or an
    interruption the whole tree is killed, not only ``argv``'s process."""
    if capture_output:
        popen_kwargs.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with spawned(argv, text=text, **popen_kwargs) as proc:
        out, err = proc.communicate(timeout=timeout)
        done = subprocess.CompletedProcess(argv, proc.returncode, out, err)
    if check:
        done.check_returncode()
    return done
