"""The stream's own ceiling: what the consumer costs per event when the models cost nothing.

    io-floor                   list the objects, download them `download_concurrency` at a time,
                               decode each on a CPU pool of the consumer's size as it arrives: the
                               I/O and decode no stream can avoid
    stream-ceiling             the production consumer, Prefect on, the settings as given (defaults
                               unless METAVOICE_* / --batch-max-events say otherwise), transcription
                               off (no Whisper loaded) and a tokenizer that costs nothing, on
                               `--ceiling-events` small objects already waiting in the topic
    stream-ceiling-no-prefect  the same with prefect_enabled=False

On a GPU the models get 50-100x faster; then what the stream costs per event is the limit. The
figures are events per second: ceiling/floor is what Kafka, micro-batching, Parquet, summary,
commits and Prefect cost on top of the unavoidable I/O; on/off is what Prefect costs; flow runs
and task runs per 1,000 events are what Prefect records. The clock of a ceiling run starts when
its consumer has its partitions (the events wait in the topic: a backlog) and stops when every
event is in a finalized, committed file.
"""

from __future__ import annotations

import asyncio
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ..audio import BUILTIN_TOKENIZER_LAYOUT, DecodedAudio
from ..config import Settings
from ..tokenizers.base import AudioTokenizer
from .corpus import BUCKET, SMALL_PREFIX, StoredObject
from .measure import ModeResult, bounded, measured, per_thousand
from .stream import (
    PUBLISH_TIMEOUT_S,
    batch_probe,
    bench_consumer,
    prefect_counts,
    prefect_delta,
    running,
    summarize_batches,
    unique,
    until_handled,
)

CEILING_MODES = ("io-floor", "stream-ceiling", "stream-ceiling-no-prefect")


class FreeTokenizer(AudioTokenizer):
    """Codes of the synthetic tokenizer's shape (8 codebooks at 75 Hz, all zero) at no cost: the
    ceiling measures the stream, not a model. Reads the built-in layout, so decode does the same
    work as for the default tokenizer."""

    name = "free"
    codebooks = 8
    sample_rate = BUILTIN_TOKENIZER_LAYOUT.sample_rate
    channels = BUILTIN_TOKENIZER_LAYOUT.channels
    frame_rate = sample_rate / 320
    device = "cpu"

    def encode_batch(self, clips: list[DecodedAudio]) -> list[np.ndarray]:
        return [np.zeros((self.codebooks, max(1, math.ceil(c.view(self.layout).shape[0] / 320))), np.int16)
                for c in clips]


def ceiling_models(base: Settings):
    """No Whisper (transcription off) and the free tokenizer, on their own device thread and CPU pool."""
    from ..models import Models, NoTranscription

    return Models(base.with_overrides(transcribe=False), NoTranscription(), FreeTokenizer())


async def publish_small_objects(settings: Settings, objects: list[StoredObject]) -> float:
    """One event per object (its real etag: If-Match holds), all before any consumer runs."""
    from broker.topics import ensure_topics
    from producer.kafka import event_publisher

    from ..events import ObjectEvent

    await bounded(f"topic {settings.topic} to be created", ensure_topics(settings), PUBLISH_TIMEOUT_S)
    t0 = time.perf_counter()
    async with event_publisher(settings) as pub:
        futures = [await pub.send(ObjectEvent(bucket=BUCKET, key=o.key, etag=o.etag, size=o.size)) for o in objects]
        await bounded(f"the broker to acknowledge {len(objects)} events on {settings.topic}",
                      asyncio.gather(*futures), PUBLISH_TIMEOUT_S)
    return time.perf_counter() - t0


