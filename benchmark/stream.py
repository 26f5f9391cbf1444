"""The stream modes: the whole path, from a backfill to finalized files, through the production consumer.

    pipeline             backfill -> Kafka -> consumer (Prefect on) -> Parquet + summary.json
    pipeline-no-prefect  the same with prefect_enabled=False

The clock starts when the backfill starts, with the consumer already in its group (harness.py),
and stops when every event is handled, finalized and committed.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pipeline.config import Settings

from .corpus import BUCKET, CORPUS_PREFIX, mean_overlap
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
from .measure import ModeResult, bounded, log, measured


async def run_pipeline(base: Settings, models: Any, name: str, prefect: bool, work: Path,
                       texts: dict[str, str]) -> ModeResult:
    """A consumer already in its group; wall = backfill start -> every event handled, finalized, committed."""
    from broker.topics import ensure_topics
    from producer.backfill import run_backfill

    topic = unique(name)
    out_dir = work / topic  # one per round
    st = base.with_overrides(topic=topic, group=topic, output_dir=out_dir, prefect_enabled=prefect)
    await bounded(f"topic {topic} to be created", ensure_topics(st), PUBLISH_TIMEOUT_S)  # set-up: not timed
    app = bench_consumer(st, models, expected=len(texts))
    t_start = time.perf_counter()
    async with running(app, name) as consumer:
        busy0, prefect0 = models.busy_seconds, prefect_counts()
        with measured(name) as info, batch_probe() as batches:
            t0 = time.perf_counter()
            backfill = await bounded(f"the backfill of s3://{BUCKET}/{CORPUS_PREFIX} into {topic}",
                                     run_backfill(st, BUCKET, [CORPUS_PREFIX], ".flac"), PUBLISH_TIMEOUT_S)
            if backfill.published != len(texts):
                raise RuntimeError(f"the backfill published {backfill.published} events for {len(texts)} clips")
            t_published = time.perf_counter()
            stats = await until_handled(app, consumer)
            wall = time.perf_counter() - t0
        prefect_used = prefect_delta(prefect0)
    busy = models.busy_seconds - busy0
    if stats.rows != len(texts):
        log.warning("%s wrote %d rows for %d clips (dead letters %d): throughput covers those rows only",
                    name, stats.rows, len(texts), stats.dead_letters)
    return ModeResult(
        name, stats.rows, stats.audio_seconds, wall, **info, word_overlap=mean_overlap(read_transcripts(out_dir), texts),
        details={
            "published": backfill.published,
            "dead_letters": stats.dead_letters,
            "batches": stats.batches,
            "files_written": stats.files,
            # not in the wall time: a long-running consumer joined its group long ago
            "start_to_assignment_s": (app.assigned_at or t0) - t_start,
            "backfill_seconds": t_published - t0,
            "stage_seconds": dict(stats.stage_seconds),
            "model_busy_seconds": busy,
            "device_utilisation": busy / wall if wall > 0 else None,
            "per_batch": summarize_batches(batches, prefect_used),
        },
    )


def read_transcripts(output_dir: Path) -> dict[str, str]:
    import pyarrow.parquet as pq

    out: dict[str, str] = {}
    for path in sorted((output_dir / "data").glob("*.parquet")):
        t = pq.read_table(path, columns=["id", "transcription"]).to_pydict()
        out.update(zip(t["id"], t["transcription"]))
    return out
