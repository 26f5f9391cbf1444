"""Operating the consumer: Prometheus metrics, health endpoints, the lag sampler, the status line.

One `Operations` per consumer, with its own `CollectorRegistry` (several consumers may share a
process: the tests run several). It reads the consumer through `ConsumerView` (what `StreamConsumer`
shows of itself) and changes nothing in it. Numbers get in three ways:

    per batch   `observe_batch`, an `on_batch_done` observer: records, stage timings, real-time factor
    totals      `sync` turns the committer's running totals (`CommitStats`) into counter increments -
                rows, dead letters, skips, duplicates, files, latencies - so the counters agree with
                what was written by construction; it runs after each batch, on each scrape, every
                sample and once at exit (a file finalized by the roll timer or at shutdown counts too)
    sampled     every `SAMPLE_EVERY_S`: consumer lag per partition, then the TTY status line

One aiohttp server on `--metrics-port` (0: any free port) answers, all on the event loop:

    /metrics    Prometheus text format, names prefixed `metavoice_`
    /healthz    200 while the process serves requests (a blocked event loop times out: restart it)
    /readyz     200 when the broker answers, S3 answers and the models are loaded, else 503;
                a JSON body says which check failed. Probes are cached for `READY_CACHE_S`.

Nothing here may stop the stream: a failing sample is logged and the next one tries again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import sys
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterator, Protocol

import orjson
from aiohttp import web
from aiokafka.errors import IllegalStateError
from aiokafka.structs import TopicPartition
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    GC_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily

from pipeline.batch import BatchOutcome
from pipeline.errors import FatalError

from .status import StatusLine, StatusSnapshot

if TYPE_CHECKING:
    from pipeline.config import Settings
    from pipeline.models import Models

    from .batcher import PendingBatch
    from .committer import CommitStats
    from .environment import FaultWatch

log = logging.getLogger(__name__)

NAMESPACE = "metavoice"
SAMPLE_EVERY_S = 1.0  # lag sampling and counter sync; cheap (no broker round trip)
# /readyz probes talk to the broker and S3: cache answers so a kubelet probing every few seconds
# (or several) costs at most one metadata request and one S3 request per period.
READY_CACHE_S = 5.0
# Each probe answers within this; a kubelet's probe timeoutSeconds must be above it (see
# docs/operations.md: the default of 1 s is too short for a slow S3 round trip).
PROBE_TIMEOUT_S = 2.0
POSITION_TIMEOUT_S = 0.5  # a partition mid-reset has no position yet: skip it this round

STAGES = ("download", "decode", "transcribe", "tokenize", "write")
STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
LATENCY_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


def realtime_factor(outcome: BatchOutcome) -> float | None:
    """Device seconds (transcribe + tokenize) per second of audio; below 1 is faster than real time.

    Both models share one device thread, so their sum is what bounds throughput.
    """
    device = outcome.timings.get("transcribe", 0.0) + outcome.timings.get("tokenize", 0.0)
    if outcome.audio_seconds <= 0 or device <= 0:
        return None
    return device / outcome.audio_seconds


class ConsumerView(Protocol):
    """What operating a consumer reads of it, and never changes: `StreamConsumer` is one. Read at
    each use (a scrape, a probe, a sample), so it follows the consumer as it starts and stops."""

    @property
    def settings(self) -> "Settings": ...

    @property
    def models(self) -> "Models | None": ...  # None while loading

    @property
    def consumer(self) -> Any: ...  # the AIOKafkaConsumer once created

    @property
    def s3(self) -> Any: ...  # the S3 client once open

    @property
    def environment(self) -> "FaultWatch": ...

    @property
    def commit_stats(self) -> "CommitStats | None": ...  # the committer's running totals, once it exists

    @property
    def stage_seconds(self) -> dict[str, float]: ...  # summed over the batches applied

    @property
    def in_flight(self) -> int: ...  # micro-batches fetched, not yet applied

    @property
    def stop_reason(self) -> str | None: ...  # None until a stop was asked for


# --- metrics ---------------------------------------------------------------------------------
class ConsumerMetrics:
    def __init__(self, group: str = "", topic: str = "") -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_open_fds, process_start_time_seconds, ...
        PlatformCollector(registry=r)  # python_info
        r.register(GC_COLLECTOR)  # python_gc_*
        kw: dict[str, Any] = {"namespace": NAMESPACE, "registry": r}
        self.info = Info("consumer", "the consumer group and topic this process serves", **kw)
        self.info.info({"group": group, "topic": topic})
        self.records = Counter("records_consumed", "Kafka records in micro-batches that were applied", **kw)
        self.batches = Counter("batches", "micro-batches applied (rows written, dead letters sent)", **kw)
        self.rows = Counter("rows_written", "rows appended to Parquet (durable once their file is finalized)", **kw)
        self.skipped = Counter("events_skipped", "events that are neither creations nor deletes (test events)", **kw)
        self.delete_events = Counter("events_deleted", "delete events committed (each takes its object's rows out)", **kw)
        self.deleted_rows = Counter("rows_deleted", "rows delete events took out of the table", **kw)
        self.duplicates = Counter("events_duplicate", "object versions already in the output: dropped", **kw)
        self.superseded = Counter("events_superseded", "events whose object was overwritten before it was read "
                                  "(the newer version's own event makes its row): no row, no dead letter", **kw)
        self.dead_letters = Counter("events_dead_lettered", "inputs sent to the dead-letter topic, by error type",
                                    ["error_type"], **kw)
        self.audio_seconds = Counter("audio_seconds", "seconds of audio in the rows written", **kw)
        self.files = Counter("files_finalized", "Parquet files finalized (rolled): rows durable, offsets committable", **kw)
        self.commits = Counter("offset_commits", "successful offset commits (one per finalized file)", **kw)
        self.batch_records = Histogram("batch_records", "Kafka records per micro-batch", buckets=BATCH_SIZE_BUCKETS, **kw)
        self.batch_seconds = Histogram("batch_duration_seconds", "micro-batch time from its first record fetched to its rows applied",
                                       buckets=STAGE_BUCKETS, **kw)
        self.stage_seconds = Histogram("stage_duration_seconds", "time one micro-batch spent in a stage", ["stage"],
                                       buckets=STAGE_BUCKETS, **kw)
        self.latency = Histogram("publish_to_finalized_seconds",
                                 "broker timestamp of a batch's newest event to the finalize of the file holding it",
                                 buckets=LATENCY_BUCKETS, **kw)
        self.rtf = Gauge("realtime_factor", "device seconds (transcribe + tokenize) per audio second, last batch; "
                         "below 1 is faster than real time", **kw)
        self.lag = Gauge("consumer_lag", "records the broker holds beyond this consumer's fetch position "
                         "(fetch highwater - position)", ["topic", "partition"], **kw)
        self.in_flight = Gauge("batches_in_flight", "micro-batches fetched but not yet applied", **kw)
        self.ready = Gauge("ready", "1 when every /readyz check passed at the last scrape, else 0 (the checks "
                           "are cached for READY_CACHE_S: a scrape costs at most one probe per period)", **kw)
        self.ready_checks = Gauge("ready_check", "1 when this /readyz check passed at the last scrape, else 0",
                                  ["check"], **kw)
        self.environment_faults = Counter("environment_faults", "batch attempts stopped by a fault that is not about "
                                          "any object (refused credentials, S3 down, a broken device), by kind",
                                          ["kind"], **kw)
        for stage in STAGES:  # series exist from the start: rate() works on the first batch
            self.stage_seconds.labels(stage)
        # how much of the running totals (CommitStats, FaultWatch.counts) the counters already hold
        self._seen: dict[str, float] = {}
        self._seen_errors: dict[str, float] = {}
        self._seen_faults: dict[str, float] = {}
        self._seen_latencies = 0

    # --- feeding ---------------------------------------------------------------------------
    def observe_batch(self, batch: "PendingBatch", outcome: BatchOutcome, stats: "CommitStats") -> None:
        self.batches.inc()
        self.records.inc(batch.records)
        self.batch_records.observe(batch.records)
        self.batch_seconds.observe(max(0.0, time.monotonic() - batch.opened_at))
        for stage, seconds in outcome.timings.items():
            self.stage_seconds.labels(stage).observe(seconds)
        rtf = realtime_factor(outcome)
        if rtf is not None:
            self.rtf.set(rtf)
        self.sync(stats)

    def sync(self, stats: "CommitStats") -> None:
        """Bring the counters up to the committer's running totals (only ever forward)."""
        for counter, name in ((self.rows, "rows"), (self.skipped, "skipped"), (self.duplicates, "duplicates"),
                              (self.superseded, "superseded"), (self.delete_events, "delete_events"),
                              (self.deleted_rows, "deleted_rows"),
                              (self.files, "files"), (self.commits, "commits"), (self.audio_seconds, "audio_seconds")):
            _inc_to(self._seen, name, getattr(stats, name), counter.inc)
        for error_type, n in stats.errors_by_type.items():
            _inc_to(self._seen_errors, error_type, n, self.dead_letters.labels(error_type).inc)
        for seconds in stats.latencies.since(self._seen_latencies):
            self.latency.observe(max(0.0, seconds))
        self._seen_latencies = stats.latencies.total

    def sync_faults(self, counts: dict[str, int]) -> None:
        for kind, n in counts.items():
            _inc_to(self._seen_faults, kind, n, self.environment_faults.labels(kind).inc)

    def set_lag(self, lags: dict[TopicPartition, int]) -> None:
        self.lag.clear()  # revoked partitions disappear rather than freeze at their last value
        for tp, n in lags.items():
            self.lag.labels(tp.topic, str(tp.partition)).set(n)


