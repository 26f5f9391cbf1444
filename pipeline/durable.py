"""The one atomic write: readers (and a restart after a crash) see the old bytes or the new, never half.

Used for summary.json and _manifest.json in a local output, the backfill checkpoint and the
crash guard's directory fsync. Standard library only: the producers' install uses it too.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from .faults import crash_point


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write beside (a unique temp name), fsync, rename over, fsync the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
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


def fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
