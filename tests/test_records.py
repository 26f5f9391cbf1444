"""The output record: one declaration, the Parquet schema files already hold, and a lossless way back."""

from __future__ import annotations

from dataclasses import fields
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from pipeline.records import SCHEMA, Segment, TranscribedAudio, iter_records, read_records, to_table

# A literal copy of `SCHEMA` as it was while it was still written out by hand (before it was derived from
# `TranscribedAudio`). Files written since then hold exactly this schema; it must never change by accident.
SCHEMA_AS_WRITTEN = pa.schema(
    [
        pa.field("id", pa.string()),
        pa.field("bucket", pa.string()),
        pa.field("etag", pa.string()),
        pa.field("size_bytes", pa.int64()),
        pa.field("event_time", pa.timestamp("ms", tz="UTC")),
        pa.field("duration_sec", pa.float64()),
        pa.field("sampling_rate", pa.int32()),
        pa.field("channels", pa.int16()),
        pa.field("transcription", pa.string()),
        pa.field("language", pa.string()),
        pa.field(
            "segments",
            pa.list_(
                pa.field(
                    "item",
                    pa.struct(
                        [pa.field("start", pa.float32()), pa.field("end", pa.float32()), pa.field("text", pa.string())]
                    ),
                )
            ),
        ),
        pa.field("tokens", pa.list_(pa.field("item", pa.list_(pa.field("item", pa.int16()))))),
        pa.field("token_codebooks", pa.int16()),
        pa.field("token_frame_rate", pa.float32()),
        pa.field("tokenizer", pa.string()),
        pa.field("whisper_model", pa.string()),
        pa.field("kafka_topic", pa.string()),
        pa.field("kafka_partition", pa.int32()),
        pa.field("kafka_offset", pa.int64()),
        pa.field("processed_at", pa.timestamp("ms", tz="UTC")),
    ]
)


# The columns appended for issue 21 (utterance rows, words, speakers, quality), after the ones above: files
# written before them hold `SCHEMA_AS_WRITTEN`, files written since hold both, in this order.
_WORD = pa.struct([pa.field("start", pa.float64()), pa.field("end", pa.float64()),
                   pa.field("word", pa.string()), pa.field("probability", pa.float32())])
UTTERANCE_COLUMNS = [
    pa.field("utterance", pa.int32()),
    pa.field("start_sec", pa.float64()),
    pa.field("end_sec", pa.float64()),
    pa.field("words", pa.list_(pa.field("item", _WORD))),
    pa.field("speaker", pa.string()),
    pa.field("speaker_embedding", pa.list_(pa.field("item", pa.float32()))),
    *(pa.field(n, pa.float32()) for n in ("dnsmos_ovrl", "dnsmos_sig", "dnsmos_bak", "snr_db", "bandwidth_hz",
                                         "clipping_ratio", "rms_dbfs", "speech_ratio", "avg_logprob",
                                         "no_speech_prob", "compression_ratio", "language_probability")),
    pa.field("flags", pa.list_(pa.field("item", pa.string()))),
    pa.field("vad_model", pa.string()),
    pa.field("dnsmos_model", pa.string()),
    pa.field("speaker_model", pa.string()),
]
# Appended for issue 20 item 5 (a delete naming an S3 version): null in files written before it.
VERSION_COLUMNS = [pa.field("version_id", pa.string())]
SCHEMA_NOW = pa.schema(list(SCHEMA_AS_WRITTEN) + UTTERANCE_COLUMNS + VERSION_COLUMNS)


def _nested_fields(field: pa.Field, path: str = "") -> list[tuple[str, str, bool, object]]:
    """Every field down the type tree: (path, type, nullable, metadata), so names of list items count too."""
    here = f"{path}/{field.name}"
    out = [(here, str(field.type), field.nullable, field.metadata)]
    for i in range(field.type.num_fields):
        out += _nested_fields(field.type.field(i), here)
    return out


def row(i: int, *, transcribed: bool = True, tokens: np.ndarray | None = None) -> TranscribedAudio:
    # times at whole milliseconds and floats a float32 holds exactly: the columns store exactly these
    at = datetime(2026, 1, 2, 3, 4, 5, 678_000, tzinfo=timezone.utc)
    return TranscribedAudio(
        id=f"clips/k{i}.flac", bucket="b", etag=f"e{i}", size_bytes=1000 + i, event_time=at if i % 3 else None,
        duration_sec=1.25 + i, sampling_rate=16_000, channels=1 + i % 2,
        transcription=f"text {i}" if transcribed else None, language="en" if transcribed else None,
        segments=[Segment(0.0, 0.5, "text"), Segment(0.5, 1.25, f"{i}")] if transcribed else None,
        tokens=np.arange(8 * (5 + i), dtype=np.int16).reshape(8, 5 + i) - i if tokens is None else tokens,
        tokenizer="synthetic", token_frame_rate=75.0, whisper_model="tiny.en" if transcribed else None,
        kafka_topic="events", kafka_partition=i % 3, kafka_offset=10 * i, processed_at=at,
        utterance=i % 2, start_sec=0.5 * i, end_sec=0.5 * i + 1.25, speaker=f"S{i % 2}" if transcribed else None,
        speaker_embedding=np.full(256, 0.0625, np.float32) if transcribed else None,
        dnsmos_ovrl=3.25, dnsmos_sig=3.5, dnsmos_bak=4.0, snr_db=20.5, bandwidth_hz=4000.0, clipping_ratio=0.0,
        rms_dbfs=-20.0, speech_ratio=0.75, flags=["overlap_suspected"] if i % 2 else [],
        vad_model="silero_vad_v6", dnsmos_model="dnsmos-p835", speaker_model="resemblyzer",
    )