def _inc_to(seen: dict[str, float], name: str, total: float, inc: Callable[[float], None]) -> None:
    """Increment a counter by how far a running total got past what it already holds (`seen`)."""
    before = seen.get(name, 0)
    if total > before:
        inc(total - before)
        seen[name] = total


class DeviceMemoryCollector:
    """`metavoice_device_memory_bytes{source}`, read at scrape time.

    source="process_rss"      resident memory of this process (always)
    source="torch_allocated"  torch.cuda.memory_allocated() (CUDA only: the tokenizer's tensors)
    source="cuda_used"        total - free on the device (CUDA only: includes CTranslate2's Whisper)
    """

    def __init__(self, cuda: Callable[[], bool]) -> None:
        self.cuda = cuda

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(f"{NAMESPACE}_device_memory_bytes", self.__doc__ or "", labels=["source"])

    def collect(self) -> Iterator[GaugeMetricFamily]:
        g = GaugeMetricFamily(f"{NAMESPACE}_device_memory_bytes", "memory in use, by source", labels=["source"])
        g.add_metric(["process_rss"], float(process_rss_bytes()))
        if self.cuda() and "torch" in sys.modules:
            try:
                import torch

                g.add_metric(["torch_allocated"], float(torch.cuda.memory_allocated()))
                free, total = torch.cuda.mem_get_info()
                g.add_metric(["cuda_used"], float(total - free))
            except Exception as exc:  # a scrape must not fail because the driver hiccuped
                log.debug("cuda memory query failed: %s", exc)
        yield g


