"""The latency pass: how long an event takes from its publish to a row in a finalized file.

    latency   events published at a steady rate (a share of the measured pipeline capacity), files
              rolled every second, Prefect on: publish -> row in a finalized file, per event
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from metavoice.samples import SampleClip
from pipeline.config import Settings

from .corpus import BUCKET, copy_clips
from .harness import PUBLISH_TIMEOUT_S, bench_consumer, running, unique, until_handled
from .measure import bounded, percentile, rounded

# Latency pass: a short linger and 1 s rolls, so latency is the stream's, not the file's.
LATENCY_LINGER_MS = 100
LATENCY_ROLL_SECONDS = 1.0
LATENCY_LOAD = 0.5  # publish at this share of the measured pipeline capacity


async def run_latency(base: Settings, models: Any, clips: list[SampleClip], rate: float, events: int,
                      work: Path) -> dict[str, Any]:
    """A steady trickle of events (Prefect on, 1 s rolls); latency = finalized file's mtime - publish.

    Each event names a copy of a corpus clip of its own (a distinct object version, with its real
    etag): an event for an object version already written would be a duplicate, not a row.
    """
    import pyarrow.parquet as pq

    from broker.topics import ensure_topics
    from pipeline.events import ObjectEvent
    from producer.kafka import event_publisher

    topic = unique("latency")
    copies = await asyncio.to_thread(copy_clips, base, clips, events, topic)  # set-up: not timed
    st = base.with_overrides(topic=topic, group=topic, output_dir=work / "latency", prefect_enabled=True,
                             batch_linger_ms=LATENCY_LINGER_MS, roll_max_seconds=LATENCY_ROLL_SECONDS)
    await bounded(f"topic {topic} to be created", ensure_topics(st), PUBLISH_TIMEOUT_S)
    app = bench_consumer(st, models, expected=events)
    published: dict[tuple[str, str], float] = {}
    async with running(app, "latency") as consumer:
        async with event_publisher(st) as pub:
            futures = []
            start = time.perf_counter()
            for i, obj in enumerate(copies):
                delay = start + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                ev = ObjectEvent(bucket=BUCKET, key=obj.key, etag=obj.etag, size=obj.size,
                                 event_time=datetime.now(timezone.utc))
                published[(obj.key, obj.etag)] = time.time()
                futures.append(await pub.send(ev))
            await bounded(f"the broker to acknowledge {events} latency events", asyncio.gather(*futures), PUBLISH_TIMEOUT_S)
        stats = await until_handled(app, consumer)
    latencies = []
    for path in sorted((work / "latency" / "data").glob("*.parquet")):
        finalized = path.stat().st_mtime
        t = pq.read_table(path, columns=["id", "etag"]).to_pydict()
        latencies += [finalized - published[k] for k in zip(t["id"], t["etag"]) if k in published]
    return rounded({
        "events": events,
        "rate_per_s": rate,
        "rows": len(latencies),
        "p50_s": percentile(latencies, 50),
        "p95_s": percentile(latencies, 95),
        "max_s": max(latencies) if latencies else None,
        "files": stats.files,
        "batch_linger_ms": LATENCY_LINGER_MS,
        "roll_max_seconds": LATENCY_ROLL_SECONDS,
        # the consumer's own figure: per finalized file, newest record's broker timestamp -> finalize
        "consumer_reported_p50_s": percentile(list(stats.latencies), 50),
    })
