"""What an output already holds, rebuilt from its finalized Parquet files (local or object store).

Two questions recovery must answer from the files themselves, never from the broker alone:
- how far has each source partition been handled? (footer offset ranges; a commit can be lost
  in a crash after the rename, the file cannot)
- was this object version `(bucket, key, etag)` already written? (3 columns read once at
  start-up, then kept as 8-byte hashes: a few MB for millions of rows)

`recover` is a consumer's start-up on the output side; `OutputLedger.catch_up` what each
assignment repeats of it (other consumers may have finalized files, or died, meanwhile).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa

from .errors import OutputWriteFailed
from .manifest import check_manifest
from .output import FileFooter, OffsetRange, Output, as_output
from .output.layout import SUMMARY_NAME
from .summary import ROW_COLUMNS, Aggregates, parse_summary, render_summary

log = logging.getLogger(__name__)


def object_version_hash(bucket: str, key: str, etag: str) -> int:
    digest = hashlib.blake2b(f"{bucket}\x00{key}\x00{etag}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=False)


class DedupeIndex:
    """A set of 64-bit hashes: sorted numpy array plus a small set merged in when it grows."""

    MERGE_AT = 50_000

    def __init__(self) -> None:
        self._sorted = np.zeros(0, dtype=np.uint64)
        self._recent: set[int] = set()

    def __len__(self) -> int:
        return int(self._sorted.size) + len(self._recent)

    def __contains__(self, h: int) -> bool:
        if h in self._recent:
            return True
        i = np.searchsorted(self._sorted, np.uint64(h))
        return bool(i < self._sorted.size and self._sorted[i] == np.uint64(h))

    def add(self, h: int) -> None:
        self._recent.add(h)
        if len(self._recent) >= self.MERGE_AT:
            self._merge()

    def add_many(self, hashes: np.ndarray) -> None:
        self._merge(np.asarray(hashes, dtype=np.uint64))

    def _merge(self, extra: np.ndarray | None = None) -> None:
        parts = [self._sorted, np.fromiter(self._recent, dtype=np.uint64, count=len(self._recent))]
        if extra is not None:
            parts.append(extra)
        self._sorted = np.unique(np.concatenate(parts))
        self._recent.clear()

    @property
    def nbytes(self) -> int:
        return int(self._sorted.nbytes) + len(self._recent) * 64


class OutputLedger:
    def __init__(self, output: Output | str | Path) -> None:
        self.output = as_output(output)
        self.index = DedupeIndex()
        self._indexed: set[str] = set()
        self._next_offsets: dict[tuple[str, int], int] = {}
        # every finalized file's [first, last] per partition: what fencing checks a new file against
        self._spans: dict[tuple[str, int], list[tuple[int, int, str]]] = {}
        self._refreshing = threading.Lock()

    def refresh(self) -> int:
        """Index finalized files not seen yet (written by us or by other consumers). Returns how many.

        Thread-safe: an assignment and a finalize's fencing check may refresh at the same time."""
        with self._refreshing:
            new = [n for n in self.output.finalized() if n not in self._indexed]
            for name in new:
                self._index_file(self.output.read_footer(name))
        if new:
            log.info("indexed %d finalized files (%d object versions)", len(new), len(self.index))
        return len(new)

    def catch_up(self) -> int:
        """Discard the in-progress files of dead writers (their events were never committed), then
        `refresh`: what the output holds now, whoever wrote it. Returns how many files are new."""
        self.output.discard_orphans()
        return self.refresh()

    def record_finalized(self, footer: FileFooter) -> None:
        """Our own file was finalized: learn its offsets without reading it back (its object
        versions entered the index when their rows were appended)."""
        with self._refreshing:
            if footer.name not in self._indexed:  # a concurrent refresh may have read it already
                self._indexed.add(footer.name)
                self._advance(footer)

    @property
    def known_files(self) -> int:
        return len(self._indexed)

    def next_offset(self, topic: str, partition: int) -> int | None:
        """First offset of the partition not yet held by any finalized file."""
        return self._next_offsets.get((topic, partition))

    def already_written(self, bucket: str, key: str, etag: str) -> bool:
        return object_version_hash(bucket, key, etag) in self.index

    def overlapping(self, ranges: list[OffsetRange]) -> list[str]:
        """Finalized files (as known now) that already hold an offset of `ranges`: one is proof
        that another consumer owned these offsets and finalized them first. Call `refresh` before,
        under the output lock, to know every file."""
        found = []
        for r in ranges:
            for first, last, name in self._spans.get((r.topic, r.partition), ()):
                if first <= r.last and r.first <= last:
                    found.append(f"{name} holds {r.topic}[{r.partition}] {first}-{last}")
        return found

    def _index_file(self, footer: FileFooter) -> None:
        self._indexed.add(footer.name)
        self._advance(footer)
        if footer.rows:
            t = self.output.read_columns(footer.name, ["bucket", "id", "etag"])
            hashes = np.fromiter(
                (object_version_hash(b, k, e or "") for b, k, e in zip(*(t.column(c).to_pylist() for c in ("bucket", "id", "etag")))),
                dtype=np.uint64,
                count=t.num_rows,
            )
            self.index.add_many(hashes)

    def _advance(self, footer: FileFooter) -> None:
        for r in footer.offsets:
            key = (r.topic, r.partition)
            self._next_offsets[key] = max(self._next_offsets.get(key, 0), r.last + 1)
            self._spans.setdefault(key, []).append((r.first, r.last, footer.name))


