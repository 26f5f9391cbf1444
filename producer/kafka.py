"""Kafka side of every producer: create the topics, publish events durably (acks=all)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import AsyncIterator, Iterable

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, TopicAlreadyExistsError
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential_jitter

from pipeline.config import Settings
from pipeline.events import ObjectEvent

log = logging.getLogger(__name__)

# How long a producer waits for a broker that is down at start-up before giving up.
BROKER_WAIT_SECONDS = 120


async def ensure_topics(settings: Settings) -> None:
    """Create the events topic and its DLQ when missing; existing topics are left as they are."""
    admin = AIOKafkaAdminClient(**settings.kafka_client_kwargs())
    await _start_with_retry(admin.start, settings)
    try:
        existing = set(await admin.list_topics())
        configs = {"retention.ms": str(settings.topic_retention_ms)}
        wanted = [
            NewTopic(name, settings.topic_partitions, settings.topic_replication, topic_configs=configs)
            for name in (settings.topic, settings.dlq_topic)
            if name not in existing
        ]
        if wanted:
            try:
                await admin.create_topics(wanted)
                log.info("created topics %s", ", ".join(t.name for t in wanted))
            except TopicAlreadyExistsError:  # another producer won the race
                pass
    finally:
        await admin.close()


@contextlib.asynccontextmanager
async def event_publisher(settings: Settings) -> AsyncIterator["EventPublisher"]:
    producer = AIOKafkaProducer(
        **settings.kafka_client_kwargs(),
        acks="all",
        enable_idempotence=False,
        linger_ms=5,
        max_batch_size=1 << 20,
    )
    await _start_with_retry(producer.start, settings)
    try:
        yield EventPublisher(producer, settings.topic)
    finally:
        await producer.stop()


class EventPublisher:
    def __init__(self, producer: AIOKafkaProducer, topic: str) -> None:
        self._producer = producer
        self.topic = topic

    async def publish(self, event: ObjectEvent) -> None:
        """Returns once the broker acknowledged the event."""
        await self._producer.send_and_wait(self.topic, event.to_json(), key=event.message_key)

    async def publish_many(self, events: Iterable[ObjectEvent]) -> int:
        """Send all, then wait for every acknowledgement; raises if any failed."""
        futures = [
            await self._producer.send(self.topic, e.to_json(), key=e.message_key) for e in events
        ]
        if futures:
            await asyncio.gather(*futures)
        return len(futures)


async def _start_with_retry(start, settings: Settings) -> None:
    async for attempt in AsyncRetrying(
        retry=retry_if_exception_type(KafkaConnectionError),
        wait=wait_exponential_jitter(initial=0.5, max=5),
        stop=stop_after_delay(BROKER_WAIT_SECONDS),
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
