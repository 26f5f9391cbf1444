"""Cross-file batching must not cost accuracy: packed windows vs faster-whisper's per-file decode."""

from __future__ import annotations

import pytest

from pipeline.audio import WHISPER_SAMPLE_RATE, decode_audio
from pipeline.samples import word_overlap

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def clips16k(speech_corpus):
    return [decode_audio(c.path.read_bytes()).at_rate(WHISPER_SAMPLE_RATE) for c in speech_corpus]


def mean(xs):
    return sum(xs) / len(xs)


def test_packed_cross_file_batches_are_as_accurate_as_per_file_decoding(models, speech_corpus, clips16k):
    tr = models.transcriber
    packed = tr.transcribe_batch(clips16k)
    per_file = [tr.transcribe_one_by_one(c) for c in clips16k]
    packed_score = mean([word_overlap(c.text, t.text) for c, t in zip(speech_corpus, packed)])
    per_file_score = mean([word_overlap(c.text, t.text) for c, t in zip(speech_corpus, per_file)])
    assert packed_score >= per_file_score, (packed_score, per_file_score)


def test_segments_stay_inside_their_own_clip(models, clips16k):
    for clip, t in zip(clips16k, models.transcriber.transcribe_batch(clips16k)):
        duration = clip.shape[0] / WHISPER_SAMPLE_RATE
        assert t.segments
        for s in t.segments:
            assert 0.0 <= s.start <= s.end <= duration + 1e-6


def test_a_long_file_is_split_and_reassembled_in_order(models, speech_corpus, clips16k):
    import numpy as np

    long = np.concatenate(clips16k * 3)  # ~70 s: VAD chunks, several windows
    (t,) = models.transcriber.transcribe_batch([long])
    starts = [s.start for s in t.segments]
    assert starts == sorted(starts) and t.segments[-1].end > 50
    reference = " ".join(c.text for c in speech_corpus * 3)
    assert word_overlap(reference, t.text) >= 0.6
