"""Publishing events, the producers' side of Kafka: encode, send durably (acks=all), wait for
acknowledgements, dead-letter what is not an event.

Clients, the broker wait, topics and the dead-letter format are shared with the consumer and
live in `broker/`.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, AsyncIterator

from aiokafka import AIOKafkaProducer

from broker.clients import make_producer, start_when_broker_is_up
from broker.dead_letter import DEFAULT_LIMITS, DeadLetterLimits, encode_dead_letter
from pipeline.config import Settings
from pipeline.errors import MalformedEvent
from pipeline.events import ObjectEvent

from .errors import KafkaUnavailable

__all__ = ["EventPublisher", "MAX_EVENT_RECORD_BYTES", "encode_event", "event_publisher", "make_event_producer",
           "wait_acknowledged"]

# Largest event record (key + value) a producer sends: under aiokafka's max_request_size and
# Kafka's default message.max.bytes (both 1 MiB) with room for the batch overhead. An event is
# ~300 bytes; a bigger one is refused as malformed instead of failing in Kafka on every retry.
MAX_EVENT_RECORD_BYTES = 1_000_000


def make_event_producer(settings: Settings) -> AIOKafkaProducer:
    """The producers' client: acks=all, small lingering batches (a backfill sends thousands),
    requests large enough for the largest dead letter the settings allow."""
    return make_producer(settings, enable_idempotence=False, linger_ms=5, max_batch_size=1 << 20,
                         max_request_size=max(1 << 20, settings.dlq_max_record_bytes + 4096))


@contextlib.asynccontextmanager
async def event_publisher(settings: Settings, wait_s: float | None = None) -> AsyncIterator["EventPublisher"]:
    """A started publisher (waiting for the broker up to `kafka_connect_timeout_s`), stopped after."""
    producer = make_event_producer(settings)
    await start_when_broker_is_up(producer, settings, wait_s)
    try:
        yield EventPublisher(producer, settings.topic, settings.dlq_topic, DeadLetterLimits.from_settings(settings))
    finally:
        await producer.stop()


class EventPublisher:
    def __init__(
        self, producer: AIOKafkaProducer, topic: str, dlq_topic: str = "", limits: DeadLetterLimits = DEFAULT_LIMITS
    ) -> None:
        self._producer = producer
        self.topic = topic
        self.dlq_topic = dlq_topic or f"{topic}.dlq"
        self.limits = limits

    async def publish(self, event: ObjectEvent) -> None:
        """Returns once the broker acknowledged the event."""
        key, value = encode_event(event)
        await self._producer.send_and_wait(self.topic, value, key=key)

    async def send(self, event: ObjectEvent) -> "asyncio.Future[Any]":
        """Queue one event; the returned future resolves when the broker acknowledged it."""
        return await self.send_encoded(*encode_event(event))

    async def send_encoded(self, key: bytes, value: bytes) -> "asyncio.Future[Any]":
        """Queue one record made by `encode_event` (encode first, so a bad event fails before any send)."""
        return await self._producer.send(self.topic, value, key=key)

    async def send_dead_letter(self, raw: str, exc: Exception, key: bytes | None = None, **context: Any):
        """Queue a dead letter (the format of `broker.dead_letter`, bounded) on the DLQ topic;
        `context` says where it came from. The future resolves on acknowledgement."""
        key, value = encode_dead_letter(
            raw.encode("utf-8", "surrogatepass"), getattr(exc, "error_type", type(exc).__name__), str(exc),
            context, key, self.limits,
        )
        return await self._producer.send(self.dlq_topic, value, key=key)


def encode_event(event: ObjectEvent) -> tuple[bytes, bytes]:
    """The Kafka record `(key, value)` of one event; MalformedEvent when it cannot be one.

    A parsed event always serializes (`pipeline.events` checks ranges and text); this is the
    last gate before Kafka, so that no input can fail inside the producer, where every retry
    would fail again.
    """
    try:
        key, value = event.message_key, event.to_json()
    except (TypeError, ValueError, OverflowError) as exc:  # UnicodeError is a ValueError
        raise MalformedEvent(f"event cannot be serialized: {type(exc).__name__}: {exc}") from None
    if len(key) + len(value) > MAX_EVENT_RECORD_BYTES:
        raise MalformedEvent(
            f"event is {len(key) + len(value)} bytes serialized, over the {MAX_EVENT_RECORD_BYTES}-byte record limit"
        )
    return key, value


async def wait_acknowledged(futures: list["asyncio.Future[Any]"], timeout: float) -> list[BaseException | None]:
    """Per future: None when the broker acknowledged it within `timeout`, else the failure."""
    if not futures:
        return []
    done, _ = await asyncio.wait(futures, timeout=timeout)
    outcome: list[BaseException | None] = []
    for f in futures:
        if f not in done:
            f.add_done_callback(_retrieve)  # it may still fail later: do not warn about it then
            outcome.append(KafkaUnavailable(f"no acknowledgement from Kafka within {timeout:g} s"))
        elif f.cancelled():
            outcome.append(KafkaUnavailable("send cancelled"))
        else:
            outcome.append(f.exception())
    return outcome


def _retrieve(f: "asyncio.Future[Any]") -> None:
    if not f.cancelled():
        f.exception()
