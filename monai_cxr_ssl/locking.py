"""One run per output folder: an exclusive ``flock`` on ``<output_dir>/.lock``, held while a run writes there.

The lock belongs to the process (re-entrant inside it: the pipeline runs its stages in-process under its own
lock) and the kernel releases it when the process ends, however it ends, so a crash leaves no stale lock. The
file also names the holder (pid, host, start time, command) for the message a refused second run gets; a file
left when the lock is free is that of a holder killed before it could release, which the next run reports. A
release (also at the exit of a plain ``monai.bundle run``, failed or not) removes the file, and the output folder
when the run made it and left it empty.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger("monai_cxr_ssl")

LOCK_NAME = ".lock"
# the lock files the launcher of a torchrun job (``monai-cxr-ssl run/pipeline --nproc-per-node``) holds for its
# workers, separated by os.pathsep: its workers are other processes, which the lock would otherwise refuse
LAUNCHER_LOCKS = "MONAI_CXR_SSL_LAUNCHER_LOCKS"
_held: dict[Path, list] = {}  # lock file -> [open file, hold count] in this process


class FolderInUseError(ValueError):
    """Another live process holds the output folder's lock (a ``ValueError``: the CLI prints it as one line)."""


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        info = {}
    if not info:
        return "another process (it has not written its name yet)"
    return (f"pid {info.get('pid')} on {info.get('host')} since {info.get('since')} "
            f"({' '.join(info.get('command', []))})")


def _rank() -> int:
    """torchrun's ``RANK`` (light: the CLI imports this module before torch)."""
    return int(os.environ.get("RANK", 0))


def _held_by_launcher(path: Path) -> bool:
    """Whether this process needs no lock of its own on ``path``: a torchrun rank other than 0 (rank 0 holds it
    for the job) or a worker whose launcher holds it (``LAUNCHER_LOCKS``)."""
    return _rank() > 0 or str(path) in os.environ.get(LAUNCHER_LOCKS, "").split(os.pathsep)


def _acquire(path: Path, what: str) -> None:
    if _held_by_launcher(path):
        return
    if path in _held:
        _held[path][1] += 1
        return
    made = not path.parent.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        f = open(path, "a+")  # noqa: SIM115 - kept open while the lock is held
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise FolderInUseError(
                f"{path.parent}: {what} is in use by another run: {_holder(path)}; wait for it to end, or give this "
                "run another output_dir."
            ) from None
        try:  # the file we locked is still the lock file (a releasing holder removes it after we opened it)
            if os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        f.close()
    f.seek(0)
    previous = f.read().strip()
    if previous:
        logger.warning("%s: the previous run here (%s) ended without releasing its lock (killed or crashed); "
                       "its unfinished outputs are resumed or redone.", path.parent, _holder(path))
    f.seek(0)
    f.truncate()
    f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
                        "command": sys.argv}))
    f.flush()
    _held[path] = [f, 1, made]


def _release(path: Path) -> None:
    if _held_by_launcher(path):
        return
    entry = _held[path]
    entry[1] -= 1
    if entry[1] == 0:
        del _held[path]
        f, _, made = entry
        path.unlink(missing_ok=True)  # while locked: a run waiting on this file sees it gone and opens a new one
        f.close()  # closing the descriptor releases the flock
        if made:
            try:  # the folder this run made, if it wrote nothing there (a run that failed at its first check)
                path.parent.rmdir()
            except OSError:
                pass


def held_locks() -> list[Path]:
    """The lock files this process holds (a launcher lends them to its torchrun workers)."""
    return sorted(_held)


@contextmanager
def output_lock(output_dir: str | os.PathLike) -> Iterator[None]:
    """Hold the lock on ``output_dir`` for the block; a second process is refused (``FolderInUseError`` naming
    the holder) until the block ends or the holder dies. Re-entrant within one process."""
    path = Path(output_dir).resolve() / LOCK_NAME
    _acquire(path, "the output folder")
    try:
        yield
    finally:
        _release(path)


def lock_output_dir(output_dir: str | os.PathLike) -> None:
    """Hold the lock on ``output_dir`` until this process exits (released at exit, failed or not), unless this process
    holds it already.

    For a bundle's ``initialize`` (plain ``python -m monai.bundle run``); in-process callers use ``output_lock``.
    Under torchrun rank 0 holds it for the job (the other ranks write nothing there).
    """
    path = Path(output_dir).resolve() / LOCK_NAME
    if path not in _held and not _held_by_launcher(path):
        _acquire(path, "the output folder")
        atexit.register(lambda: path in _held and _release(path))


@contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """A blocking exclusive lock on the file ``path`` for the block (waits for other processes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield  # closing the file releases the lock
