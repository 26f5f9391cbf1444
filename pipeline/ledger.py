"""What an output already holds, read from its Delta table (local or object store).

Two questions recovery must answer from the table, never from the broker alone:
- how far has each source partition been handled? The app transaction of each partition in the
  latest snapshot (`next_offset`): a commit to the broker can be lost in a crash after the table
  commit, the table commit cannot. Nothing lists data/ or reads a footer.
- was this object version `(bucket, key, etag)` already written? A checkpoint of 8-byte hashes
  beside the table (`_state/dedupe.bin`, outside data/ so VACUUM leaves it alone) with the table
  version it covers, plus three columns of only the files added since (named by the commits'
  metadata): a restart reads the files of the last few commits, not every file.

`recover` is a consumer's start-up on the output side; `OutputLedger.catch_up` what each
assignment repeats of it (other consumers may have committed meanwhile); `commit_file` the
finalize's table commit with its checks.
"""

from __future__ import annotations

import logging
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import Fenced, FilesRemovedMeanwhile, OutputNotMigrated, OutputWriteFailed, TableGap
from .manifest import check_manifest
from .output import FileFooter, OffsetRange, Output, as_output
from .output.layout import SUMMARY_NAME, part_name
from .output.table import (COMMIT_ATTEMPTS, META_REMOVED, META_REMOVED_VERSIONS, TableCommit, add_action, app_id,
                           commit_metadata)
from .records import SCHEMA, object_version_hash, version_hashes
from .summary import ROW_COLUMNS, Aggregates, SummaryState, parse_summary, render_summary

log = logging.getLogger(__name__)


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
        """Merge many at once: one sort of the whole index however many there are."""
        self._merge(np.asarray(hashes, dtype=np.uint64))

    def discard_many(self, hashes: np.ndarray) -> None:
        """Forget object versions (a delete took their rows out): a re-upload makes a row again."""
        self._merge()
        self._sorted = np.setdiff1d(self._sorted, np.asarray(hashes, dtype=np.uint64), assume_unique=False)

    def hashes(self) -> np.ndarray:
        self._merge()
        return self._sorted

    def _merge(self, extra: np.ndarray | None = None) -> None:
        parts = [self._sorted, np.fromiter(self._recent, dtype=np.uint64, count=len(self._recent))]
        if extra is not None:
            parts.append(extra)
        self._sorted = np.unique(np.concatenate(parts))
        self._recent.clear()

    @property
    def nbytes(self) -> int:
        return int(self._sorted.nbytes) + len(self._recent) * 64


@dataclass(frozen=True)
class ObjectDelete:
    """A delete event: the rows of (bucket, key) written from events before it leave the table.

    "Before": in the delete's own partition (every event of one object shares a Kafka key, so one
    partition), a lower offset; a row from another topic or partition (a backfill), an event time
    at or before the delete's (either time unknown: before).

    `version_id` (S3 `ObjectRemoved:Delete` of one version in a versioned bucket): only rows of that
    version go, plus rows with no version id that are "before" (written before the column existed,
    or from an unversioned event): their version is unknown, and keeping a row whose owner may have
    deleted it is the wrong way to err (consent first). No `version_id` (R2, lifecycle, a delete
    marker, an unversioned bucket): every version of the key before the delete goes."""

    bucket: str
    key: str
    topic: str
    partition: int
    offset: int
    event_time: datetime | None = None
    version_id: str | None = None

    def removes(self, topic: str, partition: int, offset: int, event_time: datetime | None,
                version_id: str | None = None) -> bool:
        """Whether a row of this object written from the event at (topic, partition, offset), of
        S3 version `version_id`, goes."""
        if self.version_id is not None and version_id is not None and version_id != self.version_id:
            return False
        if (topic, partition) == (self.topic, self.partition):
            return offset < self.offset
        return event_time is None or self.event_time is None or event_time <= self.event_time


DELETE_COLUMNS = ["bucket", "id", "kafka_topic", "kafka_partition", "kafka_offset", "event_time", "version_id"]


