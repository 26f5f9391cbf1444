"""Rolling Parquet files that are either whole or invisible.

A file is written in the output's local spool as `….parquet.inprogress` (never under `data/`),
one row group per micro-batch (or per piece of one), and rolls on rows, bytes or age. The limits
hold: a file never holds more than `roll_max_rows` rows nor `roll_max_bytes` of them (the rows'
Arrow size, uncompressed, known before they are written: the Parquet file is smaller, plus its
footer). A micro-batch that does not fit is split across files (`append_batch`), each footer holding
exactly the offsets of its own part. The unit of the split is one source record: its rows (one
event's, or in utterances mode many) always stay in one file, so one record whose rows alone pass a
limit gets a file of its own. Finalizing follows one order, each step a typed failure:

    1. write the footer: rows + the source offset ranges and aggregates of the epoch
    2. close and fsync the spooled file
    3. the check before the upload (`fence`): the table's stored versions of the file's
       partitions (pipeline/ledger.py): another consumer already committed these offsets
       (a consumer that lost its partitions while paused): the file is discarded        Fenced
    4. a file with rows becomes data/<name> in one step: a rename + directory fsync
       (local), one PUT or a completed multipart upload (object store)     OutputWriteFailed
       (a file with no row - dead letters and duplicates only - is not uploaded at all)

Only then may the caller commit it to the table (`OutputLedger.commit_file`) and then the offsets.
A file under data/ that no commit added is not part of the dataset (a crash before the commit).
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import Fenced, OutputWriteFailed
from .faults import delay_point
from .output import Output, as_output
from .output.footer import FileFooter, OffsetRange, PendingDeadLetter, footer_metadata
from .output.layout import INPROGRESS_SUFFIX, part_name
from .output.store import discard
from .records import SCHEMA, TranscribedAudio, to_table, version_hashes
from .summary import Aggregates

log = logging.getLogger(__name__)

__all__ = ["RollingParquetWriter", "OffsetRange", "FileFooter", "SourceOutcome", "BatchAppend"]


@dataclass
class SourceOutcome:
    """What one source record (topic, partition, offset) became: its rows, and the counts of what
    made no row (dead letters, skips, duplicates). The unit a micro-batch is split by."""

    topic: str
    partition: int
    offset: int
    rows: list[TranscribedAudio] = field(default_factory=list)
    aggregates: Aggregates = field(default_factory=Aggregates)
    dead_letters: list[PendingDeadLetter] = field(default_factory=list)  # sent once the file holding them is durable


class BatchAppend:
    """One micro-batch on its way into files: its outcomes in (topic, partition, offset) order,
    converted to Arrow once, and how far `RollingParquetWriter.append_batch` has got.

    A part written to one file gets, per partition, the offsets from where the previous part
    stopped to its last record's (the part holding a partition's last record ends at the batch's
    last offset of it): the footers of a split batch cover its ranges exactly, without gap or
    overlap, and every earlier file holds lower offsets - a crash between two of them resumes
    after the first, as recovery expects."""

    def __init__(self, outcomes: list[SourceOutcome], ranges: list[OffsetRange]) -> None:
        self.ranges = {(r.topic, r.partition): r for r in ranges}
        merged: dict[tuple[str, int, int], SourceOutcome] = {}
        for o in outcomes:
            if (o.topic, o.partition) not in self.ranges or not (
                    self.ranges[(o.topic, o.partition)].first <= o.offset <= self.ranges[(o.topic, o.partition)].last):
                raise ValueError(f"{o.topic}[{o.partition}]@{o.offset} is outside the batch's offsets")
            have = merged.get((o.topic, o.partition, o.offset))
            if have is None:
                merged[(o.topic, o.partition, o.offset)] = SourceOutcome(
                    o.topic, o.partition, o.offset, list(o.rows), _copy(o.aggregates), list(o.dead_letters))
            else:  # several events of one message: still one record
                have.rows.extend(o.rows)
                have.aggregates.merge(o.aggregates)
                have.dead_letters.extend(o.dead_letters)
        self.units = [merged[k] for k in sorted(merged)]
        self.table = to_table([r for u in self.units for r in u.rows])
        self._starts: list[int] = []
        n = 0
        for u in self.units:
            self._starts.append(n)
            n += len(u.rows)
        self._nbytes = [self.table.slice(a, len(u.rows)).nbytes if u.rows else 0 for a, u in zip(self._starts, self.units)]
        self._last_unit = {(u.topic, u.partition): i for i, u in enumerate(self.units)}
        self._next_first = {k: r.first for k, r in self.ranges.items()}
        self.done = 0  # units already appended

    def size(self, i: int) -> tuple[int, int]:
        """Rows and Arrow bytes of unit `i`."""
        return len(self.units[i].rows), self._nbytes[i]

    def take(self, j: int) -> tuple[pa.Table, list[OffsetRange], Aggregates, list[PendingDeadLetter]]:
        """Units [done, j) as one part; the last part (j == all) also holds partitions with no unit."""
        i, final = self.done, j == len(self.units)
        spans: dict[tuple[str, int], list[int]] = {}
        agg = Aggregates()
        dead_letters: list[PendingDeadLetter] = []
        for k in range(i, j):
            u = self.units[k]
            dead_letters.extend(u.dead_letters)
            key = (u.topic, u.partition)
            last = self.ranges[key].last if k == self._last_unit[key] else u.offset
            spans.setdefault(key, [self._next_first[key], last])[1] = last
            agg.merge(u.aggregates)
        if final:
            for key, r in self.ranges.items():
                if key not in self._last_unit:
                    spans[key] = [r.first, r.last]
        for key, (_, last) in spans.items():
            self._next_first[key] = last + 1
        start = self._starts[i] if i < len(self.units) else self.table.num_rows
        end = self._starts[j] if j < len(self.units) else self.table.num_rows
        self.done = j
        ranges = [OffsetRange(t, p, a, b) for (t, p), (a, b) in sorted(spans.items())]
        return self.table.slice(start, end - start), ranges, agg, dead_letters


def _copy(a: Aggregates) -> Aggregates:
    out = Aggregates()
    out.merge(a)
    return out


@dataclass
class _OpenFile:
    path: Path
    name: str  # its name under data/ once finalized
    writer: pq.ParquetWriter
    opened_at: float
    rows: int = 0
    bytes: int = 0  # the rows' Arrow size (what roll_max_bytes bounds)
    full: bool = False  # the next record's rows do not fit: finalize before appending more
    ranges: dict[tuple[str, int], OffsetRange] = field(default_factory=dict)
    aggregates: Aggregates = field(default_factory=Aggregates)
    dead_letters: list[PendingDeadLetter] = field(default_factory=list)
    versions: list[np.ndarray] = field(default_factory=list)  # of its rows, per append


class RollingParquetWriter:
    def __init__(self, output: Output | str | Path, roll_max_rows: int, roll_max_seconds: float, compression: str = "zstd",
                 roll_max_bytes: int | None = None) -> None:
        self.output = as_output(output)
        self.roll_max_rows = roll_max_rows
        self.roll_max_bytes = roll_max_bytes if roll_max_bytes is not None else 1 << 62  # None: no bound
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
    def append_batch(self, batch: BatchAppend) -> bool:
        """Append as much of `batch` as the open file has room for; True when all of it is in.
        False: the file is full - finalize it, then call again with the same `batch`."""
        f = self._open or self._start_file()
        j, rows, size = batch.done, f.rows, f.bytes
        while j < len(batch.units):
            n, b = batch.size(j)
            if n and (rows + n > self.roll_max_rows or size + b > self.roll_max_bytes):
                if rows:  # the record's rows go to the next file, all of them
                    f.full = True
                    break
                # an empty file takes them whatever their size: one record's rows never span two files
                j, rows, size = j + 1, rows + n, size + b
                break
            j, rows, size = j + 1, rows + n, size + b
        if j > batch.done or j == len(batch.units):
            self.append(*batch.take(j))
        return batch.done == len(batch.units)

    def append(self, table: pa.Table, ranges: list[OffsetRange], aggregates: Aggregates,
               dead_letters: list[PendingDeadLetter] = ()) -> None:
        """Add one micro-batch as a whole (no split: `append_batch` splits): its rows, the offsets
        it handled, its aggregates and the dead letters of its records (in the footer, sent after it)."""
        f = self._open or self._start_file()
        try:
            if table.num_rows:
                f.writer.write_table(table)
        except OSError as exc:
            raise OutputWriteFailed(f"writing {f.path} failed: {exc}") from exc
        f.rows += table.num_rows
        f.bytes += table.nbytes
        if table.num_rows:
            f.versions.append(version_hashes(table))
        f.aggregates.merge(aggregates)
        f.dead_letters.extend(dead_letters)
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

    @property
    def holds_dead_letters(self) -> bool:
        """The open file carries dead letters: its finalize needs the DLQ's marks."""
        return self._open is not None and bool(self._open.dead_letters)

    def due_to_roll(self, now: float | None = None) -> bool:
        f = self._open
        if f is None:
            return False
        now = time.monotonic() if now is None else now
        return (f.full or f.rows >= self.roll_max_rows or f.bytes >= self.roll_max_bytes
                or (now - f.opened_at) >= self.roll_max_seconds)

    def seconds_until_roll(self, now: float | None = None) -> float | None:
        if self._open is None:
            return None
        now = time.monotonic() if now is None else now
        return max(0.0, self._open.opened_at + self.roll_max_seconds - now)

    # --- finalizing ------------------------------------------------------------------
    def finalize(self, fence: Callable[[list[OffsetRange]], list[str]] | None = None,
                 dlq_marks: dict[int, int] | None = None) -> FileFooter | None:
        """Steps 1-4. `fence(offsets)` names what already holds any of the offsets ([]: go on);
        it runs right before the upload. `dlq_marks`: where the dead-letter topic ended before
        this file's dead letters are sent (footer.py)."""
        f, self._open = self._open, None
        if f is None:
            return None
        delay_point("finalize")  # tests: a revoke arriving now must wait for the publish and the commit
        offsets = sorted(f.ranges.values(), key=lambda r: (r.topic, r.partition))
        try:
            # 1. footer metadata
            f.writer.add_key_value_metadata(
                footer_metadata(offsets, f.aggregates, self.writer_id, f.dead_letters, dlq_marks))
            # 2. close + fsync
            f.writer.close()
            with open(f.path, "rb+") as fh:
                os.fsync(fh.fileno())
            size = f.path.stat().st_size
        except OSError as exc:
            discard(f.path)
            raise OutputWriteFailed(f"finalizing {f.name} failed: {exc}") from exc
        # 3. the check before the upload
        try:
            conflicts = fence(offsets) if fence is not None else []
        except BaseException:
            discard(f.path)
            raise
        if conflicts:
            discard(f.path)
            raise Fenced(
                f"another consumer already committed offsets of {f.name} ({'; '.join(conflicts[:3])}): this "
                "consumer lost those partitions (paused past the session timeout?); its file is discarded and "
                "nothing is committed - restart it to resume from the table")
        # 4. into the table directory in one step (the output discards the spooled file either way)
        if f.rows:
            self.output.publish(f.path, f.name)
            log.info("uploaded %s (%d rows)", self.output.data_path(f.name), f.rows)
        else:
            discard(f.path)
        versions = np.unique(np.concatenate(f.versions)) if f.versions else np.zeros(0, np.uint64)
        return FileFooter(f.name, f.rows, offsets, f.aggregates, f.dead_letters, dict(dlq_marks or {}), size, versions)

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
