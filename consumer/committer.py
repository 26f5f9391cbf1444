"""The commit path: batch outcomes in, durable files and committed offsets out.

Outcomes are applied strictly in batch order (batches may finish out of order). For each:
drop object versions already written, append rows - and the encoded dead letters of the records
that made none - to the open file. When the file is due to roll - or on revoke, shutdown, idle
exit - `finalize_and_commit` runs its steps in this order, each failure typed:

    1. finalize the file (footer, fsync), check the table's versions of its       OutputWriteFailed
       partitions, and upload it into the table directory (rename, or a PUT)     Fenced
    2. commit it to the Delta table: its Add action, one app transaction per     Fenced, TableGap
       partition (version = last offset), aggregates and dead letters in the     OutputWriteFailed
       commit's metadata (`OutputLedger.commit_file`: checked again on a conflict)
    3. bring summary.json up to the table's version (compare-and-swap)          OutputWriteFailed
    4. send the file's dead letters (acknowledged)                              DeadLetterFailed
    5. commit the offsets the file covers to the broker                          (logged: the table
                                                                                  already proves them)
A failure before step 2 leaves nothing in the dataset; before step 5 never commits to the broker:
a restart resumes from the table. One finalize runs at a time (`_finalizing`): a revoke that
arrives while the roll timer's finalize is uploading waits for its commits, so the partitions
reach their next owner with the table and the broker up to date. Steps 1 and 2 refuse a file
whose offsets another consumer already committed to the table (`Fenced`): a consumer that lost
its partitions never adds rows for them, and its upload is removed.

A crash between steps 2 and 5 leaves the table ahead of the broker: the partition's next owner
sends the dead letters the DLQ lacks (`resend_dead_letters`), then commits what the table holds.

Offsets reach the broker one way (`_send`), for three reasons: step 5 (`commit`), and at an
assignment the offsets the table holds but the broker lacks (`commit_recovered`) and where a
rewind starts (`commit_rewind`). A failed commit is logged, never raised: the table is the proof.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError
from aiokafka.structs import OffsetAndMetadata, TopicPartition

from pipeline.batch import BatchOutcome, Failure
from pipeline.errors import FatalError
from pipeline.faults import crash_point
from pipeline.ledger import OutputLedger, object_version_hash, update_summary
from pipeline.parquet import BatchAppend, RollingParquetWriter

from .batcher import PendingBatch
from .dead_letters import DeadLetterWriter

log = logging.getLogger(__name__)


# Table commits between two checkpoints of the dedupe index (a few MB per million rows, one PUT): a
# restart after a crash reads at most this many files' three columns; after a clean stop, none.
CHECKPOINT_EVERY = 100
LATENCY_WINDOW = 10_000  # latest publish -> finalized latencies kept: quantiles of recent traffic, bounded memory


class Latencies:
    """Publish -> finalized latencies (seconds): the latest `LATENCY_WINDOW` kept, and how many
    there were in all (`total`) so an observer (the metrics) takes each one once. A list that
    grew per batch held one float per batch for the process's whole uptime."""

    def __init__(self, values: Iterable[float] = (), window: int = LATENCY_WINDOW) -> None:
        self._recent: deque[float] = deque(maxlen=window)
        self.total = 0
        self.extend(values)

    def extend(self, values: Iterable[float]) -> None:
        for v in values:
            self._recent.append(v)
            self.total += 1

    def since(self, seen: int) -> list[float]:
        """The latencies added after the first `seen` (those still in the window)."""
        new = min(self.total - seen, len(self._recent))
        return list(self._recent)[len(self._recent) - new:] if new > 0 else []

    def __len__(self) -> int:
        return len(self._recent)

    def __iter__(self) -> Iterator[float]:
        return iter(self._recent)


@dataclass(frozen=True)
class AppliedCounts:
    """What one applied batch added: rows written, and duplicates (of the batcher and of `apply`)."""

    rows: int
    duplicates: int


@dataclass
class CommitStats:
    rows: int = 0
    dead_letters: int = 0
    skipped: int = 0
    duplicates: int = 0
    superseded: int = 0
    delete_events: int = 0  # delete notifications committed
    deleted_rows: int = 0  # rows they took out of the table
    files: int = 0
    commits: int = 0
    audio_seconds: float = 0.0
    errors_by_type: dict[str, int] = field(default_factory=dict)
    latencies: Latencies = field(default_factory=Latencies)  # publish -> finalized, seconds (bounded)


