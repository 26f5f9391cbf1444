"""Dead letters: one bounded JSON record per input that cannot become a row, with its typed reason.

The record (the message value):

    event       the original message value as text (invalid UTF-8 replaced), or the event
                re-serialized when the message held none
    error_type  the class name of the `PermanentError`
    error       the reason
    failed_at   ISO-8601 UTC with milliseconds and a `Z`: `2026-11-01T12:00:00.000Z`
    source      {topic, partition, offset}: where the input came from
    object      {bucket, key, etag}
    truncated   present only when a field was cut: per cut field (`event`, `error`, `error_type`,
                `source.topic`, `object.bucket`, `object.key`, `object.etag`) the original's
                size in bytes and its SHA-256 (hex) - of the message value exactly as the broker
                holds it for `event`, of the UTF-8 text for the others - so the original can be
                found: {"event": {"bytes": 314572, "sha256": "9f86d0..."}}

Bounded, whatever the input (a 300 KB object key, a 5 MB message, invalid UTF-8, an error that
quotes its input): each field is cut on a character boundary to its limit in `DeadLetterLimits`,
then, while the record would still exceed `max_record_bytes` (JSON escaping can grow a text up
to six times), the largest field is cut further. `len(key) + len(value) <= max_record_bytes`
always holds, so a dead letter never exceeds the topic's maximum message size and the stream
never stops on one.

The message key names the source position and the object:
`topic:partition:offset:bucket/key`. One message may hold several events (an S3 `Records[]`
list), hence the object part. A dead letter written twice (a crash after the DLQ write but
before the file was finalized) has the same key, so it is recognisable and a compacted DLQ
topic keeps one copy. When that key would exceed `max_key_bytes` (or the object's name is not
valid UTF-8) the object part becomes `sha256:<hex of the UTF-8 "bucket/key">`; it holds no `/`,
so it is never mistaken for an object name.
"""

from __future__ import annotations

import asyncio
import codecs
import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone

import orjson
from aiokafka import AIOKafkaProducer

from pipeline.batch import Failure, WorkItem
from pipeline.errors import DeadLetterFailed

# What a record holds besides its cuttable texts - names, numbers, `failed_at`, one `truncated`
# entry per field - stays under 1.5 KiB; the smallest `max_record_bytes` leaves room for it and
# for the key (at most a quarter of the record).
MIN_RECORD_BYTES = 4096
MIN_KEY_BYTES = 128  # `sha256:` and 64 hex digits, with room for a topic and a position
# Room one `truncated` entry takes: {"object.bucket":{"bytes":<20 digits>,"sha256":"<64 hex>"}}
TRUNCATION_ENTRY_BYTES = 128


@dataclass(frozen=True, slots=True)
class DeadLetterLimits:
    """Bounds of one dead letter, in bytes of UTF-8.

    `max_record_bytes` bounds key + value and must stay below the producer's `max_request_size`
    and the broker's `message.max.bytes` (both 1 MiB by default). The field limits keep every
    legitimate input whole: S3 and R2 object keys are at most 1024 bytes, bucket names 63.
    """

    max_record_bytes: int = 256 * 1024
    max_event_bytes: int = 64 * 1024
    max_error_bytes: int = 8 * 1024
    max_field_bytes: int = 1024  # object bucket, key, etag; source topic; error_type
    max_key_bytes: int = 2048

    def __post_init__(self) -> None:
        if self.max_record_bytes < MIN_RECORD_BYTES:
            raise ValueError(f"max_record_bytes={self.max_record_bytes} is below the minimum {MIN_RECORD_BYTES}")
        if not MIN_KEY_BYTES <= self.max_key_bytes <= self.max_record_bytes // 4:
            raise ValueError(
                f"max_key_bytes={self.max_key_bytes} must lie in [{MIN_KEY_BYTES}, max_record_bytes/4]"
            )
        for name in ("max_event_bytes", "max_error_bytes", "max_field_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")


DEFAULT_LIMITS = DeadLetterLimits()


def encode_dead_letter(
    f: Failure, limits: DeadLetterLimits = DEFAULT_LIMITS, now: datetime | None = None
) -> tuple[bytes, bytes]:
    """The DLQ message for one failure, (key, value): `len(key) + len(value) <= limits.max_record_bytes`."""
    key = dead_letter_key(f, limits.max_key_bytes)
    value = orjson.dumps(dead_letter_record(f, limits, now, budget=limits.max_record_bytes - len(key)))
    return key, value


def dead_letter_key(f: Failure, max_key_bytes: int = DEFAULT_LIMITS.max_key_bytes) -> bytes:
    """`topic:partition:offset:bucket/key`, or `topic:partition:offset:sha256:<hex>` when too long."""
    src, ev = f.item.source, f.item.event
    head, name = f"{src.topic}:{src.partition}:{src.offset}:", f"{ev.bucket}/{ev.key}"
    for key in (head + name, f"{head}sha256:{_sha256(name.encode('utf-8', 'surrogatepass'))}"):
        encoded = _utf8(key)
        if encoded is not None and len(encoded) <= max_key_bytes:
            return encoded
    return f"sha256:{_sha256((head + name).encode('utf-8', 'surrogatepass'))}".encode()  # a topic Kafka would refuse


