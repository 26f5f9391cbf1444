"""Kafka side of every producer: create the topics, publish events durably (acks=all).

Topics are created for replay: `retention.ms=-1` (and no size limit) on the events topic and
its DLQ by default. The events topic is the dataset's source of truth: re-running the
pipeline with a new Whisper model or tokenizer means a new consumer group reading the whole
topic from offset 0, which only works if no event ever expired. Events are ~300 bytes, so a
million objects cost ~300 MB of log. Compaction is deliberately not used: it would keep only
the newest event per `bucket/key` and drop the history a replay or an audit needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, AsyncIterator, Iterable

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaConnectionError, KafkaError, TopicAlreadyExistsError
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential_jitter

from pipeline.config import Settings
from pipeline.errors import MalformedEvent
from pipeline.events import ObjectEvent

from .errors import KafkaUnavailable

log = logging.getLogger(__name__)

# How long a producer waits for a broker that is down at start-up before giving up.
BROKER_WAIT_SECONDS = 120
# Largest event record (key + value) a producer sends: under aiokafka's max_request_size and
# Kafka's default message.max.bytes (both 1 MiB) with room for the batch overhead. An event is
# ~300 bytes; a bigger one is refused as malformed instead of failing in Kafka on every retry.
MAX_EVENT_RECORD_BYTES = 1_000_000


@dataclass
class TopicReport:
    created: list[str] = field(default_factory=list)
    existing: list[str] = field(default_factory=list)
    # Existing topics whose retention differs from the wanted one: name -> current retention.ms.
    retention_mismatch: dict[str, str] = field(default_factory=dict)


def topic_configs(settings: Settings) -> dict[str, str]:
    return {
        "retention.ms": str(settings.topic_retention_ms),
        "retention.bytes": "-1",
        "cleanup.policy": "delete",
    }


async def ensure_topics(settings: Settings, wait_seconds: float = BROKER_WAIT_SECONDS) -> TopicReport:
    """Create the events topic and its DLQ when missing; existing topics are left as they are."""
    admin = AIOKafkaAdminClient(**settings.kafka_client_kwargs())
    await _start_with_retry(admin.start, settings, wait_seconds)
    report = TopicReport()
    try:
        existing = set(await admin.list_topics())
        configs = topic_configs(settings)
        names = [settings.topic, settings.dlq_topic]
        wanted = [
            NewTopic(name, settings.topic_partitions, settings.topic_replication, topic_configs=configs)
            for name in names
            if name not in existing
        ]
        report.existing = [n for n in names if n in existing]
        if wanted:
            try:
                await admin.create_topics(wanted)
                log.info("created topics %s", ", ".join(t.name for t in wanted))
            except TopicAlreadyExistsError:  # another producer won the race
                pass
            report.created = [t.name for t in wanted]
        if report.existing:
            report.retention_mismatch = await _retention_mismatch(admin, report.existing, configs["retention.ms"])
    finally:
        await admin.close()
    return report


async def _retention_mismatch(admin: AIOKafkaAdminClient, topics: list[str], wanted: str) -> dict[str, str]:
    """Best effort: brokers without DescribeConfigs just get no warning."""
    try:
        responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, t) for t in topics])
    except (KafkaError, NotImplementedError, ValueError) as exc:
        log.debug("cannot describe topic configs: %s", exc)
        return {}
    found: dict[str, str] = {}
    for response in responses:
        for resource in response.resources:
            name, entries = resource[3], resource[4]
            for entry in entries:
                if entry[0] == "retention.ms" and entry[1] is not None and entry[1] != wanted:
                    found[name] = entry[1]
    return found


@contextlib.asynccontextmanager
async def event_publisher(
    settings: Settings, wait_seconds: float = BROKER_WAIT_SECONDS
) -> AsyncIterator["EventPublisher"]:
    producer = make_producer(settings)
    await _start_with_retry(producer.start, settings, wait_seconds)
    try:
        yield EventPublisher(producer, settings.topic, settings.dlq_topic)
    finally:
        await producer.stop()


def make_producer(settings: Settings) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        **settings.kafka_client_kwargs(),
        acks="all",
        enable_idempotence=False,
        linger_ms=5,
        max_batch_size=1 << 20,
    )


class EventPublisher:
    def __init__(self, producer: AIOKafkaProducer, topic: str, dlq_topic: str = "") -> None:
        self._producer = producer
        self.topic = topic
        self.dlq_topic = dlq_topic or f"{topic}.dlq"

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

    async def publish_many(self, events: Iterable[ObjectEvent]) -> int:
        """Send all, then wait for every acknowledgement; raises if any failed."""
        futures = [await self.send(e) for e in events]
        if futures:
            await asyncio.gather(*futures)
        return len(futures)

    async def send_dead_letter(self, raw: str, exc: Exception, key: bytes | None = None, **context: Any):
        """Queue a dead letter on the DLQ topic; the future resolves on acknowledgement."""
        return await self._producer.send(self.dlq_topic, dead_letter(raw, exc, **context), key=key)


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


def dead_letter(raw: str, exc: Exception, **context: Any) -> bytes:
    """The DLQ record: the original text, why it failed, when; `context` says where it came from."""
    return orjson.dumps(
        {
            "event": raw,
            "error_type": getattr(exc, "error_type", type(exc).__name__),
            "error": str(exc),
            "failed_at": datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            **context,
        }
    )


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


async def _start_with_retry(start, settings: Settings, wait_seconds: float = BROKER_WAIT_SECONDS) -> None:
    if wait_seconds <= 0:
        try:
            await start()
        except KafkaConnectionError as exc:
            raise KafkaUnavailable(f"Kafka at {settings.kafka_bootstrap} is unreachable: {exc}") from exc
        return
    async for attempt in AsyncRetrying(
        retry=retry_if_exception_type(KafkaConnectionError),
        wait=wait_exponential_jitter(multiplier=0.5, max=5),
        stop=stop_after_delay(wait_seconds),
        reraise=True,
        before_sleep=lambda rs: log.warning(
            "waiting for Kafka at %s (attempt %d): %s",
            settings.kafka_bootstrap,
            rs.attempt_number,
            rs.outcome.exception() if rs.outcome else "",
        ),
    ):
        with attempt:
            await start()