def _read_rows(output: Output, name: str, columns: list[str]) -> pa.Table:
    """The file's `columns`; a file written before `version_id` existed reads it as nulls."""
    try:
        return output.read_columns(name, columns)
    except pa.ArrowInvalid:
        if "version_id" not in columns:
            raise
        t = output.read_columns(name, [c for c in columns if c != "version_id"])
        return t.add_column(columns.index("version_id"), "version_id", pa.nulls(t.num_rows, pa.string()))


@dataclass
class DeletePlan:
    """A delete's rewrite as planned on table version `based_on`: the files to remove, the Add
    actions of their rewrites (already in data/), what was removed, and the finalized file's fate."""

    based_on: int | None
    removes: list[str]
    adds: list[dict]
    written: list[str]  # rewrites published into data/ (taken back if the commit fails)
    removed: Aggregates
    versions: list[tuple[str, str, str]]
    footer_name: str | None  # the finalized file's name in the commit (its rewrite's), None: no row left
    footer_rows: int


STATE_DEDUPE = "_state/dedupe.bin"  # beside the table: VACUUM never touches it


def dedupe_checkpoint(version: int, hashes: np.ndarray) -> bytes:
    """`<json header>\n<little-endian uint64 hashes>`: the index as of table `version`."""
    head = orjson.dumps({"format": 1, "table_version": version, "count": int(hashes.size)})
    return head + b"\n" + np.ascontiguousarray(hashes, dtype="<u8").tobytes()


def parse_dedupe_checkpoint(doc: bytes | None) -> tuple[int, np.ndarray] | None:
    if not doc:
        return None
    try:
        head, _, body = doc.partition(b"\n")
        meta = orjson.loads(head)
        hashes = np.frombuffer(body, dtype="<u8").astype(np.uint64)
        if meta.get("format") != 1 or hashes.size != meta["count"]:
            return None
        return int(meta["table_version"]), hashes
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