def dead_letter_record(
    f: Failure, limits: DeadLetterLimits = DEFAULT_LIMITS, now: datetime | None = None, budget: int | None = None
) -> dict:
    """The record for one failure; its JSON is at most `budget` bytes (default: `max_record_bytes`)."""
    budget = limits.max_record_bytes if budget is None else budget
    item, ev = f.item, f.item.event
    fields = {  # the texts a record holds, each cut to its limit
        "event": _Field(event_bytes(item), limits.max_event_bytes),
        "error_type": _Field.of(f.error.error_type, limits.max_field_bytes),
        "error": _Field.of(str(f.error), limits.max_error_bytes),
        "source.topic": _Field.of(item.source.topic, limits.max_field_bytes),
        "object.bucket": _Field.of(ev.bucket, limits.max_field_bytes),
        "object.key": _Field.of(ev.key, limits.max_field_bytes),
        "object.etag": _Field.of(ev.etag, limits.max_field_bytes),
    }
    failed_at = _iso_z(now or datetime.now(timezone.utc))
    while True:
        texts = {name: fld.text() for name, fld in fields.items()}
        record = {
            "event": texts["event"],
            "error_type": texts["error_type"],
            "error": texts["error"],
            "failed_at": failed_at,
            "source": {
                "topic": texts["source.topic"], "partition": item.source.partition, "offset": item.source.offset,
            },
            "object": {
                "bucket": texts["object.bucket"],
                "key": texts["object.key"],
                "etag": texts["object.etag"] if ev.etag is not None else None,
            },
        }
        truncated = {name: fld.identity() for name, fld in fields.items() if fld.truncated}
        if truncated:
            record["truncated"] = truncated
        over = len(orjson.dumps(record)) - budget
        if over <= 0:
            return record
        # Still too large (JSON escaping, or limits that add up past the budget): cut the field
        # whose JSON is largest by what is over, plus room for the `truncated` entry it may gain.
        name = max(fields, key=lambda n: _json_size(texts[n]))
        fields[name].shrink(_json_size(texts[name]) - over - TRUNCATION_ENTRY_BYTES)


def event_bytes(item: WorkItem) -> bytes:
    """What the `event` text stands for: the message value, or the event re-serialized when the
    item has none (a message without a value)."""
    if item.raw is not None:
        return item.raw
    r2 = item.event.to_r2_dict()
    try:
        return orjson.dumps(r2)
    except orjson.JSONEncodeError:  # a lone surrogate in a name: the standard library escapes it
        return json.dumps(r2).encode()


class DeadLetterWriter:
    def __init__(self, producer: AIOKafkaProducer, topic: str, limits: DeadLetterLimits = DEFAULT_LIMITS) -> None:
        self.producer = producer
        self.topic = topic
        self.limits = limits

    async def send(self, failures: list[Failure]) -> None:
        """Returns once the broker acknowledged every dead letter; raises DeadLetterFailed otherwise."""
        if not failures:
            return
        try:
            futures = []
            for f in failures:
                key, value = encode_dead_letter(f, self.limits)
                futures.append(await self.producer.send(self.topic, value, key=key))
            await asyncio.gather(*futures)
        except Exception as exc:
            raise DeadLetterFailed(f"could not write {len(failures)} dead letters to {self.topic}: {exc}") from exc


# --- cutting texts -----------------------------------------------------------------------------
class _Field:
    """One text of the record: the original bytes, and the prefix of it the record holds."""

    __slots__ = ("original", "limit", "truncated", "_text")

    def __init__(self, original: bytes, limit: int) -> None:
        self.original = original
        self.limit = limit
        self._text: str | None = None
        self.truncated = False

    @classmethod
    def of(cls, s: str | None, limit: int) -> "_Field":
        # surrogatepass: a lone surrogate (not valid UTF-8) is hashed as is and replaced in the text
        return cls(("" if s is None else s).encode("utf-8", "surrogatepass"), limit)

    def text(self) -> str:
        if self._text is None:
            self._text, self.truncated = _prefix(self.original, self.limit)
        return self._text

    def shrink(self, encoded_target: int) -> None:
        """Cut so that the JSON of the text is about `encoded_target` bytes; always shorter than now."""
        now = len(self.text().encode())
        if now == 0:  # cannot happen with validated limits: the record's fixed part is small
            raise AssertionError("a dead letter cannot be made to fit its record limit")
        json_now = _json_size(self._text)  # type: ignore[arg-type]
        proportional = now * max(encoded_target, 0) // max(json_now, 1)  # escaping is spread evenly, roughly
        self.limit = max(0, min(now - 1, proportional))
        self._text = None

    def identity(self) -> dict:
        return {"bytes": len(self.original), "sha256": _sha256(self.original)}


def _prefix(data: bytes, limit: int) -> tuple[str, bool]:
    """The longest prefix of `data`, decoded (invalid UTF-8 replaced), whose UTF-8 is at most
    `limit` bytes and ends on a character boundary; and whether it is shorter than the whole."""
    # Every input byte decodes to at least one output byte, so `limit` input bytes are enough;
    # an incomplete character at the end of the slice is held back, not replaced.
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    whole = len(data) <= limit
    text = decoder.decode(data[: limit], final=whole)
    encoded = text.encode("utf-8")
    if len(encoded) <= limit:
        return text, not whole
    return encoded[:limit].decode("utf-8", "ignore"), True


def _json_size(text: str) -> int:
    return len(orjson.dumps(text)) - 2


def _utf8(s: str) -> bytes | None:
    try:
        return s.encode("utf-8")
    except UnicodeEncodeError:
        return None


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _iso_z(t: datetime) -> str:
    return t.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
