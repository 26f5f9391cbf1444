"""Utterance rows (METAVOICE_SEGMENTATION=utterances) on real speech, through the real broker and moto S3.

The consumer runs in-process on models loaded once for utterances mode (bundled tiny.en, the synthetic
tokenizer, Silero VAD, the Resemblyzer encoder; DNSMOS off: on these 2 CPU cores it costs more than
Whisper, and its ranking is proven in tests/test_analysis_*.py). Real recordings come from tests/speech.py.
"""

from __future__ import annotations

import math
from collections import Counter

import orjson
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from pipeline.config import Settings

from . import speech
from .conftest import backfill, consume_until_idle

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SYNTHETIC_RATE, SYNTHETIC_HOP = 24_000, 320  # pipeline/tokenizers/synthetic.py


@pytest.fixture(scope="module")
def utterance_models():
    from pipeline.models import Models

    m = Models.load(Settings(prefect_enabled=False, segmentation="utterances", dnsmos="off"))
    yield m
    m.close()


@pytest.fixture(scope="module")
def recordings(tmp_path_factory):
    """The two-speaker call, the one-reader ARCTIC sentence, and that sentence read three times with
    1 s pauses, as FLAC objects to upload: name -> (path, recording with reference text, audio if built)."""
    d = tmp_path_factory.mktemp("real-speech")
    out = {}
    arctic = speech.arctic()
    three = speech.Recording(d / "unused.wav", " ".join([arctic.text] * 3))  # one reader, three sentences
    for name, rec, audio in (("call", speech.phone_call(), None), ("arctic", arctic, None),
                             ("arctic3", three, speech.concatenate([arctic.audio()] * 3, gap_sec=1.0))):
        path = d / f"{name}.flac"
        sf.write(path, rec.audio() if audio is None else audio, speech.SAMPLE_RATE, format="FLAC")
        out[name] = (path, rec, audio)
    return out


def rows_by_file(st) -> dict[str, list[dict]]:
    files = sorted((st.output_dir / "data").glob("*.parquet"))
    by: dict[str, list[dict]] = {}
    for f in files:
        keys = set()
        for r in pq.read_table(f).to_pylist():
            by.setdefault(r["id"], []).append(r)
            keys.add(r["id"])
    return {k: sorted(v, key=lambda r: r["utterance"]) for k, v in by.items()}


def test_utterances_mode_cuts_real_speech_into_ordered_speaker_labelled_rows_with_their_own_tokens(
    s3, bucket, settings_factory, recordings, utterance_models
):
    for name, (path, _, _) in recordings.items():
        s3.upload_file(str(path), bucket, f"speech/{name}.flac")
    st = settings_factory(segmentation="utterances", dnsmos="off", prefect_enabled=False)
    assert backfill(st, bucket).published == 3

    stats = consume_until_idle(st, utterance_models)

    by = rows_by_file(st)
    assert sorted(by) == ["speech/arctic.flac", "speech/arctic3.flac", "speech/call.flac"] and stats.dead_letters == 0
    # (bucket, id, etag, utterance) unique, utterances 0..n-1 of each object version
    keys = Counter((r["bucket"], r["id"], r["etag"], r["utterance"]) for rs in by.values() for r in rs)
    assert max(keys.values()) == 1
    for rs in by.values():
        assert [r["utterance"] for r in rs] == list(range(len(rs)))
        for a, b in zip(rs, rs[1:]):  # ordered, not overlapping
            assert a["start_sec"] < a["end_sec"] <= b["start_sec"] < b["end_sec"]
        for r in rs:
            assert 1.0 - 1e-6 <= r["duration_sec"] <= 30.0 + 1e-6
            assert r["duration_sec"] == pytest.approx(r["end_sec"] - r["start_sec"], abs=1e-5)
            # tokens of the utterance's own crop: ceil(samples / hop), samples = the crop at 24 kHz
            samples = round(r["end_sec"] * SYNTHETIC_RATE) - round(r["start_sec"] * SYNTHETIC_RATE)
            assert len(r["tokens"][0]) == max(1, math.ceil(samples / SYNTHETIC_HOP))
            assert abs(len(r["tokens"][0]) - r["duration_sec"] * r["token_frame_rate"]) < 1.0
            for w in r["words"] + r["segments"]:  # absolute times in the source file, inside the utterance
                assert r["start_sec"] - 1e-3 <= w["start"] <= w["end"] <= r["end_sec"] + 1e-3
            assert r["snr_db"] is not None and r["bandwidth_hz"] is not None and r["speech_ratio"] > 0
            assert len(r["speaker_embedding"]) == 256 and r["vad_model"] and r["speaker_model"]
    call, arctic, three = by["speech/call.flac"], by["speech/arctic.flac"], by["speech/arctic3.flac"]
    assert len(call) >= 3 and len({r["speaker"] for r in call}) > 1
    assert {r["speaker"] for r in arctic} == {"S0"} and {r["speaker"] for r in three} == {"S0"}
    assert len(three) == 3  # cut at the two 1 s pauses

    # concatenated utterance transcripts: within a few WER points of the same model on the whole file,
    # the two-speaker call too (its words come from decoding whole windows, not 1.6 s turn crops)
    for name, rs in (("call", call), ("arctic", arctic), ("arctic3", three)):
        path, rec, audio = recordings[name]
        (whole,) = utterance_models.transcriber.transcribe_batch([rec.audio() if audio is None else audio])
        joined = " ".join(r["transcription"] for r in rs)
        assert speech.wer(rec.text, joined) <= speech.wer(rec.text, whole.text) + 0.03, (joined, whole.text)

    summary = orjson.loads((st.output_dir / "summary.json").read_bytes())
    assert summary["total_files"] == 3 and summary["total_utterances"] == len(call) + len(arctic) + len(three)
    assert summary["speakers_per_file"]["1"] == 2 and sum(summary["speakers_per_file"].values()) == 3
    manifest = orjson.loads((st.output_dir / "_manifest.json").read_bytes())
    assert manifest["segmentation"] == "utterances" and manifest["speaker_model"] == call[0]["speaker_model"]


def test_file_mode_fills_words_quality_and_speaker_columns_for_the_whole_file(
    s3, bucket, settings_factory, recordings
):
    from pipeline.models import Models

    path, rec, _ = recordings["call"]
    s3.upload_file(str(path), bucket, "speech/call.flac")
    st = settings_factory(dnsmos="off", prefect_enabled=False)
    assert st.segmentation == "file" and backfill(st, bucket).published == 1
    models = Models.load(st)
    try:
        consume_until_idle(st, models)
    finally:
        models.close()

    (row,) = rows_by_file(st)["speech/call.flac"]
    assert (row["utterance"], row["start_sec"]) == (0, 0.0)
    assert row["end_sec"] == pytest.approx(row["duration_sec"]) == pytest.approx(30.0, abs=0.01)
    assert row["speaker"] == "S0" and len(row["speaker_embedding"]) == 256
    assert 3000 < row["bandwidth_hz"] < 4500  # a telephone band, stored at 16 kHz
    assert row["snr_db"] is not None and 0 < row["speech_ratio"] < 1
    assert row["words"] and row["words"][-1]["end"] > 25.0  # word times run to the file's end
