"""Rolling Parquet files that are either whole or invisible.

A file is written in the output's local spool as `….parquet.inprogress` (never under `data/`),
one row group per micro-batch, and rolls on rows or age. Finalizing follows one order, each step
a typed failure:

    1. write the footer: rows + the source offset ranges and aggregates of the epoch
    2. close and fsync the spooled file
    3. publish it (pipeline/output/): the fencing check - no finalized file may already hold
       any of its offsets (a consumer that lost its partitions while paused finds the new
       owner's files there): if one does, the file is discarded and `Fenced` raised      Fenced
    4. ... then it becomes data/<name> in one step: a rename + directory fsync (local),
       one PUT or a completed multipart upload (object store)               OutputWriteFailed

Only then may the caller commit offsets. The footer's offset ranges are what crash recovery
reads back: a finalized file is proof its events were handled, whatever the broker remembers.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import OutputWriteFailed
from .faults import delay_point
from .output import Output, as_output
from .output.footer import FileFooter, OffsetRange, footer_metadata
from .output.layout import INPROGRESS_SUFFIX, part_name
from .output.store import discard
from .records import SCHEMA
from .summary import Aggregates

log = logging.getLogger(__name__)

__all__ = ["RollingParquetWriter", "OffsetRange", "FileFooter"]


@dataclass
class _OpenFile:
    path: Path
    name: str  # its name under data/ once finalized
    writer: pq.ParquetWriter
    opened_at: float
    rows: int = 0
    ranges: dict[tuple[str, int], OffsetRange] = field(default_factory=dict)
    aggregates: Aggregates = field(default_factory=Aggregates)


class RollingParquetWriter:
    def __init__(self, output: Output | str | Path, roll_max_rows: int, roll_max_seconds: float, compression: str = "zstd") -> None:
        self.output = as_output(output)
        self.roll_max_rows = roll_max_rows
        self.roll_max_seconds = roll_max_seconds
        self.compression = compression
        self.writer_id = uuid.uuid4().hex[:8]  # several consumers may share a directory
        self._seq = 0
        self._open: _OpenFile | None = None
        self._liveness = self.output.hold_writer(self.writer_id)

    def close(self) -> None:
        """Release the liveness lock (after finalize or abort); safe to call twice."""
        if self._liveness is not None:
            self.output.release_writer(self._liveness, self.writer_id)
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
        the output runs it right before the file becomes visible (see Output.publish)."""
        f, self._open = self._open, None
        if f is None:
            return None
        delay_point("finalize")  # tests: a revoke arriving now must wait for the publish and the commit
        offsets = sorted(f.ranges.values(), key=lambda r: (r.topic, r.partition))
        try:
            # 1. footer metadata
            f.writer.add_key_value_metadata(footer_metadata(offsets, f.aggregates, self.writer_id))
            # 2. close + fsync
            f.writer.close()
            with open(f.path, "rb+") as fh:
                os.fsync(fh.fileno())
        except OSError as exc:
            discard(f.path)
            raise OutputWriteFailed(f"finalizing {f.name} failed: {exc}") from exc
        # 3-4. fencing check, then visible in one step (the output discards the spooled file either way)
        self.output.publish(f.path, f.name, offsets, fence)
        log.info("finalized %s (%d rows)", self.output.data_path(f.name), f.rows)
        return FileFooter(f.name, f.rows, offsets, f.aggregates)

    def abort(self) -> None:
        """Drop the open file: its events were never committed and will be processed again."""
        f, self._open = self._open, None
        if f is not None:
            try:
                f.writer.close()
            except Exception:  # already broken; the point is to remove it
                pass
            discard(f.path)

    def _start_file(self) -> _OpenFile:
        self._seq += 1
        name = part_name(self.writer_id, self._seq)
        path = self.output.spool / (name.removesuffix(".parquet") + INPROGRESS_SUFFIX)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            writer = pq.ParquetWriter(path, SCHEMA, compression=self.compression)
        except OSError as exc:
            discard(path)  # created, then the first write failed (a full disk): leave nothing behind
            raise OutputWriteFailed(f"cannot create {path}: {exc}") from exc
        self._open = _OpenFile(path, name, writer, time.monotonic())
        return self._open
