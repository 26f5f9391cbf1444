"""`python -m producer webhook`: authentication, body checks, and 2xx only after Kafka has the events."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import time
from typing import AsyncIterator, Callable

import aiohttp
import orjson
import pytest
from aiohttp import web

from metavoice.local_services import free_port
from producer.errors import WebhookMisconfigured
from producer.webhook import SIGNATURE_HEADER, TIMESTAMP_HEADER, build_app, signature_headers
from tests.test_producer_support import read_topic

pytestmark = pytest.mark.integration

TOKEN, SECRET = "webhook-token-for-tests", "hmac-secret-for-tests"
BEARER = {"Authorization": f"Bearer {TOKEN}"}


def r2_event(key: str) -> dict:
    return {"account": "acc", "action": "PutObject", "bucket": "voices",
            "object": {"key": key, "size": 10, "eTag": f"etag-{key}"}, "eventTime": "2024-05-24T19:36:44.379Z"}


def s3_notification(source: str, *escaped_keys: str) -> dict:
    return {"Records": [{"eventVersion": "2.1", "eventSource": source, "eventName": "ObjectCreated:Put",
                         "eventTime": "2024-05-24T19:36:44.379Z",
                         "s3": {"bucket": {"name": "voices"}, "object": {"key": k, "size": 10, "eTag": "e"}}}
                        for k in escaped_keys]}


@contextlib.asynccontextmanager
async def serving(settings, clock: Callable[[], float] = time.time) -> AsyncIterator[str]:
    runner = web.AppRunner(build_app(settings, clock=clock))
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest.fixture
def webhook_settings(settings_factory):
    def make(**kw):
        return settings_factory(webhook_token=TOKEN, webhook_hmac_secret=SECRET, **kw)

    return make


async def post(url: str, body: bytes, headers: dict) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/events", data=body, headers=headers) as resp:
            return resp.status, await resp.json(content_type=None)


async def test_webhook_answers_200_only_once_every_event_is_readable_from_kafka(webhook_settings, services):
    settings = webhook_settings()
    async with serving(settings) as url:
        # R2 single event with a bearer token
        status, doc = await post(url, orjson.dumps(r2_event("r2/one.flac")), BEARER)
        assert (status, doc) == (200, {"published": 1})
        [first] = await read_topic(services.kafka_bootstrap, settings.topic, 1, timeout=5, settle=0)
        assert first["object"]["key"] == "r2/one.flac"

        # a JSON list of R2 events, an S3 notification and a MinIO event, each HMAC-signed
        bodies = [
            orjson.dumps([r2_event("r2/two.flac"), r2_event("r2/three.flac")]),
            orjson.dumps(s3_notification("aws:s3", "s3/red+flower.flac", "s3/a%2Bb.flac")),
            orjson.dumps({"EventName": "s3:ObjectCreated:Put", "Key": "voices/minio/my summer.flac",
                          **s3_notification("minio:s3", "minio%2Fmy+summer.flac")}),
            orjson.dumps({"Service": "Amazon S3", "Event": "s3:TestEvent"}),
        ]
        answers = [await post(url, b, signature_headers(SECRET, b)) for b in bodies]
        assert answers == [(200, {"published": 2}), (200, {"published": 2}), (200, {"published": 1}),
                           (200, {"published": 0})]

    records = await read_topic(services.kafka_bootstrap, settings.topic, 6)
    assert sorted(r["object"]["key"] for r in records) == sorted(
        ["r2/one.flac", "r2/two.flac", "r2/three.flac", "s3/red flower.flac", "s3/a+b.flac", "minio/my summer.flac"]
    )


async def test_webhook_rejects_requests_without_credentials_with_401(webhook_settings):
    async with serving(webhook_settings()) as url:
        status, doc = await post(url, orjson.dumps(r2_event("x.flac")), {})
        assert status == 401 and doc["error"] == "unauthorized"


async def test_webhook_rejects_wrong_credentials_with_403_and_publishes_nothing(webhook_settings, services):
    settings = webhook_settings()
    body = orjson.dumps(r2_event("rejected.flac"))
    now = str(int(time.time()))
    signed = signature_headers(SECRET, body)
    wrong = {
        "wrong token": {"Authorization": "Bearer not-the-token"},
        "right token, wrong scheme": {"Authorization": f"Basic {TOKEN}"},
        "zero signature": {TIMESTAMP_HEADER: now, SIGNATURE_HEADER: "v1=" + "0" * 64},
        "wrong secret": signature_headers("another-secret", body),
        "signature of another body": signature_headers(SECRET, b"a different body"),
        "timestamp changed after signing": {**signed, TIMESTAMP_HEADER: str(int(signed[TIMESTAMP_HEADER]) + 1)},
        "other algorithm": {TIMESTAMP_HEADER: now, SIGNATURE_HEADER: "md5=abc"},
    }
    async with serving(settings) as url:
        for case, headers in wrong.items():
            status, doc = await post(url, body, headers)
            assert (status, doc["error"]) == (403, "forbidden"), case
        assert (await post(url, orjson.dumps(r2_event("accepted.flac")), BEARER))[0] == 200
    records = await read_topic(services.kafka_bootstrap, settings.topic, 1, settle=0.5)
    assert [r["object"]["key"] for r in records] == ["accepted.flac"]


@pytest.mark.parametrize(
    "body, reason",
    [
        (b"{not json", "not JSON"),
        (b'{"bucket": "voices", "action": "PutObject"}', "object.key"),
        (b'{"Records": [{"s3": {"bucket": {"name": "v"}, "object": {"key": "k"}}}]}', "eventName"),
        (b"[42]", "item 0"),
    ],
)
async def test_webhook_answers_400_with_a_json_reason_for_malformed_bodies(webhook_settings, body, reason):
    async with serving(webhook_settings()) as url:
        status, doc = await post(url, body, BEARER)
    assert status == 400 and doc["error"] == "malformed" and reason in doc["reason"]


async def test_webhook_answers_413_for_a_body_over_the_size_limit(webhook_settings):
    async with serving(webhook_settings(webhook_max_body_bytes=1024)) as url:
        big = orjson.dumps([r2_event(f"k{i}.flac") for i in range(50)])
        assert len(big) > 1024
        status, doc = await post(url, big, BEARER)
    assert status == 413 and doc["error"] == "too_large"


async def test_webhook_answers_503_when_kafka_is_unreachable_and_stays_healthy(webhook_settings):
    settings = webhook_settings(kafka_bootstrap=f"127.0.0.1:{free_port()}")  # nothing listens there
    async with serving(settings) as url:
        status, doc = await post(url, orjson.dumps(r2_event("x.flac")), BEARER)
        assert status == 503 and doc["error"] == "kafka_unavailable"
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{url}/healthz") as resp:
                assert resp.status == 200
                assert await resp.json() == {"status": "ok", "kafka": "not connected"}
            async with session.head(f"{url}/events") as resp:
                assert resp.status == 200  # MinIO's liveness probe of a webhook target


def test_webhook_refuses_to_start_without_a_token_or_an_hmac_secret(settings_factory):
    with pytest.raises(WebhookMisconfigured):
        build_app(settings_factory())


# --- signatures carry a time: no replays ------------------------------------------------------


class Clock:
    """The server's clock, moved by the test."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


