"""Prefect deployment entrypoint: one streaming consumer process as one long-running flow run.

`deploy/prefect.yaml` points at `stream_consumer`. Every flow run joins the same Kafka consumer
group, so starting N runs of the deployment (on N GPUs) spreads the topic's partitions over N
consumers; Kafka's group protocol does the balancing, Prefect only places and watches the
processes. Keep N <= the topic's partition count: extra members get no partitions and idle.

Each run reads its settings from METAVOICE_* (set as job variables on the work pool); the
parameters below override the few that differ between runs.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from consumer.app import run_consumer
from pipeline.config import Settings


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
    stats = await run_consumer(settings, handle_signals=False)
    return {
        "records": stats.records,
        "batches": stats.batches,
        "wall_seconds": stats.wall_seconds,
        "stop_reason": stats.stop_reason,
    }
