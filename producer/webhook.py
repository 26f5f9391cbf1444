"""HTTP webhook -> Kafka: for senders that POST notifications (an R2 Worker, S3 via a relay, MinIO).

`POST /events` accepts an R2-shaped event, a JSON list of them, an S3 `Records[]`
notification or a MinIO webhook event. A request, in order:

1. refuse a body over `webhook_max_body_bytes` (413) before reading it;
2. read the body, all of it within `webhook_body_timeout_s` (else 408 and the connection is
   closed): a client that trickles bytes cannot hold a handler;
3. authenticate, compared in constant time; no credentials: 401; wrong: 403. Either
   - `Authorization: Bearer <METAVOICE_WEBHOOK_TOKEN>`, or
   - `X-Metavoice-Timestamp: <unix seconds>` and
     `X-Metavoice-Signature: v1=<hex HMAC-SHA256 of "<timestamp>.<raw body>">` keyed with
     `METAVOICE_WEBHOOK_HMAC_SECRET`; the timestamp must lie within
     `webhook_signature_window_s` of the server's clock, so a captured request cannot be
     replayed later (within the window a replay is only a duplicate, which the consumer's
     dedupe absorbs). Unstamped signatures (`sha256=` over the body alone) are refused;
4. parse (`pipeline.events`) and encode every event as its Kafka record; not an event, or one
   that cannot be a record (a size over int64, a time outside 1970..2200, ...): 400 with a
   one-line JSON reason (the sender must fix it, so nothing is dead-lettered);
5. publish every event (acks=all) and wait for every acknowledgement, at most
   `producer_publish_timeout_s`; Kafka unreachable or too slow: 503 with Retry-After, so the
   sender retries (a retry may duplicate an event, which the consumer's etag dedupe absorbs);
6. only then 200 `{"published": n}`.

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
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import orjson
from aiohttp import web
from aiokafka.errors import KafkaError

from broker.topics import ensure_topics
from pipeline.config import Settings
from pipeline.errors import MalformedEvent
from pipeline.events import parse_event_json

from .errors import KafkaUnavailable, WebhookMisconfigured
from .kafka import EventPublisher, encode_event, make_event_producer, wait_acknowledged

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Metavoice-Signature"
TIMESTAMP_HEADER = "X-Metavoice-Timestamp"
SIGNATURE_VERSION = "v1"  # v1=<hex HMAC-SHA256 of b"<timestamp>." + body>
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
        producer = make_event_producer(self.settings)
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
            await asyncio.wait_for(ensure_topics(self.settings, wait_s=CONNECT_TIMEOUT_S), CONNECT_TIMEOUT_S)
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


def build_app(settings: Settings, clock: Callable[[], float] = time.time) -> web.Application:
    """The webhook application; `clock` (unix seconds) is what signature timestamps are checked against."""
    token = settings.webhook_token.get_secret_value().encode() if settings.webhook_token else None
    secret = settings.webhook_hmac_secret.get_secret_value().encode() if settings.webhook_hmac_secret else None
    if not token and not secret:
        raise WebhookMisconfigured(
            "the webhook needs METAVOICE_WEBHOOK_TOKEN and/or METAVOICE_WEBHOOK_HMAC_SECRET; refusing to run open"
        )
    limit = settings.webhook_max_body_bytes
    body_timeout = settings.webhook_body_timeout_s
    window = settings.webhook_signature_window_s
    gate = KafkaGate(settings)
    app = web.Application(client_max_size=limit)
    app[GATE] = gate

    async def events(request: web.Request) -> web.Response:
        # 1. size limit, before reading anything
        if request.content_length is not None and request.content_length > limit:
            return _error(413, "too_large", f"body over {limit} bytes")
        # 2. the whole body, within the deadline
        try:
            body = await asyncio.wait_for(request.read(), body_timeout)
        except web.HTTPRequestEntityTooLarge:
            return _error(413, "too_large", f"body over {limit} bytes")
        except asyncio.TimeoutError:
            log.warning("answering 408: the body from %s did not arrive within %g s", request.remote, body_timeout)
            resp = _error(408, "timeout", f"the request body did not arrive within {body_timeout:g} s")
            resp.force_close()
            await resp.prepare(request)
            await resp.write_eof()
            # Close now: aiohttp would otherwise keep reading the rest of the body ("lingering",
            # up to 10 s) before closing, which is what a slow client wants.
            request.protocol.force_close()
            return resp
        # 3. authentication
        verdict = authenticate(request.headers, body, token, secret, window_s=window, now=clock())
        if verdict.status == 401:
            resp = _error(401, "unauthorized", verdict.reason)
            resp.headers["WWW-Authenticate"] = 'Bearer realm="metavoice"'
            return resp
        if verdict.status == 403:
            return _error(403, "forbidden", verdict.reason)
        # 4. parse, and encode every event as its Kafka record
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            return _error(400, "malformed", f"body is not JSON: {exc}")
        try:
            records = encode_body(payload)
        except MalformedEvent as exc:
            return _error(400, "malformed", str(exc))
        # 5. publish and wait for every acknowledgement
        try:
            await publish_all(gate, records, settings.producer_publish_timeout_s)
        except KafkaUnavailable as exc:
            log.warning("answering 503: %s", exc)
            resp = _error(503, "kafka_unavailable", str(exc))
            resp.headers["Retry-After"] = RETRY_AFTER_S
            return resp
        # 6. only now say yes
        return web.json_response({"published": len(records)}, dumps=_dumps)

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


@dataclass(frozen=True)
class Verdict:
    status: int  # 200 accepted, 401 no credentials, 403 wrong credentials
    reason: str = ""  # one line for the sender; never holds a credential


def authenticate(
    headers: Mapping[str, str], body: bytes, token: bytes | None, secret: bytes | None,
    *, window_s: float, now: float,
) -> Verdict:
    """200 when any presented credential is valid, 401 when none is presented, else 403 with the reason."""
    presented = False
    reason = "credentials do not match"
    auth = headers.get("Authorization")
    if auth:
        presented = True
        scheme, _, credential = auth.strip().partition(" ")
        if token and scheme.lower() == "bearer":
            if hmac.compare_digest(credential.strip().encode("utf-8", "replace"), token):
                return Verdict(200)
    signature = headers.get(SIGNATURE_HEADER)
    if signature:
        presented = True
        version, _, digest = signature.strip().partition("=")
        stamp = (headers.get(TIMESTAMP_HEADER) or "").strip()
        if version.strip().lower() != SIGNATURE_VERSION:
            reason = (f"unsupported signature; send '{TIMESTAMP_HEADER}: <unix seconds>' and "
                      f"'{SIGNATURE_HEADER}: {SIGNATURE_VERSION}=<hex HMAC-SHA256 of \"<timestamp>.<body>\">'")
        elif not (stamp.isascii() and stamp.isdigit() and len(stamp) <= 12):
            reason = f"a signed request needs '{TIMESTAMP_HEADER}: <unix seconds>'"
        elif secret:
            expected = hmac.new(secret, signed_payload(stamp, body), hashlib.sha256).hexdigest().encode()
            if hmac.compare_digest(digest.strip().lower().encode("utf-8", "replace"), expected):
                skew = now - int(stamp)
                if abs(skew) <= window_s:
                    return Verdict(200)
                # Only a genuine signature learns this: a replay, or a sender whose clock is off.
                reason = (f"signature timestamp is {abs(skew):.0f} s {'old' if skew > 0 else 'ahead'}, "
                          f"outside the {window_s:g} s window (a replay, or a clock to fix)")
    if presented:
        return Verdict(403, reason)
    return Verdict(401, f"send 'Authorization: Bearer <token>' or '{TIMESTAMP_HEADER}' and '{SIGNATURE_HEADER}'")


def signed_payload(timestamp: str, body: bytes) -> bytes:
    """What the HMAC covers: the timestamp header's text, a dot, the raw body."""
    return timestamp.encode("ascii") + b"." + body


