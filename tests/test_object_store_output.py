"""Consumers on different machines share one s3:// dataset: no shared directory, no lock.

Each consumer here is a real child process with its own spool directory (as on its own node),
writing to one prefix on the real S3 server; Whisper is replaced by `FakeWhisper`. In the end
every event is in the dataset exactly once, the footers cover every offset once, summary.json
equals what the rows say, and the group's offsets reached the end of the log.
"""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from pipeline.output import open_output
from tests.conftest import consume_until_idle
from tests.consumer_process import (
    REPO,
    ConsumerProcess,
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
    writer_ids,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def models():
    m = fake_models()
    yield m
    m.close()


@pytest.fixture
def s3_stream(s3, bucket, settings_factory, speech_corpus, unique, tmp_path):
    """Settings whose output is s3://out-<unique>/dataset, and the events of `count` uploads."""
    s3.create_bucket(Bucket=f"out-{unique}")

    def arrange(count: int, **overrides):
        st = settings_factory(output_dir=f"s3://out-{unique}/dataset", spool_dir=str(tmp_path / "spool-a"),
                              batch_max_events=2, roll_max_rows=2, exit_when_idle=2.0, **overrides)
        events = upload_copies(s3, bucket, [c.path for c in speech_corpus[:3]], count)
        create_topics(st)
        publish(st, events)
        return st, events

    return arrange


def assert_nothing_lost_nothing_doubled(st, events) -> None:
    out = open_output(st.output_dir, st)
    assert_exactly_once(out, versions(events))
    assert_summary_matches_files(out)
    ends = partition_ends(st, expected=len(events))
    assert_offsets_contiguous(out, ends)
    assert committed_offsets(st) == {p: (end or None) for p, end in ends.items()}


def test_two_consumers_with_no_shared_directory_write_one_prefix_every_event_once(services, s3_stream, tmp_path):
    st, events = s3_stream(24)
    first = ConsumerProcess(services, st, tmp_path / "a.log", METAVOICE_TEST_WHISPER_DELAY="0.1").start()
    second = ConsumerProcess(services, st.model_copy(update={"spool_dir": str(tmp_path / "spool-b")}), tmp_path / "b.log",
                             METAVOICE_TEST_WHISPER_DELAY="0.1").start()
    try:
        codes = (first.wait(timeout=180), second.wait(timeout=180))
    finally:
        first.kill()
        second.kill()
    with logs_on_failure(first, second):
        assert codes == (0, 0)
        assert len(writer_ids(open_output(st.output_dir, st))) == 2, "both consumers should have written files"
        assert not (tmp_path / "out").exists(), "nothing may be written to a local output directory"
        assert_nothing_lost_nothing_doubled(st, events)


@pytest.mark.parametrize("crash_at, in_table", [("after_upload:2", 1), ("after_table_commit:2", 2), ("after_summary:2", 2)])
def test_kill_9_between_upload_and_commit_then_restart_keeps_every_event_once(
    services, s3_stream, models, tmp_path, crash_at, in_table
):
    """Killed after the 2nd upload (not in the table: its events are processed again), after its table
    commit (before the broker's commit: the restart seeks past it from the app transactions), and
    after its summary write."""
    st, events = s3_stream(12)
    child = ConsumerProcess(services, st, tmp_path / "crashed.log", METAVOICE_CRASH_AT=crash_at).start()
    rc = child.wait(timeout=120)
    with logs_on_failure(child):
        assert rc == -signal.SIGKILL, "the crash point did not kill the consumer"
        assert len(open_output(st.output_dir, st).finalized()) == in_table

    consume_until_idle(st.model_copy(update={"exit_when_idle": 1.0}), models)  # the restart, same spool

    assert_nothing_lost_nothing_doubled(st, events)


def test_duckdb_reads_the_dataset_over_s3_with_httpfs(services, s3_stream, models):
    st, events = s3_stream(6)
    consume_until_idle(st, models)
    # duckdb in a child: its httpfs extension ships as a wheel matching the duckdb version
    script = f"""
import os, duckdb, duckdb_extension_httpfs
ext = os.path.join(os.path.dirname(duckdb_extension_httpfs.__file__), "extensions", "v" + duckdb.__version__, "httpfs.duckdb_extension")
con = duckdb.connect()
con.sql(f"LOAD '{{ext}}'")
con.sql("CREATE SECRET (TYPE s3, KEY_ID 'testing', SECRET 'testing', REGION 'us-east-1', ENDPOINT '{services.s3_endpoint_url.removeprefix('http://')}', URL_STYLE 'path', USE_SSL false)")
print(con.sql("select count(*), count(distinct id) from '{st.output_dir}/data/*.parquet'").fetchone())
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == f"({len(events)}, {len(events)})"
