"""Offset recovery as a property: for any log and any interleaving of fetches, micro-batches, rolls,
failed commits, rebalances, rewinds, crashes (at every crash point of the commit path) and a second
consumer process sharing the output directory, every directory's finalized Parquet files hold each
offset's row at most once and their footers never overlap; after a final drain the last directory
holds exactly the offsets it should (all of them, or from a rewind point on), each as the first
publication of its object version, the group's committed offsets are at the end of the log, and
summary.json equals the aggregates recomputed from the rows.

Pure: no broker. The partitioned log, the group (generations, assignments, committed offsets) and
the part of AIOKafkaConsumer the consumer uses live in memory. Each process starts with the real
start-up recovery (`pipeline.ledger.recover`); the real `StreamConsumer` positions the partitions -
`on_assigned` and `on_revoked` (so `Rewind`, `plan_starts` and `FetchGate.assign`/`revoke`),
`_admit` for every getmany result (`FetchGate.stale`/`resume_points`/`accept`) - and the real
Batcher, OutputCommitter, RollingParquetWriter, OutputLedger and summary code write to a temporary
directory. As aiokafka does, a getmany is fetched in one gate generation and may return after an
assignment change, and the group's positions start at the committed offset before `on_assigned`
runs. A crash is a `Crash` raised from a crash point instead of SIGKILL, after which nothing of the
old process is used again; a paused process is one whose steps stop while the group hands its
partitions to another process.
"""

from __future__ import annotations

import asyncio
import tempfile
import threading
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from unittest import mock

import numpy as np
import orjson
import pytest
from aiokafka.errors import CommitFailedError, IllegalStateError
from aiokafka.structs import ConsumerRecord, OffsetAndTimestamp, TopicPartition
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import consumer.committer
import pipeline.parquet
import pipeline.durable
from consumer.app import StreamConsumer
from consumer.batcher import Batcher
from consumer.committer import OutputCommitter
from consumer.crash_guard import CrashGuard
from pipeline.batch import BatchOutcome
from pipeline.config import Settings
from pipeline.errors import Fenced
from pipeline.events import ObjectEvent
from pipeline.ledger import OutputLedger, recover
from pipeline.output import LocalOutput
from pipeline.parquet import RollingParquetWriter
from tests.output_files import finalized_files, inprogress_files, read_footer
from pipeline.records import TranscribedAudio
from tests.consumer_process import assert_summary_matches_files, footer_offsets, output_rows

TOPIC = "events"
BASE_MS = 1_700_000_000_000  # offset k of every partition is published at BASE_MS + 1000 * k
FETCH = 3  # records per partition of a getmany the steps do not size
CRASH_POINTS = [None, "before_finalize", "after_rename", "mid_summary_write", "after_summary", "after_dead_letters", "after_commit"]
IDENTITY = {"topic": TOPIC, "group": "metavoice-consumer", "whisper_model": "fake", "tokenizer": "synthetic"}


class Crash(Exception):
    """The process died here (SIGKILL in production)."""


# --- the world: a partitioned log, a consumer group, and what aiokafka offers the consumer ---------
def build_log(spec: list[list[tuple[str, int]]]) -> dict[int, list[ConsumerRecord]]:
    """Per partition, records from (kind, n): "ok" a new object version, "repeat" the n-th earlier
    version of the partition published again, "poison" a message that is not JSON."""
    log: dict[int, list[ConsumerRecord]] = {}
    for p, kinds in enumerate(spec):
        records, versions = [], []
        for offset, (kind, n) in enumerate(kinds):
            if kind == "poison":
                value = b"{not json"
            else:
                if kind == "repeat" and versions:
                    event = versions[n % len(versions)]
                else:
                    event = ObjectEvent(bucket="b", key=f"p{p}/o{offset}.flac", etag=f"{p:02d}{offset:030d}")
                    versions.append(event)
                value = event.to_json()
            records.append(ConsumerRecord(TOPIC, p, offset, BASE_MS + 1000 * offset, 0, None, value, None, 0, len(value), ()))
        log[p] = records
    return log


