"""The producers' secrets stay secret: the Kafka SASL password, the webhook token and HMAC secret
and the Cloudflare API token appear in no log line (even at DEBUG), answer, error message, dead
letter, record, command output or `repr(settings)`, while each is really used where it belongs."""

from __future__ import annotations

import asyncio
import base64
import struct
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterator

import aiohttp
import orjson
import pytest
from aiokafka.protocol.admin import ApiVersionResponse_v0, SaslAuthenticateResponse_v0, SaslAuthenticateResponse_v1
from aiokafka.protocol.admin import SaslHandShakeResponse_v1

from broker.clients import client_kwargs
from pipeline.config import Settings
from pipeline.logs import setup_logging
from producer.cli import main
from producer.r2_queue import QueueConfig
from producer.webhook import SIGNATURE_HEADER, TIMESTAMP_HEADER, signature_headers
from tests.test_producer_r2_queue import ACCOUNT, QUEUE, FakeCloudflareQueue, r2_body
from tests.test_producer_support import cli_logging, read_topic  # noqa: F401  (fixture)
from tests.test_producer_webhook import r2_event, serving

SASL_PASSWORD = f"sasl-password-{uuid.uuid4().hex}"
WEBHOOK_TOKEN = f"webhook-token-{uuid.uuid4().hex}"
HMAC_SECRET = f"hmac-secret-{uuid.uuid4().hex}"
CF_TOKEN = f"cf-token-{uuid.uuid4().hex}"
SECRETS = {"SASL password": SASL_PASSWORD, "webhook token": WEBHOOK_TOKEN, "HMAC secret": HMAC_SECRET,
           "Cloudflare token": CF_TOKEN}


def assert_no_secret(places: dict[str, str | bytes]) -> None:
    for where, content in places.items():
        text = content.decode("utf-8", "replace") if isinstance(content, bytes) else content
        for name, secret in SECRETS.items():
            assert secret not in text, f"the {name} leaked into {where}"


def test_settings_show_no_producer_secret_in_repr_str_or_any_dump():
    settings = Settings(kafka_sasl_mechanism="PLAIN", kafka_sasl_username="user", kafka_sasl_password=SASL_PASSWORD,
                        webhook_token=WEBHOOK_TOKEN, webhook_hmac_secret=HMAC_SECRET, cf_api_token=CF_TOKEN)
    cfg = QueueConfig(ACCOUNT, QUEUE, settings.cf_api_token)  # type: ignore[arg-type]
    assert_no_secret({
        "repr(settings)": repr(settings), "str(settings)": str(settings),
        "model_dump_json": settings.model_dump_json(),
        "model_dump": repr(settings.model_dump()), "repr(QueueConfig)": repr(cfg),
    })
    # ... and each is there for the code that needs it
    assert client_kwargs(settings)["sasl_plain_password"] == SASL_PASSWORD
    assert cfg.token.get_secret_value() == CF_TOKEN


# --- a broker that asks for SASL/PLAIN credentials and refuses them ------------------------------


