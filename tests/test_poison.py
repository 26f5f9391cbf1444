"""Bad inputs never stop the stream and never vanish: each one lands in the dead-letter topic
with its typed reason, every valid file still lands in Parquet, summary.json counts the errors
by type, and the offsets of all of them are committed. When the dead letter itself cannot be
written, nothing is committed and the consumer stops.

Kafka and S3 are real; the models are real Whisper and the synthetic tokenizer, each made to
fail on exactly one clip (recognised by its length) to stand in for a model crash on one file.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import orjson
import pytest
import soundfile as sf

from consumer.cli import pipeline_errors
from pipeline.audio import DecodedAudio
from pipeline.errors import DeadLetterFailed
from pipeline.events import ObjectEvent
from pipeline.ledger import load_summary
from pipeline.tokenizers import AudioTokenizer
from tests.conftest import consume_until_idle, read_topic
from tests.consumer_process import (
    assert_exactly_once,
    assert_summary_matches_files,
    committed_offsets,
    create_topics,
    fake_models,
    output_rows,
    partition_ends,
    publish,
    versions,
)

pytestmark = pytest.mark.integration

TRANSCRIBE_FAILS_SAMPLES = 40_000  # a 2.5 s clip at 16 kHz: Whisper "crashes" on it
TOKENIZE_FAILS = (44_100, 22_050)  # a 2.0 s clip at 22.05 kHz: the tokenizer "crashes" on it


def flac(samples: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def clip_of(path: Path, seconds: float) -> tuple[bytes, int]:
    """The clip cut (or looped) to exactly `seconds`, as FLAC bytes, and its rate."""
    data, rate = sf.read(path, dtype="float32")
    n = int(round(seconds * rate))
    reps = -(-n // data.shape[0])
    return flac(np.concatenate([data] * reps)[:n], rate), rate


class FailsOnOneClip(AudioTokenizer):
    """The real tokenizer, except that it raises on the one clip of TOKENIZE_FAILS's length and rate."""

    def __init__(self, inner: AudioTokenizer) -> None:
        self.inner = inner
        self.name, self.codebooks, self.frame_rate, self.device = inner.name, inner.codebooks, inner.frame_rate, inner.device
        self.sample_rate, self.channels = inner.sample_rate, inner.channels

    def encode_batch(self, clips: list[DecodedAudio]) -> list[np.ndarray]:
        if any((c.frames, c.sample_rate) == TOKENIZE_FAILS for c in clips):
            raise RuntimeError("codec kernel failed")
        return self.inner.encode_batch(clips)


@pytest.fixture
def flaky_models(models, monkeypatch):
    """The session's real models; Whisper fails on one clip, the tokenizer on another."""
    real = models.transcriber._transcribe_together

    def transcribe_together(clips):
        if any(len(c) == TRANSCRIBE_FAILS_SAMPLES for c in clips):
            raise ValueError("decoder produced tokens past the end of the vocabulary")  # this file's fault, not the device's
        return real(clips)

    monkeypatch.setattr(models.transcriber, "_transcribe_together", transcribe_together)
    monkeypatch.setattr(models, "tokenizer", FailsOnOneClip(models.tokenizer))
    return models


