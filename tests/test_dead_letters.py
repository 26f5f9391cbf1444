"""A dead letter is bounded whatever its input, so a poison message never stops the stream.

The unit tests build records from crafted failures (a 300 KB object key, a 5 MB message,
invalid UTF-8, an error that quotes a huge input, text that JSON escaping grows six-fold) and
check the bound `len(key) + len(value) <= max_record_bytes`, that every cut field names its
original by size and SHA-256, and that small records keep the format readers know. The
integration test runs the real consumer against the real broker: an event whose key is 300 KB
(whose dead letter used to exceed 1 MB and stop the consumer for good) becomes one bounded
dead letter, the valid events beside it become rows, and the offsets are committed to the end.
"""

from __future__ import annotations

import asyncio
import hashlib
from datetime import datetime, timedelta, timezone

import orjson
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from consumer.dead_letters import (
    DEFAULT_LIMITS,
    DeadLetterLimits,
    DeadLetterWriter,
    dead_letter_key,
    encode_dead_letter,
    event_bytes,
)
from pipeline.batch import Failure, SourceRef, WorkItem
from pipeline.errors import DeadLetterFailed, MalformedEvent, NotAudio, ObjectMissing
from pipeline.events import ObjectEvent
from tests.conftest import consume_until_idle, read_topic

CUT_FIELDS = ("event", "error", "error_type", "source.topic", "object.bucket", "object.key", "object.etag")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def failure(key: str = "clips/a.flac", bucket: str = "audio", etag: str | None = "e" * 32, raw: bytes | None = None,
            error: Exception | None = None, topic: str = "events", partition: int = 3, offset: int = 41) -> Failure:
    ev = ObjectEvent(bucket=bucket, key=key, size=10, etag=etag, event_time=datetime(2026, 11, 1, tzinfo=timezone.utc))
    item = WorkItem(ev, SourceRef(topic, partition, offset), raw)
    item.raw = event_bytes(item)  # the message value as a producer wrote it
    return Failure(item, error or NotAudio("libsndfile cannot read it"))


def malformed(raw: bytes, error: str = "message is not JSON") -> Failure:
    ev = ObjectEvent(bucket="", key="", action="Unknown")
    return Failure(WorkItem(ev, SourceRef("events", 0, 7), raw), MalformedEvent(error))


def decode(value: bytes) -> dict:
    return orjson.loads(value)


def originals(f: Failure) -> dict[str, bytes]:
    """What each cut field's `truncated` entry must identify."""
    ev, src = f.item.event, f.item.source
    return {
        "event": event_bytes(f.item),
        "error": str(f.error).encode("utf-8", "surrogatepass"),
        "error_type": f.error.error_type.encode(),
        "source.topic": src.topic.encode("utf-8", "surrogatepass"),
        "object.bucket": ev.bucket.encode("utf-8", "surrogatepass"),
        "object.key": ev.key.encode("utf-8", "surrogatepass"),
        "object.etag": (ev.etag or "").encode("utf-8", "surrogatepass"),
    }


def texts(d: dict) -> dict[str, str]:
    return {
        "event": d["event"], "error": d["error"], "error_type": d["error_type"], "source.topic": d["source"]["topic"],
        "object.bucket": d["object"]["bucket"], "object.key": d["object"]["key"], "object.etag": d["object"]["etag"] or "",
    }


def assert_bounded_and_identified(f: Failure, key: bytes, value: bytes, limits: DeadLetterLimits) -> dict:
    """The bound holds, every cut field is a prefix of its original and names it; uncut fields are whole."""
    assert len(key) + len(value) <= limits.max_record_bytes
    assert len(key) <= limits.max_key_bytes
    key.decode("utf-8")  # a key readers can print
    d = decode(value)
    cut = d.get("truncated", {})
    assert set(cut) <= set(CUT_FIELDS)
    for name, original in originals(f).items():
        whole = original.decode("utf-8", "replace")
        if name in cut:
            assert cut[name] == {"bytes": len(original), "sha256": sha256(original)}, name
            assert whole.startswith(texts(d)[name]), name
            assert texts(d)[name] != whole, name
        else:
            assert texts(d)[name] == whole, name
    assert (d["source"]["partition"], d["source"]["offset"]) == (f.item.source.partition, f.item.source.offset)
    return d