def between(k: int) -> str:
    """A --from-timestamp between offsets k-1 and k of every partition."""
    return datetime.fromtimestamp((BASE_MS + 1000 * k - 500) / 1000, timezone.utc).isoformat()


class Group:
    """The broker's side of the consumer group: generations, who holds what, committed offsets."""

    def __init__(self, log: dict[int, list[ConsumerRecord]]) -> None:
        self.log = log
        self.tps = {TopicPartition(TOPIC, p) for p in log}
        self.generation = 0
        self.committed: dict[TopicPartition, int] = {}
        self.fail_next_commit = False
        self._since_rewind: dict[TopicPartition, int] = {}

    def assign(self, member: Consumer) -> None:
        """A rebalance that gives `member` every partition (and any other member nothing)."""
        self.generation += 1
        member.joined(self.generation, self.tps)

    def commit(self, member: Consumer, offsets) -> None:
        if self.fail_next_commit:
            self.fail_next_commit = False
            raise CommitFailedError("the group rebalanced")
        if member.generation != self.generation:
            raise CommitFailedError("this member's generation is over: its partitions have moved on")
        for tp, meta in offsets.items():
            # only a rewind may move a committed offset back
            assert meta.offset >= self._since_rewind.get(tp, 0), "a commit moved backwards"
            self._since_rewind[tp] = self.committed[tp] = meta.offset

    def rewound(self) -> None:
        self._since_rewind.clear()


class Consumer:
    """What StreamConsumer and OutputCommitter use of AIOKafkaConsumer, over the in-memory group."""

    def __init__(self, group: Group) -> None:
        self.group = group
        self.generation = 0
        self._assigned: set[TopicPartition] = set()
        self._position: dict[TopicPartition, int] = {}

    def joined(self, generation: int, tps: set[TopicPartition]) -> None:
        # aiokafka fetches as soon as it holds an assignment, from the committed offset (else
        # auto_offset_reset="earliest"), before on_partitions_assigned has positioned anything
        self.generation, self._assigned = generation, set(tps)
        self._position = {tp: self.group.committed.get(tp, 0) for tp in tps}

    def revoked(self) -> None:
        self._assigned, self._position = set(), {}

    def assignment(self) -> set[TopicPartition]:
        return set(self._assigned)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        if tp not in self._assigned:
            raise IllegalStateError(f"{tp} is not assigned")
        self._position[tp] = offset

    async def seek_to_beginning(self, *tps: TopicPartition) -> None:
        for tp in tps:
            self.seek(tp, 0)

    async def seek_to_end(self, *tps: TopicPartition) -> None:
        for tp in tps:
            self.seek(tp, len(self.group.log[tp.partition]))

    async def position(self, tp: TopicPartition) -> int:
        return self._position[tp]

    async def committed(self, tp: TopicPartition) -> int | None:
        return self.group.committed.get(tp)

    async def beginning_offsets(self, tps) -> dict[TopicPartition, int]:
        return {tp: 0 for tp in tps}

    def partitions_for_topic(self, topic: str) -> set[int]:
        return {tp.partition for tp in self.group.tps if tp.topic == topic}

    async def offsets_for_times(self, times: dict[TopicPartition, int]) -> dict[TopicPartition, OffsetAndTimestamp | None]:
        found: dict[TopicPartition, OffsetAndTimestamp | None] = {}
        for tp, ts in times.items():
            first = next((r for r in self.group.log[tp.partition] if r.timestamp >= ts), None)
            found[tp] = None if first is None else OffsetAndTimestamp(first.offset, first.timestamp)
        return found

    async def commit(self, offsets) -> None:
        self.group.commit(self, offsets)

    def fetch(self, wanted: dict[TopicPartition, int]) -> dict[TopicPartition, list[ConsumerRecord]]:
        """What a getmany starting now will return: up to n records of each wanted partition, from its position."""
        got = {}
        for tp, n in wanted.items():
            if tp in self._assigned:
                pos = self._position[tp]
                if records := self.group.log[tp.partition][pos : pos + n]:
                    got[tp] = records
        return got

    def returned(self, records: dict[TopicPartition, list[ConsumerRecord]]) -> None:
        """The getmany returns: positions move past what it returns, whatever was sought meanwhile."""
        for tp, recs in records.items():
            if tp in self._assigned:
                self._position[tp] = recs[-1].offset + 1


