"""`python -m producer webhook`: authentication, body checks, and 2xx only after Kafka has the events."""

from __future__ import annotations

import contextlib
from typing import AsyncIterator

import aiohttp
import orjson
import pytest
from aiohttp import web

from pipeline.local_services import free_port
from producer.errors import WebhookMisconfigured
from producer.webhook import SIGNATURE_HEADER, build_app, sign
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
async def serving(settings) -> AsyncIterator[str]:
    runner = web.AppRunner(build_app(settings))
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
        answers = [await post(url, b, {SIGNATURE_HEADER: sign(SECRET, b)}) for b in bodies]
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
    wrong = {
        "wrong token": {"Authorization": "Bearer not-the-token"},
        "right token, wrong scheme": {"Authorization": f"Basic {TOKEN}"},
        "zero signature": {SIGNATURE_HEADER: "sha256=" + "0" * 64},
        "wrong secret": {SIGNATURE_HEADER: sign("another-secret", body)},
        "signature of another body": {SIGNATURE_HEADER: sign(SECRET, b"a different body")},
        "other algorithm": {SIGNATURE_HEADER: "md5=abc"},
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
