"""How capdec writes what it makes: a failed write loses nothing, and nothing but capdec's own output is replaced.

Files (:func:`write_text`, and :func:`output_target` + :func:`publish` for a stream written as it is made), by
what the path is when the write starts:

============================================  ================================================================
the path is                                   capdec
============================================  ================================================================
new, or a regular file                        writes a temporary sibling (``.NAME.PID@HOST.XXXXXXXX.tmp``) and
                                              renames it over the path: a reader sees the old file or the new
                                              one, and a failed write leaves the old file as it was
a symbolic link                               the same for the file it points to (the link stays a link)
``/dev/stdout``, ``/dev/stderr``, ``/dev/fd/N``  writes to that open file descriptor (reopening it would truncate a
                                              file the shell opened for appending)
a character device (``/dev/null``,            writes through (opens it and writes): renaming a file over a
``/dev/full``, a terminal) or a FIFO          device node would replace the node, and a FIFO's reader waits
a directory, a block device, a socket         refuses, naming it
============================================  ================================================================

A write that fails (disk full, a read-only or missing directory, no permission) raises :class:`OutputError`
(one line naming the path; the CLI exits 2) and leaves no temporary file behind.

Directories (:func:`atomic_dir`) are built under a temporary sibling and renamed into place; an existing
directory is replaced only when the caller says so (``overwrite``) *and* ``replaceable`` recognises it as
capdec's own (a checkpoint by its ``config.json``, ...): anything else is refused. Temporary siblings that a
killed process left (``kill -9``, a power cut) are removed by the next write of the same path
(:func:`clean_stale`): those of processes on this host that are no longer running.

This module imports no torch: ``capdec evaluate`` and ``capdec corpus`` write through it too.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import socket
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from capdec.errors import CapdecError, InputError

logger = logging.getLogger(__name__)

# paths that name a file descriptor this process already has open
_FD_PATH = re.compile(r"^/(?:dev/(?:fd/(?P<fd>\d+)|(?P<std>stdout|stderr))|proc/(?:self|\d+)/fd/(?P<pfd>\d+))$")
_STD_FDS = {"stdout": 1, "stderr": 2}


class OutputError(CapdecError, OSError):
    """An output could not be written (disk full, no permission, not a writable kind of file); nothing was lost."""


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:64] or "host"


def _temp_prefix(target: Path) -> str:
    """Temporary siblings of ``target`` are named ``.NAME.PID@HOST.XXXXXXXX.tmp`` (see :func:`clean_stale`)."""
    return f".{target.name}.{os.getpid()}@{_host()}."


def _open_fd(path: str | os.PathLike) -> int | None:
    """The file descriptor ``path`` names (``/dev/stdout`` -> 1, ``/dev/fd/5`` -> 5), or None."""
    m = _FD_PATH.match(os.fspath(path))
    if m is None:
        return None
    return _STD_FDS[m["std"]] if m["std"] else int(m["fd"] or m["pfd"])


def output_target(path: str | os.PathLike) -> tuple[str, Path]:
    """How ``path`` is written: ``("file", where)`` (atomic replace of ``where``, the symlink's target for a
    link), ``("fd", path)`` (an open descriptor: ``/dev/stdout``...) or ``("through", path)`` (a character
    device or a FIFO). A directory, a block device or a socket is an :class:`OutputError`."""
    path = Path(path)
    if _open_fd(path) is not None:
        return "fd", path
    real = Path(os.path.realpath(path)) if path.is_symlink() else path
    try:
        mode = os.stat(real).st_mode
    except FileNotFoundError:
        return "file", real
    except OSError as e:
        raise OutputError(f"{path}: cannot be written ({e.strerror})") from None
    if stat.S_ISREG(mode):
        return "file", real
    if stat.S_ISCHR(mode) or stat.S_ISFIFO(mode):
        return "through", path
    kind = "a directory" if stat.S_ISDIR(mode) else "a block device" if stat.S_ISBLK(mode) else "a socket" \
        if stat.S_ISSOCK(mode) else "not a regular file"
    raise OutputError(f"{path}: is {kind}; give a file name to write to")


def write_error(path: str | os.PathLike, e: OSError) -> OutputError:
    """The one-line error of a failed write of ``path`` (the target is left as it was)."""
    why = e.strerror or str(e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        why += " (the disk is full)"
    return OutputError(f"{path}: cannot write ({why}); it was left as it was")


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` as the module docstring says: atomically for files, through for devices."""
    kind, where = output_target(path)
    if kind != "file":
        _write_through(path, kind, text)
        return
    tmp = None
    try:
        where.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(where)
        fd, tmp = tempfile.mkstemp(dir=where.parent, prefix=_temp_prefix(where), suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        publish(Path(tmp), where)
    except OSError as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OutputError):
            raise
        raise write_error(path, e) from None