class OutputLedger:
    """One consumer's view of the table: positions, the dedupe index, and the commit with its checks.

    `group` names the app transactions (`<group>:<topic>:<partition>`, pipeline/output/table.py)."""

    def __init__(self, output: Output | str | Path, group: str = "metavoice-consumer") -> None:
        self.output = as_output(output)
        self.table = self.output.table
        self.group = group
        self.index = DedupeIndex()
        self._read_version: int | None = None  # commits up to this table version are in the index
        self._own: set[str] = set()  # our own commits not read back yet: their rows are in the index
        self._seen: dict[tuple[str, int], int] = {}  # the highest version seen per partition (gap check)
        self._refreshing = threading.Lock()
        self.files_read = 0  # data files read for the index (three columns each): the restart's cost
        self.deleted_rows = 0  # rows this consumer's deletes took out of the table

    def app(self, topic: str, partition: int) -> str:
        return app_id(self.group, topic, partition)

    def load_checkpoint(self) -> int | None:
        """Start the index from `_state/dedupe.bin` (a start-up, before any row is applied)."""
        found = parse_dedupe_checkpoint(self.output.read_doc(STATE_DEDUPE))
        if found is None:
            return None
        version, hashes = found
        with self._refreshing:
            self.index = DedupeIndex()
            self.index.add_many(hashes)
            self._read_version = version
        return version

    def save_checkpoint(self) -> None:
        """Write the index as of the commits read (call before any row of ours is applied: the
        index must hold the table's object versions only)."""
        if self._read_version is None:
            return
        with self._refreshing:
            version = self._read_version
            data = dedupe_checkpoint(version, self.index.hashes())

        def newer(current: bytes | None) -> bytes | None:
            # Never back: a checkpoint `metavoice compact` wrote past a vacuum must not be replaced
            # by one that names files the vacuum deleted.
            found = parse_dedupe_checkpoint(current)
            return data if found is None or found[0] < version else None

        self.output.update_doc(STATE_DEDUPE, newer)

    def checkpoint(self) -> None:
        """Catch up with every commit (others' too), then checkpoint the index. Only when no row of
        ours is applied but uncommitted: the index must hold the table's object versions alone."""
        self.refresh()
        self.save_checkpoint()

    def refresh(self) -> int:
        """Read the table's commits since the last read (whoever wrote them): offsets, and the
        object versions of the files they added. Returns how many commits were new.

        Thread-safe: an assignment and a finalize may refresh at the same time."""
        with self._refreshing:
            if self.table.refresh() is None:
                return 0
            commits = self.table.commits(self._read_version)
            # in log order: ("hashes", the versions a commit recorded), ("file", a file to read them
            # from), ("forget", the versions a delete removed)
            steps: list[tuple[str, Any]] = []
            removed: list[Any] = []
            for c in commits:
                if c.commit_id in self._own:  # ours: its rows entered the index when they were applied
                    self._own.discard(c.commit_id)
                    continue
                if c.versions is not None:  # a consumer's commit names its object versions: no file read
                    steps.append(("hashes", c.versions))
                else:  # a migrate's (a compaction names no file of ours: its rows are indexed already)
                    steps.extend(("file", name) for name, rows in c.files if rows)
                if c.removed_versions:  # a delete: the versions indexed before it, then forget these
                    steps.append(("forget", c.removed_versions))
                    removed.append(c.removed_versions)
            first = 0 if self._read_version is None else self._read_version + 1
            why: object = None
            if len(commits) < self.table.version + 1 - first:  # log entries cleaned up (log retention)
                why = "log entries are gone"
            else:
                try:
                    self._apply(steps)
                except FileNotFoundError as gone:
                    why = gone
            if why is not None:
                # what the live files hold is the table now: forget every version a delete named,
                # then index the live files (a version deleted and uploaded again is in them)
                for versions in removed:
                    self.index.discard_many(_version_hashes(versions))
                self._apply([("file", name) for name in self._moved(first, why)])
            self._read_version = self.table.version
        if commits:
            log.info("read %d table commits (%d object versions indexed)", len(commits), len(self.index))
        return len(commits)

    def _apply(self, steps: list[tuple[str, Any]]) -> None:
        """Index the commits' object versions and forget the deleted ones, in log order: everything
        between two deletes is merged at once (merging per file rebuilt the array per file)."""
        batches: list[np.ndarray] = []
        for kind, what in steps:
            if kind != "forget":
                batches.append(what if kind == "hashes" else self._hashes_of(what))
                continue
            if batches:
                self.index.add_many(np.concatenate(batches))
                batches = []
            self.index.discard_many(_version_hashes(what))
        if batches:
            self.index.add_many(np.concatenate(batches))

    def _moved(self, first: int, why: object) -> list[str]:
        """A file named since the last read was compacted and vacuumed, or log entries since then
        were cleaned up: the rows now live in files no commit of ours names. Index every live file
        once (a start from a checkpoint older than a vacuum; `metavoice compact` checkpoints before
        it vacuums, so this is rare). A compacted file not vacuumed yet is still read directly:
        it holds the same rows."""
        live = self.table.file_names()
        log.warning("the table changed under the dedupe checkpoint since version %d (%s): indexing all %d live files",
                    first, why, len(live))
        return live

    def _hashes_of(self, name: str) -> np.ndarray:
        t = self.output.read_columns(name, ["bucket", "id", "etag"])
        self.files_read += 1
        return version_hashes(t)

    def catch_up(self) -> int:
        """Discard the in-progress files of dead writers (their events were never committed), then
        `refresh`: what the table holds now, whoever wrote it. Returns how many commits are new."""
        self.output.discard_orphans()
        return self.refresh()

    @property
    def table_version(self) -> int | None:
        return self.table.version

    def next_offset(self, topic: str, partition: int) -> int | None:
        """First offset of the partition not yet committed to the table (as of the last refresh)."""
        v = self.table.stored(self.app(topic, partition))
        return None if v is None else v + 1

    def already_written(self, bucket: str, key: str, etag: str) -> bool:
        return object_version_hash(bucket, key, etag) in self.index

    def check(self, offsets: list[OffsetRange]) -> list[str]:
        """Before an upload: what the snapshot says already holds any of `offsets` (another consumer
        committed them: this one lost the partitions). Raises `TableGap` when a partition's version
        went back. The snapshot as of the last read (the last commit, the last assignment): the
        commit reads the log again and checks again, so this only spares a doomed upload."""
        if self.table.version is None:
            self.table.refresh()
        return self._conflicts(offsets, {(r.topic, r.partition): self.table.stored(self.app(r.topic, r.partition))
                                         for r in offsets})

    def _conflicts(self, offsets: list[OffsetRange], stored: dict[tuple[str, int], int | None]) -> list[str]:
        found = []
        for r in offsets:
            key = (r.topic, r.partition)
            v, seen = stored.get(key), self._seen.get(key)
            if seen is not None and (v is None or v < seen):
                raise TableGap(f"the table's version of {r.topic}[{r.partition}] went back from {seen} to {v}: "
                               f"a commit vanished from {self.table.uri} (restored or rewritten log?); stopping "
                               "so nothing is written twice or lost")
            if v is not None:
                self._seen[key] = v
                if v >= r.first:
                    found.append(f"the table holds {r.topic}[{r.partition}] up to {v}, this file starts at {r.first}")
        return found

    def commit_file(self, footer: FileFooter, deletes: "list[ObjectDelete] | tuple" = ()) -> int:
        """The finalize's table commit: the file's Add action (none for a file of no row) and one app
        transaction per partition it covers, version = its last offset; its aggregates and dead
        letters in the commit's metadata. Checked against the stored versions before each attempt;
        a file another consumer beat is removed from data/ and `Fenced` raised. Returns the version.

        `deletes` (the delete events among the file's offsets) go in the same commit: the files
        holding their rows are removed and rewritten without them (the finalized file too), so the
        app transaction that says "handled up to the delete" and the removal land together or not
        at all. A compaction that removed one of those files meanwhile: planned again."""
        commit_id = uuid.uuid4().hex
        apps = {(r.topic, r.partition): self.app(r.topic, r.partition) for r in footer.offsets}

        def check(stored: dict[tuple[str, int], int | None]) -> None:
            conflicts = self._conflicts(footer.offsets, stored)
            if conflicts:
                raise Fenced(f"another consumer already committed offsets of {footer.name} ({'; '.join(conflicts[:3])}): "
                             "this consumer lost those partitions; its file is removed and nothing is committed - "
                             "restart it to resume from the table")

        self._own.add(commit_id)
        plan: DeletePlan | None = None
        try:
            for attempt in range(COMMIT_ATTEMPTS):
                plan = self._plan_deletes(footer, deletes, check) if deletes else None
                name, rows = (plan.footer_name, plan.footer_rows) if plan else (footer.name if footer.rows else None,
                                                                                footer.rows)
                files = [(name, rows)] if name else []
                versions = footer.versions  # None: not known (a footer read back): readers read the file
                if versions is not None and plan is not None and plan.versions:  # rewritten without the deleted
                    versions = np.setdiff1d(versions, _version_hashes(plan.versions)) if name else versions[:0]
                metadata = commit_metadata(commit_id, files, footer.offsets, footer.aggregates, footer.dead_letters,
                                           footer.dlq_marks, versions)
                adds = [add_action(footer.name, footer.size, footer.rows)] if footer.rows and not plan else []
                if plan:
                    adds = plan.adds
                    metadata[META_REMOVED] = orjson.dumps(plan.removed.to_state()).decode()
                    metadata[META_REMOVED_VERSIONS] = orjson.dumps(plan.versions).decode()
                try:
                    version = self.table.commit(adds, footer.offsets, apps, metadata, check,
                                                removes=plan.removes if plan else [],
                                                based_on=plan.based_on if plan else None)
                    break
                except FilesRemovedMeanwhile as exc:
                    log.info("delete: %s; planning it again on the latest version (attempt %d)", exc, attempt + 1)
                    self._take_back(plan)
                    plan = None
            else:
                raise OutputWriteFailed(f"a delete kept losing its files to other commits ({COMMIT_ATTEMPTS} tries)")
        except BaseException:
            self._own.discard(commit_id)
            if footer.rows:
                self.output.remove(footer.name)
            self._take_back(plan)
            raise
        if plan is not None:
            self.deleted_rows += plan.removed.utterances
            if plan.versions:
                self.index.discard_many(_version_hashes(plan.versions))
            if footer.rows and plan.footer_name != footer.name:
                self.output.remove(footer.name)  # rewritten without the deleted rows: not in the table
            log.info("delete: %d event(s) removed %d row(s) of %d object version(s) (table version %d)",
                     len(deletes), plan.removed.utterances, len(plan.versions), version)
        for r in footer.offsets:
            self._seen[(r.topic, r.partition)] = r.last
        return version

    def _take_back(self, plan: "DeletePlan | None") -> None:
        for name in plan.written if plan else []:
            self.output.remove(name)

    def _plan_deletes(self, footer: FileFooter, deletes, check) -> DeletePlan:
        """Find the rows of the deleted objects in the table's latest version (and in the finalized
        file) and write each file holding any of them again without them. Cost: the key columns of
        every data file of the table are read (row-group statistics are not kept by our Add
        actions), so a delete costs a scan of the key columns; rows are rewritten only where they
        matched."""
        from deltalake import DeltaTable

        self.table.refresh()
        based_on = self.table.version
        check({(r.topic, r.partition): self.table.stored(self.app(r.topic, r.partition)) for r in footer.offsets})
        dt = DeltaTable(self.table.uri, version=based_on, storage_options=self.table.options or None)
        names = dt.get_add_actions(flatten=True).column("path").to_pylist()
        by_key: dict[tuple[str, str], list[ObjectDelete]] = {}
        for d in deletes:
            by_key.setdefault((d.bucket, d.key), []).append(d)
        plan = DeletePlan(based_on, [], [], [], Aggregates(), [], footer.name if footer.rows else None, footer.rows)
        candidates = sorted(names) + ([footer.name] if footer.rows else [])
        surviving: set[tuple[str, str, str]] = set()
        for name in candidates:
            keys = _read_rows(self.output, name, DELETE_COLUMNS + ["etag"])
            cols = {c: keys.column(c).to_pylist() for c in DELETE_COLUMNS + ["etag"]}
            mask = [any(d.removes(t, p, o, et, v) for d in by_key.get((b, k), ()))
                    for b, k, t, p, o, et, v in zip(*(cols[c] for c in DELETE_COLUMNS))]
            # a row that stays keeps its (bucket, key, etag) in the dedupe index: another version
            # with the same bytes (so the same etag) may be the one deleted
            surviving.update((b, k, e or "") for b, k, e, m in zip(cols["bucket"], cols["id"], cols["etag"], mask)
                             if not m and (b, k) in by_key)
            if not any(mask):
                continue
            full = _read_rows(self.output, name, SCHEMA.names)
            keep_mask = pa.array([not m for m in mask])
            gone, kept = full.filter(pa.array(mask)), full.filter(keep_mask)
            plan.removed.add_columns(gone.select([c for c in ROW_COLUMNS if c in gone.column_names]))
            plan.versions.extend({(b, k, e or "") for b, k, e in zip(*(gone.column(c).to_pylist()
                                                                       for c in ("bucket", "id", "etag")))})
            new_name = None
            if kept.num_rows:
                new_name = part_name(f"del{uuid.uuid4().hex[:8]}", 0)
                spooled = self.output.spool / f".{new_name}.rewrite"
                self.output.spool.mkdir(parents=True, exist_ok=True)
                pq.write_table(kept.cast(SCHEMA), spooled)
                size = spooled.stat().st_size
                self.output.publish(spooled, new_name)
                plan.written.append(new_name)
                plan.adds.append(add_action(new_name, size, kept.num_rows))
            if footer.rows and name == footer.name:
                plan.footer_name, plan.footer_rows = new_name, kept.num_rows
            else:
                plan.removes.append(name)
        if plan.footer_name == footer.name and footer.rows:
            plan.adds.append(add_action(footer.name, footer.size, footer.rows))
        plan.versions = sorted(set(plan.versions) - surviving)
        return plan

    def dead_letter_commits(self, topic: str, partition: int, committed: int | None) -> list[TableCommit]:
        """The table's commits carrying dead letters of the partition at offsets at or after
        `committed` (the broker's commit; None: nothing committed): their dead letters may not have
        been sent (a crash between the table commit and the broker's). Walks the log back from its
        latest entry only as far as the partition's offsets reach `committed`."""
        self.table.refresh()
        latest = self.table.version
        if latest is None:
            return []
        depth = 16
        while True:
            commits = self.table.commits(max(-1, latest - depth))
            found, reached = [], False
            for c in commits:
                for r in c.offsets:
                    if (r.topic, r.partition) != (topic, partition):
                        continue
                    if committed is not None and r.first <= committed:
                        reached = True
                    if c.dead_letters and (committed is None or r.last >= committed):
                        found.append(c)
            if reached or latest - depth < 0:
                return [c for c in found
                        if any(d.topic == topic and d.partition == partition for d in c.dead_letters)]
            depth *= 4

    def settle(self, topic: str, partition: int, committed: int) -> None:
        """The broker holds `committed` for the partition (kept for the committer's interface: the
        table needs no bookkeeping of what the broker has)."""


