"""The stream's own ceiling: what the consumer costs per event when the models cost nothing.

    stream-ceiling             the production consumer, Prefect on, the settings as given (defaults
                               unless METAVOICE_* / --batch-max-events say otherwise), transcription
                               off (no Whisper loaded) and a tokenizer that costs nothing, on
                               `--ceiling-events` small objects already waiting in the topic
    stream-ceiling-no-prefect  the same with prefect_enabled=False
    stream-ceiling-backfill    stream-ceiling with the backfill timed: the consumer in its group on an
                               empty topic, the clock from the backfill's listing (producer/backfill.py)
                               to the last row committed - what a user measures end to end
    stream-ceiling-s3-output   stream-ceiling writing its dataset to an s3:// prefix on the same S3
                               server (spool, upload at each roll, compare-and-swap summary) instead
                               of a local directory: what the object-store output costs

On a GPU the models get 50-100x faster; then what the stream costs per event is the limit. The
figures are events per second: ceiling/floor is what Kafka, micro-batching, Parquet, summary,
commits and Prefect cost on top of the unavoidable I/O; on/off is what Prefect costs; flow runs
and task runs per 1,000 events are what Prefect records. The clock of a ceiling run starts when
its consumer has its partitions (the events wait in the topic: a backlog) and stops when every
event is in a finalized, committed file.

Its yardsticks, io-floor and plain-floor, are io_floor.py; `run_ceiling_modes` runs the three in turn.
"""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.audio import BUILTIN_TOKENIZER_LAYOUT, DecodedAudio
from pipeline.config import Settings
from pipeline.tokenizers.base import AudioTokenizer

from .corpus import BUCKET, StoredObject
from .harness import (
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
from .io_floor import run_io_floor, run_plain_floor
from .measure import ModeResult, bounded, measured, per_thousand

CEILING_MODES = ("io-floor", "plain-floor", "stream-ceiling", "stream-ceiling-no-prefect", "stream-ceiling-s3-output",
                 "stream-ceiling-backfill")
STREAM_MODES = CEILING_MODES[2:5]  # on the pre-published topic; stream-ceiling-backfill publishes its own
OUTPUT_BUCKET = "bench-dataset"


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
    from pipeline.models import Models, NoTranscription

    return Models(base.with_overrides(transcribe=False), NoTranscription(), FreeTokenizer())


async def publish_small_objects(settings: Settings, objects: list[StoredObject]) -> float:
    """One event per object (its real etag: If-Match holds), all before any consumer runs."""
    from broker.topics import ensure_topics
    from pipeline.events import ObjectEvent
    from producer.kafka import event_publisher

    await bounded(f"topic {settings.topic} to be created", ensure_topics(settings), PUBLISH_TIMEOUT_S)
    t0 = time.perf_counter()
    async with event_publisher(settings) as pub:
        futures = [await pub.send(ObjectEvent(bucket=BUCKET, key=o.key, etag=o.etag, size=o.size)) for o in objects]
        await bounded(f"the broker to acknowledge {len(objects)} events on {settings.topic}",
                      asyncio.gather(*futures), PUBLISH_TIMEOUT_S)
    return time.perf_counter() - t0


# --- stream-ceiling, stream-ceiling-no-prefect ----------------------------------------------------
async def run_stream_ceiling(base: Settings, models: Any, name: str, prefect: bool, topic: str, events: int,
                             work: Path, s3_output: bool = False) -> ModeResult:
    """The production consumer on `events` events waiting in `topic`; a group and output of its own
    (a local directory, or with `s3_output` a prefix of OUTPUT_BUCKET and a local spool)."""
    group = unique(name)
    output = f"s3://{OUTPUT_BUCKET}/{group}" if s3_output else work / group
    st = base.with_overrides(topic=topic, group=group, output_dir=output, prefect_enabled=prefect, transcribe=False,
                             spool_dir=str(work / f"{group}-spool") if s3_output else None)
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
        "output": str(output),
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


async def run_stream_ceiling_backfill(base: Settings, models: Any, events: int, work: Path) -> ModeResult:
    """The consumer (Prefect on, transcription off, the settings as given) already in its group on a
    topic of its own; wall = the backfill's start (list SMALL_PREFIX, publish) -> every row committed."""
    from broker.topics import ensure_topics
    from producer.backfill import run_backfill

    from .corpus import SMALL_PREFIX

    name = "stream-ceiling-backfill"
    group = unique(name)
    st = base.with_overrides(topic=group, group=group, output_dir=work / group, prefect_enabled=True, transcribe=False)
    await bounded(f"topic {group} to be created", ensure_topics(st), PUBLISH_TIMEOUT_S)  # set-up: not timed
    app = bench_consumer(st, models, expected=events)
    async with running(app, name) as consumer:
        prefect0 = prefect_counts()
        with measured(name) as info, batch_probe() as batches:
            t0 = time.perf_counter()
            backfill = await bounded(f"the backfill of s3://{BUCKET}/{SMALL_PREFIX}", run_backfill(
                st, BUCKET, [SMALL_PREFIX], ".flac"), PUBLISH_TIMEOUT_S)
            t_published = time.perf_counter()
            stats = await until_handled(app, consumer)
            wall = time.perf_counter() - t0
        used = prefect_delta(prefect0)
    if backfill.published != events or stats.rows != events:
        raise RuntimeError(f"{name}: published {backfill.published}, {stats.rows} rows for {events} objects")
    return ModeResult(name, stats.rows, stats.audio_seconds, wall, **info, details={
        "events_per_second": stats.rows / wall, "batches": stats.batches,
        "events_per_batch": stats.rows / stats.batches if stats.batches else None,
        "files_written": stats.files, "backfill_seconds": t_published - t0,
        "flow_runs_per_1000_events": per_thousand(used["flow_runs"], events),
        "stage_seconds": dict(stats.stage_seconds), "per_batch": summarize_batches(batches, used),
    })


def run_ceiling_modes(base: Settings, objects: list[StoredObject], work: Path, skip: set[str]) -> dict[str, ModeResult]:
    """io-floor and plain-floor, then the consumers on one topic holding an event per object (untimed set-up)."""
    out: dict[str, ModeResult] = {}
    if "io-floor" not in skip:
        out["io-floor"] = asyncio.run(run_io_floor(base, objects))
    if "plain-floor" not in skip:
        out["plain-floor"] = asyncio.run(run_plain_floor(base, objects))
    stream = [m for m in STREAM_MODES if m not in skip]
    if "stream-ceiling-backfill" not in skip:
        models = ceiling_models(base)
        try:
            out["stream-ceiling-backfill"] = asyncio.run(run_stream_ceiling_backfill(base, models, len(objects), work))
        finally:
            models.close()
    if not stream:
        return out
    topic = unique("ceiling")
    st = base.with_overrides(topic=topic)
    asyncio.run(publish_small_objects(st, objects))
    if "stream-ceiling-s3-output" in stream:
        create_output_bucket(st)
    models = ceiling_models(base)
    try:
        for name in stream:
            out[name] = asyncio.run(run_stream_ceiling(st, models, name, name != "stream-ceiling-no-prefect", topic,
                                                       len(objects), work, s3_output=name.endswith("s3-output")))
    finally:
        models.close()
    return out


def create_output_bucket(settings: Settings) -> None:
    """The bucket the s3-output arm writes its dataset to (untimed set-up)."""
    from botocore.session import get_session

    client = get_session().create_client("s3", **settings.output_s3_client_kwargs())
    try:
        client.create_bucket(Bucket=OUTPUT_BUCKET)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass
    finally:
        client.close()
