"""The dead-letter topic, checked (or created) before the consumer takes its first record.

A missing DLQ either fails every dead letter (the stream stops at the first bad upload) or is
auto-created by the broker with its default retention (dead letters silently expire). So at
start-up the consumer makes sure the DLQ exists and keeps dead letters at least as long as the
events topic keeps events (forever by default: events are the dataset's source of truth).
"""

from __future__ import annotations

import logging

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from pipeline.config import Settings
from pipeline.errors import FatalError

log = logging.getLogger(__name__)


class DeadLetterTopicUnusable(FatalError):
    """The DLQ topic cannot be created, or keeps dead letters shorter than events are kept."""


async def ensure_dead_letter_topic(settings: Settings) -> str:
    """Create the DLQ with the events topic's retention, or check an existing one's. Returns
    "created" or "checked"; raises DeadLetterTopicUnusable with what to do."""
    admin = AIOKafkaAdminClient(**settings.kafka_client_kwargs())
    await admin.start()
    try:
        topics = set(await admin.list_topics())
        events_retention = None
        if settings.topic in topics:
            events_retention = (await _retention_ms(admin, [settings.topic])).get(settings.topic)
        wanted = events_retention if events_retention is not None else settings.topic_retention_ms
        if settings.dlq_topic not in topics:
            configs = {"retention.ms": str(wanted), "retention.bytes": "-1", "cleanup.policy": "delete"}
            try:
                await admin.create_topics(
                    [NewTopic(settings.dlq_topic, 1, settings.topic_replication, topic_configs=configs)]
                )
            except TopicAlreadyExistsError:  # another consumer of the group won the race
                return "checked"
            log.info("created the dead-letter topic %s (retention.ms=%s, as the events topic)", settings.dlq_topic, wanted)
            return "created"
        have = (await _retention_ms(admin, [settings.dlq_topic])).get(settings.dlq_topic)
        if have is not None and _shorter(have, wanted):
            raise DeadLetterTopicUnusable(
                f"the dead-letter topic {settings.dlq_topic} keeps records for retention.ms={have}, less than "
                f"the events topic's {wanted}: dead letters would expire before the events they describe; "
                f"raise it (kafka-configs --alter --add-config retention.ms={wanted}) or set METAVOICE_DLQ_TOPIC"
            )
        return "checked"
    except KafkaError as exc:
        raise DeadLetterTopicUnusable(
            f"cannot check or create the dead-letter topic {settings.dlq_topic}: {type(exc).__name__}: {exc}; "
            "create it with the events topic's retention (python -m producer create-topics)"
        ) from exc
    finally:
        await admin.close()


def _shorter(have: int, wanted: int) -> bool:
    """Whether retention `have` keeps records for less time than `wanted` (-1: forever)."""
    if have < 0:
        return False
    return wanted < 0 or have < wanted


async def _retention_ms(admin: AIOKafkaAdminClient, topics: list[str]) -> dict[str, int]:
    """retention.ms per topic; brokers that cannot describe configs give {} (nothing to check)."""
    try:
        responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, t) for t in topics])
    except (KafkaError, NotImplementedError, ValueError) as exc:
        log.warning("cannot read topic configs (%s): the dead-letter topic's retention is not checked", exc)
        return {}
    found: dict[str, int] = {}
    for response in responses:
        for resource in response.resources:
            name, entries = resource[3], resource[4]
            for entry in entries:
                if entry[0] == "retention.ms" and entry[1] is not None:
                    found[name] = int(entry[1])
    return found