class EnvironmentCollector:
    """How close the current environment fault is to stopping the consumer, read at scrape time
    (an alert fires before `fault_timeout_s` is reached, not after the exit):

    metavoice_environment_fault_seconds          how long the current fault has lasted; 0 without one
    metavoice_environment_fault_timeout_seconds  the limit past which the consumer exits (fault_timeout_s)
    """

    def __init__(self, watch: Callable[[], "FaultWatch"]) -> None:
        self.watch = watch

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return self._families(None)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        return self._families(self.watch())

    @staticmethod
    def _families(w: "FaultWatch | None") -> Iterator[GaugeMetricFamily]:
        lasted = None
        if w is not None:
            lasted = 0.0 if w.since is None else max(0.0, time.monotonic() - w.since)
        yield GaugeMetricFamily(f"{NAMESPACE}_environment_fault_seconds", "how long the current environment fault "
                                "has lasted (0 without one)", value=lasted)
        yield GaugeMetricFamily(f"{NAMESPACE}_environment_fault_timeout_seconds", "fault_timeout_s: an environment "
                                "fault lasting this long stops the consumer", value=w.timeout_s if w else None)


class PrefectCollector:
    """Prefect's availability as pipeline/flows.py's `ORCHESTRATION` keeps it (process-wide):

    metavoice_prefect_unavailable_total   flow runs Prefect failed (unreachable, errors, over prefect_timeout_s)
    metavoice_prefect_bare_batches_total  micro-batches whose stages ran without a run record because of that
    metavoice_prefect_degraded            1 while batches run without Prefect, until a run goes through again
    """

    def describe(self) -> Iterator[Any]:
        return self._families(None)

    def collect(self) -> Iterator[Any]:
        from pipeline.flows import ORCHESTRATION  # read at scrape time

        return self._families(ORCHESTRATION)

    @staticmethod
    def _families(o: Any) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily

        yield CounterMetricFamily(f"{NAMESPACE}_prefect_unavailable", "flow runs Prefect failed (unreachable, error "
                                  "answers, over prefect_timeout_s); their batches ran without it",
                                  value=o.failures if o else None)
        yield CounterMetricFamily(f"{NAMESPACE}_prefect_bare_batches", "micro-batches whose stages ran without a "
                                  "Prefect run record because Prefect was unavailable", value=o.bare_batches if o else None)
        yield GaugeMetricFamily(f"{NAMESPACE}_prefect_degraded", "1 while micro-batches run without Prefect (its API "
                                "failed; probed with backoff), else 0", value=float(o.degraded) if o else None)


