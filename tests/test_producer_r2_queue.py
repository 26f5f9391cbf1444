"""`python -m producer r2-queue` against a local stand-in for the Cloudflare Queues pull API
(the one accepted fake: leases, visibility-timeout redelivery, acks and retries by lease id)
and the real broker."""

from __future__ import annotations

import asyncio
import base64
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Awaitable, Callable

import orjson
import pytest
from aiohttp import web
from pydantic import SecretStr

import producer.r2_queue as r2_queue
from metavoice.local_services import free_port, start_broker
from producer.cli import main
from broker.topics import ensure_topics
from producer.r2_queue import QueueConfig, run_r2_queue
from tests.test_producer_support import cli_logging, read_topic, wait_until  # noqa: F401  (fixture)

pytestmark = pytest.mark.integration

ACCOUNT, QUEUE, TOKEN = "acc123", "queue456", "cf-token-for-tests"


@dataclass
class QueuedMessage:
    id: str
    body: Any
    attempts: int = 0
    lease_id: str | None = None
    invisible_until: float = 0.0
    acked: bool = False
    acked_at_attempt: int | None = None


@dataclass
class FakeCloudflareQueue:
    """The documented pull/ack endpoints, in memory, served from their own thread and loop."""

    token: str = TOKEN
    messages: dict[str, QueuedMessage] = field(default_factory=dict)
    requests: list[tuple[str, float, dict]] = field(default_factory=list)  # (verb, time, body)
    retried: list[str] = field(default_factory=list)  # message ids handed back
    throttle_next: int = 0  # answer 429 to this many coming requests
    on_ack: Callable[[list[QueuedMessage]], Awaitable[None]] | None = None
    url: str = ""

    def send(self, body: Any) -> str:
        mid = uuid.uuid4().hex
        self.messages[mid] = QueuedMessage(mid, body)
        return mid

    def unacked(self) -> list[QueuedMessage]:
        return [m for m in self.messages.values() if not m.acked]

    def calls(self, verb: str) -> list[tuple[str, float, dict]]:
        return [r for r in self.requests if r[0] == verb]

    # --- the API ---------------------------------------------------------------------------
    async def _pull(self, request: web.Request) -> web.Response:
        if (denied := await self._gate(request, "pull")) is not None:
            return denied
        body = self.requests[-1][2]
        batch = min(int(body.get("batch_size", 5)), 100)
        visibility = float(body.get("visibility_timeout_ms", 30_000)) / 1000
        now = time.monotonic()
        out = []
        for m in self.messages.values():
            if len(out) == batch:
                break
            if m.acked or m.invisible_until > now:
                continue
            m.attempts += 1
            m.lease_id = f"lease-{uuid.uuid4().hex}"
            m.invisible_until = now + visibility
            out.append({"id": m.id, "body": m.body, "attempts": m.attempts, "lease_id": m.lease_id,
                        "timestamp_ms": int(time.time() * 1000), "metadata": {"CF-Content-Type": "json"}})
        backlog = len(self.unacked())
        return web.json_response({"success": True, "errors": [], "messages": [],
                                  "result": {"message_backlog_count": backlog, "messages": out}})

    async def _ack(self, request: web.Request) -> web.Response:
        if (denied := await self._gate(request, "ack")) is not None:
            return denied
        body = self.requests[-1][2]
        now = time.monotonic()
        by_lease = {m.lease_id: m for m in self.messages.values() if m.lease_id and m.invisible_until > now}
        acking = [by_lease[a["lease_id"]] for a in body.get("acks", []) if a["lease_id"] in by_lease]
        if self.on_ack is not None and acking:
            await self.on_ack(acking)
        for m in acking:
            m.acked, m.acked_at_attempt, m.lease_id = True, m.attempts, None
        retried = 0
        for r in body.get("retries", []):
            m = by_lease.get(r["lease_id"])
            if m is not None and not m.acked:
                m.lease_id, m.invisible_until = None, now + float(r.get("delay_seconds") or 0)
                self.retried.append(m.id)
                retried += 1
        return web.json_response({"success": True, "errors": [], "messages": [],
                                  "result": {"ackCount": len(acking), "retryCount": retried, "warnings": []}})

    async def _gate(self, request: web.Request, verb: str) -> web.Response | None:
        assert request.match_info["account"] == ACCOUNT and request.match_info["queue"] == QUEUE
        self.requests.append((verb, time.monotonic(), await request.json()))
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response({"success": False, "errors": [{"code": 10000, "message": "Authentication error"}]},
                                     status=401)
        if self.throttle_next > 0:
            self.throttle_next -= 1
            return web.json_response({"success": False, "errors": [{"code": 971, "message": "throttled"}]},
                                     status=429, headers={"Retry-After": "1"})
        return None

    # --- lifetime --------------------------------------------------------------------------
    def start(self) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}/client/v4"
        app = web.Application()
        base = "/client/v4/accounts/{account}/queues/{queue}/messages"
        app.router.add_post(f"{base}/pull", self._pull)
        app.router.add_post(f"{base}/ack", self._ack)
        self._loop = asyncio.new_event_loop()
        started = threading.Event()

        async def serve() -> None:
            self._runner = web.AppRunner(app)
            await self._runner.setup()
            await web.TCPSite(self._runner, "127.0.0.1", port).start()
            started.set()

        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(serve(), self._loop)
        assert started.wait(10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@pytest.fixture
def fake_queue():
    fake = FakeCloudflareQueue()
    fake.start()
    yield fake
    fake.stop()


def r2_body(key: str, bucket: str = "voices") -> dict:
    return {"account": ACCOUNT, "action": "PutObject", "bucket": bucket,
            "object": {"key": key, "size": 1234, "eTag": f"etag-{key}"}, "eventTime": "2024-05-24T19:36:44.379Z"}


def queue_config(fake: FakeCloudflareQueue, **kw) -> QueueConfig:
    return QueueConfig(ACCOUNT, QUEUE, SecretStr(TOKEN), api_base=fake.url, **kw)


def test_every_message_is_acked_only_after_kafka_acknowledged_its_events_and_acks_go_in_bulk(
    fake_queue, services, unique, monkeypatch, capsys, cli_logging
):
    topic = f"r2q-{unique}"
    expected: list[str] = []
    for i in range(140):  # R2 JSON text, the common case
        fake_queue.send(orjson.dumps(r2_body(f"plain/{i:03d}.flac")).decode())
        expected.append(f"plain/{i:03d}.flac")
    for i in range(5):  # base64-encoded JSON bodies
        fake_queue.send(base64.b64encode(orjson.dumps(r2_body(f"b64/{i}.flac"))).decode())
        expected.append(f"b64/{i}.flac")
    fake_queue.send(orjson.dumps([r2_body("list/one.flac"), r2_body("list/two.flac")]).decode())
    expected += ["list/one.flac", "list/two.flac"]
    fake_queue.send(orjson.dumps({"Records": [{"eventName": "ObjectCreated:Put", "eventSource": "aws:s3",
                                                "s3": {"bucket": {"name": "voices"},
                                                       "object": {"key": "s3/red+flower.flac", "eTag": "e"}}}]}).decode())
    expected.append("s3/red flower.flac")
    fake_queue.send(orjson.dumps({"Service": "Amazon S3", "Event": "s3:TestEvent"}).decode())  # no event, acked
    assert len(fake_queue.messages) == 148

    published_before_ack: list[bool] = []
    acked_keys: set[str] = set()

    async def check_kafka_first(acking: list[QueuedMessage]) -> None:
        # Runs inside the ack request: every message being acked must already be readable in Kafka.
        for m in acking:
            body = m.body if m.body.startswith(("{", "[")) else base64.b64decode(m.body).decode()
            doc = orjson.loads(body)
            for d in doc if isinstance(doc, list) else doc.get("Records", [doc]):
                if "object" in d:
                    acked_keys.add(d["object"]["key"])
                elif "s3" in d:
                    acked_keys.add(d["s3"]["object"]["key"].replace("+", " "))
        records = await read_topic(services.kafka_bootstrap, topic, len(acked_keys), timeout=5, settle=0)
        published_before_ack.append(acked_keys <= {r["object"]["key"] for r in records})

    fake_queue.on_ack = check_kafka_first
    monkeypatch.setenv("METAVOICE_KAFKA_BOOTSTRAP", services.kafka_bootstrap)
    monkeypatch.setenv("METAVOICE_TOPIC", topic)
    monkeypatch.setenv("METAVOICE_CF_API_TOKEN", TOKEN)

    rc = main(["r2-queue", "--account-id", ACCOUNT, "--queue-id", QUEUE, "--api-base", fake_queue.url,
               "--exit-when-empty"])

    assert rc == 0
    assert "148 messages" in capsys.readouterr().out
    assert fake_queue.unacked() == []
    assert all(m.acked_at_attempt == 1 for m in fake_queue.messages.values())  # no redelivery needed
    assert published_before_ack == [True, True]  # two bulk acks (100 + 48), each after Kafka had them
    pulls = fake_queue.calls("pull")
    assert len(pulls) == 3  # 100, 48, then the empty pull that ends --exit-when-empty
    assert pulls[0][2] == {"batch_size": 100, "visibility_timeout_ms": 30_000}
    assert len(fake_queue.calls("ack")) == 2
    records = asyncio.run(read_topic(services.kafka_bootstrap, topic, len(expected)))
    assert sorted(r["object"]["key"] for r in records) == sorted(expected)


async def test_malformed_bodies_are_dead_lettered_with_their_reason_and_then_acked(
    fake_queue, settings_factory, services
):
    settings = settings_factory()
    bad = ["not json at all", base64.b64encode(b"\x00\x01 binary").decode(), '{"bucket": "voices"}', "[1, 2]"]
    for body in bad:
        fake_queue.send(body)
    good = fake_queue.send(orjson.dumps(r2_body("ok.flac")).decode())

    stats = await run_r2_queue(settings, queue_config(fake_queue), exit_when_empty=True)

    assert (stats.dead_lettered, stats.events, stats.acked, stats.retried) == (4, 1, 5, 0)
    assert fake_queue.unacked() == [] and fake_queue.retried == []
    letters = await read_topic(services.kafka_bootstrap, settings.dlq_topic, len(bad))
    assert sorted(d["event"] for d in letters) == sorted(bad)  # the original text, kept whole
    for d in letters:
        assert d["error_type"] == "MalformedEvent" and d["error"]
        assert datetime.fromisoformat(d["failed_at"].replace("Z", "+00:00")).tzinfo is not None
        assert d["source"] == "r2-queue" and d["message_id"] in fake_queue.messages
    [event] = await read_topic(services.kafka_bootstrap, settings.topic, 1)
    assert event["object"]["key"] == "ok.flac" and fake_queue.messages[good].acked


async def test_a_message_whose_events_cannot_be_serialized_is_dead_lettered_acked_and_the_loop_goes_on(
    fake_queue, settings_factory, services
):
    settings = settings_factory()
    ok_before = fake_queue.send(orjson.dumps(r2_body("before.flac")).decode())
    unusable = {  # each parses as JSON, and each crashed the loop (without an ack) before
        "size 1e20": (orjson.dumps({**r2_body("huge.flac"), "object": {"key": "huge.flac", "size": 1e20}}).decode(),
                      "object.size is out of range"),
        "size 2**64-1": ('{"account":"a","action":"PutObject","bucket":"voices",'
                         '"object":{"key":"u64.flac","size":18446744073709551615}}', "object.size is out of range"),
        "year 9999 at -05:00": (
            orjson.dumps({**r2_body("y9999.flac"), "eventTime": "9999-12-31T23:59:59-05:00"}).decode(),
            "eventTime is out of range"),
        "size 1.5, base64": (base64.b64encode(orjson.dumps({**r2_body("half.flac"),
                                                            "object": {"key": "half.flac", "size": 1.5}})).decode(),
                             "object.size must be an integer"),
        "a good event listed with a bad one": (
            orjson.dumps([r2_body("innocent.flac"),
                          {**r2_body("bad.flac"), "eventTime": "2500-01-01T00:00:00Z"}]).decode(),
            "item 1: eventTime is out of range"),
    }
    ids = {fake_queue.send(body): (case, reason) for case, (body, reason) in unusable.items()}
    versioned = fake_queue.send(orjson.dumps({"Records": [{
        "eventName": "ObjectCreated:Put", "eventTime": "2024-05-24T19:36:44.379Z",
        "s3": {"bucket": {"name": "voices"},
               "object": {"key": "s3/v.flac", "size": 5, "eTag": "e", "versionId": "v-1"}},
    }]}).decode())
    ok_after = fake_queue.send(orjson.dumps(r2_body("after.flac")).decode())

    stats = await run_r2_queue(settings, queue_config(fake_queue), exit_when_empty=True)

    assert (stats.messages, stats.dead_lettered, stats.events, stats.acked, stats.retried) == (8, 5, 3, 8, 0)
    assert fake_queue.unacked() == [] and fake_queue.retried == []
    assert all(m.acked_at_attempt == 1 for m in fake_queue.messages.values())  # none came back
    letters = await read_topic(services.kafka_bootstrap, settings.dlq_topic, len(unusable))
    assert {d["message_id"] for d in letters} == set(ids)
    for d in letters:
        case, reason = ids[d["message_id"]]
        assert d["error_type"] == "MalformedEvent" and reason in d["error"], case
        assert d["event"] == unusable[case][0], case  # the original text, kept whole
    events = await read_topic(services.kafka_bootstrap, settings.topic, 3)
    by_key = {e["object"]["key"]: e for e in events}
    assert sorted(by_key) == ["after.flac", "before.flac", "s3/v.flac"]  # not innocent.flac: its message was bad
    assert by_key["s3/v.flac"]["object"]["versionId"] == "v-1"  # republished with its version
    assert fake_queue.messages[ok_before].acked and fake_queue.messages[ok_after].acked
    assert fake_queue.messages[versioned].acked


async def test_a_message_kafka_did_not_acknowledge_is_handed_back_and_acked_only_after_a_later_publish(
    fake_queue, settings_factory, tmp_path, monkeypatch
):
    broker = start_broker(tmp_path)  # a broker of its own, to stop and restart
    try:
        bootstrap = f"127.0.0.1:{broker.port}"
        settings = settings_factory(kafka_bootstrap=bootstrap, producer_publish_timeout_s=1.0)
        stop = asyncio.Event()
        runner = asyncio.create_task(
            run_r2_queue(settings, queue_config(fake_queue, retry_delay_s=0), stop=stop, idle_sleep_s=(0.1,))
        )
        await wait_until(lambda: len(fake_queue.calls("pull")) >= 1 or runner.done())
        broker.stop()
        mid = fake_queue.send(orjson.dumps(r2_body("during-outage.flac")).decode())

        await wait_until(lambda: mid in fake_queue.retried or runner.done(), timeout=15)
        assert not runner.done(), runner
        assert not fake_queue.messages[mid].acked  # Kafka never had it: handed back, not acked

        # Same port. The embedded broker restarts empty and silently drops records sent to a topic
        # it does not know, so recreate the topics while the runner is in its >= 1 s Kafka backoff.
        broker.start()
        await ensure_topics(settings)
        await wait_until(lambda: fake_queue.messages[mid].acked or runner.done(), timeout=20)
        stop.set()
        stats = await asyncio.wait_for(runner, 10)

        message = fake_queue.messages[mid]
        assert message.acked and message.acked_at_attempt == message.attempts >= 2
        assert stats.retried >= 1 and stats.events == 1
        records = await read_topic(bootstrap, settings.topic, 1)
        assert "during-outage.flac" in {r["object"]["key"] for r in records}
    finally:
        broker.stop()


async def test_a_throttled_pull_backs_off_for_at_least_retry_after(fake_queue, settings_factory):
    fake_queue.throttle_next = 1
    fake_queue.send(orjson.dumps(r2_body("after-429.flac")).decode())

    stats = await run_r2_queue(settings_factory(), queue_config(fake_queue), exit_when_empty=True)

    first, second = fake_queue.calls("pull")[:2]
    assert second[1] - first[1] >= 1.0  # Retry-After: 1
    assert stats.throttled == 1 and stats.acked == 1 and fake_queue.unacked() == []


async def test_pulls_and_acks_together_stay_within_the_request_quota(fake_queue, settings_factory):
    for i in range(25):
        fake_queue.send(orjson.dumps(r2_body(f"quota/{i}.flac")).decode())
    settings = settings_factory(cf_api_requests_per_5min=2)

    # The quota is 2 requests per window; the window shrinks from 5 minutes to 0.5 s for the test.
    stats = await run_r2_queue(settings, queue_config(fake_queue, batch_size=10), exit_when_empty=True,
                               rate_window_s=0.5)

    assert stats.acked == 25
    times = [t for _, t, _ in fake_queue.requests]
    assert len(times) == 7  # pulls of 10, 10, 5 and an empty one; three acks
    # never 3 in one window (a little slack: the fake stamps a request when it arrives, not when sent)
    assert all(times[i + 2] - times[i] >= 0.45 for i in range(len(times) - 2))


def test_a_rejected_token_stops_with_a_clear_error_and_acks_nothing(
    fake_queue, services, unique, monkeypatch, capsys, cli_logging
):
    mid = fake_queue.send(orjson.dumps(r2_body("kept.flac")).decode())
    monkeypatch.setenv("METAVOICE_KAFKA_BOOTSTRAP", services.kafka_bootstrap)
    monkeypatch.setenv("METAVOICE_TOPIC", f"r2q-{unique}")
    monkeypatch.setenv("METAVOICE_CF_API_TOKEN", "wrong-token")

    rc = main(["r2-queue", "--account-id", ACCOUNT, "--queue-id", QUEUE, "--api-base", fake_queue.url,
               "--exit-when-empty"])

    assert rc == 1
    err = capsys.readouterr().err
    assert "HTTP 401" in err and "Authentication error" in err
    assert "wrong-token" not in err  # the token never reaches the logs
    assert not fake_queue.messages[mid].acked
