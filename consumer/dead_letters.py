"""Dead letters: one JSON record per input that cannot become a row, with its typed reason.

The DLQ key is the source position (`topic:partition:offset:index`), so a dead letter written
twice (a crash after the DLQ write but before the file was finalized) is recognisable and a
compacted DLQ topic keeps one copy.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone

import orjson
from aiokafka import AIOKafkaProducer

from pipeline.batch import Failure
from pipeline.errors import DeadLetterFailed


def dead_letter_record(f: Failure) -> dict:
    raw = f.item.raw
    if raw is None:
        event_text = orjson.dumps(f.item.event.to_r2_dict()).decode()
    else:
        event_text = raw.decode("utf-8", errors="replace")
    return {
        "event": event_text,
        "error_type": f.error.error_type,
        "error": str(f.error),
        "failed_at": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        "source": {"topic": f.item.source.topic, "partition": f.item.source.partition, "offset": f.item.source.offset},
        "object": {"bucket": f.item.event.bucket, "key": f.item.event.key, "etag": f.item.event.etag},
    }


class DeadLetterWriter:
    def __init__(self, producer: AIOKafkaProducer, topic: str) -> None:
        self.producer = producer
        self.topic = topic

    async def send(self, failures: list[Failure]) -> None:
        """Returns once the broker acknowledged every dead letter; raises DeadLetterFailed otherwise."""
        if not failures:
            return
        try:
            futures = []
            for f in failures:
                src, ev = f.item.source, f.item.event
                key = f"{src.topic}:{src.partition}:{src.offset}:{ev.bucket}/{ev.key}".encode()
                futures.append(await self.producer.send(self.topic, orjson.dumps(dead_letter_record(f)), key=key))
            await asyncio.gather(*futures)
        except Exception as exc:
            raise DeadLetterFailed(f"could not write {len(failures)} dead letters to {self.topic}: {exc}") from exc
