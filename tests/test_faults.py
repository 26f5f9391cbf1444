"""Faults of the world around the consumer: S3 going away for a while, a disk that refuses a
write or a rename, credentials that must not leak. Transient faults are waited out (nothing
dead-lettered for them); a disk fault stops the consumer with OutputWriteFailed and commits
nothing the finalized files do not hold; secrets never reach logs, dead letters or outputs.
"""

from __future__ import annotations

import logging
import subprocess
import threading
import time
import uuid

import orjson
import pyarrow.parquet as pq
import pytest
from botocore.exceptions import ResponseStreamingError

from consumer.cli import pipeline_errors
from pipeline.errors import OutputWriteFailed, StorageOutage, StorageUnavailable
from pipeline.events import ObjectEvent
from pipeline.ledger import OutputLedger
from metavoice.local_services import MOTO_CREDENTIALS
from pipeline.output.layout import INPROGRESS_SUFFIX
from tests.output_files import finalized_files, inprogress_files, read_footer
from pipeline.storage import classify_s3_error
from tests.conftest import consume_until_idle, read_topic
from tests.consumer_process import (
    ConsumerProcess,
    TcpOutage,
    assert_exactly_once,
    assert_summary_matches_files,
    committed_offsets,
    create_topics,
    fake_models,
    output_rows,
    publish,
    upload_copies,
    versions,
    wait_for_files,
)


@pytest.fixture(scope="module")
def models():
    m = fake_models()
    yield m
    m.close()


class Background(threading.Thread):
    """`consume_until_idle` in a thread, so the test can break things while it runs."""

    def __init__(self, settings, models) -> None:
        super().__init__(daemon=True)
        self.settings, self.models = settings, models
        self.stats = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.stats = consume_until_idle(self.settings, self.models)
        except BaseException as exc:  # the test inspects it
            self.error = exc

    def finish(self, timeout: float = 60):
        self.join(timeout)
        assert not self.is_alive(), "the consumer did not stop"
        return self


def arrange(s3, bucket, st, speech_corpus, count):
    events = upload_copies(s3, bucket, [c.path for c in speech_corpus[:3]], count)
    create_topics(st)
    publish(st, events)
    return events


# --- S3 ---------------------------------------------------------------------------------------
def test_a_connection_lost_mid_download_is_transient_not_a_crash():
    """aiobotocore raises ResponseStreamingError when the connection drops while the body is read."""
    exc = ResponseStreamingError(error=ConnectionResetError("reset by peer"))
    assert isinstance(classify_s3_error(exc, "b", "k.flac"), StorageUnavailable)


@pytest.mark.integration
def test_s3_down_for_seconds_mid_stream_is_waited_out_and_nothing_is_dead_lettered(
    services, s3, bucket, settings_factory, speech_corpus, models, caplog
):
    outage = TcpOutage(services.s3.port)  # the consumer reaches S3 only through this relay
    # 20 attempts of capped exponential backoff (0.2 s doubling, 10 s cap, jitter) wait out
    # far more than the 3 s outage; the default 8 attempts ride out roughly 20-30 s.
    # One micro-batch in flight: downloads cannot all finish ahead of the model before the outage.
    st = settings_factory(s3_endpoint_url=outage.url, s3_retry_attempts=20, batch_max_events=2, roll_max_rows=2,
                          pipeline_depth=1, exit_when_idle=1.5)
    events = arrange(s3, bucket, st, speech_corpus, 12)
    models.transcriber.delay = 0.2  # keep the stream in flight while S3 is away
    caplog.set_level(logging.WARNING, logger="pipeline.storage")
    try:
        consumer = Background(st, models)
        consumer.start()
        wait_for_files(st.output_dir, 1, timeout=30)
        outage.cut()
        time.sleep(3)
        outage.restore()
        consumer.finish()
    finally:
        models.transcriber.delay = 0.0
        outage.close()

    assert consumer.error is None, consumer.error
    assert "S3 unavailable, retrying" in caplog.text, "the outage came too late: no download felt it"
    assert consumer.stats.dead_letters == 0
    assert read_topic(st, st.dlq_topic, expected=0, timeout=2) == []
    assert_exactly_once(st.output_dir, versions(events))
    assert_summary_matches_files(st.output_dir)


