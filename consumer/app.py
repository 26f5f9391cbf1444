"""The streaming consumer: Kafka records -> micro-batches -> subflows -> durable files -> commits.

Three concurrent stages joined by bounded queues, in one task group:

    fetch     getmany -> Batcher -> batch queue (blocks when `pipeline_depth` batches are in flight)
    dispatch  batch queue -> one processing task per batch (Prefect subflow), started at once
    commit    awaits the processing tasks *in batch order* -> OutputCommitter (write, roll, commit)

So while the model works on batch N, batch N+1 is downloading and decoding and batch N-1 is
being written. Shutdown (SIGTERM/SIGINT, or idle with --exit-when-idle) stops fetching, drains
what was fetched, finalizes the file and commits. A failure commits nothing.

The decisions live elsewhere, pure or on the output side: start-up recovery in
`pipeline.ledger.recover`, where each partition starts and which fetched records are new work in
consumer/positions.py, the commit path in consumer/committer.py. What this module holds is the
order of things and the clients' lifetimes (one `AsyncExitStack`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, TypeVar

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener
from aiokafka.errors import KafkaError
from aiokafka.structs import TopicPartition

from broker.clients import leave_group, make_consumer, make_producer, start_when_broker_is_up
from broker.topics import ensure_dead_letter_topic
from pipeline.batch import BatchOutcome
from pipeline.config import Settings
from pipeline.errors import FatalError
from pipeline.faults import adelay_point
from pipeline.flows import consumer_flow, process_batch
from pipeline.ledger import OutputLedger, recover
from pipeline.output import open_output
from pipeline.models import Models
from pipeline.parquet import RollingParquetWriter
from pipeline.storage import s3_client

from .batcher import Batcher, PendingBatch
from .crash_guard import CrashGuard
from .committer import AppliedCounts, CommitStats, OutputCommitter
from .dead_letters import DeadLetterLimits, DeadLetterWriter
from .environment import Abandoned, FaultWatch
from .positions import FetchGate, Rewind, StartPlan, plan_starts
from .metrics import Operations, realtime_factor

log = logging.getLogger(__name__)
T = TypeVar("T")

# The revoke path - the fetch lock, the drain, the finalize and its commit - has ONE budget, shared
# by all its steps: every member of the group waits for the slowest revoke, and past the rebalance
# timeout (aiokafka takes it from max_poll_interval_ms) the member is dropped. Batches waiting out
# an environment fault are given up at once (`Abandoned`), so a fault never eats it.
MAX_POLL_INTERVAL_MS = 600_000
REVOKE_BUDGET_SECONDS = 240
# --exit-when-idle counts from the first assignment; a consumer that gets none (more consumers
# than partitions) still exits this long after its idle time.
JOIN_GRACE_SECONDS = 60
# A first assignment that has not come is logged this often (aiokafka logs its joins at INFO, muted).
JOIN_WARN_EVERY_S = 30.0
# --exit-when-idle asks the broker for the partitions' ends before it stops; past this it goes
# by the quiet time alone.
IDLE_END_CHECK_S = 5.0
# after a stop signal, past shutdown_timeout: time for the last finalize's commit before the backstop exits 1
STOP_BACKSTOP_MARGIN_S = 10.0
# Leaving the group ends this much before the shutdown budget does (the exit itself follows), and
# gets at least LEAVE_MIN_S even when the drain used the whole budget.
LEAVE_RESERVE_S = 1.0
LEAVE_MIN_S = 1.0
# ... and a consumer holding no partitions (a stop before its first assignment, or in a rejoin)
# waits at most this long for the join in flight: it has nothing to hand over.
LEAVE_UNASSIGNED_S = 3.0


@dataclass
class RunStats(CommitStats):
    batches: int = 0
    records: int = 0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    model_busy_seconds: float = 0.0
    wall_seconds: float = 0.0
    stop_reason: str = ""
    stop_requested_at: float | None = None  # time.monotonic() of the stop request: the shutdown budget counts from it


class Rebalancer(ConsumerRebalanceListener):
    """Revoke: drain, finalize, commit. Assign: position each partition past what the files hold.

    aiokafka logs and swallows a listener's exception and carries on with the new assignment,
    so a failure here (a file that cannot be finalized, a drain over budget) is handed to the
    app, which stops without committing anything more.
    """

    def __init__(self, app: "StreamConsumer") -> None:
        self.app = app

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._handle(self.app.on_revoked, revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self._handle(self.app.on_assigned, assigned)

    async def _handle(self, callback: Callable[[set[TopicPartition]], Awaitable[None]], partitions: set) -> None:
        self.app._rebalancing = True
        try:
            await callback(set(partitions))
        except Exception as exc:
            self.app.fail(exc)
            raise
        finally:
            self.app._rebalancing = False


class StreamConsumer:
    def __init__(self, settings: Settings, models: Models | None = None) -> None:
        self.settings = settings
        self.models = models
        self.stats = RunStats()
        self.stop_event = asyncio.Event()
        self._batch_queue: asyncio.Queue[PendingBatch | None] = asyncio.Queue(maxsize=1)
        self._result_queue: asyncio.Queue[tuple[PendingBatch, asyncio.Task] | None] = asyncio.Queue()
        self._inflight = asyncio.Semaphore(settings.pipeline_depth)
        self._pending = 0  # batches fetched but not yet applied by the committer
        self._drained = asyncio.Event()
        self._drained.set()
        self._fetch_lock = asyncio.Lock()
        self._revoking = asyncio.Event()  # a revoke is under way: batches waiting out a fault give up
        self._dropping = False  # a batch was given up: later ones are dropped too until the drain ends (no gap)
        self._first_assignment = True
        # between a revoke and the next assignment (a rejoin the broker may hold for a while): no
        # partition to be idle on, so --exit-when-idle waits for the assignment, as before the first
        self._awaiting_assignment = True
        self._subscribed_at = time.monotonic()
        self._next_join_warning = JOIN_WARN_EVERY_S  # seconds after subscribing
        self.rewind: Rewind[TopicPartition] = Rewind.from_settings(settings)  # --from-beginning / --from-timestamp
        self._rebalancing = False  # a listener callback is running
        self._last_record_at = time.monotonic()
        # Which fetched records are new work (consumer/positions.py): set by on_assigned, cleared by
        # on_revoked; a partition it does not know accepts nothing.
        self.gate: FetchGate[TopicPartition] = FetchGate()
        self._failure: BaseException | None = None  # a rebalance-listener failure (see Rebalancer)
        self.consumer: AIOKafkaConsumer | None = None
        self.committer: OutputCommitter | None = None
        self.batcher: Batcher | None = None
        self.output = open_output(settings.output_dir, settings)  # a directory or s3://bucket/prefix
        self.ledger = OutputLedger(self.output, group=settings.group)  # app transactions name the group
        self.guard: CrashGuard | None = None
        self.on_batch_done: list[Any] = []  # observers (metrics, progress): fn(batch, outcome, stats)
        self.s3: Any = None
        self.environment = FaultWatch(settings.fault_timeout_s)  # faults not about any object
        self.operations = Operations(self)  # metrics, /healthz, /readyz, status line
        self.on_batch_done.append(self.operations.observe_batch)

    # --- what operating it reads (consumer/metrics.py: ConsumerView) -----------------------
    @property
    def in_flight(self) -> int:
        return self._pending

    @property
    def commit_stats(self) -> CommitStats | None:
        return self.committer.stats if self.committer is not None else None

    @property
    def stage_seconds(self) -> dict[str, float]:
        return self.stats.stage_seconds

    @property
    def stop_reason(self) -> str | None:
        return self.stats.stop_reason if self.stop_event.is_set() else None

    # --- lifetime ------------------------------------------------------------------------
    async def run(self) -> RunStats:
        t0 = time.perf_counter()
        st = self.settings
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(self.operations.running())  # first: /healthz answers while models load
            if self.models is None:
                self.models = await asyncio.to_thread(Models.load, st)
                stack.callback(self.models.close)
            stack.callback(self.output.close)
            identity = {"topic": st.topic, "group": st.group, **self.models.identity}
            await asyncio.to_thread(recover, self.ledger, identity, st.force)
            if st.allowed_bucket_set() is None:
                log.warning("any bucket an event names will be read: set METAVOICE_ALLOWED_BUCKETS (or "
                            "METAVOICE_BUCKET) to the buckets this stream serves")
            self.guard = CrashGuard(self.output.attempts_dir)
            stack.callback(self.guard.abandon)  # a stop Python sees blames no record; only a hard death does
            s3 = await self._start_clients(stack)
            try:
                if st.prefect_enabled:
                    await consumer_flow(lambda: self._run_stages(s3), st.group, st.topic, timeout_s=st.prefect_timeout_s)
                else:
                    await self._run_stages(s3)
            except BaseException:
                self.committer.abort()  # type: ignore[union-attr]
                raise
        self.stats.wall_seconds = time.perf_counter() - t0
        if self.models is not None:
            self.stats.model_busy_seconds = self.models.busy_seconds
        return self.stats

    async def _start_clients(self, stack: contextlib.AsyncExitStack) -> Any:
        """S3, the dead-letter producer, the group consumer, and what writes and commits; each one's
        end in `stack`. Returns the S3 client; the consumer joins its group in the background."""
        st = self.settings
        s3 = self.s3 = await stack.enter_async_context(s3_client(st))
        dlq_producer = make_producer(st, max_request_size=max(1 << 20, st.dlq_max_record_bytes + 4096))
        await start_when_broker_is_up(dlq_producer, st)
        stack.push_async_callback(dlq_producer.stop)
        await ensure_dead_letter_topic(st)  # before the first record: a dead letter must have a home
        consumer = self.consumer = make_consumer(  # the group, its session timeout and heartbeats come from the settings
            st,
            enable_auto_commit=False,
            auto_offset_reset="earliest",  # a new group starts from the first event: nothing lost
            max_poll_interval_ms=MAX_POLL_INTERVAL_MS,
            max_partition_fetch_bytes=1 << 20,
        )
        writer = RollingParquetWriter(self.output, st.roll_max_rows, st.roll_max_seconds, roll_max_bytes=st.roll_max_bytes)
        stack.callback(writer.close)
        limits = DeadLetterLimits(max_record_bytes=st.dlq_max_record_bytes,
                                  max_event_bytes=min(DeadLetterLimits().max_event_bytes, st.dlq_max_record_bytes // 4))
        # group-less: where the DLQ ends before a file's dead letters go out, and a restart's read-back
        dlq_reader = make_consumer(st, group_id=None, group_instance_id=None, enable_auto_commit=False,
                                   auto_offset_reset="earliest")
        await start_when_broker_is_up(dlq_reader, st)
        stack.push_async_callback(dlq_reader.stop)
        self.committer = OutputCommitter(consumer, writer, self.ledger,
                                         DeadLetterWriter(dlq_producer, st.dlq_topic, limits, reader=dlq_reader))
        self.batcher = Batcher(self.ledger, st.batch_max_events, st.batch_max_bytes, st.batch_linger_ms,
                               allowed_buckets=st.allowed_bucket_set(), max_events_per_message=st.max_events_per_message,
                               backlog_max_events=st.batch_max_events_backlog)
        # Started before it subscribes: aiokafka's start() of a subscribed consumer waits for the
        # first assignment, which the group may hold (a member that stopped answering, a join the
        # broker keeps open) and a stop signal could not end. Subscribed afterwards, it joins in
        # the background and the fetch loop waits for the assignment, a wait a stop ends.
        await start_when_broker_is_up(consumer, st)
        stack.push_async_callback(self._leave_group)
        consumer.subscribe([st.topic], listener=Rebalancer(self))
        self._subscribed_at = time.monotonic()
        log.info("joining group %s for %s", st.group, st.topic)
        self.operations.broker_up = True
        return s3

    async def _leave_group(self) -> None:
        """Stop the group consumer within what is left of the shutdown budget. Its stop finishes the
        join in flight before it leaves, and the broker may hold a join until every member rejoined
        or timed out; past the budget the join is cut and the group drops this member after its
        session timeout. The group's leader first rejoins a rebalance its heartbeat reports (Tansu
        loses a group whose leader leaves mid-rebalance). Nothing depends on it: offsets were
        committed after their files."""
        consumer = self.consumer
        assert consumer is not None
        started = self.stats.stop_requested_at
        budget = self.settings.shutdown_timeout - (time.monotonic() - started if started is not None else 0.0)
        budget = max(budget - LEAVE_RESERVE_S, LEAVE_MIN_S)
        if not self.gate.held:  # revoked or never assigned: nothing to hand over, no long wait for a join
            budget = min(budget, LEAVE_UNASSIGNED_S)
        if not await leave_group(consumer, budget):  # a leader settles the group first (broker/clients.py)
            log.warning("leaving the group did not finish within the shutdown budget (a join the broker holds): "
                        "stopped without LeaveGroup; the group drops this member after its session timeout")

    async def _run_stages(self, s3: Any) -> None:
        async with asyncio.TaskGroup() as tg:
            stages = [
                tg.create_task(self._fetch_loop()),
                tg.create_task(self._dispatch_loop(s3)),
                tg.create_task(self._commit_loop()),
            ]
            watcher = tg.create_task(self._idle_watch())
            await self.stop_event.wait()
            watcher.cancel()
            # Draining is bounded: past the limit we stop without committing (a restart resumes).
            _, still_running = await asyncio.wait(stages, timeout=self.settings.shutdown_timeout)
            if still_running:
                raise FatalError(
                    f"draining took longer than shutdown_timeout={self.settings.shutdown_timeout:g}s; "
                    "stopping without committing the open file (its events will be processed again)"
                )
        self._raise_if_failed()
        # the three loops drained everything; the open file is finalized and committed
        await self.committer.finalize_and_commit(final=True)  # type: ignore[union-attr]
        self._copy_stats()

    def fail(self, exc: BaseException) -> None:
        """A failure outside the stages (a rebalance callback): commit nothing more, stop."""
        if self._failure is None:
            log.error("rebalance failed, stopping without committing: %s: %s", type(exc).__name__, exc)
            self._failure = exc
        if self.committer is not None:
            self.committer.abort()

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            raise self._failure

    def request_stop(self, reason: str) -> None:
        if not self.stop_event.is_set():
            log.info("stopping: %s (draining in-flight batches, then finalize and commit)", reason)
            self.stats.stop_reason = reason
            self.stats.stop_requested_at = time.monotonic()
            self.stop_event.set()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        hits = {"n": 0}

        def on_signal(sig: signal.Signals) -> None:
            hits["n"] += 1
            if hits["n"] > 1:
                log.error("second %s: exiting now without committing", sig.name)
                raise SystemExit(130)
            self.request_stop(sig.name)
            self._stop_backstop()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)

    def _stop_backstop(self) -> None:
        """METAVOICE_SHUTDOWN_TIMEOUT bounds a signalled stop wherever it lands - in a join the
        broker holds, a start-up, a drain that cannot end - not only once `run_consumer` returns:
        past it (and a margin for the last commit) the process exits 1. Nothing is lost: offsets
        are committed only after their files are durable, so this is a kill -9's outcome at worst."""
        seconds = self.settings.shutdown_timeout + STOP_BACKSTOP_MARGIN_S

        def hard_exit() -> None:
            log.error("still running %.0fs after the stop signal: exiting 1 (a restart resumes from the files)", seconds)
            for handler in logging.getLogger().handlers:
                handler.flush()
            os._exit(1)

        timer = threading.Timer(seconds, hard_exit)
        timer.daemon = True
        timer.start()

    # --- stages --------------------------------------------------------------------------
    async def _fetch_loop(self) -> None:
        consumer, batcher = self.consumer, self.batcher
        assert consumer is not None and batcher is not None
        fetched_full = False
        while not self.stop_event.is_set():
            wait = batcher.seconds_until_due()
            timeout_ms = int(1000 * min(0.2 if wait is None else wait, 0.2))
            fetched_in = self.gate.generation  # an assignment change meanwhile voids this fetch
            # A backlog - every pipeline slot busy, or the last fetch came back full (more records are
            # waiting) - lets the open batch grow instead of closing it small: fewer flow runs per event.
            # A lone event on an idle stream still closes at batch_max_events or the linger.
            batcher.backlog = fetched_full or self._pending >= self.settings.pipeline_depth
            if self._first_assignment:
                self._note_waiting_for_assignment()
            limit = batcher.event_limit
            await adelay_point("fetch")  # tests: a fetch loop starved of CPU under load
            records = await self._unless_stopped(consumer.getmany(timeout_ms=max(timeout_ms, 10), max_records=limit))
            if records is None:
                break  # a stop during a rebalance: nothing was taken from the fetcher
            fetched_full = sum(len(r) for r in records.values()) >= limit
            self._raise_if_failed()
            async with self._fetch_lock:
                records = self._admit(fetched_in, records)
                for tp_records in records.values():
                    for rec in tp_records:
                        await self._batch_record(rec)
                        self.stats.records += 1
                        if batcher.full():
                            await self._enqueue(batcher.take())
                if records:
                    self._last_record_at = time.monotonic()
                if batcher.due():
                    await self._enqueue(batcher.take())
        async with self._fetch_lock:
            await self._enqueue(batcher.take())
        await self._batch_queue.put(None)

    def _note_waiting_for_assignment(self) -> None:
        waited = time.monotonic() - self._subscribed_at
        if waited >= self._next_join_warning:
            log.warning("no partitions assigned %.0fs after joining group %s: the broker holds the join, or "
                        "every partition has an owner", waited, self.settings.group)
            self._next_join_warning += JOIN_WARN_EVERY_S

    async def _unless_stopped(self, step: Awaitable[T]) -> T | None:
        """`step`'s result, or None if a stop is requested first (`step` is cancelled). aiokafka's
        getmany waits without limit while the group rebalances - its timeout counts only once an
        assignment is there - and the broker may hold a rebalance for as long as a member does
        not answer: a stop must not wait for the group."""
        task = asyncio.ensure_future(step)
        stop = asyncio.ensure_future(self.stop_event.wait())
        try:
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                return task.result()
            return None
        finally:
            stop.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def _admit(self, fetched_in: int, records: dict) -> dict:
        """A getmany result, fetched in gate generation `fetched_in`, as new work (FetchGate).

        Fetched across an assignment change: dropped whole, its partitions sought back to fetch
        again. Otherwise each partition keeps the records the gate accepts. Call it under
        `_fetch_lock`; tests/test_offset_recovery_property.py drives it with delayed fetches.
        """
        if self.gate.stale(fetched_in):
            for tp, offset in self.gate.resume_points(records).items():
                self.consumer.seek(tp, offset)  # type: ignore[union-attr]
            return {}
        return {
            tp: [r for r in tp_records if self.gate.accept(TopicPartition(r.topic, r.partition), r.offset, r.timestamp)]
            for tp, tp_records in records.items()
        }

    async def _batch_record(self, rec: Any) -> None:
        """Into the open micro-batch - unless the crash-loop breaker (consumer/crash_guard.py) says
        the record was in flight when a process died: then it runs alone, nothing else in flight,
        or, having killed the process alone often enough, it becomes a `CrashLoop` dead letter."""
        batcher, guard = self.batcher, self.guard
        assert batcher is not None and guard is not None
        verdict = guard.verdict(rec.topic, rec.partition, rec.offset)
        if verdict == "ok":
            batcher.add(rec)
        elif verdict == "crash_loop":
            log.error("%s[%d]@%d killed the process %d times: dead-lettered as CrashLoop, not tried again",
                      rec.topic, rec.partition, rec.offset, guard.max_attempts)
            batcher.add_failed(rec, guard.crash_loop_error(rec.topic, rec.partition, rec.offset))
        else:
            log.warning("%s[%d]@%d was in flight when a process died: processing it alone", rec.topic, rec.partition, rec.offset)
            await self._enqueue(batcher.take())
            await self._drained.wait()
            batcher.add(rec)
            await self._enqueue(batcher.take())
            await self._drained.wait()

    async def _enqueue(self, batch: PendingBatch | None) -> None:
        if batch is None or batch.records == 0:
            return
        self._pending += 1
        self._drained.clear()
        await self._batch_queue.put(batch)

    async def _dispatch_loop(self, s3: Any) -> None:
        while True:
            batch = await self._batch_queue.get()
            if batch is None:
                await self._result_queue.put(None)
                return
            await self._inflight.acquire()
            task = asyncio.create_task(self._process(batch, s3), name=f"batch-{batch.seq}")
            await self._result_queue.put((batch, task))

    async def _process(self, batch: PendingBatch, s3: Any) -> BatchOutcome:
        """The batch's stages; an EnvironmentFault is waited out (consumer/environment.py), never
        turned into dead letters. A stop requested meanwhile ends the wait: nothing is committed."""
        if not batch.items and not batch.early_failures:
            return BatchOutcome()
        # markers first: if this batch kills the process, the next start knows which records were in flight
        await asyncio.to_thread(self.guard.begin, batch.seq, batch.in_flight())  # type: ignore[union-attr]
        if not batch.items:
            return BatchOutcome()
        return await self.environment.patiently(
            lambda: process_batch(batch.micro_batch(), s3, self.models, self.settings), self.stop_event,  # type: ignore[arg-type]
            abandon=self._revoking)

    async def _commit_loop(self) -> None:
        committer = self.committer
        assert committer is not None
        try:
            while True:
                roll_in = committer.writer.seconds_until_roll()
                try:
                    item = await asyncio.wait_for(self._result_queue.get(), timeout=roll_in if roll_in is not None else 1.0)
                except TimeoutError:
                    if committer.writer.due_to_roll():
                        await committer.finalize_and_commit()
                    continue
                if item is None:
                    return
                batch, task = item
                try:
                    outcome = await task
                except Abandoned as exc:
                    log.warning("batch %d given up: %s; its records are read again by the next owner", batch.seq, exc)
                    self._dropping = True
                finally:
                    self._inflight.release()
                if self._dropping:  # given up, or after one that was: applying it would leave a gap
                    await asyncio.to_thread(self.guard.end, batch.seq)  # type: ignore[union-attr]
                    self._settled()
                    continue
                t_write = time.perf_counter()
                applied = await committer.apply(batch, outcome)
                await asyncio.to_thread(self.guard.end, batch.seq)  # type: ignore[union-attr]
                outcome.timings["write"] = time.perf_counter() - t_write
                self.stats.batches += 1
                for k, v in outcome.timings.items():
                    self.stats.stage_seconds[k] = self.stats.stage_seconds.get(k, 0.0) + v
                self._log_batch(batch, outcome, applied)
                for observer in self.on_batch_done:
                    observer(batch, outcome, committer.stats)
                self._settled()
        finally:
            self._drained.set()

    def _settled(self) -> None:
        """One fetched batch is applied or dropped."""
        self._pending -= 1
        if self._pending == 0:
            self._drained.set()

    async def _idle_watch(self) -> None:
        idle = self.settings.exit_when_idle
        if idle is None:
            return
        while True:
            await asyncio.sleep(min(0.25, idle / 4))
            quiet = time.monotonic() - self._last_record_at
            # Not idle while partitions are being positioned, nor before the first assignment or
            # between a revoke and the next one (a join the broker holds can take a while) unless
            # none came within JOIN_GRACE_SECONDS.
            if self._rebalancing or (self._awaiting_assignment and quiet < idle + JOIN_GRACE_SECONDS):
                continue
            if quiet >= idle and self._pending == 0 and self.batcher is not None and self.batcher.seconds_until_due() is None:
                # Bounded: a broker that reports an end it never serves (FORMATS.md: Tansu's
                # ListOffsets) delays the exit by JOIN_GRACE_SECONDS at most, never forever.
                if quiet < idle + JOIN_GRACE_SECONDS and not await self._read_to_the_end():
                    continue
                self.request_stop(f"idle for {idle:g}s")
                return

    async def _read_to_the_end(self) -> bool:
        """Every assigned partition fetched up to the broker's end offset. A quiet spell while
        records wait (a fetch loop starved of CPU, a slow first fetch after an assignment) is not
        the end of a backlog: --exit-when-idle would stop with events unread. When the broker
        cannot say (it is down), the quiet time alone decides, as before."""
        consumer = self.consumer
        parts = list(consumer.assignment()) if consumer is not None else []
        if not parts:
            return True
        try:
            async with asyncio.timeout(IDLE_END_CHECK_S):
                ends = await consumer.end_offsets(parts)
                behind = [tp for tp in parts if await consumer.position(tp) < ends[tp]]
        except (KafkaError, TimeoutError) as exc:
            log.debug("could not compare positions with the partition ends (%s): idle by the quiet time alone", exc)
            return True
        if behind:
            log.debug("quiet, but %s not read to the end yet: not idle", _fmt(set(behind)))
        return not behind

    # --- rebalancing -----------------------------------------------------------------------
    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        self._awaiting_assignment = True  # aiokafka revokes before every rejoin
        if not revoked or self.committer is None or self.batcher is None or self._failure is not None:
            return
        log.info("partitions revoked: %s; draining", _fmt(revoked))
        deadline = time.monotonic() + REVOKE_BUDGET_SECONDS  # one budget for every step below
        self._revoking.set()  # the fetch loop may hold the lock, blocked behind batches waiting out a fault
        try:
            await adelay_point("on_revoked")  # tests: a stop signal or a fault lands during the revoke
            await _within(deadline, self._fetch_lock.acquire(), "the fetch loop to let go")
            try:
                self.gate.revoke(revoked)  # records in hand for these are stale: the next owner reads them again
                self.batcher.discard(revoked)  # fetched, never processed: the next owner reads them again
                await _within(deadline, self._drained.wait(), "in-flight batches to drain")
                self._dropping = False
                # waits for a finalize already under way (the roll timer's), so its rename and commit
                # happen before the partitions go to their next owner; never cut in the middle
                await _within(deadline, asyncio.shield(self.committer.finalize_and_commit()), "the finalize and commit")
                self.committer.forget(revoked)
                self.guard.forget(revoked)  # type: ignore[union-attr]
            finally:
                self._fetch_lock.release()
        finally:
            self._revoking.clear()

    async def on_assigned(self, assigned: set[TopicPartition]) -> None:
        """Position each partition (consumer/positions.py says where; this asks the broker and seeks)."""
        consumer = self.consumer
        assert consumer is not None
        self._awaiting_assignment = False
        self._last_record_at = time.monotonic()  # idle counts from the assignment, not from the revoke
        async with self._fetch_lock:
            await adelay_point("on_assigned")  # tests: records fetched meanwhile must not win over the plan
            if self.stop_event.is_set():
                # Stopping: take no new work. Unpositioned, the gate accepts none of their records;
                # nothing is committed for them, and leaving the group hands them on.
                log.info("partitions assigned while stopping: %s; not taking them", _fmt(assigned))
                return
            # other consumers may have finalized files meanwhile, or died leaving in-progress ones
            await asyncio.to_thread(self.ledger.catch_up)
            self._first_assignment = False
            if self.rewind.unresolved and assigned:
                await self._resolve_rewind(assigned)
            committed = {tp: await consumer.committed(tp) for tp in assigned}
            from_files = {tp: self.ledger.next_offset(tp.topic, tp.partition) for tp in assigned}
            plan = plan_starts(assigned, committed, from_files, self.rewind.points(assigned))
            self.rewind.spend()  # once: a later assignment resumes from what this one commits
            self._last_record_at = time.monotonic()  # --exit-when-idle counts from the assignment, not the join
            starts = plan.starts(await self._seek(plan))
            self.gate.assign(starts, self.rewind.not_before(plan.to_end))
            await asyncio.to_thread(self.guard.load, assigned, starts)  # type: ignore[union-attr]
            log.info("partitions assigned: %s; starting at %s", _fmt(assigned), {f"{tp.partition}": o for tp, o in sorted(starts.items())})
            if plan.lagging and self.committer is not None:
                # a crash between a file and its commit: its dead letters may not have been sent
                await self.committer.resend_dead_letters({tp: committed.get(tp) for tp in plan.lagging})
                log.info("committing offsets the files hold but the broker lacks: %s",
                         {f"{tp.partition}": o for tp, o in plan.lagging.items()})
                await self.committer.commit_recovered(plan.lagging)
            if plan.rewound and self.committer is not None:
                await self.committer.commit_rewind(plan.rewind_commits(starts))

    async def _resolve_rewind(self, assigned: set[TopicPartition]) -> None:
        """Ask the broker for the rewind points of the partitions of the first assignment (`Rewind`:
        applied once, then spent)."""
        consumer = self.consumer
        assert consumer is not None
        if self.rewind.timestamp_ms is not None:
            answers = await consumer.offsets_for_times({tp: self.rewind.timestamp_ms for tp in assigned})
        else:
            answers = await consumer.beginning_offsets(list(assigned))
        self.rewind.resolve(assigned, answers)

    async def _seek(self, plan: StartPlan[TopicPartition]) -> dict[TopicPartition, int]:
        """Seek as `plan` says; returns where seeking to the end or the beginning put those partitions."""
        consumer = self.consumer
        assert consumer is not None
        for tp, offset in plan.seek.items():
            consumer.seek(tp, offset)
        if plan.to_end:
            await consumer.seek_to_end(*plan.to_end)
        if plan.to_beginning:
            # auto_offset_reset's "earliest", made explicit: every offset there is new
            await consumer.seek_to_beginning(*plan.to_beginning)
        return {tp: await consumer.position(tp) for tp in (*plan.to_end, *plan.to_beginning)}

    # --- reporting ---------------------------------------------------------------------------
    def _copy_stats(self) -> None:
        c = self.committer.stats  # type: ignore[union-attr]
        for name in CommitStats.__dataclass_fields__:
            setattr(self.stats, name, getattr(c, name))

    def _log_batch(self, batch: PendingBatch, outcome: BatchOutcome, applied: AppliedCounts) -> None:
        """One line per batch, with the counts the committer applied (a row already written is a
        duplicate, not a row). With --log-format json the fields below are keys of the line;
        they name counts, timings and offsets only - never settings, so never a credential."""
        rtf = realtime_factor(outcome)
        failed = len(outcome.failures) + len(batch.early_failures)
        timings = {k: round(v, 4) for k, v in outcome.timings.items()}
        log.info(
            "batch %d: %d records, %d rows, %d failed, %d skipped, %d duplicate, %.1fs audio, RTF %s, stages %s",
            batch.seq, batch.records, applied.rows, failed, batch.skipped, applied.duplicates,
            outcome.audio_seconds, f"{rtf:.3f}" if rtf is not None else "-", timings,
            extra={"fields": {
                "batch": batch.seq, "label": batch.micro_batch().label, "records": batch.records,
                "objects": len(batch.items),  # what batch_max_events bounds
                "events": len(batch.items) + batch.skipped + batch.duplicates + len(batch.early_failures) + len(batch.deletes),
                "deletes": len(batch.deletes),
                "rows": applied.rows, "failed": failed, "skipped": batch.skipped, "duplicates": applied.duplicates,
                "audio_seconds": round(outcome.audio_seconds, 3), "rtf": round(rtf, 4) if rtf is not None else None,
                "timings": timings,
                "offsets": {f"{tp.partition}": r for tp, r in batch.ranges.items()},  # [first, last] handled
                # next offset per partition that finalized files hold (committed, or provable after a crash)
                "committed": {f"{tp.partition}": self.ledger.next_offset(tp.topic, tp.partition) for tp in batch.ranges},
            }},
        )


async def _within(deadline: float, step: Awaitable[Any], what: str) -> Any:
    """One step of the revoke, in what is left of its budget; past it, a `FatalError`."""
    try:
        return await asyncio.wait_for(step, timeout=max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        raise FatalError(f"a revoke waited past its {REVOKE_BUDGET_SECONDS}s budget for {what}") from None


def _fmt(tps: set[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(tps)) or "none"


async def run_consumer(settings: Settings, models: Models | None = None, handle_signals: bool = False) -> RunStats:
    app = StreamConsumer(settings, models)
    if handle_signals:
        app.install_signal_handlers()
    return await app.run()
