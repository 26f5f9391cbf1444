"""Nothing lost, nothing doubled: the consumer killed with SIGKILL at its worst moments, a
second consumer joining and one dying in a shared group, SIGTERM mid-stream - and in the end
every valid event is in the finalized Parquet files exactly once by (bucket, id, etag), the
footers cover every offset of every partition once, no in-progress file remains, summary.json
equals the aggregates recomputed from the rows, and the group's committed offsets reached the
end of the log.

Killed and stopped consumers are real child processes running the consumer CLI (crash points:
`METAVOICE_CRASH_AT`, see pipeline/faults.py); restarts run in-process. Whisper is replaced by
`FakeWhisper` here: what is tested is Kafka, S3, the files and the process lifetimes.
"""

from __future__ import annotations

import signal
import time
import uuid

import boto3
import pytest

from pipeline.ledger import OutputLedger
from metavoice.local_services import MOTO_CREDENTIALS, MOTO_REGION
from tests.output_files import finalized_files
from tests.conftest import consume_until_idle, test_settings
from tests.consumer_process import (
    ConsumerProcess,
    Trickle,
    assert_exactly_once,
    assert_offsets_contiguous,
    assert_summary_matches_files,
    committed_offsets,
    create_topics,
    fake_models,
    logs_on_failure,
    partition_ends,
    publish,
    upload_copies,
    versions,
    wait_for_files,
    wait_for_rows,
    writer_ids,
)

pytestmark = pytest.mark.integration

# (crash point, the n-th time it is reached): late enough that finalized files exist before the kill.
# With pipeline_depth batches in flight, batch k starts only once batch k - depth was awaited, and
# the commit loop applies (and rolls) batches in order: with depth <= 3, batches 1-2 are in files
# before the 11th download or the 5th transcription.
CRASHES = [
    ("download", 11),  # mid-download of the 6th micro-batch
    ("transcribe", 5),  # mid-transcription of the 5th micro-batch
    ("after_rename", 2),  # the 2nd file is renamed into place, never committed to the table
    ("after_table_commit", 2),  # the 2nd file is in the table, its offsets never committed to the broker
    ("mid_summary_write", 3),  # half of summary.json's temp file written (the 1st write is _manifest.json)
]


@pytest.fixture(scope="module")
def models():
    m = fake_models()
    yield m
    m.close()


def small_stream(settings_factory, **overrides):
    """Two events per micro-batch and per file: several files exist before any crash."""
    base = dict(batch_max_events=2, roll_max_rows=2, kafka_session_timeout_ms=6000, exit_when_idle=1.0)
    return settings_factory(**{**base, **overrides})


def arrange(s3, bucket, st, speech_corpus, count):
    events = upload_copies(s3, bucket, [c.path for c in speech_corpus[:3]], count)
    create_topics(st)
    publish(st, events)
    return events


def assert_nothing_lost_nothing_doubled(st, events) -> None:
    assert_exactly_once(st.output_dir, versions(events))
    assert_summary_matches_files(st.output_dir)
    ends = partition_ends(st, expected=len(events))
    assert sum(ends.values()) == len(events)
    assert_offsets_contiguous(st.output_dir, ends)
    assert committed_offsets(st) == {p: (end or None) for p, end in ends.items()}


@pytest.fixture(scope="module")
def crashed(services, s3_admin, tmp_path_factory, speech_corpus):
    """Every crash scenario's consumer, started at once: each dies by a count, not by timing, so
    they need not take turns. name -> (settings, events, the dead child)."""
    scenarios = {point: (dict(pipeline_depth=3), 12, f"{point}:{nth}") for point, nth in CRASHES}
    scenarios["last_commit"] = (dict(roll_max_rows=100), 4, "after_table_commit:1")  # one file, finalized at the idle exit
    runs = {}
    for name, (overrides, count, crash_at) in scenarios.items():
        root, unique = tmp_path_factory.mktemp(f"crash-{name}"), uuid.uuid4().hex[:10]
        st = small_stream(lambda **o: test_settings(services, unique, root / "out", **o), **overrides)
        s3_admin.create_bucket(Bucket=f"bucket-{unique}")
        events = arrange(s3_admin, f"bucket-{unique}", st, speech_corpus, count)
        runs[name] = (st, events, ConsumerProcess(services, st, root / "crashed.log", METAVOICE_CRASH_AT=crash_at).start())
    for _, _, child in runs.values():
        child.wait(timeout=120)
    return runs


@pytest.fixture(scope="module")
def s3_admin(services):
    return boto3.client("s3", endpoint_url=services.s3_endpoint_url, region_name=MOTO_REGION,
                        aws_access_key_id=MOTO_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=MOTO_CREDENTIALS["AWS_SECRET_ACCESS_KEY"])


