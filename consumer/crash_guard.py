"""Crash-loop breaker: a record that keeps killing the process is dead-lettered, not retried forever.

Some records kill the process where no `except` can see it: the kernel's OOM killer, a crash
in native code (libsndfile, CTranslate2, a CUDA kernel). The restarted consumer resumes at the
same offsets, meets the same record and dies again: the stream is stopped for good. So before
a batch's heavy stages the consumer writes down which offsets are in flight (`begin`), and
clears them once the batch's outcome is applied (`end`). Offsets still marked when a partition
is loaded (`load`, at start-up and on every assignment) were in flight when a process died:
they are *suspects*, each with the crashes it was present at.

Markers live where a partition's next owner looks after a crash (`Output.attempts_dir`): in a
local output directory, which every consumer of the group shares, `<output>/_attempts/`; with an
object-store output, in the local spool (a restart on the same machine or volume sees them; a
consumer on another machine does not - see docs/guarantees.md): `<dir>/<topic>-<partition>.json`,
one small file per source partition, replaced atomically (write beside, fsync, rename, fsync
the directory), written only by the guard that loaded the partition last (its `owner`):

    {"topic": "events", "partition": 3, "owner": "5f0c2a9e1b7d",
     "in_flight": {"17": {"offsets": [40, 41, 42], "alone": false}},
     "suspects": {"41": {"crashes": 2, "alone": 1}}}

The rule
--------
- A *crash* of an offset: the process died while that offset was in flight. The crash is
  *alone* when that offset was the only one in flight in the whole process (a batch of one
  record, no other batch begun and not ended), so nothing else can have caused it.
- Per suspect: `crashes`, every crash since it was last processed to the end, and `alone`, the
  crashes alone *in a row* up to the last one (a crash in company sets it back to 0).
- `verdict(topic, partition, offset)`:
    "ok"          not a suspect: batch it as usual;
    "isolate"     a suspect: process it alone (a micro-batch of its own, nothing else in
                  flight), so that a crash now is evidence against it and not against a
                  batch-mate;
    "crash_loop"  `crashes >= max_attempts` and `alone >= max(1, max_attempts - 1)`: it
                  killed the process `max_attempts` times in a row, at least the last
                  `max_attempts - 1` of them (and always at least once) with nothing else in
                  flight. Dead-letter it as `CrashLoop` without processing it.
- Innocent batch-mates: a crash in company only makes an offset a suspect, to be isolated; it
  never adds to `alone`, which CrashLoop requires. Isolated, an innocent record is processed
  to the end and `end` clears it. So `CrashLoop` only ever hits a record that itself crashed
  the process while alone - with the default 3: a culprit first met in a batch crashes once
  there and twice alone, and is dead-lettered on the fourth start; it is never tried a fourth
  time.
- `end(batch)` clears the batch's offsets and every suspect of its partitions at or below the
  batch's highest offset there: the commit path applies outcomes in offset order, so those were
  applied too (a row, a dead letter, a skip or a duplicate).
- `abandon()`: the process stops for a reason it knows (an exception, a drain past its limit):
  what is in flight is forgotten, not blamed. Only a death that runs no Python code (SIGKILL,
  OOM kill, a native crash) leaves markers behind.

Limits: `alone` is judged per guard, so run one guard per process (one consumer per process,
as deployed). A kill from outside (a node drain, an OOM caused by a neighbour) counts like any
crash, but it must strike the same record alone `max_attempts - 1` times in a row to dead-letter
it. An unreadable marker file is logged and treated as empty: the crash evidence is lost, the
stream is not stopped.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Collection, Hashable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import orjson

from pipeline.errors import CrashLoop
from pipeline.durable import fsync_dir

log = logging.getLogger(__name__)

Verdict = Literal["ok", "isolate", "crash_loop"]
Partition = tuple[str, int]  # (topic, partition); aiokafka's TopicPartition is one


@dataclass
class Suspect:
    crashes: int = 0  # crashes it was in flight at, since it was last processed to the end
    alone: int = 0  # of these, the crashes alone in a row up to the last one


@dataclass
class _InFlight:
    offsets: list[int]
    alone: bool


@dataclass
class _PartitionState:
    topic: str
    partition: int
    in_flight: dict[str, _InFlight] = field(default_factory=dict)  # batch id -> what it processes
    suspects: dict[int, Suspect] = field(default_factory=dict)

    def to_json(self, owner: str) -> bytes:
        return orjson.dumps({
            "topic": self.topic,
            "partition": self.partition,
            "owner": owner,
            "in_flight": {b: {"offsets": f.offsets, "alone": f.alone} for b, f in self.in_flight.items()},
            "suspects": {str(o): {"crashes": s.crashes, "alone": s.alone} for o, s in sorted(self.suspects.items())},
        })


class CrashGuard:
    """Attempt markers for the partitions this process owns; thread-safe (one lock)."""

    def __init__(self, directory: Path | str, max_attempts: int = 3, *, fsync: bool = True) -> None:
        """`directory`: where the markers live (`Output.attempts_dir`)."""
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.dir = Path(directory)
        self.max_attempts = max_attempts
        self.fsync = fsync  # off: survives a process death but not a machine crash
        self.owner = uuid.uuid4().hex[:12]
        self._lock = threading.Lock()
        self._parts: dict[Partition, _PartitionState] = {}
        self._batches: dict[str, dict[Partition, list[int]]] = {}  # batch id -> every offset it accounts for
        self._alone: str | None = None  # the batch in flight alone, if any
        self._lost: set[Partition] = set()  # taken over by another consumer: never written again

    # --- partitions come and go ----------------------------------------------------------------
    def load(
        self, partitions: Collection[Partition], resume_at: Mapping[Partition, int] | None = None
    ) -> dict[Partition, dict[int, Suspect]]:
        """Take over `partitions` (at start-up, on assignment): what their markers still hold in
        flight was in flight when a process died - each such offset gains a crash. Suspects
        below `resume_at` (where a partition resumes: the files hold everything before) are
        dropped. Returns the suspects per partition, for the log."""
        with self._lock:
            for tp in partitions:
                self._lost.discard(_tp(tp))
                self._load(_tp(tp), (resume_at or {}).get(tp))
            claimed = {_tp(tp) for tp in partitions}
            self._write(claimed, claim=claimed)
            return {_tp(tp): dict(self._parts[_tp(tp)].suspects) for tp in partitions if _tp(tp) in self._parts}

    def forget(self, partitions: Collection[Partition]) -> None:
        """These partitions were revoked (after the drain): stop tracking them. Anything still in
        flight on them is cleared, not blamed - this process is alive."""
        with self._lock:
            dirty = set()
            for tp in map(_tp, partitions):
                part = self._parts.get(tp)
                if part is not None and part.in_flight:
                    part.in_flight.clear()
                    dirty.add(tp)
            self._write(dirty)
            for tp in map(_tp, partitions):
                self._parts.pop(tp, None)
                self._lost.discard(tp)

    # --- the verdict on one record ----------------------------------------------------------------
    def verdict(self, topic: str, partition: int, offset: int) -> Verdict:
        """Cheap enough for every record: a partition without suspects answers without the lock
        (which a `begin`/`end` in another thread holds while it fsyncs)."""
        part = self._parts.get((topic, partition))
        if part is not None and not part.suspects:
            return "ok"
        with self._lock:
            return self._verdict(self._part((topic, partition)), offset)

    def suspect(self, topic: str, partition: int, offset: int) -> Suspect | None:
        with self._lock:
            return self._part((topic, partition)).suspects.get(offset)

    def crash_loop_error(self, topic: str, partition: int, offset: int) -> CrashLoop:
        """The error a `crash_loop` record is dead-lettered with."""
        s = self.suspect(topic, partition, offset) or Suspect()
        return CrashLoop(
            f"{topic}[{partition}]@{offset} was in flight each of the last {s.crashes} times the consumer "
            f"died (OOM kill or native crash), {s.alone} of them alone; dead-lettered without processing "
            f"it again (max_attempts={self.max_attempts})"
        )

    # --- a batch's lifetime ------------------------------------------------------------------------
    def begin(self, batch_id: Hashable, offsets: Mapping[Partition, Collection[int]]) -> bool:
        """Before the heavy stages: these offsets are in flight, durably. Pass the offsets of the
        records the batch processes; offsets whose verdict is `crash_loop` may be passed too -
        they are dead-lettered, not processed, so they are never marked in flight (`end` clears
        them). Returns whether the batch is alone (what a crash now would prove)."""
        bid = str(batch_id)
        with self._lock:
            if bid in self._batches:
                raise ValueError(f"batch {bid} has already begun")
            every = {_tp(tp): sorted(set(offs)) for tp, offs in offsets.items() if offs}
            self._batches[bid] = every
            processed = {}
            for tp, offs in every.items():
                part = self._part(tp)
                keep = [o for o in offs if self._verdict(part, o) != "crash_loop"]
                if keep:
                    processed[tp] = keep
            if not processed:
                return False
            alone = sum(map(len, processed.values())) == 1 and not any(
                p.in_flight for p in self._parts.values()
            )
            dirty = set(processed)
            if self._alone is not None:  # it is no longer alone: a crash from now on proves less
                for tp in self._batches.get(self._alone, {}):
                    entry = self._parts[tp].in_flight.get(self._alone) if tp in self._parts else None
                    if entry is not None:
                        entry.alone = False
                        dirty.add(tp)
                self._alone = None
            for tp, offs in processed.items():
                self._parts[tp].in_flight[bid] = _InFlight(offs, alone)
            if alone:
                self._alone = bid
            self._write(dirty)
            return alone

    def end(self, batch_id: Hashable) -> None:
        """The batch's outcome is applied: its offsets, and every suspect of its partitions at or
        below its highest offset there, are cleared. Unknown ids are ignored (a batch that had
        nothing to process may be ended all the same)."""
        bid = str(batch_id)
        with self._lock:
            every = self._batches.pop(bid, None)
            if every is None:
                return
            if self._alone == bid:
                self._alone = None
            dirty = set()
            for tp, offs in every.items():
                part = self._parts.get(tp)
                if part is None:  # revoked meanwhile
                    continue
                if part.in_flight.pop(bid, None) is not None:
                    dirty.add(tp)
                busy = {o for f in part.in_flight.values() for o in f.offsets}
                done = [o for o in part.suspects if o <= offs[-1] and o not in busy]
                for o in done:
                    del part.suspects[o]
                if done:
                    dirty.add(tp)
            self._write(dirty)

    def abandon(self) -> None:
        """The process stops for a reason it knows: clear what is in flight, blame nobody."""
        with self._lock:
            dirty = {tp for tp, p in self._parts.items() if p.in_flight}
            for tp in dirty:
                self._parts[tp].in_flight.clear()
            self._batches.clear()
            self._alone = None
            try:
                self._write(dirty)
            except OSError as exc:  # a full disk must not mask why the process stops; stale markers
                log.warning("could not clear the crash-loop markers (%s): their offsets will be isolated once", exc)

    # --- inside ------------------------------------------------------------------------------------
    def _verdict(self, part: _PartitionState, offset: int) -> Verdict:
        s = part.suspects.get(offset)
        if s is None:
            return "ok"
        if s.crashes >= self.max_attempts and s.alone >= max(1, self.max_attempts - 1):
            return "crash_loop"
        return "isolate"

    def _part(self, tp: Partition) -> _PartitionState:
        """A partition's state; one used without `load` is loaded now."""
        if tp not in self._parts:
            self._load(tp, None)
            self._write({tp}, claim={tp})
        return self._parts[tp]

    def _load(self, tp: Partition, resume_at: int | None) -> None:
        path = self._path(tp)
        for stale in self.dir.glob(f".{path.name}.*.tmp"):  # a writer that died mid-write
            stale.unlink(missing_ok=True)
        mine = self._parts.get(tp)
        data = _read(path)
        if data.get("owner") == self.owner and mine is not None:
            part = mine  # loaded twice: what is in flight is ours and alive
        else:
            part = _PartitionState(*tp)
            try:
                part.suspects = {
                    int(o): Suspect(int(s.get("crashes", 0)), int(s.get("alone", 0)))
                    for o, s in (data.get("suspects") or {}).items()
                }
                if data.get("owner") != self.owner:  # in flight when its owner died: a crash each
                    for entry in (data.get("in_flight") or {}).values():
                        for o in entry.get("offsets", []):
                            s = part.suspects.setdefault(int(o), Suspect())
                            s.crashes += 1
                            s.alone = s.alone + 1 if entry.get("alone") else 0
            except (AttributeError, TypeError, ValueError) as exc:
                log.error("malformed crash marker %s (%s): starting it afresh", path, exc)
                part = _PartitionState(*tp)
        if resume_at is not None:
            for o in [o for o in part.suspects if o < resume_at]:
                del part.suspects[o]
        self._parts[tp] = part
        if part.suspects:
            log.warning(
                "%s[%d]: %d record(s) were in flight when a consumer died; each is processed alone: %s",
                tp[0], tp[1], len(part.suspects),
                {o: f"{s.crashes} crash(es), {s.alone} alone" for o, s in sorted(part.suspects.items())[:10]},
            )

    def _write(self, partitions: set[Partition], claim: Collection[Partition] = ()) -> None:
        """Replace the markers of `partitions` atomically; one directory fsync for all of them.
        A partition whose file names another owner (and is not being claimed by `load`) was
        taken over by another consumer (this one is a zombie): it is never written again, until
        `load` hands it back."""
        if not partitions:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        renames = []
        for tp in sorted(partitions):
            part = self._parts.get(tp)
            if part is None or tp in self._lost:
                continue
            path = self._path(tp)
            owner = None if tp in claim else _read(path).get("owner")
            if owner not in (None, self.owner):
                log.warning("%s[%d] was taken over by consumer %s: its markers are no longer written here",
                            tp[0], tp[1], owner)
                self._lost.add(tp)
                continue
            tmp = path.with_name(f".{path.name}.{self.owner}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, part.to_json(self.owner))
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            renames.append((tmp, path))
        for tmp, path in renames:
            os.replace(tmp, path)
        if renames and self.fsync:
            fsync_dir(self.dir)

    def _path(self, tp: Partition) -> Path:
        return self.dir / f"{tp[0]}-{tp[1]}.json"


def _tp(tp: Partition) -> Partition:
    return (tp[0], int(tp[1]))


def _read(path: Path) -> dict:
    try:
        data = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, orjson.JSONDecodeError) as exc:
        log.error("unreadable crash marker %s (%s): starting it afresh", path, exc)
        return {}
    return data if isinstance(data, dict) else {}