class DeadLetters:
    """The DLQ as a list: what DeadLetterWriter does, minus the broker (the list is its topic)."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, int]] = []

    def encode(self, f) -> tuple[bytes, bytes]:
        return f"{f.item.source.partition}:{f.item.source.offset}".encode(), b"{}"

    async def marks(self) -> dict[int, int]:
        return {0: len(self.sent)}

    async def send_pending(self, pending) -> None:
        self.sent.extend((d.partition, d.offset) for d in pending)

    async def resend_missing(self, footers) -> int:
        missing = [d for f in footers for d in f.dead_letters if (d.partition, d.offset) not in self.sent]
        await self.send_pending(missing)
        return len(missing)


def process(batch) -> BatchOutcome:
    """Stands in for download/decode/transcribe/tokenize: one row per work item."""
    rows = [
        TranscribedAudio(
            id=it.event.key, bucket=it.event.bucket, etag=it.event.etag or "", size_bytes=1, event_time=None,
            duration_sec=1.0 + it.source.offset, sampling_rate=16_000, channels=1, transcription="x" * (it.source.offset % 5),
            language="en", segments=[], tokens=np.zeros((2, 1 + it.source.offset % 3), np.int16), tokenizer="synthetic",
            token_frame_rate=75.0, whisper_model="fake", kafka_topic=it.source.topic, kafka_partition=it.source.partition,
            kafka_offset=it.source.offset, processed_at=datetime.now(timezone.utc),
        )
        for it in batch.items
    ]
    return BatchOutcome(rows=rows)


class HeldFinalize:
    """Holds the next finalize at its delay point (before the fencing check and the rename) until released."""

    def __init__(self) -> None:
        self.armed = False
        self.reached = threading.Event()
        self._go = threading.Event()

    def arm(self) -> None:
        self.armed = True
        self.reached.clear()
        self._go.clear()

    def release(self) -> None:
        self._go.set()

    def delay_point(self, name: str) -> None:  # runs in the writer's thread
        if name == "finalize" and self.armed:
            self.armed = False
            self.reached.set()
            self._go.wait(10)


# --- one consumer process ------------------------------------------------------------------------
@dataclass
class Deployment:
    """How every consumer process starts: its output directory and rewind flags (kept across restarts)."""

    output_dir: Path
    from_beginning: bool = False
    from_timestamp: str | None = None


class Process:
    """StreamConsumer.run's start-up; then the real StreamConsumer's rebalance callbacks and fetch
    admission, the real Batcher and OutputCommitter. The stages' loops are the steps' order."""

    def __init__(self, deployment: Deployment, group: Group, dlq: DeadLetters, roll_max_rows: int) -> None:
        out = deployment.output_dir
        settings = Settings(output_dir=out, topic=TOPIC, from_beginning=deployment.from_beginning,
                            from_timestamp=deployment.from_timestamp, prefect_enabled=False)
        self.app = StreamConsumer(settings, models=object())  # type: ignore[arg-type]
        recover(self.app.ledger, IDENTITY)  # what run() does first: manifest, dead writers' files, ledger, summary
        self.app.guard = CrashGuard(out / "_attempts", fsync=False)  # inert here: no batch is ever begun, every verdict is "ok"
        self.group = group
        self.consumer = Consumer(group)
        self.writer = RollingParquetWriter(out, roll_max_rows, roll_max_seconds=3600)
        self.app.consumer = self.consumer  # type: ignore[assignment]
        self.app.committer = OutputCommitter(self.consumer, self.writer, self.app.ledger, dlq)  # type: ignore[arg-type]
        self.app.batcher = Batcher(self.app.ledger, max_events=1000, max_bytes=1 << 30, linger_ms=0)
        self.in_flight: tuple[int, dict] | None = None  # a getmany: the gate generation it started in, what it returns

    async def join(self, fetch_early: bool = False) -> None:
        """The group gives this process every partition; aiokafka may fetch before on_assigned runs."""
        self.group.assign(self.consumer)
        if fetch_early and self.in_flight is None:
            self.getmany(FETCH)
        await self.app.on_assigned(self.consumer.assignment())

    async def rebalance(self, fetch_early: bool) -> None:
        """An eager rebalance: every partition revoked, then given back (a getmany may be in flight)."""
        await self.app.on_revoked(self.consumer.assignment())
        self.consumer.revoked()
        await self.join(fetch_early)

    def getmany(self, n: int, partitions: set[int] | None = None) -> None:
        """The fetch loop calls getmany: `fetched_in` is read first, the records come back later."""
        wanted = {tp: n for tp in self.consumer.assignment() if partitions is None or tp.partition in partitions}
        self.in_flight = (self.app.gate.generation, self.consumer.fetch(wanted))

    async def fetch(self, n: int, partitions: set[int] | None = None) -> None:
        await self.deliver()  # one getmany at a time
        self.getmany(n, partitions)

    async def deliver(self) -> int:
        """The getmany returns; the fetch loop admits its records (StreamConsumer._admit) into the batcher."""
        if self.in_flight is None:
            return 0
        (fetched_in, records), self.in_flight = self.in_flight, None
        self.consumer.returned(records)
        async with self.app._fetch_lock:
            for tp_records in self.app._admit(fetched_in, records).values():
                for rec in tp_records:  # what _batch_record does when the crash guard says "ok"
                    self.app.batcher.add(rec)  # type: ignore[union-attr]
        return sum(map(len, records.values()))

    async def apply(self) -> None:
        """The open micro-batch is processed and applied by the committer (which rolls a full file)."""
        batch = self.app.batcher.take()  # type: ignore[union-attr]
        if batch is not None and batch.records:
            await self.app.committer.apply(batch, process(batch.micro_batch()))  # type: ignore[union-attr]

    async def roll(self) -> None:
        await self.app.committer.finalize_and_commit()  # type: ignore[union-attr]

    def open_offsets(self) -> dict[TopicPartition, tuple[int, int]]:
        f = self.writer._open  # the open file's offset ranges, as its footer would record them
        return {} if f is None else {TopicPartition(t, p): (r.first, r.last) for (t, p), r in f.ranges.items()}

    async def stop(self) -> None:
        """SIGTERM: the getmany in flight returns, what was fetched is applied, the file finalized and committed."""
        await self.deliver()
        await self.apply()
        await self.roll()
        self.leave()

    def leave(self) -> None:
        self.app.guard.abandon()  # type: ignore[union-attr]
        self.writer.close()
        self.consumer.revoked()

    def fail(self, exc: BaseException) -> None:
        """A fatal error (Fenced): StreamConsumer.fail (commit nothing more), then the exit stack closes."""
        self.app.fail(exc)
        self.leave()

    def die(self) -> None:
        """SIGKILL: the in-progress file stays on disk, the writer's liveness lock is released."""
        self.writer._liveness.close()  # what the kernel does to a dead process's flock


