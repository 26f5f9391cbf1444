"""Cloudflare Queues HTTP pull consumer -> Kafka: R2 event notifications from outside Cloudflare.

R2 delivers bucket notifications only to a Cloudflare Queue; this loop drains it over the
REST API. One cycle, in order:

1. pull a batch (up to 100 messages, each leased for the visibility timeout);
2. decode every body (JSON, or base64 JSON) into events, encode each as its Kafka record and
   queue them on the producer (acks=all); a body that is not an event, or whose events cannot
   be records (a size over int64, a time outside 1970..2200, ...), is queued as one dead letter
   on the DLQ topic instead, with its reason, and acked like any other: one bad message never
   stops the loop nor comes back;
3. wait until Kafka acknowledged every record of the batch, bounded by the publish timeout,
   which is kept under half the visibility timeout so a lease cannot expire while we wait;
4. one ack call for the whole batch: `acks` for messages whose records Kafka acknowledged,
   `retries` for the rest (redelivered after `retry_delay`). A message is never acked before
   Kafka took it, so a crash anywhere means redelivery (at-least-once), never loss; the
   consumer's `(bucket, key, etag)` dedupe absorbs the duplicates;
5. when Kafka failed, back off before pulling again, so a broker outage does not burn the
   queue's delivery attempts (`max_retries`; configure a Cloudflare DLQ for the queue anyway).

Every request passes a sliding-window limiter (Cloudflare allows 1200 requests per 5 minutes
per account, pulls and acks together); 429 and 5xx answers back off, honouring Retry-After.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from aiokafka.errors import KafkaError
from pydantic import SecretStr

from broker.topics import ensure_topics
from pipeline.config import Settings
from pipeline.errors import MalformedEvent
from pipeline.events import decode_maybe_base64, parse_event_json

from .errors import KafkaUnavailable, QueueApiRejected, QueueApiUnavailable
from .kafka import EventPublisher, encode_event, event_publisher, wait_acknowledged
from .ratelimit import SlidingWindowLimiter

log = logging.getLogger(__name__)

CF_API_BASE = "https://api.cloudflare.com/client/v4"
RATE_WINDOW_S = 300.0  # Cloudflare counts API requests per 5 minutes
MAX_BATCH = 100  # the pull endpoint's maximum batch size
MAX_BACKOFF_S = 60.0
IDLE_SLEEP_S = (1.0, 2.0, 4.0, 5.0)  # successive waits after empty pulls; reset by a message


@dataclass(frozen=True)
class QueueConfig:
    account_id: str
    queue_id: str
    token: SecretStr
    api_base: str = CF_API_BASE
    batch_size: int = MAX_BATCH
    visibility_timeout_ms: int = 30_000
    retry_delay_s: int = 10

    @property
    def messages_url(self) -> str:
        return f"{self.api_base.rstrip('/')}/accounts/{self.account_id}/queues/{self.queue_id}/messages"


@dataclass
class QueueStats:
    pulls: int = 0
    ack_calls: int = 0
    messages: int = 0
    events: int = 0  # events Kafka acknowledged
    dead_lettered: int = 0  # malformed bodies written to the DLQ topic (and acked)
    acked: int = 0
    retried: int = 0  # messages handed back because Kafka did not acknowledge them
    throttled: int = 0  # 429 answers


class Backoff:
    """Capped exponential backoff with full jitter; Retry-After wins when it is longer."""

    def __init__(self, base: float = 0.5, cap: float = MAX_BACKOFF_S) -> None:
        self.base, self.cap, self.failures = base, cap, 0

    def next_delay(self, retry_after: float | None = None) -> float:
        self.failures += 1
        delay = random.uniform(self.base, min(self.cap, self.base * 2 ** self.failures))
        return max(delay, min(retry_after or 0.0, self.cap))

    def reset(self) -> None:
        self.failures = 0


class QueueApi:
    """The two pull-consumer endpoints, every request through the account's rate limiter."""

    def __init__(self, session: aiohttp.ClientSession, cfg: QueueConfig, limiter: SlidingWindowLimiter) -> None:
        self.session, self.cfg, self.limiter = session, cfg, limiter

    async def pull(self) -> list[dict[str, Any]]:
        result = await self._post(
            "pull",
            {"batch_size": self.cfg.batch_size, "visibility_timeout_ms": self.cfg.visibility_timeout_ms},
        )
        messages = result.get("messages") if isinstance(result, dict) else result
        if messages is None:
            return []
        if not isinstance(messages, list):
            raise QueueApiUnavailable(f"pull answered an unexpected result: {str(result)[:200]}")
        return [m for m in messages if isinstance(m, dict)]

    async def ack(self, acks: list[str], retries: list[str]) -> dict[str, Any]:
        body = {
            "acks": [{"lease_id": lease} for lease in acks],
            "retries": [{"lease_id": lease, "delay_seconds": self.cfg.retry_delay_s} for lease in retries],
        }
        result = await self._post("ack", body)
        return result if isinstance(result, dict) else {}

    async def _post(self, verb: str, body: dict[str, Any]) -> Any:
        await self.limiter.acquire()
        url = f"{self.cfg.messages_url}/{verb}"
        headers = {
            "Authorization": f"Bearer {self.cfg.token.get_secret_value()}",
            "Content-Type": "application/json",
        }
        try:
            async with self.session.post(url, data=orjson.dumps(body), headers=headers) as resp:
                raw = await resp.read()
                status = resp.status
                retry_after = _retry_after(resp.headers.get("Retry-After"))
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise QueueApiUnavailable(f"{verb}: {type(exc).__name__}: {exc}") from exc
        if status == 429:
            raise QueueApiUnavailable(f"{verb}: rate limited (429)", retry_after, status)
        if status >= 500:
            raise QueueApiUnavailable(f"{verb}: HTTP {status}", retry_after, status)
        doc = _json(raw)
        if status >= 400:
            raise QueueApiRejected(f"{verb} refused with HTTP {status}: {_errors(doc) or raw[:200]!r}")
        if not isinstance(doc, dict) or doc.get("success") is False:
            raise QueueApiUnavailable(f"{verb}: unsuccessful answer: {_errors(doc) or raw[:200]!r}")
        return doc.get("result")


