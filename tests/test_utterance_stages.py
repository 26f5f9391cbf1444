"""The batch stages in `utterances` mode, on the real two-speaker call, without a broker: with a
transcript the rows are cut between the decoded words; without one (METAVOICE_TRANSCRIBE=false) the
VAD regions themselves are the utterances. Either way: ordered, 1-30 s, tokens of the row's own crop."""

from __future__ import annotations

import math
from datetime import datetime, timezone

import pytest

from pipeline.audio import DecodedAudio, DecodeSpec
from pipeline.batch import (Downloaded, Slot, SourceRef, WorkItem, assemble_stage, score_stage, segment_stage,
                            tokenize_stage, transcribe_stage)
from pipeline.config import Settings
from pipeline.events import ObjectEvent

from . import speech

pytestmark = pytest.mark.slow

SYNTHETIC_RATE, SYNTHETIC_HOP = 24_000, 320  # pipeline/tokenizers/synthetic.py


def rows_of(models, audio):
    item = WorkItem(ObjectEvent("b", "call.flac", etag="e", event_time=datetime.now(timezone.utc)), SourceRef("t", 0, 0))
    decoded = [Slot(item, DecodedAudio.from_samples(audio, speech.SAMPLE_RATE, DecodeSpec(layouts=models.layouts)))]
    seg = segment_stage(models, decoded)
    tr = transcribe_stage(models, seg)  # in utterances mode with a transcript: sets the spans and crops
    tok, sc = tokenize_stage(models, seg), score_stage(models, seg)
    outcome = assemble_stage(models, [Slot(item, Downloaded(b"x", "e"))], seg, tr, tok, sc)
    assert not outcome.failures
    return outcome.rows, seg[0].value


@pytest.mark.parametrize("transcribe", [True, False], ids=["words", "no-transcript"])
def test_utterance_rows_are_ordered_within_bounds_and_tokenized_from_their_own_crop(transcribe):
    from pipeline.models import Models

    models = Models.load(Settings(prefect_enabled=False, segmentation="utterances", dnsmos="off", transcribe=transcribe))
    try:
        call = speech.phone_call()
        rows, seg = rows_of(models, call.audio())
        whole = models.transcriber.transcribe_batch([call.audio()])[0].text if transcribe else None
    finally:
        models.close()
    assert len(rows) >= 3 and [r.utterance for r in rows] == list(range(len(rows)))
    assert [(r.start_sec, r.end_sec) for r in rows] == seg.spans
    for a, b in zip(rows, rows[1:]):
        assert a.start_sec < a.end_sec <= b.start_sec < b.end_sec
    for r in rows:
        assert 1.0 - 1e-6 <= r.duration_sec <= 30.0 + 1e-6
        samples = round(r.end_sec * SYNTHETIC_RATE) - round(r.start_sec * SYNTHETIC_RATE)
        assert r.tokens.shape[1] == max(1, math.ceil(samples / SYNTHETIC_HOP))
    assert len({r.speaker for r in rows}) > 1
    if transcribe:
        assert seg.windows and all(b - a <= 30.0 for a, b in seg.windows)
        for r in rows:  # words and segments absolute, inside their own row; text = the words
            assert r.transcription == " ".join(w.word for w in r.words)
            assert all(r.start_sec - 1e-3 <= x.start <= x.end <= r.end_sec + 1e-3 for x in [*r.words, *r.segments])
        joined = " ".join(r.transcription for r in rows)
        assert speech.wer(call.text, joined) <= speech.wer(call.text, whole) + 0.03, (joined, whole)
    else:
        assert all(r.transcription is None and r.words is None for r in rows)