# --- the steps --------------------------------------------------------------------------------------
class World:
    """The group, the dead letters, the deployment and its current process; one method per step."""

    def __init__(self, tmp: Path, log: dict[int, list[ConsumerRecord]], roll_max_rows: int) -> None:
        self.tmp, self.log, self.roll_max_rows = tmp, log, roll_max_rows
        self.group = Group(log)
        self.dlq = DeadLetters()
        self.deployment = Deployment(tmp / "out0")
        self.dirs = [self.deployment.output_dir]
        # the offsets the current directory must hold once the log is drained: all, unless rewound
        self.expected = {p: set(range(len(records))) for p, records in log.items()}
        self.held = HeldFinalize()
        self.crash_at: str | None = None
        self.fenced: list[str] = []  # who got Fenced: "paused" (the process that lost its partitions) or "new owner"
        self.proc: Process

    def crash_point(self, name: str) -> None:
        if self.crash_at == name:
            raise Crash(name)

    async def start(self, fetch_early: bool = False) -> Process:
        proc = Process(self.deployment, self.group, self.dlq, self.roll_max_rows)
        await proc.join(fetch_early)
        return proc

    async def step(self, s: tuple) -> None:
        proc = self.proc
        if s[0] == "batch":  # the common path: getmany, admit, process, apply
            await proc.fetch(s[1], set(s[2]))
            await proc.deliver()
            await proc.apply()
        elif s[0] == "fetch":  # a getmany starts; it returns at the next fetch, deliver or stop
            await proc.fetch(s[1], set(s[2]))
        elif s[0] == "deliver":
            await proc.deliver()
        elif s[0] == "apply":
            await proc.apply()
        elif s[0] == "roll":
            await proc.roll()
        elif s[0] == "commit_fails":
            self.group.fail_next_commit = True
        elif s[0] == "rebalance":
            await proc.rebalance(s[1])
        elif s[0] == "crash":
            await self.crash(s[1], s[2])
        elif s[0] == "rewind":
            await self.rewind(*s[1:])
        elif s[0] == "takeover":
            await self.takeover(*s[1:])
        elif s[0] == "handover_during_roll":
            await self.hand_over_during_roll(s[1])
        else:
            raise AssertionError(s)

    async def crash(self, point: str | None, fetch_early: bool) -> None:
        """The process dies (in a finalize, at `point`), and a new one starts on the same directory."""
        self.crash_at = point
        try:
            if point is not None:
                await self.proc.roll()
        except Crash:
            pass
        finally:
            self.crash_at = None
        self.proc.die()
        self.proc = await self.start(fetch_early)

    async def rewind(self, mode: str, fresh: bool, k: int, fetch_early: bool) -> None:
        self.rewound = True  # a rewind replays on purpose: its dead letters may repeat
        """The operator stops the consumer and starts it with --from-beginning or --from-timestamp
        (between offsets k-1 and k), into the same output directory or a fresh one."""
        await self.proc.stop()
        out = self.deployment.output_dir
        if fresh:
            out = self.tmp / f"out{len(self.dirs)}"
            self.dirs.append(out)
            held = OutputLedger(out)
        else:
            held = OutputLedger(out)
            held.refresh()
        self.deployment = Deployment(out, from_beginning=mode == "beginning", from_timestamp=between(k) if mode == "time" else None)
        for p, records in self.log.items():
            # the rewind point (a time with no record at/after it: the end), never before what files hold
            point = 0 if mode == "beginning" else min(k, len(records))
            held_to = held.next_offset(TOPIC, p)
            kept = {o for o in self.expected[p] if held_to is not None and o < held_to}
            self.expected[p] = kept | set(range(max(point, held_to or 0), len(records)))
        self.group.rewound()
        self.proc = await self.start(fetch_early)

    async def takeover(self, paused_finalizes_first: bool, fetch_early: bool) -> None:
        """A pauses with a file open, past its session timeout: the group gives every partition to
        B, a second process on the same directory, without A's on_revoked. Then A's roll timer fires.
        Either B first works through A's open offsets and rolls, and A must be fenced; or A finalizes
        first, and B's finalize must be fenced instead (B then fails and is restarted)."""
        a = self.proc
        paused = a.open_offsets()
        b = await self.start(fetch_early)
        if paused_finalizes_first:
            await b.fetch(FETCH)
            await b.deliver()
            await b.apply()
        else:
            for _ in range(20):
                behind = {tp.partition for tp, (_, last) in paused.items() if (b.app.gate.next_offset(tp) or 0) <= last}
                if not behind:
                    break
                await b.fetch(FETCH, behind)
                await b.deliver()
                await b.apply()
            await b.roll()
        # A wakes up: its roll timer finalizes the open file
        a_fenced = await self.roll_or_fenced(a, "paused")
        if paused and not paused_finalizes_first:
            assert a_fenced, "the paused process finalized offsets whose files its partitions' new owner had finalized"
        if not a_fenced:  # then it learns its partitions are gone, and leaves the group
            await a.app.on_revoked(a.consumer.assignment())
            a.leave()
        if await self.roll_or_fenced(b, "new owner"):
            b = await self.start(fetch_early)
        self.proc = b

    async def roll_or_fenced(self, proc: Process, who: str) -> bool:
        """Finalize `proc`'s open file: refused (Fenced, the file discarded, nothing committed) exactly
        when another writer's finalized file already holds one of its offsets."""
        open_file = proc.writer._open.path if proc.writer._open is not None else None
        taken = finalized_by_others(proc.writer.output.root, proc.open_offsets(), proc.writer.writer_id)
        committed = dict(self.group.committed)
        try:
            await proc.roll()
        except Fenced as exc:
            assert taken, f"{who}: fenced, yet no other writer holds its offsets"
            assert open_file is not None and not open_file.exists(), f"{who}: a fenced file was left on disk"
            assert self.group.committed == committed, f"{who}: a fenced process committed offsets"
            self.fenced.append(who)
            proc.fail(exc)
            return True
        assert not taken, f"{who}: finalized offsets another writer's file holds: {taken}"
        return False

    async def hand_over_during_roll(self, fetch_early: bool) -> None:
        """A's roll timer fires; while that finalize is before its rename, the group revokes A's
        partitions, and hands them to B (a second process) as soon as A's on_revoked returns."""
        a = self.proc
        roll = None
        if a.writer.has_open_file:
            self.held.arm()
            roll = asyncio.create_task(a.roll())
            assert await asyncio.to_thread(self.held.reached.wait, 10)
        revoke = asyncio.create_task(a.app.on_revoked(a.consumer.assignment()))
        for _ in range(20):
            await asyncio.sleep(0)
        b = None
        # A revoke that returned before the rename would let B plan from files that lack A's: B
        # would read those offsets again, and its finalize be fenced (an unexpected Fenced fails).
        if revoke.done():  # the group moves on now; A's process lives on (its liveness lock held)
            a.consumer.revoked()
            b = await self.start(fetch_early)
        self.held.release()
        if roll is not None:
            await roll
        await revoke
        if b is None:
            a.consumer.revoked()
            b = await self.start(fetch_early)
        a.leave()
        self.proc = b

    async def finish(self) -> None:
        """Drain the log, stop, and start once more: nothing left to do, a lost commit caught up."""
        self.group.fail_next_commit = False  # a healthy broker from here on
        proc = self.proc
        for _ in range(10):
            await proc.fetch(1000)
            returned = await proc.deliver()
            await proc.apply()
            if not returned:
                break
        await proc.stop()
        again = await self.start()
        ends = {p: len(records) for p, records in self.log.items()}
        assert {tp.partition: again.app.gate.next_offset(tp) for tp in self.group.tps} == ends
        again.leave()


