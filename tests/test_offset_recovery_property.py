"""Offset recovery as a property: for any log and any interleaving of micro-batches, rolls,
failed commits, rebalances and crashes (at every crash point of the commit path), a final
restart leaves every (partition, offset) that carries a new object version in the Parquet files
exactly once, footers that cover each partition's log once, a committed offset at the end of
the log, and a summary.json equal to the aggregates recomputed from the rows.

Pure: the partitioned log and the group's committed offsets live in memory (no broker); the
real Batcher, OutputCommitter, RollingParquetWriter, OutputLedger and summary code run against
a temporary directory, and restarts position partitions with the same functions app.py uses
(`consumer.positions.resume_offset` / `lagging_commit`). A crash is a `Crash` raised from a
crash point instead of SIGKILL, after which nothing of the old process is used again.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from unittest import mock

import numpy as np
import orjson
from aiokafka.errors import CommitFailedError
from aiokafka.structs import ConsumerRecord, TopicPartition
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import consumer.committer
import pipeline.summary
from consumer.batcher import Batcher
from consumer.committer import OutputCommitter
from consumer.positions import lagging_commit, resume_offset
from pipeline.batch import BatchOutcome
from pipeline.events import ObjectEvent
from pipeline.ledger import OutputLedger, publish_summary
from pipeline.parquet import RollingParquetWriter, discard_orphaned_inprogress, finalized_files
from pipeline.records import TranscribedAudio
from tests.consumer_process import assert_offsets_contiguous, assert_summary_matches_files, output_rows

TOPIC = "events"
CRASH_POINTS = [None, "before_finalize", "after_rename", "mid_summary_write", "after_summary", "after_commit"]


class Crash(Exception):
    """The process died here (SIGKILL in production)."""


# --- the world: a partitioned log and a broker that remembers committed offsets ------------------
def build_log(spec: list[list[tuple[str, int]]]) -> dict[int, list[ConsumerRecord]]:
    """Per partition, records from (kind, n): "ok" a new object version, "repeat" the n-th earlier
    version of the partition published again, "poison" a message that is not JSON."""
    log: dict[int, list[ConsumerRecord]] = {}
    for p, kinds in enumerate(spec):
        records, versions = [], []
        for offset, (kind, n) in enumerate(kinds):
            if kind == "poison":
                value = b"{not json"
            else:
                if kind == "repeat" and versions:
                    event = versions[n % len(versions)]
                else:
                    event = ObjectEvent(bucket="b", key=f"p{p}/o{offset}.flac", etag=f"{p:02d}{offset:030d}")
                    versions.append(event)
                value = event.to_json()
            records.append(ConsumerRecord(TOPIC, p, offset, 0, 0, None, value, None, 0, len(value), ()))
        log[p] = records
    return log


class Broker:
    """What aiokafka's consumer offers the committer: its assignment and offset commits."""

    def __init__(self, partitions: int) -> None:
        self.tps = {TopicPartition(TOPIC, p) for p in range(partitions)}
        self.committed: dict[TopicPartition, int] = {}
        self.fail_next_commit = False

    def assignment(self) -> set[TopicPartition]:
        return set(self.tps)

    async def commit(self, offsets) -> None:
        if self.fail_next_commit:
            self.fail_next_commit = False
            raise CommitFailedError("the group rebalanced")
        for tp, meta in offsets.items():
            assert meta.offset >= self.committed.get(tp, 0), "a commit moved backwards"
            self.committed[tp] = meta.offset


class DeadLetters:
    def __init__(self) -> None:
        self.sent: list[tuple[int, int]] = []

    async def send(self, failures) -> None:
        self.sent.extend((f.item.source.partition, f.item.source.offset) for f in failures)


def process(batch) -> BatchOutcome:
    """Stands in for download/decode/transcribe/tokenize: one row per work item."""
    rows = [
        TranscribedAudio(
            id=it.event.key, bucket=it.event.bucket, etag=it.event.etag or "", size_bytes=1, event_time=None,
            duration_sec=1.0 + it.source.offset, sampling_rate=16_000, channels=1, transcription="x" * (it.source.offset % 5),
            language="en", segments=[], tokens=np.zeros((2, 1 + it.source.offset % 3), np.int16), tokenizer="synthetic",
            token_frame_rate=75.0, whisper_model="fake", kafka_topic=it.source.topic, kafka_partition=it.source.partition,
            kafka_offset=it.source.offset, processed_at=datetime.now(timezone.utc),
        )
        for it in batch.items
    ]
    return BatchOutcome(rows=rows)