async def run_r2_queue(
    settings: Settings,
    cfg: QueueConfig,
    *,
    exit_when_empty: bool = False,
    stop: asyncio.Event | None = None,
    rate_window_s: float = RATE_WINDOW_S,
    idle_sleep_s: tuple[float, ...] = IDLE_SLEEP_S,
) -> QueueStats:
    """Drain the queue into Kafka until `stop` is set (or, with `exit_when_empty`, it is empty)."""
    stop = stop or asyncio.Event()
    stats = QueueStats()
    limiter = SlidingWindowLimiter(settings.cf_api_requests_per_5min, rate_window_s)
    publish_timeout = min(settings.producer_publish_timeout_s, cfg.visibility_timeout_ms / 2000)
    api_backoff, kafka_backoff = Backoff(), Backoff(base=1.0)
    idle = 0
    await ensure_topics(settings)
    timeout = aiohttp.ClientTimeout(total=60, connect=10)
    async with aiohttp.ClientSession(timeout=timeout) as session, event_publisher(settings) as publisher:
        api = QueueApi(session, cfg, limiter)
        while not stop.is_set():
            try:
                messages = await api.pull()
            except QueueApiUnavailable as exc:
                stats.throttled += exc.status == 429
                delay = api_backoff.next_delay(exc.retry_after)
                log.warning("queue pull failed (%s); retrying in %.1f s", exc, delay)
                await _sleep(stop, delay)
                continue
            api_backoff.reset()
            stats.pulls += 1
            if not messages:
                if exit_when_empty:
                    break
                await _sleep(stop, idle_sleep_s[min(idle, len(idle_sleep_s) - 1)])
                idle += 1
                continue
            idle = 0
            leased_at = time.monotonic()
            kafka_failed = await _forward_batch(api, publisher, messages, stats, publish_timeout, cfg, leased_at)
            if kafka_failed:
                delay = kafka_backoff.next_delay()
                log.warning("Kafka did not acknowledge a batch; pulling again in %.1f s", delay)
                await _sleep(stop, delay)
            else:
                kafka_backoff.reset()
    log.info(
        "r2-queue: %d messages, %d events published, %d dead-lettered, %d acked, %d handed back",
        stats.messages, stats.events, stats.dead_lettered, stats.acked, stats.retried,
    )
    return stats