# --- small records keep the format readers know ----------------------------------------------
def test_a_small_dead_letter_keeps_every_field_whole_and_has_no_truncated_entry():
    f = failure()
    at = datetime(2026, 11, 1, 12, 0, 0, 123456, tzinfo=timezone.utc)
    key, value = encode_dead_letter(f, now=at)
    assert key == b"events:3:41:audio/clips/a.flac"
    assert decode(value) == {
        "event": f.item.raw.decode(),
        "error_type": "NotAudio",
        "error": "libsndfile cannot read it",
        "failed_at": "2026-11-01T12:00:00.123Z",
        "source": {"topic": "events", "partition": 3, "offset": 41},
        "object": {"bucket": "audio", "key": "clips/a.flac", "etag": "e" * 32},
    }


def test_failed_at_is_iso_8601_utc_with_a_z_whatever_the_clock_zone():
    paris = timezone(timedelta(hours=2))
    _, value = encode_dead_letter(failure(), now=datetime(2026, 11, 1, 14, 0, 0, tzinfo=paris))
    assert decode(value)["failed_at"] == "2026-11-01T12:00:00.000Z"
    _, value = encode_dead_letter(failure())
    stamp = decode(value)["failed_at"]
    assert stamp.endswith("Z") and datetime.fromisoformat(stamp.replace("Z", "+00:00")).tzinfo is not None


def test_a_dead_letter_without_an_etag_keeps_it_null():
    _, value = encode_dead_letter(failure(etag=None))
    assert decode(value)["object"]["etag"] is None


# --- the cases that used to stop the stream --------------------------------------------------
def test_a_300_kb_object_key_makes_a_bounded_record_that_names_the_original():
    big = "speakers/" + "k" * 300_000 + ".flac"
    f = failure(key=big, error=ObjectMissing(f"s3://audio/{big} does not exist (NoSuchKey)"))
    key, value = encode_dead_letter(f)
    d = assert_bounded_and_identified(f, key, value, DEFAULT_LIMITS)
    assert set(d["truncated"]) == {"event", "error", "object.key"}
    assert d["truncated"]["object.key"] == {"bytes": len(big), "sha256": sha256(big.encode())}
    assert d["truncated"]["event"]["sha256"] == sha256(f.item.raw)  # the message value as the broker holds it
    assert len(d["object"]["key"]) == DEFAULT_LIMITS.max_field_bytes
    assert len(d["error"]) == DEFAULT_LIMITS.max_error_bytes
    assert len(d["event"]) == DEFAULT_LIMITS.max_event_bytes
    assert d["error_type"] == "ObjectMissing"
    # the key names the position and hashes the object: bounded, still unique per object
    assert key == f"events:3:41:sha256:{sha256(f'audio/{big}'.encode())}".encode()
    assert b"/" not in key.split(b":", 3)[3]


def test_a_5_mb_message_is_cut_to_its_limit_and_identified_by_its_hash():
    raw = b'{"action": "PutObject", "object": {"key": "' + b"x" * (5 << 20)
    f = malformed(raw)
    key, value = encode_dead_letter(f)
    d = assert_bounded_and_identified(f, key, value, DEFAULT_LIMITS)
    assert d["truncated"] == {"event": {"bytes": len(raw), "sha256": sha256(raw)}}
    assert d["event"] == raw[: DEFAULT_LIMITS.max_event_bytes].decode()
    assert key == b"events:0:7:/"


def test_invalid_utf8_is_replaced_in_the_text_and_hashed_as_the_broker_holds_it():
    raw = bytes(range(256)) * 4000  # every byte value, 1 MB; \x80-\xff alone are invalid UTF-8
    f = malformed(raw)
    key, value = encode_dead_letter(f)
    d = assert_bounded_and_identified(f, key, value, DEFAULT_LIMITS)
    assert "\ufffd" in d["event"]
    assert d["truncated"]["event"] == {"bytes": len(raw), "sha256": sha256(raw)}


def test_a_short_message_of_invalid_utf8_that_grows_when_replaced_is_still_cut_to_its_limit():
    raw = b"\xff" * 1000  # 1000 bytes -> 1000 replacement characters -> 3000 bytes of UTF-8
    limits = DeadLetterLimits(max_event_bytes=2000)
    f = malformed(raw)
    key, value = encode_dead_letter(f, limits)
    d = assert_bounded_and_identified(f, key, value, limits)
    assert d["event"] == "\ufffd" * 666 and d["truncated"]["event"]["bytes"] == 1000


def test_a_huge_error_message_is_cut_and_identified():
    reason = "decoder said: " + "é" * 2_000_000  # 4 MB of two-byte characters
    f = failure(error=NotAudio(reason))
    key, value = encode_dead_letter(f)
    d = assert_bounded_and_identified(f, key, value, DEFAULT_LIMITS)
    assert set(d["truncated"]) == {"error"}
    assert len(d["error"].encode()) <= DEFAULT_LIMITS.max_error_bytes
    assert len(d["error"].encode()) >= DEFAULT_LIMITS.max_error_bytes - 1  # cut on a character boundary, not short