def signature_headers(secret: str | bytes, body: bytes, timestamp: int | None = None) -> dict[str, str]:
    """The headers a sender adds to a signed request (`timestamp`: unix seconds, default now)."""
    key = secret.encode() if isinstance(secret, str) else secret
    stamp = str(int(time.time()) if timestamp is None else timestamp)
    digest = hmac.new(key, signed_payload(stamp, body), hashlib.sha256).hexdigest()
    return {TIMESTAMP_HEADER: stamp, SIGNATURE_HEADER: f"{SIGNATURE_VERSION}={digest}"}


def encode_body(payload: Any) -> list[tuple[bytes, bytes]]:
    """The Kafka records `(key, value)` of a decoded body; MalformedEvent for anything unusable.

    Everything is encoded before anything is sent, so a bad event in a list publishes nothing.
    """
    try:
        return [encode_event(event) for event in parse_event_json(payload)]
    except MalformedEvent:
        raise
    except Exception as exc:  # a parser bug must not become a 500 the sender retries forever
        log.exception("unexpected failure parsing a webhook body")
        raise MalformedEvent(f"event cannot be parsed: {type(exc).__name__}") from None


async def publish_all(gate: KafkaGate, records: list[tuple[bytes, bytes]], timeout: float) -> None:
    """Return only once Kafka acknowledged every record; KafkaUnavailable otherwise."""
    if not records:
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    publisher = await gate.publisher()
    futures = []
    try:
        for key, value in records:
            futures.append(
                await asyncio.wait_for(publisher.send_encoded(key, value), max(0.001, deadline - loop.time()))
            )
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
