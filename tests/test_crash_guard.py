"""The crash-loop breaker: a record that kills the process again and again is dead-lettered as
`CrashLoop`, and a record that only happened to be in flight beside it never is.

A process dies here the way an OOM kill or a native crash kills it: the `CrashGuard` is dropped
without `end()` or `abandon()`, and a new one - a restart, or another consumer that was handed
the partition - loads the same output directory. `Stream` plays the consumer as the lead wires
it: records in offset order, micro-batches of `batch_size` with up to `depth` in flight,
suspects processed alone, `crash_loop` records dead-lettered without processing.
"""

from __future__ import annotations

import time
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings, strategies as st

from consumer.crash_guard import CrashGuard, Suspect
from pipeline.output.layout import ATTEMPTS_DIR
from pipeline.errors import CrashLoop, PermanentError

P0, P1 = ("events", 0), ("events", 1)


def die(guard: CrashGuard) -> None:
    """SIGKILL: nothing runs - no end(), no abandon(); only what is on disk survives."""
    del guard


def restart(out: Path, partitions=(P0,), max_attempts: int = 3) -> CrashGuard:
    g = CrashGuard(out / ATTEMPTS_DIR, max_attempts)
    g.load(partitions)
    return g


def marker(out: Path, tp=P0) -> dict:
    return orjson.loads((out / ATTEMPTS_DIR / f"{tp[0]}-{tp[1]}.json").read_bytes())


# --- the promise -------------------------------------------------------------------------------
def test_a_record_that_kills_the_process_three_times_is_a_crash_loop(tmp_path):
    g = restart(tmp_path)
    g.begin(1, {P0: [10, 11, 12, 13]})  # 12 will kill the process, whoever is beside it
    die(g)

    g = restart(tmp_path)  # first restart: four suspects, none proven
    assert [g.verdict(*P0, o) for o in (9, 10, 11, 12, 13, 14)] == ["ok", "isolate", "isolate", "isolate", "isolate", "ok"]
    for o in (10, 11):  # innocent: processed alone, to the end
        assert g.begin(f"alone-{o}", {P0: [o]}) is True
        g.end(f"alone-{o}")
    g.begin("alone-12", {P0: [12]})
    die(g)  # second death, alone

    g = restart(tmp_path)
    assert g.suspect(*P0, 12) == Suspect(crashes=2, alone=1)
    assert g.verdict(*P0, 12) == "isolate"  # two deaths are not yet three
    g.begin("alone-12", {P0: [12]})
    die(g)  # third death, alone again

    g = restart(tmp_path)
    assert g.suspect(*P0, 12) == Suspect(crashes=3, alone=2)
    assert g.verdict(*P0, 12) == "crash_loop"  # dead-lettered on this start, not tried a fourth time
    assert g.verdict(*P0, 13) == "isolate"  # never tried alone yet: still only a suspect
    err = g.crash_loop_error(*P0, 12)
    assert isinstance(err, CrashLoop) and isinstance(err, PermanentError) and err.error_type == "CrashLoop"
    assert "events[0]@12" in str(err) and "3 times" in str(err)
    # the dead letter's batch settles it: never marked in flight, cleared by end()
    assert g.begin("dlq-12", {P0: [12]}) is False
    assert marker(tmp_path)["in_flight"] == {}
    g.end("dlq-12")
    assert g.verdict(*P0, 12) == "ok" and g.verdict(*P0, 13) == "isolate"


def test_an_innocent_batch_mate_of_a_crash_is_never_dead_lettered(tmp_path):
    """Ten crashes in company (say the OOM killer, for a neighbour's memory) make a record a
    suspect with ten crashes - but not one of them alone, so it is only ever isolated; alone it
    succeeds and is cleared."""
    for i in range(10):
        g = restart(tmp_path)
        g.begin(i, {P0: [5, 6, 7]})
        die(g)
    g = restart(tmp_path)
    assert g.suspect(*P0, 6) == Suspect(crashes=10, alone=0)
    assert g.verdict(*P0, 6) == "isolate"
    for o in (5, 6):  # in offset order, as the consumer meets them
        g.begin(f"alone-{o}", {P0: [o]})
        g.end(f"alone-{o}")
    assert [g.verdict(*P0, o) for o in (5, 6, 7)] == ["ok", "ok", "isolate"]
    die(g)
    g = restart(tmp_path)
    assert g.suspect(*P0, 6) is None and g.suspect(*P0, 7) == Suspect(crashes=10, alone=0)