def assert_same_records(got: list[TranscribedAudio], want: list[TranscribedAudio]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        for f in fields(TranscribedAudio):
            a, b = getattr(g, f.name), getattr(w, f.name)
            if f.name == "tokens":
                assert a.dtype == np.int16 and a.shape == b.shape and np.array_equal(a, b), f.name
            elif f.name == "speaker_embedding" and a is not None:
                assert a.dtype == np.float32 and np.array_equal(a, b), f.name
            else:
                assert a == b and type(a) is type(b), (f.name, a, b)


def test_derived_schema_is_exactly_the_schema_files_already_hold_plus_the_appended_columns():
    assert SCHEMA.equals(SCHEMA_NOW, check_metadata=True)
    assert SCHEMA.metadata is None
    assert [_nested_fields(f) for f in SCHEMA] == [_nested_fields(f) for f in SCHEMA_NOW]


def test_a_file_written_before_the_utterance_columns_reads_back_with_their_defaults(tmp_path):
    old = to_table([row(0), row(1)]).select(SCHEMA_AS_WRITTEN.names)
    pq.write_table(old, tmp_path / "old.parquet")
    back = read_records(tmp_path / "old.parquet")
    assert [r.utterance for r in back] == [0, 0] and back[0].words is None and back[0].dnsmos_ovrl is None
    assert [r.kafka_offset for r in back] == [0, 10]


def test_parquet_files_from_to_table_have_the_parquet_schema_of_the_literal(tmp_path):
    pq.write_table(to_table([row(0), row(1, transcribed=False)]), tmp_path / "new.parquet")
    pq.write_table(SCHEMA_NOW.empty_table(), tmp_path / "literal.parquet")
    new, literal = pq.ParquetFile(tmp_path / "new.parquet"), pq.ParquetFile(tmp_path / "literal.parquet")
    assert new.schema.equals(literal.schema)  # the Parquet (physical + logical) schema, column for column
    assert new.schema_arrow.remove_metadata().equals(SCHEMA_NOW)  # (pyarrow adds its own ARROW:schema key)


def test_every_dataclass_field_is_a_column_and_token_codebooks_is_derived_from_tokens():
    stored = [f.name for f in fields(TranscribedAudio)]
    assert [n for n in SCHEMA.names if n != "token_codebooks"] == stored
    r = row(2)
    assert r.token_codebooks == 8 and r.token_frames == 7
    assert to_table([r]).column("token_codebooks").to_pylist() == [8]


def test_records_round_trip_through_parquet_including_null_transcripts_and_empty_tokens(tmp_path):
    rows = [
        row(0),
        row(1, transcribed=False),  # transcription off: transcription, language, segments, whisper_model null
        row(2, tokens=np.zeros((0, 0), np.int16)),  # no tokens at all
        row(3, tokens=np.zeros((8, 0), np.int16)),  # codebooks without frames
        row(4, transcribed=False, tokens=np.array([[-32768, 32767, 0]], np.int16)),  # one codebook, int16 extremes
        row(5),
    ]
    rows[5].segments = []  # transcribed, but nothing said
    path = tmp_path / "rows.parquet"
    pq.write_table(to_table(rows), path)
    back = read_records(path)
    assert_same_records(back, rows)
    assert back[1].transcription is None and back[1].segments is None and back[1].whisper_model is None
    assert back[2].tokens.shape == (0, 0) and back[3].tokens.shape == (8, 0) and back[5].segments == []
    assert back[0].event_time is None and back[1].event_time == rows[1].event_time


def test_read_records_takes_a_table_a_batch_or_a_dataset_of_many_files_in_order(tmp_path):
    rows = [row(i, transcribed=i % 4 != 1) for i in range(9)]
    pq.write_table(to_table(rows[:4]), tmp_path / "a.parquet")
    pq.write_table(to_table(rows[4:]), tmp_path / "b.parquet", row_group_size=2)
    assert_same_records(read_records(to_table(rows)), rows)
    assert_same_records(read_records(to_table(rows).to_batches()[0]), rows)
    assert_same_records(read_records(str(tmp_path / "a.parquet")), rows[:4])
    dataset = ds.dataset([str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")], format="parquet")
    assert_same_records(read_records(dataset), rows)
    assert_same_records(list(iter_records(tmp_path / "b.parquet", batch_size=2)), rows[4:])


def test_read_records_follows_slices_and_ignores_columns_it_does_not_know():
    rows = [row(i) for i in range(6)]
    table = to_table(rows).append_column("extra", pa.array(range(6)))
    assert_same_records(read_records(table.slice(2, 3)), rows[2:5])
    assert_same_records(read_records(pa.concat_tables([to_table(rows[:2]), to_table(rows[2:])])), rows)


def test_a_column_of_another_type_is_refused_by_name():
    table = to_table([row(0)])
    table = table.set_column(table.schema.get_field_index("channels"), "channels", pa.array([1], pa.int64()))
    with pytest.raises(ValueError, match="channels"):
        read_records(table)


def test_tokens_whose_codebooks_differ_in_length_are_refused():
    bad = pa.array([[[1, 2, 3], [4, 5]]], SCHEMA.field("tokens").type)
    table = to_table([row(0)])
    table = table.set_column(table.schema.get_field_index("tokens"), "tokens", bad)
    with pytest.raises(ValueError, match="tokens"):
        read_records(table)