@pytest.mark.integration
def test_s3_down_past_the_fault_timeout_stops_without_committing_or_dead_lettering(
    services, s3, bucket, settings_factory, speech_corpus, models
):
    """Objects fail past their retries and a probe of the bucket fails too: an outage, not the
    objects' fault. The batch is retried with backoff; past fault_timeout_s the consumer stops."""
    outage = TcpOutage(services.s3.port)
    outage.cut()  # down from the start, for longer than the fault timeout
    st = settings_factory(s3_endpoint_url=outage.url, s3_retry_attempts=2, exit_when_idle=1.5, fault_timeout_s=4.0)
    arrange(s3, bucket, st, speech_corpus, 2)
    try:
        consumer = Background(st, models)
        consumer.run()
    finally:
        outage.close()

    assert [type(e) for e in pipeline_errors(consumer.error)] == [StorageOutage], consumer.error
    assert all(o is None for o in committed_offsets(st).values())
    assert read_topic(st, st.dlq_topic, expected=0, timeout=2) == []


# --- the disk ---------------------------------------------------------------------------------
def assert_stopped_with_output_write_failed(consumer: Background) -> None:
    assert consumer.error is not None, "the consumer should have failed"
    errors = pipeline_errors(consumer.error)
    assert [type(e) for e in errors] == [OutputWriteFailed], consumer.error


def assert_no_partial_files(output_dir) -> None:
    data = output_dir / "data"
    assert not inprogress_files(output_dir)
    for p in data.glob("*.parquet"):
        if p.is_file():
            read_footer(p)  # every file that looks finalized is whole: footer readable


@pytest.mark.integration
def test_an_output_dir_that_cannot_be_written_stops_with_output_write_failed_and_commits_nothing(
    s3, bucket, settings_factory, speech_corpus, models
):
    st = settings_factory(exit_when_idle=1.5)
    arrange(s3, bucket, st, speech_corpus, 2)
    st.output_dir.mkdir(parents=True)
    (st.output_dir / "data").write_text("a file where the data directory should be")  # mkdir fails, even for root

    consumer = Background(st, models)
    consumer.run()

    assert_stopped_with_output_write_failed(consumer)
    assert all(o is None for o in committed_offsets(st).values())


@pytest.mark.integration
def test_a_failed_rename_commits_nothing_and_leaves_no_partial_parquet(s3, bucket, settings_factory, speech_corpus, models):
    st = settings_factory(batch_max_events=2, roll_max_rows=100, exit_when_idle=1.5)  # one file, renamed at the idle exit
    arrange(s3, bucket, st, speech_corpus, 3)
    data = st.output_dir / "data"

    consumer = Background(st, models)
    consumer.start()
    deadline = time.monotonic() + 30
    while not (inprogress := inprogress_files(st.output_dir)):
        assert time.monotonic() < deadline and consumer.is_alive(), "no in-progress file appeared"
        time.sleep(0.01)
    final = data / (inprogress[0].name.removesuffix(INPROGRESS_SUFFIX) + ".parquet")
    final.mkdir(parents=True)  # the final name is taken by a directory: the rename must fail (even for root)
    consumer.finish()

    assert_stopped_with_output_write_failed(consumer)
    assert all(o is None for o in committed_offsets(st).values())
    assert [p for p in data.glob("*.parquet") if p.is_file()] == []
    assert_no_partial_files(st.output_dir)


@pytest.fixture
def small_disk(settings_factory):
    """The output directory on a 160 KiB tmpfs: room for a few files, then ENOSPC.

    A table's first log entry is ~11 KB and a two-row file ~24 KB; at 64 KiB only one file
    fitted, and under load the first commit could miss it (CI, stop 24)."""
    st = settings_factory(batch_max_events=2, roll_max_rows=2, exit_when_idle=1.5)
    data = st.output_dir
    data.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(data)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"needs permission to mount a tmpfs: {mounted.stderr.decode().strip()}")
    try:
        yield st
    finally:
        subprocess.run(["umount", "-l", str(data)], check=False)


