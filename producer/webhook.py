"""HTTP webhook -> Kafka: for senders that POST notifications (an R2 Worker, S3 via a relay, MinIO).

`POST /events` accepts an R2-shaped event, a JSON list of them, an S3 `Records[]`
notification or a MinIO webhook event. A request, in order:

1. refuse a body over `webhook_max_body_bytes` (413) before reading it;
2. authenticate: `Authorization: Bearer <METAVOICE_WEBHOOK_TOKEN>` or
   `X-Metavoice-Signature: sha256=<hex HMAC-SHA256 of the raw body>` with
   `METAVOICE_WEBHOOK_HMAC_SECRET`, compared in constant time. No credentials: 401; wrong: 403;
3. parse (`pipeline.events`); not an event: 400 with a JSON reason (the sender must fix it,
   so nothing is dead-lettered);
4. publish every event (acks=all) and wait for every acknowledgement, at most
   `producer_publish_timeout_s`; Kafka unreachable or too slow: 503 with Retry-After, so the
   sender retries (a retry may duplicate an event, which the consumer's etag dedupe absorbs);
5. only then 200 `{"published": n}`.

`GET /healthz` answers 200 while the process serves (with Kafka's state in the body), so an
orchestrator does not restart the webhook for a Kafka outage it cannot fix.
`HEAD /events` answers 200: MinIO probes its webhook target that way before sending.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
from typing import Any

import orjson
from aiohttp import web
from aiokafka.errors import KafkaError

from pipeline.config import Settings
from pipeline.errors import MalformedEvent
from pipeline.events import parse_event_json

from .errors import KafkaUnavailable, WebhookMisconfigured
from .kafka import EventPublisher, ensure_topics, make_producer, wait_acknowledged

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Metavoice-Signature"
RETRY_AFTER_S = "5"
# How long connecting to Kafka may take inside one request before it answers 503.
CONNECT_TIMEOUT_S = 10.0
# After a failed connect, requests answer 503 at once for this long instead of each trying again.
CONNECT_COOLDOWN_S = 2.0


class KafkaGate:
    """The webhook's one producer, connected lazily: the server answers (503) while Kafka is down."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._publisher: EventPublisher | None = None
        self._producer = None
        self._lock = asyncio.Lock()
        self._failure: KafkaUnavailable | None = None
        self._retry_at = 0.0

    @property
    def connected(self) -> bool:
        return self._publisher is not None

    async def publisher(self) -> EventPublisher:
        if self._publisher is not None:
            return self._publisher
        async with self._lock:
            if self._publisher is None:
                loop = asyncio.get_running_loop()
                if self._failure is not None and loop.time() < self._retry_at:
                    raise self._failure
                try:
                    await self._connect()
                except KafkaUnavailable as exc:
                    self._failure, self._retry_at = exc, loop.time() + CONNECT_COOLDOWN_S
                    raise
            assert self._publisher is not None
            return self._publisher

    async def _connect(self) -> None:
        producer = make_producer(self.settings)
        try:
            await asyncio.wait_for(producer.start(), CONNECT_TIMEOUT_S)
        except BaseException as exc:  # also a cancelled start (shutdown): never leak its tasks
            with contextlib.suppress(Exception):
                await producer.stop()
            if isinstance(exc, (KafkaError, OSError, asyncio.TimeoutError)):
                raise KafkaUnavailable(f"Kafka at {self.settings.kafka_bootstrap} is unreachable: {exc!r}") from exc
            raise
        self._producer = producer  # from here on close() stops it, whatever happens next
        try:
            await asyncio.wait_for(ensure_topics(self.settings, wait_seconds=0), CONNECT_TIMEOUT_S)
        except (KafkaError, KafkaUnavailable, OSError, asyncio.TimeoutError) as exc:
            log.warning("could not ensure topics (%s); publishing anyway", exc)
        self._publisher = EventPublisher(producer, self.settings.topic, self.settings.dlq_topic)
        log.info("webhook connected to Kafka at %s", self.settings.kafka_bootstrap)

    async def close(self) -> None:
        if self._producer is not None:
            producer, self._producer, self._publisher = self._producer, None, None
            await producer.stop()


GATE = web.AppKey("gate", KafkaGate)
CONNECT_TASK = web.AppKey("connect_task", asyncio.Task)