def test_a_crash_in_company_starts_the_alone_streak_over(tmp_path):
    g = restart(tmp_path)
    g.begin(1, {P0: [7]})
    die(g)  # alone
    g = restart(tmp_path)
    g.begin(2, {P0: [7]})
    die(g)  # alone again
    g = restart(tmp_path)
    assert g.suspect(*P0, 7) == Suspect(crashes=2, alone=2)
    g.begin(3, {P0: [7]})
    g.begin(4, {P1: [100]})  # a batch-mate in flight (against the wiring): the crash proves nothing
    die(g)
    g = restart(tmp_path, (P0, P1))
    assert g.suspect(*P0, 7) == Suspect(crashes=3, alone=0)
    assert g.verdict(*P0, 7) == "isolate" and g.verdict(*P1, 100) == "isolate"


def test_a_batch_is_alone_only_with_one_record_and_nothing_else_in_flight(tmp_path):
    g = restart(tmp_path, (P0, P1))
    assert g.begin(1, {P0: [1, 2]}) is False  # two records
    g.end(1)
    assert g.begin(2, {P0: [3]}) is True
    assert marker(tmp_path)["in_flight"] == {"2": {"offsets": [3], "alone": True}}
    assert g.begin(3, {P1: [9]}) is False  # another partition counts too: the process dies whole
    assert marker(tmp_path)["in_flight"] == {"2": {"offsets": [3], "alone": False}}  # 2 lost its proof
    die(g)
    g = restart(tmp_path, (P0, P1))
    assert g.suspect(*P0, 3) == Suspect(crashes=1, alone=0) and g.suspect(*P1, 9) == Suspect(crashes=1, alone=0)


def test_a_pipelined_stream_with_one_culprit_dead_letters_exactly_it(tmp_path):
    s = Stream(tmp_path, records=200, culprits={57}, batch_size=8, depth=3)
    s.run_to_the_end()
    assert s.crash_loops == [57]
    assert s.deaths == 3
    assert s.rows == set(range(200)) - {57}


def test_with_max_attempts_1_one_crash_alone_is_enough_but_a_crash_in_company_is_not(tmp_path):
    g = restart(tmp_path, max_attempts=1)
    g.begin(1, {P0: [1, 2]})
    die(g)
    g = restart(tmp_path, max_attempts=1)
    assert g.verdict(*P0, 1) == "isolate"
    g.begin(2, {P0: [1]})
    die(g)
    assert restart(tmp_path, max_attempts=1).verdict(*P0, 1) == "crash_loop"
    with pytest.raises(ValueError):
        CrashGuard(tmp_path / ATTEMPTS_DIR, 0)


# --- partitions move, processes restart, processes stop on purpose ------------------------------
def test_markers_survive_restarts_and_move_with_their_partition(tmp_path):
    """Consumer A dies with batches in flight on two partitions; after the rebalance B owns one
    and C the other (same output directory): each sees its suspects."""
    a = restart(tmp_path, (P0, P1))
    a.begin(1, {P0: [4, 5], P1: [40]})
    die(a)
    b, c = CrashGuard(tmp_path / ATTEMPTS_DIR), CrashGuard(tmp_path / ATTEMPTS_DIR)
    assert b.load([P0]) == {P0: {4: Suspect(1, 0), 5: Suspect(1, 0)}}
    assert c.load([P1]) == {P1: {40: Suspect(1, 0)}}
    assert marker(tmp_path, P0)["owner"] == b.owner and marker(tmp_path, P1)["owner"] == c.owner
    assert marker(tmp_path, P0)["in_flight"] == {} and marker(tmp_path, P0)["suspects"] == {
        "4": {"crashes": 1, "alone": 0}, "5": {"crashes": 1, "alone": 0}}
    # C, processing 40 alone, dies too; the partition moves back to B
    c.begin(7, {P1: [40]})
    die(c)
    b.load([P1])
    assert b.suspect(*P1, 40) == Suspect(crashes=2, alone=1)


def test_loading_twice_does_not_count_a_crash_twice(tmp_path):
    g = restart(tmp_path)
    g.begin(1, {P0: [3]})
    die(g)
    g = restart(tmp_path)
    g.load([P0])  # a re-assignment of the same partition
    die(g)  # and a death before anything was processed
    g = restart(tmp_path)
    assert g.suspect(*P0, 3) == Suspect(crashes=1, alone=1)


def test_a_partition_revoked_after_its_drain_is_not_blamed(tmp_path):
    a = restart(tmp_path)
    a.begin(1, {P0: [1, 2]})
    a.end(1)
    a.begin(2, {P0: [3]})
    a.forget([P0])  # a revoke (the drain timed out): a is alive, 3 was not a crash
    b = restart(tmp_path)
    assert b.verdict(*P0, 3) == "ok" and marker(tmp_path)["suspects"] == {}


