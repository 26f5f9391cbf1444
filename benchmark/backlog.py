"""Backlog memory: `--backlog-events` waiting in the topic must not grow the consumer's memory.

Two fresh child processes (each its own RSS), same settings, same corpus, same duration
(`--backlog-seconds` after the partitions are assigned), RSS sampled every 0.25 s: one with just
enough events to fill every in-flight batch, one with the whole backlog. The difference of the
peaks is what the backlog itself costs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from metavoice.samples import SampleClip
from pipeline.config import Settings

from .corpus import BUCKET
from .harness import ASSIGN_TIMEOUT_S, PUBLISH_TIMEOUT_S, bench_consumer, unique, warm_up_prefect
from .measure import MB, BenchWaitTimeout, RssSampler, bounded, log, psutil_module, rounded, wait_for

RSS_TARGET_MB = 200
CHILD_START_S = 300  # a child loads the model and starts Prefect before its window begins


async def publish_backlog(settings: Settings, clips: list[SampleClip], events: int) -> float:
    """`events` events cycling over the corpus's objects, without an etag: every one is downloaded,
    decoded and transcribed (an etag would make all but the first per object a duplicate, dropped
    before any work), and all but the first row per object is dropped as a duplicate when applied.
    The consumer does the in-flight work of `events` objects while storing only the corpus."""
    from broker.topics import ensure_topics
    from pipeline.events import ObjectEvent
    from producer.kafka import event_publisher

    await bounded(f"topic {settings.topic} to be created", ensure_topics(settings), PUBLISH_TIMEOUT_S)
    t0 = time.perf_counter()
    async with event_publisher(settings) as pub:
        futures = []
        for i in range(events):
            clip = clips[i % len(clips)]
            futures.append(await pub.send(ObjectEvent(bucket=BUCKET, key=clip.key, size=clip.path.stat().st_size)))
        await bounded(f"the broker to acknowledge {events} backlog events", asyncio.gather(*futures), PUBLISH_TIMEOUT_S)
    return time.perf_counter() - t0


def run_backlog_comparison(base: Settings, clips: list[SampleClip], events: int, seconds: float,
                           work: Path) -> dict[str, Any]:
    """Peak RSS with `events` waiting vs. with just enough to fill every in-flight batch.

    Both runs are fresh consumer processes with the same settings, corpus and duration, so the
    in-flight batches (audio, Whisper's working set) are in both; what the backlog itself costs
    is the difference of the peaks - the figure the target is about.
    """
    # as many records as the consumer holds ahead of its work under a backlog: every slot busy, one
    # batch waiting for a slot, one queued, one the fetch loop is handing over - at their largest
    in_flight = (base.pipeline_depth + 3) * largest_batch(base)
    small = run_backlog(base, clips, min(in_flight, events), seconds, work, "in-flight")
    large = run_backlog(base, clips, events, seconds, work, "backlog")
    growth = (large["peak_rss_mb"] - small["peak_rss_mb"]) if large.get("peak_rss_mb") and small.get("peak_rss_mb") else None
    return rounded({"in_flight_only": small, "backlog": large, "events": events, "seconds": seconds,
                     "growth_from_backlog_mb": growth, "target_growth_mb": RSS_TARGET_MB})


def largest_batch(st: Settings) -> int:
    """Events in the largest micro-batch: `batch_max_events_backlog` where this version has it."""
    return max(st.batch_max_events, getattr(st, "batch_max_events_backlog", 0))


def run_backlog(base: Settings, clips: list[SampleClip], events: int, seconds: float, work: Path,
                name: str) -> dict[str, Any]:
    """Publish `events`, then sample a fresh consumer process's RSS while it works through them."""
    topic = unique(name)
    st = base.with_overrides(topic=topic, group=topic, output_dir=work / name, prefect_enabled=True)
    publish_s = asyncio.run(publish_backlog(st, clips, events))
    result_path = work / f"{name}-result.json"
    env = {**os.environ, **_settings_env(st)}
    argv = [sys.executable, "-m", "benchmark", "--backlog-worker", "--backlog-seconds", str(seconds),
            "--json", str(result_path)]
    log.info("backlog: %d events published in %.1fs; consumer child runs for %gs", events, publish_s, seconds)
    root = Path(__file__).resolve().parents[1]  # the repository root, where `-m benchmark` finds its packages
    child = subprocess.Popen(argv, env=env, start_new_session=True, cwd=root)
    limit = seconds + CHILD_START_S
    deadline = time.monotonic() + limit
    try:
        while not result_path.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        # The child and the Prefect server it started are in their own session: end exactly those.
        if child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    if not result_path.exists():
        if child.returncode == -signal.SIGKILL:
            raise BenchWaitTimeout(f"waited {limit:g}s for the {name} consumer child's result ({result_path})")
        raise RuntimeError(f"the {name} consumer child exited {child.returncode} without a result")
    out = json.loads(result_path.read_text())
    out.update({"events": events, "publish_seconds": publish_s, "objects": len(clips)})
    return rounded(out)


def _settings_env(st: Settings) -> dict[str, str]:
    keys = ["kafka_bootstrap", "topic", "group", "s3_endpoint_url", "s3_region", "output_dir", "prefect_enabled",
            "device", "compute_type", "cpu_threads", "whisper_model", "whisper_batch_size", "whisper_window", "beam_size",
            "tokenizer", "synthetic_load_ms", "batch_max_events", "pipeline_depth", "language", "topic_partitions",
            "kafka_session_timeout_ms", "transcribe", "bucket", "batch_max_events_backlog"]
    env = {}
    for k in keys:
        v = getattr(st, k, None)
        if v is not None:
            env[f"METAVOICE_{k.upper()}"] = str(v).lower() if isinstance(v, bool) else str(v)
    return env


def backlog_worker(seconds: float, result_path: Path) -> int:
    """Child: load models, take the baseline, consume for `seconds` after assignment, report RSS."""
    psutil = psutil_module()
    proc = psutil.Process()
    rss = lambda: proc.memory_info().rss / MB  # noqa: E731
    st = Settings()
    rss_start = rss()
    from consumer.app import StreamConsumer  # noqa: F401  (imports Prefect, aiokafka, ...)

    from pipeline.models import Models

    asyncio.run(warm_up_prefect())  # the Prefect client and API are part of the baseline
    models = Models.load(st)
    baseline = rss()
    # The model's own transient working set, no Kafka: one call with a full batch of 30 s windows
    # (the encoder's activations grow with the batch; they are freed after the call).
    tr = models.transcriber
    with RssSampler(0.02) as working:
        tr.transcribe_batch([np.zeros(28 * 16_000, dtype=np.float32)] * tr.batch_size)
    after_working = rss()

    async def main() -> None:
        app = bench_consumer(st, models, expected=sys.maxsize)  # runs until the parent ends it
        consumer = asyncio.create_task(app.run())
        with RssSampler(0.25) as sampler:
            await wait_for(f"the backlog consumer's partitions to be assigned (group {st.group})",
                           app.assigned, ASSIGN_TIMEOUT_S, worker=consumer)
            t_assigned = time.perf_counter()
            at_assignment = rss()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(consumer), timeout=seconds)
        t_assigned_rel = t_assigned - sampler.t0
        series = [(t - t_assigned_rel, v) for t, v in sampler.series]
        during = [v for t, v in series if t >= 0]
        half = seconds / 2
        first = [v for t, v in series if 0 <= t < half]
        second = [v for t, v in series if t >= half]
        c = app.committer.stats if app.committer is not None else None
        result = {
            "seconds": seconds,
            "rss_at_start_mb": rss_start,
            "rss_after_model_load_mb": baseline,
            "model_working_set_peak_mb": working.peak,
            "rss_after_working_set_mb": after_working,
            "rss_at_assignment_mb": at_assignment,
            "peak_rss_mb": max(during) if during else None,
            "final_rss_mb": series[-1][1],
            "median_rss_second_half_mb": float(np.median(second)) if second else None,
            "growth_over_model_load_mb": (max(during) - baseline) if during else None,
            "growth_over_model_working_set_mb": (max(during) - working.peak) if during else None,
            "growth_first_to_second_half_mb": (max(second) - max(first)) if first and second else None,
            "records_fetched": app.stats.records,
            "rows_written": c.rows if c else 0,  # appended to a file (the open one included)
            "batches_done": app.stats.batches,
            "series_mb": [(round(t, 1), round(v, 1)) for t, v in series[:: max(1, len(series) // 40)]],
            "kafka_fetch": {"max_partition_fetch_bytes": 1 << 20, "fetch_max_bytes": _fetch_max_bytes(app),
                            "partitions": st.topic_partitions, "batch_max_events": st.batch_max_events,
                            "largest_batch_events": largest_batch(st),
                            "pipeline_depth": st.pipeline_depth},
        }
        tmp = result_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rounded(result)))
        tmp.replace(result_path)
        # The parent ends this process (and the Prefect server it started) once it has read the
        # result: the consumer keeps working meanwhile, nothing here waits for a drain.
        await asyncio.sleep(3600)

    asyncio.run(main())
    return 0


def _fetch_max_bytes(app: Any) -> int | None:
    consumer = getattr(app, "consumer", None)
    fetcher = getattr(consumer, "_fetcher", None)
    return getattr(fetcher, "_fetch_max_bytes", None)

