"""The consumer's rebalance path under stop signals, rewinds and faults (issue 19): two consumer
processes in one group on the real broker and S3 server, read back from the finalized files,
the group's committed offsets and the exit codes."""

from __future__ import annotations

import signal
import time
from datetime import datetime, timezone

import pytest

from tests.consumer_process import (
    ConsumerProcess,
    assert_exactly_once,
    committed_offsets,
    create_topics,
    logs_on_failure,
    partition_ends,
    upload_copies,
    versions,
    wait_for_rows,
    writer_ids,
)
from tests.test_live_correctness import rows_applied, send_to_partitions

pytestmark = pytest.mark.integration


def published(st, s3, bucket, speech_corpus, copies: int) -> list:
    """`copies` uploads of three clips, their events published to freshly created topics."""
    from tests.consumer_process import publish

    events = upload_copies(s3, bucket, [c.path for c in speech_corpus[:3]], copies)
    create_topics(st)
    publish(st, events)
    return events


def assignments(proc: ConsumerProcess) -> int:
    return proc.log().count("partitions assigned")


def wait_until(condition, timeout: float, what: str, *procs: ConsumerProcess) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        for p in procs:
            assert p.proc is None or p.proc.poll() is None, f"{p.log_path.name} exited ({p.proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        time.sleep(0.1)


# --- item 2: a rewind applies once ----------------------------------------------------------------
@pytest.mark.slow
def test_a_time_rewind_applies_once_so_a_dead_members_unfinalized_events_still_land(
    services, s3, bucket, settings_factory, speech_corpus, tmp_path
):
    """--from-timestamp with no record after the time sends both partitions to their end - at the
    first assignment only. A second member (no flag) joins, applies its partition's new events to
    its open file and dies with kill -9; when the first takes that partition back, it resumes from
    the committed offset, not from the end again: every new event becomes a row."""
    st = settings_factory(topic_partitions=2, batch_max_events=2, roll_max_rows=100, roll_max_seconds=1.0, exit_when_idle=None)
    clips = [c.path for c in speech_corpus[:3]]
    old, new = upload_copies(s3, bucket, clips, 2, prefix="old/"), upload_copies(s3, bucket, clips, 8, prefix="new/")
    create_topics(st)
    send_to_partitions(st, [(0, old[0]), (1, old[1])])
    time.sleep(1.0)
    cut = datetime.now(timezone.utc)
    time.sleep(0.5)

    first = ConsumerProcess(services, st, tmp_path / "first.log", METAVOICE_FROM_TIMESTAMP=cut.isoformat()).start()
    # the second never rolls on its own: what it applies stays in its open file until it dies
    second = ConsumerProcess(services, st.model_copy(update={"roll_max_seconds": 600.0}), tmp_path / "second.log")
    try:
        with logs_on_failure(first, second):
            first.wait_for_log("partitions assigned", timeout=60)
            second.start()
            wait_until(lambda: assignments(second) >= 1 and assignments(first) >= 2, 60, "the group settled", first, second)
            send_to_partitions(st, [(i % 2, e) for i, e in enumerate(new)])
            wait_until(lambda: rows_applied(second) >= 4, 60, "the second member applied its partition's events", first, second)
            assert len(writer_ids(st.output_dir)) <= 1  # only the first member finalized files
            second.kill()  # mid-file: its rows were never finalized, its offsets never committed

            wait_for_rows(st.output_dir, len(new), timeout=90)
            first.signal(signal.SIGTERM)
            assert first.wait(timeout=60) == 0
            assert_exactly_once(st.output_dir, versions(new))  # not one old event, every new one once
            ends = partition_ends(st, expected=len(old) + len(new))
            assert committed_offsets(st) == ends
    finally:
        first.kill()
        second.kill()


# --- item 1: a stop signal during a rebalance ----------------------------------------------------------
def signal_group(proc: ConsumerProcess, sig: signal.Signals) -> None:
    """To the child's whole process group - the consumer and its ephemeral Prefect server - as
    systemd (the cgroup) and Ctrl+C in a terminal (the process group) send it."""
    import os

    if proc.proc is not None and proc.proc.poll() is None:
        os.killpg(proc.pid, sig)


