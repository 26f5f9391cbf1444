"""Transcription off (`METAVOICE_TRANSCRIBE=false`, `python -m consumer --no-transcribe`).

Rows hold metadata and tokens only; `transcription` (and the other Whisper columns) are null;
summary.json says transcription was off; Whisper is never loaded. Real broker, real S3 server,
the real consumer with Prefect on (the flow path without a transcribe task run).
"""

from __future__ import annotations

import orjson
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from consumer.cli import build_parser
from pipeline.config import Settings
from pipeline.output.layout import MANIFEST_NAME
from pipeline.records import SCHEMA
from pipeline.summary import Aggregates

from .conftest import backfill, consume_until_idle, read_topic, upload

pytestmark = [pytest.mark.integration]


def test_the_no_transcribe_flag_and_the_setting_both_turn_transcription_off(monkeypatch):
    args = {k: v for k, v in vars(build_parser().parse_args(["--no-transcribe"])).items()}
    assert Settings().with_overrides(**args).transcribe is False
    assert Settings().with_overrides(**vars(build_parser().parse_args([]))).transcribe is True
    monkeypatch.setenv("METAVOICE_TRANSCRIBE", "false")
    assert Settings().transcribe is False


def test_summary_says_transcription_off_on_or_mixed_and_the_flag_merges_across_files():
    off, on = Aggregates(files=2, untranscribed=2), Aggregates(files=3)
    assert (off.transcription, on.transcription, Aggregates().transcription) == ("off", "on", None)
    assert Aggregates.from_state({"files": 1}).transcription == "on"  # a footer from before the flag
    merged = Aggregates()
    merged.merge(off)
    merged.merge(Aggregates.from_state(off.to_state()))  # footers round-trip it
    assert merged.transcription == "off" and merged.report([])["transcription"] == "off"
    merged.merge(on)  # a directory written both ways (--force)
    assert merged.transcription == "mixed"


def test_with_transcription_off_rows_carry_tokens_and_null_transcripts_and_whisper_is_never_loaded(
    s3, bucket, settings_factory, speech_corpus, monkeypatch
):
    def refuse(*args, **kwargs):
        raise AssertionError("Whisper was loaded although transcription is off")

    import faster_whisper

    monkeypatch.setattr("pipeline.models.WhisperTranscriber", refuse)
    monkeypatch.setattr(faster_whisper, "WhisperModel", refuse)
    clips = speech_corpus[:3]
    upload(s3, bucket, clips)
    s3.put_object(Bucket=bucket, Key="clips/broken.flac", Body=b"not audio either")
    st = settings_factory(transcribe=False, prefect_enabled=True, batch_max_events=2)
    assert backfill(st, bucket).published == len(clips) + 1

    stats = consume_until_idle(st, None)  # the consumer loads its models itself: no Whisper among them

    assert stats.rows == len(clips) and stats.dead_letters == 1
    files = sorted((st.output_dir / "data").glob("*.parquet"))
    assert files and all(pq.read_schema(f).remove_metadata().equals(SCHEMA) for f in files)
    rows = {r["id"]: r for f in files for r in pq.read_table(f).to_pylist()}
    assert sorted(rows) == sorted(c.key for c in clips)
    for clip in clips:
        row = rows[clip.key]
        assert row["transcription"] is None and row["language"] is None and row["segments"] is None
        assert row["whisper_model"] is None
        assert row["tokenizer"] == "synthetic" and len(row["tokens"]) == 8
        assert abs(len(row["tokens"][0]) - row["duration_sec"] * 75) <= 1  # tokens cover the audio
        assert row["duration_sec"] == pytest.approx(sf.info(str(clip.path)).duration, abs=1e-3)
        assert (row["sampling_rate"], row["channels"]) == (clip.sample_rate, clip.channels)
        assert row["etag"] and row["kafka_offset"] >= 0

    summary = orjson.loads((st.output_dir / "summary.json").read_bytes())
    assert summary["transcription"] == "off"
    assert summary["total_files"] == len(clips) and summary["_state"]["aggregates"]["untranscribed"] == len(clips)
    assert summary["transcription_lengths"] == {"min": None, "max": None, "avg": None}
    assert summary["languages"] == {}
    assert summary["token_counts"]["min"] > 0
    assert summary["errors"] == {"total": 1, "by_type": {"NotAudio": 1}}
    # the directory says it was built without Whisper: a transcribing run will not mix into it
    assert orjson.loads((st.output_dir / MANIFEST_NAME).read_bytes())["whisper_model"] is None
    assert len(read_topic(st, st.dlq_topic, expected=1)) == 1
