"""Every notification shape we accept becomes the same `ObjectEvent`; anything else is MalformedEvent."""

from __future__ import annotations

import base64
from datetime import datetime, timezone

import orjson
import pytest

from pipeline.errors import MalformedEvent
from pipeline.events import ObjectEvent, decode_maybe_base64, parse_event_json, parse_event_payload

R2_PUT = {
    "account": "3f4b7e3dcab231cbfdaa90a6a28bd548",
    "action": "PutObject",
    "bucket": "voices",
    "object": {"key": "speakers/a b+c.flac", "size": 65536, "eTag": "c846ff7a18f28c2e262116d6e8719ef0"},
    "eventTime": "2024-05-24T19:36:44.379Z",
}


def s3_record(key: str, event_name: str = "ObjectCreated:Put", source: str = "aws:s3", **obj) -> dict:
    return {
        "eventVersion": "2.1",
        "eventSource": source,
        "awsRegion": "us-east-1",
        "eventTime": "2024-05-24T19:36:44.379Z",
        "eventName": event_name,
        "userIdentity": {"principalId": "AWS:AIDAEXAMPLE"},
        "s3": {
            "s3SchemaVersion": "1.0",
            "bucket": {"name": "voices", "arn": "arn:aws:s3:::voices"},
            "object": {"key": key, "size": 1024, "eTag": '"d41d8cd98f00b204e9800998ecf8427e"',
                       "sequencer": "0055AED6DCD90281E5", **obj},
        },
    }


def minio_event(escaped_key: str, event_name: str = "s3:ObjectCreated:Put") -> dict:
    record = s3_record(escaped_key, event_name, source="minio:s3")
    record["eventVersion"] = "2.0"
    return {"EventName": event_name, "Key": "voices/unescaped-copy", "Records": [record]}


# --- R2 -----------------------------------------------------------------------------------


def test_r2_put_event_becomes_a_create_event_with_the_key_taken_verbatim():
    [event] = parse_event_payload(orjson.dumps(R2_PUT))
    assert event == ObjectEvent(
        bucket="voices",
        key="speakers/a b+c.flac",  # R2 keys are not URL-encoded: '+' stays '+'
        action="PutObject",
        size=65536,
        etag="c846ff7a18f28c2e262116d6e8719ef0",
        event_time=datetime(2024, 5, 24, 19, 36, 44, 379000, tzinfo=timezone.utc),
        account="3f4b7e3dcab231cbfdaa90a6a28bd548",
    )
    assert event.is_create
    assert event.message_key == b"voices/speakers/a b+c.flac"


def test_r2_copy_and_multipart_complete_are_creates_and_keep_the_copy_source():
    copy = {**R2_PUT, "action": "CopyObject", "copySource": {"bucket": "old", "object": "x.flac"}}
    multipart = {**R2_PUT, "action": "CompleteMultipartUpload"}
    [c] = parse_event_json(copy)
    [m] = parse_event_json(multipart)
    assert c.is_create and c.action == "CopyObject" and c.copy_source == {"bucket": "old", "object": "x.flac"}
    assert m.is_create and m.action == "CompleteMultipartUpload"


@pytest.mark.parametrize("action", ["DeleteObject", "LifecycleDeletion"])
def test_r2_deletes_parse_without_size_or_etag_and_are_not_creates(action):
    body = {"account": "a", "action": action, "bucket": "voices", "object": {"key": "x.flac"},
            "eventTime": "2024-05-24T19:36:44.379Z"}
    [event] = parse_event_json(body)
    assert not event.is_create
    assert event.size is None and event.etag is None


def test_a_json_list_of_r2_events_yields_every_event_in_order():
    second = {**R2_PUT, "object": {**R2_PUT["object"], "key": "two.flac"}}
    events = parse_event_payload(orjson.dumps([R2_PUT, second]))
    assert [e.key for e in events] == ["speakers/a b+c.flac", "two.flac"]


def test_r2_event_round_trips_through_its_topic_json():
    [event] = parse_event_json({**R2_PUT, "action": "CopyObject", "copySource": {"bucket": "b", "object": "o"}})
    [again] = parse_event_payload(event.to_json())
    assert again == event and again.copy_source == event.copy_source


# --- AWS S3 -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "encoded, key",
    [
        ("red+flower.flac", "red flower.flac"),  # '+' is an encoded space
        ("a%2Bb.flac", "a+b.flac"),  # a literal '+' arrives as %2B
        ("dir/caf%C3%A9+%281%29.flac", "dir/café (1).flac"),
    ],
)
def test_s3_keys_are_form_url_decoded(encoded, key):
    [event] = parse_event_json({"Records": [s3_record(encoded)]})
    assert event.key == key
    assert event.etag == "d41d8cd98f00b204e9800998ecf8427e"  # quotes stripped
    assert event.account == "AWS:AIDAEXAMPLE"


