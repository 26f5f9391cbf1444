"""The one atomic write: readers (and a restart after a crash) see the old bytes or the new, never half.

Used for summary.json and _manifest.json in a local output, the backfill checkpoint and the
crash guard's directory fsync. Standard library only: the producers' install uses it too.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

from .faults import crash_point


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write beside (a unique temp name), fsync, rename over, fsync the directory.

    The file gets the process umask's mode, like the Parquet files beside it (0644 under umask
    022): summary.json, README.md and _manifest.json are for readers. (mkstemp's 0600 made them
    unreadable to anyone else on a shared volume.)"""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data[: len(data) // 2])
            crash_point("mid_summary_write")  # tests: a death here must leave the old file whole
            f.write(data[len(data) // 2 :])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def _create_beside(path: Path) -> tuple[int, str]:
    """A new hidden temp file next to `path`, created 0666 minus the umask (the kernel applies it:
    no umask() call, which would change it for every thread for a moment)."""
    for _ in range(100):
        tmp = os.path.join(path.parent, f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


def fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