@dataclass
class SaslRefusingBroker:
    """Speaks just enough Kafka (ApiVersions, SaslHandshake, SaslAuthenticate) to receive a
    PLAIN password, then refuses it, as a broker with other credentials would."""

    port: int = 0
    received: list[bytes] = field(default_factory=list)  # raw requests

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                (size,) = struct.unpack(">i", await reader.readexactly(4))
                request = await reader.readexactly(size)
                self.received.append(request)
                api_key, version, correlation = struct.unpack(">hhi", request[:8])
                if api_key == 18:
                    body = ApiVersionResponse_v0(error_code=0, api_versions=[(18, 0, 0), (17, 0, 1), (36, 0, 1),
                                                                            (3, 0, 1), (0, 0, 3)]).encode()
                elif api_key == 17:
                    body = SaslHandShakeResponse_v1(error_code=0, enabled_mechanisms=["PLAIN"]).encode()
                elif api_key == 36:
                    refusal = dict(error_code=58, error_message="Authentication failed: invalid credentials",
                                   sasl_auth_bytes=b"")
                    body = (SaslAuthenticateResponse_v1(**refusal, session_lifetime_ms=0) if version == 1
                            else SaslAuthenticateResponse_v0(**refusal)).encode()
                else:
                    return
                answer = struct.pack(">i", correlation) + body
                writer.write(struct.pack(">i", len(answer)) + answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @property
    def password_was_sent(self) -> bool:
        return any(SASL_PASSWORD.encode() in r for r in self.received)


@pytest.fixture
async def sasl_broker() -> AsyncIterator[SaslRefusingBroker]:
    broker = SaslRefusingBroker()
    server = await asyncio.start_server(broker.handle, "127.0.0.1", 0)
    broker.port = server.sockets[0].getsockname()[1]
    async with server:
        yield broker
        server.close()


@pytest.mark.integration
async def test_the_webhook_shows_no_token_hmac_secret_or_sasl_password_in_answers_or_debug_logs(
    sasl_broker, settings_factory, capsys, cli_logging
):
    settings = settings_factory(
        kafka_bootstrap=f"127.0.0.1:{sasl_broker.port}", kafka_security_protocol="SASL_PLAINTEXT",
        kafka_sasl_mechanism="PLAIN", kafka_sasl_username="producer", kafka_sasl_password=SASL_PASSWORD,
        webhook_token=WEBHOOK_TOKEN, webhook_hmac_secret=HMAC_SECRET, log_level="DEBUG",
    )
    setup_logging(settings)  # what `python -m producer webhook` does, here at DEBUG
    good = orjson.dumps(r2_event("a.flac"))
    requests = [  # (headers, body, expected status)
        ({}, good, 401),
        ({"Authorization": f"Basic {WEBHOOK_TOKEN}"}, good, 403),  # the right token, presented wrongly
        ({"Authorization": f"Bearer {WEBHOOK_TOKEN}x"}, good, 403),
        (signature_headers(HMAC_SECRET, good, timestamp=1), good, 403),  # a genuine signature from 1970
        ({SIGNATURE_HEADER: f"sha256={HMAC_SECRET}", TIMESTAMP_HEADER: "1"}, good, 403),
        ({"Authorization": f"Bearer {WEBHOOK_TOKEN}"}, b"{not json", 400),
        ({"Authorization": f"Bearer {WEBHOOK_TOKEN}"},
         orjson.dumps({**r2_event("b.flac"), "object": {"key": "b.flac", "size": 1e20}}), 400),
        (signature_headers(HMAC_SECRET, good), good, 503),  # accepted, but the broker refuses our SASL login
    ]
    answers: dict[str, str] = {}
    async with serving(settings) as url, aiohttp.ClientSession() as session:
        for i, (headers, body, expected) in enumerate(requests):
            async with session.post(f"{url}/events", data=body, headers=headers) as resp:
                answers[f"answer {i}"] = f"{resp.status} {dict(resp.headers)} {await resp.text()}"
                assert resp.status == expected, answers[f"answer {i}"]
        async with session.get(f"{url}/healthz") as resp:
            answers["healthz"] = await resp.text()

    assert sasl_broker.password_was_sent  # the password really was used...
    captured = capsys.readouterr()
    assert "kafka_unavailable" in answers[f"answer {len(requests) - 1}"]
    assert_no_secret({**answers, "log": captured.err, "stdout": captured.out})  # ...and shown nowhere


@pytest.fixture
def fake_queue() -> Iterator[FakeCloudflareQueue]:
    fake = FakeCloudflareQueue(token=CF_TOKEN)
    fake.start()
    yield fake
    fake.stop()


@pytest.mark.integration
def test_the_r2_queue_command_shows_no_secret_in_its_output_debug_logs_dead_letters_or_records(
    fake_queue, services, unique, monkeypatch, capsys, cli_logging
):
    topic = f"r2q-secrets-{unique}"
    bodies = [
        orjson.dumps(r2_body("fine.flac")).decode(),
        base64.b64encode(orjson.dumps(r2_body("b64.flac"))).decode(),
        "not json",
        orjson.dumps({**r2_body("huge.flac"), "object": {"key": "huge.flac", "size": 1e20}}).decode(),
        orjson.dumps({**r2_body("y9999.flac"), "eventTime": "9999-12-31T23:59:59-05:00"}).decode(),
    ]
    for body in bodies:
        fake_queue.send(body)
    for name, value in dict(
        KAFKA_BOOTSTRAP=services.kafka_bootstrap, TOPIC=topic, LOG_LEVEL="DEBUG", CF_API_TOKEN=CF_TOKEN,
        # present in the settings (unused here: no SASL mechanism, no webhook), so any dump of them would show
        KAFKA_SASL_PASSWORD=SASL_PASSWORD, WEBHOOK_TOKEN=WEBHOOK_TOKEN, WEBHOOK_HMAC_SECRET=HMAC_SECRET,
    ).items():
        monkeypatch.setenv(f"METAVOICE_{name}", value)

    rc = main(["r2-queue", "--account-id", ACCOUNT, "--queue-id", QUEUE, "--api-base", fake_queue.url,
               "--exit-when-empty"])

    captured = capsys.readouterr()
    assert rc == 0, captured.err[-2000:]
    assert fake_queue.unacked() == []  # the fake only answers requests that carry the token: it was used
    events = asyncio.run(read_topic(services.kafka_bootstrap, topic, 2))
    letters = asyncio.run(read_topic(services.kafka_bootstrap, f"{topic}.dlq", 3))
    assert sorted(e["object"]["key"] for e in events) == ["b64.flac", "fine.flac"] and len(letters) == 3
    assert_no_secret({
        "stdout": captured.out, "log": captured.err,
        "events": orjson.dumps(events), "dead letters": orjson.dumps(letters),
    })


@pytest.mark.integration
def test_a_rejected_cloudflare_token_is_not_repeated_in_the_error(
    fake_queue, services, unique, monkeypatch, capsys, cli_logging
):
    fake_queue.send(orjson.dumps(r2_body("kept.flac")).decode())
    wrong = f"{CF_TOKEN}-revoked"
    monkeypatch.setenv("METAVOICE_KAFKA_BOOTSTRAP", services.kafka_bootstrap)
    monkeypatch.setenv("METAVOICE_TOPIC", f"r2q-secrets-{unique}")
    monkeypatch.setenv("METAVOICE_LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("METAVOICE_CF_API_TOKEN", wrong)

    rc = main(["r2-queue", "--account-id", ACCOUNT, "--queue-id", QUEUE, "--api-base", fake_queue.url,
               "--exit-when-empty"])

    captured = capsys.readouterr()
    assert rc == 1 and "HTTP 401" in captured.err
    assert wrong not in captured.err and wrong not in captured.out
    assert_no_secret({"stdout": captured.out, "log": captured.err})
    assert fake_queue.unacked() != []

