"""Rolling Parquet files that are either whole or invisible.

A file is written as `….parquet.inprogress` (never matching `*.parquet`), one row group per
micro-batch, and rolls on rows or age. Finalizing follows one order, each step a typed failure:

    1. write the footer: rows + the source offset ranges and aggregates of the epoch
    2. close and fsync the file
    3. under the output directory's lock: the fencing check - no finalized file may already hold
       any of its offsets (a consumer that lost its partitions while paused finds the new owner's
       files there): if one does, the file is discarded and `Fenced` raised           Fenced
    4. rename `.inprogress` -> `.parquet`, fsync the directory (still under the lock)

Only then may the caller commit offsets. The footer's offset ranges are what crash recovery
reads back: a finalized file is proof its events were handled, whatever the broker remembers.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import Fenced, OutputWriteFailed
from .faults import delay_point
from .records import SCHEMA
from .summary import Aggregates, fsync_dir, output_lock

log = logging.getLogger(__name__)

DATA_DIR = "data"
INPROGRESS_SUFFIX = ".parquet.inprogress"
META_OFFSETS = b"metavoice.offsets"
META_AGGREGATES = b"metavoice.aggregates"
META_WRITER = b"metavoice.writer"


@dataclass
class OffsetRange:
    """Source positions an epoch handled: every offset in [first, last] of one partition."""

    topic: str
    partition: int
    first: int
    last: int

    def to_dict(self) -> dict:
        return {"topic": self.topic, "partition": self.partition, "first": self.first, "last": self.last}


@dataclass
class FileFooter:
    """A finalized file as its footer describes it: what the writer returns and recovery reads."""

    path: Path
    rows: int
    offsets: list[OffsetRange]
    aggregates: Aggregates


@dataclass
class _OpenFile:
    path: Path
    writer: pq.ParquetWriter
    opened_at: float
    rows: int = 0
    ranges: dict[tuple[str, int], OffsetRange] = field(default_factory=dict)
    aggregates: Aggregates = field(default_factory=Aggregates)


class RollingParquetWriter:
    def __init__(self, output_dir: Path, roll_max_rows: int, roll_max_seconds: float, compression: str = "zstd") -> None:
        self.data_dir = Path(output_dir) / DATA_DIR
        self.roll_max_rows = roll_max_rows
        self.roll_max_seconds = roll_max_seconds
        self.compression = compression
        self.writer_id = uuid.uuid4().hex[:8]  # several consumers may share a directory
        self._seq = 0
        self._open: _OpenFile | None = None
        self._liveness = _hold_writer_lock(self.data_dir, self.writer_id)

    def close(self) -> None:
        """Release the liveness lock (after finalize or abort); safe to call twice."""
        if self._liveness is not None:
            self._liveness.close()
            (self.data_dir / f".writer-{self.writer_id}.lock").unlink(missing_ok=True)
            self._liveness = None

    # --- appending -------------------------------------------------------------------
    def append(self, table: pa.Table, ranges: list[OffsetRange], aggregates: Aggregates) -> None:
        """Add one micro-batch: its rows, the offsets it handled, and its aggregates."""
        f = self._open or self._start_file()
        try:
            if table.num_rows:
                f.writer.write_table(table)
        except OSError as exc:
            raise OutputWriteFailed(f"writing {f.path} failed: {exc}") from exc
        f.rows += table.num_rows
        f.aggregates.merge(aggregates)
        for r in ranges:
            key = (r.topic, r.partition)
            have = f.ranges.get(key)
            if have is None:
                f.ranges[key] = OffsetRange(r.topic, r.partition, r.first, r.last)
            else:
                if r.first <= have.last:
                    raise ValueError(f"offsets must increase: {r} after {have}")
                have.last = r.last

    @property
    def has_open_file(self) -> bool:
        return self._open is not None

    def due_to_roll(self, now: float | None = None) -> bool:
        f = self._open
        if f is None:
            return False
        now = time.monotonic() if now is None else now
        return f.rows >= self.roll_max_rows or (now - f.opened_at) >= self.roll_max_seconds

    def seconds_until_roll(self, now: float | None = None) -> float | None:
        if self._open is None:
            return None
        now = time.monotonic() if now is None else now
        return max(0.0, self._open.opened_at + self.roll_max_seconds - now)

    # --- finalizing ------------------------------------------------------------------
    def finalize(self, fence: Callable[[list[OffsetRange]], list[str]] | None = None) -> FileFooter | None:
        """Steps 1-4. `fence(offsets)` names finalized files that already hold any of the offsets;
        it runs under the output lock, right before the rename, so no other writer can slip in."""
        f, self._open = self._open, None
        if f is None:
            return None
        delay_point("finalize")  # tests: a revoke arriving now must wait for the rename and the commit
        final = f.path.with_name(f.path.name.removesuffix(INPROGRESS_SUFFIX) + ".parquet")
        offsets = sorted(f.ranges.values(), key=lambda r: (r.topic, r.partition))
        try:
            # 1. footer metadata
            f.writer.add_key_value_metadata(
                {
                    META_OFFSETS: orjson.dumps([r.to_dict() for r in offsets]),
                    META_AGGREGATES: orjson.dumps(f.aggregates.to_state()),
                    META_WRITER: self.writer_id.encode(),
                }
            )
            # 2. close + fsync
            f.writer.close()
            with open(f.path, "rb+") as fh:
                os.fsync(fh.fileno())
        except OSError as exc:
            _discard(f.path)
            raise OutputWriteFailed(f"finalizing {final} failed: {exc}") from exc
        with output_lock(self.data_dir.parent):
            # 3. fencing
            try:
                conflicts = fence(offsets) if fence is not None else []
            except OSError as exc:
                _discard(f.path)
                raise OutputWriteFailed(f"reading the finalized files before renaming {final.name} failed: {exc}") from exc
            if conflicts:
                _discard(f.path)
                raise Fenced(
                    f"another consumer already finalized offsets of {final.name} ({'; '.join(conflicts[:3])}): "
                    "this consumer lost those partitions (paused past the session timeout?); its file is "
                    "discarded and nothing is committed - restart it to resume from the files"
                )
            # 4. rename + fsync directory
            try:
                os.replace(f.path, final)
                fsync_dir(final.parent)
            except OSError as exc:
                _discard(f.path)
                raise OutputWriteFailed(f"finalizing {final} failed: {exc}") from exc
        log.info("finalized %s (%d rows)", final.name, f.rows)
        return FileFooter(final, f.rows, offsets, f.aggregates)

    def abort(self) -> None:
        """Drop the open file: its events were never committed and will be processed again."""
        f, self._open = self._open, None
        if f is not None:
            try:
                f.writer.close()
            except Exception:  # already broken; the point is to remove it
                pass
            _discard(f.path)

    def _start_file(self) -> _OpenFile:
        self._seq += 1
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
        path = self.data_dir / f"part-{stamp}-{self.writer_id}-{self._seq:05d}{INPROGRESS_SUFFIX}"
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            writer = pq.ParquetWriter(path, SCHEMA, compression=self.compression)
        except OSError as exc:
            _discard(path)  # created, then the first write failed (a full disk): leave nothing behind
            raise OutputWriteFailed(f"cannot create {path}: {exc}") from exc
        self._open = _OpenFile(path, writer, time.monotonic())
        return self._open


def _discard(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.error("could not remove %s: %s", path, exc)


# --- reading back ---------------------------------------------------------------------
def finalized_files(output_dir: Path) -> list[Path]:
    return sorted(p for p in (Path(output_dir) / DATA_DIR).glob("*.parquet") if p.is_file())


def _hold_writer_lock(data_dir: Path, writer_id: str):
    """An flock held for the writer's lifetime: proof to other consumers that it is alive."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        f = open(data_dir / f".writer-{writer_id}.lock", "a+")
    except OSError as exc:
        raise OutputWriteFailed(f"cannot write into the output directory {data_dir}: {exc}") from exc
    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    return f


