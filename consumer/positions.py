"""Where a partition resumes, and which fetched records are new work: pure, so the rules can be
tested alone (tests/test_offset_recovery_property.py drives these same objects).

Two sources say how far a partition has been handled: the group's committed offset (the
broker) and the Delta table's app transaction for the partition (`OutputLedger.next_offset`:
the last offset committed to the table, plus one; the parameters below still say "files"). A
crash between a table commit and the broker's leaves the broker behind the table; the table is
the proof, so a partition resumes at the later of the two and never re-processes what the table
already holds. A rewind (--from-beginning / --from-timestamp) replaces the committed offset on
the first assignment, and still never goes back before what the table holds.

An assignment, in order (consumer/app.py: on_assigned does the broker's part):

    1. `Rewind.unresolved`: ask the broker for the rewind points once, then `Rewind.resolve`
    2. `plan_starts`: the three-way decision per partition (`StartPlan`)
    3. seek as the plan says; `StartPlan.starts`: the exact first offset of each partition
    4. `FetchGate.assign(starts, Rewind.not_before(plan.to_end))`
    5. commit `plan.lagging` (files ahead of the broker) and `StartPlan.rewind_commits`
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, Hashable, TypeVar

if TYPE_CHECKING:
    from pipeline.config import Settings

TP = TypeVar("TP", bound=Hashable)


def resume_offset(committed: int | None, from_files: int | None, rewind: int | None = None) -> int | None:
    """The first offset to fetch, or None when neither source knows (auto_offset_reset decides).

    `rewind` (--from-beginning / --from-timestamp, first assignment only) replaces the committed
    offset; even a rewind never goes back before what the output files hold.
    """
    start = rewind if rewind is not None else committed
    known = [o for o in (start, from_files) if o is not None]
    return max(known) if known else None


def lagging_commit(committed: int | None, from_files: int | None) -> int | None:
    """The offset to commit when the files are ahead of the broker (a crash before the commit), else None.

    Committing it costs nothing (the files prove those events are handled) and keeps the group's
    lag honest for monitoring and for a consumer that reads the topic without the files.
    """
    if from_files is not None and (committed is None or committed < from_files):
        return from_files
    return None


def offset_from_time_lookup(found: object | None) -> int | None:
    """An `offsets_for_times` answer as "first offset at/after the time", or None for "no record".

    Apache Kafka answers (-1, -1) for a partition with no record at or after the time (aiokafka:
    None); the embedded broker (Tansu) answers offset 0 with timestamp -1. Both mean "none":
    such a partition starts at its end, never at its beginning.
    """
    if found is None or getattr(found, "timestamp", 0) == -1 or getattr(found, "offset", -1) < 0:
        return None
    return int(found.offset)  # type: ignore[attr-defined]


@dataclass
class StartPlan(Generic[TP]):
    """What on_assigned does for each partition; every assigned partition is in exactly one of
    `seek`, `to_end`, `to_beginning`."""

    seek: dict[TP, int] = field(default_factory=dict)  # resume here
    to_end: list[TP] = field(default_factory=list)  # a time rewind found no record at/after the time
    to_beginning: list[TP] = field(default_factory=list)  # neither the broker nor the files know it
    lagging: dict[TP, int] = field(default_factory=dict)  # commit these: the files are ahead of the broker
    rewound: list[TP] = field(default_factory=list)  # started by a rewind: commit the start (persist it)

    def starts(self, positions: Mapping[TP, int]) -> dict[TP, int]:
        """The exact first offset of every assigned partition: `seek`'s, and for the ones sought to
        their end or beginning, where that put them (`positions`, the consumer's answer)."""
        return {**self.seek, **{tp: positions[tp] for tp in (*self.to_end, *self.to_beginning)}}

    def rewind_commits(self, starts: Mapping[TP, int]) -> dict[TP, int]:
        """What to commit at once for the partitions a rewind started, as kafka-consumer-groups
        --reset-offsets would: a restart without the flag resumes from there, not from the group's
        old offsets."""
        return {tp: starts[tp] for tp in self.rewound}


def plan_starts(
    assigned: set[TP],
    committed: dict[TP, int | None],
    from_files: dict[TP, int | None],
    rewind: dict[TP, int | None] | None,
) -> StartPlan[TP]:
    """The three-way decision for each assigned partition.

    `rewind` is None without a rewind; otherwise it maps each partition to its rewind point, or
    to None when a time rewind found no record at/after the time (that partition starts at its end).
    """
    plan: StartPlan[TP] = StartPlan()
    for tp in assigned:
        behind = lagging_commit(committed.get(tp), from_files.get(tp))
        if behind is not None:
            plan.lagging[tp] = behind
        if rewind is not None and tp in rewind and rewind[tp] is None:
            plan.to_end.append(tp)
            plan.rewound.append(tp)
            continue
        start = resume_offset(committed.get(tp), from_files.get(tp), rewind.get(tp) if rewind else None)
        if rewind is not None and rewind.get(tp) is not None and start != committed.get(tp):
            plan.rewound.append(tp)
        if start is None:
            plan.to_beginning.append(tp)
        else:
            plan.seek[tp] = start
    return plan


class Rewind(Generic[TP]):
    """--from-beginning / --from-timestamp, as the assignments apply it: ONCE, at this process's
    first assignment after the start-up that asked for it.

    The points are resolved at that assignment (`resolve`), applied to the partitions it brings,
    committed at once (`StartPlan.rewind_commits`), and then `spend`: every later assignment
    resumes from the committed offsets and the files like any other. A point applied again at a
    later rebalance would send a partition that was quiet at start-up ("no record after the time")
    to its end again, and commit it there: the open batch, the unfetched events and a dead
    member's unfinalized work would be lost. A time rewind's point is the first offset at/after
    the time, or None when there is no such record: that partition starts at its end and refuses
    records older than the time (`not_before`). A time wins over --from-beginning when both are
    given.
    """

    def __init__(self, from_beginning: bool = False, timestamp_ms: int | None = None) -> None:
        self.timestamp_ms = timestamp_ms
        self.from_beginning = from_beginning and timestamp_ms is None
        self._points: dict[TP, int | None] | None = None if from_beginning or timestamp_ms is not None else {}
        self.spent = self._points is not None  # no rewind asked for, or already applied once

    @classmethod
    def from_settings(cls, settings: "Settings") -> "Rewind[TP]":
        """From the settings' `from_beginning` and `from_timestamp`."""
        since = settings.from_timestamp_utc()
        return cls(settings.from_beginning, int(since.timestamp() * 1000) if since is not None else None)

    @property
    def unresolved(self) -> bool:
        """A rewind was asked for and its points are not known yet: ask the broker (for every
        partition of the topic: `offsets_for_times` at `timestamp_ms`, else `beginning_offsets`)."""
        return self._points is None

    def resolve(self, partitions: Iterable[TP], answers: Mapping[TP, object]) -> None:
        """The broker's answers for `partitions`: offsets_for_times' (see `offset_from_time_lookup`;
        a partition without an answer has no record at/after the time), or beginning_offsets'."""
        if self.timestamp_ms is not None:
            self._points = {tp: offset_from_time_lookup(answers.get(tp)) for tp in partitions}
        else:
            self._points = {tp: int(o) for tp, o in answers.items()}  # type: ignore[call-overload]

    def points(self, assigned: Iterable[TP]) -> dict[TP, int | None] | None:
        """The rewind points of the assigned partitions, for `plan_starts`; None without any, or
        once the rewind is `spent`."""
        if self.spent:
            return None
        known = self._points or {}
        return {tp: known[tp] for tp in assigned if tp in known} or None

    def spend(self) -> None:
        """The first assignment applied the rewind: later ones resume from the commits and files."""
        self.spent = True
        self._points = {}

    def not_before(self, at_end: Iterable[TP]) -> dict[TP, int]:
        """For the partitions a time rewind started at their end: the time (ms), for `FetchGate.assign`."""
        return {tp: self.timestamp_ms for tp in at_end} if self.timestamp_ms is not None else {}


class FetchGate(Generic[TP]):
    """Which fetched records are new work.

    aiokafka hands out records as soon as an assignment exists - fetched from the committed
    offset, before on_assigned has positioned the partition (past what the files hold, or back
    to a rewind point) - and a getmany that was waiting across a rebalance returns records
    fetched before the seek. Records from before a revoke may still be in hand after it. Rules:

    - every assignment change bumps `generation`; a fetch that started in an older generation
      is `stale`: dropped whole, and its partitions sought back to `resume_points` (the fetch
      moved their positions), so a rewind point always wins over records fetched before it;
    - each partition accepts offsets only from where the assignment put it, each offset once;
    - a partition a time rewind starts "at its end" (no record at/after the time) also refuses
      records older than the time until the first newer one: a broker whose end offset is too
      early (Tansu's ListOffsets "latest" can be) must not replay the partition's past.
    """

    def __init__(self) -> None:
        self.generation = 0
        self._next: dict[TP, int] = {}
        self._not_before: dict[TP, int] = {}  # ms timestamps

    def assign(self, starts: dict[TP, int], not_before: dict[TP, int] | None = None) -> None:
        """`starts`: the exact first offset of each newly assigned partition; `not_before`: the
        rewind time (ms) of those a time rewind started at their end."""
        self._next.update(starts)
        self._not_before.update(not_before or {})
        self.generation += 1

    def revoke(self, partitions: set[TP]) -> None:
        for tp in partitions:
            self._next.pop(tp, None)
            self._not_before.pop(tp, None)
        self.generation += 1

    def stale(self, fetched_in: int) -> bool:
        return fetched_in != self.generation

    def resume_points(self, partitions) -> dict[TP, int]:
        """Where the still-assigned ones of `partitions` must be fetched from again."""
        return {tp: self._next[tp] for tp in partitions if tp in self._next}

    def accept(self, tp: TP, offset: int, timestamp_ms: int | None = None) -> bool:
        nxt = self._next.get(tp)
        if nxt is None or offset < nxt:
            return False
        floor = self._not_before.get(tp)
        if floor is not None:
            if timestamp_ms is not None and timestamp_ms < floor:
                return False
            del self._not_before[tp]
        self._next[tp] = offset + 1
        return True

    def next_offset(self, tp: TP) -> int | None:
        return self._next.get(tp)

    @property
    def held(self) -> set[TP]:
        """The partitions this consumer positioned and still owns (assigned, not revoked)."""
        return set(self._next)