def recover(ledger: OutputLedger, identity: dict[str, str], force: bool = False) -> None:
    """A consumer's start-up on the output side, before any record is fetched, in this order:

        1. the manifest: create it, or refuse an output built with another      OutputConfigMismatch
           configuration (`identity`: topic, group, models) unless `force`
        2. refuse an output of 0.1 (Parquet files under data/, no table)         OutputNotMigrated
        3. the table: open it, or create it with the dataset's schema
        4. the dedupe index: the checkpoint beside the table, then the object versions the
           commits since name (their files only for a commit that names none: a migrate); a new
           checkpoint when there were any
        5. discard dead writers' in-progress files (`OutputLedger.catch_up`)
        6. bring summary.json up to the table's version (commits since only;   OutputWriteFailed
           none for a table with no commit yet)

    Blocking (file and object-store I/O): run it in a thread.
    """
    check_manifest(ledger.output, identity, force=force)
    if ledger.table.refresh() is None and ledger.output.listed():
        raise OutputNotMigrated(
            f"{ledger.output.location}/data/ holds Parquet files of metavoice 0.1 but no Delta table: run "
            f"`metavoice migrate {ledger.output.location}` once (it commits the files with their footer offsets), "
            "then start the consumer again")
    ledger.table.ensure()
    ledger.load_checkpoint()
    if ledger.catch_up() and ledger.table_version:  # commits since the checkpoint (not just the table's creation)
        ledger.save_checkpoint()
    if ledger.table_version:  # anything committed since the table was created
        update_summary(ledger.output)


