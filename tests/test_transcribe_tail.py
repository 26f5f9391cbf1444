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


def test_recordings_of_35_to_65_s_are_as_accurate_as_transcribe_on_average(transcriber, call):
    """Four real recordings past one window (two to three VAD chunks each): the batched path's mean WER
    is within 0.02 of `transcribe()`'s. One recording alone is not the bar: tiny.en's decode of the
    same call varies by several points with where a chunk starts (measured: 0.179 vs 0.130 on the call
    twice, 0.150 vs 0.168 on call-ARCTIC-call; ours repeats the one-call errors, where it equals
    `transcribe()`). Without the tail decoding the mean is 0.247 against 0.145 (call-ARCTIC-call: 0.514)."""
    read, speech_call = arctic(), call.audio()
    cases = [
        ([speech_call, speech_call], [call.text, call.text]),
        ([read.audio(), speech_call], [read.text, call.text]),
        ([speech_call, read.audio(), speech_call], [call.text, read.text, call.text]),
        ([read.audio()] * 3 + [speech_call] + [read.audio()] * 3, [read.text] * 3 + [call.text] + [read.text] * 3),
    ]
    ours, theirs = [], []
    for clips, texts in cases:
        audio = concatenate(clips)
        assert audio.shape[0] / 16_000 > 30.0
        ours_t, theirs_t = _both(transcriber, audio)
        ours.append(wer(" ".join(texts), ours_t.text))
        theirs.append(wer(" ".join(texts), theirs_t.text))
    mean_ours, mean_theirs = sum(ours) / len(ours), sum(theirs) / len(theirs)
    assert mean_ours <= mean_theirs + WER_SLACK, (ours, theirs)


def test_words_carry_absolute_times_and_whisper_statistics_from_the_batched_path(transcriber, call):
    """Words of a file longer than 30 s, from one batch with a short clip and silence: ordered, inside
    the clip, in the file's own time (the call's words after the ARCTIC sentence start past 4 s)."""
    import numpy as np

    read = arctic()
    long = concatenate([read.audio(), call.audio()])
    silence = np.zeros(16_000, np.float32)
    t_long, t_read, t_silence = transcriber.transcribe_batch([long, read.audio(), silence])
    for t, audio in ((t_long, long), (t_read, read.audio())):
        assert len(t.words) == len(t.text.split())
        assert [w.start for w in t.words] == sorted(w.start for w in t.words)
        assert all(0.0 <= w.start <= w.end <= audio.shape[0] / 16_000 for w in t.words)
        assert all(0.0 <= w.probability <= 1.0 for w in t.words)
        assert -1.0 < t.avg_logprob < 0.0 and 0.0 < t.compression_ratio < 2.4
        assert t.language_probability == 1.0  # tiny.en: English only
    jersey = [w for w in t_long.words if "jersey" in w.word.lower()]
    assert jersey[-1].start > 4.5 + 28.0  # the call's last "Jersey" at ~29.4 s, shifted by the 4.5 s before it
    assert t_silence.no_speech_prob > 0.5 > t_read.no_speech_prob


def test_words_of_a_later_chunk_and_of_a_tail_are_placed_in_file_time(transcriber, call):
    """Two calls back to back (60.5 s: two VAD chunks): the second call's words sit 30.5 s later."""
    twice = concatenate([call.audio(), call.audio()])
    (t,) = transcriber.transcribe_batch([twice])
    first = [w for w in t.words if w.end <= 30.0]
    second = [w for w in t.words if w.start >= 30.5]
    assert len(first) > 20 and len(second) > 20
    assert [w.start for w in t.words] == sorted(w.start for w in t.words)
    last_jersey = [w for w in second if "jersey" in w.word.lower()][-1]
    assert 30.5 + 28.0 < last_jersey.start < 60.5
