"""Two pacing tools: a token bucket for event rates and a sliding window for API quotas."""

from __future__ import annotations

import asyncio
import collections
import time


class TokenBucket:
    """At most `rate` acquisitions per second on average, bursts of up to `burst`."""

    def __init__(self, rate: float, burst: float | None = None) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = float(rate)
        # One second's worth by default (at least 1): smooth enough, cheap at high rates.
        self.capacity = float(burst if burst is not None else max(1.0, rate))
        self._tokens = self.capacity
        self._stamp = time.monotonic()
        self._lock = asyncio.Lock()

    async def acquire(self, n: float = 1.0) -> None:
        async with self._lock:
            while True:
                now = time.monotonic()
                self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate)
                self._stamp = now
                if self._tokens >= n:
                    self._tokens -= n
                    return
                await asyncio.sleep((n - self._tokens) / self.rate)


class SlidingWindowLimiter:
    """At most `limit` acquisitions in any `window` seconds (an exact quota, no burst overshoot).

    Cloudflare counts API requests per 5-minute window; a token bucket refilled at limit/window
    would allow up to twice the quota inside one window after an idle period, this cannot.
    """

    def __init__(self, limit: int, window: float) -> None:
        if limit < 1 or window <= 0:
            raise ValueError("limit must be >= 1 and window > 0")
        self.limit = limit
        self.window = float(window)
        self._stamps: collections.deque[float] = collections.deque()
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        async with self._lock:
            while True:
                now = time.monotonic()
                while self._stamps and now - self._stamps[0] >= self.window:
                    self._stamps.popleft()
                if len(self._stamps) < self.limit:
                    self._stamps.append(now)
                    return
                await asyncio.sleep(self._stamps[0] + self.window - now)
