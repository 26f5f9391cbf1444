"""What every stream mode shares: the production consumer (`consumer.app.StreamConsumer`) on the
embedded broker and S3, started, probed, and stopped once every event is accounted for.

The consumer is started first, with the model loaded, and has joined its group when the clock
starts, as a long-running consumer has (its start-up is reported, not timed: the embedded Tansu
broker holds a first JoinGroup for about half the session timeout). A run ends when the consumer
has accounted for every event published - as a row, a dead letter, a skip, a duplicate or a
superseded version - and is then stopped (drain, finalize, commit); it never ends on an idle
timeout, which raced a slow start. Every wait is bounded and names what it waited for. Prefect's
ephemeral API is started and warmed up here before anything is timed.

Used by stream.py (pipeline, pipeline-no-prefect), latency.py, ceiling.py and backlog.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from pipeline.config import Settings

from .measure import BenchWaitTimeout, bounded, wait_for

# Bounds of the waits (generous: they are there to fail with a message, never to pace a run).
ASSIGN_TIMEOUT_S = 180.0  # a consumer's group join (Tansu: ~half the session timeout)
PUBLISH_TIMEOUT_S = 300.0  # a backfill or a burst of events acknowledged by the broker
PREFECT_START_TIMEOUT_S = 240.0  # the ephemeral API's first start (migrations) on a busy machine
HANDLED_TIMEOUT_S = 1800.0  # every published event handled by the consumer
# The benchmark's consumers use a short session: the broker then holds a first JoinGroup ~3 s
# instead of ~15 s. Only the (untimed) join changes; heartbeats go every 2 s instead of 10 s.
BENCH_SESSION_TIMEOUT_MS = 6000


def unique(tag: str) -> str:
    return f"bench-{tag}-{uuid.uuid4().hex[:8]}"


# --- Prefect ------------------------------------------------------------------------------------
def prefect_env(work: Path) -> dict[str, Any]:
    """The run's own Prefect home and ephemeral API, unless PREFECT_API_URL names a server.

    Always its own home (not a PREFECT_HOME inherited from the environment, e.g. the test run's,
    whose ephemeral API of another process writes the same SQLite file): call before anything
    imports Prefect, which reads its settings once.
    """
    if os.environ.get("PREFECT_API_URL"):
        return {"api": os.environ["PREFECT_API_URL"]}
    os.environ["PREFECT_HOME"] = str(work / "prefect")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", str(int(PREFECT_START_TIMEOUT_S)))
    return {"home": os.environ["PREFECT_HOME"], "api": "ephemeral (in a subprocess)"}


def start_prefect_api() -> None:
    """Start the ephemeral API in the background now (while the corpus is made and models load)."""
    from pipeline.flows import ORCHESTRATION

    ORCHESTRATION.start_api_soon()


async def warm_up_prefect() -> float:
    """Wait for the Prefect API, then run a flow with a subflow and a task, before anything is timed."""
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE

    from pipeline.flows import ORCHESTRATION

    @task(cache_policy=NO_CACHE, persist_result=False)
    async def noop(x: int) -> int:
        return x

    @flow(persist_result=False)
    async def child(x: int) -> int:
        return await noop(x)

    @flow(persist_result=False)
    async def parent() -> int:
        return await child(1)

    where = os.environ.get("PREFECT_API_URL") or f"ephemeral, PREFECT_HOME={os.environ.get('PREFECT_HOME')}"
    t = time.perf_counter()
    await bounded(f"the Prefect API to start ({where})", ORCHESTRATION.ensure_api(), PREFECT_START_TIMEOUT_S)
    try:
        await bounded(f"a warm-up flow run on the Prefect API ({where})", parent(), PREFECT_START_TIMEOUT_S)
    except BenchWaitTimeout:
        raise
    except Exception as exc:
        raise RuntimeError(f"the Prefect API ({where}) failed a warm-up flow run: {type(exc).__name__}: {exc}") from exc
    return time.perf_counter() - t


def prefect_counts() -> dict[str, float]:
    """The process's Prefect counters (pipeline/flows.py), to take differences around a run."""
    from pipeline.flows import ORCHESTRATION as o

    return {"flow_runs": o.flow_runs, "task_runs": o.task_runs, "bare_batches": o.bare_batches,
            "failures": o.failures, "bookkeeping_seconds": o.bookkeeping_seconds}