def process_rss_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # not Linux: peak RSS is the best cheap answer
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


async def partition_lag(consumer: Any) -> dict[TopicPartition, int]:
    """highwater - position per assigned partition that has been fetched at least once.

    The highwater comes with every fetch response, so it costs no request. The broker's
    ListOffsets "latest" (`end_offsets`) is deliberately not used: Tansu answers it wrongly for
    multi-record batches. A highwater below the position (a broker reporting a batch's base
    offset) reads as no lag, never as a negative one.
    """
    lags: dict[TopicPartition, int] = {}
    for tp in list(consumer.assignment()):
        try:
            high = consumer.highwater(tp)
            if high is None:  # not fetched yet
                continue
            position = await asyncio.wait_for(consumer.position(tp), POSITION_TIMEOUT_S)
        except (AssertionError, IllegalStateError, TimeoutError):  # revoked or resetting meanwhile
            continue
        lags[tp] = max(0, high - position)
    return lags


# --- readiness -------------------------------------------------------------------------------
Check = Callable[[], Awaitable[tuple[bool, str]]]


class Readiness:
    """Named async checks, each answering (ok, detail); answers are cached for `cache_s`."""

    def __init__(self, checks: dict[str, Check], cache_s: float = READY_CACHE_S) -> None:
        self.checks = checks
        self.cache_s = cache_s
        self._cache: dict[str, tuple[float, bool, str]] = {}

    async def evaluate(self) -> tuple[bool, dict[str, dict[str, Any]]]:
        now = time.monotonic()
        names = list(self.checks)
        stale = [n for n in names if n not in self._cache or now - self._cache[n][0] >= self.cache_s]
        answers = await asyncio.gather(*(self._run(n) for n in stale))
        for n, (ok, detail) in zip(stale, answers):
            # a failure is not cached: the moment the dependency is back, the pod turns ready
            self._cache[n] = (now if ok else float("-inf"), ok, detail)
        report = {n: {"ok": self._cache[n][1], "detail": self._cache[n][2]} for n in names}
        return all(r["ok"] for r in report.values()), report

    async def _run(self, name: str) -> tuple[bool, str]:
        try:
            return await asyncio.wait_for(self.checks[name](), PROBE_TIMEOUT_S)
        except TimeoutError:
            return False, f"no answer within {PROBE_TIMEOUT_S:g}s"
        except Exception as exc:
            return False, f"{type(exc).__name__}: {exc}"


