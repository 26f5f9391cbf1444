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
One message may hold several events (an S3 `Records[]` list), hence the object part. Dead
letters are at-least-once today (issue 19 item 4): one written before a crash, fence or drain
timeout that came before its covering file was finalized is written again by the restart, with
the same key, so a reader can recognise the copy. The topic is created with
`cleanup.policy=delete` (broker/topics.py), never compacted: nothing on the broker removes it. When that key's UTF-8
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
from datetime import datetime

import orjson
from aiokafka import AIOKafkaProducer

from broker.dead_letter import DEFAULT_LIMITS, DeadLetterLimits, readable_key
from broker.dead_letter import dead_letter_record as bounded_record
from pipeline.batch import Failure, WorkItem
from pipeline.errors import DeadLetterFailed

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
    def __init__(self, producer: AIOKafkaProducer, topic: str, limits: DeadLetterLimits = DEFAULT_LIMITS) -> None:
        self.producer = producer
        self.topic = topic
        self.limits = limits

    async def send(self, failures: list[Failure]) -> None:
        """Returns once the broker acknowledged every dead letter; raises DeadLetterFailed otherwise."""
        if not failures:
            return
        try:
            futures = []
            for f in failures:
                key, value = encode_dead_letter(f, self.limits)
                futures.append(await self.producer.send(self.topic, value, key=key))
            await asyncio.gather(*futures)
        except Exception as exc:
            raise DeadLetterFailed(f"could not write {len(failures)} dead letters to {self.topic}: {exc}") from exc