def finalized_by_others(output_dir: Path, offsets: dict[TopicPartition, tuple[int, int]], writer_id: str) -> list[str]:
    """What another writer committed of `offsets`: its files' footers, and the table commits that
    carry no file of `writer_id` - a micro-batch that made no row (duplicates only) advances its
    partitions in a commit without a file, and that fences a late writer just the same."""
    taken = []
    for path in finalized_files(output_dir):
        if f"-{writer_id}-" in path.name:
            continue
        for r in read_footer(path).offsets:
            first, last = offsets.get(TopicPartition(r.topic, r.partition), (0, -1))
            if r.first <= last and first <= r.last:
                taken.append(f"{path.name} holds [{r.partition}] {r.first}-{r.last}")
    table = LocalOutput(output_dir).table
    if table.refresh() is not None:
        for c in table.commits(None):
            if c.files:
                continue  # a file's commit: its footer was read above
            for r in c.offsets:
                first, last = offsets.get(TopicPartition(r.topic, r.partition), (0, -1))
                if r.first <= last and first <= r.last:
                    taken.append(f"a commit without a file holds [{r.partition}] {r.first}-{r.last}")
    return taken


def simulate(spec: list[list[tuple[str, int]]], steps: list[tuple], roll_max_rows: int) -> World:
    log = build_log(spec)
    with tempfile.TemporaryDirectory() as tmp:
        world = World(Path(tmp), log, roll_max_rows)

        async def run() -> None:
            world.proc = await world.start()
            for s in steps:
                await world.step(s)
            await world.finish()

        with mock.patch.object(consumer.committer, "crash_point", world.crash_point), \
                mock.patch.object(pipeline.durable, "crash_point", world.crash_point), \
                mock.patch.object(pipeline.parquet, "delay_point", world.held.delay_point):
            asyncio.run(run())
        check(world)
    return world


