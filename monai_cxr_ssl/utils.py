"""Small helpers shared by the pipeline stages."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file next to ``path`` and rename it over ``path`` only if the block succeeds.

    Readers never see a half-written file, and an interrupted write leaves nothing behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise disk_full_error(path) from err
        raise
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        if err.errno == errno.ENOSPC:
            raise disk_full_error(path) from err
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class DiskFullError(ValueError):
    """The disk filled up while a file was written; the message names the file, the space needed and free."""


def is_disk_full(error: BaseException | None) -> bool:
    """Whether ``error`` or an error it was raised from or during is ENOSPC ("No space left on device")."""
    while error is not None:
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        error = error.__cause__ or error.__context__
    return False


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def disk_full_error(path: str | os.PathLike, needed: int | None = None) -> DiskFullError:
    """A one-line ``DiskFullError`` for a write of ``path`` that failed with ENOSPC: the file, how much it needs
    (``needed`` bytes, when known) and how much the disk has free."""
    path = Path(path)
    folder = next((p for p in (path.parent, *path.parents) if p.exists()), Path("/"))
    free = shutil.disk_usage(folder).free
    need = f"it needs about {_mib(needed)}" if needed else "it needs more than is free"
    return DiskFullError(
        f"no space left on device while writing {path}: {need}, {_mib(free)} free on that disk. Free some space "
        "(or set output_dir to another disk) and run the same command again: finished epochs and stages are kept."
    )


def read_json(path: str | os.PathLike, what: str, remedy: str) -> Any:
    """Read a JSON file this package wrote; a missing or corrupt file raises an error naming ``what`` it should
    be and the ``remedy``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no {what} here; {remedy}.")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} {path} is not valid JSON ({e}); {remedy}.") from e


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def require_file(path: str | os.PathLike, what: str) -> None:
    """Fail early, naming the missing ``what``, instead of deep inside a workflow."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no {what} here.")


def file_in_the_way(path: str | os.PathLike) -> Path | None:
    """The existing file among ``path``'s parent folders, which keeps ``path`` from being made; None if none."""
    return next((p for p in Path(path).parents if p.exists() and not p.is_dir()), None)
