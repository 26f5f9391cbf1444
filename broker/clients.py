"""aiokafka clients built from the settings, and the one wait for a broker that is not up yet.

Every client - the producers' event producer, the consumer and its dead-letter producer, the
admin client that makes topics - gets its address and security (SSL, SASL) from
`client_kwargs`, so a secured cluster is configured once, with METAVOICE_KAFKA_* settings.

Compose and Kubernetes start everything at once, so a client may start before the broker
listens. `start_when_broker_is_up` retries a refused connection with capped exponential backoff
and jitter for at most METAVOICE_KAFKA_CONNECT_TIMEOUT_S (`Settings.kafka_connect_timeout_s`),
then closes the client and raises `BrokerUnreachable`, one line that names the address it tried
and the setting that bounds the wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaConnectionError

from pipeline.config import Settings

from .errors import BrokerUnreachable

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_SETTING = "METAVOICE_KAFKA_CONNECT_TIMEOUT_S"
# Backoff between start attempts: 0.5 s, 1 s, 2 s, 4 s, then 5 s, each plus up to 0.5 s of jitter.
RETRY_FIRST_S = 0.5
RETRY_MAX_S = 5.0
RETRY_JITTER_S = 0.5
# While waiting, say so at the first refusal and then at most this often (not at every attempt).
WARN_EVERY_S = 30.0


def client_kwargs(settings: Settings) -> dict[str, Any]:
    """Address and security of every client (secrets revealed only here, for aiokafka)."""
    kwargs: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap,
        "security_protocol": settings.kafka_security_protocol,
    }
    if settings.kafka_sasl_mechanism:
        kwargs["sasl_mechanism"] = settings.kafka_sasl_mechanism
        kwargs["sasl_plain_username"] = settings.kafka_sasl_username
        if settings.kafka_sasl_password is not None:
            kwargs["sasl_plain_password"] = settings.kafka_sasl_password.get_secret_value()
    if settings.kafka_security_protocol in ("SSL", "SASL_SSL"):
        from aiokafka.helpers import create_ssl_context

        kwargs["ssl_context"] = create_ssl_context(cafile=settings.kafka_ssl_cafile)
    return kwargs


def make_producer(settings: Settings, **options: Any) -> AIOKafkaProducer:
    """A producer whose sends complete only once every in-sync replica has the record (acks=all);
    `options` are further aiokafka producer options (batching, request size)."""
    return AIOKafkaProducer(**client_kwargs(settings), **{"acks": "all", **options})


def make_consumer(settings: Settings, *topics: str, **options: Any) -> AIOKafkaConsumer:
    """A consumer of the settings' group, heartbeating every third of its session timeout, a static
    member when `kafka_group_instance_id` is set; `options` are further aiokafka consumer options
    (commits, offsets reset, fetch sizes)."""
    defaults: dict[str, Any] = {
        "group_id": settings.group,
        "session_timeout_ms": settings.kafka_session_timeout_ms,
        "heartbeat_interval_ms": max(100, settings.kafka_session_timeout_ms // 3),
    }
    if settings.kafka_group_instance_id:
        defaults["group_instance_id"] = settings.kafka_group_instance_id
    return AIOKafkaConsumer(*topics, **client_kwargs(settings), **{**defaults, **options})


def make_admin(settings: Settings) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(**client_kwargs(settings))


class Startable(Protocol):
    async def start(self) -> None: ...


async def start_when_broker_is_up(client: Startable, settings: Settings, wait_s: float | None = None) -> None:
    """Start `client`, retrying refused connections for at most `wait_s` seconds (default: the
    setting `kafka_connect_timeout_s`). When the broker does not answer in that time, or the
    start fails otherwise, the client is closed; then `BrokerUnreachable` names the address and
    METAVOICE_KAFKA_CONNECT_TIMEOUT_S (any other failure is raised as it is)."""
    limit = settings.kafka_connect_timeout_s if wait_s is None else wait_s
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    attempt, warned_at = 0, float("-inf")
    try:
        while True:
            attempt += 1
            try:
                # One attempt cannot outlast the wait either (a black-holed address connects for
                # aiokafka's request timeout): an attempt cut short ends the wait.
                await asyncio.wait_for(client.start(), timeout=max(deadline - loop.time(), 0.001))
                return
            except KafkaConnectionError as exc:
                last: BaseException = exc
            except asyncio.TimeoutError as exc:
                last = exc
                break
            delay = min(RETRY_FIRST_S * 2 ** (attempt - 1), RETRY_MAX_S) + random.uniform(0, RETRY_JITTER_S)
            left = deadline - loop.time()
            if left <= 0:
                break
            if loop.time() - warned_at >= WARN_EVERY_S:
                warned_at = loop.time()
                log.warning("waiting for Kafka at %s (attempt %d, giving up in %.1f s, %s): %s",
                            settings.kafka_bootstrap, attempt, left, CONNECT_TIMEOUT_SETTING, last)
            await asyncio.sleep(min(delay, left))
    except BaseException:
        await close_quietly(client)
        raise
    await close_quietly(client)
    reason = "no answer" if isinstance(last, asyncio.TimeoutError) else str(last) or type(last).__name__
    raise BrokerUnreachable(
        f"Kafka at {settings.kafka_bootstrap} did not answer within {limit:g} s "
        f"({attempt} attempt{'s' if attempt > 1 else ''}; "
        f"{' '.join(reason.split())}); check the address, or wait longer with {CONNECT_TIMEOUT_SETTING}"
    ) from last


async def close_quietly(client: Any) -> None:
    """Stop a producer or consumer, close an admin client; a client that never started is fine."""
    close = getattr(client, "stop", None) or getattr(client, "close", None)
    if close is not None:
        with contextlib.suppress(Exception):
            await close()


# A clean leave waits at most this long for a rejoin its heartbeat asked for (besides the caller's bound).
SETTLE_POLL_S = 0.05


def is_group_leader(consumer: AIOKafkaConsumer) -> bool:
    """Whether this member computed its group's last assignment: aiokafka keeps the group's
    topics only on the leader (set in `_perform_assignment`, cleared before every rejoin)."""
    coordinator = getattr(consumer, "_coordinator", None)
    return coordinator is not None and getattr(coordinator, "_group_subscription", None) is not None


async def settle_before_leaving(consumer: AIOKafkaConsumer) -> bool:
    """Before the group's leader leaves: one heartbeat now, and when it answers that the group is
    rebalancing (a member left or joined within the last heartbeat interval), the rejoin it asks
    for, so the leader hands the group on from a settled generation.

    Why: Tansu 0.6.0 loses a group whose leader sends LeaveGroup while the group rebalances before
    the leader rejoined; no member that joins later is ever assigned (README, Embedded defaults;
    tests/test_group_leave.py). Apache Kafka elects a new leader either way: there this costs one
    round trip. The caller bounds the wait. Returns whether a rejoin was waited for."""
    coordinator = getattr(consumer, "_coordinator", None)
    if coordinator is None or not is_group_leader(consumer):
        return False
    await coordinator.ensure_coordinator_known()
    await coordinator._do_heartbeat()  # RebalanceInProgress -> request_rejoin(); aiokafka's own call
    subscription = consumer._subscription.subscription
    if subscription is None or not coordinator.need_rejoin(subscription):
        return False
    log.info("the group rebalances as its leader stops: rejoining once before leaving")
    while coordinator.need_rejoin(subscription) or subscription.assignment is None:
        await asyncio.sleep(SETTLE_POLL_S)
        subscription = consumer._subscription.subscription
        if subscription is None:
            break
    return True


async def cut_after(aw: Any, timeout: float) -> Any:
    """Await `aw` for at most `timeout` seconds; past it, cancel it and return without waiting for
    it to end (TimeoutError). Why not `asyncio.wait_for`: it waits for the cancelled task to finish,
    and aiokafka's stop can outlive a cancel (a heartbeat task that swallows it, a LeaveGroup after
    a join the broker holds), so a cut-short leave would not return."""
    task = asyncio.ensure_future(aw)
    try:
        done, _ = await asyncio.wait({task}, timeout=max(timeout, 0.001))
    except asyncio.CancelledError:
        task.cancel()
        raise
    if task in done:
        return task.result()
    task.cancel()
    raise TimeoutError


# each part a cut-short leave closes (the fetcher, the connections) gets at most this long
CUT_CLOSE_S = 1.0


async def leave_group(consumer: AIOKafkaConsumer, timeout: float) -> bool:
    """Stop a group consumer within `timeout` seconds: settle the group first when this member
    leads it (`settle_before_leaving`), then LeaveGroup. Past the timeout the leave is cut and
    what needs no broker answer is closed (the fetcher, the connections; `CUT_CLOSE_S` each), so
    nothing is left open at exit and the call returns within `timeout + 2 * CUT_CLOSE_S`; the
    group then drops the member after its session timeout. Returns whether the leave finished
    in time."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        with contextlib.suppress(Exception):  # a failed or slow heartbeat only skips the settling
            await cut_after(settle_before_leaving(consumer), timeout)
        await cut_after(consumer.stop(), deadline - loop.time())
        return True
    except TimeoutError:
        for part in (getattr(consumer, "_fetcher", None), getattr(consumer, "_client", None)):
            if part is not None:
                with contextlib.suppress(Exception):
                    await cut_after(part.close(), CUT_CLOSE_S)
        return False
