"""Prefect orchestration: one subflow per micro-batch, one task per stage at batch granularity.

Prefect adds real latency per run (creating flow and task runs through its API: ~0.2-2 s per
subflow measured here), so it must never stall the model: several micro-batches are in flight at
once (`pipeline_depth`), and each subflow's bookkeeping overlaps the previous batch's model work.
Parameters stay tiny (a batch label); the data travels through a per-process registry so Prefect
never serializes audio. With `prefect_enabled=False` the same stages run without Prefect.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

# No phoning home from a data pipeline (and no network here to phone); users may override.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
if not os.environ.get("PREFECT_API_URL"):
    # Ephemeral API (SQLite, thrown away with the process): its task-run recorder upserts the same
    # rows the client is creating, SQLite answers SQLITE_BUSY_SNAPSHOT, the API a 503, and the
    # client backs off >= 2 s - per task. Measured: ~2.3 s -> ~0.4 s per subflow. A real Prefect
    # server (PREFECT_API_URL, PostgreSQL) keeps its recorder and is unaffected.
    os.environ.setdefault("PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_ENABLED", "false")
    # The ephemeral server starts in a subprocess; 20 s (Prefect's default) is too short on a busy
    # 2-core machine while Whisper loads beside it.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

from prefect import flow, task  # noqa: E402
from prefect.cache_policies import NO_CACHE

from .batch import (
    BatchOutcome,
    MicroBatch,
    StageTimer,
    assemble_stage,
    decode_stage,
    download_stage,
    tokenize_stage,
    transcribe_stage,
    whisper_inputs,
)
from .config import Settings
from .models import Models


class BatchContext:
    """Everything one batch needs that must not pass through Prefect's parameter serialization."""

    def __init__(self, batch: MicroBatch, s3: Any, models: Models, settings: Settings) -> None:
        self.batch, self.s3, self.models, self.settings = batch, s3, models, settings
        self.timer = StageTimer()


_REGISTRY: dict[str, BatchContext] = {}
_ids = itertools.count()


async def run_stages(ctx: BatchContext) -> BatchOutcome:
    """The stages in order, without orchestration."""
    m, st, timer = ctx.models, ctx.settings, ctx.timer
    with timer.measure("download"):
        downloaded = await download_stage(ctx.s3, ctx.batch.items, st)
    decoded = await m.on_cpu("decode", timer.timings, decode_stage, downloaded, st)
    clips = await m.on_cpu("decode", timer.timings, whisper_inputs, decoded)
    seq = ctx.batch.seq
    transcripts = await m.on_device("transcribe", timer.timings, transcribe_stage, m, decoded, clips, priority=seq)
    tokens = await m.on_device("tokenize", timer.timings, tokenize_stage, m, decoded, priority=seq)
    outcome = assemble_stage(m, downloaded, decoded, transcripts, tokens)
    outcome.timings = dict(timer.timings)
    return outcome


# --- the Prefect shape of the same stages -------------------------------------------------
_TASK = dict(cache_policy=NO_CACHE, persist_result=False, retries=0)


def _stage_run_name(stage: str):
    """Task runs named `download batch-3:p0@10-12`: the Prefect UI says which events a run held."""

    def name() -> str:
        from prefect.runtime import task_run

        ctx = _REGISTRY.get(task_run.parameters.get("ref", ""))
        return f"{stage} {ctx.batch.label}" if ctx else stage

    return name


@task(name="download", task_run_name=_stage_run_name("download"), **_TASK)
async def _download(ref: str):
    ctx = _REGISTRY[ref]
    with ctx.timer.measure("download"):
        return await download_stage(ctx.s3, ctx.batch.items, ctx.settings)


@task(name="decode", task_run_name=_stage_run_name("decode"), **_TASK)
async def _decode(ref: str, downloaded):
    ctx = _REGISTRY[ref]
    decoded = await ctx.models.on_cpu("decode", ctx.timer.timings, decode_stage, downloaded, ctx.settings)
    return decoded, await ctx.models.on_cpu("decode", ctx.timer.timings, whisper_inputs, decoded)


@task(name="transcribe", task_run_name=_stage_run_name("transcribe"), **_TASK)
async def _transcribe(ref: str, decoded, clips):
    ctx = _REGISTRY[ref]
    return await ctx.models.on_device(
        "transcribe", ctx.timer.timings, transcribe_stage, ctx.models, decoded, clips, priority=ctx.batch.seq
    )


@task(name="tokenize", task_run_name=_stage_run_name("tokenize"), **_TASK)
async def _tokenize(ref: str, decoded):
    ctx = _REGISTRY[ref]
    return await ctx.models.on_device(
        "tokenize", ctx.timer.timings, tokenize_stage, ctx.models, decoded, priority=ctx.batch.seq
    )


@flow(name="process-micro-batch", flow_run_name="{label}", validate_parameters=False, persist_result=False, log_prints=False)
async def process_micro_batch(ref: str, label: str) -> BatchOutcome:
    ctx = _REGISTRY[ref]
    downloaded = await _download(ref)
    decoded, clips = await _decode(ref, downloaded)
    transcripts = await _transcribe(ref, decoded, clips)
    tokens = await _tokenize(ref, decoded)
    outcome = assemble_stage(ctx.models, downloaded, decoded, transcripts, tokens)
    outcome.timings = dict(ctx.timer.timings)
    return outcome


@flow(name="metavoice-consumer", validate_parameters=False, persist_result=False)
async def consumer_flow(run, group: str, topic: str) -> Any:
    """Parent flow for a consumer's lifetime; `run` is the consumer's main coroutine function."""
    return await run()


async def process_batch(batch: MicroBatch, s3: Any, models: Models, settings: Settings) -> BatchOutcome:
    ctx = BatchContext(batch, s3, models, settings)
    if not settings.prefect_enabled:
        return await run_stages(ctx)
    ref = f"{next(_ids)}"
    _REGISTRY[ref] = ctx
    try:
        return await process_micro_batch(ref, batch.label)
    finally:
        del _REGISTRY[ref]