@pytest.mark.parametrize(
    "event_name, action, is_create",
    [
        ("ObjectCreated:Put", "PutObject", True),
        ("ObjectCreated:Post", "PostObject", True),
        ("ObjectCreated:Copy", "CopyObject", True),
        ("ObjectCreated:CompleteMultipartUpload", "CompleteMultipartUpload", True),
        ("ObjectRemoved:Delete", "DeleteObject", False),
        ("ObjectRemoved:DeleteMarkerCreated", "DeleteObject", False),
        ("LifecycleExpiration:Delete", "LifecycleDeletion", False),
        ("ObjectRestore:Completed", "ObjectRestore:Completed", False),
    ],
)
def test_s3_event_names_map_to_r2_actions(event_name, action, is_create):
    [event] = parse_event_json({"Records": [s3_record("k.flac", event_name)]})
    assert (event.action, event.is_create) == (action, is_create)


def test_one_s3_notification_may_carry_several_records():
    events = parse_event_json({"Records": [s3_record("a.flac"), s3_record("b.flac")]})
    assert [e.key for e in events] == ["a.flac", "b.flac"]


def test_s3_test_event_yields_no_events_and_is_not_an_error():
    test_event = {"Service": "Amazon S3", "Event": "s3:TestEvent", "Time": "2024-05-24T19:36:44.379Z",
                  "Bucket": "voices", "RequestId": "5582815E1AEA5ADF", "HostId": "8cLeGAmw098X5cv4Zkwcmo8vvZa3eH3e"}
    assert parse_event_payload(orjson.dumps(test_event)) == []


# --- MinIO --------------------------------------------------------------------------------


def test_minio_keys_escaped_by_go_query_escape_are_decoded():
    # MinIO runs url.QueryEscape on the key: '/' -> %2F, ' ' -> '+', '+' -> %2B, '(' -> %28
    [event] = parse_event_json(minio_event("photos%2Fmy+summer%282024%29%2Ba.flac"))
    assert event.key == "photos/my summer(2024)+a.flac"
    assert event.action == "PutObject" and event.is_create


@pytest.mark.parametrize(
    "event_name, is_create",
    [
        ("s3:ObjectCreated:Put", True),
        ("s3:ObjectCreated:Copy", True),
        ("s3:ObjectCreated:CompleteMultipartUpload", True),
        ("s3:ObjectCreated:PutTagging", False),  # metadata only: no new audio to process
        ("s3:ObjectCreated:PutRetention", False),
        ("s3:ObjectRemoved:Delete", False),
        ("s3:ObjectAccessed:Get", False),
    ],
)
def test_minio_event_names_decide_what_counts_as_a_create(event_name, is_create):
    [event] = parse_event_json(minio_event("k.flac", event_name))
    assert event.is_create is is_create


# --- Cloudflare Queues bodies ---------------------------------------------------------------


def test_queue_bodies_are_accepted_as_json_objects_json_text_or_base64_json():
    text = orjson.dumps(R2_PUT).decode()
    for body in (R2_PUT, text, base64.b64encode(text.encode()).decode(), text.encode()):
        [event] = parse_event_json(decode_maybe_base64(body))
        assert event.key == "speakers/a b+c.flac"


def test_a_queue_body_that_is_neither_json_nor_base64_json_is_malformed():
    with pytest.raises(MalformedEvent):
        decode_maybe_base64("definitely not json")
    with pytest.raises(MalformedEvent):
        decode_maybe_base64(base64.b64encode(b"\xff\xfe not json").decode())


# --- malformed inputs -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        None,
        b"",
        b"not json",
        b"[1, 2]",
        b'"a string"',
        b"42",
        orjson.dumps({"bucket": "voices", "action": "PutObject"}),  # no object
        orjson.dumps({**R2_PUT, "object": {"size": 3}}),  # no key
        orjson.dumps({**R2_PUT, "object": {"key": ""}}),  # empty key
        orjson.dumps({**R2_PUT, "bucket": ""}),
        orjson.dumps({**R2_PUT, "action": None}),
        orjson.dumps({**R2_PUT, "object": {"key": "k", "size": "big"}}),
        orjson.dumps({**R2_PUT, "object": {"key": "k", "size": -1}}),
        orjson.dumps({**R2_PUT, "object": {"key": "k", "size": True}}),
        orjson.dumps({**R2_PUT, "object": {"key": "k", "eTag": 12}}),
        orjson.dumps({**R2_PUT, "eventTime": "yesterday"}),
        orjson.dumps({**R2_PUT, "eventTime": 1716579404}),
        orjson.dumps({**R2_PUT, "copySource": "old/x.flac"}),
        orjson.dumps({"Records": "nope"}),
        orjson.dumps({"Records": [42]}),
        orjson.dumps({"Records": [{"eventName": "ObjectCreated:Put"}]}),  # no s3
        orjson.dumps({"Records": [{**s3_record("k"), "s3": {"bucket": "voices", "object": {"key": "k"}}}]}),
        orjson.dumps({"Records": [{**s3_record("k"), "s3": {"bucket": {"name": "v"}, "object": []}}]}),
        orjson.dumps({"Records": [{**s3_record("k"), "eventName": ""}]}),
        orjson.dumps({"Records": [{**s3_record("k"), "userIdentity": "me"}]}),
        orjson.dumps({"Records": [s3_record("")]}),  # empty key
        orjson.dumps([R2_PUT, {"bucket": "only"}]),  # one bad item spoils the list
    ],
)
def test_malformed_inputs_raise_malformed_event_never_another_error(raw):
    with pytest.raises(MalformedEvent):
        parse_event_payload(raw)
