"""broker/: one Kafka module for the producers and the consumer.

Unit tests: every writer's dead letters carry one timestamp format and one bounded record shape;
the start-up wait gives up within METAVOICE_KAFKA_CONNECT_TIMEOUT_S against a closed port and
names the address and the setting; clients get their security and group from the settings.
Integration tests (the real broker): the dead-letter topic is created with the events topic's
retention, and one that forgets sooner is refused.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import socket
import time
from datetime import datetime, timedelta, timezone

import orjson
import pytest
from aiokafka.admin import NewTopic

from broker.clients import client_kwargs, make_consumer, make_producer, start_when_broker_is_up
from broker.dead_letter import DeadLetterLimits, encode_dead_letter, failed_at
from broker.errors import BrokerUnreachable, DeadLetterTopicUnusable, KafkaUnavailable
from broker.topics import admin_client, ensure_dead_letter_topic, ensure_topics, retention_ms
from consumer.dead_letters import encode_dead_letter as consumer_dead_letter
from pipeline.batch import Failure, SourceRef, WorkItem
from pipeline.config import Settings
from pipeline.errors import MalformedEvent, NotAudio, TransientError
from pipeline.events import ObjectEvent
from producer.kafka import EventPublisher

# The one format of `failed_at` on the DLQ topic: ISO-8601 UTC, milliseconds, `Z`.
FAILED_AT = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RecordingProducer:
    """Stands in for AIOKafkaProducer.send: keeps what would have been sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bytes | None]] = []

    async def send(self, topic: str, value: bytes, key: bytes | None = None) -> "asyncio.Future[None]":
        self.sent.append((topic, value, key))
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


def consumer_failure() -> Failure:
    ev = ObjectEvent(bucket="audio", key="a.flac", size=3, etag="e" * 32)
    return Failure(WorkItem(ev, SourceRef("events", 0, 5), b'{"bucket":"audio"}'), NotAudio("not audio"))


# --- the dead-letter record --------------------------------------------------------------------
async def test_the_producer_and_the_consumer_write_failed_at_in_the_same_format():
    pub = EventPublisher(RecordingProducer(), "events")  # type: ignore[arg-type]
    await pub.send_dead_letter("not json", MalformedEvent("message is not JSON"), key=b"m1",
                               source="r2-queue", message_id="m1", attempts=2)
    [(topic, value, key)] = pub._producer.sent  # type: ignore[attr-defined]
    from_producer = orjson.loads(value)
    from_consumer = orjson.loads(consumer_dead_letter(consumer_failure())[1])

    assert topic == "events.dlq" and key == b"m1"
    for record in (from_producer, from_consumer):
        assert FAILED_AT.match(record["failed_at"]), record["failed_at"]
        stamp = datetime.fromisoformat(record["failed_at"].replace("Z", "+00:00"))
        assert abs(stamp - datetime.now(timezone.utc)) < timedelta(minutes=1)
    assert from_producer == {
        "event": "not json", "error_type": "MalformedEvent", "error": "message is not JSON",
        "failed_at": from_producer["failed_at"], "source": "r2-queue", "message_id": "m1", "attempts": 2,
    }


def test_failed_at_is_utc_with_milliseconds_and_a_z_whatever_the_zone_it_is_given_in():
    tokyo = timezone(timedelta(hours=9))
    assert failed_at(datetime(2026, 11, 1, 21, 0, 0, 123456, tzinfo=tokyo)) == "2026-11-01T12:00:00.123Z"
    assert FAILED_AT.match(failed_at())
    _, value = encode_dead_letter(b"x", "E", "e", {}, now=datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc))
    assert orjson.loads(value)["failed_at"] == "2026-01-02T03:04:05.000Z"