def _writer_is_alive(data_dir: Path, writer_id: str) -> bool:
    lock = data_dir / f".writer-{writer_id}.lock"
    if not lock.exists():
        return False
    with open(lock, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    return False


def discard_orphaned_inprogress(output_dir: Path) -> list[Path]:
    """Remove in-progress files whose writer died (a crash); live writers' files are left alone.

    Their events were never committed, so they are processed again.
    """
    data_dir = Path(output_dir) / DATA_DIR
    removed = []
    for p in data_dir.glob(f"*{INPROGRESS_SUFFIX}"):
        writer_id = p.name.split("-")[2] if p.name.count("-") >= 3 else ""
        if not _writer_is_alive(data_dir, writer_id):
            _discard(p)
            removed.append(p)
    for lock in data_dir.glob(".writer-*.lock"):
        if not _writer_is_alive(data_dir, lock.name[len(".writer-") : -len(".lock")]):
            lock.unlink(missing_ok=True)
    if removed:
        log.warning("discarded %d in-progress files left by a crash: %s", len(removed), ", ".join(p.name for p in removed))
    return removed


def read_footer(path: Path) -> FileFooter:
    md = pq.read_metadata(path)
    kv = md.metadata or {}
    offsets = [OffsetRange(**d) for d in orjson.loads(kv.get(META_OFFSETS, b"[]"))]
    aggregates = Aggregates.from_state(orjson.loads(kv.get(META_AGGREGATES, b"{}")))
    return FileFooter(path, md.num_rows, offsets, aggregates)
