"""The consumer's dead letters: one bounded record per input that cannot become a row, with its
typed reason, written before the input's offset may commit.

The record is the DLQ format of `broker/dead_letter.py` (`event`, `error_type`, `error`,
`failed_at` as `2026-11-01T12:00:00.000Z`, `truncated`, bounded by `DeadLetterLimits`); the
consumer's context says where the input came from:

    source      {topic, partition, offset}: the message it was
    object      {bucket, key, etag}: the object it named (`etag` null when the event had none)

`event` is the message value as text (invalid UTF-8 replaced), or the event re-serialized when
the message held none; `error_type` is the class name of the `PermanentError`.

The message key names the source position and the object: `topic:partition:offset:bucket/key`.
One message may hold several events (an S3 `Records[]` list), hence the object part.

Exactly once, durable together with the rows: a dead letter is not sent when its batch is
applied but carried in the table commit that covers its offset (its commitInfo metadata,
pipeline/output/table.py; the file's footer holds a copy), and sent after that commit is durable,
before its offsets are committed to the broker. A crash, fence or drain timeout before the commit
loses the rows and their dead letters together (the restart decides the input again: one row or
one dead letter). A crash after it leaves the table ahead of the broker's commit; the next owner
of the partition reads the topic from the marks the commit holds (`resend_missing`) and sends only
the dead letters not found there. The topic is created
with `cleanup.policy=delete` (broker/topics.py), never compacted. When that key's UTF-8
would exceed `max_key_bytes`, or the object's name is not valid UTF-8 (a lone surrogate), the
object part becomes `sha256:<hex of "bucket/key">`: `topic:partition:offset:sha256:<hex>`; it
holds no `/`, so it is never mistaken for an object name. When even that does not fit, or is
not valid UTF-8 (a topic name near the limit, or with a lone surrogate), the whole key is
`sha256:<hex of "topic:partition:offset:bucket/key">`.
The hashes are of the names' UTF-8 bytes, lone surrogates encoded as they are.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from datetime import datetime

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import TopicPartition

from broker.dead_letter import DEFAULT_LIMITS, DeadLetterLimits, readable_key
from broker.dead_letter import dead_letter_record as bounded_record
from pipeline.batch import Failure, WorkItem
from pipeline.errors import DeadLetterFailed
from pipeline.output.footer import FileFooter, PendingDeadLetter
from pipeline.output.table import TableCommit

log = logging.getLogger(__name__)

READ_BACK_SECONDS = 60.0  # reading the DLQ back from a footer's marks: a restart's one-off, bounded

__all__ = ["DEFAULT_LIMITS", "DeadLetterLimits", "DeadLetterWriter", "dead_letter_key", "dead_letter_record",
           "encode_dead_letter", "event_bytes"]


def encode_dead_letter(
    f: Failure, limits: DeadLetterLimits = DEFAULT_LIMITS, now: datetime | None = None
) -> tuple[bytes, bytes]:
    """The DLQ message for one failure, (key, value): `len(key) + len(value) <= limits.max_record_bytes`."""
    key = dead_letter_key(f, limits.max_key_bytes)
    value = orjson.dumps(dead_letter_record(f, limits, now, budget=limits.max_record_bytes - len(key)))
    return key, value


def dead_letter_key(f: Failure, max_key_bytes: int = DEFAULT_LIMITS.max_key_bytes) -> bytes:
    """`topic:partition:offset:bucket/key`, or `topic:partition:offset:sha256:<hex>` when too long."""
    src, ev = f.item.source, f.item.event
    return readable_key(f"{src.topic}:{src.partition}:{src.offset}:", f"{ev.bucket}/{ev.key}", max_key_bytes)


def dead_letter_record(
    f: Failure, limits: DeadLetterLimits = DEFAULT_LIMITS, now: datetime | None = None, budget: int | None = None
) -> dict:
    """The record for one failure; its JSON is at most `budget` bytes (default: `max_record_bytes`)."""
    item, ev = f.item, f.item.event
    context = {
        "source": {"topic": item.source.topic, "partition": item.source.partition, "offset": item.source.offset},
        "object": {"bucket": ev.bucket, "key": ev.key, "etag": ev.etag},
    }
    return bounded_record(event_bytes(item), f.error.error_type, str(f.error), context, limits, now, budget)


def event_bytes(item: WorkItem) -> bytes:
    """What the `event` text stands for: the message value, or the event re-serialized when the
    item has none (a message without a value)."""
    if item.raw is not None:
        return item.raw
    r2 = item.event.to_r2_dict()
    try:
        return orjson.dumps(r2)
    except orjson.JSONEncodeError:  # a lone surrogate in a name: the standard library escapes it
        return json.dumps(r2).encode()


class DeadLetterWriter:
    """Encodes, sends and - after a crash - reconciles the consumer's dead letters.

    `reader` is a group-less consumer of the dead-letter topic (`make_consumer(settings,
    group_id=None)`): it answers where the topic ends (`marks`) and reads it back (`resend_missing`)."""

    def __init__(self, producer: AIOKafkaProducer, topic: str, limits: DeadLetterLimits = DEFAULT_LIMITS,
                 reader: AIOKafkaConsumer | None = None) -> None:
        self.producer = producer
        self.topic = topic
        self.limits = limits
        self.reader = reader

    def encode(self, f: Failure) -> tuple[bytes, bytes]:
        return encode_dead_letter(f, self.limits)

    async def send(self, failures: list[Failure]) -> None:
        """Returns once the broker acknowledged every dead letter; raises DeadLetterFailed otherwise."""
        await self.send_pending([PendingDeadLetter(f.item.source.topic, f.item.source.partition,
                                                   f.item.source.offset, *self.encode(f)) for f in failures])

    async def send_pending(self, pending: list[PendingDeadLetter]) -> None:
        """Send encoded dead letters; returns once the broker acknowledged each (DeadLetterFailed otherwise)."""
        if not pending:
            return
        try:
            futures = [await self.producer.send(self.topic, d.value, key=d.key) for d in pending]
            await asyncio.gather(*futures)
        except Exception as exc:
            raise DeadLetterFailed(f"could not write {len(pending)} dead letters to {self.topic}: {exc}") from exc

    async def _partitions(self) -> list[TopicPartition]:
        assert self.reader is not None, "a DeadLetterWriter without a reader cannot mark or read back"
        await self.reader.topics()  # metadata of every topic: the DLQ is not subscribed
        return [TopicPartition(self.topic, p) for p in sorted(self.reader.partitions_for_topic(self.topic) or ())]

    async def marks(self) -> dict[int, int]:
        """Per DLQ partition, an offset at or before its end now (Tansu's end offsets can be early,
        which only makes a read-back longer): dead letters sent later lie at or after it."""
        try:
            ends = await self.reader.end_offsets(await self._partitions())  # type: ignore[union-attr]
        except Exception as exc:
            raise DeadLetterFailed(f"could not read where {self.topic} ends: {exc}") from exc
        return {tp.partition: off for tp, off in ends.items()}

    async def resend_missing(self, footers: "list[FileFooter | TableCommit]") -> int:
        """The dead letters these table commits (or files) carry that the topic lacks (read from
        their marks to its end), sent now. Returns how many were sent."""
        wanted = [d for f in footers for d in f.dead_letters]
        if not wanted:
            return 0
        starts: dict[int, int] = {}
        for f in footers:
            for p, o in f.dlq_marks.items():
                starts[p] = min(o, starts.get(p, o))
        found = await self._keys_from(starts)
        missing = []
        need = Counter()
        for d in wanted:
            need[d.key] += 1
            if need[d.key] > found.get(d.key, 0):
                missing.append(d)
        if missing:
            log.warning("sending %d dead letter(s) that a finalized file holds but %s lacks", len(missing), self.topic)
        await self.send_pending(missing)
        return len(missing)

    async def _keys_from(self, starts: dict[int, int]) -> Counter:
        """Counts of the message keys in the DLQ from `starts` (partition -> offset) to its end."""
        reader = self.reader
        assert reader is not None
        tps = [tp for tp in await self._partitions() if tp.partition in starts or not starts]
        found: Counter = Counter()
        if not tps:
            return found
        try:
            reader.assign(tps)
            for tp in tps:
                reader.seek(tp, starts.get(tp.partition, 0))
            ends = await reader.end_offsets(tps)
            deadline = time.monotonic() + READ_BACK_SECONDS
            while True:
                batch = await reader.getmany(*tps, timeout_ms=500)
                for records in batch.values():
                    found.update(r.key for r in records)
                positions = [await reader.position(tp) for tp in tps]
                if not batch and all(pos >= ends[tp] for pos, tp in zip(positions, tps)):
                    return found  # at the end, and a poll found nothing more
                if time.monotonic() > deadline:
                    raise DeadLetterFailed(f"reading {self.topic} back did not reach its end in {READ_BACK_SECONDS:.0f} s")
        except DeadLetterFailed:
            raise
        except Exception as exc:
            raise DeadLetterFailed(f"could not read {self.topic} back: {exc}") from exc
        finally:
            reader.unsubscribe()