@pytest.mark.slow
def test_every_poison_input_is_dead_lettered_with_its_type_and_valid_files_still_land(
    s3, bucket, settings_factory, speech_corpus, flaky_models
):
    st = settings_factory(min_duration_sec=1.0, max_duration_sec=10.0, batch_max_events=8, roll_max_rows=100,
                          exit_when_idle=1.5)
    c = [clip.path for clip in speech_corpus]

    def put(key: str, body: bytes) -> ObjectEvent:
        etag = s3.put_object(Bucket=bucket, Key=key, Body=body)["ETag"].strip('"')
        return ObjectEvent(bucket=bucket, key=key, size=len(body), etag=etag)

    valid = [put(f"ok/{i}.flac", c[i].read_bytes()) for i in range(3)]  # 48 kHz, 44.1 kHz stereo, 24 kHz
    poison = {  # key -> the error_type its dead letter must carry
        put("bad/empty.flac", b""): "EmptyObject",
        put("bad/text.flac", b"this is a text file, not audio"): "NotAudio",
        put("bad/truncated.flac", c[2].read_bytes()[: c[2].stat().st_size // 2]): "NotAudio",
        put("bad/too-short.flac", clip_of(c[3], 0.5)[0]): "DurationOutOfRange",
        put("bad/too-long.flac", clip_of(c[3], 12.0)[0]): "DurationOutOfRange",
        put("bad/whisper-fails.flac", clip_of(c[3], TRANSCRIBE_FAILS_SAMPLES / 16_000)[0]): "TranscriptionFailed",
        put("bad/tokenizer-fails.flac", clip_of(c[4], TOKENIZE_FAILS[0] / TOKENIZE_FAILS[1])[0]): "TokenizationFailed",
        ObjectEvent(bucket=bucket, key="bad/never-uploaded.flac", size=100, etag="0" * 32): "ObjectMissing",
    }
    malformed = [(b"m1", b"{not json at all"), (b"m2", orjson.dumps({"action": "PutObject", "bucket": bucket}))]
    skipped = [  # not creates: counted, never processed, never dead-lettered (a delete of an object with no row)
        ObjectEvent(bucket=bucket, key="ok/never-written.flac", action="DeleteObject"),
        (b"t", orjson.dumps({"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": bucket})),
    ]
    create_topics(st)
    publish(st, [*valid[:2], *list(poison)[:4], *malformed, *skipped, *list(poison)[4:], valid[2]])

    stats = consume_until_idle(st, flaky_models)  # returns normally: the stream goes on past every bad input

    assert_exactly_once(st.output_dir, versions(valid))
    expected_types = sorted([*poison.values(), "MalformedEvent", "MalformedEvent"])
    letters = [(r.key.decode(), orjson.loads(r.value)) for r in read_topic(st, st.dlq_topic, len(expected_types))]
    assert sorted(d["error_type"] for _, d in letters) == expected_types
    by_object = {d["object"]["key"]: d for _, d in letters if d["object"]["key"]}
    for event, error_type in poison.items():
        assert by_object[event.key]["error_type"] == error_type, by_object[event.key]
    for key, d in letters:  # the DLQ key names the source position, so a repeat is recognisable
        src = d["source"]
        assert key == f"{src['topic']}:{src['partition']}:{src['offset']}:{d['object']['bucket']}/{d['object']['key']}"
        assert d["error"] and d["event"] and d["failed_at"]
    raw_events = sorted(d["event"] for _, d in letters if d["error_type"] == "MalformedEvent")
    assert raw_events == sorted(v.decode() for _, v in malformed)  # the original message, for a replay

    summary = load_summary(st.output_dir).aggregates
    assert dict(summary.errors) == {t: expected_types.count(t) for t in set(expected_types)}
    assert summary.skipped == 1 and summary.files == len(valid)
    assert (summary.delete_events, summary.deleted) == (1, 0)
    assert stats.dead_letters == len(expected_types) and stats.skipped == 1 and stats.delete_events == 1
    assert_summary_matches_files(st.output_dir)
    ends = partition_ends(st, expected=len(valid) + len(poison) + len(malformed) + len(skipped))
    assert committed_offsets(st) == {p: (end or None) for p, end in ends.items()}


def test_a_dead_letter_that_cannot_be_written_commits_nothing_after_it(
    s3, bucket, settings_factory, speech_corpus, monkeypatch
):
    """The broker refuses the dead letter of a malformed message (the DLQ is unwritable): the
    consumer stops with DeadLetterFailed, and the offsets from that message on stay uncommitted."""
    from aiokafka import AIOKafkaProducer
    from aiokafka.errors import KafkaError

    st = settings_factory(topic_partitions=1, batch_max_events=1, roll_max_rows=1, exit_when_idle=1.5)
    body = speech_corpus[0].path.read_bytes()
    before, after = (
        ObjectEvent(bucket=bucket, key=k, size=len(body), etag=s3.put_object(Bucket=bucket, Key=k, Body=body)["ETag"].strip('"'))
        for k in ("first.flac", "last.flac")
    )
    create_topics(st)
    publish(st, [before, (b"bad", b"{not json"), after])
    real_send = AIOKafkaProducer.send

    async def send(self, topic, *args, **kwargs):
        if topic == st.dlq_topic:
            raise KafkaError("the broker refused the record")
        return await real_send(self, topic, *args, **kwargs)

    monkeypatch.setattr(AIOKafkaProducer, "send", send)
    m = fake_models()
    try:
        with pytest.raises(BaseException) as caught:
            consume_until_idle(st, m)
    finally:
        m.close()

    assert [type(e) for e in pipeline_errors(caught.value)] == [DeadLetterFailed], caught.value
    assert committed_offsets(st) == {0: 1}  # the file before the poison message; not one offset further
    # the file covering the poison message is durable and carries its dead letter (sent after it)
    assert [r["id"] for r in output_rows(st.output_dir)] == ["first.flac", "last.flac"]
    assert not list((st.output_dir / "data").glob("*.inprogress"))

    monkeypatch.undo()  # the DLQ takes records again: the restart sends the dead letter the file holds
    m = fake_models()
    try:
        consume_until_idle(st, m)
    finally:
        m.close()
    assert committed_offsets(st) == {0: 3}
    assert len(read_topic(st, st.dlq_topic, expected=2, timeout=5)) == 1
    assert [r["id"] for r in output_rows(st.output_dir)] == ["first.flac", "last.flac"]