async def test_a_replayed_signature_outside_the_window_is_refused(webhook_settings, services):
    settings = webhook_settings()  # default window: 300 s
    clock = Clock()
    body = orjson.dumps(r2_event("signed-once.flac"))
    captured = signature_headers(SECRET, body, timestamp=int(clock.now))
    async with serving(settings, clock) as url:
        assert await post(url, body, captured) == (200, {"published": 1})
        clock.now += 301  # an eavesdropper sends the very same request five minutes later
        status, doc = await post(url, body, captured)
        assert (status, doc["error"]) == (403, "forbidden")
        assert "outside the 300 s window" in doc["reason"]
    records = await read_topic(services.kafka_bootstrap, settings.topic, 1, settle=0.5)
    assert [r["object"]["key"] for r in records] == ["signed-once.flac"]  # the replay published nothing


@pytest.mark.parametrize("window", [300, 10])
async def test_a_signature_is_accepted_only_within_the_configured_window_either_side_of_the_clock(
    webhook_settings, services, window
):
    settings = webhook_settings(webhook_signature_window_s=window)
    clock = Clock()
    now = int(clock.now)
    async with serving(settings, clock) as url:
        answers = {}
        for offset in (-window - 1, -window + 1, 0, window - 1, window + 1):  # stamped in the past or future
            body = orjson.dumps(r2_event(f"offset{offset:+d}.flac"))
            status, doc = await post(url, body, signature_headers(SECRET, body, timestamp=now + offset))
            answers[offset] = status
            if status == 403:
                assert "window" in doc["reason"] and ("old" if offset < 0 else "ahead") in doc["reason"]
    assert answers == {-window - 1: 403, -window + 1: 200, 0: 200, window - 1: 200, window + 1: 403}
    records = await read_topic(services.kafka_bootstrap, settings.topic, 3, settle=0.5)
    assert sorted(r["object"]["key"] for r in records) == sorted(
        f"offset{o:+d}.flac" for o in (-window + 1, 0, window - 1)
    )


async def test_a_signature_without_a_timestamp_or_in_the_old_unstamped_scheme_is_refused(webhook_settings, services):
    settings = webhook_settings()
    body = orjson.dumps(r2_event("unstamped.flac"))
    over_body_only = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()  # the old scheme
    signed = signature_headers(SECRET, body)
    cases = {
        "old scheme, no timestamp": ({SIGNATURE_HEADER: over_body_only}, TIMESTAMP_HEADER),
        "old scheme with a timestamp": ({SIGNATURE_HEADER: over_body_only, TIMESTAMP_HEADER: signed[TIMESTAMP_HEADER]},
                                        TIMESTAMP_HEADER),
        "v1 without its timestamp": ({SIGNATURE_HEADER: signed[SIGNATURE_HEADER]}, TIMESTAMP_HEADER),
        "timestamp not in seconds": ({**signed, TIMESTAMP_HEADER: "2024-05-24T19:36:44Z"}, TIMESTAMP_HEADER),
    }
    async with serving(settings) as url:
        for case, (headers, hint) in cases.items():
            status, doc = await post(url, body, headers)
            assert (status, doc["error"]) == (403, "forbidden"), case
            assert hint in doc["reason"], case
        assert (await post(url, orjson.dumps(r2_event("bearer.flac")), BEARER))[0] == 200  # the bearer option stays
    records = await read_topic(services.kafka_bootstrap, settings.topic, 1, settle=0.5)
    assert [r["object"]["key"] for r in records] == ["bearer.flac"]


