"""Where a partition starts, as pure rules (consumer/positions.py), without a broker.

tests/test_offset_recovery_property.py drives the same rules through `StreamConsumer.on_assigned`
against an in-memory group; these pin each rule on its own.
"""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from aiokafka.structs import OffsetAndTimestamp

from consumer.positions import FetchGate, Rewind, StartPlan, lagging_commit, offset_from_time_lookup, plan_starts, resume_offset
from pipeline.config import Settings

A, B, C = ("t", 0), ("t", 1), ("t", 2)


# --- resume and lagging ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "committed, from_files, rewind, start",
    [
        (None, None, None, None),  # nobody knows: auto_offset_reset decides
        (5, None, None, 5),
        (None, 7, None, 7),
        (5, 7, None, 7),  # a crash between a publish and its commit: the files are the proof
        (9, 7, None, 9),
        (9, 7, 0, 7),  # a rewind replaces the committed offset, never goes before the files
        (9, None, 2, 2),
        (None, 3, 8, 8),
    ],
)
def test_a_partition_resumes_at_the_later_of_the_files_and_the_committed_offset_or_rewind(committed, from_files, rewind, start):
    assert resume_offset(committed, from_files, rewind) == start


def test_files_ahead_of_the_broker_are_committed_and_nothing_else_is():
    assert lagging_commit(None, 4) == 4
    assert lagging_commit(3, 4) == 4
    assert lagging_commit(4, 4) is None
    assert lagging_commit(5, 4) is None
    assert lagging_commit(5, None) is None


def test_a_time_lookup_without_a_record_at_or_after_the_time_is_none_on_kafka_and_on_tansu():
    assert offset_from_time_lookup(None) is None  # Apache Kafka (-1, -1), as aiokafka hands it
    assert offset_from_time_lookup(OffsetAndTimestamp(0, -1)) is None  # Tansu
    assert offset_from_time_lookup(OffsetAndTimestamp(-1, 5)) is None
    assert offset_from_time_lookup(OffsetAndTimestamp(12, 1_700_000_000_000)) == 12


# --- the three-way decision ------------------------------------------------------------------------
def test_every_assigned_partition_is_sought_to_an_offset_its_end_or_its_beginning_exactly_once():
    plan = plan_starts({A, B, C}, committed={A: 5, B: None, C: 2}, from_files={A: 7, B: None, C: None},
                       rewind={C: None})
    assert plan.seek == {A: 7}
    assert plan.to_beginning == [B]
    assert plan.to_end == [C]  # a time rewind found no record at/after the time
    assert plan.lagging == {A: 7}
    assert plan.rewound == [C]
    placed = [*plan.seek, *plan.to_end, *plan.to_beginning]
    assert sorted(placed) == sorted({A, B, C})


def test_a_rewind_is_committed_only_where_it_moves_the_start():
    plan = plan_starts({A, B, C}, committed={A: 5, B: 3, C: 0}, from_files={A: None, B: 6, C: None},
                       rewind={A: 0, B: 0, C: 0})
    assert plan.seek == {A: 0, B: 6, C: 0}  # B: never before what the files hold
    assert sorted(plan.rewound) == [A, B]  # C already starts where the group's committed offset is
    assert plan.lagging == {B: 6}


def test_without_a_rewind_the_starts_are_resumes_and_nothing_is_rewound():
    plan = plan_starts({A, B}, committed={A: 5, B: 9}, from_files={A: 7, B: 2}, rewind=None)
    assert (plan.seek, plan.rewound, plan.to_end, plan.to_beginning) == ({A: 7, B: 9}, [], [], [])


def test_the_starts_are_the_seeks_and_where_end_and_beginning_resolved_and_the_rewind_commits_them():
    plan = StartPlan(seek={A: 4}, to_end=[B], to_beginning=[C], rewound=[A, B])
    starts = plan.starts({B: 30, C: 0})
    assert starts == {A: 4, B: 30, C: 0}
    assert plan.rewind_commits(starts) == {A: 4, B: 30}
    with pytest.raises(KeyError):
        plan.starts({C: 0})  # every partition sought to its end needs its resolved position


