"""The one event model (`ObjectEvent`) and parsers for every notification shape we accept.

Topic messages are written in Cloudflare R2's event-notification shape; the consumer also
reads the AWS S3 / MinIO `Records[]` shape so a MinIO bucket can publish straight to Kafka.
An object version is identified by `(bucket, key, etag)`; S3 and MinIO also name a version id
(`s3.object.versionId`), which is kept (`ObjectEvent.version_id`, `object.versionId` in the R2
shape we write) so the download can ask for exactly that version. R2 has no version ids.

Shapes accepted (`parse_event_payload` / `parse_event_json`):

- R2: one `{"account", "action", "bucket", "object": {...}, "eventTime"}` object, or a JSON
  list of them (what a Worker or a webhook sender may batch).
- AWS S3: `{"Records": [...]}`; keys are form-URL-encoded (space -> `+`, `+` -> `%2B`).
- MinIO (Kafka target and webhook): `{"EventName", "Key", "Records": [...]}`; MinIO escapes
  keys with Go's `url.QueryEscape`, which is the same form encoding (space -> `+`), so both
  are decoded with `unquote_plus`.
- `s3:TestEvent` (sent once when a notification is configured): no events, not an error.

Anything else raises `MalformedEvent` (never `KeyError`/`AttributeError`), so every caller can
dead-letter or reject it with a reason. An event that parses can always be used: sizes fit
Kafka's and Parquet's int64 (`0 <= size < 2**63`, integral), event times lie in years
1970..2200 (and convert to UTC), every text is a `str` that encodes as UTF-8, so `to_json()`
and `message_key` never raise on a parsed event. Reasons are one line, with long input clipped.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any
from urllib.parse import unquote_plus

import orjson

from .errors import MalformedEvent
from .timeutil import parse_iso_time

MAX_SIZE = 2**63 - 1  # int64: Kafka JSON readers, pyarrow's size_bytes column
# Earliest and latest accepted eventTime (UTC): outside, a time is a sender's bug, and a year
# near 1 or 9999 overflows as soon as it is shifted to UTC or to epoch milliseconds.
MIN_EVENT_TIME = datetime(1970, 1, 1, tzinfo=timezone.utc)
MAX_EVENT_TIME = datetime(2201, 1, 1, tzinfo=timezone.utc)
REASON_CLIP = 80  # characters of offending input quoted in a reason

CREATE_ACTIONS = frozenset({"PutObject", "CopyObject", "CompleteMultipartUpload", "PostObject"})
DELETE_ACTIONS = frozenset({"DeleteObject", "LifecycleDeletion"})


@dataclass(frozen=True, slots=True)
class ObjectEvent:
    bucket: str
    key: str
    action: str = "PutObject"
    size: int | None = None
    etag: str | None = None
    # S3/MinIO object version (`s3.object.versionId`); None for R2 and unversioned buckets.
    version_id: str | None = None
    event_time: datetime | None = None
    account: str = ""
    copy_source: dict[str, str] | None = field(default=None, compare=False)

    @property
    def is_create(self) -> bool:
        return self.action in CREATE_ACTIONS

    @property
    def message_key(self) -> bytes:
        """Kafka key: all events of one object land in one partition, in order."""
        return f"{self.bucket}/{self.key}".encode()

    def to_r2_dict(self) -> dict[str, Any]:
        obj: dict[str, Any] = {"key": self.key}
        if self.size is not None:
            obj["size"] = self.size
        if self.etag is not None:
            obj["eTag"] = self.etag
        if self.version_id is not None:
            obj["versionId"] = self.version_id
        body: dict[str, Any] = {
            "account": self.account,
            "action": self.action,
            "bucket": self.bucket,
            "object": obj,
            "eventTime": _format_time(self.event_time or datetime.now(timezone.utc)),
        }
        if self.copy_source:
            body["copySource"] = self.copy_source
        return body

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_r2_dict())


def parse_event_payload(value: bytes | str | None) -> list[ObjectEvent]:
    """Parse one message body into events (S3 `Records[]` may hold several, a test event none)."""
    if value is None:
        raise MalformedEvent("message has no value")
    try:
        payload = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise MalformedEvent(f"message is not JSON: {exc}") from None
    return parse_event_json(payload)


def parse_event_json(payload: Any) -> list[ObjectEvent]:
    """Events in an already-decoded body: one event object, or a JSON list of them."""
    if isinstance(payload, list):
        events: list[ObjectEvent] = []
        for i, item in enumerate(payload):
            try:
                events.extend(parse_event_dict(item))
            except MalformedEvent as exc:
                raise MalformedEvent(f"item {i}: {exc}") from None
        return events
    return parse_event_dict(payload)


def parse_event_dict(payload: Any) -> list[ObjectEvent]:
    if not isinstance(payload, dict):
        raise MalformedEvent(f"event must be a JSON object, got {type(payload).__name__}")
    if "Records" in payload:
        records = payload["Records"]
        if not isinstance(records, list):
            raise MalformedEvent("'Records' must be a list")
        return [_parse_s3_record(r) for r in records]
    if payload.get("Event") == "s3:TestEvent":
        return []  # configuration-time test event: nothing to do, nothing to dead-letter
    return [_parse_r2_event(payload)]


def _parse_r2_event(p: dict[str, Any]) -> ObjectEvent:
    obj = p.get("object")
    if not isinstance(obj, dict) or not isinstance(obj.get("key"), str) or not obj["key"]:
        raise MalformedEvent("R2 event lacks object.key")
    bucket = p.get("bucket")
    if not isinstance(bucket, str) or not bucket:
        raise MalformedEvent("R2 event lacks bucket")
    action = p.get("action")
    if not isinstance(action, str) or not action:
        raise MalformedEvent("R2 event lacks action")
    return ObjectEvent(
        bucket=_utf8(bucket, "bucket"),
        key=_utf8(obj["key"], "object.key"),
        action=_utf8(action, "action"),
        size=_optional_int(obj.get("size"), "object.size"),
        etag=_normalize_etag(obj.get("eTag")),
        version_id=_version_id(obj.get("versionId"), "object.versionId"),
        event_time=_parse_time(p.get("eventTime")),
        account=_optional_str(p.get("account"), "account"),
        copy_source=_copy_source(p.get("copySource")),
    )


def _parse_s3_record(r: Any) -> ObjectEvent:
    if not isinstance(r, dict):
        raise MalformedEvent("S3 record must be an object")
    s3 = r.get("s3")
    if not isinstance(s3, dict):
        raise MalformedEvent("S3 record lacks 's3'")
    bucket = _dict(s3.get("bucket"), "s3.bucket").get("name")
    obj = _dict(s3.get("object"), "s3.object")
    raw_key = obj.get("key")
    if not isinstance(bucket, str) or not bucket or not isinstance(raw_key, str) or not raw_key:
        raise MalformedEvent("S3 record lacks bucket name or object key")
    name = r.get("eventName")
    if not isinstance(name, str) or not name:
        raise MalformedEvent("S3 record lacks eventName")
    # AWS form-encodes keys; MinIO uses Go's url.QueryEscape, the same encoding: space -> '+',
    # a literal "+" -> "%2B", "/" -> "%2F". Plain `unquote` would keep the "+" that means a space.
    key = unquote_plus(raw_key)
    if not key:
        raise MalformedEvent("S3 record has an empty object key")
    return ObjectEvent(
        bucket=_utf8(bucket, "s3.bucket.name"),
        key=_utf8(key, "s3.object.key"),
        action=_utf8(_s3_action(name), "eventName"),
        size=_optional_int(obj.get("size"), "s3.object.size"),
        etag=_normalize_etag(obj.get("eTag") or obj.get("etag")),
        version_id=_version_id(obj.get("versionId"), "s3.object.versionId"),
        event_time=_parse_time(r.get("eventTime")),
        account=_optional_str(_dict(r.get("userIdentity"), "userIdentity").get("principalId"), "principalId"),
    )


_S3_CREATED = {
    "Put": "PutObject",
    "Copy": "CopyObject",
    "Post": "PostObject",
    "CompleteMultipartUpload": "CompleteMultipartUpload",
    "*": "PutObject",
}


def _s3_action(event_name: str) -> str:
    name = event_name.removeprefix("s3:")
    kind, _, detail = name.partition(":")
    if kind == "ObjectCreated":
        # MinIO also files metadata-only changes under ObjectCreated (PutTagging, PutRetention,
        # PutLegalHold, DeleteTagging): no new bytes, so they keep their own name and are not
        # creates. A bare or wildcard detail ("ObjectCreated", "ObjectCreated:*") is a write.
        return _S3_CREATED.get(detail, name if detail else "PutObject")
    if kind == "ObjectRemoved":
        return "DeleteObject"
    if kind == "LifecycleExpiration":
        return "LifecycleDeletion"
    return name


def decode_maybe_base64(body: Any) -> Any:
    """Cloudflare Queues may deliver JSON bodies base64-encoded; accept both."""
    if isinstance(body, (bytes, bytearray)):
        try:
            body = bytes(body).decode()
        except UnicodeDecodeError:
            raise MalformedEvent("queue message body is not UTF-8") from None
    if isinstance(body, str):
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            try:
                return orjson.loads(base64.b64decode(body, validate=True))
            except Exception:
                raise MalformedEvent("queue message body is neither JSON nor base64 JSON") from None
    return body


def _normalize_etag(etag: Any) -> str | None:
    if etag is None or etag == "":
        return None
    if not isinstance(etag, str):
        raise MalformedEvent("object eTag must be a string")
    return _utf8(etag, "object eTag").strip('"') or None


def _version_id(v: Any, name: str) -> str | None:
    if v is None or v == "":
        return None
    if not isinstance(v, str):
        raise MalformedEvent(f"{name} must be a string")
    return _utf8(v, name)


def _optional_int(v: Any, name: str) -> int | None:
    """A byte count: an int, an integral float (JSON `1024.0`) or a decimal string, in int64."""
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise MalformedEvent(f"{name} must be an integer")
    if isinstance(v, float) and not (math.isfinite(v) and v.is_integer()):
        raise MalformedEvent(f"{name} must be an integer, got {v!r}")
    try:
        n = int(v)
    except ValueError:  # also a string of more digits than int() accepts
        raise MalformedEvent(f"{name} must be an integer, got {_clip(v)}") from None
    if n < 0:
        raise MalformedEvent(f"{name} must not be negative")
    if n > MAX_SIZE:
        raise MalformedEvent(f"{name} is out of range (over 2**63 - 1): {_clip(v)}")
    return n


def _optional_str(v: Any, name: str) -> str:
    if v is None:
        return ""
    if not isinstance(v, str):
        raise MalformedEvent(f"{name} must be a string")
    return _utf8(v, name)


def _utf8(v: str, name: str) -> str:
    """A text we will write back as JSON and as a Kafka key: it must encode as UTF-8.

    orjson never decodes a lone surrogate, but a body handed over as Python objects can hold one.
    """
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise MalformedEvent(f"{name} is not valid Unicode (lone surrogate)") from None
    return v


def _dict(v: Any, name: str) -> dict[str, Any]:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise MalformedEvent(f"{name} must be an object")
    return v


def _copy_source(v: Any) -> dict[str, str] | None:
    if v is None:
        return None
    if not isinstance(v, dict) or not all(isinstance(k, str) and isinstance(x, str) for k, x in v.items()):
        raise MalformedEvent("copySource must be an object of strings")
    for k, x in v.items():
        _utf8(k, "copySource")
        _utf8(x, "copySource")
    return v


def _parse_time(v: Any) -> datetime | None:
    if v is None or v == "":
        return None
    if not isinstance(v, str):
        raise MalformedEvent("eventTime must be an ISO-8601 string")
    try:
        utc = parse_iso_time(v)  # no zone: UTC; year 9999 at -05:00 is past datetime.max: out of range
    except ValueError as exc:
        raise MalformedEvent(f"eventTime is {exc}: {_clip(v)}") from None
    if not MIN_EVENT_TIME <= utc < MAX_EVENT_TIME:
        raise MalformedEvent(f"eventTime is out of range (years 1970..2200): {_clip(v)}")
    # Milliseconds, as the topic and Parquet hold it: a republished event equals the original.
    return utc.replace(microsecond=utc.microsecond // 1000 * 1000)


def _clip(v: Any) -> str:
    """`repr` of offending input, at most REASON_CLIP characters of it: reasons stay one short line."""
    text = v if isinstance(v, str) else repr(v)
    if len(text) > REASON_CLIP:
        return repr(text[:REASON_CLIP]) + f"… ({len(text)} characters)"
    return repr(text) if isinstance(v, str) else text


def _format_time(t: datetime) -> str:
    return t.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
