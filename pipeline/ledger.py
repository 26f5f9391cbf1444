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

import bisect
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


def file_name_hash(name: str) -> int:
    """A finalized file's name as 8 bytes, for the set of files already indexed."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little", signed=False)


class Spans:
    """The offsets finalized files hold, per partition, as disjoint ranges: a file whose range
    touches or overlaps one already known merges into it. Files cover each partition's offsets
    one after another, so a partition is a handful of ranges however long the consumer runs
    (a list of every file's span grew per file). Each range names its lowest and highest file,
    for the fencing message."""

    def __init__(self) -> None:
        self._by_key: dict[tuple[str, int], list[list]] = {}  # sorted [first, last, low_name, high_name]

    def add(self, key: tuple[str, int], first: int, last: int, name: str) -> None:
        spans = self._by_key.setdefault(key, [])
        i = bisect.bisect_left(spans, first, key=lambda s: s[0])
        start = i - 1 if i > 0 and spans[i - 1][1] >= first - 1 else i
        end = i
        while end < len(spans) and spans[end][0] <= last + 1:
            end += 1
        touched = spans[start:end]
        low = min(touched, key=lambda s: s[0], default=None)
        high = max(touched, key=lambda s: s[1], default=None)
        spans[start:end] = [[
            min(first, low[0]) if low else first,
            max(last, high[1]) if high else last,
            low[2] if low and low[0] < first else name,
            high[3] if high and high[1] > last else name,
        ]]

    def holding(self, key: tuple[str, int], first: int, last: int) -> list[tuple[int, int, str]]:
        """(first, last, files) of each known range that shares an offset with [first, last]."""
        spans = self._by_key.get(key, [])
        i = bisect.bisect_right(spans, last, key=lambda s: s[0])
        found = []
        while i > 0 and spans[i - 1][1] >= first:
            a, b, low, high = spans[i - 1]
            found.append((a, b, low if low == high else f"{low}..{high}"))
            i -= 1
        return found[::-1]

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_key.values())


class OutputLedger:
    def __init__(self, output: Output | str | Path) -> None:
        self.output = as_output(output)
        self.index = DedupeIndex()
        self._indexed = DedupeIndex()  # finalized files already read: their names' hashes (8 bytes each)
        self._known_files = 0
        self._next_offsets: dict[tuple[str, int], int] = {}
        # the offsets finalized files hold, per partition: what fencing checks a new file against
        self._spans = Spans()
        # files carrying dead letters whose offsets may not be committed yet: partition -> {name: last offset}
        # (pruned by `settle` as commits pass them, so it stays a handful)
        self._dead_letter_files: dict[tuple[str, int], dict[str, int]] = {}
        self._refreshing = threading.Lock()

    def refresh(self) -> int:
        """Index finalized files not seen yet (written by us or by other consumers). Returns how many.

        Thread-safe: an assignment and a finalize's fencing check may refresh at the same time."""
        with self._refreshing:
            new = [n for n in self.output.finalized() if file_name_hash(n) not in self._indexed]
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
            if file_name_hash(footer.name) not in self._indexed:  # a concurrent refresh may have read it already
                self._learn(footer.name)
                self._advance(footer)

    def _learn(self, name: str) -> None:
        self._indexed.add(file_name_hash(name))
        self._known_files += 1

    @property
    def known_files(self) -> int:
        return self._known_files

    @property
    def span_count(self) -> int:
        """How many offset ranges fencing keeps (a handful per partition, whatever the uptime)."""
        return len(self._spans)

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
            for first, last, names in self._spans.holding((r.topic, r.partition), r.first, r.last):
                found.append(f"{names} holds {r.topic}[{r.partition}] {first}-{last}")
        return found

    def _index_file(self, footer: FileFooter) -> None:
        self._learn(footer.name)
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
            self._spans.add(key, r.first, r.last, footer.name)
            if footer.dead_letters:
                self._dead_letter_files.setdefault(key, {})[footer.name] = r.last

    def dead_letter_files(self, topic: str, partition: int, committed: int | None) -> list[str]:
        """Finalized files carrying dead letters that hold offsets of the partition at or after
        `committed` (the broker's commit; None: nothing committed): their dead letters may not
        have been sent (a crash between the file and its commit)."""
        files = self._dead_letter_files.get((topic, partition), {})
        return sorted(n for n, last in files.items() if committed is None or last >= committed)

    def settle(self, topic: str, partition: int, committed: int) -> None:
        """The broker holds `committed` for the partition: files below it need no reconciling."""
        files = self._dead_letter_files.get((topic, partition))
        if files:
            for n in [n for n, last in files.items() if last < committed]:
                del files[n]


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