def migrate_output(output: Output | str | Path, group: str = "metavoice-consumer") -> int | None:
    """Make a 0.1 output (Parquet files under data/, no Delta log) a table: one commit adding every
    file, its app transactions at the highest offset the footers hold per partition, its metadata
    the merged footer aggregates (what `metavoice migrate OUTPUT` runs). Returns the version, or None
    when there was nothing to migrate. Refuses an output that already has a table. Dead letters in
    0.1 footers are not carried: 0.1 sent them before it committed the offsets that follow."""
    output = as_output(output)
    if output.table.refresh() is not None:
        raise OutputWriteFailed(f"{output.location} already has a Delta table: nothing to migrate")
    names = output.listed()
    if not names:
        return None
    footers = [output.read_footer(n) for n in names]
    spans: dict[tuple[str, int], OffsetRange] = {}
    aggregates = Aggregates()
    for f in footers:
        aggregates.merge(f.aggregates)
        for r in f.offsets:
            have = spans.setdefault((r.topic, r.partition), OffsetRange(r.topic, r.partition, r.first, r.last))
            have.first, have.last = min(have.first, r.first), max(have.last, r.last)
    offsets = sorted(spans.values(), key=lambda r: (r.topic, r.partition))
    commit_id = uuid.uuid4().hex
    metadata = commit_metadata(commit_id, [(f.name, f.rows) for f in footers], offsets, aggregates)
    adds = [add_action(f.name, output.data_size(f.name), f.rows) for f in footers]
    apps = {(r.topic, r.partition): app_id(group, r.topic, r.partition) for r in offsets}
    version = output.table.commit(adds, offsets, apps, metadata, lambda stored: None)
    update_summary(output)
    log.info("migrated %s: %d files committed as table version %d", output.location, len(names), version)
    return version


