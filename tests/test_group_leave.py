"""Issue 19: Tansu 0.6.0 loses a group whose leader leaves while the group rebalances.

The mechanism, with plain aiokafka members on the embedded broker: a follower sends LeaveGroup,
the group starts a rebalance, and the leader sends LeaveGroup within one heartbeat, before its
heartbeat has told it to rejoin. Members that join afterwards are never assigned (measured: over
280 s), because no member of the new generation is made leader. `broker.clients.leave_group`
(what the consumer's stop uses) lets the leader heartbeat once and rejoin before it leaves; then
fresh members are assigned in seconds. Mutation check: with `consumer.stop()` as the leader's
leave the fresh members wait out ASSIGN_LIMIT_S and the test fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from broker.clients import is_group_leader, leave_group, make_consumer, start_when_broker_is_up
from broker.topics import ensure_topics
from tests.conftest import test_settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# a fresh join right after a leave waits almost twice the 6 s session on Tansu (README); stuck is for good
ASSIGN_LIMIT_S = 40.0
LEAVE_TIMEOUT_S = 15.0


class Member:
    """One plain aiokafka group member, polled in the background as a consumer's fetch loop does."""

    def __init__(self, settings) -> None:
        self.consumer = make_consumer(settings, settings.topic, enable_auto_commit=False, auto_offset_reset="earliest")
        self.poller: asyncio.Task | None = None

    async def start(self, settings) -> "Member":
        await start_when_broker_is_up(self.consumer, settings)
        self.poller = asyncio.create_task(self._poll())
        return self

    async def _poll(self) -> None:
        while True:
            await self.consumer.getmany(timeout_ms=200)

    async def stop_polling(self) -> None:
        assert self.poller is not None
        self.poller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.poller


async def wait_until(predicate, limit: float) -> float:
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > limit:
            raise AssertionError(f"not within {limit:g}s")
        await asyncio.sleep(0.1)
    return time.monotonic() - t0


def test_fresh_members_are_assigned_after_a_follower_then_the_leader_leave_within_one_heartbeat(services, unique, tmp_path):
    settings = test_settings(services, unique, tmp_path / "out", kafka_session_timeout_ms=6000)

    async def scenario() -> None:
        await ensure_topics(settings)
        leader = await Member(settings).start(settings)
        await wait_until(lambda: leader.consumer.assignment(), ASSIGN_LIMIT_S)
        follower = await Member(settings).start(settings)
        await wait_until(lambda: follower.consumer.assignment() and len(leader.consumer.assignment()) < 4
                         and is_group_leader(leader.consumer), ASSIGN_LIMIT_S)
        assert is_group_leader(leader.consumer) and not is_group_leader(follower.consumer)

        # the quirk's order: the follower leaves, the leader 50 ms later (one heartbeat is 2 s)
        for m in (follower, leader):
            await m.stop_polling()
        assert await leave_group(follower.consumer, LEAVE_TIMEOUT_S)
        await asyncio.sleep(0.05)
        assert await leave_group(leader.consumer, LEAVE_TIMEOUT_S)

        fresh = [await Member(settings).start(settings) for _ in range(2)]
        try:
            await wait_until(lambda: sum(len(m.consumer.assignment()) for m in fresh) == 4, ASSIGN_LIMIT_S)
        finally:
            for m in fresh:
                await m.stop_polling()
                await leave_group(m.consumer, LEAVE_TIMEOUT_S)

    asyncio.run(scenario())
