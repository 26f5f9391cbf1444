"""Patience with faults that are not about any object: refused S3 credentials, S3 down, a broken GPU.

Such a fault (`pipeline.errors.EnvironmentFault`) stops its micro-batch with no dead letter and
no commit; the batch is tried again after a capped, jittered backoff (`FaultWatch.patiently`), so
a rotated key fixed in minutes, an S3 blip or a GPU reset loses nothing. While faulting, /readyz says not ready and
`metavoice_environment_faults_total{kind}` counts every failed attempt. When the fault outlasts
`fault_timeout_s`, the fault is raised: the consumer exits non-zero without committing, so an
orchestrator restarts it or pages someone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter
from typing import Awaitable, Callable, TypeVar

from pipeline.errors import EnvironmentFault

log = logging.getLogger(__name__)
R = TypeVar("R")

BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 30.0


class Abandoned(Exception):
    """A micro-batch given up while it waited out a fault, because its partitions are being
    revoked: nothing of it is applied or committed, and the next owner reads its records again."""


class FaultWatch:
    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.counts: Counter[str] = Counter()  # failed attempts by fault kind (the metric)
        self.current: EnvironmentFault | None = None
        self.since: float | None = None  # monotonic time the current fault began
        self._attempt = 0

    @property
    def faulting(self) -> bool:
        return self.current is not None

    def failed(self, fault: EnvironmentFault) -> float:
        """One more failed attempt: seconds to wait before the next, or `fault` raised past the timeout."""
        now = time.monotonic()
        self.counts[fault.kind] += 1
        if self.since is None:
            self.since = now
        self.current, self._attempt = fault, self._attempt + 1
        lasted = now - self.since
        if lasted >= self.timeout_s:
            log.error("%s has lasted %.0fs (fault_timeout_s=%g): stopping without committing; the events "
                      "it held are processed again after a restart", type(fault).__name__, lasted, self.timeout_s)
            raise fault
        delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (self._attempt - 1)) * random.uniform(0.8, 1.2)
        delay = min(delay, max(0.1, self.timeout_s - lasted))
        log.warning("%s: %s - not blamed on any object; retrying the batch in %.1fs (faulting for %.0fs of %gs)",
                    type(fault).__name__, fault, delay, lasted, self.timeout_s)
        return delay

    def recovered(self) -> None:
        if self.current is not None:
            log.info("recovered from %s after %.0fs", type(self.current).__name__, time.monotonic() - (self.since or 0))
        self.current, self.since, self._attempt = None, None, 0

    async def patiently(self, attempt: Callable[[], Awaitable[R]], stop: asyncio.Event,
                        abandon: asyncio.Event | None = None) -> R:
        """`attempt()` again after each EnvironmentFault, with the backoff `failed` says, until it
        succeeds; the fault is raised past `timeout_s`, or when `stop` is set while waiting.

        `abandon` (a revoke) set while the fault lasts ends the wait, or an attempt under way,
        with `Abandoned`: a revoke must not wait out a fault that can last `timeout_s`, longer
        than the group's rebalance timeout."""
        while True:
            try:
                result = await self._try(attempt, abandon)
            except EnvironmentFault as fault:
                delay = self.failed(fault)  # raises it past timeout_s
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(_either(stop, abandon), timeout=delay)
                if stop.is_set():
                    raise
                if abandon is not None and abandon.is_set():
                    raise Abandoned(f"given up during a revoke while waiting out {type(fault).__name__}") from fault
                continue
            self.recovered()
            return result

    async def _try(self, attempt: Callable[[], Awaitable[R]], abandon: asyncio.Event | None) -> R:
        if abandon is None or not self.faulting:
            return await attempt()
        if abandon.is_set():
            raise Abandoned("given up during a revoke: a fault is under way")
        task = asyncio.ensure_future(attempt())
        waiter = asyncio.ensure_future(abandon.wait())
        try:
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if task.done():
            return task.result()
        task.cancel()
        raise Abandoned("given up during a revoke: a fault is under way")


async def _either(a: asyncio.Event, b: asyncio.Event | None) -> None:
    if b is None:
        await a.wait()
        return
    waits = [asyncio.ensure_future(a.wait()), asyncio.ensure_future(b.wait())]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
