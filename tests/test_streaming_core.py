"""The backbone end to end: bucket -> backfill -> Kafka -> consumer -> Parquet + summary.json.

Real Tansu broker, real moto S3 server, real Whisper (bundled tiny.en) on real espeak-ng speech.
"""

from __future__ import annotations

import asyncio

import duckdb
import orjson
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from aiokafka import AIOKafkaConsumer, TopicPartition

from pipeline.ledger import rebuild_aggregates
from metavoice.samples import word_overlap
from pipeline.ledger import load_summary

from .conftest import backfill, consume_until_idle, read_topic, upload

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def streamed(services, speech_corpus, models, tmp_path_factory):
    """One bucket of speech plus a broken upload, streamed once; several tests read the result."""
    import uuid

    import boto3

    from metavoice.local_services import MOTO_REGION

    from .conftest import test_settings

    unique = uuid.uuid4().hex[:8]
    s3 = boto3.client("s3", endpoint_url=services.s3_endpoint_url, region_name=MOTO_REGION)
    bucket = f"core-{unique}"
    s3.create_bucket(Bucket=bucket)
    upload(s3, bucket, speech_corpus)
    s3.put_object(Bucket=bucket, Key="clips/broken.flac", Body=b"definitely not audio")
    s3.put_object(Bucket=bucket, Key="clips/notes.txt", Body=b"not matched by the suffix")
    settings = test_settings(
        services, unique, tmp_path_factory.mktemp("core") / "out",
        batch_max_events=3,
        prefect_enabled=True,  # the real orchestration path, once
    )
    published = backfill(settings, bucket)
    stats = consume_until_idle(settings, models)
    return settings, bucket, published, stats, speech_corpus


def rows_of(output_dir):
    return pq.read_table(output_dir / "data").to_pylist()


def test_backfill_publishes_one_event_per_matching_object(streamed):
    _, _, published, _, corpus = streamed
    assert published.published == len(corpus) + 1  # the broken .flac too, not the .txt


def test_every_clip_becomes_one_row_with_the_spoken_words(streamed):
    settings, bucket, _, stats, corpus = streamed
    rows = {r["id"]: r for r in rows_of(settings.output_dir)}
    assert sorted(rows) == sorted(c.key for c in corpus)
    overlaps = [word_overlap(c.text, rows[c.key]["transcription"]) for c in corpus]
    # tiny.en mishears synthetic speech now and then; garbage or a wrong clip scores ~0
    assert min(overlaps) >= 0.25 and sum(overlaps) / len(overlaps) >= 0.6, overlaps
    for clip in corpus:
        row = rows[clip.key]
        assert row["sampling_rate"] == clip.sample_rate
        assert row["channels"] == clip.channels
        assert row["bucket"] == bucket and row["etag"]
        assert row["language"] == "en" and row["whisper_model"] == "tiny.en"
        assert row["segments"] and row["segments"][0]["text"]
        assert row["duration_sec"] == pytest.approx(sf.info(str(clip.path)).duration, abs=1e-3)
        assert row["tokenizer"] == "synthetic"
        books = row["tokens"]
        assert len(books) == 8 and all(len(b) == len(books[0]) for b in books)
        assert abs(len(books[0]) - row["duration_sec"] * 75) <= 1
        assert row["kafka_topic"] == settings.topic and row["kafka_offset"] >= 0
    assert stats.rows == len(corpus)


def test_parquet_schema_is_the_declared_one(streamed):
    from pipeline.records import SCHEMA

    settings = streamed[0]
    for f in (settings.output_dir / "data").glob("*.parquet"):
        assert pq.read_schema(f).remove_metadata().equals(SCHEMA)
        assert pq.ParquetFile(f).metadata.row_group(0).column(0).compression == "ZSTD"


def test_broken_object_is_dead_lettered_with_its_reason(streamed):
    settings = streamed[0]
    records = read_topic(settings, settings.dlq_topic, expected=1)
    assert len(records) == 1
    letter = orjson.loads(records[0].value)
    assert letter["error_type"] == "NotAudio"
    assert "clips/broken.flac" in letter["event"]
    assert letter["error"] and letter["failed_at"]


def test_summary_totals_equal_what_the_parquet_files_hold(streamed):
    settings = streamed[0]
    summary = orjson.loads((settings.output_dir / "summary.json").read_bytes())
    files = f"{settings.output_dir}/**/*.parquet"
    n, total, avg = duckdb.sql(f"select count(*), sum(duration_sec), avg(duration_sec) from '{files}'").fetchall()[0]
    assert summary["total_files"] == n
    assert summary["total_duration_sec"] == pytest.approx(total, abs=1e-3)
    assert summary["average_duration_sec"] == pytest.approx(avg, abs=1e-3)
    rates = dict(duckdb.sql(f"select sampling_rate::varchar, count(*) from '{files}' group by 1").fetchall())
    assert summary["sampling_rate_distribution"] == rates
    lo, hi = duckdb.sql(f"select min(length(transcription)), max(length(transcription)) from '{files}'").fetchall()[0]
    assert (summary["transcription_lengths"]["min"], summary["transcription_lengths"]["max"]) == (lo, hi)
    assert summary["errors"] == {"total": 1, "by_type": {"NotAudio": 1}}
    assert summary["parquet_files"] == len(list((settings.output_dir / "data").glob("*.parquet")))
    incremental = load_summary(settings.output_dir).aggregates
    rebuilt, _ = rebuild_aggregates(settings.output_dir)
    assert incremental.files == rebuilt.files
    assert incremental.token_frames.total == rebuilt.token_frames.total