# --- io-floor -------------------------------------------------------------------------------------
async def run_io_floor(settings: Settings, objects: list[StoredObject]) -> ModeResult:
    """List SMALL_PREFIX, download `download_concurrency` at a time, decode on the CPU pool as they arrive."""
    from ..batch import Downloaded, Slot, decode_stage
    from ..storage import download_object, s3_client

    st = settings
    threads = max(1, min(4, st.resolved_cpu_threads()))  # as `Models`' CPU pool
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="floor-cpu")
    loop = asyncio.get_running_loop()
    timings = {"list": 0.0, "download": 0.0, "decode": 0.0}
    decoded = failed = 0
    audio = 0.0
    try:
        async with s3_client(st) as s3:
            with measured("io-floor") as info:
                t0 = time.perf_counter()
                keys = []
                async for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=SMALL_PREFIX):
                    keys += [o["Key"] for o in page.get("Contents", [])]
                timings["list"] = time.perf_counter() - t0
                sem = asyncio.Semaphore(st.download_concurrency)

                def decode(data: bytes):
                    t = time.perf_counter()
                    try:
                        return decode_stage([Slot(None, Downloaded(data, ""))], st)[0]  # type: ignore[arg-type]
                    finally:
                        timings["decode"] += time.perf_counter() - t

                async def one(key: str) -> None:
                    nonlocal decoded, failed, audio
                    async with sem:
                        t = time.perf_counter()
                        data, _ = await download_object(s3, BUCKET, key, st.max_object_bytes, st.s3_retry_attempts)
                        timings["download"] += time.perf_counter() - t
                    slot = await loop.run_in_executor(pool, decode, data)
                    if slot.ok:
                        decoded += 1
                        audio += slot.value.duration_sec  # type: ignore[union-attr]
                    else:
                        failed += 1

                await asyncio.gather(*(one(k) for k in keys))
                wall = time.perf_counter() - t0
    finally:
        pool.shutdown(wait=True)
    if len(keys) != len(objects) or failed:
        raise RuntimeError(f"io-floor: listed {len(keys)} objects for {len(objects)} uploaded, {failed} failed to decode")
    return ModeResult("io-floor", decoded, audio, wall, **info, details={
        "events_per_second": decoded / wall, "stage_seconds": timings,
        "download_concurrency": st.download_concurrency, "decode_threads": threads,
    })


# --- stream-ceiling, stream-ceiling-no-prefect ----------------------------------------------------
async def run_stream_ceiling(base: Settings, models: Any, name: str, prefect: bool, topic: str, events: int,
                             work: Path) -> ModeResult:
    """The production consumer on `events` events waiting in `topic`; a group and output of its own."""
    group = unique(name)
    st = base.with_overrides(topic=topic, group=group, output_dir=work / group, prefect_enabled=prefect, transcribe=False)
    app = bench_consumer(st, models, expected=events)
    t_start = time.perf_counter()
    async with running(app, name) as consumer:
        # the clock starts at the assignment: the events are waiting, fetching has begun
        t0 = app.assigned_at
        busy0, prefect0 = models.busy_seconds, prefect_counts()
        with measured(name) as info, batch_probe() as batches:
            stats = await until_handled(app, consumer)
            wall = time.perf_counter() - t0
        used = prefect_delta(prefect0)
    if stats.rows != events:
        raise RuntimeError(f"{name}: {stats.rows} rows for {events} events ({stats.dead_letters} dead letters, "
                           f"{stats.duplicates} duplicates, {stats.superseded} superseded)")
    per_batch = summarize_batches(batches, used)
    return ModeResult(name, stats.rows, stats.audio_seconds, wall, **info, details={
        "events_per_second": stats.rows / wall,
        "batches": stats.batches,
        "events_per_batch": stats.rows / stats.batches if stats.batches else None,
        "files_written": stats.files,
        "flow_runs_per_1000_events": per_thousand(used["flow_runs"], events),
        "task_runs_per_1000_events": per_thousand(used["task_runs"], events),
        "start_to_assignment_s": t0 - t_start,
        "stage_seconds": dict(stats.stage_seconds),
        "model_busy_seconds": models.busy_seconds - busy0,
        "per_batch": per_batch,
        "settings": {k: getattr(st, k) for k in ("batch_max_events", "batch_max_events_backlog", "batch_max_bytes",
                                                  "batch_linger_ms", "pipeline_depth", "download_concurrency",
                                                  "roll_max_rows") if hasattr(st, k)},
    })


def run_ceiling_modes(base: Settings, objects: list[StoredObject], work: Path, skip: set[str]) -> dict[str, ModeResult]:
    """io-floor, then the two consumers on one topic holding an event per object (untimed set-up)."""
    out: dict[str, ModeResult] = {}
    if "io-floor" not in skip:
        out["io-floor"] = asyncio.run(run_io_floor(base, objects))
    stream = [m for m in ("stream-ceiling", "stream-ceiling-no-prefect") if m not in skip]
    if not stream:
        return out
    topic = unique("ceiling")
    st = base.with_overrides(topic=topic)
    asyncio.run(publish_small_objects(st, objects))
    models = ceiling_models(base)
    try:
        for name in stream:
            out[name] = asyncio.run(run_stream_ceiling(st, models, name, name == "stream-ceiling", topic,
                                                       len(objects), work))
    finally:
        models.close()
    return out