def recover(ledger: OutputLedger, identity: dict[str, str], force: bool = False) -> None:
    """A consumer's start-up on the output side, before any record is fetched, in this order:

        1. the manifest: create it, or refuse an output built with another      OutputConfigMismatch
           configuration (`identity`: topic, group, models) unless `force`
        2. discard dead writers' in-progress files, index the finalized ones
           (`OutputLedger.catch_up`)
        3. repair summary.json when the files are ahead of it (a crash between   OutputWriteFailed
           a publish and the summary write, or in the middle of it)

    Blocking (file and object-store I/O): run it in a thread.
    """
    check_manifest(ledger.output, identity, force=force)
    ledger.catch_up()
    if ledger.known_files:
        update_summary(ledger.output)


def update_summary(output: Output) -> None:
    """`publish_summary` where a failure stops the consumer: `OutputWriteFailed`."""
    try:
        publish_summary(output)
    except OSError as exc:
        raise OutputWriteFailed(f"updating summary.json failed: {exc}") from exc


def load_summary(output: Output | str | Path) -> tuple[Aggregates, set[str]] | None:
    """summary.json's aggregates and file set, or None if missing or unreadable."""
    output = as_output(output)
    return parse_summary(output.read_doc(SUMMARY_NAME))


def publish_summary(output: Output | str | Path) -> dict:
    """Bring summary.json up to date with every finalized file, merging only the ones it lacks.

    Called after each finalize; also repairs a summary left behind by a crash between the
    publish and the summary write (or a missing/corrupt summary: rebuilt from footers). One
    compare-and-swap: a writer that raced us is re-read and merged, never overwritten.
    """
    output = as_output(output)
    footers: dict[str, Aggregates] = {}  # footers read in an earlier attempt stay valid

    def change(current: bytes | None) -> bytes | None:
        loaded = parse_summary(current)
        aggregates, included = loaded if loaded else (Aggregates(), set())
        on_store = set(output.finalized())
        if not included <= on_store:  # a file vanished: trust only what is there
            aggregates, included = Aggregates(), set()
        missing = sorted(on_store - included)
        if not missing and loaded is not None:
            return None  # already up to date
        for name in missing:
            if name not in footers:
                footers[name] = output.read_footer(name).aggregates
            aggregates.merge(footers[name])
            included.add(name)
        return render_summary(aggregates, included)

    return orjson.loads(output.update_doc(SUMMARY_NAME, change) or b"{}")


def rebuild_aggregates(output: Output | str | Path) -> tuple[Aggregates, list[str]]:
    """Aggregates recomputed from the row data itself (checks the incremental summary)."""
    output = as_output(output)
    agg = Aggregates()
    names = []
    for name in output.finalized():
        names.append(name)
        footer = output.read_footer(name)
        # errors/skips live only in footers; row statistics are recomputed from the data
        agg.errors.update(footer.aggregates.errors)
        agg.skipped += footer.aggregates.skipped
        agg.duplicates += footer.aggregates.duplicates
        agg.superseded += footer.aggregates.superseded
        if not footer.rows:
            continue
        try:
            t = output.read_columns(name, list(ROW_COLUMNS))
        except (pa.ArrowInvalid, KeyError):  # a file written before the utterance columns
            t = output.read_columns(name, list(ROW_COLUMNS[:8]))
        agg.add_columns(t)
    return agg, names