def test_offsets_are_committed_after_the_files_are_final(streamed):
    settings = streamed[0]
    rows = rows_of(settings.output_dir)
    dlq = orjson.loads(read_topic(settings, settings.dlq_topic, expected=1)[0].value)
    last_per_partition: dict[int, int] = {}
    for r in rows:
        last_per_partition[r["kafka_partition"]] = max(last_per_partition.get(r["kafka_partition"], -1), r["kafka_offset"])
    src = dlq["source"]
    last_per_partition[src["partition"]] = max(last_per_partition.get(src["partition"], -1), src["offset"])

    async def committed():
        c = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=settings.group, enable_auto_commit=False)
        await c.start()
        try:
            return {p: await c.committed(TopicPartition(settings.topic, p)) for p in last_per_partition}
        finally:
            await c.stop()

    assert asyncio.run(committed()) == {p: o + 1 for p, o in last_per_partition.items()}


def test_no_partial_file_is_ever_visible(streamed):
    settings = streamed[0]
    assert not list(settings.output_dir.rglob("*.inprogress"))


def test_replay_with_a_new_group_reproduces_the_same_rows(streamed, models, tmp_path):
    settings = streamed[0]
    replay = settings.with_overrides(group=settings.group + "-replay", output_dir=tmp_path / "replay", prefect_enabled=False)
    stats = consume_until_idle(replay, models)
    assert stats.rows == len(streamed[4])

    def keyed(d):
        return {r["id"]: (r["etag"], r["transcription"], r["tokens"], r["duration_sec"], r["kafka_offset"]) for r in rows_of(d)}

    assert keyed(replay.output_dir) == keyed(settings.output_dir)


def test_running_the_backfill_again_adds_no_rows(streamed, models):
    settings, bucket, _, _, corpus = streamed
    backfill(settings, bucket)
    stats = consume_until_idle(settings.with_overrides(prefect_enabled=False), models)
    assert stats.rows == 0 and stats.duplicates == len(corpus)
    assert len(rows_of(settings.output_dir)) == len(corpus)
    summary = orjson.loads((settings.output_dir / "summary.json").read_bytes())
    assert summary["total_files"] == len(corpus) and summary["duplicates"] == len(corpus)


def test_files_roll_by_row_count(services, s3, bucket, speech_corpus, settings_factory, models):
    upload(s3, bucket, speech_corpus[:5])
    settings = settings_factory(batch_max_events=1, roll_max_rows=2)
    backfill(settings, bucket)
    consume_until_idle(settings, models)
    files = sorted((settings.output_dir / "data").glob("*.parquet"))
    counts = [pq.read_metadata(f).num_rows for f in files]
    assert sum(counts) == 5
    assert max(counts) <= 2 and len(files) >= 3


def test_files_roll_by_age_even_when_no_new_event_arrives(services, s3, bucket, speech_corpus, settings_factory, models):
    """The age limit closes a file on a timer, not only when the next batch comes in."""
    import threading
    import time

    from producer.backfill import event_for
    from broker.topics import ensure_topics
    from producer.kafka import event_publisher
    from pipeline.storage import ListedObject

    upload(s3, bucket, speech_corpus[:2])
    settings = settings_factory(batch_max_events=1, roll_max_rows=1000, roll_max_seconds=0.5, exit_when_idle=6.0)
    heads = [s3.head_object(Bucket=bucket, Key=c.key) for c in speech_corpus[:2]]
    events = [
        event_for(bucket, ListedObject(c.key, h["ContentLength"], h["ETag"].strip('"'), h["LastModified"]))
        for c, h in zip(speech_corpus[:2], heads)
    ]

    async def publish(ev):
        await ensure_topics(settings)
        async with event_publisher(settings) as pub:
            await pub.publish(ev)

    asyncio.run(publish(events[0]))
    result = {}
    runner = threading.Thread(target=lambda: result.update(stats=consume_until_idle(settings, models)))
    runner.start()
    data = settings.output_dir / "data"
    deadline = time.monotonic() + 60
    while not list(data.glob("*.parquet")) and time.monotonic() < deadline:
        time.sleep(0.1)
    first = list(data.glob("*.parquet"))
    asyncio.run(publish(events[1]))
    runner.join(timeout=120)
    files = sorted(data.glob("*.parquet"))
    assert len(first) == 1 and pq.read_metadata(first[0]).num_rows == 1
    assert len(files) == 2 and [pq.read_metadata(f).num_rows for f in files] == [1, 1]
    assert result["stats"].rows == 2