def _write_through(path: str | os.PathLike, kind: str, text: str) -> None:
    stream = open_through(path, kind)
    try:
        with stream:
            stream.write(text)
    except OSError as e:
        raise write_error(path, e) from None


def open_through(path: str | os.PathLike, kind: str):
    """A text stream writing through to a device, FIFO or open descriptor (``kind`` from :func:`output_target`)."""
    try:
        if kind == "fd":
            return os.fdopen(os.dup(_open_fd(path)), "w", encoding="utf-8", newline="")  # type: ignore[arg-type]
        return open(path, "w", encoding="utf-8", newline="")
    except OSError as e:
        raise write_error(path, e) from None


def publish(tmp: Path, where: Path) -> None:
    """Rename the finished file ``tmp`` over ``where`` (a sibling: same file system), keeping ``where``'s mode
    when it existed (a new file gets the umask's)."""
    try:
        mode = stat.S_IMODE(os.stat(where).st_mode)
    except FileNotFoundError:
        mode = 0o666 & ~_umask()
    os.chmod(tmp, mode)
    os.replace(tmp, where)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def clean_stale(target: str | os.PathLike) -> list[Path]:
    """Remove the temporary siblings of ``target`` that a process on this host left when it was killed.

    A temporary sibling is ``.NAME.PID@HOST.XXXXXXXX.tmp`` (file or directory); it is stale when HOST is this
    host and no process PID runs. Others' (a live process, another host sharing the file system) are kept.
    """
    target = Path(target)
    prefix = f".{target.name}."
    host = _host()
    removed = []
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return removed
    for entry in entries:
        name = entry.name
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        owner = name[len(prefix):-len(".tmp")].rpartition(".")[0]  # PID@HOST
        pid, _, where = owner.partition("@")
        if not pid.isdigit() or where != host or _alive(int(pid)):
            continue
        path = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    if removed:
        logger.info("removed %d temporary file(s) an interrupted write of %s left: %s", len(removed), target,
                    ", ".join(p.name for p in removed))
    return removed


def check_replaceable(path: str | os.PathLike, replaceable: Callable[[Path], str | None], *,
                      flag: str = "--overwrite") -> None:
    """Refuse to replace ``path`` unless it is absent, an empty directory, or what ``replaceable`` recognises.

    ``replaceable(path)`` returns None for a directory capdec wrote (its own metadata says so), else why it is
    not one; the error names the path and says what to do.
    """
    path = Path(path)
    if not os.path.lexists(path):
        return
    if path.is_symlink() or not path.is_dir():
        raise InputError(f"{path}: exists and is not a directory; {flag} replaces only a directory capdec wrote. "
                         "Choose another output path, or remove it yourself")
    if not any(path.iterdir()):
        return
    why = replaceable(path)
    if why is not None:
        raise InputError(f"{path}: {why}; {flag} replaces only what capdec wrote there. Choose another output "
                         "path, or remove it yourself")


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, *, overwrite: bool = False,
               replaceable: Callable[[Path], str | None] | None = None, flag: str = "--overwrite") -> Iterator[Path]:
    """Build a directory under a temporary sibling name; rename it to ``final`` only on success.

    A crash leaves ``final`` untouched (the old version, or nothing) and the temp dir removed (by the next
    call if the process was killed: :func:`clean_stale`). An existing ``final`` is replaced only with
    ``overwrite``, and when ``replaceable`` is given only if it recognises ``final`` (see
    :func:`check_replaceable`, whose error names ``flag`` as what replaces it); an empty directory may always
    be replaced.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    finish_swap(final)
    clean_stale(final)
    if overwrite and replaceable is not None:
        check_replaceable(final, replaceable, flag=flag)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=_temp_prefix(final), suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        if not overwrite:
            shutil.rmtree(tmp, ignore_errors=True)
            raise FileExistsError(f"{final} already exists")
        if replaceable is not None:
            try:
                check_replaceable(final, replaceable, flag=flag)  # it may have changed while the new one was built
            except InputError:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        old = _old(final)
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def _old(final: Path) -> Path:
    return final.with_name(f".{final.name}.old")


def finish_swap(final: str | os.PathLike) -> None:
    """Finish a directory swap a crash interrupted: the old copy renamed away and the new one not yet in place
    (the old copy comes back), or both in place (the old copy goes)."""
    final = Path(final)
    old = _old(final)
    if not old.exists():
        return
    if not final.exists():
        logger.warning("recovering %s from an interrupted save", final)
        os.replace(old, final)
    else:
        shutil.rmtree(old, ignore_errors=True)


__all__ = ["OutputError", "atomic_dir", "check_replaceable", "clean_stale", "finish_swap", "open_through",
           "output_target", "publish", "write_error", "write_text"]