def update_summary(output: Output) -> None:
    """`publish_summary` where a failure stops the consumer: `OutputWriteFailed`."""
    try:
        publish_summary(output)
    except OSError as exc:
        raise OutputWriteFailed(f"updating summary.json failed: {exc}") from exc


def load_summary(output: Output | str | Path) -> SummaryState | None:
    """summary.json's aggregates and the table version they cover, or None if missing or unreadable."""
    output = as_output(output)
    return parse_summary(output.read_doc(SUMMARY_NAME))


def publish_summary(output: Output | str | Path) -> dict:
    """Bring summary.json up to the table's latest version, merging only the aggregates of the
    commits since the version it covers (from the commits' metadata; no data file, no listing).

    Called after each finalize; also repairs a summary left behind by a crash between a table
    commit and the summary write (or a missing/corrupt one: rebuilt from every commit's metadata).
    One compare-and-swap: a writer that raced us is re-read and merged, never overwritten.
    """
    output = as_output(output)
    # the snapshot as the last commit left it (a finalize's own): the summary records the version it
    # covers, and commits after it are merged by the next update
    if output.table.version is None and output.table.refresh() is None:
        return {}
    latest = output.table.version
    read: dict[int, TableCommit] = {}  # commits read in an earlier attempt stay valid

    def change(current: bytes | None) -> bytes | None:
        nonlocal latest
        state = parse_summary(current)
        if state is not None and state.table_version > latest:
            output.table.refresh()  # another writer's summary is ahead of our snapshot: catch up
            latest = output.table.version
            if state.table_version > latest:
                state = None  # written for another table (a re-created output): rebuild
        if state is not None and state.table_version == latest:
            return None  # already up to date
        base = state or SummaryState(Aggregates(), -1, 0)
        missing = [v for v in range(base.table_version + 1, latest + 1) if v not in read]
        if missing:
            for c in output.table.commits(min(missing) - 1):
                read[c.version] = c
        aggregates, files = base.aggregates, base.parquet_files
        stale: set[str] = set()
        for v in range(base.table_version + 1, latest + 1):
            c = read.get(v)
            if c is None:
                continue
            if c.aggregates is not None:
                aggregates.merge(c.aggregates)
            if c.removed is not None:
                stale.update(aggregates.subtract(c.removed))
            files += commit_file_delta(c)
        if stale:  # a deleted row held a min or max: read the rows left (the cost of a delete at an extreme)
            aggregates.recompute_extremes(stale, live_row_aggregates(output, latest))
        return render_summary(aggregates, SummaryState(aggregates, latest, files))

    return orjson.loads(output.update_doc(SUMMARY_NAME, change) or b"{}")


