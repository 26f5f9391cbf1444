"""Every notification shape we accept becomes the same `ObjectEvent`; anything else is MalformedEvent."""

from __future__ import annotations

import base64
import dataclasses
from datetime import datetime, timezone

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import MalformedEvent
from pipeline.events import ObjectEvent, decode_maybe_base64, parse_event_json, parse_event_payload
from producer.kafka import encode_event

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


# --- object versions ------------------------------------------------------------------------


def test_an_s3_or_minio_version_id_is_kept_on_the_event():
    [s3] = parse_event_json({"Records": [s3_record("a.flac", versionId="3HL4kqtJlcpXroDTDmJ+rmSpXd3dIbrHY")]})
    minio = minio_event("b.flac")
    minio["Records"][0]["s3"]["object"]["versionId"] = "e5f8e7a1-8b7c-4b5e-9a1a-0c1d2e3f4a5b"
    [mn] = parse_event_json(minio)
    assert s3.version_id == "3HL4kqtJlcpXroDTDmJ+rmSpXd3dIbrHY"  # verbatim: version ids are not form-encoded
    assert mn.version_id == "e5f8e7a1-8b7c-4b5e-9a1a-0c1d2e3f4a5b"


def test_events_without_a_version_id_have_none():
    [r2] = parse_event_json(R2_PUT)  # R2 has no versions
    [s3] = parse_event_json({"Records": [s3_record("a.flac")]})  # an unversioned bucket
    [empty] = parse_event_json({"Records": [s3_record("a.flac", versionId="")]})
    assert r2.version_id is s3.version_id is empty.version_id is None
    assert "versionId" not in orjson.loads(r2.to_json())["object"]


def test_a_republished_s3_event_keeps_its_version_id_through_the_r2_shape():
    [s3] = parse_event_json({"Records": [s3_record("red+flower.flac", versionId="v-42")]})
    written = orjson.loads(s3.to_json())
    assert written["object"]["versionId"] == "v-42"
    [again] = parse_event_payload(s3.to_json())
    assert again == s3 and again.version_id == "v-42"


def test_two_versions_of_one_object_are_different_events():
    [one] = parse_event_json({"Records": [s3_record("a.flac", versionId="v1")]})
    [two] = parse_event_json({"Records": [s3_record("a.flac", versionId="v2")]})
    assert one != two and one.message_key == two.message_key  # same key: same partition, in order


# --- events that parse can always be used -----------------------------------------------------


def r2_with(**obj) -> dict:
    return {**R2_PUT, "object": {"key": "k.flac", **obj}}


@pytest.mark.parametrize(
    "payload, reason",
    [
        (r2_with(size=1e20), "object.size is out of range"),
        (r2_with(size=2**63), "object.size is out of range"),
        (r2_with(size=18446744073709551615), "object.size is out of range"),  # orjson reads it as an int
        (r2_with(size="9" * 30), "object.size is out of range"),
        (r2_with(size=1.5), "object.size must be an integer"),
        (r2_with(size=float("inf")), "object.size must be an integer"),
        (r2_with(size=float("nan")), "object.size must be an integer"),
        (r2_with(size="9" * 5000), "object.size must be an integer"),  # past int()'s digit limit
        ({**R2_PUT, "eventTime": "9999-12-31T23:59:59-05:00"}, "eventTime is out of range"),
        ({**R2_PUT, "eventTime": "0001-01-01T00:00:00+05:00"}, "eventTime is out of range"),
        ({**R2_PUT, "eventTime": "9999-12-31T23:59:59Z"}, "eventTime is out of range"),
        ({**R2_PUT, "eventTime": "1969-12-31T23:59:59.999Z"}, "eventTime is out of range"),
        ({**R2_PUT, "eventTime": "2201-01-01T00:00:00Z"}, "eventTime is out of range"),
        (r2_with(versionId=7), "object.versionId must be a string"),
        ({"Records": [s3_record("k", versionId=["v"])]}, "s3.object.versionId must be a string"),
        (r2_with(key="lone \ud800 surrogate.flac"), "object.key is not valid Unicode"),
        ({**R2_PUT, "bucket": "b\udfff"}, "bucket is not valid Unicode"),
        (r2_with(eTag="\ud800"), "eTag is not valid Unicode"),
        ({**R2_PUT, "copySource": {1: "x"}}, "copySource"),
    ],
)
def test_an_event_that_could_not_be_serialized_or_stored_is_malformed_at_parse_time(payload, reason):
    with pytest.raises(MalformedEvent, match=reason):
        parse_event_json(payload)


