"""The output abstraction: one interface for a local directory and an object-store prefix.

The writer, the ledger, the committer, summary.json and the manifest talk to an `Output`, never
to paths. What the dataset holds is its Delta table at `data/` (`table`, pipeline/output/table.py):
a file is part of the dataset once a table commit adds it, never because it lies under data/.
An implementation provides:

- `read_footer()` / `read_columns()`: one file read back cheaply (its footer, or a few columns);
  `finalized()` names the files of the table's latest snapshot;
- `publish(spooled, name)`: put a complete spooled file into the table directory in one step
  (a rename, or one PUT / a completed multipart upload); `remove(name)` takes back one that
  lost its table commit;
- `_read_doc()` / `_write_doc()`: a small document (summary.json, _manifest.json, README.md,
  _state/) read with a version and written only if that version is still current (compare-and-swap);
- `discard_orphans()`: remove what dead writers left behind.

In-progress files are always written to a local spool directory (`spool`); each writer holds
an flock there for its lifetime, so a restarted consumer tells a dead writer's files from a live
one's.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import random
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import pyarrow as pa

from ..errors import OutputWriteFailed
from .footer import FileFooter, OffsetRange
from .layout import INPROGRESS_SUFFIX, writer_of

if TYPE_CHECKING:
    from .table import DatasetTable

log = logging.getLogger(__name__)

Fence = Callable[[list[OffsetRange]], list[str]]  # names what already holds the offsets ([]: go on)
DOC_ATTEMPTS = 50  # compare-and-swap retries; each lost race means another writer made progress


class Output(ABC):
    location: str  # for messages and readers: a directory path or s3://bucket/prefix
    spool: Path  # local directory for in-progress files
    attempts_dir: Path  # the crash guard's markers (consumer/crash_guard.py)
    table: "DatasetTable"  # the dataset's Delta table at data/

    # --- reading back ------------------------------------------------------------------
    def finalized(self) -> list[str]:
        """Names of the data files in the table's latest snapshot, sorted (reads the snapshot's
        file list: for readers and tests, not for the consumer's hot path)."""
        return self.table.file_names()

    @abstractmethod
    def read_footer(self, name: str) -> FileFooter: ...

    @abstractmethod
    def read_columns(self, name: str, columns: list[str]) -> pa.Table:
        """Columns of data/`name`; `FileNotFoundError` when it is gone (vacuumed)."""

    @abstractmethod
    def data_size(self, name: str) -> int:
        """Bytes of data/`name` (a migration's Add actions)."""

    @abstractmethod
    def data_path(self, name: str) -> str:
        """Where a reader finds one finalized file (a path, or s3://…)."""

    # --- publishing ----------------------------------------------------------------------
    @abstractmethod
    def publish(self, spooled: Path, name: str) -> None:
        """Put the complete file `spooled` into the table directory as data/`name` in one step, or
        raise `OutputWriteFailed`. Either way the spooled file is gone afterwards. The file is not
        part of the dataset until a table commit adds it (pipeline/ledger.py `commit_file`)."""

    @abstractmethod
    def remove(self, name: str) -> None:
        """Delete data/`name`, a file no commit added (its commit lost to another writer's)."""

    # --- small documents, compare-and-swap ------------------------------------------------
    @abstractmethod
    def _read_doc(self, name: str) -> tuple[bytes | None, Any]:
        """(content or None when missing, version token)."""

    @abstractmethod
    def _write_doc(self, name: str, data: bytes, version: Any) -> bool:
        """Write if the document is still at `version` (None: still missing); False if not."""

    def _doc_lock(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def read_doc(self, name: str) -> bytes | None:
        return self._read_doc(name)[0]

    def update_doc(self, name: str, change: Callable[[bytes | None], bytes | None]) -> bytes | None:
        """Optimistic concurrency: read, `change(current)` -> new content (None: leave it), write only
        if nobody wrote in between, else read again and retry. Returns the content now in place.
        `change` may run several times: it must compute from what it is given."""
        with self._doc_lock():
            for attempt in range(DOC_ATTEMPTS):
                current, version = self._read_doc(name)
                new = change(current)
                if new is None:
                    return current
                if self._write_doc(name, new, version):
                    return new
                log.debug("%s changed under us (attempt %d); reading it again", name, attempt + 1)
                time.sleep(random.uniform(0.01, 0.05 * (attempt + 1)))
        raise OutputWriteFailed(f"{self.location}/{name}: lost the write race {DOC_ATTEMPTS} times in a row")

    # --- the local spool ---------------------------------------------------------------
    def hold_writer(self, writer_id: str):
        """An flock held for the writer's lifetime: proof to a restarted consumer that it is alive."""
        try:
            self.spool.mkdir(parents=True, exist_ok=True)
            f = open(self.spool / f".writer-{writer_id}.lock", "a+")
        except OSError as exc:
            raise OutputWriteFailed(f"cannot write into the spool directory {self.spool}: {exc}") from exc
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return f

    def release_writer(self, handle, writer_id: str) -> None:
        handle.close()
        (self.spool / f".writer-{writer_id}.lock").unlink(missing_ok=True)

    def discard_orphans(self) -> list[str]:
        """In-progress files whose writer died (their events were never committed: they are
        processed again). Live writers' files are left alone."""
        removed = []
        if not self.spool.is_dir():
            return removed
        for p in self.spool.glob(f"*{INPROGRESS_SUFFIX}"):
            if not self._writer_is_alive(writer_of(p.name)):
                discard(p)
                removed.append(p.name)
        for lock in self.spool.glob(".writer-*.lock"):
            if not self._writer_is_alive(lock.name[len(".writer-") : -len(".lock")]):
                lock.unlink(missing_ok=True)
        if removed:
            log.warning("discarded %d in-progress files left by a crash: %s", len(removed), ", ".join(removed))
        return removed

    def _writer_is_alive(self, writer_id: str) -> bool:
        lock = self.spool / f".writer-{writer_id}.lock"
        if not writer_id or not lock.exists():
            return False
        with open(lock, "a+") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        return False

    def close(self) -> None:
        """Release clients (safe to call twice)."""


def discard(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.error("could not remove %s: %s", path, exc)


@contextlib.contextmanager
def flock(path: Path) -> Iterator[None]:
    """An exclusive lock file (between processes on one host, or over NFS). Not re-entrant."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
