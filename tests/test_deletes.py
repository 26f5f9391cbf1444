"""Deletes follow the bucket: a delete event takes the object's rows out of the Delta table.

Real broker, real S3 server (moto), real table on a local directory and on s3://; Whisper is
`FakeWhisper`. Each test reads back the table's rows, summary.json, and the dedupe index's
effect (a re-upload of the same bytes after a delete makes a row again).
"""

from __future__ import annotations

import signal
from dataclasses import replace

import pytest

from pipeline.events import ObjectEvent
from pipeline.ledger import load_summary, rebuild_aggregates
from pipeline.output import open_output
from tests.conftest import consume_until_idle, read_topic
from tests.consumer_process import (
    ConsumerProcess,
    assert_exactly_once,
    assert_summary_matches_files,
    create_topics,
    fake_models,
    logs_on_failure,
    output_rows,
    publish,
    upload_copies,
    versions,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def models():
    m = fake_models()
    yield m
    m.close()


@pytest.fixture(params=["local", "s3"])
def stream(request, s3, bucket, settings_factory, speech_corpus, unique, tmp_path):
    """Settings for a local or an s3:// output, and `count` uploaded objects' create events."""
    if request.param == "s3":
        s3.create_bucket(Bucket=f"out-{unique}")
        where = dict(output_dir=f"s3://out-{unique}/dataset", spool_dir=str(tmp_path / "spool"))
    else:
        where = {}
    st = settings_factory(batch_max_events=4, roll_max_rows=100, exit_when_idle=1.5, **where)
    create_topics(st)

    def uploads(count: int, prefix: str = "a/") -> list[ObjectEvent]:
        return upload_copies(s3, bucket, [c.path for c in speech_corpus[:3]], count, prefix=prefix)

    return st, uploads


def delete_of(ev: ObjectEvent) -> ObjectEvent:
    return ObjectEvent(bucket=ev.bucket, key=ev.key, action="DeleteObject")


def last_offset(st, ev: ObjectEvent, published: int) -> tuple[int, int]:
    """(partition, offset) of the newest record of `ev`'s object on the topic."""
    records = [r for r in read_topic(st, st.topic, published) if r.key == ev.message_key]
    return records[-1].partition, records[-1].offset


def assert_summary_counts_deletes(st, events: int, rows: int) -> None:
    """summary.json equals the live table's aggregates and says what the deletes removed."""
    out = open_output(st.output_dir, st)
    assert_summary_matches_files(out)
    summary = load_summary(out).aggregates
    rebuilt, _ = rebuild_aggregates(out)
    assert (summary.delete_events, summary.deleted) == (events, rows)
    assert (rebuilt.delete_events, rebuilt.deleted) == (events, rows)
    assert summary.utterances == rebuilt.utterances == len(output_rows(out))
    assert vars(summary.utterance_durations) == pytest.approx(vars(rebuilt.utterance_durations))
    assert summary.speakers_per_file == rebuilt.speakers_per_file


def test_a_delete_removes_the_objects_rows_on_both_outputs_and_is_counted(stream, models):
    st, uploads = stream
    created = uploads(6)
    publish(st, created)
    consume_until_idle(st, models)
    assert len(output_rows(open_output(st.output_dir, st))) == 6
    gone = [created[1], created[4]]
    never_written = ObjectEvent(bucket=created[0].bucket, key="a/never-uploaded.flac", action="DeleteObject")
    publish(st, [delete_of(e) for e in gone] + [never_written])

    stats = consume_until_idle(st, models)

    out = open_output(st.output_dir, st)
    assert_exactly_once(out, versions(e for e in created if e not in gone))
    assert (stats.delete_events, stats.deleted_rows) == (3, 2)
    assert_summary_counts_deletes(st, events=3, rows=2)
    assert load_summary(out).aggregates.files == 4


def test_create_delete_create_on_one_key_leaves_the_second_row(stream, models):
    """The same bytes uploaded again after a delete (same etag: consent withdrawn, then given again)
    make a row again, in one micro-batch stream and across a restart's dedupe checkpoint."""
    st, uploads = stream
    first = uploads(3)
    again = replace(first[0])  # same bucket, key and etag
    publish(st, first + [delete_of(first[0]), again])
    consume_until_idle(st, models)

    out = open_output(st.output_dir, st)
    rows = output_rows(out)
    assert_exactly_once(out, versions(first))
    kept = [(r["kafka_partition"], r["kafka_offset"]) for r in rows if r["id"] == first[0].key]
    assert kept == [last_offset(st, first[0], 5)], "the row of the create after the delete must survive"
    assert_summary_counts_deletes(st, events=1, rows=1)

    # a restart (the dedupe checkpoint written at the stop) forgets the deleted version too
    publish(st, [delete_of(first[1]), replace(first[1])])
    consume_until_idle(st, models)
    rows = output_rows(out)
    kept = [(r["kafka_partition"], r["kafka_offset"]) for r in rows if r["id"] == first[1].key]
    assert kept == [last_offset(st, first[1], 7)]
    assert_exactly_once(out, versions(first))
    assert_summary_counts_deletes(st, events=2, rows=2)


def test_kill_9_between_the_deletes_table_commit_and_the_kafka_commit_deletes_exactly_once(
    services, stream, models, tmp_path
):
    """Killed right after the delete's table commit: the restart resumes after the delete (its app
    transaction is in that commit), reads the delete from the log (no checkpoint covers it) and
    forgets the deleted version, so the re-upload after it makes its row: nothing deleted twice,
    no later append lost."""
    st, uploads = stream
    created = uploads(4)
    publish(st, created)
    consume_until_idle(st, models)
    later = uploads(1, prefix="b/") + [replace(created[2])]  # a new object, and the deleted one again
    publish(st, [delete_of(created[2])] + later)

    child = ConsumerProcess(services, st, tmp_path / "crashed.log", METAVOICE_CRASH_AT="after_table_commit:1").start()
    rc = child.wait(timeout=120)
    with logs_on_failure(child):
        assert rc == -signal.SIGKILL, "the crash point did not kill the consumer"
        ids = {r["id"] for r in output_rows(open_output(st.output_dir, st))}
        # the delete landed; the new object's event (another partition) may have shared its batch
        assert {e.key for e in created} - {created[2].key} <= ids <= {e.key for e in created + later[:1]} - {created[2].key}

    consume_until_idle(st, models)  # the restart: the delete is in the table, the broker never heard

    out = open_output(st.output_dir, st)
    assert_exactly_once(out, versions(created + later))
    assert_summary_counts_deletes(st, events=1, rows=1)


def test_a_delete_after_compaction_removes_the_row_from_the_compacted_file(stream, models):
    from pipeline.output.maintenance import compact

    st, uploads = stream
    created = uploads(8)
    publish(st, created)
    consume_until_idle(st.model_copy(update={"roll_max_rows": 2}), models)
    out = open_output(st.output_dir, st)
    before = len(out.finalized())
    compact(st.output_dir, st)
    assert len(out.finalized()) < before
    publish(st, [delete_of(created[5])])

    consume_until_idle(st, models)

    assert_exactly_once(out, versions(e for e in created if e is not created[5]))
    assert_summary_counts_deletes(st, events=1, rows=1)


@pytest.mark.parametrize("stream", ["local"], indirect=True)
def test_a_delete_naming_a_version_removes_that_version_only_and_a_delete_marker_removes_every_version(
        stream, models, s3, bucket, speech_corpus):
    """A versioned bucket holds two versions of one key: a permanent delete of the first (its
    versionId in the event) leaves the second's row; a delete with no version then removes it."""
    st, _ = stream
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    key, made = "v/0000.flac", []
    for clip in speech_corpus[:2]:
        body = clip.path.read_bytes()
        put = s3.put_object(Bucket=bucket, Key=key, Body=body)
        made.append(ObjectEvent(bucket=bucket, key=key, size=len(body), etag=put["ETag"].strip('"'),
                                version_id=put["VersionId"]))
    assert made[0].version_id != made[1].version_id and made[0].etag != made[1].etag
    publish(st, made)
    consume_until_idle(st, models)
    out = open_output(st.output_dir, st)
    assert_exactly_once(out, versions(made))

    publish(st, [replace(delete_of(made[0]), version_id=made[0].version_id)])
    consume_until_idle(st, models)
    assert_exactly_once(out, versions(made[1:]))
    assert_summary_counts_deletes(st, events=1, rows=1)

    publish(st, [delete_of(made[1])])  # no version: a delete marker, every version goes
    consume_until_idle(st, models)
    assert output_rows(out) == []
    assert_summary_counts_deletes(st, events=2, rows=2)