def build_app(settings: Settings) -> web.Application:
    token = settings.webhook_token.get_secret_value().encode() if settings.webhook_token else None
    secret = settings.webhook_hmac_secret.get_secret_value().encode() if settings.webhook_hmac_secret else None
    if not token and not secret:
        raise WebhookMisconfigured(
            "the webhook needs METAVOICE_WEBHOOK_TOKEN and/or METAVOICE_WEBHOOK_HMAC_SECRET; refusing to run open"
        )
    limit = settings.webhook_max_body_bytes
    gate = KafkaGate(settings)
    app = web.Application(client_max_size=limit)
    app[GATE] = gate

    async def events(request: web.Request) -> web.Response:
        # 1. size limit, before reading anything
        if request.content_length is not None and request.content_length > limit:
            return _error(413, "too_large", f"body over {limit} bytes")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return _error(413, "too_large", f"body over {limit} bytes")
        # 2. authentication
        verdict = authenticate(request.headers, body, token, secret)
        if verdict == 401:
            resp = _error(401, "unauthorized", f"send 'Authorization: Bearer <token>' or '{SIGNATURE_HEADER}'")
            resp.headers["WWW-Authenticate"] = 'Bearer realm="metavoice"'
            return resp
        if verdict == 403:
            return _error(403, "forbidden", "credentials do not match")
        # 3. parse
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            return _error(400, "malformed", f"body is not JSON: {exc}")
        try:
            batch = parse_event_json(payload)
        except MalformedEvent as exc:
            return _error(400, "malformed", str(exc))
        # 4. publish and wait for every acknowledgement
        try:
            await publish_all(gate, batch, settings.producer_publish_timeout_s)
        except KafkaUnavailable as exc:
            log.warning("answering 503: %s", exc)
            resp = _error(503, "kafka_unavailable", str(exc))
            resp.headers["Retry-After"] = RETRY_AFTER_S
            return resp
        # 5. only now say yes
        return web.json_response({"published": len(batch)}, dumps=_dumps)

    async def probe(request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response(
            {"status": "ok", "kafka": "connected" if gate.connected else "not connected"}, dumps=_dumps
        )

    async def connect_early(app: web.Application) -> None:
        async def attempt() -> None:
            try:
                await gate.publisher()
            except KafkaUnavailable as exc:
                log.warning("%s; will retry on the first request", exc)

        app[CONNECT_TASK] = asyncio.create_task(attempt())

    async def close(app: web.Application) -> None:
        task = app.get(CONNECT_TASK)
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await gate.close()

    app.router.add_post("/events", events)
    app.router.add_route("HEAD", "/events", probe)
    app.router.add_get("/healthz", healthz)
    app.on_startup.append(connect_early)
    app.on_cleanup.append(close)
    return app


def authenticate(headers: Any, body: bytes, token: bytes | None, secret: bytes | None) -> int:
    """200 when any presented credential is valid, 401 when none is presented, else 403."""
    presented = valid = False
    auth = headers.get("Authorization")
    if auth:
        presented = True
        scheme, _, credential = auth.strip().partition(" ")
        if token and scheme.lower() == "bearer":
            valid |= hmac.compare_digest(credential.strip().encode("utf-8", "replace"), token)
    signature = headers.get(SIGNATURE_HEADER)
    if signature:
        presented = True
        algorithm, _, digest = signature.strip().partition("=")
        if secret and algorithm.lower() == "sha256":
            expected = hmac.new(secret, body, hashlib.sha256).hexdigest().encode()
            valid |= hmac.compare_digest(digest.strip().lower().encode("utf-8", "replace"), expected)
    if valid:
        return 200
    return 403 if presented else 401


def sign(secret: str | bytes, body: bytes) -> str:
    """The signature header value a sender computes: `sha256=<hex>`."""
    key = secret.encode() if isinstance(secret, str) else secret
    return "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()


async def publish_all(gate: KafkaGate, batch: list, timeout: float) -> None:
    """Return only once Kafka acknowledged every event; KafkaUnavailable otherwise."""
    if not batch:
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    publisher = await gate.publisher()
    futures = []
    try:
        for event in batch:
            futures.append(await asyncio.wait_for(publisher.send(event), max(0.001, deadline - loop.time())))
    except (KafkaError, asyncio.TimeoutError) as exc:
        raise KafkaUnavailable(f"Kafka did not accept the events: {exc!r}") from exc
    for outcome in await wait_acknowledged(futures, max(0.0, deadline - loop.time())):
        if outcome is not None:
            raise KafkaUnavailable(f"Kafka did not acknowledge the events: {outcome!r}")


async def run_webhook(settings: Settings, host: str, port: int, stop: asyncio.Event) -> None:
    """Serve until `stop` is set; requests in flight finish (aiohttp's graceful shutdown)."""
    app = build_app(settings)
    runner = web.AppRunner(app, access_log=log)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        log.info("webhook listening on http://%s:%d/events (topic %s)", host, port, settings.topic)
        await stop.wait()
    finally:
        await runner.cleanup()


def _error(status: int, code: str, reason: str) -> web.Response:
    return web.json_response({"error": code, "reason": reason}, status=status, dumps=_dumps)


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()