# --- one consumer process ----------------------------------------------------------------------
class Process:
    """Start-up as StreamConsumer.run does it, then micro-batches applied by the real committer."""

    def __init__(self, out: Path, broker: Broker, dlq: DeadLetters, roll_max_rows: int) -> None:
        discard_orphaned_inprogress(out)
        self.ledger = OutputLedger(out)
        self.ledger.refresh()
        if finalized_files(out):
            publish_summary(out)
        self.broker = broker
        self.writer = RollingParquetWriter(out, roll_max_rows, roll_max_seconds=3600)
        self.committer = OutputCommitter(broker, self.writer, self.ledger, dlq)  # type: ignore[arg-type]
        self.batcher = Batcher(self.ledger, max_events=1000, max_bytes=1 << 30, linger_ms=0)
        self.position: dict[int, int] = {}

    async def assign(self) -> None:
        """StreamConsumer.on_assigned: resume past what the files hold; commit what the broker lacks."""
        self.ledger.refresh()
        lagging = {}
        for tp in self.broker.tps:
            committed, from_files = self.broker.committed.get(tp), self.ledger.next_offset(tp.topic, tp.partition)
            self.position[tp.partition] = resume_offset(committed, from_files) or 0  # None: auto_offset_reset earliest
            if (behind := lagging_commit(committed, from_files)) is not None:
                lagging[tp] = behind
        await self.committer.commit_recovered(lagging)

    async def batch(self, log: dict[int, list[ConsumerRecord]], n: int, partitions: list[int]) -> None:
        for p in partitions:
            records = log[p][self.position[p] : self.position[p] + n]
            for rec in records:
                self.batcher.add(rec)
            self.position[p] += len(records)
        pending = self.batcher.take()
        if pending is not None and pending.records:
            await self.committer.apply(pending, process(pending.micro_batch()))

    async def revoke(self) -> None:
        """StreamConsumer.on_revoked (nothing is in flight between steps here), then re-assignment."""
        await self.committer.finalize_and_commit()
        self.committer.forget(set(self.broker.tps))
        await self.assign()

    def die(self) -> None:
        """SIGKILL: the in-progress file stays on disk, the writer's liveness lock is released."""
        self.writer._liveness.close()  # what the kernel does to a dead process's flock


# --- the property ----------------------------------------------------------------------------------
record = st.tuples(st.sampled_from(["ok", "ok", "ok", "repeat", "poison"]), st.integers(0, 5))
step = st.one_of(
    st.tuples(st.just("batch"), st.integers(1, 3), st.lists(st.integers(0, 2), min_size=1, max_size=3, unique=True)),
    st.tuples(st.just("roll")),
    st.tuples(st.just("commit_fails")),
    st.tuples(st.just("revoke")),
    st.tuples(st.just("crash"), st.sampled_from(CRASH_POINTS)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    spec=st.lists(st.lists(record, max_size=8), min_size=1, max_size=3),
    steps=st.lists(step, max_size=25),
    roll_max_rows=st.integers(1, 4),
)
def test_any_interleaving_of_batches_rolls_commits_and_crashes_keeps_each_offset_exactly_once(spec, steps, roll_max_rows):
    log = build_log(spec)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        broker, dlq = Broker(len(log)), DeadLetters()
        armed: list[str | None] = [None]

        def crash_point(name: str) -> None:
            if armed[0] == name:
                raise Crash(name)

        async def run() -> None:
            proc = Process(out, broker, dlq, roll_max_rows)
            await proc.assign()
            for s in steps:
                if s[0] == "batch":
                    await proc.batch(log, s[1], [p for p in s[2] if p in log])
                elif s[0] == "roll":
                    await proc.committer.finalize_and_commit()
                elif s[0] == "commit_fails":
                    broker.fail_next_commit = True
                elif s[0] == "revoke":
                    await proc.revoke()
                elif s[0] == "crash":
                    armed[0] = s[1]
                    try:
                        if s[1] is not None:
                            await proc.committer.finalize_and_commit()
                    except Crash:
                        pass
                    armed[0] = None
                    proc.die()
                    proc = Process(out, broker, dlq, roll_max_rows)
                    await proc.assign()
            # the final run: everything left, then a graceful stop
            await proc.batch(log, 1000, list(log))
            await proc.committer.finalize_and_commit()
            proc.writer.close()
            # one more start on the finished stream: nothing to do, but a commit lost above is caught up
            again = Process(out, broker, dlq, roll_max_rows)
            await again.assign()
            again.writer.close()
            assert again.position == {p: len(records) for p, records in log.items()}

        with mock.patch.object(consumer.committer, "crash_point", crash_point), \
                mock.patch.object(pipeline.summary, "crash_point", crash_point):
            asyncio.run(run())

        check(out, log, broker, dlq)


def check(out: Path, log: dict[int, list[ConsumerRecord]], broker: Broker, dlq: DeadLetters) -> None:
    first_seen: dict[bytes, tuple[int, int]] = {}
    poison = set()
    for p, records in log.items():
        for r in records:
            if r.value.startswith(b"{not"):
                poison.add((p, r.offset))
            else:
                ev = orjson.loads(r.value)
                first_seen.setdefault(orjson.dumps([ev["bucket"], ev["object"]["key"], ev["object"]["eTag"]]), (p, r.offset))

    rows = output_rows(out)
    at = Counter((r["kafka_partition"], r["kafka_offset"]) for r in rows)
    assert not {k: n for k, n in at.items() if n > 1}, "an offset became two rows"
    assert set(at) == set(first_seen.values()), "rows should be exactly the first publication of each object version"
    assert len({(r["bucket"], r["id"], r["etag"]) for r in rows}) == len(rows)

    ends = {p: len(records) for p, records in log.items()}
    assert_offsets_contiguous(out, ends)
    assert {tp.partition: off for tp, off in broker.committed.items() if off} == {p: e for p, e in ends.items() if e}
    if finalized_files(out):
        summary = assert_summary_matches_files(out)["aggregates"]
        assert sum(summary.errors.values()) == len(poison), "each poison message is counted once in the files"
    assert set(dlq.sent) == poison  # dead-lettered at least once; a crash before the file may repeat one
