"""`python -m producer create-topic`: topics made for replay (kept forever), idempotently."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from producer.cli import main
from tests.test_producer_support import cli_logging  # noqa: F401  (fixture)

pytestmark = pytest.mark.integration


async def _configs(bootstrap: str, topics: list[str]) -> dict[str, dict[str, str]]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, t) for t in topics])
        described = await admin.describe_topics(topics)
    finally:
        await admin.close()
    out: dict[str, dict[str, str]] = {}
    for response in responses:
        for resource in response.resources:
            out[resource[3]] = {entry[0]: entry[1] for entry in resource[4]}
    for topic in described:
        out[topic["topic"]]["partitions"] = str(len(topic["partitions"]))
    return out


@pytest.fixture
def topic_env(services, unique, monkeypatch, cli_logging) -> str:
    topic = f"replay-{unique}"
    monkeypatch.setenv("METAVOICE_KAFKA_BOOTSTRAP", services.kafka_bootstrap)
    monkeypatch.setenv("METAVOICE_TOPIC", topic)
    return topic


def test_create_topic_makes_the_events_topic_and_its_dlq_kept_forever_for_replays(topic_env, services, capsys):
    assert main(["--partitions", "3", "create-topic"]) == 0
    assert f"created {topic_env}: 3 partitions" in capsys.readouterr().out

    configs = asyncio.run(_configs(services.kafka_bootstrap, [topic_env, f"{topic_env}.dlq"]))
    for name in (topic_env, f"{topic_env}.dlq"):
        assert configs[name]["retention.ms"] == "-1"  # a replay with a new model re-reads everything
        assert configs[name]["partitions"] == "3"

    assert main(["create-topic"]) == 0  # running it again changes nothing
    out = capsys.readouterr()
    assert f"{topic_env} already exists" in out.out and "warning" not in out.err


def test_create_topic_warns_when_an_existing_topic_would_expire_events(topic_env, services, capsys):
    async def create_short_lived() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=services.kafka_bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(topic_env, 1, 1, topic_configs={"retention.ms": "86400000"})])
        finally:
            await admin.close()

    asyncio.run(create_short_lived())
    assert main(["create-topic"]) == 0
    err = capsys.readouterr().err
    assert f"{topic_env} has retention.ms=86400000" in err