@pytest.mark.integration
def test_a_full_disk_mid_stream_commits_only_what_whole_files_hold_and_a_restart_with_room_finishes(
    s3, bucket, speech_corpus, models, small_disk
):
    st = small_disk
    events = arrange(s3, bucket, st, speech_corpus, 16)  # ~8 rows fit in 160 KiB; 16 need ~260 KiB

    consumer = Background(st, models)
    consumer.run()

    assert_stopped_with_output_write_failed(consumer)
    assert "No space left on device" in str(pipeline_errors(consumer.error)[0])
    assert_no_partial_files(st.output_dir)
    held = OutputLedger(st.output_dir, group=st.group)
    held.refresh()
    assert 0 < len(held.index) < len(events), "the disk should fill up mid-stream"
    # Kafka may lag the table (the fault can land between a table commit and the offset commit:
    # a restart resumes from the table), but it never runs ahead of what the table holds.
    committed = committed_offsets(st)
    beyond = {p: (c, held.next_offset(st.topic, p)) for p, c in committed.items()
              if (c or 0) > (held.next_offset(st.topic, p) or 0)}
    assert not beyond, f"committed beyond the files: {beyond}"

    subprocess.run(["mount", "-o", "remount,size=16m", str(st.output_dir)], check=True)
    consume_until_idle(st, models)
    assert_exactly_once(st.output_dir, versions(events))
    assert_summary_matches_files(st.output_dir)


# --- secrets ----------------------------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.slow
def test_s3_credentials_never_appear_in_logs_dead_letters_or_outputs(
    services, s3, bucket, settings_factory, speech_corpus, tmp_path
):
    key_id, secret = f"AKIA{uuid.uuid4().hex[:16].upper()}", f"sk-{uuid.uuid4().hex}{uuid.uuid4().hex}"
    st = settings_factory(exit_when_idle=1.5, batch_max_events=4)
    good = upload_copies(s3, bucket, [speech_corpus[0].path], 1)
    s3.put_object(Bucket=bucket, Key="bad.flac", Body=b"not audio")
    bad = ObjectEvent(bucket=bucket, key="bad.flac", size=9)
    create_topics(st)
    publish(st, [*good, bad, (b"m", b"{not json")])

    proc = ConsumerProcess(
        services, st, tmp_path / "consumer.log",
        unset=tuple(MOTO_CREDENTIALS),  # the METAVOICE_S3_* pair is the only way in: downloads prove it is used
        METAVOICE_S3_ACCESS_KEY_ID=key_id, METAVOICE_S3_SECRET_ACCESS_KEY=secret,
        METAVOICE_LOG_LEVEL="DEBUG", METAVOICE_LOG_FORMAT="json",
    ).start()
    try:
        assert proc.wait(timeout=90) == 0, proc.log()[-3000:]
    finally:
        proc.kill()

    assert [r["id"] for r in output_rows(st.output_dir)] == [good[0].key]  # S3 was reached with these credentials
    letters = read_topic(st, st.dlq_topic, expected=2)
    assert len(letters) == 2
    places = {"log": proc.log().encode(), "dead letters": b"\n".join(r.value + (r.key or b"") for r in letters)}
    for p in sorted(st.output_dir.rglob("*")):
        if p.is_file():
            places[str(p.relative_to(st.output_dir))] = p.read_bytes()
    for p in finalized_files(st.output_dir):
        places[f"{p.name} metadata"] = orjson.dumps({k.decode(): v.decode(errors="replace")
                                                    for k, v in (pq.read_metadata(p).metadata or {}).items()})
    assert {"_manifest.json", "summary.json"} <= places.keys()
    for where, content in places.items():
        for value in (key_id, secret):
            assert value.encode() not in content, f"a credential leaked into {where}"