# --- the HTTP server -------------------------------------------------------------------------
class OperationsServer:
    def __init__(self, registry: CollectorRegistry, readiness: Readiness, before_scrape: Callable[[], None],
                 on_readiness: Callable[[bool, dict[str, dict[str, Any]]], None] | None = None) -> None:
        self.registry = registry
        self.on_readiness = on_readiness
        self.readiness = readiness
        self.before_scrape = before_scrape
        self.port: int | None = None
        self._runner: web.AppRunner | None = None
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        self._app = app

    async def start(self, port: int, host: str = "0.0.0.0") -> int:
        runner = web.AppRunner(self._app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise FatalError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from exc
        self._runner = runner
        self.port = runner.addresses[0][1]
        log.info("serving /metrics, /healthz, /readyz on %s:%d", host, self.port)
        return self.port

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _metrics(self, request: web.Request) -> web.Response:
        try:
            self.before_scrape()
        except Exception as exc:  # stale numbers beat no numbers
            log.warning("metrics sync before scrape failed: %s", exc)
        if self.on_readiness is not None:  # Prometheus cannot read /readyz: a scrape carries its answer
            ok, report = await self.readiness.evaluate()
            self.on_readiness(ok, report)
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        ok, report = await self.readiness.evaluate()
        return web.Response(status=200 if ok else 503, body=orjson.dumps({"ready": ok, "checks": report}),
                            content_type="application/json")


# --- wiring into the consumer ----------------------------------------------------------------
class Operations:
    """Metrics, health and status for one consumer; `running()` lives in its exit stack."""

    def __init__(self, app: ConsumerView, status_stream: Any = None) -> None:
        self.app = app
        st = app.settings
        self.metrics = ConsumerMetrics(st.group, st.topic)
        self.metrics.in_flight.set_function(lambda: max(0, app.in_flight))
        self.metrics.registry.register(DeviceMemoryCollector(self._on_cuda))
        self.metrics.registry.register(PrefectCollector())
        self.metrics.registry.register(EnvironmentCollector(lambda: app.environment))
        self.readiness = Readiness({"broker": self._broker_ready, "s3": self._s3_ready, "models": self._models_ready,
                                    "environment": self._environment_ready})
        self.server: OperationsServer | None = None
        stream = status_stream if status_stream is not None else sys.stderr
        self.status = StatusLine(stream, enabled=_is_tty(stream) and st.log_format == "text")
        self.broker_up = False  # set once the consumer joined the cluster
        self.lags: dict[TopicPartition, int] = {}
        self._warned: set[str] = set()

    @property
    def registry(self) -> CollectorRegistry:
        return self.metrics.registry

    @contextlib.asynccontextmanager
    async def running(self):
        port = self.app.settings.metrics_port
        if port is not None:
            self.server = OperationsServer(self.registry, self.readiness, self.sync, self._set_ready)
            await self.server.start(port)
        sampler = asyncio.create_task(self._sample_loop(), name="operations-sampler")
        try:
            yield self
        finally:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
            self.sync()
            if self.server is not None:
                await self.server.stop()

    def _set_ready(self, ok: bool, report: dict[str, dict[str, Any]]) -> None:
        self.metrics.ready.set(1.0 if ok else 0.0)
        for name, answer in report.items():
            self.metrics.ready_checks.labels(name).set(1.0 if answer["ok"] else 0.0)

    def observe_batch(self, batch: "PendingBatch", outcome: BatchOutcome, stats: "CommitStats") -> None:
        """An `on_batch_done` observer: the consumer subscribes it."""
        self.metrics.observe_batch(batch, outcome, stats)

    def sync(self) -> None:
        stats = self.app.commit_stats
        if stats is not None:
            self.metrics.sync(stats)
        self.metrics.sync_faults(self.app.environment.counts)

    async def sample(self) -> None:
        consumer = self.app.consumer
        if consumer is not None and self.broker_up and self.app.stop_reason is None:
            self.lags = await partition_lag(consumer)
            self.metrics.set_lag(self.lags)
        self.sync()
        self.status.tick(self.snapshot())

    def snapshot(self) -> StatusSnapshot:
        app = self.app
        c = app.commit_stats
        device = sum(app.stage_seconds.get(s, 0.0) for s in ("transcribe", "tokenize"))
        audio = c.audio_seconds if c else 0.0
        return StatusSnapshot(
            rows=c.rows if c else 0,
            dead_letters=c.dead_letters if c else 0,
            files=c.files if c else 0,
            lag=sum(self.lags.values()) if self.lags else None,
            rtf=device / audio if audio > 0 and device > 0 else None,
            in_flight=max(0, app.in_flight),
        )

    async def _sample_loop(self) -> None:
        while True:
            await asyncio.sleep(SAMPLE_EVERY_S)
            try:
                await self.sample()
            except Exception as exc:
                kind = type(exc).__name__
                level = logging.DEBUG if kind in self._warned else logging.WARNING
                self._warned.add(kind)
                log.log(level, "operations sample failed (the stream goes on): %s: %s", kind, exc)

    # --- readiness checks ------------------------------------------------------------------
    async def _environment_ready(self) -> tuple[bool, str]:
        watch = self.app.environment
        if watch.current is None:
            return True, "no fault"
        lasted = time.monotonic() - (watch.since or time.monotonic())
        return False, f"{type(watch.current).__name__} for {lasted:.0f}s: {watch.current}"

    async def _models_ready(self) -> tuple[bool, str]:
        m = self.app.models
        if m is None:
            return False, "loading"
        return True, f"whisper={m.transcriber.name} tokenizer={m.tokenizer.name}"

    async def _broker_ready(self) -> tuple[bool, str]:
        consumer = self.app.consumer
        if consumer is None or not self.broker_up:
            return False, "connecting"
        if self.app.stop_reason is not None:
            return False, f"stopping ({self.app.stop_reason})"
        topics = await consumer.topics()  # a metadata request: the broker answers or not
        if self.app.settings.topic not in topics:
            return False, f"topic {self.app.settings.topic} not found"
        return True, f"{len(consumer.assignment())} partitions assigned"

    async def _s3_ready(self) -> tuple[bool, str]:
        s3 = self.app.s3
        if s3 is None:
            return False, "connecting"
        from botocore.exceptions import ClientError

        bucket = self.app.settings.bucket
        try:
            if bucket:
                await s3.head_bucket(Bucket=bucket)
                return True, f"bucket {bucket} reachable"
            await s3.list_buckets()
            return True, "endpoint answered"
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "?")
            if not bucket:  # the endpoint answered; tokens scoped to a bucket may not list (R2)
                return True, f"endpoint answered ({code})"
            return False, f"bucket {bucket}: {code}"

    def _on_cuda(self) -> bool:
        m = self.app.models
        return m is not None and getattr(m.transcriber, "device", "cpu") == "cuda"


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