def test_an_orderly_stop_blames_nobody(tmp_path):
    g = restart(tmp_path, (P0, P1))
    g.begin(1, {P0: [1, 2]})
    g.begin(2, {P1: [9]})
    g.abandon()  # a FatalError, SIGTERM past its drain: Python code ran, nothing crashed
    die(g)
    g = restart(tmp_path, (P0, P1))
    assert [g.verdict(*P0, 1), g.verdict(*P0, 2), g.verdict(*P1, 9)] == ["ok", "ok", "ok"]


def test_a_zombie_never_overwrites_the_markers_of_the_partitions_new_owner(tmp_path):
    """A stalls past the session timeout; B is handed the partition and counts A's batch as a
    crash; A wakes up and ends its batch: B's markers stay as B wrote them."""
    a = restart(tmp_path)
    a.begin(1, {P0: [8, 9]})
    b = restart(tmp_path)
    b.begin(1, {P0: [8]})
    before = marker(tmp_path)
    a.end(1)
    a.begin(2, {P0: [10]})
    assert marker(tmp_path) == before and before["owner"] == b.owner
    die(b)
    g = restart(tmp_path)
    assert g.suspect(*P0, 8) == Suspect(crashes=2, alone=1) and g.suspect(*P0, 9) == Suspect(1, 0)
    assert g.verdict(*P0, 10) == "ok"


def test_end_clears_the_suspects_its_batch_covered_and_resume_at_those_the_files_hold(tmp_path):
    g = restart(tmp_path)
    g.begin(1, {P0: [3, 4, 5, 6]})
    die(g)
    g = restart(tmp_path)
    g.begin("alone-3", {P0: [3]})
    g.end("alone-3")
    g.begin(2, {P0: [5]})  # 4 turned out a duplicate (never processed): covered all the same
    g.end(2)
    assert [g.verdict(*P0, o) for o in (3, 4, 5, 6)] == ["ok", "ok", "ok", "isolate"]
    die(g)
    g = CrashGuard(tmp_path / ATTEMPTS_DIR)
    g.load([P0], resume_at={P0: 7})  # the files hold everything below 7
    assert g.verdict(*P0, 6) == "ok" and marker(tmp_path)["suspects"] == {}


def test_a_batch_without_records_to_process_writes_nothing(tmp_path):
    g = restart(tmp_path)
    written = marker(tmp_path)
    assert g.begin(1, {}) is False and g.begin(2, {P0: []}) is False
    g.end(1)
    g.end(2)
    g.end("never-begun")
    assert marker(tmp_path) == written
    g.begin(3, {P0: [1]})
    with pytest.raises(ValueError):  # batch ids name one batch each
        g.begin(3, {P0: [2]})


def test_an_unreadable_marker_starts_afresh_instead_of_stopping_the_stream(tmp_path):
    g = restart(tmp_path)
    g.begin(1, {P0: [1]})
    die(g)
    path = tmp_path / ATTEMPTS_DIR / "events-0.json"
    path.write_bytes(b'{"in_flight": {"1": {"offs')
    (tmp_path / ATTEMPTS_DIR / ".events-0.json.deadbeef.tmp").write_bytes(b"half")
    g = restart(tmp_path)
    assert g.verdict(*P0, 1) == "ok"
    assert sorted(p.name for p in (tmp_path / ATTEMPTS_DIR).iterdir()) == ["events-0.json"]
    path.write_bytes(b'{"suspects": {"x": 1}, "in_flight": [3]}')  # JSON, but not a marker's
    assert restart(tmp_path).verdict(*P0, 1) == "ok"


def test_a_partition_used_without_load_is_loaded_on_first_use(tmp_path):
    g = restart(tmp_path)
    g.begin(1, {P0: [1]})
    die(g)
    g = CrashGuard(tmp_path / ATTEMPTS_DIR)
    assert g.verdict(*P0, 1) == "isolate"


# --- any stream, any culprits, any kills in company ---------------------------------------------
class Died(Exception):
    pass