def test_a_cut_never_splits_a_character():
    for char in ("é", "€", "😀"):  # 2, 3 and 4 bytes of UTF-8
        for limit in range(1020, 1025):
            f = failure(key=char * 2000)
            _, value = encode_dead_letter(f, DeadLetterLimits(max_field_bytes=limit))
            cut = decode(value)["object"]["key"]
            assert set(cut) == {char}
            assert limit - len(char.encode()) < len(cut.encode()) <= limit


def test_json_escaping_cannot_push_a_record_past_its_limit():
    """Control characters grow six-fold in JSON (`\\u0000`), quotes and backslashes two-fold:
    field limits that fit as text do not fit as JSON, and the record is cut further."""
    limits = DeadLetterLimits(max_record_bytes=64 * 1024, max_event_bytes=1 << 20, max_error_bytes=1 << 20,
                              max_field_bytes=1 << 20, max_key_bytes=1024)
    for filler in ("\x00", '"', "\\", "\x00a\"b\\c\x1f"):
        f = failure(key=filler * 50_000, raw=(filler * 200_000).encode(), error=NotAudio(filler * 100_000))
        key, value = encode_dead_letter(f, limits)
        d = assert_bounded_and_identified(f, key, value, limits)
        assert len(key) + len(value) > limits.max_record_bytes * 0.9, "cut far more than needed"
        assert set(d["truncated"]) >= {"event"}


def test_lone_surrogates_in_an_object_key_still_make_a_valid_record_and_key():
    f = failure(key="clips/\ud800broken.flac")
    key, value = encode_dead_letter(f)
    d = assert_bounded_and_identified(f, key, value, DEFAULT_LIMITS)
    assert d["object"]["key"] == "clips/\ufffd\ufffd\ufffdbroken.flac"
    name = "audio/clips/\ud800broken.flac".encode("utf-8", "surrogatepass")
    assert key == f"events:3:41:sha256:{sha256(name)}".encode()


def test_a_key_keeps_the_readable_form_up_to_its_limit():
    name = "k" * 1000
    f = failure(key=name)
    readable = f"events:3:41:audio/{name}".encode()
    assert dead_letter_key(f, len(readable)) == readable
    assert dead_letter_key(f, len(readable) - 1) == f"events:3:41:sha256:{sha256(f'audio/{name}'.encode())}".encode()
    f = failure(key=name, topic="t" * 300)  # a topic Kafka would refuse: the whole key is hashed
    assert dead_letter_key(f, 128).startswith(b"sha256:") and len(dead_letter_key(f, 128)) == 71


def test_limits_that_cannot_hold_a_record_are_refused():
    for bad in (dict(max_record_bytes=1000), dict(max_key_bytes=64), dict(max_record_bytes=8192, max_key_bytes=4096),
                dict(max_event_bytes=-1)):
        with pytest.raises(ValueError):
            DeadLetterLimits(**bad)


# --- any input --------------------------------------------------------------------------------
any_char = st.characters(exclude_categories=())  # surrogates and control characters included
big_text = st.builds(lambda s, n: s * n, st.text(any_char, max_size=8), st.sampled_from([0, 1, 3, 700, 40_000, 200_000]))
big_bytes = st.builds(lambda b, n: b * n, st.binary(max_size=8), st.sampled_from([0, 1, 3, 700, 40_000, 700_000]))


