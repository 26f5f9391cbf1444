"""Whisper's unfinished tail is decoded, not dropped: batched decoding matches `transcribe()` on real speech."""

from __future__ import annotations

import pytest

from .speech import arctic, concatenate, phone_call, wer

pytestmark = pytest.mark.slow

WER_SLACK = 0.02  # the bar: within two points of faster-whisper's own transcribe()


@pytest.fixture(scope="module")
def transcriber():
    """Whisper alone (bundled tiny.en): these tests need no other model."""
    from pipeline.config import Settings
    from pipeline.transcribe import WhisperTranscriber

    tr = WhisperTranscriber(Settings(prefect_enabled=False))
    yield tr
    tr.close()


@pytest.fixture(scope="module")
def call():
    return phone_call()


def _both(tr, audio):
    (ours,) = tr.transcribe_batch([audio])
    theirs = tr.transcribe_one_by_one(audio)
    return ours, theirs


def test_a_call_that_speaks_to_the_end_of_the_window_keeps_its_last_utterance(transcriber, call):
    """The 30.0 s call ends mid-window with "...in New Jersey now."; one generate call stopped at 28 s."""
    ours, theirs = _both(transcriber, call.audio())
    ours_wer, theirs_wer = wer(call.text, ours.text), wer(call.text, theirs.text)
    assert ours_wer <= theirs_wer + WER_SLACK, f"WER {ours_wer:.3f} batched vs {theirs_wer:.3f} transcribe(): {ours.text!r}"
    assert "jersey now" in " ".join(ours.text.lower().replace(".", "").split()[-4:])
    assert ours.segments[-1].end > 29.0


def test_a_recording_longer_than_30_s_loses_no_chunk_tail(transcriber, call):
    """Real speech past one window (an ARCTIC sentence, then the call: 34.5 s) goes through VAD chunks,
    and the call's last utterance sits at the end of the last chunk."""
    read = arctic()
    audio = concatenate([read.audio(), call.audio()])
    assert audio.shape[0] / 16_000 > 30.0
    reference = f"{read.text} {call.text}"
    ours, theirs = _both(transcriber, audio)
    ours_wer, theirs_wer = wer(reference, ours.text), wer(reference, theirs.text)
    assert ours_wer <= theirs_wer + WER_SLACK, f"WER {ours_wer:.3f} batched vs {theirs_wer:.3f} transcribe(): {ours.text!r}"
    assert "superlative degree" in ours.text.lower()
    assert "jersey now" in " ".join(ours.text.lower().replace(".", "").split()[-4:])
