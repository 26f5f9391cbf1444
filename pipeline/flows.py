"""Prefect orchestration: one subflow per micro-batch, a task run per model stage.

A subflow costs eight API round trips (its parent task run, a lookup, the flow, the flow run, its
name, two state changes and a read): ~0.1 s and ~0.11 CPU-s of client and ephemeral server per
batch on 2 quiet cores, twice that on busy ones. A task run costs no round trip (Prefect 3 reports
task runs as events) but ~10 ms of client CPU. So a micro-batch records what adds information: its
flow run, named after the events it holds, and a task run per model stage (`STAGES`: `segment`,
`transcribe`, `tokenize`, `score`; `transcribe` is left out when transcription is off, `segment` and
`score` when the analysis models are; the bare path runs the same list). Download
and decode (`prepare`) start when the batch is dispatched, before its flow run exists: the round
trips overlap I/O instead of preceding it, and a batch that Prefect fails runs bare on the same
prepared work. Several micro-batches are in flight at once (`pipeline_depth`), so bookkeeping also
overlaps other batches' model work; on the ephemeral API (SQLite) they take turns to create and
end their runs (`Orchestration.api_gate`).
Parameters stay tiny (a batch label); the data travels through a per-process registry so Prefect
never serializes audio. With `prefect_enabled=False` the same stages run without Prefect.

Prefect is bookkeeping, never a dependency of the data path. A run record is given up - the
stages run bare (`run_stages`), exactly as with `prefect_enabled=False` - when Prefect fails the
run itself, as opposed to our stage code failing inside it:

    orchestration failure                         what happens
    API unreachable, 5xx, a broken response       the batch runs bare; warning; counted
    more than `prefect_timeout_s` spent waiting   the run is abandoned (it may still report
      on Prefect (creating, starting, finishing     itself Crashed later), the batch runs bare
      a flow run; stage time does not count)
    the parent `metavoice-consumer` run cannot    the consumer runs bare (batches are then
      start                                         top-level runs once the API answers)
    an exception raised by a stage                NOT an outage: it propagates as before

After a failure, batches skip Prefect (no stall per batch) while a background health probe backs
off from 1 s to 60 s; when it answers, the next batch tries a flow run again and, once one goes
through, batches are orchestrated again. `ORCHESTRATION` holds the process-wide state that
consumer/metrics.py exports (`metavoice_prefect_*`). A batch whose stages finished inside Prefect
keeps its outcome even when Prefect then fails to record the end: nothing is computed twice
after the fact, and nothing here ever dead-letters or commits anything - the committer does,
from the outcome alone.

SIGTERM: Prefect's flow engine replaces the process's SIGTERM handler with one that raises
`TerminationSignal` wherever the main thread happens to be - which aborts the consumer mid-stream
instead of letting it drain, finalize and commit. Flow runs started inside `consumer_flow` leave
a SIGTERM handler that the application installed (`StreamConsumer.install_signal_handlers`) in
place (see `_capture_sigterm`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import itertools
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterator

# No phoning home from a data pipeline (and no network here to phone); users may override.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
if not os.environ.get("PREFECT_API_URL"):
    # Ephemeral API (SQLite, thrown away with the process): its task-run recorder upserts the same
    # rows the client is creating, SQLite answers SQLITE_BUSY_SNAPSHOT, the API a 503, and the
    # client backs off >= 2 s - per task. Measured: ~2.3 s -> ~0.4 s per subflow. A real Prefect
    # server (PREFECT_API_URL, PostgreSQL) keeps its recorder and is unaffected.
    os.environ.setdefault("PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_ENABLED", "false")
    # Its event persister flushes every 20 events; a flush that overlaps a subflow's task-run insert
    # is SQLITE_BUSY_SNAPSHOT too: a 503 and a >= 2 s back-off for every ~5th micro-batch (measured:
    # 381 -> 109 ms per subflow on average). Events of an ephemeral API have no reader (no UI).
    os.environ.setdefault("PREFECT_SERVER_SERVICES_EVENT_PERSISTER_ENABLED", "false")
    # The ephemeral server starts in a subprocess; 20 s (Prefect's default) is too short on a busy
    # 2-core machine while Whisper loads beside it.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

import numpy as np  # noqa: E402
import prefect.flow_engine as _flow_engine  # noqa: E402
from prefect import flow, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from .batch import (  # noqa: E402
    BatchOutcome,
    Downloaded,
    MicroBatch,
    Slot,
    StageTimer,
    assemble_stage,
    Segmented,
    decode_stage,
    download_and_decode_stage,
    score_stage,
    segment_stage,
    tokenize_stage,
    transcribe_stage,
)
from .audio import DecodedAudio  # noqa: E402
from .config import Settings  # noqa: E402
from .models import Models  # noqa: E402
from .records import Transcript  # noqa: E402

log = logging.getLogger(__name__)

# After an orchestration failure the API is probed in the background, first after this long,
# then twice as long after each failed probe (or failed retry), up to PROBE_MAX_S: a dead API
# costs one request per minute at most, and a recovered one is noticed within a minute.
PROBE_FIRST_S = 1.0
PROBE_MAX_S = 60.0
PROBE_TIMEOUT_S = 5.0  # one health request (at most prefect_timeout_s)
# While our own code runs inside a flow run, the watchdog only looks again this often.
WATCH_POLL_S = 0.5


class PrefectUnavailable(Exception):
    """Prefect failed a run (unreachable, an error answer, over the time budget) - not our code."""


# --- the process-wide orchestration state ------------------------------------------------------
class Orchestration:
    """Whether flow runs are being recorded, for the whole process (several consumers share it).

        healthy --a run fails--> degraded --the probe answers--> retrying --a run goes through--> healthy
                                    ^                                |
                                    +------------ a run fails -------+

    While degraded, micro-batches skip Prefect and a background probe asks the API's health,
    first after PROBE_FIRST_S, then twice as long after each failure, up to PROBE_MAX_S.
    `failures`: flow runs Prefect failed (metavoice_prefect_unavailable_total); `bare_batches`:
    micro-batches whose stages ran without a run record because of that
    (metavoice_prefect_bare_batches_total); `degraded` (metavoice_prefect_degraded).
    `flow_runs` / `task_runs`: micro-batch flow runs and task runs this process started;
    `bookkeeping_seconds`: the wall time of the recorded ones spent outside our stages (Prefect's).
    """

    def __init__(self) -> None:
        self.degraded = False
        self.failures = 0
        self.bare_batches = 0
        self.flow_runs = 0
        self.task_runs = 0
        self.bookkeeping_seconds = 0.0
        self.last_error = ""
        self._retry = False  # the probe answered: the next micro-batch tries a flow run
        self._backoff = PROBE_FIRST_S
        self._next_probe = 0.0
        self._probe_timeout = PROBE_TIMEOUT_S
        self._probe: asyncio.Task | None = None
        self._api_started = False
        self._api_start: concurrent.futures.Future | None = None
        self.one_run_at_a_time = False  # the ephemeral API (SQLite): see `api_gate`
        self._gate: tuple[asyncio.AbstractEventLoop, asyncio.Lock] | None = None

    def use_prefect(self, timeout_s: float) -> bool:
        """Whether the next micro-batch should try a flow run (else it runs bare)."""
        self._probe_timeout = min(PROBE_TIMEOUT_S, timeout_s)
        if not self.degraded or self._retry:
            return True
        self._keep_probing()  # e.g. a consumer of an earlier event loop left the state degraded
        return False

    def failed(self, what: str, exc: BaseException, consequence: str = "") -> None:
        """Prefect failed `what`; one warning per outage (the metrics count every failure)."""
        self.failures += 1
        self.last_error = str(exc)[:500] if isinstance(exc, PrefectUnavailable) else f"{type(exc).__name__}: {exc}"[:500]
        new_outage = not self.degraded or self._retry
        if self._retry:  # the probe answered, yet a run failed: wait longer before the next try
            self._backoff = min(self._backoff * 2, PROBE_MAX_S)
        if new_outage:
            self._next_probe = time.monotonic() + self._backoff
        self.degraded, self._retry = True, False
        log.log(logging.WARNING if new_outage or consequence else logging.DEBUG,
                "Prefect unavailable (%s: %s); %s", what, self.last_error,
                consequence or f"micro-batches run without Prefect run records until its API answers again "
                               f"(next probe in {self._backoff:.0f}s); no data is affected")
        self._keep_probing()

    def succeeded(self) -> None:
        if self.degraded:
            log.info("Prefect records runs again (%d micro-batches ran without)", self.bare_batches)
        self.degraded = self._retry = False
        self._backoff = PROBE_FIRST_S

    def _keep_probing(self) -> None:
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._probe_until_answered(), name="prefect-probe")

    async def _probe_until_answered(self) -> None:
        while self.degraded and not self._retry:
            wait = self._next_probe - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
                continue  # a failure meanwhile may have moved the next probe
            error = await self._health()
            if error is None:
                log.info("Prefect API answers its health check again; the next micro-batch tries a flow run")
                self._retry = True
                return
            self._backoff = min(self._backoff * 2, PROBE_MAX_S)
            self._next_probe = time.monotonic() + self._backoff
            log.debug("Prefect API still unavailable (%s); next probe in %.0fs", error, self._backoff)

    async def _health(self) -> BaseException | None:
        from prefect.client.orchestration import get_client

        try:
            async with asyncio.timeout(self._probe_timeout):
                async with get_client() as client:  # a fresh client: no retries of a refused connection
                    return await client.api_healthcheck()
        except TimeoutError:
            return TimeoutError(f"no answer within {self._probe_timeout:g}s")
        except Exception as exc:
            return exc

    def start_api_soon(self) -> None:
        """Start the ephemeral API (no PREFECT_API_URL) in a background thread now, once per process,
        e.g. while models load: its first start (migrations) takes 10-30 s. `ensure_api` waits for it."""
        if self._api_start is not None:
            return
        self._api_start = done = concurrent.futures.Future()

        def start() -> None:
            try:
                from prefect.settings import PREFECT_API_URL

                if not PREFECT_API_URL.value():  # as prefect.get_client() decides
                    from prefect.server.api.server import SubprocessASGIServer

                    SubprocessASGIServer().start()
            except Exception as exc:  # left to the first API call (an orchestration failure)
                log.debug("the ephemeral Prefect API did not start: %s: %s", type(exc).__name__, exc)
            finally:
                done.set_result(None)

        threading.Thread(target=start, name="prefect-api-start", daemon=True).start()

    async def ensure_api(self) -> None:
        """Wait until the ephemeral API (no PREFECT_API_URL) has started (`start_api_soon`).

        Prefect would start it inside its first API call, synchronously, blocking the event loop for
        up to PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS - time the watchdog would charge to
        that flow run. A failure to start is left to that first call (an orchestration failure).
        """
        if self._api_started:
            return
        self.start_api_soon()
        await asyncio.wrap_future(self._api_start)  # type: ignore[arg-type]
        from prefect.settings import PREFECT_API_URL

        self.one_run_at_a_time = not PREFECT_API_URL.value()
        self._api_started = True

    def api_gate(self) -> asyncio.Lock | None:
        """Held by one micro-batch flow run at a time while Prefect creates it and while it records its
        end - on the ephemeral API only (None for a Prefect server).

        The ephemeral API writes SQLite in DEFERRED transactions: a flow run created while another
        one's state is being written fails with SQLITE_BUSY_SNAPSHOT, the API answers 503 and the
        client backs off 2 s. With `pipeline_depth` batches starting together that was every other
        batch (measured: 1.2 s of bookkeeping per flow run instead of ~0.1 s). A turn at the gate
        takes ~0.1 s, so it caps the ephemeral API at ~10 flow runs per second.
        """
        if not self.one_run_at_a_time:
            return None
        loop = asyncio.get_running_loop()
        if self._gate is None or self._gate[0] is not loop:  # an asyncio.Lock belongs to one event loop
            self._gate = (loop, asyncio.Lock())
        return self._gate[1]


ORCHESTRATION = Orchestration()


# --- our time vs Prefect's time inside one flow run ---------------------------------------------
class _Watch:
    """Splits the life of one flow run into our code (stages, the consumer) and Prefect's (the rest).

    Prefect's share is bounded by `budget` seconds in total; our code is never timed and never
    interrupted. It also records what our code raised (not an outage) and what it returned (kept
    when Prefect fails afterwards).
    """

    def __init__(self, budget: float) -> None:
        self.budget = budget
        self.spent = 0.0
        self.since: float | None = time.monotonic()  # None while our code runs
        self.depth = 0
        self.started = False  # our code was entered at least once
        self.abandoned = False  # the run was given up: our code must not start in it any more
        self.error: Exception | None = None  # raised by our code
        self.finished = False  # our code returned `result`
        self.result: Any = None

    @contextlib.contextmanager
    def ours(self) -> Iterator[None]:
        if self.abandoned:
            raise PrefectUnavailable("this flow run was given up; its work runs without Prefect")
        if self.depth == 0 and self.since is not None:
            self.spent += time.monotonic() - self.since
            self.since = None
        self.depth += 1
        self.started = True
        try:
            yield
        except Exception as exc:
            # Only Exception: a CancelledError or TerminationSignal delivered to our code comes
            # from outside it (Prefect, shutdown) and is judged by `_guarded`.
            if self.error is None:
                self.error = exc
            raise
        finally:
            self.depth -= 1
            if self.depth == 0:
                self.since = time.monotonic()

    def finish(self, result: Any) -> Any:
        self.finished, self.result = True, result
        return result

    def left(self) -> float | None:
        """Seconds of Prefect's budget left; None while our code runs."""
        if self.since is None:
            return None
        return self.budget - self.spent - (time.monotonic() - self.since)

    def prefect_seconds(self) -> float:
        """Wall time of the run spent outside our code so far (Prefect's bookkeeping)."""
        return self.spent + (time.monotonic() - self.since if self.since is not None else 0.0)


_ABANDONED: set[asyncio.Task] = set()  # strong references: asyncio keeps only weak ones


def _retrieve(task: asyncio.Task) -> None:
    _ABANDONED.discard(task)
    if not task.cancelled():
        task.exception()  # read it: an abandoned run's end is not worth a "never retrieved" warning


async def _guarded(watch: _Watch, start: Callable[[], Awaitable[Any]], done: Callable[[], None]) -> Any:
    """Run a flow (`start()`) in a task of its own, with `watch` bounding Prefect's share of it.

    Returns the flow's result, raises what our code raised, and raises `PrefectUnavailable` for
    everything else the run ended with (or when Prefect's budget ran out - then the run is left
    to end by itself, cancelled, without waiting for it). `done()` runs when the run has ended.
    """
    run = asyncio.ensure_future(start())  # copies the context: a subflow finds its parent run
    run.add_done_callback(lambda _: done())
    try:
        while not run.done():
            left = watch.left()
            if left is not None and left <= 0:
                watch.abandoned = True
                run.cancel()
                _ABANDONED.add(run)
                run.add_done_callback(_retrieve)
                raise PrefectUnavailable(f"no answer within prefect_timeout_s={watch.budget:g}s")
            await asyncio.wait({run}, timeout=WATCH_POLL_S if left is None else min(left, WATCH_POLL_S * 4))
    except asyncio.CancelledError:
        # We are being cancelled (the consumer stops): so is the run; let our code inside it unwind.
        if not run.done():
            run.cancel()
            if watch.depth:
                await asyncio.wait({run}, timeout=watch.budget)
            if not run.done():
                _ABANDONED.add(run)
                run.add_done_callback(_retrieve)
        raise
    exc = None if run.cancelled() else run.exception()
    if watch.error is not None:
        raise watch.error  # ours, even when Prefect then failed to record it
    if run.cancelled():
        raise PrefectUnavailable("the flow run was cancelled by Prefect")
    if exc is None:
        return run.result()
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
        raise exc
    raise PrefectUnavailable(f"{type(exc).__name__}: {exc}") from exc


# --- SIGTERM belongs to the application ---------------------------------------------------------
_APP_OWNS_SIGTERM = contextvars.ContextVar("metavoice_app_owns_sigterm", default=False)
# Prefect 3.x internals (prefect/utilities/engine); tests/test_prefect_outage.py fails without this.
_prefect_capture_sigterm = getattr(_flow_engine, "capture_sigterm", None)


@contextlib.contextmanager
def _capture_sigterm() -> Iterator[None]:
    """Prefect's `capture_sigterm`, except inside a consumer that handles SIGTERM itself.

    Prefect installs, for every flow run, a handler raising `TerminationSignal` in whatever the main
    thread runs at that moment (often the event loop itself): the consumer would die mid-batch
    instead of draining, finalizing and committing. Its graceful stop is the better answer to a
    SIGTERM, for the CLI as for a deployment's flow run (a worker's cancellation is a SIGTERM too).
    """
    if _APP_OWNS_SIGTERM.get():
        yield
        return
    with _prefect_capture_sigterm():
        yield


if _prefect_capture_sigterm is not None:
    _flow_engine.capture_sigterm = _capture_sigterm


def _app_handles_sigterm() -> bool:
    """Whether the application installed a SIGTERM handler of its own (asyncio's included)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    import prefect.utilities.engine

    handler = signal.getsignal(signal.SIGTERM)
    prefects = getattr(prefect.utilities.engine, "_prefect_sigterm_handler", None)
    return handler not in (signal.SIG_DFL, signal.SIG_IGN, None, prefects)


# --- the stages ------------------------------------------------------------------------------------
@dataclass
class Prepared:
    """A batch downloaded and decoded: the I/O and CPU half of its work, no model involved."""

    downloaded: list[Slot[Downloaded]]
    decoded: list[Slot[DecodedAudio]]
    timings: dict[str, float] = field(default_factory=dict)


async def prepare(batch: MicroBatch, s3: Any, models: Models, settings: Settings) -> Prepared:
    """Download and decode a batch; started when the batch is dispatched (see `process_batch`)."""
    timer = StageTimer()

    async def decode(slots: list[Slot[Downloaded]]) -> list[Slot[DecodedAudio]]:
        # the views the loaded models read: the tokenizer's, and Whisper's unless transcription is off
        return await models.on_cpu("decode", timer.timings, decode_stage, slots, settings, models.layouts)

    # each object decoded as it arrives and its bytes dropped: the byte budget counts bytes read
    with timer.measure("download"):
        downloaded, decoded = await download_and_decode_stage(s3, batch.items, settings, decode)
    timer.timings["download"] = max(0.0, timer.timings["download"] - timer.timings.get("decode", 0.0))
    return Prepared(downloaded, decoded, timer.timings)


class _ApiTurn:
    """One flow run's turn at `Orchestration.api_gate` (no gate: a no-op)."""

    def __init__(self, gate: asyncio.Lock | None) -> None:
        self.gate, self.held = gate, False

    async def take(self) -> None:
        if self.gate is not None and not self.held:
            await self.gate.acquire()
            self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.gate.release()  # type: ignore[union-attr]


class BatchContext:
    """Everything one batch needs that must not pass through Prefect's parameter serialization."""

    def __init__(self, batch: MicroBatch, s3: Any, models: Models, settings: Settings,
                 prepared: "asyncio.Future[Prepared]", turn: _ApiTurn | None = None) -> None:
        self.batch, self.s3, self.models, self.settings = batch, s3, models, settings
        self.prepared = prepared  # download + decode, already under way
        self.turn = turn or _ApiTurn(None)
        self.timer = StageTimer()
        self.watch = _Watch(settings.prefect_timeout_s)
        self.segmented: list[Slot[Segmented]] = []  # the segment stage's result, read by the stages after it

    async def segment(self, p: Prepared) -> list[Slot[Segmented]]:
        """VAD (and, for utterances, speaker changes) on the device thread; the spans every later stage reads."""
        m = self.models
        if m.analysis is None:  # no model: each file is one span, no device hop
            with self.timer.measure("segment"):
                self.segmented = segment_stage(m, p.decoded)
        else:
            self.segmented = await m.on_device("segment", self.timer.timings, segment_stage, m, p.decoded,
                                               priority=self.batch.seq)
        return self.segmented

    async def transcribe(self, p: Prepared) -> list[Slot[list[Transcript]]]:
        m = self.models
        if not m.transcribes:  # no model call, no device hop: every slot goes on without a transcript
            with self.timer.measure("transcribe"):
                return transcribe_stage(m, self.segmented)
        return await m.on_device("transcribe", self.timer.timings, transcribe_stage, m, self.segmented,
                                 priority=self.batch.seq)

    async def tokenize(self, p: Prepared) -> list[Slot[list[np.ndarray]]]:
        return await self.models.on_device("tokenize", self.timer.timings, tokenize_stage, self.models,
                                           self.segmented, priority=self.batch.seq)

    async def score(self, p: Prepared) -> list[Slot[Any]]:
        m = self.models
        if m.analysis is None:
            return score_stage(m, self.segmented)
        return await m.on_device("score", self.timer.timings, score_stage, m, self.segmented, priority=self.batch.seq)

    async def watched(self, stage: "Stage") -> list[Slot[Any]]:
        """`stage` inside a flow run: our time, not Prefect's (`_Watch`), on the prepared work
        (shielded: if Prefect abandons the run, the batch runs bare on the same prepared work)."""
        with self.watch.ours():
            return await stage.run(self, await asyncio.shield(self.prepared))

    def assemble(self, p: Prepared, results: dict[str, list[Slot[Any]]]) -> BatchOutcome:
        outcome = assemble_stage(self.models, p.downloaded, results["segment"], results["transcribe"],
                                 results["tokenize"], results["score"])
        outcome.timings = {**p.timings, **self.timer.timings}
        return outcome


@dataclass(frozen=True)
class Stage:
    """A model stage of a micro-batch: its name (the task run's, the timing's) and what it runs."""

    name: str
    run: Callable[[BatchContext, Prepared], Awaitable[list[Slot[Any]]]]
    recorded: Callable[[Models], bool] = lambda models: True  # whether a task run records it


#: The model stages of a micro-batch, in order: the one declaration both paths iterate - bare
#: (`run_stages`) and under Prefect (`process_micro_batch`: a task run each, where it is recorded).
#: Download and decode (`prepare`) run ahead of both, from dispatch.
STAGES: tuple[Stage, ...] = (
    # VAD and speaker changes: the spans (whole file, or utterances) the later stages crop and read
    Stage("segment", BatchContext.segment, recorded=lambda models: models.analysis is not None),
    Stage("transcribe", BatchContext.transcribe, recorded=lambda models: models.transcribes),  # off: nothing to record
    Stage("tokenize", BatchContext.tokenize),
    # DNSMOS, speaker embeddings and labels, signal measures of every span
    Stage("score", BatchContext.score, recorded=lambda models: models.analysis is not None),
)

_REGISTRY: dict[str, BatchContext] = {}
_LIFETIMES: dict[str, tuple[_Watch, Callable[[], Awaitable[Any]]]] = {}
_ids = itertools.count()


async def run_stages(ctx: BatchContext) -> BatchOutcome:
    """The stages in order, without orchestration."""
    p = await ctx.prepared
    return ctx.assemble(p, {stage.name: await stage.run(ctx, p) for stage in STAGES})


# --- the Prefect shape of the same stages -------------------------------------------------
_TASK = dict(cache_policy=NO_CACHE, persist_result=False, retries=0)


def _stage_run_name(stage: str):
    """Task runs named `tokenize batch-3:p0@10-12`: the Prefect UI says which events a run held."""

    def name() -> str:
        from prefect.runtime import task_run

        ctx = _REGISTRY.get(task_run.parameters.get("ref", ""))
        return f"{stage} {ctx.batch.label}" if ctx else stage

    return name


def _as_task(stage: Stage):
    """`stage` as a Prefect task of its own name, run on the batch `ref` names."""

    async def run(ref: str):
        ctx = _REGISTRY[ref]
        ORCHESTRATION.task_runs += 1
        return await ctx.watched(stage)

    run.__name__ = run.__qualname__ = f"_{stage.name}"  # Prefect's task key
    return task(name=stage.name, task_run_name=_stage_run_name(stage.name), **_TASK)(run)


_TASKS = {stage.name: _as_task(stage) for stage in STAGES}


@flow(name="process-micro-batch", flow_run_name="{label}", validate_parameters=False, persist_result=False, log_prints=False)
async def process_micro_batch(ref: str, label: str) -> BatchOutcome:
    ctx = _REGISTRY[ref]
    ctx.turn.release()  # the run exists and runs: the next batch's run may be created
    results = {}
    for stage in STAGES:
        results[stage.name] = await (_TASKS[stage.name](ref) if stage.recorded(ctx.models) else ctx.watched(stage))
    with ctx.watch.ours():
        # shielded: if Prefect abandons this run, the batch runs bare on the same prepared work
        ctx.watch.finish(ctx.assemble(await asyncio.shield(ctx.prepared), results))
    await ctx.turn.take()  # Prefect records the end next (Prefect's time, within its budget)
    return ctx.watch.result


async def _gated_run(ctx: BatchContext, ref: str, label: str) -> BatchOutcome:
    """The flow run, created in its turn at the API (Prefect's time, within its budget)."""
    await ctx.turn.take()
    return await process_micro_batch(ref, label)


@flow(name="metavoice-consumer", validate_parameters=False, persist_result=False)
async def consumer_lifetime(ref: str, group: str, topic: str) -> Any:
    """Parent flow run for a consumer's lifetime; `group` and `topic` say which in the UI."""
    watch, run = _LIFETIMES[ref]
    with watch.ours():
        return watch.finish(await run())


async def consumer_flow(run: Callable[[], Awaitable[Any]], group: str, topic: str, timeout_s: float | None = None) -> Any:
    """`run()` (the consumer's main coroutine) inside a `metavoice-consumer` flow run if Prefect
    lets it start, else bare; the consumer's own exceptions propagate either way.

    `timeout_s` bounds the time spent on Prefect before `run()` starts and after it returned
    (default: `prefect_timeout_s` from the environment).
    """
    budget = timeout_s if timeout_s is not None else Settings().prefect_timeout_s
    token = _APP_OWNS_SIGTERM.set(_app_handles_sigterm())
    try:
        await ORCHESTRATION.ensure_api()
        watch = _Watch(budget)
        ref = f"lifetime-{next(_ids)}"
        _LIFETIMES[ref] = (watch, run)
        try:
            return await _guarded(watch, lambda: consumer_lifetime(ref, group, topic), done=lambda: _LIFETIMES.pop(ref, None))
        except PrefectUnavailable as exc:
            if watch.finished:  # the consumer ran to its end; only the run's end is not recorded
                ORCHESTRATION.failed("the end of the consumer's flow run", exc, "the consumer's work is done and committed")
                return watch.result
            ORCHESTRATION.failed("the consumer's flow run", exc)
            if watch.started:
                raise  # Prefect interrupted the consumer itself (not a stop it asked for): nothing more is committed
            watch.abandoned = True
            return await run()
    finally:
        _APP_OWNS_SIGTERM.reset(token)


async def process_batch(batch: MicroBatch, s3: Any, models: Models, settings: Settings) -> BatchOutcome:
    # Download and decode start now, whatever Prefect does: its API round trips overlap them.
    prepared = asyncio.ensure_future(prepare(batch, s3, models, settings))
    ctx = BatchContext(batch, s3, models, settings, prepared)
    try:
        if not settings.prefect_enabled:
            return await run_stages(ctx)
        await ORCHESTRATION.ensure_api()
        if ORCHESTRATION.use_prefect(settings.prefect_timeout_s):
            ref = f"{next(_ids)}"
            ctx.turn = _ApiTurn(ORCHESTRATION.api_gate())
            _REGISTRY[ref] = ctx
            ORCHESTRATION.flow_runs += 1
            try:
                outcome = await _guarded(ctx.watch, lambda: _gated_run(ctx, ref, batch.label),
                                         done=lambda: _REGISTRY.pop(ref, None))
            except PrefectUnavailable as exc:
                ctx.turn.release()  # an abandoned run never holds up the others' runs
                ORCHESTRATION.failed(f"micro-batch {batch.label}", exc)
                if ctx.watch.finished:
                    return ctx.watch.result  # the stages ran; only the end of the run is not recorded
            else:
                ORCHESTRATION.succeeded()
                ORCHESTRATION.bookkeeping_seconds += ctx.watch.prefect_seconds()
                return outcome
        ORCHESTRATION.bare_batches += 1
        # a fresh context (the abandoned run may still unwind in the old one), the same prepared work
        return await run_stages(BatchContext(batch, s3, models, settings, prepared))
    finally:
        ctx.turn.release()  # whatever became of the run (ended, cancelled)
        if not prepared.done():  # we are being cancelled, or the stages never needed it
            prepared.cancel()
        elif not prepared.cancelled():
            prepared.exception()  # retrieved: raised to whoever awaited it, or nobody needed it