async def _forward_batch(
    api: QueueApi,
    publisher: EventPublisher,
    messages: list[dict[str, Any]],
    stats: QueueStats,
    publish_timeout: float,
    cfg: QueueConfig,
    leased_at: float,
) -> bool:
    """Steps 2-4 for one pulled batch; True when Kafka failed to take some of it."""
    deadline = time.monotonic() + publish_timeout
    pending: list[tuple[str, list[Any], BaseException | None, int, bool]] = []
    for m in messages:
        stats.messages += 1
        lease = m.get("lease_id")
        if not isinstance(lease, str) or not lease:
            log.error("queue message %s has no lease_id; it will be redelivered", m.get("id"))
            continue
        futures: list[Any] = []
        failure: BaseException | None = None
        n_events, dead = 0, False
        try:
            try:
                records = _records(m.get("body"))
            except MalformedEvent as exc:
                dead = True
                log.warning("queue message %s is not an event (%s): dead-lettering it", m.get("id"), exc)
                futures.append(
                    await _within(deadline, publisher.send_dead_letter(
                        _body_text(m.get("body")), exc,
                        key=str(m.get("id") or lease).encode("utf-8", "backslashreplace"),
                        source="r2-queue", message_id=m.get("id"), attempts=m.get("attempts"),
                    ))
                )
            else:
                n_events = len(records)
                for key, value in records:
                    futures.append(await _within(deadline, publisher.send_encoded(key, value)))
        except (KafkaError, asyncio.TimeoutError, KafkaUnavailable) as exc:
            failure = exc
        pending.append((lease, futures, failure, n_events, dead))

    outcomes = await wait_acknowledged(
        [f for _, futures, _, _, _ in pending for f in futures], max(0.0, deadline - time.monotonic())
    )
    acks: list[str] = []
    retries: list[str] = []
    i = 0
    for lease, futures, failure, n_events, dead in pending:
        errors = [e for e in outcomes[i : i + len(futures)] if e is not None]
        i += len(futures)
        if failure is None and not errors:
            acks.append(lease)
            stats.events += n_events
            stats.dead_lettered += dead
        else:
            retries.append(lease)
            log.warning("Kafka did not take lease %s…: %s; handing it back", lease[:12], failure or errors[0])
    await _ack(api, acks, retries, stats, cfg, leased_at)
    return bool(retries)


async def _ack(api: QueueApi, acks: list[str], retries: list[str], stats: QueueStats, cfg: QueueConfig,
               leased_at: float) -> None:
    """One bulk ack call, retried while the leases are still valid."""
    if not acks and not retries:
        return
    lease_ends = leased_at + cfg.visibility_timeout_ms / 1000
    backoff = Backoff(base=0.25, cap=5.0)
    while True:
        try:
            result = await api.ack(acks, retries)
        except QueueApiUnavailable as exc:
            delay = backoff.next_delay(exc.retry_after)
            if time.monotonic() + delay >= lease_ends:
                log.error(
                    "could not ack %d messages before their leases expire (%s): they will be redelivered "
                    "and published again; the consumer drops the duplicates", len(acks), exc,
                )
                return
            log.warning("ack failed (%s); retrying in %.1f s", exc, delay)
            await asyncio.sleep(delay)
            continue
        stats.ack_calls += 1
        stats.acked += len(acks)
        stats.retried += len(retries)
        for warning in result.get("warnings") or []:
            log.warning("ack: %s", warning)
        return


def _records(body: Any) -> list[tuple[bytes, bytes]]:
    """The Kafka records of one message body, all encoded before any is sent; MalformedEvent if unusable."""
    try:
        return [encode_event(event) for event in parse_event_json(decode_maybe_base64(body))]
    except MalformedEvent:
        raise
    except Exception as exc:  # a parser bug must not crash the loop or bring the message back forever
        log.exception("unexpected failure parsing a queue message")
        raise MalformedEvent(f"event cannot be parsed: {type(exc).__name__}: {exc}") from None


async def _within(deadline: float, aw: Any) -> Any:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        if asyncio.iscoroutine(aw):
            aw.close()
        raise KafkaUnavailable("publish timeout reached before this message could be queued")
    return await asyncio.wait_for(aw, remaining)


async def _sleep(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except asyncio.TimeoutError:
        pass


def _body_text(body: Any) -> str:
    """The original body as text for a dead letter; always serializable (lone surrogates escaped)."""
    if isinstance(body, (bytes, bytearray)):
        return bytes(body).decode("utf-8", "replace")
    if not isinstance(body, str):
        try:
            return orjson.dumps(body).decode()
        except TypeError:
            return repr(body)
    return body.encode("utf-8", "backslashreplace").decode("utf-8")


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _json(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


def _errors(doc: Any) -> str:
    if isinstance(doc, dict) and isinstance(doc.get("errors"), list):
        return "; ".join(str(e.get("message", e)) if isinstance(e, dict) else str(e) for e in doc["errors"])
    return ""