def assert_stopped_with_what_the_files_hold(st) -> None:
    """Everything the broker has as committed is in the files: a stop committed nothing it did not write."""
    from pipeline.ledger import OutputLedger

    held = OutputLedger(st.output_dir, group=st.group)
    held.refresh()
    for p, off in committed_offsets(st).items():
        assert off == held.next_offset(st.topic, p), f"partition {p}: committed {off}, the files hold up to {held.next_offset(st.topic, p)}"


@pytest.mark.slow
def test_sigterm_to_both_members_process_groups_at_once_exits_0_within_the_shutdown_timeout(
    services, s3, bucket, settings_factory, speech_corpus, tmp_path
):
    """Both members, each with its ephemeral Prefect server child, get SIGTERM at the same moment:
    the first to leave makes the other rebalance while it is stopping. Both exit 0 within
    shutdown_timeout, having committed exactly what their files hold; a restart finishes the log
    with every event once."""
    from tests.conftest import consume_until_idle
    from tests.consumer_process import assert_summary_matches_files, fake_models

    st = settings_factory(batch_max_events=2, roll_max_rows=4, roll_max_seconds=1.0, exit_when_idle=None,
                          shutdown_timeout=20.0, prefect_enabled=True)
    events = published(st, s3, bucket, speech_corpus, 80)
    slow = {"METAVOICE_TEST_WHISPER_DELAY": "0.3"}
    a = ConsumerProcess(services, st, tmp_path / "a.log", **slow).start()
    b = ConsumerProcess(services, st, tmp_path / "b.log", **slow).start()
    try:
        with logs_on_failure(a, b):
            wait_until(lambda: len(writer_ids(st.output_dir)) >= 2, 120, "both members finalized a file", a, b)
            t0 = time.monotonic()
            signal_group(a, signal.SIGTERM)
            signal_group(b, signal.SIGTERM)
            rcs = {name: p.wait(timeout=st.shutdown_timeout + 30) for name, p in (("a", a), ("b", b))}
            took = time.monotonic() - t0
            assert rcs == {"a": 0, "b": 0}
            assert took < st.shutdown_timeout + 10, f"stopping took {took:.1f}s"
            assert_stopped_with_what_the_files_hold(st)
    finally:
        a.kill()
        b.kill()
    consume_until_idle(st.model_copy(update={"exit_when_idle": 2.0, "prefect_enabled": False}), fake_models())
    assert_exactly_once(st.output_dir, versions(events))
    assert_summary_matches_files(st.output_dir)
    assert committed_offsets(st) == partition_ends(st, expected=len(events))


@pytest.mark.slow
@pytest.mark.parametrize("during", ["on_revoked", "on_assigned"])
def test_sigterm_during_a_revoke_or_an_assignment_exits_0_within_the_shutdown_timeout_and_loses_nothing(
    services, s3, bucket, settings_factory, speech_corpus, tmp_path, during
):
    """A second member joins; the first gets SIGTERM (to its process group) while the rebalance
    callback is running (held open by METAVOICE_DELAY_AT). It finishes the revoke, takes no new
    assignment, exits 0 within shutdown_timeout; the second ends up with every event once."""
    from tests.consumer_process import Trickle, assert_summary_matches_files

    st = settings_factory(batch_max_events=2, roll_max_rows=4, roll_max_seconds=1.0, exit_when_idle=None, shutdown_timeout=15.0)
    create_topics(st)
    trickle = Trickle(st, upload_copies(s3, bucket, [c.path for c in speech_corpus[:3]], 60), interval=0.2)
    first = ConsumerProcess(services, st, tmp_path / "first.log", METAVOICE_DELAY_AT=f"{during}:5").start()
    second = ConsumerProcess(services, st, tmp_path / "second.log")
    try:
        with logs_on_failure(first, second):
            wait_until(lambda: assignments(first) >= 1 and "partitions assigned: " + st.topic in first.log(), 90,
                       "the first member's assignment", first)
            trickle.start()
            wait_until(lambda: len(writer_ids(st.output_dir)) >= 1, 60, "a first file", first)
            revokes = first.log().count("partitions revoked")
            second.start()
            if during == "on_revoked":
                wait_until(lambda: first.log().count("partitions revoked") > revokes, 60, "the revoke began", first, second)
            else:
                wait_until(lambda: assignments(second) >= 1, 90, "the new assignment was handed out", first, second)
            time.sleep(1.0)  # inside the callback's 5 s
            t0 = time.monotonic()
            signal_group(first, signal.SIGTERM)
            rc = first.wait(timeout=st.shutdown_timeout + 30)
            took = time.monotonic() - t0
            assert rc == 0 and took < st.shutdown_timeout + 2, f"exit {rc} after {took:.1f}s"
            assert_stopped_with_what_the_files_hold(st)
            events = trickle.finish(timeout=60)
            wait_for_rows(st.output_dir, len(events), timeout=120)
            signal_group(second, signal.SIGTERM)
            assert second.wait(timeout=st.shutdown_timeout + 30) == 0
            assert_exactly_once(st.output_dir, versions(events))
            assert_summary_matches_files(st.output_dir)
            assert committed_offsets(st) == partition_ends(st, expected=len(events))
    finally:
        first.kill()
        second.kill()


