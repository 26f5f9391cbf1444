"""Micro-batching: Kafka records in, `PendingBatch`es out, closed on max events, bytes or linger.

Every record is accounted for in the batch that holds its offset, whether it becomes work
(an object to process), a delete (its rows leave the table in the commit of the file holding its
offset: `OutputLedger.commit_file`), a skip (other actions, S3 test event), a duplicate (that object
version is already in the output) or an immediate failure (a malformed message, one with more
than `max_events_per_message` events, an event for a bucket outside the allowed ones).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiokafka.structs import ConsumerRecord, TopicPartition

from pipeline.batch import Failure, MicroBatch, SourceRef, WorkItem
from pipeline.errors import BucketNotAllowed, CrashLoop, MalformedEvent, PermanentError
from pipeline.events import DELETE_ACTIONS, parse_event_payload
from pipeline.ledger import ObjectDelete, OutputLedger
from pipeline.output import OffsetRange
from pipeline.output.footer import PendingDeadLetter
from pipeline.parquet import SourceOutcome
from pipeline.records import TranscribedAudio


@dataclass
class PendingBatch:
    seq: int
    items: list[WorkItem] = field(default_factory=list)
    early_failures: list[Failure] = field(default_factory=list)
    # where each skip (not a creation) and each duplicate (that version is already written) came from
    skipped_at: list[SourceRef] = field(default_factory=list)
    duplicate_at: list[SourceRef] = field(default_factory=list)
    # delete events: a batch closes after one (`Batcher.full`), so every row before it in its
    # partition is in the file it is committed with or in the table already, and none after it is
    deletes: list[ObjectDelete] = field(default_factory=list)
    ranges: dict[TopicPartition, list[int]] = field(default_factory=dict)  # tp -> [first, last]
    bytes: int = 0
    records: int = 0
    opened_at: float = field(default_factory=time.monotonic)
    newest_record_ms: int = 0  # broker timestamp of the newest record (latency metrics)

    @property
    def skipped(self) -> int:
        return len(self.skipped_at)

    @property
    def duplicates(self) -> int:
        return len(self.duplicate_at)

    def micro_batch(self) -> MicroBatch:
        return MicroBatch(self.seq, self.items)

    def offset_ranges(self) -> list[OffsetRange]:
        return [OffsetRange(tp.topic, tp.partition, a, b) for tp, (a, b) in sorted(self.ranges.items())]

    def by_source(self, rows: list[TranscribedAudio], dropped: list[TranscribedAudio], failures: list[Failure],
                  superseded: list[WorkItem],
                  encode: Callable[[Failure], tuple[bytes, bytes]] | None = None) -> list[SourceOutcome]:
        """What each record of the batch became, by its offset: the rows to write, and the counts
        of dead letters (`failures`), skips, duplicates (the batcher's, and `dropped` rows already
        written) and superseded versions. A file holds a record's counts with its offset, so a
        batch split across files keeps summary.json exact after a crash between two of them."""
        out: dict[tuple[str, int, int], SourceOutcome] = {}

        def at(topic: str, partition: int, offset: int) -> SourceOutcome:
            o = out.get((topic, partition, offset))
            if o is None:
                o = out[(topic, partition, offset)] = SourceOutcome(topic, partition, offset)
            return o

        for r in rows:
            o = at(r.kafka_topic, r.kafka_partition, r.kafka_offset)
            o.rows.append(r)
            o.aggregates.add_row(r)
        for r in dropped:  # one duplicate per event: its first utterance stands for the others
            if r.utterance == 0:
                at(r.kafka_topic, r.kafka_partition, r.kafka_offset).aggregates.duplicates += 1
        for f in failures:
            src = f.item.source
            o = at(src.topic, src.partition, src.offset)
            o.aggregates.add_error(f.error.error_type)
            if encode is not None:  # the file holding this offset carries the dead letter (footer.py)
                o.dead_letters.append(PendingDeadLetter(src.topic, src.partition, src.offset, *encode(f)))
        for it in superseded:
            at(it.source.topic, it.source.partition, it.source.offset).aggregates.superseded += 1
        for ref in self.skipped_at:
            at(ref.topic, ref.partition, ref.offset).aggregates.skipped += 1
        for ref in self.duplicate_at:
            at(ref.topic, ref.partition, ref.offset).aggregates.duplicates += 1
        for d in self.deletes:
            at(d.topic, d.partition, d.offset).aggregates.delete_events += 1
        return list(out.values())

    def in_flight(self) -> dict[tuple[str, int], list[int]]:
        """Offsets whose processing could kill the process (the crash-loop breaker's markers)."""
        out: dict[tuple[str, int], list[int]] = {}
        for it in self.items:
            out.setdefault((it.source.topic, it.source.partition), []).append(it.source.offset)
        for f in self.early_failures:  # a CrashLoop verdict is cleared with the batch (crash_guard.begin)
            if isinstance(f.error, CrashLoop):
                out.setdefault((f.item.source.topic, f.item.source.partition), []).append(f.item.source.offset)
        return out

    def partitions(self) -> set[TopicPartition]:
        return set(self.ranges)


class Batcher:
    def __init__(
        self, ledger: OutputLedger, max_events: int, max_bytes: int, linger_ms: int, *,
        allowed_buckets: frozenset[str] | None = None, max_events_per_message: int = 1000,
        backlog_max_events: int | None = None,
    ) -> None:
        self.ledger = ledger
        self.max_events = max_events
        # Under a backlog (every pipeline slot busy) a batch keeps growing to this instead of
        # closing at `max_events`: fewer, larger micro-batches, so per-batch costs (a Prefect flow
        # run, a summary update) are paid per hundreds of events. Idle streams keep small batches.
        self.backlog_max_events = max(max_events, backlog_max_events or max_events)
        self.backlog = False
        self.max_bytes = max_bytes
        self.linger = linger_ms / 1000.0
        self.allowed_buckets = allowed_buckets  # None: any bucket
        self.max_events_per_message = max_events_per_message
        self._seq = 0
        self._open: PendingBatch | None = None
        # objects deleted since the start: a create of one is never called a duplicate here (the
        # index still holds the deleted version until the delete's commit); the committer checks
        # the index again when it applies the batch, after that commit
        self._deleted_keys: set[tuple[str, str]] = set()

    def add(self, record: ConsumerRecord) -> None:
        b, source = self._account(record)
        try:
            events = parse_event_payload(record.value)
            if len(events) > self.max_events_per_message:
                raise MalformedEvent(f"the message holds {len(events)} events, over max_events_per_message="
                                     f"{self.max_events_per_message}: split it at the sender")
        except PermanentError as exc:
            b.early_failures.append(Failure(WorkItem(_unknown_event(), source, record.value), exc))
            return
        if not events:
            b.skipped_at.append(source)
        for ev in events:
            if ev.action in DELETE_ACTIONS and (self.allowed_buckets is None or ev.bucket in self.allowed_buckets):
                b.deletes.append(ObjectDelete(ev.bucket, ev.key, source.topic, source.partition, source.offset,
                                              ev.event_time, ev.version_id))
                self._deleted_keys.add((ev.bucket, ev.key))
            elif not ev.is_create:
                b.skipped_at.append(source)
            elif self.allowed_buckets is not None and ev.bucket not in self.allowed_buckets:
                b.early_failures.append(Failure(WorkItem(ev, source, record.value), BucketNotAllowed(
                    f"bucket {ev.bucket!r} is not in METAVOICE_ALLOWED_BUCKETS; nothing was downloaded")))
            elif (ev.etag and (ev.bucket, ev.key) not in self._deleted_keys
                  and self.ledger.already_written(ev.bucket, ev.key, ev.etag)):
                b.duplicate_at.append(source)
            else:
                b.items.append(WorkItem(ev, source, record.value))
                b.bytes += ev.size or 0

    def add_failed(self, record: ConsumerRecord, error: PermanentError) -> None:
        """Account the record as a dead letter without parsing or processing it."""
        b, source = self._account(record)
        b.early_failures.append(Failure(WorkItem(_unknown_event(), source, record.value), error))

    def _account(self, record: ConsumerRecord) -> tuple[PendingBatch, SourceRef]:
        b = self._open or self._new()
        tp = TopicPartition(record.topic, record.partition)
        span = b.ranges.get(tp)
        if span is None:
            b.ranges[tp] = [record.offset, record.offset]
        else:
            span[1] = record.offset
        b.records += 1
        b.newest_record_ms = max(b.newest_record_ms, record.timestamp or 0)
        return b, SourceRef(record.topic, record.partition, record.offset)

    @property
    def event_limit(self) -> int:
        return self.backlog_max_events if self.backlog else self.max_events

    def full(self) -> bool:
        b = self._open
        return b is not None and (len(b.items) >= self.event_limit or b.bytes >= self.max_bytes or bool(b.deletes))

    def due(self, now: float | None = None) -> bool:
        b = self._open
        if b is None:
            return False
        now = time.monotonic() if now is None else now
        return self.full() or (now - b.opened_at) >= self.linger

    def seconds_until_due(self) -> float | None:
        if self._open is None:
            return None
        return max(0.0, self._open.opened_at + self.linger - time.monotonic())

    def take(self) -> PendingBatch | None:
        b, self._open = self._open, None
        return b

    def discard(self, partitions: set[TopicPartition]) -> None:
        """Forget buffered records of revoked partitions: they were never processed or committed."""
        b = self._open
        if b is None or not (b.partitions() & partitions):
            return
        # Rebuilding is simpler and safer than surgery: drop the whole open batch.
        # Records of partitions we keep are fetched again after the seek on re-assignment.
        self._open = None

    def _new(self) -> PendingBatch:
        self._seq += 1
        self._open = PendingBatch(self._seq)
        return self._open


def _unknown_event():
    from pipeline.events import ObjectEvent

    return ObjectEvent(bucket="", key="", action="Unknown")
