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