# --- item 6: a revoke during an account-wide fault --------------------------------------------------
@pytest.mark.slow
def test_a_revoke_during_an_s3_outage_completes_within_its_budget_and_loses_nothing(
    services, s3, bucket, settings_factory, speech_corpus, tmp_path
):
    """S3 is down for the first member: its batches wait out the fault (FaultWatch), its fetch
    loop is blocked behind them holding the fetch lock. A second member joins: the revoke gives up
    the waiting batches (their offsets uncommitted: read again) and completes in seconds, not
    after the fault timeout; once S3 is back every event is a row once."""
    from tests.consumer_process import TcpOutage, assert_summary_matches_files

    outage = TcpOutage(services.s3.port)
    st = settings_factory(batch_max_events=2, roll_max_rows=4, roll_max_seconds=1.0, exit_when_idle=None,
                          s3_retry_attempts=4, fault_timeout_s=300.0, shutdown_timeout=20.0)
    events = published(st, s3, bucket, speech_corpus, 40)
    first = ConsumerProcess(services, st.model_copy(update={"s3_endpoint_url": outage.url}), tmp_path / "first.log",
                            METAVOICE_TEST_WHISPER_DELAY="0.3")
    second = ConsumerProcess(services, st, tmp_path / "second.log")
    try:
        with logs_on_failure(first, second):
            first.start()
            wait_until(lambda: len(writer_ids(st.output_dir)) >= 1, 90, "a first file", first)
            outage.cut()
            first.wait_for_log("not blamed on any object", timeout=60)
            time.sleep(3.0)  # the pipeline fills up behind the waiting batches
            second.start()
            t0 = time.monotonic()
            wait_until(lambda: assignments(second) >= 1, 120, "the second member's assignment", first, second)
            took = time.monotonic() - t0
            # the join itself takes a few seconds (Tansu holds a JoinGroup ~half the session timeout)
            assert took < 45, f"the rebalance took {took:.0f}s: the revoke waited out the fault"
            assert first.proc.poll() is None, "the revoke failed instead of completing"
            outage.restore()
            wait_for_rows(st.output_dir, len(events), timeout=120)
            signal_group(first, signal.SIGTERM)
            signal_group(second, signal.SIGTERM)
            assert first.wait(timeout=60) == 0 and second.wait(timeout=60) == 0
            assert_exactly_once(st.output_dir, versions(events))
            assert_summary_matches_files(st.output_dir)
            assert committed_offsets(st) == partition_ends(st, expected=len(events))
    finally:
        first.kill()
        second.kill()
        outage.close()


# --- item 7: a stop the group holds, and the backstop ----------------------------------------------
def whole_log(st, events: int) -> dict[int, int | None]:
    """The committed offsets a group that finished the log has: each partition's end (None: empty)."""
    return {p: (end or None) for p, end in partition_ends(st, expected=events).items()}


def held_group(services, st, tmp_path, events) -> ConsumerProcess:
    """A member that owns every partition, has applied `events`, and is then frozen (SIGSTOP) with
    a 30 s session: the broker holds any join of the group until it answers or its session ends."""
    holder = ConsumerProcess(services, st.model_copy(update={"kafka_session_timeout_ms": 30_000}), tmp_path / "holder.log").start()
    holder.wait_for_log("partitions assigned", timeout=90)
    wait_for_rows(st.output_dir, len(events), timeout=90)
    holder.signal(signal.SIGSTOP)
    return holder


