"""Correct where live streams are: re-uploads, rewinds of a committed group, consumers paused past
their session, revokes during a finalize, a missing or short-lived dead-letter topic.

Real broker (Tansu), real S3 (moto), real consumer code; Whisper is `FakeWhisper` (what is tested
is versions, positions, files and commits, not transcripts). Every test reads back state: rows
and their bytes, footers, summary.json, the dead-letter topic, committed offsets, exit codes.
Race windows are widened with `METAVOICE_DELAY_AT` (pipeline/faults.py) so they are hit every time.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
from datetime import datetime, timedelta, timezone

import orjson
import pyarrow.parquet as pq
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from broker.errors import DeadLetterTopicUnusable
from broker.topics import retention_ms
from pipeline.events import ObjectEvent
from pipeline.ledger import load_summary
from tests.output_files import inprogress_files
from tests.conftest import consume_until_idle, read_topic
from tests.consumer_process import (
    ConsumerProcess,
    assert_exactly_once,
    assert_offsets_contiguous,
    assert_summary_matches_files,
    committed_offsets,
    create_topics,
    fake_models,
    footer_offsets,
    logs_on_failure,
    output_rows,
    partition_ends,
    publish,
    upload_copies,
    versions,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def models():
    m = fake_models()
    yield m
    m.close()


def rows_by_key(output_dir) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for p in sorted((output_dir / "data").glob("*.parquet")):
        for r in pq.read_table(p, columns=["id", "etag", "size_bytes", "kafka_offset"]).to_pylist():
            out.setdefault(r["id"], []).append(r)
    return out


def assert_log_fully_handled(st, published: int) -> None:
    ends = partition_ends(st, expected=published)
    assert sum(ends.values()) == published
    assert_offsets_contiguous(st.output_dir, ends)
    assert committed_offsets(st) == {p: (end or None) for p, end in ends.items()}


# --- 1. object versions ----------------------------------------------------------------------------
def test_a_key_reuploaded_before_its_first_event_is_read_makes_one_row_from_the_second_versions_bytes(
    s3, bucket, settings_factory, speech_corpus, models
):
    st = settings_factory(topic_partitions=2)
    first, second = speech_corpus[0].path.read_bytes(), speech_corpus[1].path.read_bytes()
    key = "takes/take.flac"
    etag1 = s3.put_object(Bucket=bucket, Key=key, Body=first)["ETag"].strip('"')
    # the first version's event was emitted before the re-upload (S3 keeps LastModified to the second)
    first_event_time = datetime.now(timezone.utc) - timedelta(seconds=5)
    etag2 = s3.put_object(Bucket=bucket, Key=key, Body=second)["ETag"].strip('"')  # before the consumer runs
    create_topics(st)
    publish(st, [ObjectEvent(bucket=bucket, key=key, size=len(first), etag=etag1, event_time=first_event_time),
                 ObjectEvent(bucket=bucket, key=key, size=len(second), etag=etag2)])

    stats = consume_until_idle(st, models)

    rows = rows_by_key(st.output_dir)[key]
    assert [(r["etag"], r["size_bytes"]) for r in rows] == [(etag2, len(second))], "a row must hold its own version's bytes"
    assert stats.rows == 1 and stats.superseded == 1 and stats.dead_letters == 0
    summary = orjson_summary(st)
    assert summary["superseded"] == 1 and summary["errors"]["total"] == 0
    assert_summary_matches_files(st.output_dir)
    assert read_topic(st, st.dlq_topic, expected=0, timeout=2) == []
    assert_log_fully_handled(st, 2)


def test_an_etag_that_is_no_version_of_its_object_is_a_version_mismatch_dead_letter_with_both_etags(
    s3, bucket, settings_factory, speech_corpus, models
):
    """A producer that fills `eTag` with something else (a content hash, another field) must not make
    its events vanish as "superseded": the object was not overwritten after the event."""
    st = settings_factory(topic_partitions=1)
    body = speech_corpus[2].path.read_bytes()
    good = upload_copies(s3, bucket, [speech_corpus[0].path], 1)[0]
    key = "wrong-etag.flac"
    stored = s3.put_object(Bucket=bucket, Key=key, Body=body)["ETag"].strip('"')
    wrong = "0" * 32
    create_topics(st)
    publish(st, [ObjectEvent(bucket=bucket, key=key, size=len(body), etag=wrong), good])

    stats = consume_until_idle(st, models)

    assert stats.rows == 1 and stats.superseded == 0 and stats.dead_letters == 1
    assert set(rows_by_key(st.output_dir)) == {good.key}
    (letter,) = [orjson.loads(r.value) for r in read_topic(st, st.dlq_topic, expected=1)]
    assert (letter["object"]["key"], letter["error_type"]) == (key, "VersionMismatch")
    assert wrong in letter["error"] and stored in letter["error"], letter["error"]
    summary = orjson_summary(st)
    assert summary["superseded"] == 0 and summary["errors"]["by_type"] == {"VersionMismatch": 1}
    assert_summary_matches_files(st.output_dir)
    assert_log_fully_handled(st, 2)


def test_a_wrong_etag_on_a_versioned_read_is_a_version_mismatch_even_after_a_later_version(
    s3, bucket, settings_factory, speech_corpus, models
):
    """An event naming its version id reads that version: a later version elsewhere on the key is no
    excuse for an etag the named version never had."""
    st = settings_factory(topic_partitions=1)
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    key = "versioned-wrong.flac"
    v1 = s3.put_object(Bucket=bucket, Key=key, Body=speech_corpus[3].path.read_bytes())
    s3.put_object(Bucket=bucket, Key=key, Body=speech_corpus[4].path.read_bytes())
    create_topics(st)
    publish(st, [ObjectEvent(bucket=bucket, key=key, etag="f" * 32, version_id=v1["VersionId"],
                             event_time=datetime.now(timezone.utc) - timedelta(seconds=30))])

    stats = consume_until_idle(st, models)

    assert stats.rows == 0 and stats.superseded == 0 and stats.dead_letters == 1
    (letter,) = [orjson.loads(r.value) for r in read_topic(st, st.dlq_topic, expected=1)]
    assert letter["error_type"] == "VersionMismatch" and v1["ETag"].strip('"') in letter["error"]
    assert_log_fully_handled(st, 1)


def test_an_event_without_etag_is_labelled_and_deduplicated_by_the_etag_s3_returns(
    s3, bucket, settings_factory, speech_corpus, models
):
    st = settings_factory(topic_partitions=1)
    body = speech_corpus[2].path.read_bytes()
    key = "no-etag.flac"
    etag = s3.put_object(Bucket=bucket, Key=key, Body=body)["ETag"].strip('"')
    create_topics(st)
    # The same version announced twice without an etag (a sender that leaves it out).
    publish(st, [ObjectEvent(bucket=bucket, key=key), ObjectEvent(bucket=bucket, key=key)])

    stats = consume_until_idle(st, models)

    assert [(r["etag"], r["size_bytes"]) for r in rows_by_key(st.output_dir)[key]] == [(etag, len(body))]
    assert stats.rows == 1 and stats.duplicates == 1
    assert_log_fully_handled(st, 2)


def test_with_versioning_every_versions_event_becomes_that_versions_own_row(
    s3, bucket, settings_factory, speech_corpus, models
):
    st = settings_factory(topic_partitions=1)
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    bodies = [speech_corpus[i].path.read_bytes() for i in (3, 4)]
    key = "versioned.flac"
    puts = [s3.put_object(Bucket=bucket, Key=key, Body=b) for b in bodies]
    create_topics(st)
    publish(st, [ObjectEvent(bucket=bucket, key=key, size=len(b), etag=p["ETag"].strip('"'), version_id=p["VersionId"])
                 for b, p in zip(bodies, puts)])

    stats = consume_until_idle(st, models)

    rows = rows_by_key(st.output_dir)[key]
    assert sorted((r["etag"], r["size_bytes"]) for r in rows) == sorted(
        (p["ETag"].strip('"'), len(b)) for b, p in zip(bodies, puts))
    assert stats.rows == 2 and stats.superseded == 0
    assert_log_fully_handled(st, 2)


def orjson_summary(st) -> dict:
    import orjson

    return orjson.loads((st.output_dir / "summary.json").read_bytes())


# --- 2. rewinds --------------------------------------------------------------------------------------
@pytest.mark.parametrize("rewind", ["from_beginning", "from_timestamp"])
def test_rewinding_a_group_that_committed_mid_topic_replays_every_event_once_without_a_gap(
    rewind, s3, bucket, settings_factory, speech_corpus, models, monkeypatch, tmp_path
):
    st = settings_factory(batch_max_events=4)
    events = upload_copies(s3, bucket, [c.path for c in speech_corpus[:3]], 24)
    create_topics(st)
    start = datetime.now(timezone.utc)
    time.sleep(0.2)
    publish(st, events[:12])
    assert consume_until_idle(st, models).rows == 12  # the group commits mid-topic...
    publish(st, events[12:])  # ... and the topic goes on: records wait past the committed offsets

    # Records fetched from the committed offsets arrive while the assignment is being positioned.
    monkeypatch.setenv("METAVOICE_DELAY_AT", "on_assigned:3")
    over = {"from_beginning": {"from_beginning": True}, "from_timestamp": {"from_timestamp": start.isoformat()}}[rewind]
    replay = st.model_copy(update={"output_dir": tmp_path / "replay", **over})
    stats = consume_until_idle(replay, models)

    assert stats.rows == 24
    assert_exactly_once(replay.output_dir, versions(events))
    ends = partition_ends(st, expected=24)
    assert_offsets_contiguous(replay.output_dir, ends)
    assert committed_offsets(st) == {p: (end or None) for p, end in ends.items()}


@pytest.mark.slow
def test_a_rewind_is_committed_at_once_so_a_restart_without_the_flag_does_not_skip_what_it_rewound_to(
    services, s3, bucket, settings_factory, speech_corpus, models, tmp_path
):
    st = settings_factory(topic_partitions=1, batch_max_events=2, roll_max_rows=2)
    events = upload_copies(s3, bucket, [c.path for c in speech_corpus[:3]], 8)
    create_topics(st)
    publish(st, events)
    assert consume_until_idle(st, models).rows == 8  # the group has committed the whole topic

    replay = st.model_copy(update={"output_dir": tmp_path / "replay", "from_beginning": True})
    killed = ConsumerProcess(services, replay, tmp_path / "killed.log", METAVOICE_FROM_BEGINNING="true",
                             METAVOICE_CRASH_AT="after_rename:1").start()
    with logs_on_failure(killed):
        assert killed.wait(timeout=120) == -signal.SIGKILL
    # restarted the way a supervisor does it: the same settings, without the one-off rewind flag
    consume_until_idle(replay.model_copy(update={"from_beginning": False}), models)

    assert_exactly_once(replay.output_dir, versions(events))
    assert_offsets_contiguous(replay.output_dir, {0: 8})


def test_from_timestamp_starts_a_partition_with_no_later_record_at_its_end_not_its_beginning(
    s3, bucket, settings_factory, speech_corpus, models, tmp_path
):
    st = settings_factory(topic_partitions=2)
    events = upload_copies(s3, bucket, [c.path for c in speech_corpus[:3]], 3)
    create_topics(st)
    send_to_partitions(st, [(0, events[0]), (0, events[1])])
    time.sleep(1.0)
    cut = datetime.now(timezone.utc)
    time.sleep(0.5)
    send_to_partitions(st, [(1, events[2])])  # partition 0 has nothing at or after `cut`

    stats = consume_until_idle(st.model_copy(update={"from_timestamp": cut.isoformat(), "output_dir": tmp_path / "o"}), models)

    assert stats.rows == 1
    assert [r["id"] for r in output_rows(tmp_path / "o")] == [events[2].key]


def send_to_partitions(st, placed: list[tuple[int, ObjectEvent]]) -> None:
    async def run() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=st.kafka_bootstrap, acks="all")
        await producer.start()
        try:
            for partition, e in placed:
                await producer.send_and_wait(st.topic, e.to_json(), key=e.message_key, partition=partition)
        finally:
            await producer.stop()

    asyncio.run(run())


# --- 3. fencing ----------------------------------------------------------------------------------------
def rows_applied(proc: ConsumerProcess) -> int:
    return sum(int(n) for n in re.findall(r"batch \d+: \d+ records, (\d+) rows", proc.log()))


@pytest.mark.slow
def test_a_consumer_paused_past_its_session_never_finalizes_what_the_new_owner_wrote(
    services, s3, bucket, settings_factory, speech_corpus, models, tmp_path
):
    st = settings_factory(batch_max_events=2, roll_max_rows=100, roll_max_seconds=120.0, exit_when_idle=None)
    events = upload_copies(s3, bucket, [c.path for c in speech_corpus[:3]], 12)
    create_topics(st)
    publish(st, events)

    paused = ConsumerProcess(services, st, tmp_path / "paused.log").start()
    try:
        with logs_on_failure(paused):
            deadline = time.monotonic() + 90
            while rows_applied(paused) < 12:  # every row is in its open (in-progress) file
                assert time.monotonic() < deadline and paused.proc.poll() is None, "the first consumer never applied its rows"
                time.sleep(0.1)
            assert inprogress_files(st.output_dir)
            paused.signal(signal.SIGSTOP)  # a VM pause, swapping, a long GC: no heartbeats

            # The new owner takes over after the session timeout and writes every row itself.
            owner = consume_until_idle(st.model_copy(update={"exit_when_idle": 2.0, "roll_max_seconds": 2.0}), models)
            assert owner.rows == 12

            paused.signal(signal.SIGCONT)  # wakes up believing it still owns its partitions
            rc = paused.wait(timeout=60)
            assert rc == 1, "the fenced consumer must stop with an error, without committing"
            assert "Fenced" in paused.log()

            assert_exactly_once(st.output_dir, versions(events))  # also: no in-progress file left
            spans = footer_offsets(st.output_dir)
            for partition, ranges in spans.items():
                for (_, last, a), (first, _, b) in zip(ranges, ranges[1:]):
                    assert first > last, f"partition {partition}: {a} and {b} overlap"
            assert_summary_matches_files(st.output_dir)
            assert_log_fully_handled(st, 12)
    finally:
        paused.signal(signal.SIGCONT)
        paused.kill()


# --- 4. revoke during a finalize ------------------------------------------------------------------------
@pytest.mark.slow
def test_a_revoke_during_a_timer_finalize_waits_for_its_rename_and_commit(
    services, s3, bucket, settings_factory, speech_corpus, models, tmp_path
):
    st = settings_factory(batch_max_events=2, roll_max_rows=100, roll_max_seconds=1.0, exit_when_idle=None)
    events = upload_copies(s3, bucket, [c.path for c in speech_corpus[:3]], 12)
    create_topics(st)
    publish(st, events)

    # Each finalize of the first consumer takes 8 s between taking its open file and renaming it.
    first = ConsumerProcess(services, st, tmp_path / "first.log", METAVOICE_DELAY_AT="finalize:8").start()
    try:
        with logs_on_failure(first):
            deadline = time.monotonic() + 90
            while rows_applied(first) < 12:
                assert time.monotonic() < deadline and first.proc.poll() is None, "the first consumer never applied its rows"
                time.sleep(0.1)
            time.sleep(1.5)  # the roll timer has fired: its finalize is in the 8 s window now

            # A second consumer joins: the first one's revoke arrives mid-finalize.
            second = consume_until_idle(st.model_copy(update={"exit_when_idle": 3.0}), models)

            assert "waiting for the finalize in flight" in first.log(), "the revoke did not meet a finalize in flight"
            assert second.rows == 0, "the second consumer re-processed offsets the first one was finalizing"
            first.signal(signal.SIGTERM)
            assert first.wait(timeout=60) == 0
            assert_exactly_once(st.output_dir, versions(events))
            assert_summary_matches_files(st.output_dir)
            assert_log_fully_handled(st, 12)
    finally:
        first.kill()


# --- 5. the dead-letter topic ------------------------------------------------------------------------------
def admin_call(st, fn):
    async def run():
        admin = AIOKafkaAdminClient(bootstrap_servers=st.kafka_bootstrap)
        await admin.start()
        try:
            return await fn(admin)
        finally:
            await admin.close()

    return asyncio.run(run())


def test_a_missing_dead_letter_topic_is_created_with_the_events_retention_before_the_first_record(
    s3, bucket, settings_factory, speech_corpus, models
):
    st = settings_factory(topic_partitions=1)
    admin_call(st, lambda a: a.create_topics([NewTopic(st.topic, 1, 1, topic_configs={"retention.ms": "604800000"})]))
    events = upload_copies(s3, bucket, [speech_corpus[0].path], 1)
    publish(st, [*events, (b"k", b"{not json")])

    stats = consume_until_idle(st, models)

    assert stats.rows == 1 and stats.dead_letters == 1
    assert admin_call(st, lambda a: retention_ms(a, [st.dlq_topic])) == {st.dlq_topic: 604800000}
    assert len(read_topic(st, st.dlq_topic, expected=1)) == 1
    assert_log_fully_handled(st, 2)


def test_a_dead_letter_topic_that_forgets_sooner_than_the_events_topic_stops_the_consumer_before_any_record(
    s3, bucket, settings_factory, speech_corpus, models
):
    st = settings_factory(topic_partitions=1)
    admin_call(st, lambda a: a.create_topics([
        NewTopic(st.topic, 1, 1, topic_configs={"retention.ms": "-1"}),
        NewTopic(st.dlq_topic, 1, 1, topic_configs={"retention.ms": "3600000"}),
    ]))
    publish(st, upload_copies(s3, bucket, [speech_corpus[0].path], 1))

    with pytest.raises(DeadLetterTopicUnusable, match="retention.ms=3600000"):
        consume_until_idle(st, models)

    assert committed_offsets(st, partitions=1) == {0: None}
    assert not (st.output_dir / "data").exists() or not list((st.output_dir / "data").glob("*.parquet"))
