"""The pacing the producers rely on: event rates (backfill) and the Cloudflare request quota."""

from __future__ import annotations

import asyncio
import time

from producer.r2_queue import Backoff
from producer.ratelimit import SlidingWindowLimiter, TokenBucket


async def test_token_bucket_spaces_acquisitions_at_the_configured_rate():
    bucket = TokenBucket(rate=20, burst=1)
    start = time.monotonic()
    for _ in range(6):
        await bucket.acquire()
    assert time.monotonic() - start >= 5 / 20 - 0.01  # the first is free, then one per 50 ms


async def test_sliding_window_never_allows_more_than_the_limit_in_any_window():
    limiter = SlidingWindowLimiter(limit=3, window=0.2)
    stamps = []
    for _ in range(7):
        await limiter.acquire()
        stamps.append(time.monotonic())
    assert all(stamps[i + 3] - stamps[i] >= 0.2 for i in range(len(stamps) - 3))
    assert stamps[-1] - stamps[0] >= 0.4  # 7 requests at 3 per window need three windows


async def test_sliding_window_is_shared_by_concurrent_callers():
    limiter = SlidingWindowLimiter(limit=2, window=0.2)
    start = time.monotonic()
    await asyncio.gather(*(limiter.acquire() for _ in range(5)))
    assert time.monotonic() - start >= 0.4


def test_backoff_grows_is_capped_and_honours_retry_after():
    backoff = Backoff(base=0.5, cap=4.0)
    delays = [backoff.next_delay() for _ in range(10)]
    assert all(0.5 <= d <= 4.0 for d in delays)
    assert backoff.next_delay(retry_after=3.5) >= 3.5
    assert backoff.next_delay(retry_after=100) == 4.0  # never beyond the cap
    backoff.reset()
    assert backoff.next_delay() <= 1.0