# --- rewinds across assignments --------------------------------------------------------------------
def test_no_rewind_asks_the_broker_nothing_and_gives_no_points():
    rewind: Rewind = Rewind()
    assert not rewind.unresolved
    assert rewind.points({A, B}) is None
    assert rewind.not_before([A]) == {}


def test_a_rewind_applies_once_at_the_first_assignment_and_later_assignments_resume():
    rewind: Rewind = Rewind(from_beginning=True)
    assert rewind.unresolved and not rewind.spent
    rewind.resolve([A, B, C], {A: 0, B: 3, C: 1})
    assert not rewind.unresolved
    assert rewind.points({A}) == {A: 0}
    assert rewind.points({("t", 9)}) is None
    assert rewind.not_before([A]) == {}
    rewind.spend()  # the first assignment applied it
    assert rewind.points({A, B, C}) is None and not rewind.unresolved
    # a later assignment of a quiet partition resumes from its committed offset, not its end again
    ts = 1_700_000_000_000
    timed: Rewind = Rewind(timestamp_ms=ts)
    timed.resolve([A], {})
    assert plan_starts({A}, {A: 2}, {A: None}, timed.points({A})).to_end == [A]
    timed.spend()
    later = plan_starts({A}, {A: 5}, {A: None}, timed.points({A}))
    assert later.seek == {A: 5} and not later.to_end and not later.rewound


def test_a_time_rewind_starts_a_partition_without_a_later_record_at_its_end_and_refuses_older_records():
    ts = 1_700_000_000_000
    rewind: Rewind = Rewind(timestamp_ms=ts)
    rewind.resolve([A, B, C], {A: OffsetAndTimestamp(4, ts + 10), B: OffsetAndTimestamp(0, -1)})  # C: no answer
    assert rewind.points({A, B, C}) == {A: 4, B: None, C: None}
    plan = plan_starts({A, B, C}, {A: 9, B: 9, C: None}, {A: None, B: None, C: None}, rewind.points({A, B, C}))
    assert plan.seek == {A: 4} and sorted(plan.to_end) == [B, C] and sorted(plan.rewound) == [A, B, C]
    assert rewind.not_before(plan.to_end) == {B: ts, C: ts}


def test_a_time_wins_over_from_beginning_and_settings_give_the_time_in_ms():
    assert Rewind(from_beginning=True, timestamp_ms=5).from_beginning is False
    at = Rewind.from_settings(Settings(from_timestamp="2024-05-01T12:00:00Z"))
    assert at.timestamp_ms == int(datetime(2024, 5, 1, 12, tzinfo=timezone.utc).timestamp() * 1000)
    assert at.unresolved
    assert Rewind.from_settings(Settings(from_beginning=True)).from_beginning
    assert not Rewind.from_settings(Settings()).unresolved


# --- the gate -------------------------------------------------------------------------------------
def test_the_gate_accepts_each_offset_once_from_the_start_and_voids_fetches_across_an_assignment_change():
    gate: FetchGate = FetchGate()
    fetched_in = gate.generation
    assert not gate.accept(A, 0)  # not assigned: nothing is new work
    gate.assign({A: 3})
    assert gate.stale(fetched_in)
    assert [o for o in (1, 3, 3, 4, 6) if gate.accept(A, o)] == [3, 4, 6]
    assert gate.resume_points([A, B]) == {A: 7}
    gate.revoke({A})
    assert not gate.accept(A, 7) and gate.resume_points([A]) == {}


def test_a_partition_started_at_its_end_by_a_time_rewind_refuses_records_older_than_the_time():
    gate: FetchGate = FetchGate()
    gate.assign({A: 10}, not_before={A: 1000})
    assert not gate.accept(A, 10, timestamp_ms=999)  # the broker's end was early: the past, refused
    assert gate.accept(A, 11, timestamp_ms=1000)
    assert gate.accept(A, 12, timestamp_ms=5)  # from the first newer record on, offsets decide