# --- events that cannot be published: 400, not 500 ---------------------------------------------


@pytest.mark.parametrize(
    "event, reason",
    [
        ({**r2_event("huge.flac"), "object": {"key": "huge.flac", "size": 1e20}}, "object.size is out of range"),
        ({**r2_event("u64.flac"), "object": {"key": "u64.flac", "size": 2**64 - 1}}, "object.size is out of range"),
        ({**r2_event("half.flac"), "object": {"key": "half.flac", "size": 1.5}}, "object.size must be an integer"),
        ({**r2_event("y9999.flac"), "eventTime": "9999-12-31T23:59:59-05:00"}, "eventTime is out of range"),
        ({**r2_event("y1.flac"), "eventTime": "0001-01-01T00:00:00+05:00"}, "eventTime is out of range"),
        ({**r2_event("y2500.flac"), "eventTime": "2500-01-01T00:00:00Z"}, "eventTime is out of range"),
        ({**r2_event("long.flac"), "eventTime": "x" * 50_000}, "eventTime is not ISO-8601"),
    ],
)
async def test_an_event_that_cannot_be_serialized_gets_400_with_a_one_line_reason_and_nothing_is_published(
    webhook_settings, services, event, reason
):
    settings = webhook_settings()
    async with serving(settings) as url:
        # alone, and as the second item of a list whose first item is fine: nothing of the body is published
        for body in (orjson.dumps(event), orjson.dumps([r2_event("innocent.flac"), event])):
            status, doc = await post(url, body, BEARER)
            assert (status, doc["error"]) == (400, "malformed")
            assert reason in doc["reason"] and "\n" not in doc["reason"] and len(doc["reason"]) < 200
        assert (await post(url, orjson.dumps(r2_event("after.flac")), BEARER))[0] == 200  # and it goes on serving
    records = await read_topic(services.kafka_bootstrap, settings.topic, 1, settle=0.5)
    assert [r["object"]["key"] for r in records] == ["after.flac"]


async def test_a_republished_s3_event_keeps_its_version_id(webhook_settings, services):
    settings = webhook_settings()
    obj = {"key": "v.flac", "size": 3, "eTag": "e", "versionId": "ver-7"}
    body = orjson.dumps({"Records": [{"eventName": "ObjectCreated:Put", "eventTime": "2024-05-24T19:36:44.379Z",
                                      "s3": {"bucket": {"name": "voices"}, "object": obj}}]})
    async with serving(settings) as url:
        assert await post(url, body, BEARER) == (200, {"published": 1})
    [record] = await read_topic(services.kafka_bootstrap, settings.topic, 1)
    assert record["object"] == {"key": "v.flac", "size": 3, "eTag": "e", "versionId": "ver-7"}


# --- slow clients ---------------------------------------------------------------------------------


async def test_a_client_that_trickles_its_body_gets_408_and_the_server_keeps_serving(webhook_settings, services):
    settings = webhook_settings(webhook_body_timeout_s=1.0)
    body = orjson.dumps(r2_event("slow.flac"))
    async with serving(settings) as url:
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            f"POST /events HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        )

        async def trickle() -> None:  # one byte every 50 ms: never idle, never done (~7 s for the body)
            with contextlib.suppress(ConnectionError):
                for byte in body:
                    writer.write(bytes([byte]))
                    await writer.drain()
                    await asyncio.sleep(0.05)

        started = time.monotonic()
        trickling = asyncio.create_task(trickle())
        try:
            # the server answers others meanwhile
            assert await post(url, orjson.dumps(r2_event("prompt.flac")), BEARER) == (200, {"published": 1})
            status_line = await asyncio.wait_for(reader.readline(), 5)
            waited = time.monotonic() - started
            rest = await asyncio.wait_for(reader.read(), 2)  # then the server hangs up, not lingering
        finally:
            trickling.cancel()
            writer.close()
        assert status_line.startswith(b"HTTP/1.1 408")
        assert 0.9 <= waited < 3.0  # the whole body had one second, however steadily it trickled
        head, _, answer = rest.partition(b"\r\n\r\n")
        assert b"connection: close" in head.lower() and orjson.loads(answer)["error"] == "timeout"
    records = await read_topic(services.kafka_bootstrap, settings.topic, 1, settle=0.5)
    assert [r["object"]["key"] for r in records] == ["prompt.flac"]