class Stream:
    """A consumer as wired: `batch_size` records per micro-batch, `depth` batches in flight;
    suspects alone (after a drain); crash_loop records dead-lettered unprocessed. A culprit kills
    the process whenever its batch is processed; `kills` are deaths from outside (the OOM killer
    for a neighbour, a node drain) at the n-th batch begun, striking whatever is in flight -
    only in company here, never a record alone."""

    def __init__(self, out: Path, records: int, culprits: set[int], batch_size: int, depth: int,
                 kills: set[int] = frozenset(), max_attempts: int = 3, partitions: int = 1) -> None:
        self.out, self.records, self.culprits, self.kills = out, records, culprits, set(kills)
        self.batch_size, self.depth, self.max_attempts, self.partitions = batch_size, depth, max_attempts, partitions
        self.rows: set[int] = set()
        self.crash_loops: list[int] = []
        self.deaths = 0
        self.begun = 0
        self.next = {p: 0 for p in range(partitions)}  # committed: resume positions

    def run_to_the_end(self, max_starts: int = 1000) -> None:
        for _ in range(max_starts):
            try:
                self._run_once()
                return
            except Died:
                self.deaths += 1
        raise AssertionError("the stream never finished: a crash loop was not broken")

    def _run_once(self) -> None:
        g = CrashGuard(self.out / ATTEMPTS_DIR, self.max_attempts, fsync=False)
        tps = [("events", p) for p in range(self.partitions)]
        g.load(tps, resume_at={tp: self.next[tp[1]] for tp in tps})
        in_flight: list[tuple[int, dict, list]] = []  # (batch id, offsets, the ones processed)
        seq = 0

        def apply_oldest() -> None:  # the commit loop: outcomes applied in batch order, then end()
            bid, offs, processed = in_flight.pop(0)
            for (_, p), os_ in offs.items():
                for o in os_:
                    (self.rows.add if (p, o) in processed else self.crash_loops.append)(o)
                    self.next[p] = max(self.next[p], o + 1)  # (its file finalized at once: simpler)
            g.end(bid)

        def drain() -> None:
            while in_flight:
                apply_oldest()

        def process(offs: dict) -> None:
            nonlocal seq
            seq += 1
            processed = [(p, o) for (_, p), os_ in offs.items() for o in os_ if g.verdict("events", p, o) != "crash_loop"]
            g.begin(seq, offs)
            self.begun += 1
            company = len(processed) + sum(len(x[2]) for x in in_flight) > 1
            if self.culprits & {o for _, o in processed}:
                raise Died  # its native crash: everything in flight dies with it
            if self.begun in self.kills and company:
                self.kills.discard(self.begun)
                raise Died
            in_flight.append((seq, offs, processed))
            if len(in_flight) >= self.depth:
                apply_oldest()

        pos = dict(self.next)
        batch: dict = {}
        while any(pos[p] < self.records for p in pos):
            for p in range(self.partitions):
                if pos[p] >= self.records:
                    continue
                o, pos[p] = pos[p], pos[p] + 1
                if g.verdict("events", p, o) == "isolate":
                    if batch:
                        process(batch)
                        batch = {}
                    drain()  # nothing else in flight
                    process({("events", p): [o]})
                    drain()  # nothing starts until it is applied
                    continue
                batch.setdefault(("events", p), []).append(o)  # ok, or crash_loop (a dead letter)
                if sum(map(len, batch.values())) >= self.batch_size:
                    process(batch)
                    batch = {}
        if batch:
            process(batch)
        drain()
        g.abandon()


@settings(max_examples=60, deadline=None)
@given(
    records=st.integers(1, 60),
    culprits=st.sets(st.integers(0, 59), max_size=4),
    batch_size=st.integers(1, 9),
    depth=st.integers(1, 4),
    partitions=st.integers(1, 3),
    kills=st.sets(st.integers(1, 80), max_size=6),
    max_attempts=st.integers(1, 4),
)
def test_any_stream_dead_letters_exactly_its_culprits_and_every_innocent_becomes_a_row(
    tmp_path_factory, records, culprits, batch_size, depth, partitions, kills, max_attempts
):
    out = tmp_path_factory.mktemp("out")
    culprits = {c for c in culprits if c < records}
    s = Stream(out, records, culprits, batch_size, depth, kills, max_attempts, partitions)
    s.run_to_the_end()
    per_partition = sorted(culprits) * partitions  # the same offsets are culprits in every partition
    assert sorted(s.crash_loops) == sorted(per_partition)  # exactly the culprits, each once
    assert s.rows == set(range(records)) - culprits  # every innocent, in every partition
    # a culprit kills the process max_attempts times (twice when max_attempts is 1: once in its
    # batch, once alone); every other death was a kill from outside
    assert s.deaths <= len(per_partition) * max(max_attempts, 2) + len(kills)


# --- what it costs -------------------------------------------------------------------------------
def test_begin_and_end_cost_a_few_milliseconds_per_batch(tmp_path):
    g = restart(tmp_path, [("events", p) for p in range(8)])
    n = 50
    t = time.perf_counter()
    for i in range(n):
        batch = {("events", i % 8): list(range(i * 32, i * 32 + 32))}
        g.begin(i, batch)
        g.end(i)
    per_batch = (time.perf_counter() - t) / n
    assert per_batch < 0.25, f"{per_batch * 1000:.1f} ms per batch"  # generous: shared CI disks
