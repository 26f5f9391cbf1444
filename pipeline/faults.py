"""Named fault points for fault-injection tests; unset (always, in production) each costs one dict lookup.

- `METAVOICE_CRASH_AT=name[:n]` kills the process with SIGKILL the n-th time (default first)
  execution reaches `crash_point(name)`. It exists because "kill -9 after the rename but before
  the commit" cannot be hit reliably from outside the process.
- `METAVOICE_DELAY_AT=name:seconds[,name:seconds...]` sleeps that long every time execution
  reaches `delay_point(name)` (or `await adelay_point(name)` on the event loop). It widens a race
  window - records fetched while an assignment is being positioned, a revoke during a slow
  finalize - so a test can hit it every time instead of by luck.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

_counts: dict[str, int] = {}


def crash_point(name: str) -> None:
    spec = os.environ.get("METAVOICE_CRASH_AT")
    if not spec:
        return
    target, _, nth = spec.partition(":")
    if target != name:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def _delay_for(name: str) -> float:
    spec = os.environ.get("METAVOICE_DELAY_AT")
    if not spec:
        return 0.0
    for part in spec.split(","):
        target, _, seconds = part.partition(":")
        if target.strip() == name:
            return float(seconds or 1)
    return 0.0


def delay_point(name: str) -> None:
    """Block the calling thread (use it in code that runs in a worker thread)."""
    if seconds := _delay_for(name):
        time.sleep(seconds)


async def adelay_point(name: str) -> None:
    """Suspend the calling coroutine; the rest of the event loop keeps running."""
    if seconds := _delay_for(name):
        await asyncio.sleep(seconds)