@pytest.mark.slow
@pytest.mark.parametrize("point", [c[0] for c in CRASHES])
def test_kill_9_then_restart_keeps_every_event_exactly_once(point, crashed, models):
    st, events, child = crashed[point]
    with logs_on_failure(child):
        assert child.proc.returncode == -signal.SIGKILL, "the crash point did not kill the consumer"
        assert finalized_files(st.output_dir), "the crash came before any file was finalized: move it later"

    consume_until_idle(st, models)  # the restart, without METAVOICE_CRASH_AT

    assert_nothing_lost_nothing_doubled(st, events)


@pytest.mark.slow
def test_kill_after_the_last_table_commit_restart_commits_and_repairs_the_summary(crashed, models):
    """The worst spot for the *last* file: in the table, but no summary and no broker commit, and no
    event left to process. The restart must still bring summary.json and the broker up to the table."""
    st, events, child = crashed["last_commit"]
    with logs_on_failure(child):
        assert child.proc.returncode == -signal.SIGKILL
        assert len(finalized_files(st.output_dir)) == 1
        assert not (st.output_dir / "summary.json").exists()  # the crash came before the first summary write
        assert all(o is None for o in committed_offsets(st).values())

    stats = consume_until_idle(st, models)

    assert stats.rows == 0 and stats.files == 0  # nothing was processed twice
    assert_nothing_lost_nothing_doubled(st, events)


@pytest.mark.slow
def test_two_consumers_one_joining_one_killed_share_the_stream_exactly_once(
    services, s3, bucket, settings_factory, speech_corpus, tmp_path
):
    # The survivor is stopped with SIGTERM at the end; files roll within a second even when half full.
    st = small_stream(settings_factory, exit_when_idle=None, roll_max_seconds=1.0)
    create_topics(st)
    # A stream that flows (~3 events a second) until the group has changed twice, then 12 more.
    trickle = Trickle(st, upload_copies(s3, bucket, [c.path for c in speech_corpus[:3]], 120), interval=0.35)
    slow = {"METAVOICE_TEST_WHISPER_DELAY": "0.2"}

    first = ConsumerProcess(services, st, tmp_path / "first.log", **slow).start()
    second = None
    try:
        first.wait_for_log("partitions assigned", timeout=60)
        trickle.start()
        second = ConsumerProcess(services, st, tmp_path / "second.log", **slow).start()  # joins mid-stream
        second.wait_for_log("partitions assigned", timeout=60)
        deadline = time.monotonic() + 30
        while len(writer_ids(st.output_dir)) < 2:  # both have finalized files
            assert time.monotonic() < deadline, f"the second consumer never finalized a file:\n{second.log()[-3000:]}"
            time.sleep(0.1)

        first.kill()  # SIGKILL mid-stream; the survivor takes over its partitions after the session timeout
        trickle.then_stop_after(12)
        events = trickle.finish(timeout=60)
        wait_for_rows(st.output_dir, len(events), timeout=60)
        second.signal(signal.SIGTERM)
        assert second.wait(timeout=30) == 0, second.log()[-3000:]
    finally:
        first.kill()
        if second is not None:
            second.kill()

    with logs_on_failure(first, second):
        assert len(writer_ids(st.output_dir)) == 2  # both did work
        assert "partitions revoked" in first.log(), "the join should have made the first consumer hand partitions over"
        assert_nothing_lost_nothing_doubled(st, events)


@pytest.mark.slow
def test_sigterm_mid_stream_exits_0_promptly_and_a_restart_finishes_exactly_once(
    services, s3, bucket, settings_factory, speech_corpus, models, tmp_path
):
    st = small_stream(settings_factory, exit_when_idle=30.0, shutdown_timeout=8.0)
    # 30 events: a stop drains what was already fetched (up to ~5 micro-batches), the rest must remain
    events = arrange(s3, bucket, st, speech_corpus, 30)

    proc = ConsumerProcess(services, st, tmp_path / "consumer.log", METAVOICE_TEST_WHISPER_DELAY="0.15").start()
    try:
        wait_for_files(st.output_dir, 1, timeout=60, proc=proc)
        proc.signal(signal.SIGTERM)
        t0 = time.monotonic()
        rc = proc.wait(timeout=20)
        took = time.monotonic() - t0
    finally:
        proc.kill()
    assert rc == 0, proc.log()[-3000:]
    assert took < st.shutdown_timeout + 3, f"SIGTERM took {took:.1f}s, over the drain bound (+3 s to leave the group)"
    assert "stopping: SIGTERM" in proc.log()

    # Everything the broker has as committed is in the files (nothing committed is lost) ...
    held = OutputLedger(st.output_dir, group=st.group)
    held.refresh()
    stopped_at = committed_offsets(st)
    assert any(o is not None for o in stopped_at.values())
    for p, off in stopped_at.items():
        assert off == held.next_offset(st.topic, p), "a graceful stop commits exactly what its files hold"
    assert len(events) > sum(o or 0 for o in stopped_at.values()), f"SIGTERM came too late to test anything:\n{proc.log()}"

    consume_until_idle(st.model_copy(update={"exit_when_idle": 1.0}), models)  # ... and the restart does the rest

    assert_nothing_lost_nothing_doubled(st, events)