def test_a_producer_dead_letter_is_bounded_and_names_what_it_cut():
    limits = DeadLetterLimits(max_record_bytes=8192, max_key_bytes=256)
    raw = ("\"quoted\\" * 700_000).encode()  # ~5 MB that JSON escaping would grow further
    key, value = encode_dead_letter(raw, "MalformedEvent", "not an event", {"source": "r2-queue",
                                    "message_id": "m" * 5000}, key=b"k" * 1000, limits=limits)
    assert key == f"sha256:{hashlib.sha256(b'k' * 1000).hexdigest()}".encode()  # too long: hashed
    assert len(key) + len(value) <= limits.max_record_bytes
    d = orjson.loads(value)
    assert d["truncated"]["event"] == {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    assert d["truncated"]["message_id"]["bytes"] == 5000
    assert raw.decode().startswith(d["event"]) and d["source"] == "r2-queue"


def test_a_context_cannot_replace_the_records_own_fields():
    with pytest.raises(ValueError, match="failed_at"):
        encode_dead_letter(b"x", "E", "e", {"failed_at": "yesterday"})


def test_the_dead_letter_limits_follow_the_setting():
    limits = DeadLetterLimits.from_settings(Settings(dlq_max_record_bytes=65536))
    assert (limits.max_record_bytes, limits.max_event_bytes) == (65536, 16384)


# --- the start-up wait -------------------------------------------------------------------------
class CountingClient:
    """A real aiokafka client, counting start attempts and whether it was closed."""

    def __init__(self, inner) -> None:
        self.inner, self.starts, self.closed = inner, 0, False

    async def start(self) -> None:
        self.starts += 1
        await self.inner.start()

    async def stop(self) -> None:
        self.closed = True
        await self.inner.stop()


async def test_the_wait_for_a_closed_port_gives_up_within_the_setting_naming_the_address_and_the_setting(
    monkeypatch,
):
    bootstrap = f"127.0.0.1:{closed_port()}"
    monkeypatch.setenv("METAVOICE_KAFKA_CONNECT_TIMEOUT_S", "1.5")
    settings = Settings(kafka_bootstrap=bootstrap)  # the setting, read from its environment variable
    client = CountingClient(make_producer(settings))

    t0 = time.monotonic()
    with pytest.raises(BrokerUnreachable) as caught:
        await start_when_broker_is_up(client, settings)
    elapsed = time.monotonic() - t0

    assert 1.5 <= elapsed < 5.0  # it waited the setting, and not much longer
    assert client.starts >= 2 and client.closed  # retried, then cleaned up
    message = str(caught.value)
    assert bootstrap in message and "METAVOICE_KAFKA_CONNECT_TIMEOUT_S" in message and "1.5 s" in message
    assert "\n" not in message
    assert isinstance(caught.value, KafkaUnavailable) and isinstance(caught.value, TransientError)


async def test_an_attempt_that_hangs_cannot_outlast_the_wait():
    class Hanging:
        closed = False

        async def start(self) -> None:
            await asyncio.sleep(3600)  # a black-holed address: connecting never answers

        async def close(self) -> None:
            self.closed = True

    client = Hanging()
    t0 = time.monotonic()
    with pytest.raises(BrokerUnreachable, match="did not answer within 0.5 s"):
        await start_when_broker_is_up(client, Settings(kafka_bootstrap="10.255.255.1:9092"), wait_s=0.5)
    assert time.monotonic() - t0 < 2.0 and client.closed


async def test_a_start_failure_that_is_not_about_connecting_is_raised_as_it_is_and_the_client_closed():
    class Refusing:
        closed = False

        async def start(self) -> None:
            raise RuntimeError("bad SASL mechanism")

        async def stop(self) -> None:
            self.closed = True

    client = Refusing()
    with pytest.raises(RuntimeError, match="bad SASL"):
        await start_when_broker_is_up(client, Settings(), wait_s=5)
    assert client.closed


# --- clients -----------------------------------------------------------------------------------
def test_clients_get_their_address_and_sasl_security_from_the_settings():
    settings = Settings(kafka_bootstrap="b1:9093,b2:9093", kafka_security_protocol="SASL_PLAINTEXT",
                        kafka_sasl_mechanism="SCRAM-SHA-512", kafka_sasl_username="u", kafka_sasl_password="p")
    assert client_kwargs(settings) == {
        "bootstrap_servers": "b1:9093,b2:9093", "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "SCRAM-SHA-512", "sasl_plain_username": "u", "sasl_plain_password": "p",
    }
    assert "ssl_context" in client_kwargs(Settings(kafka_security_protocol="SSL"))
    assert "sasl_mechanism" not in client_kwargs(Settings())


async def test_the_consumer_client_takes_its_group_and_heartbeat_from_the_settings():
    settings = Settings(group="g1", kafka_session_timeout_ms=9000)
    consumer = make_consumer(settings, enable_auto_commit=False)
    try:
        assert consumer._group_id == "g1"
        assert consumer._coordinator is None  # not started
        assert consumer._client._bootstrap_servers == settings.kafka_bootstrap
        assert consumer._session_timeout_ms == 9000 and consumer._heartbeat_interval_ms == 3000
        assert consumer._enable_auto_commit is False
    finally:
        await consumer.stop()


# --- topics, against the real broker -----------------------------------------------------------
@pytest.mark.integration
async def test_the_dead_letter_topic_is_created_with_the_events_topics_retention(settings_factory):
    st = settings_factory()
    async with admin_client(st) as admin:
        await admin.create_topics([NewTopic(st.topic, 1, 1, topic_configs={"retention.ms": "604800000"})])

    assert await ensure_dead_letter_topic(st) == "created"
    assert await ensure_dead_letter_topic(st) == "checked"  # a second consumer finds it
    async with admin_client(st) as admin:
        assert await retention_ms(admin, [st.topic, st.dlq_topic]) == {st.topic: 604800000, st.dlq_topic: 604800000}


@pytest.mark.integration
async def test_a_dead_letter_topic_that_forgets_sooner_than_the_events_topic_is_refused(settings_factory):
    st = settings_factory()
    async with admin_client(st) as admin:
        await admin.create_topics([NewTopic(st.topic, 1, 1, topic_configs={"retention.ms": "-1"}),
                                   NewTopic(st.dlq_topic, 1, 1, topic_configs={"retention.ms": "3600000"})])
    with pytest.raises(DeadLetterTopicUnusable, match="retention.ms=3600000"):
        await ensure_dead_letter_topic(st)

    report = await ensure_topics(st)  # the producers leave both as they are, and say so
    assert report.created == [] and report.existing == [st.topic, st.dlq_topic]
    assert report.retention_mismatch == {st.dlq_topic: 3600000}