def test_the_edges_of_the_accepted_ranges_parse_and_serialize():
    for payload in (
        r2_with(size=2**63 - 1),
        r2_with(size=1024.0),  # an integral float is a whole number of bytes
        r2_with(size="65536"),
        {**R2_PUT, "eventTime": "1970-01-01T00:00:00Z"},
        {**R2_PUT, "eventTime": "2200-12-31T23:59:59.999Z"},
        {**R2_PUT, "eventTime": "2201-01-01T00:30:00+01:00"},  # 2200-12-31T23:30Z
        {**R2_PUT, "eventTime": "2024-05-24T19:36:44"},  # no zone: UTC
        r2_with(key="k" * 100_000, eTag="e" * 10_000),  # absurdly long, still an event
    ):
        [event] = parse_event_json(payload)
        [again] = parse_event_payload(event.to_json())
        assert again == event


def test_a_malformed_reason_is_one_short_line_even_for_huge_or_multiline_input():
    for payload in ({**R2_PUT, "eventTime": "x" * 100_000}, {**R2_PUT, "eventTime": "line\nbreak"},
                    r2_with(size="7" * 10_000)):
        with pytest.raises(MalformedEvent) as caught:
            parse_event_json(payload)
        assert "\n" not in str(caught.value) and len(str(caught.value)) < 200


_anything = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40),
    st.text(st.characters(categories=["Cs"]), min_size=1, max_size=3),  # lone surrogates
    st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
_PLAUSIBLE = {
    "key": st.text(min_size=1, max_size=30),
    "size": st.one_of(st.none(), st.integers(min_value=0, max_value=2**63 - 1), st.integers(min_value=0).map(str),
                      st.integers(min_value=0, max_value=2**53).map(float)),
    "etag": st.one_of(st.none(), st.text(max_size=40)),
    "version": st.one_of(st.none(), st.text(max_size=40)),
    "event_time": st.one_of(
        st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(2200, 12, 31), timezones=st.timezones())
        .map(lambda t: t.isoformat()),
        st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(2200, 12, 31))
        .map(lambda t: t.isoformat() + "Z"),
    ),
    "account": st.one_of(st.none(), st.text(max_size=20)),
}
_WILD = {
    **{name: _anything for name in _PLAUSIBLE},
    "size": st.one_of(_anything, st.integers(min_value=2**62, max_value=2**65),
                      st.floats(min_value=0, max_value=2**70)),
    "event_time": st.one_of(_anything, st.datetimes(timezones=st.timezones()).map(lambda t: t.isoformat())),
}


@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_whatever_the_fields_hold_an_event_either_parses_into_a_kafka_record_or_is_malformed(data):
    wild = data.draw(st.sets(st.sampled_from(sorted(_PLAUSIBLE)), max_size=2), label="wild fields")
    v = {name: data.draw((_WILD if name in wild else _PLAUSIBLE)[name], label=name) for name in _PLAUSIBLE}
    obj = {"key": v["key"], "size": v["size"], "eTag": v["etag"], "versionId": v["version"]}
    r2 = {"account": v["account"], "action": "PutObject", "bucket": "voices", "object": obj,
          "eventTime": v["event_time"]}
    s3 = {"Records": [{**s3_record("k"), "eventTime": v["event_time"], "userIdentity": {"principalId": v["account"]},
                       "s3": {"bucket": {"name": "voices"}, "object": obj}}]}
    for shape in (r2, s3):
        try:
            events = parse_event_json(shape)
        except MalformedEvent:
            continue
        for event in events:
            key_bytes, value = encode_event(event)  # never raises for a parsed event
            assert key_bytes == event.message_key
            [again] = parse_event_payload(value)
            if event.event_time is None:  # written with the time it was published
                again = dataclasses.replace(again, event_time=None)
            assert again == event