def _version_hashes(versions: list[tuple[str, str, str]]) -> np.ndarray:
    return np.fromiter((object_version_hash(b, k, e) for b, k, e in versions), dtype=np.uint64, count=len(versions))


def commit_file_delta(c: TableCommit) -> int:
    """How a commit changed the number of data files (ours add one; a compaction, a delete remove some)."""
    return int(c.metrics.get("num_added_files", 0)) - int(c.metrics.get("num_removed_files", 0))


def rebuild_aggregates(output: Output | str | Path) -> tuple[Aggregates, list[str]]:
    """Aggregates recomputed from the row data of the table's files (checks the incremental
    summary); what made no row (errors, skips, duplicates) from the commits' metadata."""
    output = as_output(output)
    agg = Aggregates()
    if output.table.refresh() is None:
        return agg, []
    agg.merge_rowless(output.table.rowless())
    names = output.finalized()
    agg.merge(_row_aggregates(output, names))
    return agg, names


def live_row_aggregates(output: Output, version: int) -> Aggregates:
    """The aggregates of the rows in table `version` (read from every data file of it)."""
    from deltalake import DeltaTable

    dt = DeltaTable(output.table.uri, version=version, storage_options=output.table.options or None)
    return _row_aggregates(output, dt.get_add_actions(flatten=True).column("path").to_pylist())


def _row_aggregates(output: Output, names: list[str]) -> Aggregates:
    agg = Aggregates()
    for name in names:
        try:
            t = output.read_columns(name, list(ROW_COLUMNS))
        except (pa.ArrowInvalid, KeyError):  # a file written before the utterance columns
            t = output.read_columns(name, list(ROW_COLUMNS[:8]))
        agg.add_columns(t)
    return agg
