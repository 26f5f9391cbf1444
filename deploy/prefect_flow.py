"""Prefect deployment entrypoints: one streaming consumer process as one long-running flow run
(`stream_consumer`), and the scheduled compaction of the dataset's table (`compact_output`).

`deploy/prefect.yaml` points at `stream_consumer`. Every flow run joins the same Kafka consumer
group, so starting N runs of the deployment (on N GPUs) spreads the topic's partitions over N
consumers; Kafka's group protocol does the balancing, Prefect only places and watches the
processes. Keep N <= the topic's partition count: extra members get no partitions and idle.

Each run reads its settings from METAVOICE_* (set as job variables on the work pool); the
parameters below override the few that differ between runs.

Stopping: a flow run stops the way `python -m consumer` does. Cancelling it from Prefect (a
worker answers with SIGTERM, then SIGKILL after its grace period, 30 s for process workers), a
plain SIGTERM/SIGINT, or an asyncio cancellation of the flow all stop fetching, drain what was
fetched, finalize the open file and commit, within `shutdown_timeout`; the run then ends
Completed (exit 0) - or, for an asyncio cancellation, Cancelled after the drain. A second signal
exits at once (130) without committing. Keep `shutdown_timeout` below the worker's grace period:
a SIGKILL loses nothing (the files prove what was done) but the open file's events are processed
again. When the Prefect API is down, the consumer goes on without it (pipeline/flows.py); if it is
still down when the run ends, the engine cannot record the end and exits 1 - after the data was
committed.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from prefect import flow

from consumer.app import RunStats, StreamConsumer
from pipeline.config import Settings
from pipeline.logs import setup_logging

log = logging.getLogger("consumer")


@flow(name="metavoice-stream-consumer", log_prints=True, persist_result=False)
async def stream_consumer(
    group: str | None = None,
    topic: str | None = None,
    output_dir: str | None = None,
    exit_when_idle: float | None = None,
    from_beginning: bool | None = None,
) -> dict[str, Any]:
    """Consume until cancelled (or idle for `exit_when_idle` s, for a bounded replay/backfill run)."""
    settings = Settings().with_overrides(
        group=group, topic=topic, output_dir=output_dir, exit_when_idle=exit_when_idle,
        from_beginning=from_beginning,
    )
    setup_logging(settings)  # the consumer's own lines (one per batch), as `python -m consumer` logs them
    stats = await run_until_stopped(StreamConsumer(settings))
    return {
        "records": stats.records,
        "batches": stats.batches,
        "rows": stats.rows,
        "dead_letters": stats.dead_letters,
        "wall_seconds": stats.wall_seconds,
        "stop_reason": stats.stop_reason,
    }


async def run_until_stopped(app: StreamConsumer) -> RunStats:
    """`app.run()`; SIGTERM, SIGINT and a cancellation of this coroutine all drain, finalize and commit.

    The consumer runs in a task of its own, shielded: a cancellation asks it to stop and waits for
    the drain (bounded by `shutdown_timeout` inside the consumer), then is raised again.
    """
    try:
        app.install_signal_handlers()
    except (ValueError, RuntimeError, NotImplementedError) as exc:  # signals belong to the main thread
        log.warning("cannot handle SIGTERM here (%s): a SIGTERM stops without draining; cancelling the "
                    "flow run still drains, finalizes and commits", exc)
    run = asyncio.ensure_future(app.run())
    cancelled: asyncio.CancelledError | None = None
    while True:
        try:
            stats = await asyncio.shield(run)
            break
        except asyncio.CancelledError as exc:
            if run.done():  # the consumer itself was cancelled: nothing was committed after it
                raise
            cancelled = cancelled or exc
            app.request_stop("flow run cancelled")
    if cancelled is not None:
        raise cancelled  # drained and committed; the run ends Cancelled as asked
    return stats


@flow(name="metavoice-compact", log_prints=True, persist_result=False)
def compact_output(output_dir: str | None = None, target_size: int | None = None,
                   retention_hours: int | None = None) -> dict[str, Any]:
    """`metavoice compact OUTPUT` as a scheduled flow run (deploy/prefect.yaml, README "Maintenance").

    No `force`: a schedule never vacuums under the safe minimum retention (`MIN_RETENTION_HOURS`)."""
    from pipeline.output.maintenance import compact

    settings = Settings().with_overrides(output_dir=output_dir, compact_target_bytes=target_size,
                                         vacuum_retention_hours=retention_hours)
    setup_logging(settings)
    report = compact(settings.output_dir, settings)
    for line in report.lines():
        print(line)
    return {"version": report.version_after, "files_before": report.files_before, "files_after": report.files_after,
            "rows": report.rows_after, "vacuumed": len(report.vacuumed)}