def finish_with(holder: ConsumerProcess, st, events) -> None:
    """The holder wakes, stops cleanly, and the files and the broker hold every event once."""
    from tests.consumer_process import assert_summary_matches_files

    holder.signal(signal.SIGCONT)
    signal_group(holder, signal.SIGTERM)
    assert holder.wait(timeout=st.shutdown_timeout + 30) == 0
    assert_exactly_once(st.output_dir, versions(events))
    assert_summary_matches_files(st.output_dir)
    assert committed_offsets(st) == whole_log(st, len(events))


@pytest.mark.slow
def test_sigterm_before_the_first_assignment_exits_0_promptly(services, s3, bucket, settings_factory, speech_corpus, tmp_path):
    """A consumer whose first assignment the group holds (a member that does not answer) gets
    SIGTERM: it has nothing to drain and exits 0 within seconds, having written and committed
    nothing - not when the group finally assigns, nor at the stop backstop with 1."""
    st = settings_factory(batch_max_events=2, roll_max_rows=4, roll_max_seconds=1.0, exit_when_idle=None, shutdown_timeout=20.0)
    events = published(st, s3, bucket, speech_corpus, 8)
    holder = joiner = None
    try:
        holder = held_group(services, st, tmp_path, events)
        files_before, committed_before = writer_ids(st.output_dir), committed_offsets(st)
        joiner = ConsumerProcess(services, st, tmp_path / "joiner.log").start()
        with logs_on_failure(holder, joiner):
            joiner.wait_for_log("models ready", timeout=90)
            time.sleep(3.0)  # connected and joining: the join is the one the broker holds
            assert assignments(joiner) == 0, "the joiner was assigned: the group did not hold its join"
            t0 = time.monotonic()
            signal_group(joiner, signal.SIGTERM)
            rc = joiner.wait(timeout=st.shutdown_timeout + 30)
            took = time.monotonic() - t0
            # promptly: the join is cut after LEAVE_UNASSIGNED_S, then the interpreter exits (models unload)
            assert rc == 0 and took < 10.0, f"exit {rc} after {took:.1f}s"
            assert writer_ids(st.output_dir) == files_before and committed_offsets(st) == committed_before
            finish_with(holder, st, events)
    finally:
        for p in (holder, joiner):
            if p is not None:
                p.signal(signal.SIGCONT)
                p.kill()


@pytest.mark.slow
def test_sigterm_during_a_rebalance_the_group_holds_exits_0_within_the_shutdown_timeout(
    services, s3, bucket, settings_factory, speech_corpus, tmp_path
):
    """A member that gave up its partitions to a rebalance gets SIGTERM while the broker still
    holds its rejoin (Tansu holds a join for about half the session timeout: 20 s here). It has
    nothing of its own left to commit, so it exits 0 within shutdown_timeout: its fetch does not
    wait for the group to assign again, nor its stop for the join to end."""
    st = settings_factory(batch_max_events=2, roll_max_rows=4, roll_max_seconds=1.0, exit_when_idle=None, shutdown_timeout=10.0)
    events = published(st, s3, bucket, speech_corpus, 8)
    member = trigger = None
    try:
        member = ConsumerProcess(services, st.model_copy(update={"kafka_session_timeout_ms": 40_000}), tmp_path / "member.log").start()
        with logs_on_failure(member):
            member.wait_for_log("partitions assigned", timeout=90)
            wait_for_rows(st.output_dir, len(events), timeout=90)
            files_before = writer_ids(st.output_dir)
            trigger = ConsumerProcess(services, st, tmp_path / "trigger.log").start()  # a join: the group rebalances
            wait_until(lambda: "partitions revoked" in member.log(), 90, "the member's revoke", member)
            time.sleep(1.0)  # revoked, rejoining: the broker holds the join
            assert assignments(member) == 1, "the rejoin was not held"
            t0 = time.monotonic()
            signal_group(member, signal.SIGTERM)
            rc = member.wait(timeout=st.shutdown_timeout + 30)
            took = time.monotonic() - t0
            assert rc == 0 and took < st.shutdown_timeout, f"exit {rc} after {took:.1f}s"
            assert writer_ids(st.output_dir) == files_before
            assert_stopped_with_what_the_files_hold(st)
            # the other member finishes: every event once, the whole log committed
            signal_group(trigger, signal.SIGTERM)
            assert trigger.wait(timeout=st.shutdown_timeout + 30) == 0
            assert_exactly_once(st.output_dir, versions(events))
            assert committed_offsets(st) == whole_log(st, len(events))
    finally:
        for p in (member, trigger):
            if p is not None:
                p.kill()