def check(world: World) -> None:
    log = world.log
    for d in world.dirs:  # in every directory ever written, even one left by a rewind
        at = Counter((r["kafka_partition"], r["kafka_offset"]) for r in output_rows(d))
        assert not {k: n for k, n in at.items() if n > 1}, f"{d.name}: an offset became two rows"
        for p, spans in footer_offsets(d).items():
            for (_, last, a), (first, _, b) in zip(spans, spans[1:]):
                assert last < first, f"{d.name}: footers of {a} and {b} overlap in partition {p}"
        assert not inprogress_files(d), f"{d.name}: in-progress files left behind"

    out = world.deployment.output_dir
    expected_rows, poison = set(), set()
    for p, records in log.items():
        seen = set()
        for r in records:
            if r.offset not in world.expected[p]:
                continue
            if r.value.startswith(b"{not"):
                poison.add((p, r.offset))
                continue
            ev = orjson.loads(r.value)
            version = (ev["bucket"], ev["object"]["key"], ev["object"]["eTag"])
            if version not in seen:
                seen.add(version)
                expected_rows.add((p, r.offset))
    rows = output_rows(out)
    assert {(r["kafka_partition"], r["kafka_offset"]) for r in rows} == expected_rows, \
        "rows should be exactly the first publication of each object version the directory should hold"
    assert len({(r["bucket"], r["id"], r["etag"]) for r in rows}) == len(rows)

    spans = footer_offsets(out)
    for p, records in log.items():
        held = set().union(*(range(first, last + 1) for first, last, _ in spans.get(p, [])))
        assert held == world.expected[p], f"partition {p}: footers hold {sorted(held)}, expected {sorted(world.expected[p])}"
        end = len(records)
        if end and end - 1 in world.expected[p]:  # a time rewind with no record after it never commits
            assert world.group.committed.get(TopicPartition(TOPIC, p)) == end, f"partition {p}: committed offset is not the log end"
    if finalized_files(out):
        summary = assert_summary_matches_files(out)["aggregates"]
        assert sum(summary.errors.values()) == len(poison), "each poison message is counted once in the files"
    # dead-lettered exactly once (they travel in the file's footer); only a rewind replays them
    if not getattr(world, "rewound", False):
        assert len(world.dlq.sent) == len(set(world.dlq.sent)), "a dead letter was sent twice"
    assert poison <= set(world.dlq.sent) <= {(p, r.offset) for p, rs in log.items() for r in rs if r.value.startswith(b"{not")}