def prefect_delta(before: dict[str, float]) -> dict[str, float]:
    now = prefect_counts()
    return {k: now[k] - before[k] for k in now}


# --- the consumer, and how a run ends -------------------------------------------------------------
def bench_consumer(settings: Settings, models: Any, expected: int):
    """The production consumer, plus the moments the benchmark needs (assignment, last batch), that
    stops itself once `expected` events are accounted for."""
    from consumer.app import StreamConsumer

    class BenchConsumer(StreamConsumer):
        def __init__(self) -> None:
            super().__init__(settings, models)
            self.expected = expected
            self.assigned = asyncio.Event()
            self.assigned_at: float | None = None
            self.last_batch_at: float | None = None
            self.on_batch_done.append(self._batch_done)

        async def on_assigned(self, assigned) -> None:  # type: ignore[no-untyped-def]
            await super().on_assigned(assigned)
            if assigned and self.assigned_at is None:
                self.assigned_at = time.perf_counter()
                self.assigned.set()

        def handled(self) -> int:
            """Events accounted for: rows, dead letters, skips, duplicates, superseded versions."""
            c = self.committer.stats if self.committer is not None else None
            return 0 if c is None else c.rows + c.dead_letters + c.skipped + c.duplicates + c.superseded

        def _batch_done(self, batch, outcome, stats) -> None:  # type: ignore[no-untyped-def]
            self.last_batch_at = time.perf_counter()
            if self.handled() >= self.expected:
                self.request_stop(f"all {self.expected} events handled")

    return BenchConsumer()


@contextlib.asynccontextmanager
async def running(app: Any, what: str):
    """The consumer's task, assigned its partitions; cancelled if the caller fails."""
    task = asyncio.create_task(app.run(), name=f"bench consumer {what}")
    try:
        await wait_for(f"the {what} consumer's partitions to be assigned (group {app.settings.group})",
                       app.assigned, ASSIGN_TIMEOUT_S, worker=task)
        yield task
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


async def until_handled(app: Any, task: asyncio.Task, timeout: float = HANDLED_TIMEOUT_S):
    """The consumer's stats once it has handled every expected event, finalized and committed."""
    try:
        await wait_for(f"all {app.expected} events to be handled", lambda: app.handled() >= app.expected,
                       timeout, worker=task, poll=0.02)
    except BenchWaitTimeout as exc:
        raise BenchWaitTimeout(f"{exc} ({app.handled()} handled)") from None
    return await bounded("the consumer to drain, finalize and commit after its last event", task, 300)


@contextlib.contextmanager
def batch_probe() -> Iterator[list[dict[str, float]]]:
    """Per micro-batch: when `process_batch` was called and returned, and its stages' own run time
    (download, decode, transcribe, tokenize) - with and without Prefect alike. Wraps the function in
    the consumer's module namespace for one run and restores it after."""
    import consumer.app as app_mod

    records: list[dict[str, float]] = []
    orig = app_mod.process_batch

    async def process_batch(batch, s3, models, settings):  # type: ignore[no-untyped-def]
        mark = {"files": float(len(batch.items)), "called": time.perf_counter()}
        outcome = await orig(batch, s3, models, settings)
        mark["returned"] = time.perf_counter()
        mark["stages"] = sum(v for k, v in outcome.timings.items() if k in ("download", "decode", "transcribe", "tokenize"))
        records.append(mark)
        return outcome

    app_mod.process_batch = process_batch
    try:
        yield records
    finally:
        app_mod.process_batch = orig


def summarize_batches(records: list[dict[str, float]], prefect: dict[str, float]) -> dict[str, Any]:
    out: dict[str, Any] = {"batches": len(records)}
    if records:
        out["files_per_batch"] = sum(r["files"] for r in records) / len(records)
        out["call_seconds"] = sum(r["returned"] - r["called"] for r in records) / len(records)
        out["stage_run_seconds"] = sum(r["stages"] for r in records) / len(records)
    recorded = prefect["flow_runs"] - prefect["bare_batches"]
    out.update({
        "flow_runs": prefect["flow_runs"], "task_runs": prefect["task_runs"],
        "bare_batches": prefect["bare_batches"], "prefect_failures": prefect["failures"],
        # wall time of each recorded flow run outside our stages: API round trips and Prefect's engine,
        # partly overlapped with the batch's own download and decode and with other batches
        "prefect_bookkeeping_per_flow_run_s": prefect["bookkeeping_seconds"] / recorded if recorded > 0 else None,
    })
    return out
