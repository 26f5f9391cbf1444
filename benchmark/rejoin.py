"""How long a consumer waits for its first partitions, on a fresh group and right after a member
stopped cleanly, on the real embedded Tansu broker (issue 22 item 5).

    python -m benchmark.rejoin [--partitions 4] [--session-ms 30000,6000] [--rebalance-ms MS] [--static]

Each arm: a fresh group; member A joins (first join), stops cleanly (LeaveGroup); member B of the
same group starts at once (the restart) and the seconds to its first assignment are printed. With
`--static` each arm runs a second time with `group.instance.id` (static membership, KIP-345) set to
the same id for A and B, as a restarted pod keeps its name. Members are made by `make_consumer`,
as the consumer makes its own, so the settings measured are the ones shipped.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from pathlib import Path

from broker.clients import make_consumer, start_when_broker_is_up
from broker.topics import ensure_topics
from pipeline.config import Settings

ASSIGN_LIMIT_S = 180.0  # a join that takes longer is reported as such, not waited for


async def _first_assignment(settings: Settings, instance_id: str | None, rebalance_ms: int | None) -> tuple[float, object]:
    """Start one member and return (seconds to its first non-empty assignment, the member)."""
    settings = settings.with_overrides(kafka_group_instance_id=instance_id)
    opts: dict = {}
    if rebalance_ms:
        opts["rebalance_timeout_ms"] = rebalance_ms
    c = make_consumer(settings, settings.topic, enable_auto_commit=False, auto_offset_reset="earliest", **opts)
    t0 = time.monotonic()
    await start_when_broker_is_up(c, settings)
    while not c.assignment():
        if time.monotonic() - t0 > ASSIGN_LIMIT_S:
            break
        await c.getmany(timeout_ms=200)
    return time.monotonic() - t0, c


async def arm(bootstrap: str, partitions: int, session_ms: int, static: bool, rebalance_ms: int | None = None) -> tuple[float, float]:
    group = f"rejoin-{uuid.uuid4().hex[:8]}"
    st = Settings(kafka_bootstrap=bootstrap, group=group, topic=f"rejoin-{group}", topic_partitions=partitions,
                  kafka_session_timeout_ms=session_ms)
    await ensure_topics(st)
    instance = f"{group}-pod-0" if static else None
    first, a = await _first_assignment(st, instance, rebalance_ms)
    await a.stop()  # clean stop: LeaveGroup (a static member does not send it, by design)
    rejoin, b = await _first_assignment(st, instance, rebalance_ms)
    await b.stop()
    return first, rejoin


async def main(partitions: int, sessions: list[int], static: bool, rebalance_ms: int | None = None) -> None:
    from metavoice.local_services import start_broker

    workdir = Path(tempfile.mkdtemp(prefix="metavoice-rejoin-"))
    broker = start_broker(workdir)
    try:
        bootstrap = f"127.0.0.1:{broker.port}"
        print(f"{'session_ms':>10} {'rebalance_ms':>12} {'static':>6} {'first join s':>12} {'restart join s':>14}", flush=True)
        for session_ms in sessions:
            for is_static in ([False, True] if static else [False]):
                first, rejoin = await arm(bootstrap, partitions, session_ms, is_static, rebalance_ms)
                print(f"{session_ms:>10} {str(rebalance_ms or session_ms):>12} {str(is_static):>6} {first:>12.1f} "
                      f"{rejoin:>14.1f}", flush=True)
    finally:
        broker.stop()


def cli(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmark.rejoin", description=__doc__.splitlines()[0])
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--session-ms", default="30000,6000", help="comma-separated session timeouts to try")
    p.add_argument("--rebalance-ms", type=int, default=None, help="rebalance_timeout_ms (aiokafka: the session timeout)")
    p.add_argument("--static", action="store_true", help="also try static membership (group.instance.id)")
    a = p.parse_args(argv)
    asyncio.run(main(a.partitions, [int(s) for s in a.session_ms.split(",")], a.static, a.rebalance_ms))


if __name__ == "__main__":
    cli()