# --- the property --------------------------------------------------------------------------------------
record = st.tuples(st.sampled_from(["ok", "ok", "ok", "repeat", "poison"]), st.integers(0, 5))
partitions = st.lists(st.integers(0, 2), min_size=1, max_size=3, unique=True)
batch = st.tuples(st.just("batch"), st.integers(1, 3), partitions)
crash = st.tuples(st.just("crash"), st.sampled_from(CRASH_POINTS), st.booleans())
rebalance = st.tuples(st.just("rebalance"), st.booleans())
rewind = st.tuples(st.just("rewind"), st.sampled_from(["beginning", "time"]), st.booleans(), st.integers(0, 9), st.booleans())
takeover = st.tuples(st.just("takeover"), st.booleans(), st.booleans())
handover = st.tuples(st.just("handover_during_roll"), st.booleans())
step = st.one_of(
    batch,
    st.tuples(st.just("fetch"), st.integers(1, 3), partitions),
    st.tuples(st.just("deliver")),
    st.tuples(st.just("apply")),
    st.tuples(st.just("roll")),
    st.tuples(st.just("commit_fails")),
    rebalance,
    crash,
    rewind,
    takeover,
    handover,
)
# the moments that matter most come with a file open: a batch, then one of them (one_of and
# sampled_from draw their first choices most often)
after_a_batch = st.tuples(batch, st.one_of(handover, takeover, rewind, crash, rebalance))
steps = st.lists(st.one_of(after_a_batch.map(list), step.map(lambda s: [s])), min_size=3, max_size=15).map(lambda parts: sum(parts, []))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    spec=st.lists(st.lists(record, max_size=10), min_size=1, max_size=3),
    steps=steps,
    roll_max_rows=st.sampled_from([5, 10, 2, 1]),
)
def test_any_interleaving_of_fetches_rebalances_rewinds_crashes_and_a_second_writer_keeps_each_offset_exactly_once(
    spec, steps, roll_max_rows
):
    simulate(spec, steps, roll_max_rows)


