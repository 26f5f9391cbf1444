"""The commit path: batch outcomes in, durable files and committed offsets out.

Outcomes are applied strictly in batch order (batches may finish out of order). For each:
drop object versions already written, write dead letters (acknowledged), append rows to the
open file. When the file is due to roll - or on revoke, shutdown, idle exit - `finalize_and_commit`
runs its steps in this order, each failure typed:

    1. finalize the file (footer with offset ranges, fsync, fenced publish:      OutputWriteFailed
       rename + fsync dir, or an upload to the object store)                    Fenced
    2. learn it in the ledger (offsets, object versions)
    3. bring summary.json up to date (compare-and-swap)                         OutputWriteFailed
    4. commit the offsets the file covers                                        (logged: the file
                                                                                  already proves them)
A failure before step 4 never commits: a restart resumes from the files. One finalize runs at a
time (`_finalizing`): a revoke that arrives while the roll timer's finalize is renaming waits for
its commit, so the partitions reach their next owner with the files and the broker up to date.
Step 1 refuses a file whose offsets another consumer's finalized file already holds (`Fenced`):
a consumer that lost its partitions never finalizes or commits rows for them.

Offsets reach the broker one way (`_send`), for three reasons: step 4 (`commit`), and at an
assignment the offsets finalized files hold but the broker lacks (`commit_recovered`) and where a
rewind starts (`commit_rewind`). A failed commit is logged, never raised: the files are the proof.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError
from aiokafka.structs import OffsetAndMetadata, TopicPartition

from pipeline.batch import BatchOutcome, Failure
from pipeline.errors import FatalError
from pipeline.faults import crash_point
from pipeline.ledger import OutputLedger, object_version_hash, update_summary
from pipeline.output import OffsetRange
from pipeline.parquet import RollingParquetWriter
from pipeline.records import to_table
from pipeline.summary import Aggregates

from .batcher import PendingBatch
from .dead_letters import DeadLetterWriter

log = logging.getLogger(__name__)


@dataclass
class CommitStats:
    rows: int = 0
    dead_letters: int = 0
    skipped: int = 0
    duplicates: int = 0
    superseded: int = 0
    files: int = 0
    commits: int = 0
    audio_seconds: float = 0.0
    errors_by_type: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)  # publish -> finalized, seconds


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

    async def apply(self, batch: PendingBatch, outcome: BatchOutcome) -> None:
        self._refuse_after_abort()
        rows, dups = self._drop_written(outcome)
        failures: list[Failure] = batch.early_failures + outcome.failures
        await self.dead_letters.send(failures)
        agg = Aggregates(skipped=batch.skipped, duplicates=batch.duplicates + dups, superseded=len(outcome.superseded))
        for r in rows:
            agg.add_row(r)
        for f in failures:
            agg.add_error(f.error.error_type)
            self.stats.errors_by_type[f.error.error_type] = self.stats.errors_by_type.get(f.error.error_type, 0) + 1
        ranges = [OffsetRange(tp.topic, tp.partition, a, b) for tp, (a, b) in sorted(batch.ranges.items())]
        # Arrow/Parquet encoding is CPU work: keep it off the event loop.
        await asyncio.to_thread(self._append, rows, ranges, agg)
        for r in rows:
            self.ledger.index.add(object_version_hash(r.bucket, r.id, r.etag))
        for tp, (_, last) in batch.ranges.items():
            self._to_commit[tp] = max(self._to_commit.get(tp, 0), last + 1)
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

    def _append(self, rows, ranges, agg) -> None:
        self.writer.append(to_table(rows), ranges, agg)

    def _drop_written(self, outcome: BatchOutcome):
        # An object version's utterance rows come from one event: they are kept (or dropped) together;
        # a duplicate is counted once per event, not per utterance.
        rows, seen, dups = [], {}, 0
        for r in outcome.rows:
            h = object_version_hash(r.bucket, r.id, r.etag)
            source = (r.kafka_topic, r.kafka_partition, r.kafka_offset)
            if h in self.ledger.index or seen.setdefault(h, source) != source:
                dups += r.utterance == 0
                continue
            rows.append(r)
        return rows, dups

    async def finalize_and_commit(self) -> None:
        if self._finalizing.locked():
            log.info("waiting for the finalize in flight (its rename and commit) first")
        async with self._finalizing:
            await self._finalize_and_commit()

    async def _finalize_and_commit(self) -> None:
        if not self.writer.has_open_file:
            return
        self._refuse_after_abort()
        # 1. finalize: footer, fsync, fencing check + publish (rename or upload)
        crash_point("before_finalize")
        finalized = await asyncio.to_thread(self.writer.finalize, self._fence)
        if finalized is None:
            return
        crash_point("after_rename")
        self.stats.files += 1
        now_ms = time.time() * 1000
        self.stats.latencies.extend((now_ms - t) / 1000 for t in self._open_record_ms)
        self._open_record_ms.clear()
        # 2. ledger
        self.ledger.record_finalized(finalized)
        # 3. summary
        await asyncio.to_thread(update_summary, self.writer.output)
        crash_point("after_summary")
        # 4. commit
        await self.commit()
        crash_point("after_commit")

    def _fence(self, offsets: list[OffsetRange]) -> list[str]:
        """Runs in the writer's thread right before the publish: files finalized by others meanwhile."""
        self.ledger.refresh()
        return self.ledger.overlapping(offsets)

    async def commit(self) -> None:
        """Step 4: the offsets the finalized file covers, for the partitions still assigned. A
        commit never moves back (a paranoid check: it would be a bug), and a failed one is only
        logged: the file's footer holds these offsets, recovery seeks past them."""
        self._refuse_after_abort()
        offsets, self._to_commit = self._assigned(self._to_commit), {}
        for tp, off in offsets.items():
            prev = self._committed_check.get(tp, -1)
            if off < prev:
                raise AssertionError(f"refusing to commit {tp} at {off} below {prev}")
        if await self._send(offsets, "offset commit", "the finalized files still hold the positions"):
            self.stats.commits += 1

    async def commit_recovered(self, offsets: dict[TopicPartition, int]) -> None:
        """Offsets that finalized files already hold but the broker lacks (a crash between a
        publish and its commit), where they are ahead of what this process committed. Only these:
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