@pytest.mark.slow
def test_a_stop_held_past_the_shutdown_timeout_exits_1_at_the_backstop_and_a_restart_loses_nothing(
    services, s3, bucket, settings_factory, speech_corpus, tmp_path
):
    """The last finalize after SIGTERM hangs (METAVOICE_DELAY_AT=finalize, before the publish):
    the stop backstop ends the process with 1 at shutdown_timeout + STOP_BACKSTOP_MARGIN_S, having
    published and committed nothing; a restart writes every event once."""
    from consumer.app import STOP_BACKSTOP_MARGIN_S
    from tests.conftest import consume_until_idle
    from tests.consumer_process import assert_summary_matches_files, fake_models

    st = settings_factory(batch_max_events=2, roll_max_rows=1000, roll_max_seconds=600.0, exit_when_idle=None, shutdown_timeout=5.0)
    events = published(st, s3, bucket, speech_corpus, 6)
    proc = ConsumerProcess(services, st, tmp_path / "held.log", METAVOICE_DELAY_AT="finalize:120")
    try:
        with logs_on_failure(proc):
            proc.start()
            wait_until(lambda: rows_applied(proc) >= len(events), 90, "every event applied to the open file", proc)
            t0 = time.monotonic()
            proc.signal(signal.SIGTERM)
            rc = proc.wait(timeout=st.shutdown_timeout + STOP_BACKSTOP_MARGIN_S + 30)
            took = time.monotonic() - t0
            bound = st.shutdown_timeout + STOP_BACKSTOP_MARGIN_S
            assert rc == 1 and bound - 0.5 <= took < bound + 5, f"exit {rc} after {took:.1f}s (backstop at {bound:g}s)"
            assert writer_ids(st.output_dir) == set(), "the held finalize published a file"
            assert set(committed_offsets(st).values()) == {None}, "offsets were committed without their file"
    finally:
        proc.kill()
    consume_until_idle(st.model_copy(update={"exit_when_idle": 2.0, "roll_max_seconds": 1.0}), fake_models())
    assert_exactly_once(st.output_dir, versions(events))
    assert_summary_matches_files(st.output_dir)
    assert committed_offsets(st) == whole_log(st, len(events))


def test_exit_when_idle_does_not_stop_a_consumer_between_a_revoke_and_its_next_assignment(tmp_path):
    """Quiet while the group rebalances is not idle: between a revoke and the next assignment (a
    rejoin the broker may hold for many seconds) the consumer holds no partition, and stopping
    then leaves records that a departed peer gave up unread by anyone (the soak's final drain lost
    two events so). The real consumer's idle watch, after a first assignment and a revoke."""
    import asyncio

    from aiokafka.structs import TopicPartition

    from consumer.app import JOIN_GRACE_SECONDS, StreamConsumer
    from consumer.batcher import Batcher
    from pipeline.config import Settings

    async def run() -> None:
        st = Settings(output_dir=str(tmp_path / "out"), exit_when_idle=0.5, prefect_enabled=False)
        app = StreamConsumer(st)
        app.batcher = Batcher(app.ledger, st.batch_max_events, st.batch_max_bytes, st.batch_linger_ms)  # empty
        app._first_assignment = False  # it had partitions
        await app.on_revoked({TopicPartition("events", 0)})
        app._last_record_at = time.monotonic() - 10  # quiet for far longer than the idle time
        watch = asyncio.ensure_future(app._idle_watch())
        await asyncio.sleep(2.0)
        assert not app.stop_event.is_set(), f"stopped while awaiting an assignment: {app.stats.stop_reason}"
        # a rejoin that never ends is bounded like a first join: idle + JOIN_GRACE_SECONDS
        app._last_record_at = time.monotonic() - (0.5 + JOIN_GRACE_SECONDS)
        await asyncio.wait_for(app.stop_event.wait(), timeout=5)
        await watch

    asyncio.run(run())


