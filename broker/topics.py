"""The events topic and its dead-letter topic: created when missing, retention checked.

Topics are made for replay: `retention.ms=-1` (and no size limit) on the events topic and its
DLQ by default. The events topic is the dataset's source of truth: re-running the pipeline with
a new Whisper model or tokenizer means a new consumer group reading the whole topic from offset
0, which only works if no event ever expired. Events are ~300 bytes, so a million objects cost
~300 MB of log. Compaction is deliberately not used: it would keep only the newest event per
`bucket/key` and drop the history a replay or an audit needs.

Two callers:

- the producers (`ensure_topics`, also `python -m producer create-topic`) create both topics
  with `topic_partitions` partitions and report, without changing them, existing topics whose
  retention differs from the wanted one;
- the consumer (`ensure_dead_letter_topic`), before its first record, makes sure the DLQ exists
  and keeps dead letters at least as long as the events topic keeps events. A missing DLQ either
  fails every dead letter (the stream stops at the first bad upload) or is auto-created by the
  broker with its default retention (dead letters silently expire).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import AsyncIterator

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from pipeline.config import Settings

from .clients import make_admin, start_when_broker_is_up
from .errors import DeadLetterTopicUnusable

log = logging.getLogger(__name__)


@dataclass
class TopicReport:
    created: list[str] = field(default_factory=list)
    existing: list[str] = field(default_factory=list)
    # Existing topics whose retention differs from the wanted one: name -> current retention.ms.
    retention_mismatch: dict[str, int] = field(default_factory=dict)


def topic_configs(retention_ms: int) -> dict[str, str]:
    """Configs of a topic made by us: kept `retention_ms` (-1: forever), never by size, never compacted."""
    return {"retention.ms": str(retention_ms), "retention.bytes": "-1", "cleanup.policy": "delete"}


@contextlib.asynccontextmanager
async def admin_client(settings: Settings, wait_s: float | None = None) -> AsyncIterator[AIOKafkaAdminClient]:
    """A started admin client (waiting for the broker as every client does), closed after."""
    admin = make_admin(settings)
    await start_when_broker_is_up(admin, settings, wait_s)
    try:
        yield admin
    finally:
        await admin.close()


async def ensure_topics(settings: Settings, wait_s: float | None = None) -> TopicReport:
    """Create the events topic and its DLQ when missing; existing topics are left as they are."""
    report = TopicReport()
    async with admin_client(settings, wait_s) as admin:
        existing = set(await admin.list_topics())
        configs = topic_configs(settings.topic_retention_ms)
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
            have = await retention_ms(admin, report.existing)
            report.retention_mismatch = {n: ms for n, ms in have.items() if ms != settings.topic_retention_ms}
    return report


async def ensure_dead_letter_topic(settings: Settings, wait_s: float | None = None) -> str:
    """Create the DLQ with the events topic's retention, or check an existing one's. Returns
    "created" or "checked"; raises DeadLetterTopicUnusable with what to do."""
    async with admin_client(settings, wait_s) as admin:
        try:
            topics = set(await admin.list_topics())
            events_retention = None
            if settings.topic in topics:
                events_retention = (await retention_ms(admin, [settings.topic])).get(settings.topic)
            wanted = events_retention if events_retention is not None else settings.topic_retention_ms
            if settings.dlq_topic not in topics:
                try:
                    await admin.create_topics(
                        [NewTopic(settings.dlq_topic, 1, settings.topic_replication, topic_configs=topic_configs(wanted))]
                    )
                except TopicAlreadyExistsError:  # another consumer of the group won the race
                    return "checked"
                log.info("created the dead-letter topic %s (retention.ms=%s, as the events topic)",
                         settings.dlq_topic, wanted)
                return "created"
            have = (await retention_ms(admin, [settings.dlq_topic])).get(settings.dlq_topic)
            if have is not None and keeps_shorter(have, wanted):
                raise DeadLetterTopicUnusable(
                    f"the dead-letter topic {settings.dlq_topic} keeps records for retention.ms={have}, less than "
                    f"the events topic's {wanted}: dead letters would expire before the events they describe; "
                    f"raise it (kafka-configs --alter --add-config retention.ms={wanted}) or set METAVOICE_DLQ_TOPIC"
                )
            return "checked"
        except KafkaError as exc:
            raise DeadLetterTopicUnusable(
                f"cannot check or create the dead-letter topic {settings.dlq_topic}: {type(exc).__name__}: {exc}; "
                "create it with the events topic's retention (python -m producer create-topic)"
            ) from exc


def keeps_shorter(have: int, wanted: int) -> bool:
    """Whether retention `have` keeps records for less time than `wanted` (-1: forever)."""
    if have < 0:
        return False
    return wanted < 0 or have < wanted


async def retention_ms(admin: AIOKafkaAdminClient, topics: list[str]) -> dict[str, int]:
    """retention.ms per topic; a broker that cannot describe configs gives {} (nothing to check)."""
    try:
        responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, t) for t in topics])
    except (KafkaError, NotImplementedError, ValueError) as exc:
        log.warning("cannot read the configs of %s (%s): their retention is not checked", ", ".join(topics), exc)
        return {}
    found: dict[str, int] = {}
    for response in responses:
        for resource in response.resources:
            name, entries = resource[3], resource[4]
            for entry in entries:
                if entry[0] == "retention.ms" and entry[1] is not None:
                    found[name] = int(entry[1])
    return found