@st.composite
def limits_strategy(draw) -> DeadLetterLimits:
    record = draw(st.sampled_from([4096, 5000, 20_000, 256 * 1024]))
    field = st.sampled_from([0, 1, 7, 100, 1024, 8192, 64 * 1024, 1 << 20])
    return DeadLetterLimits(
        max_record_bytes=record,
        max_event_bytes=draw(field), max_error_bytes=draw(field), max_field_bytes=draw(field),
        max_key_bytes=draw(st.integers(128, record // 4)),
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=big_text, bucket=big_text, etag=st.none() | big_text, raw=st.none() | big_bytes, error=big_text,
       topic=st.text(any_char, max_size=300), offset=st.integers(0, 2**63 - 1), limits=limits_strategy())
def test_any_input_makes_a_record_within_its_limit_that_names_what_it_cut(key, bucket, etag, raw, error, topic, offset, limits):
    f = failure(key=key, bucket=bucket, etag=etag, raw=raw, error=NotAudio(error), topic=topic, partition=2**31 - 1,
                offset=offset)
    if raw is None:  # the event re-serialized
        f.item.raw = None
    k, value = encode_dead_letter(f, limits)
    assert_bounded_and_identified(f, k, value, limits)


# --- the writer -------------------------------------------------------------------------------
class RecordingProducer:
    def __init__(self, fail: bool = False) -> None:
        self.sent: list[tuple[str, bytes, bytes]] = []
        self.fail = fail

    async def send(self, topic: str, value: bytes, key: bytes):
        if self.fail:
            raise RuntimeError("MessageSizeTooLargeError")
        self.sent.append((topic, key, value))
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


def test_the_writer_sends_bounded_messages_and_types_a_broker_refusal():
    limits = DeadLetterLimits(max_record_bytes=8192, max_key_bytes=256)
    failures = [failure(key="k" * 300_000), malformed(b"\x00" * 5_000_000), failure()]
    producer = RecordingProducer()
    asyncio.run(DeadLetterWriter(producer, "events.dlq", limits).send(failures))  # type: ignore[arg-type]
    assert [t for t, _, _ in producer.sent] == ["events.dlq"] * 3
    assert all(len(k) + len(v) <= 8192 for _, k, v in producer.sent)
    with pytest.raises(DeadLetterFailed):
        asyncio.run(DeadLetterWriter(RecordingProducer(fail=True), "events.dlq").send(failures))  # type: ignore[arg-type]


# --- against the real broker ----------------------------------------------------------------
@pytest.mark.integration
def test_an_event_with_a_300_kb_key_is_one_bounded_dead_letter_and_the_stream_goes_on(
    s3, bucket, settings_factory, speech_corpus
):
    """The event whose dead letter used to exceed 1 MB (DeadLetterFailed, exit 1, nothing
    committed, the same record on every restart) now becomes one bounded dead letter; so does
    a 1.5 MB unparsable message of control characters; the valid events around them are rows,
    and the group's offsets reach the end of the log."""
    from tests.consumer_process import (
        assert_exactly_once,
        committed_offsets,
        create_topics,
        fake_models,
        partition_ends,
        publish,
        versions,
    )

    st_ = settings_factory(batch_max_events=8, roll_max_rows=100, exit_when_idle=1.5)
    body = speech_corpus[0].path.read_bytes()
    valid = [
        ObjectEvent(bucket=bucket, key=k, size=len(body), etag=s3.put_object(Bucket=bucket, Key=k, Body=body)["ETag"].strip('"'))
        for k in ("before.flac", "after.flac")
    ]
    big_key = "uploads/" + "k" * 300_000 + ".flac"
    big = ObjectEvent(bucket=bucket, key=big_key, size=len(body), etag="0" * 32, event_time=datetime.now(timezone.utc))
    garbage = b"\x00garbage " * 150_000
    create_topics(st_)
    publish(st_, [valid[0], big, (b"garbage", garbage), valid[1]], max_request_size=4 << 20)
    m = fake_models()
    try:
        stats = consume_until_idle(st_, m)  # returns: no DeadLetterFailed, the stream went on
    finally:
        m.close()

    assert_exactly_once(st_.output_dir, versions(valid))
    letters = read_topic(st_, st_.dlq_topic, expected=2)
    assert len(letters) == 2, [r.key[:80] for r in letters]
    for r in letters:
        assert len(r.key) + len(r.value) <= DEFAULT_LIMITS.max_record_bytes
    by_type = {decode(r.value)["error_type"] == "MalformedEvent": (r.key, decode(r.value)) for r in letters}
    key, d = by_type[False]  # the 300 KB key
    assert d["truncated"]["object.key"] == {"bytes": len(big_key), "sha256": sha256(big_key.encode())}
    assert d["truncated"]["event"]["sha256"] == sha256(big.to_json())
    assert d["object"]["bucket"] == bucket and big_key.startswith(d["object"]["key"])
    src = d["source"]
    assert key == f"{src['topic']}:{src['partition']}:{src['offset']}:sha256:{sha256(f'{bucket}/{big_key}'.encode())}".encode()
    _, d = by_type[True]  # the 1.5 MB message
    assert d["truncated"]["event"] == {"bytes": len(garbage), "sha256": sha256(garbage)}
    assert stats.dead_letters == 2 and stats.rows == 2
    ends = partition_ends(st_, expected=4)
    assert sum(ends.values()) == 4
    assert committed_offsets(st_) == {p: (end or None) for p, end in ends.items()}
