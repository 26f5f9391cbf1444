"""The dead-letter record: one bounded JSON format on the DLQ topic, whoever writes it.

The record (the message value):

    event       the original input as text (invalid UTF-8 replaced)
    error_type  the class name of the error (`PipelineError.error_type`)
    error       the reason
    failed_at   ISO-8601 UTC with milliseconds and a `Z`: `2026-11-01T12:00:00.000Z` (`failed_at()`,
                the only timestamp format on the topic)
    ...         where the input came from, as its writer names it (the `context`):
                the consumer: `source` {topic, partition, offset} and `object` {bucket, key, etag};
                the R2 queue producer: `source` "r2-queue", `message_id`, `attempts`
    truncated   present only when a text was cut: per cut text, named by its path (`event`,
                `error`, `error_type`, `source.topic`, `object.key`, `message_id`, ...), the
                original's size in bytes and its SHA-256 (hex) - of the input bytes exactly as the
                writer got them for `event`, of the UTF-8 text for the others - so the original can
                be found: {"event": {"bytes": 314572, "sha256": "9f86d0..."}}

Bounded, whatever the input (a 300 KB object key, a 5 MB message, invalid UTF-8, an error that
quotes its input): each text is cut on a character boundary to its limit in `DeadLetterLimits`,
then, while the record would still exceed `max_record_bytes` (JSON escaping can grow a text up
to six times), the largest text is cut further. `len(key) + len(value) <= max_record_bytes`
always holds, so a dead letter never exceeds the topic's maximum message size and a writer never
stops on one.
"""

from __future__ import annotations

import codecs
import hashlib
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Mapping

import orjson

from pipeline.config import Settings

# What a record holds besides its cuttable texts - names, numbers, `failed_at`, one `truncated`
# entry per text - stays under 1.5 KiB; the smallest `max_record_bytes` leaves room for it and
# for the key (at most a quarter of the record).
MIN_RECORD_BYTES = 4096
MIN_KEY_BYTES = 128  # `sha256:` and 64 hex digits, with room for a topic and a position
# Room one `truncated` entry takes: {"object.bucket":{"bytes":<20 digits>,"sha256":"<64 hex>"}}
TRUNCATION_ENTRY_BYTES = 128
# Names the record itself uses: a context cannot replace them.
RECORD_FIELDS = frozenset({"event", "error_type", "error", "failed_at", "truncated"})


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
    max_field_bytes: int = 1024  # each text of the context (bucket, key, etag, topic, ids); error_type
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

    @classmethod
    def from_settings(cls, settings: Settings) -> "DeadLetterLimits":
        """`METAVOICE_DLQ_MAX_RECORD_BYTES` bounds the record; the event keeps at most a quarter of it."""
        return cls(max_record_bytes=settings.dlq_max_record_bytes,
                   max_event_bytes=min(cls().max_event_bytes, settings.dlq_max_record_bytes // 4))


DEFAULT_LIMITS = DeadLetterLimits()


def failed_at(now: datetime | None = None) -> str:
    """The record's timestamp: ISO-8601 UTC, milliseconds, `Z` (`2026-11-01T12:00:00.000Z`)."""
    t = (now or datetime.now(timezone.utc)).astimezone(timezone.utc)
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def encode_dead_letter(
    event: bytes, error_type: str, error: str, context: Mapping[str, Any], key: bytes | None = None,
    limits: DeadLetterLimits = DEFAULT_LIMITS, now: datetime | None = None,
) -> tuple[bytes | None, bytes]:
    """The DLQ message `(key, value)`: `len(key) + len(value) <= limits.max_record_bytes`.

    A key longer than `limits.max_key_bytes` is replaced by `sha256:<hex of the key>`."""
    if key is not None and len(key) > limits.max_key_bytes:
        key = f"sha256:{_sha256(key)}".encode()
    budget = limits.max_record_bytes - len(key or b"")
    record = dead_letter_record(event, error_type, error, context, limits, now, budget=budget)
    return key, orjson.dumps(record)


def readable_key(head: str, name: str, max_key_bytes: int = DEFAULT_LIMITS.max_key_bytes) -> bytes:
    """`head + name` when its UTF-8 fits `max_key_bytes`; else `head + "sha256:<hex of name>"`;
    else (a head too long, or not valid UTF-8) `sha256:<hex of head + name>`. The hashes are of
    the UTF-8 bytes, lone surrogates included as they are (`surrogatepass`); a hashed part holds
    no `/`, so it is never mistaken for an object name."""
    for key in (head + name, f"{head}sha256:{_sha256(name.encode('utf-8', 'surrogatepass'))}"):
        encoded = _utf8(key)
        if encoded is not None and len(encoded) <= max_key_bytes:
            return encoded
    return f"sha256:{_sha256((head + name).encode('utf-8', 'surrogatepass'))}".encode()


def dead_letter_record(
    event: bytes, error_type: str, error: str, context: Mapping[str, Any],
    limits: DeadLetterLimits = DEFAULT_LIMITS, now: datetime | None = None, budget: int | None = None,
) -> dict:
    """The record; its JSON is at most `budget` bytes (default: `max_record_bytes`).

    `context` says where the input came from: JSON values, its texts (nested ones too) are cut
    to `max_field_bytes` like the record's own; `None` stays `None`."""
    reserved = RECORD_FIELDS & set(context)
    if reserved:
        raise ValueError(f"a dead letter's context cannot hold {', '.join(sorted(reserved))}")
    budget = limits.max_record_bytes if budget is None else budget
    fields = {  # the texts a record holds, each cut to its limit
        "event": _Field(event, limits.max_event_bytes),
        "error_type": _Field.of(error_type, limits.max_field_bytes),
        "error": _Field.of(error, limits.max_error_bytes),
    }
    for path, text in _texts(context):
        fields[path] = _Field.of(text, limits.max_field_bytes)
    stamp = failed_at(now)
    while True:
        texts = {name: fld.text() for name, fld in fields.items()}
        record = {
            "event": texts["event"],
            "error_type": texts["error_type"],
            "error": texts["error"],
            "failed_at": stamp,
            **_with_texts(context, texts),
        }
        truncated = {name: fld.identity() for name, fld in fields.items() if fld.truncated}
        if truncated:
            record["truncated"] = truncated
        over = len(orjson.dumps(record)) - budget
        if over <= 0:
            return record
        # Still too large (JSON escaping, or limits that add up past the budget): cut the text
        # whose JSON is largest by what is over, plus room for the `truncated` entry it may gain.
        name = max(fields, key=lambda n: _json_size(texts[n]))
        fields[name].shrink(_json_size(texts[name]) - over - TRUNCATION_ENTRY_BYTES)


def _texts(context: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """(dotted path, text) of every text in `context`, nested mappings included."""
    found: list[tuple[str, str]] = []
    for name, value in context.items():
        if isinstance(value, str):
            found.append((prefix + name, value))
        elif isinstance(value, Mapping):
            found.extend(_texts(value, f"{prefix}{name}."))
    return found


def _with_texts(context: Mapping[str, Any], texts: Mapping[str, str], prefix: str = "") -> dict[str, Any]:
    """`context` with each text replaced by its (possibly cut) version from `texts`."""
    out: dict[str, Any] = {}
    for name, value in context.items():
        if isinstance(value, str):
            out[name] = texts[prefix + name]
        elif isinstance(value, Mapping):
            out[name] = _with_texts(value, texts, f"{prefix}{name}.")
        else:
            out[name] = value
    return out


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