# --- the same world, the scenarios that broke it -----------------------------------------------------
OK = ("ok", 0)


@pytest.mark.parametrize("mode, k", [("beginning", 0), ("time", 1)])
def test_a_rewind_below_the_committed_offset_wins_over_records_fetched_from_that_offset(mode, k):
    """Records fetched from the committed offset (3) before on_assigned set the rewind point return
    after it: they are dropped and fetched again from the rewind point, leaving no gap."""
    steps = [("batch", 3, [0]), ("roll",), ("rewind", mode, True, k, True)]
    world = simulate([[OK] * 6], steps, roll_max_rows=10)
    assert world.expected[0] == set(range(k, 6))


def test_a_paused_process_whose_partitions_moved_on_is_fenced_and_commits_nothing():
    steps = [("batch", 2, [0, 1]), ("roll",), ("batch", 2, [0, 1]), ("takeover", False, True)]
    world = simulate([[OK] * 6, [OK] * 5], steps, roll_max_rows=10)
    assert world.fenced == ["paused"]


def test_a_paused_process_that_finalizes_first_fences_the_new_owner_which_resumes_after_its_file():
    steps = [("batch", 2, [0]), ("takeover", True, False)]
    world = simulate([[OK] * 6], steps, roll_max_rows=10)
    assert world.fenced == ["new owner"]


def test_a_revoke_during_a_timer_driven_finalize_hands_over_only_after_the_rename_and_commit():
    steps = [("batch", 2, [0]), ("handover_during_roll", False), ("batch", 3, [0])]
    world = simulate([[OK] * 6], steps, roll_max_rows=10)
    assert world.fenced == []