class OutputCommitter:
    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        writer: RollingParquetWriter,
        ledger: OutputLedger,
        dead_letters: DeadLetterWriter,
    ) -> None:
        self.consumer = consumer
        self.writer = writer
        self.ledger = ledger
        self.dead_letters = dead_letters
        self.stats = CommitStats()
        self._to_commit: dict[TopicPartition, int] = {}
        self._open_record_ms: list[int] = []
        self._committed_check: dict[TopicPartition, int] = {}
        self._aborted = False
        self._finalizing = asyncio.Lock()
        self._since_checkpoint = 0  # table commits since the dedupe index was last checkpointed
        self._deletes: list = []  # the open file's delete events (pipeline/ledger.py ObjectDelete)

    async def apply(self, batch: PendingBatch, outcome: BatchOutcome) -> AppliedCounts:
        """Write the batch's dead letters and rows; returns what it really added (rows already
        written count as duplicates, not rows)."""
        self._refuse_after_abort()
        rows, dropped = self._drop_written(outcome)
        dups = sum(r.utterance == 0 for r in dropped)  # once per event, not per utterance
        failures: list[Failure] = batch.early_failures + outcome.failures
        # dead letters travel in the file that covers their offsets and are sent once it is durable
        for f in failures:
            self.stats.errors_by_type[f.error.error_type] = self.stats.errors_by_type.get(f.error.error_type, 0) + 1
        # --- issue 22: the batch is split across files at roll_max_rows / roll_max_bytes, by record
        # (pipeline/parquet.py append_batch); each full file is finalized and committed on the way.
        # Arrow/Parquet encoding is CPU work: keep it off the event loop.
        part = await asyncio.to_thread(
            BatchAppend, batch.by_source(rows, dropped, failures, outcome.superseded, self.dead_letters.encode),
            batch.offset_ranges())
        for r in rows:  # before a finalize on the way: a later batch's copy of these is a duplicate
            self.ledger.index.add(object_version_hash(r.bucket, r.id, r.etag))
        while not await asyncio.to_thread(self.writer.append_batch, part):
            # the batch's rest is in the index but in no commit yet: no dedupe checkpoint here
            await self.finalize_and_commit(checkpoint=False)
        # --- end issue 22
        if batch.deletes:  # the rows before them are in the open file or the table: commit them now
            self._deletes.extend(batch.deletes)
            self.stats.delete_events += len(batch.deletes)
            await self.finalize_and_commit()
        if batch.newest_record_ms:
            self._open_record_ms.append(batch.newest_record_ms)
        self.stats.rows += len(rows)
        self.stats.dead_letters += len(failures)
        self.stats.skipped += batch.skipped
        self.stats.duplicates += batch.duplicates + dups
        self.stats.superseded += len(outcome.superseded)
        self.stats.audio_seconds += outcome.audio_seconds
        if self.writer.due_to_roll():
            await self.finalize_and_commit()
        return AppliedCounts(rows=len(rows), duplicates=batch.duplicates + dups)

    def _drop_written(self, outcome: BatchOutcome):
        """(rows to write, rows dropped: their object version is already written or earlier in the
        batch). An object version's utterance rows come from one event: kept or dropped together."""
        rows, seen, dropped = [], {}, []
        for r in outcome.rows:
            h = object_version_hash(r.bucket, r.id, r.etag)
            source = (r.kafka_topic, r.kafka_partition, r.kafka_offset)
            if h in self.ledger.index or seen.setdefault(h, source) != source:
                dropped.append(r)
                continue
            rows.append(r)
        return rows, dropped

    async def finalize_and_commit(self, final: bool = False, checkpoint: bool = True) -> None:
        """Steps 1-5 for the open file. Then, between batches (`checkpoint`) with no file open, the
        dedupe index holds exactly what the table holds: every `CHECKPOINT_EVERY` commits, and at a
        `final` stop, it is checkpointed beside the table, so a restart reads no data file (or at
        most the files of the commits since the last checkpoint, after a crash)."""
        if self._finalizing.locked():
            log.info("waiting for the finalize in flight (its rename and commit) first")
        async with self._finalizing:
            await self._finalize_and_commit()
            if (checkpoint and not self.writer.has_open_file and self._since_checkpoint
                    and (final or self._since_checkpoint >= CHECKPOINT_EVERY)):
                await asyncio.to_thread(self.ledger.checkpoint)
                self._since_checkpoint = 0

    async def _finalize_and_commit(self) -> None:
        if not self.writer.has_open_file:
            return
        self._refuse_after_abort()
        # 1. finalize: footer, fsync, the table's versions checked, upload (rename or PUT)
        crash_point("before_finalize")
        # where the DLQ ends before this file's dead letters are sent: a restart reads back from there
        marks = await self.dead_letters.marks() if self.writer.holds_dead_letters else None
        finalized = await asyncio.to_thread(self.writer.finalize, self.ledger.check, marks)
        if finalized is None:
            return
        crash_point("after_rename")
        # 2. the table commit: from here the rows are the dataset's
        deletes, self._deletes = self._deletes, []
        before = self.ledger.deleted_rows
        await asyncio.to_thread(self.ledger.commit_file, finalized, deletes)
        self.stats.deleted_rows += self.ledger.deleted_rows - before
        self._since_checkpoint += 1
        self.stats.files += 1
        now_ms = time.time() * 1000
        self.stats.latencies.extend((now_ms - t) / 1000 for t in self._open_record_ms)
        self._open_record_ms.clear()
        # 3. summary
        await asyncio.to_thread(update_summary, self.writer.output)
        crash_point("after_summary")
        # 4. the dead letters the file carries (acknowledged; a restart sends any that are missing)
        await self.dead_letters.send_pending(finalized.dead_letters)
        crash_point("after_dead_letters")
        # 5. commit what this file holds (issue 22: a split batch commits file by file)
        for r in finalized.offsets:
            tp = TopicPartition(r.topic, r.partition)
            self._to_commit[tp] = max(self._to_commit.get(tp, 0), r.last + 1)
        await self.commit()
        crash_point("after_commit")

    async def commit(self) -> None:
        """Step 4: the offsets the finalized file covers, for the partitions still assigned. A
        commit never moves back (a paranoid check: it would be a bug), and a failed one is only
        logged: the table holds these offsets, recovery seeks past them."""
        self._refuse_after_abort()
        offsets, self._to_commit = self._assigned(self._to_commit), {}
        for tp, off in offsets.items():
            prev = self._committed_check.get(tp, -1)
            if off < prev:
                raise AssertionError(f"refusing to commit {tp} at {off} below {prev}")
        if await self._send(offsets, "offset commit", "the finalized files still hold the positions"):
            self.stats.commits += 1

    async def resend_dead_letters(self, partitions: dict[TopicPartition, int | None]) -> int:
        """At an assignment, before `commit_recovered`: the dead letters of table commits ahead of
        the broker's commit (`partitions`: tp -> committed offset) that the DLQ lacks, sent."""
        commits: dict[int, object] = {}
        for tp, off in partitions.items():
            for c in await asyncio.to_thread(self.ledger.dead_letter_commits, tp.topic, tp.partition, off):
                commits[c.version] = c
        if not commits:
            return 0
        return await self.dead_letters.resend_missing([commits[v] for v in sorted(commits)])

    async def commit_recovered(self, offsets: dict[TopicPartition, int]) -> None:
        """Offsets that the table already holds but the broker lacks (a crash between a table
        commit and the broker's), where they are ahead of what this process committed. Only these:
        what is applied to the open file is not touched."""
        ahead = {tp: off for tp, off in offsets.items() if off > self._committed_check.get(tp, -1)}
        await self._send(self._assigned(ahead), "committing recovered offsets", "the finalized files still hold them")

    async def commit_rewind(self, offsets: dict[TopicPartition, int]) -> None:
        """Where a rewind starts (it may be before the group's committed offset): from now on
        commits never go below it. A failure is logged: the next file's commit catches up."""
        await self._send(self._assigned(offsets), "committing the rewind positions", "they are committed with the next file")

    def _assigned(self, offsets: dict[TopicPartition, int]) -> dict[TopicPartition, int]:
        assignment = self.consumer.assignment()
        return {tp: off for tp, off in offsets.items() if tp in assignment}

    async def _send(self, offsets: dict[TopicPartition, int], what: str, otherwise: str) -> bool:
        """The one way offsets reach the broker; returns whether they did. A `KafkaError` (a
        rebalance, the broker away) is logged, never raised: the files are the proof either way."""
        if not offsets:
            return False
        try:
            await self.consumer.commit({tp: OffsetAndMetadata(off, "") for tp, off in offsets.items()})
        except KafkaError as exc:
            log.warning("%s failed (%s); %s", what, exc, otherwise)
            return False
        self._committed_check.update(offsets)
        for tp, off in offsets.items():
            self.ledger.settle(tp.topic, tp.partition, off)
        return True

    def forget(self, partitions: set[TopicPartition]) -> None:
        for tp in partitions:
            self._committed_check.pop(tp, None)

    def abort(self) -> None:
        """A failure: drop the open file, commit nothing - now or later (safe to call twice).

        Nothing may be finalized after a failure either: a later file's footer would claim the
        offsets of the dropped one (recovery resumes after the highest offset a footer holds).
        """
        self._aborted = True
        self.writer.abort()
        self._to_commit.clear()

    def _refuse_after_abort(self) -> None:
        if self._aborted:
            raise FatalError("the committer was aborted after a failure; restart the consumer to resume from the files")
