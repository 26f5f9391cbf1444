"""The output record and its Parquet schema, declared once.

The writer, the summary, the report and the tests all use `SCHEMA` and `TranscribedAudio`.
With transcription off (`transcribe=false`) a row has no transcript: `transcription`, `language`,
`segments` and `whisper_model` are null (every column of `SCHEMA` is nullable).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import pyarrow as pa

SEGMENT_TYPE = pa.struct([("start", pa.float32()), ("end", pa.float32()), ("text", pa.string())])

SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("bucket", pa.string()),
        ("etag", pa.string()),
        ("size_bytes", pa.int64()),
        ("event_time", pa.timestamp("ms", tz="UTC")),
        ("duration_sec", pa.float64()),
        ("sampling_rate", pa.int32()),
        ("channels", pa.int16()),
        ("transcription", pa.string()),
        ("language", pa.string()),
        ("segments", pa.list_(SEGMENT_TYPE)),
        ("tokens", pa.list_(pa.list_(pa.int16()))),
        ("token_codebooks", pa.int16()),
        ("token_frame_rate", pa.float32()),
        ("tokenizer", pa.string()),
        ("whisper_model", pa.string()),
        ("kafka_topic", pa.string()),
        ("kafka_partition", pa.int32()),
        ("kafka_offset", pa.int64()),
        ("processed_at", pa.timestamp("ms", tz="UTC")),
    ]
)


@dataclass(slots=True)
class Segment:
    start: float
    end: float
    text: str


@dataclass(slots=True)
class Transcript:
    text: str
    language: str
    segments: list[Segment] = field(default_factory=list)


@dataclass(slots=True)
class TranscribedAudio:
    id: str
    bucket: str
    etag: str
    size_bytes: int
    event_time: datetime | None
    duration_sec: float
    sampling_rate: int
    channels: int
    transcription: str | None  # None: transcription was off
    language: str | None
    segments: list[Segment] | None
    tokens: np.ndarray  # int16 [codebooks, frames]
    tokenizer: str
    token_frame_rate: float
    whisper_model: str | None
    kafka_topic: str
    kafka_partition: int
    kafka_offset: int
    processed_at: datetime

    @property
    def token_frames(self) -> int:
        return int(self.tokens.shape[1]) if self.tokens.ndim == 2 else 0


def to_table(rows: list[TranscribedAudio]) -> pa.Table:
    """Rows -> Arrow table in `SCHEMA`; tokens go in as nested int16 lists without Python loops per code."""
    tokens = _tokens_array(rows)
    columns = {
        "id": [r.id for r in rows],
        "bucket": [r.bucket for r in rows],
        "etag": [r.etag for r in rows],
        "size_bytes": [r.size_bytes for r in rows],
        "event_time": [r.event_time for r in rows],
        "duration_sec": [r.duration_sec for r in rows],
        "sampling_rate": [r.sampling_rate for r in rows],
        "channels": [r.channels for r in rows],
        "transcription": [r.transcription for r in rows],
        "language": [r.language for r in rows],
        "segments": [None if r.segments is None else [{"start": s.start, "end": s.end, "text": s.text} for s in r.segments]
                     for r in rows],
        "tokens": tokens,
        "token_codebooks": [int(r.tokens.shape[0]) for r in rows],
        "token_frame_rate": [r.token_frame_rate for r in rows],
        "tokenizer": [r.tokenizer for r in rows],
        "whisper_model": [r.whisper_model for r in rows],
        "kafka_topic": [r.kafka_topic for r in rows],
        "kafka_partition": [r.kafka_partition for r in rows],
        "kafka_offset": [r.kafka_offset for r in rows],
        "processed_at": [r.processed_at for r in rows],
    }
    arrays = [
        tokens if name == "tokens" else pa.array(columns[name], type=SCHEMA.field(name).type)
        for name in SCHEMA.names
    ]
    return pa.Table.from_arrays(arrays, schema=SCHEMA)


def _tokens_array(rows: list[TranscribedAudio]) -> pa.Array:
    inner_offsets = [0]
    outer_offsets = [0]
    flat = []
    for r in rows:
        codes = np.asarray(r.tokens, dtype=np.int16)
        if codes.ndim != 2:
            codes = codes.reshape(0, 0)
        for book in codes:
            flat.append(book)
            inner_offsets.append(inner_offsets[-1] + book.shape[0])
        outer_offsets.append(outer_offsets[-1] + codes.shape[0])
    values = pa.array(np.concatenate(flat) if flat else np.zeros(0, np.int16), type=pa.int16())
    inner = pa.ListArray.from_arrays(pa.array(inner_offsets, pa.int32()), values)
    return pa.ListArray.from_arrays(pa.array(outer_offsets, pa.int32()), inner)


def tokens_from_column(value: list[list[int]] | None) -> np.ndarray:
    """A row's `tokens` cell back to int16 `[codebooks, frames]`."""
    if not value:
        return np.zeros((0, 0), dtype=np.int16)
    return np.asarray(value, dtype=np.int16)
